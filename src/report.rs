//! The `check` command's output: a table for people at 3 a.m., JSON for
//! scripts, and Nagios-style exit codes for the go/no-go decision.

use std::fmt::Write;

use serde::Serialize;

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
    let failed = rows.iter().filter(|r| !r.success).count();
    let _ = writeln!(
        out,
        "{} of {} instances OK, {failed} failing",
        rows.len() - failed,
        rows.len()
    );
    out
}
