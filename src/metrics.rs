//! Every `cutover_*` metric: name, help, unit and labels, declared here and
//! nowhere else, so names stay consistent and reviewable in one screen.
//!
//! Probes never touch metrics: they return an [`Outcome`], and [`Metrics::record`]
//! turns it into series. The same code renders the daemon's scrape and the
//! one-shot `/probe` endpoint (a fresh [`Metrics`] per request), and removes the
//! series of an instance that a reload dropped, so nothing goes stale.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

use crate::probe::Outcome;
use crate::probe::dns::AnswerState;
use crate::probe::hosted_domains::{AuditReport, Finding};
use crate::probe::mail_auth::SpfVerdict;

/// Name and help of every metric, in the order the README documents them.
pub const CATALOG: &[(&str, &str)] = &[
    (
        "cutover_probe_success",
        "Whether the last run of a check instance succeeded (1) or failed (0).",
    ),
    (
        "cutover_probe_duration_seconds",
        "Duration of probe runs, including resolution, until success, failure or timeout.",
    ),
    (
        "cutover_probe_phase_duration_seconds",
        "Duration of each phase of the last run (resolve, connect, tls and protocol steps).",
    ),
    (
        "cutover_probe_last_run_timestamp_seconds",
        "Unix time at which the last run of a check instance started.",
    ),
    ("cutover_probe_runs_total", "Probe runs of a check instance."),
    (
        "cutover_probe_failures_total",
        "Failed probe runs of a check instance, by reason.",
    ),
    (
        "cutover_probe_queue_wait_seconds",
        "Time scheduled probe runs waited for a slot under `defaults.max_concurrent_probes` before starting (their timeout starts after it).",
    ),
    (
        "cutover_tls_cert_not_after_timestamp_seconds",
        "Unix time at which the certificate presented in the last run expires.",
    ),
    (
        "cutover_tls_cert_info",
        "Facts of the certificate presented in the last run: issuer, SHA-256 fingerprint and whether it covers the hostname.",
    ),
    (
        "cutover_live_resolved_env_info",
        "Which environment the address that a live environment resolved to belongs to (`unknown` when none).",
    ),
    (
        "cutover_imap_mailbox_messages",
        "Messages in a mailbox as reported by SELECT/EXAMINE in the last run.",
    ),
    (
        "cutover_smtp_last_reply_code",
        "The last SMTP reply code seen at each step of the last run.",
    ),
    (
        "cutover_dns_answer_state",
        "What a resolver last answered for a record, against the expected sets: 1 for the current state (old, new, mixed, other, nodata, nxdomain, servfail, refused, timeout), 0 for the others.",
    ),
    (
        "cutover_dns_answer_ttl_seconds",
        "Lowest TTL in a resolver's last answer for a record (the negative-caching TTL for nxdomain and nodata).",
    ),
    (
        "cutover_dns_query_duration_seconds",
        "Duration of a resolver's last query for a record, including a retry over TCP.",
    ),
    (
        "cutover_dns_answer_changes_total",
        "Times a resolver's answer state for a record changed.",
    ),
    (
        "cutover_dns_cutover_ratio",
        "Fraction of a check's resolvers whose last answer for a record is `new`.",
    ),
    (
        "cutover_dns_propagation_deadline_timestamp_seconds",
        "Unix time by which every resolver still answering old (or mixed) will have expired it (its last-seen time plus TTL); once none does, the time the last one was seen to switch.",
    ),
    (
        "cutover_spf_result",
        "SPF verdict of a domain's policy for an outbound address of an environment: 1 for the current result (pass, fail, softfail, neutral, none, permerror, temperror), 0 for the others.",
    ),
    (
        "cutover_ptr_ok",
        "Whether an outbound address has a reverse name (PTR) that resolves back to it (FCrDNS).",
    ),
    (
        "cutover_dkim_record_ok",
        "Whether the DKIM key record of a selector exists and parses.",
    ),
    (
        "cutover_dmarc_record_ok",
        "Whether a domain's DMARC record exists and parses.",
    ),
    (
        "cutover_hosted_domains",
        "Customer domains of a hosted_domains check per finding in its last audit (ok, mx_old_ip, mx_foreign, spf_old_ip_literal, spf_fails_new, spf_permerror, autoconfig_old_ip, dns_error, nxdomain); a domain counts once for each finding it has.",
    ),
    (
        "cutover_hosted_domains_audited",
        "Customer domains in the last audit of a hosted_domains check (valid, distinct lines of its domains file).",
    ),
    (
        "cutover_hosted_domains_skipped_lines",
        "Lines of the domains file skipped in the last audit, by reason (invalid, duplicate).",
    ),
    (
        "cutover_hosted_domains_audit_duration_seconds",
        "Duration of the last finished audit of a hosted_domains check.",
    ),
    (
        "cutover_hosted_domains_last_audit_timestamp_seconds",
        "Unix time at which the last audit of a hosted_domains check finished.",
    ),
    (
        "cutover_hosted_domains_queries_total",
        "DNS queries sent by hosted_domains audits, by resolver and result (noerror, nxdomain, servfail, refused, other_rcode, timeout, error).",
    ),
    (
        "cutover_hosted_domains_changes_total",
        "Customer domains whose findings changed between two audits: `fixed` (to ok), `regressed` (from ok), `changed` (between problems).",
    ),
    (
        "cutover_check_instances",
        "Check instances currently scheduled: check x environment x address, or check x resolver for dns.",
    ),
    (
        "cutover_config_last_reload_successful",
        "Whether the last configuration (re)load succeeded.",
    ),
    (
        "cutover_config_last_reload_success_timestamp_seconds",
        "Unix time of the last successful configuration load.",
    ),
    ("cutover_build_info", "Build information; always 1."),
    (
        "cutover_migration_phase",
        "The migration phase in force (preparation, window, switched, decommission): 1 for the current one, 0 for the others; all 0 outside every phase.",
    ),
    (
        "cutover_expected_serving_env_info",
        "The environment that should serve in the phase in force (`none` while nothing should); absent without a `migration` section or override.",
    ),
    (
        "cutover_migration_phase_override",
        "Whether the phase in force was set by hand (1) instead of by the clock (0).",
    ),
    (
        "cutover_mail_sent_total",
        "Probe mails of a mailflow route the server accepted (250 after DATA), or that were found although a crash hid the reply.",
    ),
    (
        "cutover_mail_send_failures_total",
        "Probe mails of a mailflow route that could not be sent, by reason.",
    ),
    (
        "cutover_mail_delivered_total",
        "Probe mails found in a watched mailbox, by the environment they landed in (each counted once).",
    ),
    (
        "cutover_mail_late_total",
        "Probe mails not found within `late_after` (each counted once, even if delivered later).",
    ),
    ("cutover_mail_lost_total", "Probe mails not found within `lost_after`."),
    (
        "cutover_mail_duplicates_total",
        "Extra copies of probe mails that had already been delivered.",
    ),
    (
        "cutover_mail_in_flight",
        "Probe mails sent (or possibly sent) and neither delivered nor lost yet.",
    ),
    (
        "cutover_mail_oldest_in_flight_age_seconds",
        "Age of the oldest probe mail in flight; 0 when none is.",
    ),
    (
        "cutover_mail_delivery_seconds",
        "Delivery latency of probe mails: time they became visible over IMAP minus the time the server accepted them.",
    ),
    (
        "cutover_mail_last_delivered_timestamp_seconds",
        "Unix time at which the last probe mail of a route became visible in an environment.",
    ),
];

/// Labels that identify one scheduled check instance.
pub const INSTANCE_LABELS: [&str; 4] = ["check", "kind", "env", "address"];

/// Labels of the per-resolver DNS series ([`Extra::DnsAnswer`]).
const DNS_ANSWER_LABELS: [&str; 4] = ["check", "record", "type", "resolver"];
const DNS_ANSWER_LABELS_STATE: [&str; 5] = ["check", "record", "type", "resolver", "state"];
/// Labels of the cross-resolver DNS summaries ([`Extra::DnsSummary`]).
const DNS_SUMMARY_LABELS: [&str; 3] = ["check", "record", "type"];
/// Labels of the `mail_auth` series: the outbound environment, not the instance's.
const SPF_LABELS: [&str; 5] = ["check", "domain", "env", "address", "result"];
const PTR_LABELS: [&str; 3] = ["check", "env", "address"];
const DKIM_LABELS: [&str; 3] = ["check", "domain", "selector"];
const DMARC_LABELS: [&str; 2] = ["check", "domain"];
/// Labels of the hosted-domain audit series: counts only, never a domain.
const AUDIT_FINDING_LABELS: [&str; 2] = ["check", "finding"];
const AUDIT_QUERY_LABELS: [&str; 3] = ["check", "resolver", "result"];

/// A protocol-specific measurement a probe returns on its [`Outcome`].
#[derive(Debug, Clone, PartialEq)]
pub enum Extra {
    /// `cutover_imap_mailbox_messages`.
    ImapMailboxMessages {
        /// The selected mailbox.
        mailbox: String,
        /// Its message count.
        messages: u64,
    },
    /// `cutover_smtp_last_reply_code`.
    SmtpLastReplyCode {
        /// The SMTP step (banner, ehlo, auth, ...).
        step: &'static str,
        /// The reply code.
        code: u16,
    },
    /// One resolver's answer for one record: `cutover_dns_answer_state`,
    /// `_ttl_seconds`, `_changes_total` and `cutover_dns_query_duration_seconds`,
    /// labelled `{check, record, type, resolver}` instead of the instance labels.
    DnsAnswer {
        /// The record's name as configured.
        record: String,
        /// Its type, e.g. `A`.
        rtype: &'static str,
        /// The resolver's name.
        resolver: String,
        /// How the answer compares with the expected sets.
        state: AnswerState,
        /// Lowest TTL in the answer; none without an answer.
        ttl: Option<u32>,
        /// Query duration in seconds.
        seconds: f64,
        /// Whether the UDP answer was truncated and the query repeated over TCP.
        tcp: bool,
        /// Whether the state differs from the resolver's previous one.
        changed: bool,
    },
    /// A record's summary across the check's resolvers, labelled
    /// `{check, record, type}`: every instance of the check publishes it, the
    /// latest run wins.
    DnsSummary {
        /// The record's name as configured.
        record: String,
        /// Its type.
        rtype: &'static str,
        /// Resolvers asked so far.
        resolvers: usize,
        /// Of which answering `new`.
        answering_new: usize,
        /// `cutover_dns_propagation_deadline_timestamp_seconds`, when known.
        deadline: Option<f64>,
    },
    /// The SPF verdict for one outbound address (`mail_auth`):
    /// `cutover_spf_result{check, domain, env, address, result}`, a stateset.
    SpfResult {
        /// The domain whose policy was evaluated.
        domain: String,
        /// The outbound environment.
        env: String,
        /// Its address.
        address: String,
        /// The verdict.
        result: SpfVerdict,
    },
    /// `cutover_ptr_ok{check, env, address}`: the outbound address's PTR name
    /// resolves back to it.
    PtrOk {
        /// The outbound environment.
        env: String,
        /// Its address.
        address: String,
        /// Forward-confirmed.
        ok: bool,
    },
    /// `cutover_dkim_record_ok{check, domain, selector}`.
    DkimRecordOk {
        /// The signing domain.
        domain: String,
        /// The selector.
        selector: String,
        /// The key record exists and parses.
        ok: bool,
    },
    /// `cutover_dmarc_record_ok{check, domain}`.
    DmarcRecordOk {
        /// The domain.
        domain: String,
        /// `_dmarc.<domain>` exists and parses.
        ok: bool,
    },
    /// A finished hosted-domain audit: `cutover_hosted_domains*` (counts per
    /// finding, duration, queries). The rows go to the API, not to metrics.
    HostedDomains(std::sync::Arc<crate::probe::hosted_domains::AuditReport>),
}

impl Extra {
    /// Whether `other` is published under the same labels, so a later run
    /// updates its series instead of removing them (counters keep counting).
    fn same_series(&self, other: &Extra) -> bool {
        match (self, other) {
            (
                Extra::DnsAnswer {
                    record,
                    rtype,
                    resolver,
                    ..
                },
                Extra::DnsAnswer {
                    record: r,
                    rtype: t,
                    resolver: s,
                    ..
                },
            ) => (record, rtype, resolver) == (r, t, s),
            (
                Extra::DnsSummary { record, rtype, .. },
                Extra::DnsSummary {
                    record: r, rtype: t, ..
                },
            ) => (record, rtype) == (r, t),
            (
                Extra::SpfResult {
                    domain, env, address, ..
                },
                Extra::SpfResult {
                    domain: d,
                    env: e,
                    address: a,
                    ..
                },
            ) => (domain, env, address) == (d, e, a),
            (Extra::PtrOk { env, address, .. }, Extra::PtrOk { env: e, address: a, .. }) => (env, address) == (e, a),
            (
                Extra::DkimRecordOk { domain, selector, .. },
                Extra::DkimRecordOk {
                    domain: d, selector: s, ..
                },
            ) => (domain, selector) == (d, s),
            (Extra::DmarcRecordOk { domain, .. }, Extra::DmarcRecordOk { domain: d, .. }) => domain == d,
            (Extra::HostedDomains(_), Extra::HostedDomains(_)) => true,
            _ => self == other,
        }
    }
}

/// One check instance's label values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Instance {
    /// Check name.
    pub check: String,
    /// Probe kind.
    pub kind: &'static str,
    /// Environment name.
    pub env: String,
    /// The pinned address, or `resolved` for live environments.
    pub address: String,
}

impl Instance {
    fn values(&self) -> [&str; 4] {
        [&self.check, self.kind, &self.env, &self.address]
    }

    fn with<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = self.values().to_vec();
        v.extend_from_slice(extra);
        v
    }
}

/// Label sets set for an instance beyond its base labels, so that a later run
/// or a reload can remove exactly those.
#[derive(Default)]
struct Touched {
    phases: Vec<&'static str>,
    reasons: Vec<&'static str>,
    cert: Option<[String; 3]>,
    extras: Vec<Extra>,
    resolved: Option<[String; 2]>,
}

/// The registry and every metric family.
pub struct Metrics {
    registry: Registry,
    success: GaugeVec,
    duration: HistogramVec,
    phase: GaugeVec,
    last_run: GaugeVec,
    runs: IntCounterVec,
    failures: IntCounterVec,
    queue_wait: prometheus::Histogram,
    cert_not_after: GaugeVec,
    cert_info: GaugeVec,
    live_env: GaugeVec,
    imap_messages: GaugeVec,
    smtp_code: GaugeVec,
    dns_state: GaugeVec,
    dns_ttl: GaugeVec,
    dns_duration: GaugeVec,
    dns_changes: IntCounterVec,
    dns_ratio: GaugeVec,
    dns_deadline: GaugeVec,
    spf_result: GaugeVec,
    ptr_ok: GaugeVec,
    dkim_ok: GaugeVec,
    dmarc_ok: GaugeVec,
    audit_findings: GaugeVec,
    audit_domains: GaugeVec,
    audit_skipped: GaugeVec,
    audit_duration: GaugeVec,
    audit_last: GaugeVec,
    audit_queries: IntCounterVec,
    audit_changes: IntCounterVec,
    instances: Gauge,
    reload_ok: Gauge,
    reload_ts: Gauge,
    touched: Mutex<HashMap<Instance, Touched>>,
    mail: MailMetrics,
    migration: MigrationMetrics,
}

fn opts(name: &str) -> Opts {
    let help = CATALOG
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, h)| *h)
        .unwrap_or_else(|| panic!("metric {name} missing from CATALOG"));
    Opts::new(name, help)
}

impl Metrics {
    /// Creates every family in a new registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let gauge = |name: &str, labels: &[&str]| {
            let g = GaugeVec::new(opts(name), labels).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let counter = |name: &str, labels: &[&str]| {
            let c = IntCounterVec::new(opts(name), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let single = |name: &str| {
            let g = Gauge::with_opts(opts(name)).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let with = |extra: &[&'static str]| -> Vec<&'static str> {
            let mut v = INSTANCE_LABELS.to_vec();
            v.extend_from_slice(extra);
            v
        };
        let duration = HistogramVec::new(
            HistogramOpts::from(opts("cutover_probe_duration_seconds")).buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &INSTANCE_LABELS,
        )
        .expect("valid metric");
        registry.register(Box::new(duration.clone())).expect("unique metric");
        let queue_wait = prometheus::Histogram::with_opts(
            HistogramOpts::from(opts("cutover_probe_queue_wait_seconds"))
                .buckets(vec![0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .expect("valid metric");
        registry.register(Box::new(queue_wait.clone())).expect("unique metric");
        let build = gauge("cutover_build_info", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1.0);
        Metrics {
            success: gauge("cutover_probe_success", &INSTANCE_LABELS),
            duration,
            queue_wait,
            phase: gauge("cutover_probe_phase_duration_seconds", &with(&["phase"])),
            last_run: gauge("cutover_probe_last_run_timestamp_seconds", &INSTANCE_LABELS),
            runs: counter("cutover_probe_runs_total", &INSTANCE_LABELS),
            failures: counter("cutover_probe_failures_total", &with(&["reason"])),
            cert_not_after: gauge("cutover_tls_cert_not_after_timestamp_seconds", &INSTANCE_LABELS),
            cert_info: gauge("cutover_tls_cert_info", &with(&["issuer", "sha256", "name_matched"])),
            live_env: gauge(
                "cutover_live_resolved_env_info",
                &["check", "env", "resolved_env", "address"],
            ),
            imap_messages: gauge("cutover_imap_mailbox_messages", &with(&["mailbox"])),
            smtp_code: gauge("cutover_smtp_last_reply_code", &with(&["step"])),
            dns_state: gauge("cutover_dns_answer_state", &DNS_ANSWER_LABELS_STATE),
            dns_ttl: gauge("cutover_dns_answer_ttl_seconds", &DNS_ANSWER_LABELS),
            dns_duration: gauge("cutover_dns_query_duration_seconds", &DNS_ANSWER_LABELS),
            dns_changes: counter("cutover_dns_answer_changes_total", &DNS_ANSWER_LABELS),
            dns_ratio: gauge("cutover_dns_cutover_ratio", &DNS_SUMMARY_LABELS),
            dns_deadline: gauge(
                "cutover_dns_propagation_deadline_timestamp_seconds",
                &DNS_SUMMARY_LABELS,
            ),
            spf_result: gauge("cutover_spf_result", &SPF_LABELS),
            ptr_ok: gauge("cutover_ptr_ok", &PTR_LABELS),
            dkim_ok: gauge("cutover_dkim_record_ok", &DKIM_LABELS),
            dmarc_ok: gauge("cutover_dmarc_record_ok", &DMARC_LABELS),
            audit_findings: gauge("cutover_hosted_domains", &AUDIT_FINDING_LABELS),
            audit_domains: gauge("cutover_hosted_domains_audited", &["check"]),
            audit_skipped: gauge("cutover_hosted_domains_skipped_lines", &["check", "reason"]),
            audit_duration: gauge("cutover_hosted_domains_audit_duration_seconds", &["check"]),
            audit_last: gauge("cutover_hosted_domains_last_audit_timestamp_seconds", &["check"]),
            audit_queries: counter("cutover_hosted_domains_queries_total", &AUDIT_QUERY_LABELS),
            audit_changes: counter("cutover_hosted_domains_changes_total", &["check", "direction"]),
            instances: single("cutover_check_instances"),
            reload_ok: single("cutover_config_last_reload_successful"),
            reload_ts: single("cutover_config_last_reload_success_timestamp_seconds"),
            touched: Mutex::new(HashMap::new()),
            mail: MailMetrics::register(&registry),
            migration: MigrationMetrics::register(&registry),
            registry,
        }
    }

    /// Publishes one run's outcome for an instance.
    pub fn record(&self, inst: &Instance, outcome: &Outcome) {
        let base = inst.values();
        self.success
            .with_label_values(&base)
            .set(if outcome.success() { 1.0 } else { 0.0 });
        self.duration
            .with_label_values(&base)
            .observe(outcome.duration.as_secs_f64());
        self.last_run.with_label_values(&base).set(outcome.started_at);
        self.runs.with_label_values(&base).inc();

        let mut touched = self.touched.lock().expect("metrics lock");
        let t = touched.entry(inst.clone()).or_default();
        if let Err(failure) = &outcome.result {
            let reason = failure.reason.as_str();
            self.failures.with_label_values(&inst.with(&[reason])).inc();
            if !t.reasons.contains(&reason) {
                t.reasons.push(reason);
            }
        }

        for old in t.phases.drain(..) {
            if !outcome.phases.iter().any(|(p, _)| *p == old) {
                let _ = self.phase.remove_label_values(&inst.with(&[old]));
            }
        }
        for (name, took) in &outcome.phases {
            self.phase
                .with_label_values(&inst.with(&[name]))
                .set(took.as_secs_f64());
            t.phases.push(name);
        }

        let cert = outcome
            .cert
            .as_ref()
            .map(|c| [c.issuer.clone(), c.sha256.clone(), c.name_matched.to_string()]);
        if t.cert != cert {
            if let Some(old) = t.cert.take() {
                let _ = self
                    .cert_info
                    .remove_label_values(&inst.with(&[&old[0], &old[1], &old[2]]));
            }
        }
        match (&outcome.cert, &cert) {
            (Some(facts), Some(labels)) => {
                self.cert_not_after.with_label_values(&base).set(facts.not_after as f64);
                self.cert_info
                    .with_label_values(&inst.with(&[&labels[0], &labels[1], &labels[2]]))
                    .set(1.0);
            }
            _ => {
                let _ = self.cert_not_after.remove_label_values(&base);
            }
        }
        t.cert = cert;

        for old in std::mem::take(&mut t.extras) {
            if outcome.extras.iter().any(|e| e.same_series(&old)) {
                continue;
            }
            if matches!(old, Extra::HostedDomains(_)) {
                // A failed audit publishes nothing: the last one stays in force.
                t.extras.push(old);
                continue;
            }
            self.remove_extra(inst, &old);
        }
        for extra in &outcome.extras {
            match extra {
                Extra::ImapMailboxMessages { mailbox, messages } => self
                    .imap_messages
                    .with_label_values(&inst.with(&[mailbox]))
                    .set(*messages as f64),
                Extra::SmtpLastReplyCode { step, code } => self
                    .smtp_code
                    .with_label_values(&inst.with(&[step]))
                    .set(f64::from(*code)),
                Extra::DnsAnswer { .. } | Extra::DnsSummary { .. } => self.record_dns(&inst.check, extra),
                Extra::SpfResult { .. }
                | Extra::PtrOk { .. }
                | Extra::DkimRecordOk { .. }
                | Extra::DmarcRecordOk { .. } => self.record_mail_auth(&inst.check, extra, true),
                Extra::HostedDomains(report) => self.record_audit(&inst.check, report),
            }
            t.extras.push(extra.clone());
        }

        let resolved = outcome.resolved.as_ref().map(|(ip, env)| [env.clone(), ip.to_string()]);
        if t.resolved != resolved {
            if let Some([env, ip]) = t.resolved.take() {
                let _ = self.live_env.remove_label_values(&[&inst.check, &inst.env, &env, &ip]);
            }
            if let Some([env, ip]) = &resolved {
                self.live_env
                    .with_label_values(&[&inst.check, &inst.env, env, ip])
                    .set(1.0);
            }
            t.resolved = resolved;
        }
    }

    fn remove_extra(&self, inst: &Instance, extra: &Extra) {
        let _ = match extra {
            Extra::ImapMailboxMessages { mailbox, .. } => {
                self.imap_messages.remove_label_values(&inst.with(&[mailbox]))
            }
            Extra::SmtpLastReplyCode { step, .. } => self.smtp_code.remove_label_values(&inst.with(&[step])),
            Extra::DnsAnswer { .. } | Extra::DnsSummary { .. } => {
                self.remove_dns(&inst.check, extra);
                Ok(())
            }
            Extra::SpfResult { .. }
            | Extra::PtrOk { .. }
            | Extra::DkimRecordOk { .. }
            | Extra::DmarcRecordOk { .. } => {
                self.record_mail_auth(&inst.check, extra, false);
                Ok(())
            }
            Extra::HostedDomains(report) => {
                self.remove_audit(&inst.check, report);
                Ok(())
            }
        };
    }

    /// Publishes a finished (or restored) audit: counts per finding (every finding, 0 when
    /// none), size, skipped lines, timing and the queries it sent.
    pub fn record_audit(&self, check: &str, report: &AuditReport) {
        for (finding, n) in report.counts() {
            self.audit_findings
                .with_label_values(&[check, finding.as_str()])
                .set(n as f64);
        }
        self.audit_domains
            .with_label_values(&[check])
            .set(report.domains.len() as f64);
        self.audit_skipped
            .with_label_values(&[check, "invalid"])
            .set(report.input.invalid as f64);
        self.audit_skipped
            .with_label_values(&[check, "duplicate"])
            .set(report.input.duplicates as f64);
        self.audit_duration
            .with_label_values(&[check])
            .set(report.duration_seconds);
        self.audit_last
            .with_label_values(&[check])
            .set(report.started_at + report.duration_seconds);
        for resolver in &report.queries {
            for (result, n) in &resolver.counts {
                self.audit_queries
                    .with_label_values(&[check, &resolver.resolver, result.as_str()])
                    .inc_by(*n);
            }
        }
        for direction in ["fixed", "regressed", "changed"] {
            self.audit_changes.with_label_values(&[check, direction]);
        }
    }

    /// Removes what [`Metrics::record_audit`] set.
    pub fn remove_audit(&self, check: &str, report: &AuditReport) {
        for finding in Finding::ALL {
            let _ = self.audit_findings.remove_label_values(&[check, finding.as_str()]);
        }
        let _ = self.audit_domains.remove_label_values(&[check]);
        for reason in ["invalid", "duplicate"] {
            let _ = self.audit_skipped.remove_label_values(&[check, reason]);
        }
        let _ = self.audit_duration.remove_label_values(&[check]);
        let _ = self.audit_last.remove_label_values(&[check]);
        for resolver in &report.queries {
            for (result, _) in &resolver.counts {
                let _ = self
                    .audit_queries
                    .remove_label_values(&[check, &resolver.resolver, result.as_str()]);
            }
        }
        for direction in ["fixed", "regressed", "changed"] {
            let _ = self.audit_changes.remove_label_values(&[check, direction]);
        }
    }

    /// Counts customer domains whose findings changed between two audits
    /// (`direction`: fixed, regressed, changed).
    pub fn hosted_domain_changes(&self, check: &str, direction: &str, n: u64) {
        self.audit_changes.with_label_values(&[check, direction]).inc_by(n);
    }

    /// The DNS series carry their own labels (record, type, resolver) in place
    /// of the instance's env and address.
    fn record_dns(&self, check: &str, extra: &Extra) {
        match extra {
            Extra::DnsAnswer {
                record,
                rtype,
                resolver,
                state,
                ttl,
                seconds,
                changed,
                ..
            } => {
                let labels = [check, record, rtype, resolver];
                for s in AnswerState::ALL {
                    self.dns_state
                        .with_label_values(&[check, record, rtype, resolver, s.as_str()])
                        .set(if s == *state { 1.0 } else { 0.0 });
                }
                match ttl {
                    Some(ttl) => self.dns_ttl.with_label_values(&labels).set(f64::from(*ttl)),
                    None => {
                        let _ = self.dns_ttl.remove_label_values(&labels);
                    }
                }
                self.dns_duration.with_label_values(&labels).set(*seconds);
                let changes = self.dns_changes.with_label_values(&labels);
                if *changed {
                    changes.inc();
                }
            }
            Extra::DnsSummary {
                record,
                rtype,
                resolvers,
                answering_new,
                deadline,
            } => {
                let labels = [check, record, rtype];
                let ratio = *answering_new as f64 / (*resolvers).max(1) as f64;
                self.dns_ratio.with_label_values(&labels).set(ratio);
                match deadline {
                    Some(at) => self.dns_deadline.with_label_values(&labels).set(*at),
                    None => {
                        let _ = self.dns_deadline.remove_label_values(&labels);
                    }
                }
            }
            _ => {}
        }
    }

    /// Removes what [`Metrics::record_dns`] set. A summary shared by the
    /// check's other instances comes back with their next run.
    fn remove_dns(&self, check: &str, extra: &Extra) {
        match extra {
            Extra::DnsAnswer {
                record,
                rtype,
                resolver,
                ..
            } => {
                let labels = [check, record, rtype, resolver];
                for s in AnswerState::ALL {
                    let _ = self
                        .dns_state
                        .remove_label_values(&[check, record, rtype, resolver, s.as_str()]);
                }
                let _ = self.dns_ttl.remove_label_values(&labels);
                let _ = self.dns_duration.remove_label_values(&labels);
                let _ = self.dns_changes.remove_label_values(&labels);
            }
            Extra::DnsSummary { record, rtype, .. } => {
                let _ = self.dns_ratio.remove_label_values(&[check, record, rtype]);
                let _ = self.dns_deadline.remove_label_values(&[check, record, rtype]);
            }
            _ => {}
        }
    }

    /// Sets (or, with `set` false, removes) the `mail_auth` series, labelled
    /// by the outbound environment and address instead of the instance's.
    fn record_mail_auth(&self, check: &str, extra: &Extra, set: bool) {
        let put = |g: &GaugeVec, labels: &[&str], v: bool| {
            if set {
                g.with_label_values(labels).set(if v { 1.0 } else { 0.0 });
            } else {
                let _ = g.remove_label_values(labels);
            }
        };
        match extra {
            Extra::SpfResult {
                domain,
                env,
                address,
                result,
            } => {
                for r in SpfVerdict::ALL {
                    put(
                        &self.spf_result,
                        &[check, domain, env, address, r.as_str()],
                        r == *result,
                    );
                }
            }
            Extra::PtrOk { env, address, ok } => put(&self.ptr_ok, &[check, env, address], *ok),
            Extra::DkimRecordOk { domain, selector, ok } => put(&self.dkim_ok, &[check, domain, selector], *ok),
            Extra::DmarcRecordOk { domain, ok } => put(&self.dmarc_ok, &[check, domain], *ok),
            _ => {}
        }
    }

    /// Removes every series of an instance that is no longer configured.
    pub fn forget(&self, inst: &Instance) {
        let base = inst.values();
        let _ = self.success.remove_label_values(&base);
        let _ = self.duration.remove_label_values(&base);
        let _ = self.last_run.remove_label_values(&base);
        let _ = self.runs.remove_label_values(&base);
        let _ = self.cert_not_after.remove_label_values(&base);
        let Some(t) = self.touched.lock().expect("metrics lock").remove(inst) else {
            return;
        };
        for p in t.phases {
            let _ = self.phase.remove_label_values(&inst.with(&[p]));
        }
        for r in t.reasons {
            let _ = self.failures.remove_label_values(&inst.with(&[r]));
        }
        if let Some(c) = t.cert {
            let _ = self.cert_info.remove_label_values(&inst.with(&[&c[0], &c[1], &c[2]]));
        }
        for e in &t.extras {
            self.remove_extra(inst, e);
        }
        if let Some([env, ip]) = t.resolved {
            let _ = self.live_env.remove_label_values(&[&inst.check, &inst.env, &env, &ip]);
        }
    }

    /// The mail-flow series, which the ledger publishes to.
    pub fn mail(&self) -> MailMetrics {
        self.mail.clone()
    }

    /// The migration phase series, which [`crate::migration::Control`] publishes to.
    pub fn migration(&self) -> MigrationMetrics {
        self.migration.clone()
    }

    /// Every family's current values, for the status page, which reads the
    /// mail and reload series back instead of keeping its own copies.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// Records how long a scheduled run waited for a probe slot.
    pub fn queue_waited(&self, waited: std::time::Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// Sets the number of scheduled instances.
    pub fn set_instances(&self, n: usize) {
        self.instances.set(n as f64);
    }

    /// Records the result of a configuration (re)load.
    pub fn config_loaded(&self, ok: bool) {
        self.reload_ok.set(if ok { 1.0 } else { 0.0 });
        if ok {
            self.reload_ts.set(crate::unix_now());
        }
    }

    /// Adds the standard `process_*` metrics (CPU, memory, file descriptors)
    /// to the daemon's registry.
    pub fn with_process_metrics(self) -> Self {
        let _ = self
            .registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        self
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        encode(&self.registry.gather())
    }

    /// Only the per-instance families, for `/probe`, whose answer describes
    /// the probes it just ran and not the daemon.
    pub fn encode_instances(&self) -> String {
        let mut families = self.registry.gather();
        families.retain(|f| {
            f.get_metric()
                .iter()
                .any(|m| m.get_label().iter().any(|l| l.name() == "check"))
        });
        encode(&families)
    }
}

fn encode(families: &[prometheus::proto::MetricFamily]) -> String {
    let mut buf = Vec::new();
    TextEncoder::new().encode(families, &mut buf).expect("text encoding");
    String::from_utf8(buf).expect("exposition is UTF-8")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------
// Mail flow: published by the ledger, labelled by check and route.
// ---------------------------------------------------------------------------

/// Labels of the per-route mail series; `route` is the sending environment.
const MAIL_LABELS: [&str; 2] = ["check", "route"];

/// A counted mail event. The ledger keeps one total per event (and label) so
/// counters start from its totals after a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MailCount {
    /// `cutover_mail_sent_total`.
    Sent,
    /// `cutover_mail_send_failures_total`, label `reason`.
    SendFailure,
    /// `cutover_mail_delivered_total`, label `delivered_env`.
    Delivered,
    /// `cutover_mail_late_total`.
    Late,
    /// `cutover_mail_lost_total`.
    Lost,
    /// `cutover_mail_duplicates_total`.
    Duplicate,
}

impl MailCount {
    /// Every event, for reading totals back.
    pub const ALL: [MailCount; 6] = [
        Self::Sent,
        Self::SendFailure,
        Self::Delivered,
        Self::Late,
        Self::Lost,
        Self::Duplicate,
    ];

    /// The name the ledger stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::SendFailure => "send_failure",
            Self::Delivered => "delivered",
            Self::Late => "late",
            Self::Lost => "lost",
            Self::Duplicate => "duplicate",
        }
    }
}

/// The mail-flow families. Cheap to clone (handles to the same series).
#[derive(Clone)]
pub struct MailMetrics {
    sent: IntCounterVec,
    send_failures: IntCounterVec,
    delivered: IntCounterVec,
    late: IntCounterVec,
    lost: IntCounterVec,
    duplicates: IntCounterVec,
    in_flight: GaugeVec,
    oldest: GaugeVec,
    delivery: HistogramVec,
    last_delivered: GaugeVec,
}

impl MailMetrics {
    fn register(registry: &Registry) -> MailMetrics {
        let m = Self::unregistered();
        let collectors: [Box<dyn prometheus::core::Collector>; 10] = [
            Box::new(m.sent.clone()),
            Box::new(m.send_failures.clone()),
            Box::new(m.delivered.clone()),
            Box::new(m.late.clone()),
            Box::new(m.lost.clone()),
            Box::new(m.duplicates.clone()),
            Box::new(m.in_flight.clone()),
            Box::new(m.oldest.clone()),
            Box::new(m.delivery.clone()),
            Box::new(m.last_delivered.clone()),
        ];
        for c in collectors {
            registry.register(c).expect("unique metric");
        }
        m
    }

    /// Families in no registry: for `check` and tests, where nobody scrapes.
    pub fn unregistered() -> MailMetrics {
        let counter = |name: &str, extra: &[&str]| {
            let mut labels = MAIL_LABELS.to_vec();
            labels.extend_from_slice(extra);
            IntCounterVec::new(opts(name), &labels).expect("valid metric")
        };
        let gauge = |name: &str, extra: &[&str]| {
            let mut labels = MAIL_LABELS.to_vec();
            labels.extend_from_slice(extra);
            GaugeVec::new(opts(name), &labels).expect("valid metric")
        };
        MailMetrics {
            sent: counter("cutover_mail_sent_total", &[]),
            send_failures: counter("cutover_mail_send_failures_total", &["reason"]),
            delivered: counter("cutover_mail_delivered_total", &["delivered_env"]),
            late: counter("cutover_mail_late_total", &[]),
            lost: counter("cutover_mail_lost_total", &[]),
            duplicates: counter("cutover_mail_duplicates_total", &[]),
            in_flight: gauge("cutover_mail_in_flight", &[]),
            oldest: gauge("cutover_mail_oldest_in_flight_age_seconds", &[]),
            delivery: HistogramVec::new(
                HistogramOpts::from(opts("cutover_mail_delivery_seconds")).buckets(vec![
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0,
                ]),
                &MAIL_LABELS,
            )
            .expect("valid metric"),
            last_delivered: gauge("cutover_mail_last_delivered_timestamp_seconds", &["delivered_env"]),
        }
    }

    /// Adds `n` to an event's counter; `label` is the reason or the delivered
    /// environment, ignored for the unlabelled events.
    pub fn add(&self, check: &str, route: &str, what: MailCount, label: &str, n: u64) {
        let counter = match what {
            MailCount::Sent => self.sent.with_label_values(&[check, route]),
            MailCount::SendFailure => self.send_failures.with_label_values(&[check, route, label]),
            MailCount::Delivered => self.delivered.with_label_values(&[check, route, label]),
            MailCount::Late => self.late.with_label_values(&[check, route]),
            MailCount::Lost => self.lost.with_label_values(&[check, route]),
            MailCount::Duplicate => self.duplicates.with_label_values(&[check, route]),
        };
        counter.inc_by(n);
    }

    /// A delivery: its latency when the accept time is known, and when it became visible.
    pub fn delivered(&self, check: &str, route: &str, env: &str, latency: Option<f64>, visible_at: f64) {
        if let Some(seconds) = latency {
            self.delivery
                .with_label_values(&[check, route])
                .observe(seconds.max(0.0));
        }
        let last = self.last_delivered.with_label_values(&[check, route, env]);
        if visible_at > last.get() {
            last.set(visible_at);
        }
    }

    /// Mails in flight on a route and the age of the oldest. Also makes the
    /// route's unlabelled counters exist at 0, so `increase()` sees their first event.
    pub fn in_flight(&self, check: &str, route: &str, count: u64, oldest_age: f64) {
        for c in [&self.sent, &self.late, &self.lost, &self.duplicates] {
            c.with_label_values(&[check, route]);
        }
        self.in_flight.with_label_values(&[check, route]).set(count as f64);
        self.oldest.with_label_values(&[check, route]).set(oldest_age);
    }
}

// ---------------------------------------------------------------------------
// Migration phase: published by `migration::Control`, no instance labels.
// ---------------------------------------------------------------------------

/// The phase series. Cheap to clone (handles to the same series).
#[derive(Clone)]
pub struct MigrationMetrics {
    phase: GaugeVec,
    serving: GaugeVec,
    manual: Gauge,
    /// The `env` label currently set on `serving`, so a change removes it.
    serving_now: std::sync::Arc<Mutex<Option<String>>>,
}

impl MigrationMetrics {
    fn register(registry: &Registry) -> MigrationMetrics {
        let m = MigrationMetrics {
            phase: GaugeVec::new(opts("cutover_migration_phase"), &["phase"]).expect("valid metric"),
            serving: GaugeVec::new(opts("cutover_expected_serving_env_info"), &["env"]).expect("valid metric"),
            manual: Gauge::with_opts(opts("cutover_migration_phase_override")).expect("valid metric"),
            serving_now: Default::default(),
        };
        registry.register(Box::new(m.phase.clone())).expect("unique metric");
        registry.register(Box::new(m.serving.clone())).expect("unique metric");
        registry.register(Box::new(m.manual.clone())).expect("unique metric");
        m
    }

    /// Sets the stateset (every phase present, 1 for `phase`), the one
    /// expected serving environment (none when unknown), and the override flag.
    pub fn set(&self, phase: Option<crate::migration::Phase>, serving: Option<&str>, manual: bool) {
        for p in crate::migration::Phase::ALL {
            self.phase
                .with_label_values(&[p.as_str()])
                .set(if Some(p) == phase { 1.0 } else { 0.0 });
        }
        let mut now = self.serving_now.lock().expect("metrics lock");
        if now.as_deref() != serving {
            if let Some(old) = now.take() {
                let _ = self.serving.remove_label_values(&[&old]);
            }
            if let Some(env) = serving {
                self.serving.with_label_values(&[env]).set(1.0);
            }
            *now = serving.map(str::to_string);
        }
        self.manual.set(if manual { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{CertFacts, Failure, FailureReason};
    use std::time::Duration;

    fn inst() -> Instance {
        Instance {
            check: "imap".into(),
            kind: "tcp",
            env: "new".into(),
            address: "127.0.0.20".into(),
        }
    }

    fn outcome(ok: bool, phases: &[&'static str]) -> Outcome {
        Outcome {
            result: if ok {
                Ok(())
            } else {
                Err(Failure::new(FailureReason::Refused, "x"))
            },
            duration: Duration::from_millis(20),
            phases: phases.iter().map(|p| (*p, Duration::from_millis(5))).collect(),
            cert: ok.then(|| CertFacts {
                not_after: 2_000_000_000,
                name_matched: true,
                issuer: "CN=Lab CA".into(),
                sha256: "ab".into(),
                dns_names: vec![],
            }),
            extras: vec![],
            resolved: None,
            started_at: 1.0,
        }
    }

    #[test]
    fn phases_and_certificates_of_a_failed_run_do_not_linger() {
        let m = Metrics::new();
        m.record(&inst(), &outcome(true, &["connect", "tls"]));
        assert!(m.encode().contains("phase=\"tls\""));
        assert!(m.encode().contains("cutover_tls_cert_not_after_timestamp_seconds{"));
        m.record(&inst(), &outcome(false, &["connect"]));
        let text = m.encode();
        assert!(!text.contains("phase=\"tls\""), "{text}");
        assert!(
            !text.contains("cutover_tls_cert_not_after_timestamp_seconds{"),
            "{text}"
        );
        assert!(text.contains("cutover_probe_failures_total{address=\"127.0.0.20\",check=\"imap\",env=\"new\",kind=\"tcp\",reason=\"refused\"} 1"), "{text}");
    }

    #[test]
    fn forget_removes_every_series_of_an_instance() {
        let m = Metrics::new();
        m.record(&inst(), &outcome(false, &["connect"]));
        m.record(&inst(), &outcome(true, &["connect", "tls"]));
        m.forget(&inst());
        assert!(!m.encode().contains("127.0.0.20"), "{}", m.encode());
    }

    #[test]
    fn dns_series_carry_their_own_labels_keep_counting_and_are_forgotten() {
        let m = Metrics::new();
        let lagging = Instance {
            check: "dns".into(),
            kind: "dns",
            env: "lagging".into(),
            address: "127.0.0.31".into(),
        };
        let run = |state, changed| {
            let mut o = outcome(true, &["query"]);
            o.extras = vec![
                Extra::DnsAnswer {
                    record: "imap.example.test".into(),
                    rtype: "A",
                    resolver: "lagging".into(),
                    state,
                    ttl: (state != AnswerState::Timeout).then_some(280),
                    seconds: 0.002,
                    tcp: false,
                    changed,
                },
                Extra::DnsSummary {
                    record: "imap.example.test".into(),
                    rtype: "A",
                    resolvers: 2,
                    answering_new: 1,
                    deadline: Some(1000.0),
                },
            ];
            o
        };
        m.record(&lagging, &run(AnswerState::Old, false));
        m.record(&lagging, &run(AnswerState::Timeout, true));
        let text = m.encode();
        let labels = "check=\"dns\",record=\"imap.example.test\",resolver=\"lagging\"";
        let series = |name: &str, state: &str, value: u8| format!("{name}{{{labels}{state},type=\"A\"}} {value}");
        for line in [
            series("cutover_dns_answer_changes_total", "", 1),
            series("cutover_dns_answer_state", ",state=\"timeout\"", 1),
            series("cutover_dns_answer_state", ",state=\"old\"", 0),
        ] {
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert_eq!(text.matches("cutover_dns_answer_state{").count(), 9, "{text}");
        assert!(!text.contains("cutover_dns_answer_ttl_seconds{"), "{text}");
        assert!(
            text.contains("cutover_dns_cutover_ratio{check=\"dns\",record=\"imap.example.test\",type=\"A\"} 0.5"),
            "{text}"
        );
        m.forget(&lagging);
        assert!(!m.encode().contains("imap.example.test"), "{}", m.encode());
    }
}
