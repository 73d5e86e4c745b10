//! IMAP's own series: the size of the mailbox a run examined.

use prometheus::{GaugeVec, Registry};

use super::{Instance, KindSeries, gauge, instance_labels};
use crate::probe::Measurement;

/// `cutover_imap_mailbox_messages{check, kind, env, address, mailbox}`.
pub(super) struct Series {
    messages: GaugeVec,
}

impl Series {
    pub(super) fn register(r: &Registry) -> Series {
        Series {
            messages: gauge(r, "cutover_imap_mailbox_messages", &instance_labels(&["mailbox"])),
        }
    }
}

impl KindSeries for Series {
    fn owns(&self, m: &Measurement) -> bool {
        matches!(m, Measurement::Imap(_))
    }

    fn record(&self, inst: &Instance, m: &Measurement) {
        if let Measurement::Imap(m) = m {
            self.messages
                .with_label_values(&inst.with(&[&m.mailbox]))
                .set(m.messages as f64);
        }
    }

    fn remove(&self, inst: &Instance, m: &Measurement) {
        if let Measurement::Imap(m) = m {
            let _ = self.messages.remove_label_values(&inst.with(&[&m.mailbox]));
        }
    }
}
