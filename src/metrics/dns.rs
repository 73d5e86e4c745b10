//! The `dns` kind's series. They carry their own labels (record, type,
//! resolver) in place of the instance's env and address, so a record's view
//! across resolvers reads as one family.

use prometheus::{GaugeVec, IntCounterVec, Registry};

use super::{Instance, KindSeries, counter, gauge};
use crate::probe::Measurement;
use crate::probe::dns::{AnswerState, Measured};

/// Labels of the per-resolver series ([`Measured::Answer`]).
const ANSWER_LABELS: [&str; 4] = ["check", "record", "type", "resolver"];
const ANSWER_LABELS_STATE: [&str; 5] = ["check", "record", "type", "resolver", "state"];
/// Labels of the cross-resolver summaries ([`Measured::Summary`]).
const SUMMARY_LABELS: [&str; 3] = ["check", "record", "type"];

pub(super) struct Series {
    state: GaugeVec,
    ttl: GaugeVec,
    duration: GaugeVec,
    changes: IntCounterVec,
    ratio: GaugeVec,
    deadline: GaugeVec,
}

impl Series {
    pub(super) fn register(r: &Registry) -> Series {
        Series {
            state: gauge(r, "cutover_dns_answer_state", &ANSWER_LABELS_STATE),
            ttl: gauge(r, "cutover_dns_answer_ttl_seconds", &ANSWER_LABELS),
            duration: gauge(r, "cutover_dns_query_duration_seconds", &ANSWER_LABELS),
            changes: counter(r, "cutover_dns_answer_changes_total", &ANSWER_LABELS),
            ratio: gauge(r, "cutover_dns_cutover_ratio", &SUMMARY_LABELS),
            deadline: gauge(r, "cutover_dns_propagation_deadline_timestamp_seconds", &SUMMARY_LABELS),
        }
    }
}

impl KindSeries for Series {
    fn owns(&self, m: &Measurement) -> bool {
        matches!(m, Measurement::Dns(_))
    }

    fn record(&self, inst: &Instance, m: &Measurement) {
        let check = inst.check.as_str();
        match m {
            Measurement::Dns(Measured::Answer {
                record,
                rtype,
                resolver,
                state,
                ttl,
                seconds,
                changed,
                ..
            }) => {
                let labels = [check, record, rtype, resolver];
                for s in AnswerState::ALL {
                    self.state
                        .with_label_values(&[check, record, rtype, resolver, s.as_str()])
                        .set(if s == *state { 1.0 } else { 0.0 });
                }
                match ttl {
                    Some(ttl) => self.ttl.with_label_values(&labels).set(f64::from(*ttl)),
                    None => {
                        let _ = self.ttl.remove_label_values(&labels);
                    }
                }
                self.duration.with_label_values(&labels).set(*seconds);
                let changes = self.changes.with_label_values(&labels);
                if *changed {
                    changes.inc();
                }
            }
            Measurement::Dns(Measured::Summary {
                record,
                rtype,
                resolvers,
                answering_new,
                deadline,
                unchanged,
            }) => {
                let labels = [check, record, rtype];
                // A record that does not move has no cutover to measure.
                if *unchanged {
                    let _ = self.ratio.remove_label_values(&labels);
                } else {
                    let ratio = *answering_new as f64 / (*resolvers).max(1) as f64;
                    self.ratio.with_label_values(&labels).set(ratio);
                }
                match deadline {
                    Some(at) => self.deadline.with_label_values(&labels).set(*at),
                    None => {
                        let _ = self.deadline.remove_label_values(&labels);
                    }
                }
            }
            _ => {}
        }
    }

    /// A summary shared by the check's other instances comes back with their next run.
    fn remove(&self, inst: &Instance, m: &Measurement) {
        let check = inst.check.as_str();
        match m {
            Measurement::Dns(Measured::Answer {
                record,
                rtype,
                resolver,
                ..
            }) => {
                let labels = [check, record, rtype, resolver];
                for s in AnswerState::ALL {
                    let _ = self
                        .state
                        .remove_label_values(&[check, record, rtype, resolver, s.as_str()]);
                }
                let _ = self.ttl.remove_label_values(&labels);
                let _ = self.duration.remove_label_values(&labels);
                let _ = self.changes.remove_label_values(&labels);
            }
            Measurement::Dns(Measured::Summary { record, rtype, .. }) => {
                let _ = self.ratio.remove_label_values(&[check, record, rtype]);
                let _ = self.deadline.remove_label_values(&[check, record, rtype]);
            }
            _ => {}
        }
    }

    fn same_series(&self, old: &Measurement, new: &Measurement) -> bool {
        match (old, new) {
            (
                Measurement::Dns(Measured::Answer {
                    record,
                    rtype,
                    resolver,
                    ..
                }),
                Measurement::Dns(Measured::Answer {
                    record: r,
                    rtype: t,
                    resolver: s,
                    ..
                }),
            ) => (record, rtype, resolver) == (r, t, s),
            (
                Measurement::Dns(Measured::Summary { record, rtype, .. }),
                Measurement::Dns(Measured::Summary {
                    record: r, rtype: t, ..
                }),
            ) => (record, rtype) == (r, t),
            _ => false,
        }
    }
}
