//! The status page (`/`) and `/api/v1/status`: what on-call needs at 3 a.m. on
//! one screen — the migration phase and its go/no-go questions, the old/new/live
//! matrix per check, DNS propagation, mail flow and certificates. Built from
//! the scheduler's last states and the metrics registry; it never runs a probe.
//!
//! Nothing secret reaches it: probes keep passwords out of failure details, and
//! details are shown here with credential usernames and mail addresses blanked
//! out, because server replies echo them.

use std::collections::{BTreeMap, HashMap};

use regex::{Regex, RegexBuilder};
use serde::Serialize;

use crate::config::{EnvKind, Kind, KindSpec};
use crate::metrics::Instance;
use crate::migration::{Current, PhaseWindow};
use crate::probe::Config;
use crate::probe::hosted_domains::Direction;
use crate::report::{self, MailEvidence, Verdict, assess};
use crate::scheduler::{self, LastState, Shared};

/// The page: one self-contained HTML file (inline CSS and JS, no external
/// assets) that renders `/api/v1/status` and fetches it again every 10 s.
pub const PAGE: &str = include_str!("status.html");

/// How many hex digits of a certificate's SHA-256 the page shows: enough to
/// tell old's from new's, short enough for a phone.
const FINGERPRINT_PREFIX: usize = 16;

/// Everything the page shows; served as `/api/v1/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// When this snapshot was taken, Unix seconds.
    pub generated_at: f64,
    /// cutover-monitor's version.
    pub version: &'static str,
    /// Whether the last config (re)load succeeded; a failed reload keeps the previous checks running.
    pub config_reload_ok: Option<bool>,
    /// The phase in force and the configured phases.
    pub phase: PhaseView,
    /// The go/no-go questions of the phase in force.
    pub verdicts: Vec<Verdict>,
    /// Configured environments in file order: the matrix's columns.
    pub environments: Vec<EnvView>,
    /// One row per check, one cell per instance.
    pub matrix: Vec<MatrixRow>,
    /// DNS propagation: per record, what each resolver answers.
    pub dns: Vec<DnsRecordView>,
    /// The mail ledger's summary.
    pub mail: MailView,
    /// Certificates seen in the last runs.
    pub certificates: Vec<CertView>,
    /// The last audit of each `hosted_domains` check (counts only; the rows
    /// are at `/api/v1/domains`).
    pub customer_domains: Vec<AuditView>,
}

/// A `hosted_domains` check's last audit, as the page shows it.
#[derive(Debug, Serialize)]
pub struct AuditView {
    /// The check.
    pub check: String,
    /// Domains audited.
    pub domains: usize,
    /// Domains per finding (every finding).
    pub counts: BTreeMap<&'static str, usize>,
    /// Domains that still depend on old or fail from new: any of `mx_old_ip`,
    /// `spf_old_ip_literal`, `spf_fails_new`, `autoconfig_old_ip`.
    pub on_old: usize,
    /// When it finished, Unix seconds.
    pub finished_at: f64,
    /// Domains fixed and regressed among the latest changes kept.
    pub fixed: usize,
    /// See `fixed`.
    pub regressed: usize,
}

/// The phase in force, plus the plan.
#[derive(Debug, Serialize)]
pub struct PhaseView {
    /// The phase in force and where it comes from.
    #[serde(flatten)]
    pub current: Current,
    /// The `migration` section's phases.
    pub phases: Vec<PhaseWindow>,
}

/// A matrix column.
#[derive(Debug, Serialize)]
pub struct EnvView {
    /// Its name.
    pub name: String,
    /// `pinned` or `live`.
    pub kind: &'static str,
}

/// One check's instances.
#[derive(Debug, Serialize)]
pub struct MatrixRow {
    /// Check name.
    pub check: String,
    /// Probe kind.
    pub kind: Kind,
    /// Its instances in schedule order.
    pub cells: Vec<Cell>,
}

/// One instance's last state.
#[derive(Debug, Serialize)]
pub struct Cell {
    /// Environment, or the resolver's name for `dns` checks.
    pub env: String,
    /// Whether `env` is a configured environment (a matrix column).
    pub environment: bool,
    /// Pinned address, or `resolved` for live.
    pub address: String,
    /// `ok`, `fail`, or `pending` before the first run.
    pub status: &'static str,
    /// Failure reason label.
    pub reason: Option<&'static str>,
    /// Phase the failure happened in.
    pub failed_phase: Option<&'static str>,
    /// Failure detail, usernames and addresses blanked out.
    pub detail: Option<String>,
    /// Since when the instance is in this state, Unix seconds.
    pub since: Option<f64>,
    /// When its last run started.
    pub last_run: Option<f64>,
    /// How long the last run took.
    pub duration_seconds: Option<f64>,
    /// For live: the address DNS handed out.
    pub resolved_address: Option<String>,
    /// For live: the environment it belongs to (`unknown` when none).
    pub resolved_env: Option<String>,
    /// Findings that are no failure, e.g. what differs between old and new.
    pub notes: Vec<String>,
}

/// One record across a `dns` check's resolvers.
#[derive(Debug, Serialize)]
pub struct DnsRecordView {
    /// Check name.
    pub check: String,
    /// Record name.
    pub record: String,
    /// Record type.
    #[serde(rename = "type")]
    pub rtype: &'static str,
    /// Per resolver.
    pub answers: Vec<DnsAnswerView>,
    /// Resolvers answering `new`.
    pub answering_new: usize,
    /// The expected old and new answers are the same: the record does not
    /// move, and "answering new" means nothing for it.
    pub unchanged: bool,
    /// When every cache still serving old should have expired it, Unix seconds.
    pub propagation_deadline: Option<f64>,
}

/// One resolver's answer.
#[derive(Debug, Serialize)]
pub struct DnsAnswerView {
    /// Resolver name.
    pub resolver: String,
    /// `old`, `new`, `mixed`, `other`, `nodata`, `nxdomain`, `servfail`, `refused` or `timeout`.
    pub state: &'static str,
    /// Lowest TTL in the answer.
    pub ttl_seconds: Option<u32>,
    /// When it was asked.
    pub asked_at: f64,
}

/// The mail ledger's summary, from the mail series' typed totals.
#[derive(Debug, Serialize)]
pub struct MailView {
    /// Whether any `mailflow` check is configured (or mail series exist).
    pub configured: bool,
    /// Per check and sending route.
    pub routes: Vec<MailRoute>,
}

/// One mailflow route's counts.
pub use crate::metrics::RouteTotals as MailRoute;

/// One certificate as an environment presents it, with the checks that saw it:
/// an environment usually has one certificate for every service.
#[derive(Debug, Serialize)]
pub struct CertView {
    /// Environment.
    pub env: String,
    /// The start of the SHA-256 fingerprint.
    pub sha256_prefix: String,
    /// Expiry, Unix seconds.
    pub not_after: i64,
    /// Issuer DN.
    pub issuer: String,
    /// The names it covers (subjectAltName).
    pub names: Vec<String>,
    /// Whether it covered the production hostname of every check that saw it.
    pub name_matched: bool,
    /// Checks whose last run saw it.
    pub checks: Vec<String>,
    /// Whether, for one of those checks, another environment's certificate covers other names.
    pub names_differ: bool,
}

/// Takes a snapshot of everything the page shows.
pub fn snapshot(shared: &Shared, config: &Config, current: Current) -> Status {
    let now = crate::unix_now();
    let specs = scheduler::instances(config);
    let last: HashMap<Instance, LastState> = {
        let all = shared.last.lock().expect("state lock");
        specs
            .iter()
            .filter_map(|s| all.get(&s.inst).map(|l| (s.inst.clone(), l.clone())))
            .collect()
    };
    let redact = Redactor::new(&config.usernames);

    let mut matrix: Vec<MatrixRow> = Vec::new();
    for spec in &specs {
        let state = last.get(&spec.inst);
        let outcome = state.map(|l| &l.outcome);
        let failure = outcome.and_then(|o| o.result.as_ref().err());
        let cell = Cell {
            env: spec.inst.env.clone(),
            environment: config.environments.iter().any(|e| e.name == spec.inst.env),
            address: spec.inst.address.clone(),
            status: match outcome.map(|o| o.success()) {
                None => "pending",
                Some(true) => "ok",
                Some(false) => "fail",
            },
            reason: failure.map(|f| f.reason.as_str()),
            failed_phase: failure.and_then(|f| f.phase),
            detail: failure.map(|f| redact.apply(&f.detail)),
            since: state.map(|l| l.since),
            last_run: outcome.map(|o| o.started_at),
            duration_seconds: outcome.map(|o| o.duration.as_secs_f64()),
            resolved_address: outcome.and_then(|o| o.resolved.as_ref()).map(|(ip, _)| ip.to_string()),
            resolved_env: outcome.and_then(|o| o.resolved.as_ref()).map(|(_, env)| env.clone()),
            notes: outcome.map_or_else(Vec::new, |o| o.notes.iter().map(|n| redact.apply(n)).collect()),
        };
        match matrix.iter_mut().find(|r| r.check == spec.inst.check) {
            Some(row) => row.cells.push(cell),
            None => matrix.push(MatrixRow {
                check: spec.inst.check.clone(),
                kind: spec.inst.kind,
                cells: vec![cell],
            }),
        }
    }

    let instances: Vec<_> = specs
        .iter()
        .map(|s| (s, last.get(&s.inst).map(|l| &l.outcome)))
        .collect();
    let mail = mail_view(config, shared.metrics.mail().routes());
    let verdicts = assess(config, &current, &instances, &mail_evidence(config, &mail), now);

    Status {
        generated_at: now,
        version: env!("CARGO_PKG_VERSION"),
        config_reload_ok: Some(shared.metrics.config_reload_ok()),
        phase: PhaseView {
            current,
            phases: config.migration.phases.clone(),
        },
        verdicts,
        environments: config
            .environments
            .iter()
            .map(|e| EnvView {
                name: e.name.clone(),
                kind: match e.kind {
                    EnvKind::Pinned(_) => "pinned",
                    EnvKind::Live(_) => "live",
                },
            })
            .collect(),
        matrix,
        dns: dns_view(&specs, &last),
        mail,
        certificates: cert_view(&specs, &last),
        customer_domains: {
            let audits = shared.audits.lock();
            let mut views: Vec<AuditView> = audits
                .values()
                .map(|a| AuditView {
                    check: a.report.check.clone(),
                    domains: a.report.domains.len(),
                    counts: a.report.counts().into_iter().map(|(f, n)| (f.as_str(), n)).collect(),
                    on_old: a
                        .report
                        .domains
                        .iter()
                        .filter(|r| {
                            use crate::probe::hosted_domains::Finding::*;
                            [MxOldIp, SpfOldIpLiteral, SpfFailsNew, AutoconfigOldIp]
                                .iter()
                                .any(|f| r.has(*f))
                        })
                        .count(),
                    finished_at: a.report.started_at + a.report.duration_seconds,
                    fixed: a.changes.iter().filter(|c| c.direction == Direction::Fixed).count(),
                    regressed: a.changes.iter().filter(|c| c.direction == Direction::Regressed).count(),
                })
                .collect();
            views.sort_by(|a, b| a.check.cmp(&b.check));
            views
        },
    }
}

fn dns_view(specs: &[scheduler::InstanceSpec], last: &HashMap<Instance, LastState>) -> Vec<DnsRecordView> {
    let mut out: Vec<DnsRecordView> = Vec::new();
    for spec in specs.iter().filter(|s| s.inst.kind == Kind::Dns) {
        let Some(state) = last.get(&spec.inst) else { continue };
        for row in report::dns_rows(&state.outcome.measurements) {
            let answer = DnsAnswerView {
                resolver: spec.inst.env.clone(),
                state: row.state,
                ttl_seconds: row.ttl_seconds,
                asked_at: state.outcome.started_at,
            };
            let same =
                |r: &&mut DnsRecordView| r.check == spec.inst.check && r.record == row.record && r.rtype == row.rtype;
            let view = match out.iter_mut().find(same) {
                Some(v) => v,
                None => {
                    out.push(DnsRecordView {
                        check: spec.inst.check.clone(),
                        record: row.record.clone(),
                        rtype: row.rtype,
                        answers: Vec::new(),
                        answering_new: 0,
                        unchanged: row.unchanged,
                        propagation_deadline: None,
                    });
                    out.last_mut().expect("just pushed")
                }
            };
            view.answering_new += usize::from(row.state == "new");
            // Each resolver's summary only adds resolvers seen serving old: the latest is the largest.
            view.propagation_deadline = match (view.propagation_deadline, row.propagation_deadline) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            view.answers.push(answer);
        }
    }
    out
}

fn cert_view(specs: &[scheduler::InstanceSpec], last: &HashMap<Instance, LastState>) -> Vec<CertView> {
    let seen: Vec<(&Instance, &crate::probe::CertFacts)> = specs
        .iter()
        .filter_map(|s| {
            last.get(&s.inst)
                .and_then(|l| l.outcome.cert.as_ref())
                .map(|c| (&s.inst, c))
        })
        .collect();
    let sorted_names = |c: &crate::probe::CertFacts| {
        let mut names = c.dns_names.clone();
        names.sort();
        names
    };
    let mut out: Vec<(String, CertView)> = Vec::new();
    for (inst, cert) in &seen {
        let names = sorted_names(cert);
        let differ = seen
            .iter()
            .any(|(other, c)| other.check == inst.check && other.env != inst.env && sorted_names(c) != names);
        let view = match out.iter_mut().find(|(sha, v)| *sha == cert.sha256 && v.env == inst.env) {
            Some((_, v)) => v,
            None => {
                out.push((
                    cert.sha256.clone(),
                    CertView {
                        env: inst.env.clone(),
                        sha256_prefix: cert.sha256.chars().take(FINGERPRINT_PREFIX).collect(),
                        not_after: cert.not_after,
                        issuer: cert.issuer.clone(),
                        names,
                        name_matched: true,
                        checks: Vec::new(),
                        names_differ: false,
                    },
                ));
                &mut out.last_mut().expect("just pushed").1
            }
        };
        view.name_matched &= cert.name_matched;
        view.names_differ |= differ;
        if !view.checks.contains(&inst.check) {
            view.checks.push(inst.check.clone());
        }
    }
    out.into_iter().map(|(_, v)| v).collect()
}

/// The mail series' totals per check and route, as the ledger published them.
fn mail_view(config: &Config, routes: Vec<MailRoute>) -> MailView {
    let configured = config
        .checks
        .iter()
        .any(|c| matches!(c.check.kind, KindSpec::Mailflow(_)));
    MailView {
        configured: configured || !routes.is_empty(),
        routes,
    }
}

/// What the mail questions go on: the latest delivery per environment, and
/// "flowing" meaning within three intervals of the slowest mailflow check.
fn mail_evidence(config: &Config, mail: &MailView) -> MailEvidence {
    let intervals = config
        .checks
        .iter()
        .filter(|c| matches!(c.check.kind, KindSpec::Mailflow(_)))
        .map(|c| c.check.interval.as_secs_f64());
    let Some(slowest) = intervals.reduce(f64::max) else {
        return MailEvidence::Unconfigured;
    };
    let mut last_delivered: BTreeMap<String, f64> = BTreeMap::new();
    for route in &mail.routes {
        for (env, at) in &route.last_delivered {
            let e = last_delivered.entry(env.clone()).or_insert(*at);
            *e = e.max(*at);
        }
    }
    MailEvidence::Ledger {
        last_delivered,
        fresh_within: 3.0 * slowest,
    }
}

/// `/api/v1/domains`: the last audit of each (or one) `hosted_domains`
/// check with its rows, optionally only those with any of some findings.
#[derive(Debug, Serialize)]
pub struct DomainsAnswer {
    /// One entry per check that has finished an audit.
    pub audits: Vec<AuditAnswer>,
    /// Checks without a finished audit yet.
    pub pending: Vec<String>,
}

/// One check's last audit, as `/api/v1/domains` lists it.
#[derive(Debug, Serialize)]
pub struct AuditAnswer {
    /// The check.
    pub check: String,
    /// When the audit started and finished, Unix seconds, and how long it took.
    pub started_at: f64,
    /// See `started_at`.
    pub finished_at: f64,
    /// See `started_at`.
    pub duration_seconds: f64,
    /// Valid, distinct domains audited.
    pub domains_audited: usize,
    /// Domains per finding (all of them, filter or not).
    pub counts: BTreeMap<&'static str, usize>,
    /// What was skipped in the domains file.
    pub input: crate::probe::hosted_domains::InputSummary,
    /// The rows, filtered.
    pub domains: Vec<crate::probe::hosted_domains::DomainRow>,
    /// The latest changes, newest last.
    pub changes: std::collections::VecDeque<crate::probe::hosted_domains::Change>,
}

/// Why `/api/v1/domains` cannot answer a query.
#[derive(Debug, thiserror::Error)]
pub enum DomainsError {
    /// `?finding=` names no finding.
    #[error("{0}")]
    BadFinding(String),
    /// `?check=` names no check of the kind asked about.
    #[error("no {kind} check `{name}`; configured: {configured}")]
    UnknownCheck {
        /// `hosted_domains` or `mailbox_parity`.
        kind: &'static str,
        /// The name asked for, sanitized.
        name: String,
        /// The configured ones, or `none`.
        configured: String,
    },
}

/// What `/api/v1/domains` and `/api/v1/parity` share: `finding` parsed as a
/// comma-separated list (any of them), and the names of the configured
/// checks of `kind` that the query selects (`check`, or all of them).
fn audit_query<F>(
    config: &Config,
    kind: Kind,
    finding: Option<&str>,
    check: Option<&str>,
    parse: impl Fn(&str) -> Result<F, String>,
) -> Result<(Option<Vec<F>>, Vec<String>), DomainsError> {
    let filter = finding
        .map(|f| f.split(',').map(|f| parse(f.trim())).collect::<Result<Vec<_>, _>>())
        .transpose()
        .map_err(DomainsError::BadFinding)?;
    let configured: Vec<String> = config
        .checks
        .iter()
        .filter(|c| c.check.kind.kind() == kind)
        .map(|c| c.check.name.clone())
        .collect();
    if let Some(name) = check
        && !configured.iter().any(|c| c == name)
    {
        return Err(DomainsError::UnknownCheck {
            kind: kind.as_str(),
            name: crate::probe::sanitize(name),
            configured: if configured.is_empty() {
                "none".to_string()
            } else {
                configured.join(", ")
            },
        });
    }
    let selected = configured
        .into_iter()
        .filter(|c| check.is_none_or(|n| n == c))
        .collect();
    Ok((filter, selected))
}

/// The model behind `/api/v1/domains`: `finding` comma-separated (any of
/// them), `check` one check's name.
pub fn domains(
    shared: &Shared,
    config: &Config,
    finding: Option<&str>,
    check: Option<&str>,
) -> Result<DomainsAnswer, DomainsError> {
    let (filter, checks) = audit_query(
        config,
        Kind::HostedDomains,
        finding,
        check,
        crate::probe::hosted_domains::Finding::parse,
    )?;
    let audits = shared.audits.lock();
    let mut answer = DomainsAnswer {
        audits: Vec::new(),
        pending: Vec::new(),
    };
    for name in &checks {
        let Some(a) = audits.get(name) else {
            answer.pending.push(name.clone());
            continue;
        };
        let r = &a.report;
        answer.audits.push(AuditAnswer {
            check: r.check.clone(),
            started_at: r.started_at,
            finished_at: r.started_at + r.duration_seconds,
            duration_seconds: r.duration_seconds,
            domains_audited: r.domains.len(),
            counts: r.counts().iter().map(|(f, n)| (f.as_str(), *n)).collect(),
            input: r.input.clone(),
            domains: r
                .domains
                .iter()
                .filter(|row| filter.as_ref().is_none_or(|f| f.iter().any(|f| row.has(*f))))
                .cloned()
                .collect(),
            changes: a.changes.clone(),
        });
    }
    Ok(answer)
}

/// `/api/v1/parity`: the last audit of each (or one) `mailbox_parity`
/// check with its rows, optionally only those with any of some findings.
#[derive(Debug, Serialize)]
pub struct ParityAnswer {
    /// One entry per check that has finished an audit.
    pub audits: Vec<ParityAuditAnswer>,
    /// Checks without a finished audit yet.
    pub pending: Vec<String>,
}

/// One check's last audit, as `/api/v1/parity` lists it.
#[derive(Debug, Serialize)]
pub struct ParityAuditAnswer {
    /// The check.
    pub check: String,
    /// When the audit started and finished, Unix seconds, and how long it took.
    pub started_at: f64,
    /// See `started_at`.
    pub finished_at: f64,
    /// See `started_at`.
    pub duration_seconds: f64,
    /// The migration phase the audit ran in.
    pub phase: Option<crate::config::Phase>,
    /// Valid, distinct accounts audited.
    pub accounts_audited: usize,
    /// Messages on old that new lacks, over every account.
    pub messages_missing: u64,
    /// Accounts per finding (all of them, filter or not).
    pub counts: BTreeMap<&'static str, usize>,
    /// What was skipped in the accounts file.
    pub input: crate::probe::hosted_domains::InputSummary,
    /// The rows, filtered.
    pub accounts: Vec<crate::probe::mailbox_parity::AccountRow>,
}

/// The model behind `/api/v1/parity`: `finding` comma-separated (any of
/// them), `check` one check's name. Errors as `/api/v1/domains`'.
pub fn parity(
    shared: &Shared,
    config: &Config,
    finding: Option<&str>,
    check: Option<&str>,
) -> Result<ParityAnswer, DomainsError> {
    let (filter, checks) = audit_query(
        config,
        Kind::MailboxParity,
        finding,
        check,
        crate::probe::mailbox_parity::Finding::parse,
    )?;
    let audits = shared.parity.lock();
    let mut answer = ParityAnswer {
        audits: Vec::new(),
        pending: Vec::new(),
    };
    for name in &checks {
        let Some(r) = audits.get(name) else {
            answer.pending.push(name.clone());
            continue;
        };
        answer.audits.push(ParityAuditAnswer {
            check: r.check.clone(),
            started_at: r.started_at,
            finished_at: r.started_at + r.duration_seconds,
            duration_seconds: r.duration_seconds,
            phase: r.phase,
            accounts_audited: r.accounts.len(),
            messages_missing: r.messages_missing(),
            counts: r.counts().iter().map(|(f, n)| (f.as_str(), *n)).collect(),
            input: r.input.clone(),
            accounts: r
                .accounts
                .iter()
                .filter(|row| filter.as_ref().is_none_or(|f| f.iter().any(|f| row.has(*f))))
                .cloned()
                .collect(),
        });
    }
    Ok(answer)
}

/// Blanks credential usernames and mail addresses out of server-supplied text.
struct Redactor {
    pattern: Regex,
}

impl Redactor {
    fn new(usernames: &[String]) -> Redactor {
        // Whole addresses first, then usernames, longest first, so no part of one is left behind.
        let mut names: Vec<&String> = usernames.iter().filter(|u| !u.is_empty()).collect();
        names.sort_by_key(|u| std::cmp::Reverse(u.len()));
        let mut parts = vec![r"[^\s<>@:,;()\[\]]+@[^\s<>@:,;()\[\]]+".to_string()];
        parts.extend(names.into_iter().map(|u| regex::escape(u)));
        Redactor {
            pattern: RegexBuilder::new(&parts.join("|"))
                .case_insensitive(true)
                .build()
                .expect("escaped usernames form a valid pattern"),
        }
    }

    fn apply(&self, text: &str) -> String {
        self.pattern.replace_all(text, "<redacted>").into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_and_addresses_are_blanked_out() {
        let r = Redactor::new(&["probe".into(), "probe@example.test".into()]);
        assert_eq!(
            r.apply("smtp.example.test refused the credentials of probe@example.test: 535 5.7.8 Error"),
            "smtp.example.test refused the credentials of <redacted>: 535 5.7.8 Error"
        );
        assert_eq!(
            r.apply("550 <Someone@Other.test>: unknown; user PROBE"),
            "550 <<redacted>>: unknown; user <redacted>"
        );
    }
}
