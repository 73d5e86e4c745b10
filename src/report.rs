//! The `check` command's output: a table for people at 3 a.m., JSON for
//! scripts, and Nagios-style exit codes for the go/no-go decision.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{EnvKind, Kind};
use crate::migration::{Current, Migration, Phase, Source};
use crate::probe::dns::Measured;
use crate::probe::{Config, Measurement, Outcome};
use crate::scheduler::InstanceSpec;
use crate::timestamp;

/// Exit code when every selected instance passed.
pub const EXIT_OK: i32 = 0;
/// Exit code when any selected instance failed.
pub const EXIT_CRITICAL: i32 = 2;
/// Exit code when the checks could not be run (bad config, nothing selected).
pub const EXIT_UNKNOWN: i32 = 3;

/// One instance's result, as printed.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Check name.
    pub check: String,
    /// Probe kind.
    pub kind: crate::config::Kind,
    /// Environment.
    pub env: String,
    /// Address label (`resolved` for live).
    pub address: String,
    /// For live instances: the address and environment DNS pointed to.
    pub resolved: Option<String>,
    /// Pass or fail.
    pub success: bool,
    /// Wall time in seconds.
    pub duration_seconds: f64,
    /// Failure reason label.
    pub reason: Option<&'static str>,
    /// Phase the failure happened in.
    pub phase: Option<&'static str>,
    /// Failure detail.
    pub detail: Option<String>,
    /// Phase timings in seconds.
    pub phases: Vec<(&'static str, f64)>,
    /// Certificate SHA-256, to compare old and new.
    pub cert_sha256: Option<String>,
    /// Certificate expiry, Unix seconds.
    pub cert_not_after: Option<i64>,
    /// For `dns` checks: what this resolver answered for each record.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<DnsRow>,
    /// Findings that are no failure, e.g. what differs between old and new.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One record as one resolver answered it (a `dns` check instance).
#[derive(Debug, Serialize)]
pub struct DnsRow {
    /// The record's name.
    pub record: String,
    /// Its type, e.g. `A`.
    #[serde(rename = "type")]
    pub rtype: &'static str,
    /// `old`, `new`, `mixed`, `other`, `nodata`, `nxdomain`, `servfail`, `refused` or `timeout`.
    pub state: &'static str,
    /// Lowest TTL in the answer.
    pub ttl_seconds: Option<u32>,
    /// Query duration.
    pub query_seconds: f64,
    /// Whether the UDP answer was truncated and repeated over TCP.
    pub tcp: bool,
    /// When every resolver still answering old will have expired it, as known
    /// after this answer (Unix seconds).
    pub propagation_deadline: Option<f64>,
    /// The record's expected old and new answers are the same: it does not move.
    pub unchanged: bool,
}

/// The `dns` answers among a run's measurements, one per record (also the status page's DNS table).
pub fn dns_rows(measurements: &[Measurement]) -> Vec<DnsRow> {
    measurements
        .iter()
        .filter_map(|m| match m {
            Measurement::Dns(Measured::Answer {
                record,
                rtype,
                state,
                ttl,
                seconds,
                tcp,
                ..
            }) => Some(DnsRow {
                record: record.clone(),
                rtype,
                state: state.as_str(),
                ttl_seconds: *ttl,
                query_seconds: *seconds,
                tcp: *tcp,
                unchanged: measurements.iter().any(|s| {
                    matches!(s, Measurement::Dns(Measured::Summary { record: r, rtype: t, unchanged: true, .. }) if r == record && t == rtype)
                }),
                propagation_deadline: measurements.iter().find_map(|s| match s {
                    Measurement::Dns(Measured::Summary {
                        record: r,
                        rtype: t,
                        deadline,
                        ..
                    }) if r == record && t == rtype => *deadline,
                    _ => None,
                }),
            }),
            _ => None,
        })
        .collect()
}

/// Pairs instances with their outcomes.
pub fn rows(specs: &[InstanceSpec], outcomes: &[Outcome]) -> Vec<Row> {
    specs
        .iter()
        .zip(outcomes)
        .map(|(s, o)| {
            let failure = o.result.as_ref().err();
            Row {
                check: s.inst.check.clone(),
                kind: s.inst.kind,
                env: s.inst.env.clone(),
                address: s.inst.address.clone(),
                resolved: o.resolved.as_ref().map(|(ip, env)| format!("{ip} ({env})")),
                success: o.success(),
                duration_seconds: o.duration.as_secs_f64(),
                reason: failure.map(|f| f.reason.as_str()),
                phase: failure.and_then(|f| f.phase),
                detail: failure.map(|f| f.detail.clone()),
                phases: o.phases.iter().map(|(p, d)| (*p, d.as_secs_f64())).collect(),
                cert_sha256: o.cert.as_ref().map(|c| c.sha256.clone()),
                cert_not_after: o.cert.as_ref().map(|c| c.not_after),
                dns: dns_rows(&o.measurements),
                notes: o.notes.iter().map(|n| crate::probe::sanitize(n)).collect(),
            }
        })
        .collect()
}

/// The exit code for a set of rows.
pub fn exit_code(rows: &[Row]) -> i32 {
    if rows.is_empty() {
        EXIT_UNKNOWN
    } else if rows.iter().all(|r| r.success) {
        EXIT_OK
    } else {
        EXIT_CRITICAL
    }
}

/// A fixed-width table, one line per instance, then a summary line.
pub fn table(rows: &[Row]) -> String {
    let head = ["CHECK", "ENV", "ADDRESS", "STATUS", "DURATION", "REASON", "DETAIL"];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let address = match &r.resolved {
                Some(res) => format!("{} -> {res}", r.address),
                None => r.address.clone(),
            };
            let reason = match (r.reason, r.phase) {
                (Some(reason), Some(phase)) => format!("{reason} ({phase})"),
                (Some(reason), None) => reason.to_string(),
                _ => "-".into(),
            };
            [
                r.check.clone(),
                r.env.clone(),
                address,
                if r.success { "OK" } else { "FAIL" }.into(),
                format!("{:.3}s", r.duration_seconds),
                reason,
                r.detail.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let mut widths = head.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, row: &[&str]| {
        let mut text = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                text.push_str(c);
            } else {
                let _ = write!(text, "{c:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut out, &head);
    for row in &cells {
        line(&mut out, &row.each_ref().map(String::as_str));
    }
    out.push_str(&dns_table(rows));
    for r in rows {
        for note in &r.notes {
            let _ = writeln!(out, "NOTE {} {}: {note}", r.check, r.env);
        }
    }
    let failed = rows.iter().filter(|r| !r.success).count();
    let _ = writeln!(
        out,
        "{} of {} instances OK, {failed} failing",
        rows.len() - failed,
        rows.len()
    );
    out
}

/// The DNS answers of `dns` checks, record x resolver, then per record how many
/// resolvers answer new and until when old answers may still be cached.
fn dns_table(rows: &[Row]) -> String {
    let mut answers: Vec<(&Row, &DnsRow)> = rows.iter().flat_map(|r| r.dns.iter().map(move |d| (r, d))).collect();
    if answers.is_empty() {
        return String::new();
    }
    // Per record, in the order first seen; resolvers in check order within.
    let mut records: Vec<(&str, &str, &str)> = Vec::new();
    for (r, d) in &answers {
        let key = (r.check.as_str(), d.record.as_str(), d.rtype);
        if !records.contains(&key) {
            records.push(key);
        }
    }
    let position = |r: &Row, d: &DnsRow| {
        records
            .iter()
            .position(|k| *k == (r.check.as_str(), d.record.as_str(), d.rtype))
    };
    answers.sort_by_key(|(r, d)| position(r, d));
    let head = ["DNS RECORD", "TYPE", "RESOLVER", "STATE", "TTL", "QUERY"];
    let cells: Vec<[String; 6]> = answers
        .iter()
        .map(|(r, d)| {
            [
                format!("{}/{}", r.check, d.record),
                d.rtype.to_string(),
                r.env.clone(),
                d.state.to_string(),
                d.ttl_seconds.map_or("-".into(), |t| format!("{t}s")),
                format!("{:.3}s{}", d.query_seconds, if d.tcp { " (tcp)" } else { "" }),
            ]
        })
        .collect();
    let mut widths = head.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::from("\n");
    for row in std::iter::once(head.map(String::from)).chain(cells) {
        let line: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    for (check, record, rtype) in records {
        let same: Vec<&DnsRow> = answers
            .iter()
            .filter(|(r, d)| r.check == check && d.record == record && d.rtype == rtype)
            .map(|(_, d)| *d)
            .collect();
        let new = same.iter().filter(|d| d.state == "new").count();
        let _ = write!(
            out,
            "{check}/{record} {rtype}: {new} of {} resolvers answer new",
            same.len()
        );
        // Every instance's summary only adds resolvers seen serving old: the latest is the largest.
        let deadline = same.iter().filter_map(|d| d.propagation_deadline).reduce(f64::max);
        let serving_old = same.iter().any(|d| d.state == "old" || d.state == "mixed");
        match deadline {
            Some(at) if serving_old => {
                let _ = write!(out, "; old answers cached until {}", timestamp(at));
            }
            _ => {}
        }
        out.push('\n');
    }
    out.push('\n');
    out
}

/// The go/no-go section under the table: the phase in force and, per
/// question that matters in it, GO, NO-GO or UNKNOWN with the evidence. The
/// exit code stays that of the table; these lines say what it means tonight.
pub fn go_no_go(current: &crate::migration::Current, verdicts: &[Verdict]) -> String {
    let mut out = format!("\nMIGRATION PHASE: {}\n", current.describe());
    if !verdicts.is_empty() {
        let width = verdicts.iter().map(|v| v.question.chars().count()).max().unwrap_or(0);
        out.push_str("GO/NO-GO:\n");
        for v in verdicts {
            let _ = writeln!(out, "  {:<7}  {:<width$}  {}", v.answer.label(), v.question, v.detail);
        }
    }
    out
}

/// One audited domain as the `domains` command prints it.
#[derive(Debug, Serialize)]
pub struct DomainLine<'a> {
    /// The `hosted_domains` check that audited it.
    pub check: &'a str,
    /// The row.
    #[serde(flatten)]
    pub row: &'a crate::probe::hosted_domains::DomainRow,
}

/// The `domains` table: domain and findings, then each offending record and
/// each suggested fix on lines of their own, so it reads like a mail to the customer.
pub fn domains_table(lines: &[DomainLine]) -> String {
    let findings = |l: &DomainLine| l.row.findings.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(",");
    let width = lines.iter().map(|l| l.row.domain.len()).max().unwrap_or(0).max(6);
    let mut out = String::new();
    let _ = writeln!(out, "{:<width$}  FINDINGS", "DOMAIN");
    for l in lines {
        let _ = writeln!(out, "{:<width$}  {}", l.row.domain, findings(l));
        for r in &l.row.records {
            let _ = writeln!(out, "{:<width$}    record: {}", "", crate::probe::sanitize(r));
        }
        for f in &l.row.fixes {
            let _ = writeln!(out, "{:<width$}    fix:    {}", "", crate::probe::sanitize(f));
        }
    }
    out
}

/// The `domains` rows as CSV (RFC 4180 quoting): check, domain, findings
/// (space-separated), records and fixes (each joined by ` | `).
pub fn domains_csv(lines: &[DomainLine]) -> String {
    fn field(text: &str) -> String {
        // A leading =, +, - or @ would be a formula in a spreadsheet.
        let text = if text.starts_with(['=', '+', '-', '@']) {
            format!("'{text}")
        } else {
            text.to_string()
        };
        if text.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", text.replace('"', "\"\""))
        } else {
            text
        }
    }
    let mut out = String::from("check,domain,findings,records,fixes\r\n");
    for l in lines {
        let findings: Vec<&str> = l.row.findings.iter().map(|f| f.as_str()).collect();
        let _ = write!(
            out,
            "{},{},{},{},{}\r\n",
            field(l.check),
            field(&l.row.domain),
            field(&findings.join(" ")),
            field(&l.row.records.join(" | ")),
            field(&l.row.fixes.join(" | "))
        );
    }
    out
}

/// One audited account as the `parity` command prints it.
#[derive(Debug, Serialize)]
pub struct ParityLine<'a> {
    /// The `mailbox_parity` check that audited it.
    pub check: &'a str,
    /// The row.
    #[serde(flatten)]
    pub row: &'a crate::probe::mailbox_parity::AccountRow,
}

/// The `parity` table: account and findings, then each detail (folder and
/// numbers) on a line of its own.
pub fn parity_table(lines: &[ParityLine]) -> String {
    let width = lines.iter().map(|l| l.row.account.len()).max().unwrap_or(0).max(7);
    let mut out = String::new();
    let _ = writeln!(out, "{:<width$}  FINDINGS", "ACCOUNT");
    for l in lines {
        let findings: Vec<&str> = l.row.findings.iter().map(|f| f.as_str()).collect();
        let _ = writeln!(out, "{:<width$}  {}", l.row.account, findings.join(","));
        for d in &l.row.details {
            let _ = writeln!(out, "{:<width$}    {}", "", crate::probe::sanitize(d));
        }
    }
    out
}

/// The `parity` rows as CSV (RFC 4180 quoting, spreadsheet formulas
/// defused): check, account, findings (space-separated), messages missing,
/// details (joined by ` | `).
pub fn parity_csv(lines: &[ParityLine]) -> String {
    let mut out = String::from("check,account,findings,messages_missing,details\r\n");
    for l in lines {
        let findings: Vec<&str> = l.row.findings.iter().map(|f| f.as_str()).collect();
        let _ = write!(
            out,
            "{},{},{},{},{}\r\n",
            csv_field(l.check),
            csv_field(&l.row.account),
            csv_field(&findings.join(" ")),
            l.row.messages_missing,
            csv_field(&l.row.details.join(" | "))
        );
    }
    out
}

fn csv_field(text: &str) -> String {
    let text = if text.starts_with(['=', '+', '-', '@']) {
        format!("'{text}")
    } else {
        text.to_string()
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// What `parity` prints after the rows: the summary and the skipped lines.
pub fn parity_summary(report: &crate::probe::mailbox_parity::ParityReport) -> String {
    let mut out = format!("{}\n", report.summary());
    let input = &report.input;
    for p in &input.problems {
        let _ = writeln!(out, "  {}", crate::probe::sanitize(p));
    }
    if input.invalid + input.duplicates > input.problems.len() {
        let _ = writeln!(
            out,
            "  … and {} more",
            input.invalid + input.duplicates - input.problems.len()
        );
    }
    out
}

/// The one-line summary of an audit printed after the rows.
pub fn audit_summary(report: &crate::probe::hosted_domains::AuditReport) -> String {
    let counts: Vec<String> = report
        .counts()
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(f, n)| format!("{f} {n}"))
        .collect();
    let queries: u64 = report.queries.iter().flat_map(|r| &r.counts).map(|(_, n)| n).sum();
    let mut out = format!(
        "{}: {} domains audited in {:.1} s with {} queries: {}\n",
        report.check,
        report.domains.len(),
        report.duration_seconds,
        queries,
        counts.join(", ")
    );
    let input = &report.input;
    if input.invalid + input.duplicates > 0 {
        let _ = writeln!(
            out,
            "{}: skipped {} invalid and {} duplicate lines of {}:",
            report.check,
            input.invalid,
            input.duplicates,
            input.file.display()
        );
        for p in &input.problems {
            let _ = writeln!(out, "  {}", crate::probe::sanitize(p));
        }
        let shown = input.problems.len();
        if input.invalid + input.duplicates > shown {
            let _ = writeln!(out, "  … and {} more", input.invalid + input.duplicates - shown);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Go/no-go: what matters in each phase.
// ---------------------------------------------------------------------------

/// One instance's state as the go/no-go questions see it.
#[derive(Debug, Clone)]
pub struct Observation {
    /// Check name.
    pub check: String,
    /// Probe kind.
    pub kind: Kind,
    /// Environment (or resolver) name.
    pub env: String,
    /// Address label.
    pub address: String,
    /// Whether `env` is a configured environment (not a resolver of a `dns` check).
    pub is_env: bool,
    /// Whether that environment follows DNS.
    pub live: bool,
    /// Pass, fail, or not run yet.
    pub ok: Option<bool>,
    /// Failure reason label.
    pub reason: Option<&'static str>,
    /// For live instances: the environment the resolved address belongs to.
    pub resolved_env: Option<String>,
    /// Environments whose readiness the check speaks for besides its own
    /// (`mail_auth`: those that must pass SPF; `dns`: `new`'s records).
    pub judges: Vec<String>,
}

/// Pairs an instance with its last outcome (none before its first run).
fn observe(config: &Config, spec: &InstanceSpec, outcome: Option<&Outcome>) -> Observation {
    let inst = &spec.inst;
    let env = config.environments.iter().find(|e| e.name == inst.env);
    Observation {
        judges: spec.check.probe.judges(),
        check: inst.check.clone(),
        kind: inst.kind,
        env: inst.env.clone(),
        address: inst.address.clone(),
        is_env: env.is_some(),
        live: env.is_some_and(|e| matches!(e.kind, EnvKind::Live(_))),
        ok: outcome.map(Outcome::success),
        reason: outcome.and_then(|o| o.result.as_ref().err()).map(|f| f.reason.as_str()),
        resolved_env: outcome.and_then(|o| o.resolved.as_ref()).map(|(_, env)| env.clone()),
    }
}

/// What is known about mail flow for the mail questions.
#[derive(Debug, Clone)]
pub enum MailEvidence {
    /// No `mailflow` check: the mail questions are not asked.
    Unconfigured,
    /// `check`: whether each run's probe mail arrived, but not where.
    OneShot,
    /// The daemon's ledger: when a probe mail last became visible in each
    /// environment, and how recent counts as flowing.
    Ledger {
        /// Environment -> Unix seconds.
        last_delivered: BTreeMap<String, f64>,
        /// Seconds.
        fresh_within: f64,
    },
}

/// The answer to a go/no-go question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// Go.
    Yes,
    /// No-go.
    No,
    /// Not known yet (checks not run, nothing configured to tell).
    Unknown,
}

impl Answer {
    /// How `check` and the status page print it.
    pub fn label(self) -> &'static str {
        match self {
            Answer::Yes => "GO",
            Answer::No => "NO-GO",
            Answer::Unknown => "UNKNOWN",
        }
    }
}

/// One go/no-go question with its answer and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    /// E.g. `Is new ready?`.
    pub question: String,
    /// Yes, no, unknown.
    pub answer: Answer,
    /// The evidence, e.g. which instances fail.
    pub detail: String,
}

/// The go/no-go answers in the phase in force, from each instance's last
/// outcome (none before its first run): before the switch, is the target
/// ready; after it, does live resolve to the target, does it serve, does mail
/// flow into it and nothing land in the source any more. None without a
/// `migration` section or an override. `check` and the status page both ask
/// this, so they never disagree.
pub fn assess(
    config: &Config,
    current: &Current,
    instances: &[(&InstanceSpec, Option<&Outcome>)],
    mail: &MailEvidence,
    now: f64,
) -> Vec<Verdict> {
    let seen: Vec<Observation> = instances.iter().map(|(s, o)| observe(config, s, *o)).collect();
    verdicts(&config.migration, current, &seen, mail, now)
}

/// [`assess`] on the instances' observations.
fn verdicts(
    migration: &Migration,
    current: &Current,
    seen: &[Observation],
    mail: &MailEvidence,
    now: f64,
) -> Vec<Verdict> {
    let phase = match (current.phase, current.source) {
        (Some(p), _) => p,
        (None, Source::Unconfigured) => return Vec::new(),
        // Between phases the last one's questions still hold; before the first, preparation's.
        (None, _) => migration
            .phases
            .iter()
            .rev()
            .find(|w| w.start <= now)
            .map_or(Phase::Preparation, |w| w.phase),
    };
    let target = migration.target();
    let source = migration.source();
    match phase {
        Phase::Preparation | Phase::Window => vec![healthy(seen, &target, format!("Is {target} ready?"))],
        Phase::Switched | Phase::Decommission => {
            let mut out = vec![
                live_is(seen, &target),
                healthy(seen, &target, format!("Is {target} serving?")),
            ];
            let switched_at = match current.source {
                Source::Manual => current.since,
                _ => migration
                    .phases
                    .iter()
                    .find(|w| w.phase == Phase::Switched && w.start <= now)
                    .map(|w| w.start)
                    .or(current.since),
            };
            out.extend(mail_verdicts(seen, mail, &target, &source, switched_at, now));
            out
        }
    }
}

fn healthy(seen: &[Observation], env: &str, question: String) -> Verdict {
    // Its own instances, and the checks that judge it from elsewhere (will
    // mail from it authenticate, do its DNS records exist).
    let mine: Vec<&Observation> = seen
        .iter()
        .filter(|o| (o.is_env && o.env == env) || o.judges.iter().any(|j| j == env))
        .collect();
    let failing: Vec<String> = mine
        .iter()
        .filter(|o| o.ok == Some(false))
        .map(|o| match o.is_env {
            true => format!("{} {} ({})", o.check, o.address, o.reason.unwrap_or("?")),
            false => format!("{} via {} ({})", o.check, o.env, o.reason.unwrap_or("?")),
        })
        .collect();
    let pending = mine.iter().filter(|o| o.ok.is_none()).count();
    let (answer, detail) = if mine.is_empty() {
        (Answer::Unknown, format!("no check runs in `{env}`"))
    } else if !failing.is_empty() {
        (
            Answer::No,
            format!(
                "{} of {} {env} instances failing: {}",
                failing.len(),
                mine.len(),
                failing.join(", ")
            ),
        )
    } else if pending > 0 {
        (
            Answer::Unknown,
            format!("{pending} of {} {env} instances not run yet", mine.len()),
        )
    } else {
        (Answer::Yes, format!("all {} {env} instances OK", mine.len()))
    };
    Verdict {
        question,
        answer,
        detail,
    }
}

fn live_is(seen: &[Observation], target: &str) -> Verdict {
    let live: Vec<&Observation> = seen.iter().filter(|o| o.live).collect();
    let elsewhere: Vec<String> = live
        .iter()
        .filter_map(|o| {
            o.resolved_env
                .as_deref()
                .filter(|e| *e != target)
                .map(|e| format!("{} -> {e}", o.check))
        })
        .collect();
    let unresolved: Vec<String> = live
        .iter()
        .filter(|o| o.resolved_env.is_none())
        .map(|o| format!("{} ({})", o.check, o.reason.unwrap_or("not run yet")))
        .collect();
    let (answer, detail) = if live.is_empty() {
        (Answer::Unknown, "no check runs in a live environment".to_string())
    } else if !elsewhere.is_empty() {
        (
            Answer::No,
            format!(
                "{} of {} live instances resolve elsewhere: {}",
                elsewhere.len(),
                live.len(),
                elsewhere.join(", ")
            ),
        )
    } else if !unresolved.is_empty() {
        (Answer::Unknown, format!("not resolved: {}", unresolved.join(", ")))
    } else {
        (
            Answer::Yes,
            format!("all {} live instances resolve to {target}", live.len()),
        )
    };
    Verdict {
        question: format!("Is live = {target}?"),
        answer,
        detail,
    }
}

fn mail_verdicts(
    seen: &[Observation],
    mail: &MailEvidence,
    target: &str,
    source: &str,
    switched_at: Option<f64>,
    now: f64,
) -> Vec<Verdict> {
    match mail {
        MailEvidence::Unconfigured => Vec::new(),
        MailEvidence::OneShot => {
            let runs: Vec<&Observation> = seen.iter().filter(|o| o.kind == Kind::Mailflow).collect();
            let failed: Vec<String> = runs
                .iter()
                .filter(|o| o.ok == Some(false))
                .map(|o| format!("{} via {} ({})", o.check, o.env, o.reason.unwrap_or("?")))
                .collect();
            let flowing = if runs.is_empty() {
                (Answer::Unknown, "no mailflow check selected".to_string())
            } else if failed.is_empty() {
                (Answer::Yes, format!("all {} probe mails arrived", runs.len()))
            } else {
                (Answer::No, format!("not arrived: {}", failed.join(", ")))
            };
            vec![
                Verdict {
                    question: "Is mail flowing?".into(),
                    answer: flowing.0,
                    detail: flowing.1,
                },
                Verdict {
                    question: format!("Is nothing landing in {source}?"),
                    answer: Answer::Unknown,
                    detail: "`check` sees that a probe mail arrived, not where: the daemon's status page tells".into(),
                },
            ]
        }
        MailEvidence::Ledger {
            last_delivered,
            fresh_within,
        } => {
            let flowing = match last_delivered.get(target) {
                None => (Answer::No, format!("no probe mail has arrived in {target} yet")),
                Some(at) if now - at <= *fresh_within => (
                    Answer::Yes,
                    format!("last probe mail arrived in {target} {} ago", ago(now - at)),
                ),
                Some(at) => (
                    Answer::No,
                    format!(
                        "last probe mail arrived in {target} {} ago (flowing means within {})",
                        ago(now - at),
                        ago(*fresh_within)
                    ),
                ),
            };
            let landing = match (last_delivered.get(source), switched_at) {
                (Some(at), Some(switch)) if *at >= switch => (
                    Answer::No,
                    format!(
                        "a probe mail arrived in {source} {} ago, after the switch ({})",
                        ago(now - at),
                        timestamp(switch)
                    ),
                ),
                (_, Some(switch)) => (
                    Answer::Yes,
                    format!(
                        "no probe mail arrived in {source} since the switch ({})",
                        timestamp(switch)
                    ),
                ),
                (_, None) => (Answer::Unknown, "the switch time is not known".to_string()),
            };
            vec![
                Verdict {
                    question: format!("Is mail flowing into {target}?"),
                    answer: flowing.0,
                    detail: flowing.1,
                },
                Verdict {
                    question: format!("Is nothing landing in {source}?"),
                    answer: landing.0,
                    detail: landing.1,
                },
            ]
        }
    }
}

/// A short age for people: `42s`, `12m`, `3h5m`.
fn ago(seconds: f64) -> String {
    let secs = seconds.max(0.0).round() as u64;
    humantime::format_duration(Duration::from_secs(if secs >= 3600 { secs / 60 * 60 } else { secs })).to_string()
}

#[cfg(test)]
mod assess_tests {
    use super::*;
    use std::path::Path;

    const T_PREP: f64 = 1_749_888_000.0; // 2025-06-14T08:00:00Z
    const T_SWITCH: f64 = 1_749_942_000.0; // 2025-06-14T23:00:00Z

    /// The test night: preparation from 08:00Z, window 20:00Z-23:00Z, switched after.
    fn night() -> Migration {
        crate::probe::parse(
            Path::new("c.yaml"),
            "environments:\n  old: {addresses: [127.0.0.10]}\n  new: {addresses: [127.0.0.20]}\n  live: {resolver: system}\nchecks: []\nmigration:\n  phases:\n    - {name: preparation, start: 2025-06-14T08:00:00Z}\n    - {name: window, start: 2025-06-14T22:00:00+02:00, end: 2025-06-15T01:00:00+02:00}\n    - {name: switched, start: 2025-06-15T01:00:00+02:00}\n",
        )
        .unwrap()
        .migration
    }

    fn obs(check: &str, env: &str, ok: Option<bool>, resolved: Option<&str>) -> Observation {
        Observation {
            check: check.into(),
            kind: Kind::Http,
            env: env.into(),
            address: "a".into(),
            is_env: true,
            live: env == "live",
            ok,
            reason: (ok == Some(false)).then_some("refused"),
            resolved_env: resolved.map(str::to_string),
            judges: Vec::new(),
        }
    }

    #[test]
    fn before_the_window_new_must_be_ready_after_the_switch_live_must_be_new() {
        let m = night();
        let seen = vec![
            obs("webmail", "old", Some(true), None),
            obs("webmail", "new", Some(false), None),
            obs("webmail", "live", Some(true), Some("old")),
        ];
        let prep = verdicts(&m, &m.current(None, T_PREP), &seen, &MailEvidence::Unconfigured, T_PREP);
        assert_eq!(prep.len(), 1);
        assert_eq!(
            (prep[0].question.as_str(), prep[0].answer),
            ("Is new ready?", Answer::No)
        );
        assert!(prep[0].detail.contains("webmail a (refused)"), "{}", prep[0].detail);
        let mail = MailEvidence::Ledger {
            last_delivered: BTreeMap::from([("new".into(), T_SWITCH + 50.0), ("old".into(), T_SWITCH + 10.0)]),
            fresh_within: 180.0,
        };
        let after = verdicts(&m, &m.current(None, T_SWITCH + 60.0), &seen, &mail, T_SWITCH + 60.0);
        let answers: Vec<(&str, Answer)> = after.iter().map(|v| (v.question.as_str(), v.answer)).collect();
        assert_eq!(
            answers,
            [
                ("Is live = new?", Answer::No),
                ("Is new serving?", Answer::No),
                ("Is mail flowing into new?", Answer::Yes),
                ("Is nothing landing in old?", Answer::No),
            ]
        );
        assert!(
            verdicts(
                &Migration::default(),
                &Migration::default().current(None, 0.0),
                &seen,
                &mail,
                0.0
            )
            .is_empty()
        );
    }
}

#[cfg(test)]
mod domain_output_tests {
    use super::*;
    use crate::probe::hosted_domains::{DomainRow, Finding};

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        let row = DomainRow {
            domain: "a.test".into(),
            findings: vec![Finding::SpfOldIpLiteral, Finding::SpfFailsNew],
            records: vec!["TXT \"v=spf1 ip4:192.0.2.10 -all\"".into()],
            fixes: vec!["=HYPERLINK(\"x\")".into(), "b, c".into()],
        };
        let csv = domains_csv(&[DomainLine { check: "c", row: &row }]);
        assert_eq!(
            csv,
            "check,domain,findings,records,fixes\r\nc,a.test,spf_old_ip_literal spf_fails_new,\"TXT \"\"v=spf1 ip4:192.0.2.10 -all\"\"\",\"'=HYPERLINK(\"\"x\"\") | b, c\"\r\n"
        );
    }
}
