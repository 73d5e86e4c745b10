//! The `mail_auth` kind's series, labelled by the outbound environment and
//! address (or the domain and selector) instead of the instance's.

use prometheus::{GaugeVec, Registry};

use super::{Instance, KindSeries, gauge};
use crate::probe::Measurement;
use crate::probe::mail_auth::{Measured, SpfVerdict};

const SPF_LABELS: [&str; 5] = ["check", "domain", "env", "address", "result"];
const PTR_LABELS: [&str; 3] = ["check", "env", "address"];
const DKIM_LABELS: [&str; 3] = ["check", "domain", "selector"];
const DMARC_LABELS: [&str; 2] = ["check", "domain"];

pub(super) struct Series {
    spf: GaugeVec,
    ptr: GaugeVec,
    dkim: GaugeVec,
    dmarc: GaugeVec,
}

impl Series {
    pub(super) fn register(r: &Registry) -> Series {
        Series {
            spf: gauge(r, "cutover_spf_result", &SPF_LABELS),
            ptr: gauge(r, "cutover_ptr_ok", &PTR_LABELS),
            dkim: gauge(r, "cutover_dkim_record_ok", &DKIM_LABELS),
            dmarc: gauge(r, "cutover_dmarc_record_ok", &DMARC_LABELS),
        }
    }

    /// Sets (or, with `set` false, removes) the series of one measurement.
    fn put(&self, check: &str, m: &Measured, set: bool) {
        let put = |g: &GaugeVec, labels: &[&str], v: bool| {
            if set {
                g.with_label_values(labels).set(if v { 1.0 } else { 0.0 });
            } else {
                let _ = g.remove_label_values(labels);
            }
        };
        match m {
            Measured::Spf {
                domain,
                env,
                address,
                result,
            } => {
                for r in SpfVerdict::ALL {
                    put(&self.spf, &[check, domain, env, address, r.as_str()], r == *result);
                }
            }
            Measured::Ptr { env, address, ok } => put(&self.ptr, &[check, env, address], *ok),
            Measured::Dkim { domain, selector, ok } => put(&self.dkim, &[check, domain, selector], *ok),
            Measured::Dmarc { domain, ok } => put(&self.dmarc, &[check, domain], *ok),
        }
    }
}

impl KindSeries for Series {
    fn owns(&self, m: &Measurement) -> bool {
        matches!(m, Measurement::MailAuth(_))
    }

    fn record(&self, inst: &Instance, m: &Measurement) {
        if let Measurement::MailAuth(m) = m {
            self.put(&inst.check, m, true);
        }
    }

    fn remove(&self, inst: &Instance, m: &Measurement) {
        if let Measurement::MailAuth(m) = m {
            self.put(&inst.check, m, false);
        }
    }

    fn same_series(&self, old: &Measurement, new: &Measurement) -> bool {
        let (Measurement::MailAuth(old), Measurement::MailAuth(new)) = (old, new) else {
            return false;
        };
        match (old, new) {
            (
                Measured::Spf {
                    domain, env, address, ..
                },
                Measured::Spf {
                    domain: d,
                    env: e,
                    address: a,
                    ..
                },
            ) => (domain, env, address) == (d, e, a),
            (Measured::Ptr { env, address, .. }, Measured::Ptr { env: e, address: a, .. }) => (env, address) == (e, a),
            (
                Measured::Dkim { domain, selector, .. },
                Measured::Dkim {
                    domain: d, selector: s, ..
                },
            ) => (domain, selector) == (d, s),
            (Measured::Dmarc { domain, .. }, Measured::Dmarc { domain: d, .. }) => domain == d,
            _ => false,
        }
    }
}
