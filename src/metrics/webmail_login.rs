//! The `webmail_login` kind's series: the listed mailbox's size per instance,
//! what each environment runs (`cutover_webmail_app_info`, one series per
//! check and environment) and whether old and new run the same webmail
//! (`cutover_webmail_parity`, one series per check).

use prometheus::{GaugeVec, Registry};

use super::{Instance, KindSeries, gauge, instance_labels};
use crate::probe::Measurement;
use crate::probe::webmail_login::Measured;

/// Labels of `cutover_webmail_app_info`.
const APP_LABELS: [&str; 6] = ["check", "env", "app", "version", "skin", "plugins"];

pub(super) struct Series {
    messages: GaugeVec,
    app: GaugeVec,
    parity: GaugeVec,
}

impl Series {
    pub(super) fn register(r: &Registry) -> Series {
        Series {
            messages: gauge(r, "cutover_webmail_inbox_messages", &instance_labels(&["mailbox"])),
            app: gauge(r, "cutover_webmail_app_info", &APP_LABELS),
            parity: gauge(r, "cutover_webmail_parity", &["check"]),
        }
    }
}

/// The label values of an app-info series.
fn app_values<'a>(
    inst: &'a Instance,
    facts: &'a crate::probe::webmail_login::AppFacts,
    plugins: &'a str,
) -> [&'a str; 6] {
    [&inst.check, &inst.env, facts.app, &facts.version, &facts.skin, plugins]
}

impl KindSeries for Series {
    fn owns(&self, m: &Measurement) -> bool {
        matches!(m, Measurement::WebmailLogin(_))
    }

    fn record(&self, inst: &Instance, m: &Measurement) {
        let Measurement::WebmailLogin(m) = m else { return };
        match m {
            Measured::Mailbox { mailbox, messages } => {
                self.messages
                    .with_label_values(&inst.with(&[mailbox]))
                    .set(*messages as f64);
            }
            Measured::App(facts) => {
                let plugins = facts.plugins.join(",");
                self.app.with_label_values(&app_values(inst, facts, &plugins)).set(1.0);
            }
            Measured::Parity { equal, .. } => {
                self.parity
                    .with_label_values(&[&inst.check])
                    .set(if *equal { 1.0 } else { 0.0 });
            }
        }
    }

    /// Parity is the check's: another instance's next run brings it back.
    fn remove(&self, inst: &Instance, m: &Measurement) {
        let Measurement::WebmailLogin(m) = m else { return };
        match m {
            Measured::Mailbox { mailbox, .. } => {
                let _ = self.messages.remove_label_values(&inst.with(&[mailbox]));
            }
            Measured::App(facts) => {
                let plugins = facts.plugins.join(",");
                let _ = self.app.remove_label_values(&app_values(inst, facts, &plugins));
            }
            Measured::Parity { .. } => {
                let _ = self.parity.remove_label_values(&[&inst.check]);
            }
        }
    }

    fn same_series(&self, old: &Measurement, new: &Measurement) -> bool {
        match (old, new) {
            (
                Measurement::WebmailLogin(Measured::Mailbox { mailbox: a, .. }),
                Measurement::WebmailLogin(Measured::Mailbox { mailbox: b, .. }),
            ) => a == b,
            (
                Measurement::WebmailLogin(Measured::Parity { .. }),
                Measurement::WebmailLogin(Measured::Parity { .. }),
            ) => true,
            _ => old == new,
        }
    }
}
