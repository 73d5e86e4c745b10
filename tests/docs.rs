//! The README documents what the code declares: every metric, every failure
//! reason, and the two commands it opens with.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cutover_monitor::metrics::{CATALOG, INSTANCE_LABELS};
use cutover_monitor::probe::FailureReason;
use regex::Regex;

fn readme() -> String {
    std::fs::read_to_string(common::root().join("README.md")).unwrap()
}

#[test]
fn every_metric_is_in_the_readme_reference() {
    let readme = readme();
    for (name, help) in CATALOG {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "README lacks a row for {name}"
        );
        assert!(!help.is_empty() && name.starts_with("cutover_"), "{name}");
    }
}

/// The README's metrics table: name -> (type, label names). "extra labels"
/// empty or a list means the instance labels plus those; `only ...` exactly
/// those; `none` no labels.
fn readme_metrics() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let readme = readme();
    let section = readme
        .split("\n## Metrics reference\n")
        .nth(1)
        .expect("README has \"## Metrics reference\"")
        .split("\n## ")
        .next()
        .unwrap();
    let ticked = Regex::new(r"`([a-z0-9_]+)`").unwrap();
    let mut out = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_string();
        let labels_cell = cells[3];
        let mut labels: BTreeSet<String> = ticked.captures_iter(labels_cell).map(|c| c[1].to_string()).collect();
        if labels_cell.is_empty() || !(labels_cell.starts_with("only ") || labels_cell == "none") {
            labels.extend(INSTANCE_LABELS.iter().map(|l| l.to_string()));
        }
        assert!(
            out.insert(name.clone(), (cells[2].to_string(), labels)).is_none(),
            "README lists {name} twice"
        );
    }
    out
}

/// Families that only appear with their first event (the ledger creates
/// them lazily), so a healthy lab never exposes them; each must still be
/// declared.
const LAZY: &[&str] = &[
    "cutover_mail_late_total",
    "cutover_mail_lost_total",
    "cutover_mail_recovered_total",
    "cutover_mail_duplicates_total",
    "cutover_mail_send_failures_total",
    // checks/lab.yaml has no mailbox_parity check: its accounts come from
    // `tests/lab/parity generate` (tests/mailbox_parity.rs reads these).
    "cutover_mailbox_parity_accounts",
    "cutover_mailbox_parity_audited",
    "cutover_mailbox_parity_skipped_lines",
    "cutover_mailbox_parity_messages_missing",
    "cutover_mailbox_parity_audit_duration_seconds",
    "cutover_mailbox_parity_last_audit_timestamp_seconds",
];

#[test]
fn the_readme_metrics_table_matches_what_the_daemon_exposes_both_ways() {
    common::lab();
    let documented = readme_metrics();
    // checks/lab.yaml runs every kind; at a test's pace.
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(common::root().join("checks/lab.yaml")).unwrap()).unwrap();
    config["defaults"]["interval"] = "2s".into();
    config["defaults"]["timeout"] = "1500ms".into();
    for check in config["checks"].as_sequence_mut().unwrap() {
        if check["kind"] == "mailflow" {
            check["interval"] = "3s".into();
        }
    }
    let d = common::Daemon::start(&serde_yaml::to_string(&config).unwrap());
    // type and label names of every exposed family (histograms without `le`).
    let exposed = |scrape: &common::Scrape| -> BTreeMap<String, (String, BTreeSet<String>)> {
        let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
        for line in scrape.text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                out.insert(name.to_string(), (kind.to_string(), BTreeSet::new()));
            }
        }
        for (name, (kind, labels)) in out.iter_mut() {
            let series = if kind == "histogram" {
                scrape.series(&format!("{name}_count"))
            } else {
                scrape.series(name)
            };
            labels.extend(series.into_iter().flat_map(|(ls, _)| ls.into_iter().map(|(k, _)| k)));
        }
        out
    };
    let want: Vec<&String> = documented.keys().filter(|n| !LAZY.contains(&n.as_str())).collect();
    let scrape = d.wait_until(
        "every documented family but the lazy ones exposed",
        |s| {
            let e = exposed(s);
            want.iter().all(|n| e.contains_key(*n))
        },
        Duration::from_secs(60),
    );
    let exposed = exposed(&scrape);
    for (name, (kind, labels)) in &exposed {
        if name.starts_with("process_") {
            continue; // "Plus the standard process_* metrics"
        }
        let (doc_kind, doc_labels) = documented
            .get(name)
            .unwrap_or_else(|| panic!("{name} is exposed but has no README row"));
        assert_eq!(doc_kind, kind, "{name}: README type");
        assert_eq!(doc_labels, labels, "{name}: README labels");
    }
    for name in documented.keys() {
        assert!(
            CATALOG.iter().any(|(n, _)| n == name),
            "README row {name} is no declared metric"
        );
        assert!(
            exposed.contains_key(name) || LAZY.contains(&name.as_str()),
            "README row {name} is not exposed"
        );
    }
}

#[test]
fn every_failure_reason_is_in_the_readme() {
    let readme = readme();
    for reason in FailureReason::ALL {
        assert!(
            readme.contains(&format!("| `{reason}` |")),
            "README lacks reason {reason}"
        );
    }
}

#[test]
fn the_readme_opens_with_the_run_and_test_commands() {
    let readme = readme();
    let blocks: Vec<&str> = readme
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap().trim())
        .collect();
    assert_eq!(
        blocks[0],
        "tests/lab/up && cargo run -- run --config.file checks/lab.yaml"
    );
    assert_eq!(blocks[1], "tests/run");
    let ci = std::fs::read_to_string(common::root().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == "tests/run"),
        ".ci/run must run the README's test command"
    );
}

#[test]
fn the_schema_command_prints_a_json_schema_of_the_check_file() {
    let (code, out, err) = common::decode(common::bin().arg("schema").output().unwrap());
    assert_eq!(code, 0, "{err}");
    let schema: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(schema["type"], "object", "{out}");
    for section in ["defaults", "environments", "credentials", "checks"] {
        assert!(schema["properties"][section].is_object(), "schema lacks {section}");
    }
    assert!(
        out.contains("\"http\"") && out.contains("\"tcp\""),
        "kinds in the schema: {out}"
    );
}

/// `cutover-monitor schema | head` (and `check` into a pager that quits):
/// the commands that print stop quietly when the reader is gone, killed by
/// SIGPIPE as Unix tools are, without a panic about a broken pipe.
#[test]
fn printing_into_a_closed_pipe_exits_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("checks.yaml");
    std::fs::write(
        &config,
        "environments:\n  old: {addresses: [127.0.0.1]}\nchecks:\n  - {name: closed, kind: tcp, host: localhost, port: 1}\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    for args in [
        vec!["schema"],
        vec!["check", "--config.file", config, "--format", "json"],
        vec!["check", "--config.file", config],
    ] {
        // The reader is closed before the command starts: its first write fails.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = common::bin()
            .args(&args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?} {stderr}",
            out.status
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
    }
}

/// A file-level error without a position names the file only, not `:0:0`.
#[test]
fn a_missing_check_file_is_reported_without_a_line_and_column() {
    let (code, out, err) = common::validate(std::path::Path::new("/nonexistent.yaml"), None);
    assert_ne!(code, 0);
    let text = format!("{out}{err}");
    assert!(text.contains("/nonexistent.yaml: cannot read"), "{text}");
    assert!(!text.contains(":0:0"), "{text}");
}
