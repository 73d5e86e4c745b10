//! The customer-domain audit's series: counts only, never a domain in a
//! label. A failed audit publishes nothing, so the last one stays in force.

use prometheus::{GaugeVec, IntCounterVec, Registry};

use super::{Instance, KindSeries, counter, gauge};
use crate::probe::Measurement;
use crate::probe::hosted_domains::{AuditReport, Direction, Finding};

/// Cheap to clone: handles to the same families.
#[derive(Clone)]
pub(super) struct Series {
    findings: GaugeVec,
    domains: GaugeVec,
    skipped: GaugeVec,
    duration: GaugeVec,
    last: GaugeVec,
    queries: IntCounterVec,
    changes: IntCounterVec,
}

impl Series {
    pub(super) fn register(r: &Registry) -> Series {
        Series {
            findings: gauge(r, "cutover_hosted_domains", &["check", "finding"]),
            domains: gauge(r, "cutover_hosted_domains_audited", &["check"]),
            skipped: gauge(r, "cutover_hosted_domains_skipped_lines", &["check", "reason"]),
            duration: gauge(r, "cutover_hosted_domains_audit_duration_seconds", &["check"]),
            last: gauge(r, "cutover_hosted_domains_last_audit_timestamp_seconds", &["check"]),
            queries: counter(
                r,
                "cutover_hosted_domains_queries_total",
                &["check", "resolver", "result"],
            ),
            changes: counter(r, "cutover_hosted_domains_changes_total", &["check", "direction"]),
        }
    }

    /// Publishes a finished (or restored) audit: counts per finding (every
    /// finding, 0 when none), size, skipped lines, timing and the queries it sent.
    pub(super) fn record_report(&self, check: &str, report: &AuditReport) {
        for (finding, n) in report.counts() {
            self.findings
                .with_label_values(&[check, finding.as_str()])
                .set(n as f64);
        }
        self.domains
            .with_label_values(&[check])
            .set(report.domains.len() as f64);
        self.skipped
            .with_label_values(&[check, "invalid"])
            .set(report.input.invalid as f64);
        self.skipped
            .with_label_values(&[check, "duplicate"])
            .set(report.input.duplicates as f64);
        self.duration.with_label_values(&[check]).set(report.duration_seconds);
        self.last
            .with_label_values(&[check])
            .set(report.started_at + report.duration_seconds);
        for resolver in &report.queries {
            for (result, n) in &resolver.counts {
                self.queries
                    .with_label_values(&[check, &resolver.resolver, result.as_str()])
                    .inc_by(*n);
            }
        }
        for direction in Direction::ALL {
            self.changes.with_label_values(&[check, direction.as_str()]);
        }
    }

    /// Counts customer domains whose findings changed between two audits.
    pub(super) fn changes(&self, check: &str, direction: Direction, n: u64) {
        self.changes.with_label_values(&[check, direction.as_str()]).inc_by(n);
    }

    fn remove_report(&self, check: &str, report: &AuditReport) {
        for finding in Finding::ALL {
            let _ = self.findings.remove_label_values(&[check, finding.as_str()]);
        }
        let _ = self.domains.remove_label_values(&[check]);
        for reason in ["invalid", "duplicate"] {
            let _ = self.skipped.remove_label_values(&[check, reason]);
        }
        let _ = self.duration.remove_label_values(&[check]);
        let _ = self.last.remove_label_values(&[check]);
        for resolver in &report.queries {
            for (result, _) in &resolver.counts {
                let _ = self
                    .queries
                    .remove_label_values(&[check, &resolver.resolver, result.as_str()]);
            }
        }
        for direction in Direction::ALL {
            let _ = self.changes.remove_label_values(&[check, direction.as_str()]);
        }
    }
}

impl KindSeries for Series {
    fn owns(&self, m: &Measurement) -> bool {
        matches!(m, Measurement::HostedDomains(_))
    }

    fn record(&self, inst: &Instance, m: &Measurement) {
        if let Measurement::HostedDomains(report) = m {
            self.record_report(&inst.check, report);
        }
    }

    fn remove(&self, inst: &Instance, m: &Measurement) {
        if let Measurement::HostedDomains(report) = m {
            self.remove_report(&inst.check, report);
        }
    }

    fn same_series(&self, old: &Measurement, new: &Measurement) -> bool {
        matches!(
            (old, new),
            (Measurement::HostedDomains(_), Measurement::HostedDomains(_))
        )
    }

    fn sticky(&self) -> bool {
        true
    }
}
