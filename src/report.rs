//! The `check` command's output: a table for people at 3 a.m., JSON for
//! scripts, and Nagios-style exit codes for the go/no-go decision.

use std::fmt::Write;

use serde::Serialize;

use crate::metrics::Extra;
use crate::probe::Outcome;
use crate::scheduler::InstanceSpec;

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
    pub kind: &'static str,
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
}

/// The `dns` answers among a run's extras, one per record (also the status page's DNS table).
pub fn dns_rows(extras: &[Extra]) -> Vec<DnsRow> {
    extras
        .iter()
        .filter_map(|e| match e {
            Extra::DnsAnswer {
                record,
                rtype,
                state,
                ttl,
                seconds,
                tcp,
                ..
            } => Some(DnsRow {
                record: record.clone(),
                rtype,
                state: state.as_str(),
                ttl_seconds: *ttl,
                query_seconds: *seconds,
                tcp: *tcp,
                propagation_deadline: extras.iter().find_map(|s| match s {
                    Extra::DnsSummary {
                        record: r,
                        rtype: t,
                        deadline,
                        ..
                    } if r == record && t == rtype => *deadline,
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
                dns: dns_rows(&o.extras),
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
pub fn go_no_go(current: &crate::migration::Current, verdicts: &[crate::migration::Verdict]) -> String {
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

fn timestamp(unix: f64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(unix.max(0.0));
    humantime::format_rfc3339_seconds(at).to_string()
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
