//! The mailbox-parity audit's series: counts only, never an account in a
//! label. A failed audit publishes nothing, so the last one stays in force.

use prometheus::{GaugeVec, Registry};

use super::{Instance, KindSeries, gauge};
use crate::probe::Measurement;
use crate::probe::mailbox_parity::{Finding, ParityReport};

/// Cheap to clone: handles to the same families.
#[derive(Clone)]
pub(super) struct Series {
    accounts: GaugeVec,
    audited: GaugeVec,
    skipped: GaugeVec,
    missing: GaugeVec,
    duration: GaugeVec,
    last: GaugeVec,
}

impl Series {
    pub(super) fn register(r: &Registry) -> Series {
        Series {
            accounts: gauge(r, "cutover_mailbox_parity_accounts", &["check", "finding"]),
            audited: gauge(r, "cutover_mailbox_parity_audited", &["check"]),
            skipped: gauge(r, "cutover_mailbox_parity_skipped_lines", &["check", "reason"]),
            missing: gauge(r, "cutover_mailbox_parity_messages_missing", &["check"]),
            duration: gauge(r, "cutover_mailbox_parity_audit_duration_seconds", &["check"]),
            last: gauge(r, "cutover_mailbox_parity_last_audit_timestamp_seconds", &["check"]),
        }
    }

    /// Publishes a finished (or restored) audit: accounts per finding (every
    /// finding, 0 when none), size, skipped lines, messages missing, timing.
    pub(super) fn record_report(&self, check: &str, report: &ParityReport) {
        for (finding, n) in report.counts() {
            self.accounts
                .with_label_values(&[check, finding.as_str()])
                .set(n as f64);
        }
        self.audited
            .with_label_values(&[check])
            .set(report.accounts.len() as f64);
        self.skipped
            .with_label_values(&[check, "invalid"])
            .set(report.input.invalid as f64);
        self.skipped
            .with_label_values(&[check, "duplicate"])
            .set(report.input.duplicates as f64);
        self.missing
            .with_label_values(&[check])
            .set(report.messages_missing() as f64);
        self.duration.with_label_values(&[check]).set(report.duration_seconds);
        self.last
            .with_label_values(&[check])
            .set(report.started_at + report.duration_seconds);
    }

    fn remove_report(&self, check: &str) {
        for finding in Finding::ALL {
            let _ = self.accounts.remove_label_values(&[check, finding.as_str()]);
        }
        for reason in ["invalid", "duplicate"] {
            let _ = self.skipped.remove_label_values(&[check, reason]);
        }
        for family in [&self.audited, &self.missing, &self.duration, &self.last] {
            let _ = family.remove_label_values(&[check]);
        }
    }
}

impl KindSeries for Series {
    fn owns(&self, m: &Measurement) -> bool {
        matches!(m, Measurement::MailboxParity(_))
    }

    fn record(&self, inst: &Instance, m: &Measurement) {
        if let Measurement::MailboxParity(report) = m {
            self.record_report(&inst.check, report);
        }
    }

    fn remove(&self, inst: &Instance, m: &Measurement) {
        if let Measurement::MailboxParity(_) = m {
            self.remove_report(&inst.check);
        }
    }

    fn same_series(&self, old: &Measurement, new: &Measurement) -> bool {
        matches!(
            (old, new),
            (Measurement::MailboxParity(_), Measurement::MailboxParity(_))
        )
    }

    fn sticky(&self) -> bool {
        true
    }
}
