//! SMTP's own series: the last reply code at each step of a session.

use prometheus::{GaugeVec, Registry};

use super::{Instance, KindSeries, gauge, instance_labels};
use crate::probe::Measurement;

/// `cutover_smtp_last_reply_code{check, kind, env, address, step}`.
pub(super) struct Series {
    code: GaugeVec,
}

impl Series {
    pub(super) fn register(r: &Registry) -> Series {
        Series {
            code: gauge(r, "cutover_smtp_last_reply_code", &instance_labels(&["step"])),
        }
    }
}

impl KindSeries for Series {
    fn owns(&self, m: &Measurement) -> bool {
        matches!(m, Measurement::Smtp(_))
    }

    fn record(&self, inst: &Instance, m: &Measurement) {
        if let Measurement::Smtp(m) = m {
            self.code
                .with_label_values(&inst.with(&[m.step]))
                .set(f64::from(m.code));
        }
    }

    fn remove(&self, inst: &Instance, m: &Measurement) {
        if let Measurement::Smtp(m) = m {
            let _ = self.code.remove_label_values(&inst.with(&[m.step]));
        }
    }

    fn same_series(&self, old: &Measurement, new: &Measurement) -> bool {
        matches!((old, new), (Measurement::Smtp(a), Measurement::Smtp(b)) if a.step == b.step)
    }
}
