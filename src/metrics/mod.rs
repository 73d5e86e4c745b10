//! Every `cutover_*` metric: name, help, unit and labels, declared in this
//! module and nowhere else, so names stay consistent and reviewable.
//!
//! The metrics are a consumer of what happens below them: probes return an
//! [`Outcome`] and never touch a registry; [`Metrics::record`] turns it into
//! series. This file keeps the catalog (every name and help), the registry,
//! the series every instance has (success, duration, phases, certificate,
//! live resolution) and the bookkeeping that removes exactly an instance's
//! series when a reload drops it. A kind with series of its own writes them
//! from its [`Measurement`] in `metrics/<kind>.rs`; the ledger's mail counts
//! (`mail.rs`) and the migration phase (`migration.rs`) get handles that the
//! layers above write to. The same code renders the daemon's scrape and the
//! one-shot `/probe` endpoint (a fresh [`Metrics`] per request).

mod dav;
mod dns;
mod hosted_domains;
mod http;
mod imap;
mod mail;
mod mail_auth;
mod mailbox_parity;
mod migration;
mod smtp;
mod webmail_login;

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

use crate::config::Kind;
use crate::probe::hosted_domains::AuditReport;
use crate::probe::{Measurement, Outcome};

pub use http::{HttpMetrics, Rejection};
pub use mail::{MailMetrics, RouteTotals};
pub use migration::MigrationMetrics;

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
        "cutover_webmail_inbox_messages",
        "Messages in the mailbox a webmail_login check listed in its last run (the webmail's own count).",
    ),
    (
        "cutover_webmail_app_info",
        "What a webmail environment runs, from its pages in the last complete login: application, version, skin and plugins (sorted, comma-separated); always 1.",
    ),
    (
        "cutover_webmail_parity",
        "Whether old and new last showed the same webmail version, skin and plugin set (1) or not (0).",
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
        "cutover_dav_collections",
        "Collections of the check's service (calendars or address books) in the account's DAV home in the last run.",
    ),
    (
        "cutover_dav_objects",
        "Objects the last run's query found in the check's read collection (probe objects excluded).",
    ),
    (
        "cutover_dav_write_roundtrip_seconds",
        "Duration of the last DAV write round trip: PUT, GET and DELETE of one probe object.",
    ),
    (
        "cutover_dav_orphaned_probe_objects",
        "Probe objects left by earlier (killed) runs that the last run found and removed.",
    ),
    (
        "cutover_dav_parity",
        "Whether new holds what old holds for a dav check's account (1) or not (0): the same collections and the same object count in the read collection, from each environment's last run.",
    ),
    (
        "cutover_mailbox_parity_accounts",
        "Accounts of a mailbox_parity check per finding in its last audit (ok, folder_missing, fewer_messages, uid_regressed, uidvalidity_changed, size_differs, unseen_differs, login_failed, old_still_receiving); an account counts once for each finding it has.",
    ),
    (
        "cutover_mailbox_parity_audited",
        "Accounts in the last audit of a mailbox_parity check (valid, distinct lines of its accounts file).",
    ),
    (
        "cutover_mailbox_parity_skipped_lines",
        "Lines of the accounts file skipped in the last audit, by reason (invalid, duplicate).",
    ),
    (
        "cutover_mailbox_parity_messages_missing",
        "Messages on old that new lacks, over every account of the last audit (missing folders and fewer messages).",
    ),
    (
        "cutover_mailbox_parity_audit_duration_seconds",
        "Duration of the last finished audit of a mailbox_parity check.",
    ),
    (
        "cutover_mailbox_parity_last_audit_timestamp_seconds",
        "Unix time at which the last audit of a mailbox_parity check finished.",
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
        "cutover_task_restarts_total",
        "Times a long-lived background task (a mailflow watcher or sweep) stopped, by a panic, and was started again.",
    ),
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
        "cutover_http_connections",
        "HTTP connections open to the daemon now, TLS handshakes included.",
    ),
    (
        "cutover_http_connections_max",
        "The cap on open HTTP connections in force: `--web.max-connections`, at most half the soft limit on open files at start.",
    ),
    (
        "cutover_http_connections_rejected_total",
        "HTTP connections closed before any answer, by reason (limit: every slot busy, the new one closed at once; evicted: the oldest without a request in progress closed to admit a new one; header_timeout: no TLS handshake or complete request head within `--web.read-header-timeout`; an idle keep-alive connection closing is not counted).",
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
    (
        "cutover_mail_lost_total",
        "Probe mails not found within `lost_after`; those found later stay counted here and in cutover_mail_recovered_total.",
    ),
    (
        "cutover_mail_recovered_total",
        "Probe mails found after they were counted lost; lost minus recovered is the net loss.",
    ),
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

/// One check instance's label values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Instance {
    /// Check name.
    pub check: String,
    /// Probe kind.
    pub kind: Kind,
    /// Environment name.
    pub env: String,
    /// The pinned address, or `resolved` for live environments.
    pub address: String,
}

impl Instance {
    fn values(&self) -> [&str; 4] {
        [&self.check, self.kind.as_str(), &self.env, &self.address]
    }

    fn with<'a>(&'a self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut v = self.values().to_vec();
        v.extend_from_slice(extra);
        v
    }
}

/// A kind's own series, written from its [`Measurement`]s. One implementation
/// per `metrics/<kind>.rs`, listed once in [`Metrics::new`].
trait KindSeries: Send + Sync {
    /// Whether `m` is this kind's measurement.
    fn owns(&self, m: &Measurement) -> bool;
    /// Publishes `m` for `inst`.
    fn record(&self, inst: &Instance, m: &Measurement);
    /// Removes what [`KindSeries::record`] set for `m`.
    fn remove(&self, inst: &Instance, m: &Measurement);
    /// Whether `new` is published under the same labels as `old`, so a later
    /// run updates its series instead of removing them (counters keep counting).
    fn same_series(&self, old: &Measurement, new: &Measurement) -> bool {
        old == new
    }
    /// Whether the series stay when a run does not report them again: a
    /// failed audit publishes nothing, and the last one stays in force.
    fn sticky(&self) -> bool {
        false
    }
}

/// A gauge family registered in `registry`, its help from [`CATALOG`].
fn gauge(registry: &Registry, name: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(opts(name), labels).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("unique metric");
    g
}

/// A counter family registered in `registry`, its help from [`CATALOG`].
fn counter(registry: &Registry, name: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(opts(name), labels).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("unique metric");
    c
}

/// [`INSTANCE_LABELS`] followed by `extra`.
fn instance_labels(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = INSTANCE_LABELS.to_vec();
    v.extend_from_slice(extra);
    v
}

/// Label sets set for an instance beyond its base labels, so that a later run
/// or a reload can remove exactly those.
#[derive(Default)]
struct Touched {
    phases: Vec<&'static str>,
    reasons: Vec<&'static str>,
    cert: Option<[String; 3]>,
    measurements: Vec<Measurement>,
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
    instances: Gauge,
    reload_ok: Gauge,
    reload_ts: Gauge,
    task_restarts: IntCounterVec,
    /// Each kind's own series, in [`Metrics::new`]'s list.
    kinds: Vec<Box<dyn KindSeries>>,
    /// The customer-domain audits' series, also restored from disk and counted by the audit store.
    hosted: hosted_domains::Series,
    /// The mailbox-parity audits' series, also restored from disk.
    parity: mailbox_parity::Series,
    touched: Mutex<HashMap<Instance, Touched>>,
    mail: MailMetrics,
    migration: MigrationMetrics,
    http: HttpMetrics,
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
        let r = &registry;
        let single = |name: &str| {
            let g = Gauge::with_opts(opts(name)).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
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
        let build = gauge(r, "cutover_build_info", &["version"]);
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1.0);
        let hosted = hosted_domains::Series::register(r);
        let parity = mailbox_parity::Series::register(r);
        // The kinds with series of their own: a new kind's series join here.
        let kinds: Vec<Box<dyn KindSeries>> = vec![
            Box::new(imap::Series::register(r)),
            Box::new(smtp::Series::register(r)),
            Box::new(dns::Series::register(r)),
            Box::new(mail_auth::Series::register(r)),
            Box::new(hosted.clone()),
            Box::new(webmail_login::Series::register(r)),
            Box::new(dav::Series::register(r)),
            Box::new(parity.clone()),
        ];
        Metrics {
            success: gauge(r, "cutover_probe_success", &INSTANCE_LABELS),
            duration,
            queue_wait,
            phase: gauge(r, "cutover_probe_phase_duration_seconds", &instance_labels(&["phase"])),
            last_run: gauge(r, "cutover_probe_last_run_timestamp_seconds", &INSTANCE_LABELS),
            runs: counter(r, "cutover_probe_runs_total", &INSTANCE_LABELS),
            failures: counter(r, "cutover_probe_failures_total", &instance_labels(&["reason"])),
            cert_not_after: gauge(r, "cutover_tls_cert_not_after_timestamp_seconds", &INSTANCE_LABELS),
            cert_info: gauge(
                r,
                "cutover_tls_cert_info",
                &instance_labels(&["issuer", "sha256", "name_matched"]),
            ),
            live_env: gauge(
                r,
                "cutover_live_resolved_env_info",
                &["check", "env", "resolved_env", "address"],
            ),
            instances: single("cutover_check_instances"),
            reload_ok: single("cutover_config_last_reload_successful"),
            reload_ts: single("cutover_config_last_reload_success_timestamp_seconds"),
            task_restarts: counter(r, "cutover_task_restarts_total", &["task"]),
            kinds,
            hosted,
            parity,
            touched: Mutex::new(HashMap::new()),
            mail: MailMetrics::register(r),
            migration: MigrationMetrics::register(r),
            http: HttpMetrics::register(r),
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

        for old in std::mem::take(&mut t.measurements) {
            let kind = self.kind_of(&old);
            if outcome.measurements.iter().any(|m| kind.same_series(&old, m)) {
                continue;
            }
            if kind.sticky() {
                t.measurements.push(old);
                continue;
            }
            kind.remove(inst, &old);
        }
        for m in &outcome.measurements {
            self.kind_of(m).record(inst, m);
            t.measurements.push(m.clone());
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

    /// The series of the kind that measured `m`.
    fn kind_of(&self, m: &Measurement) -> &dyn KindSeries {
        self.kinds
            .iter()
            .find(|k| k.owns(m))
            .map(|k| k.as_ref())
            .unwrap_or_else(|| panic!("no series for {m:?}: list its kind in Metrics::new"))
    }

    /// Publishes an audit restored from disk, before its check runs again.
    pub fn record_audit(&self, check: &str, report: &AuditReport) {
        self.hosted.record_report(check, report);
    }

    /// Publishes a mailbox-parity audit restored from disk, before its check runs again.
    pub fn record_parity(&self, check: &str, report: &crate::probe::mailbox_parity::ParityReport) {
        self.parity.record_report(check, report);
    }

    /// Counts customer domains whose findings changed between two audits.
    pub fn hosted_domain_changes(&self, check: &str, direction: crate::probe::hosted_domains::Direction, n: u64) {
        self.hosted.changes(check, direction, n);
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
        for m in &t.measurements {
            self.kind_of(m).remove(inst, m);
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

    /// The HTTP listener's series, which the server publishes to.
    pub fn http(&self) -> HttpMetrics {
        self.http.clone()
    }

    /// Whether the last configuration (re)load succeeded, for the status page.
    pub fn config_reload_ok(&self) -> bool {
        self.reload_ok.get() == 1.0
    }

    /// Records how long a scheduled run waited for a probe slot.
    pub fn queue_waited(&self, waited: std::time::Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// A background task was spawned: its restart counter exists from 0, so
    /// `increase()` sees the first restart.
    pub fn task_started(&self, task: &str) {
        self.task_restarts.with_label_values(&[task]);
    }

    /// A background task stopped and is started again.
    pub fn task_restarted(&self, task: &str) {
        self.task_restarts.with_label_values(&[task]).inc();
    }

    /// A reload dropped a background task.
    pub fn forget_task(&self, task: &str) {
        let _ = self.task_restarts.remove_label_values(&[task]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::dns::{AnswerState, Measured};
    use crate::probe::{CertFacts, Failure, FailureReason};
    use std::time::Duration;

    fn inst() -> Instance {
        Instance {
            check: "imap".into(),
            kind: Kind::Tcp,
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
            measurements: vec![],
            notes: vec![],
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
            kind: Kind::Dns,
            env: "lagging".into(),
            address: "127.0.0.31".into(),
        };
        let run = |state, changed| {
            let mut o = outcome(true, &["query"]);
            o.measurements = vec![
                Measurement::Dns(Measured::Answer {
                    record: "imap.example.test".into(),
                    rtype: "A",
                    resolver: "lagging".into(),
                    state,
                    ttl: (state != AnswerState::Timeout).then_some(280),
                    seconds: 0.002,
                    tcp: false,
                    changed,
                }),
                Measurement::Dns(Measured::Summary {
                    record: "imap.example.test".into(),
                    rtype: "A",
                    resolvers: 2,
                    answering_new: 1,
                    deadline: Some(1000.0),
                    unchanged: false,
                }),
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
