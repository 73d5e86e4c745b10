//! The `dns` check against the lab's real DNS servers: nsd on 127.0.0.30
//! (authoritative, switches at once) and unbound on 127.0.0.31 (a caching
//! resolver that lags by the TTL). What each resolver answers, the cutover
//! ratio and the propagation deadline, the failure states, the TCP retry, and
//! the DNS table of the `check` command.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{Daemon, check_cmd, lab, lab_script};
use serde_json::Value;

const SECS: Duration = Duration::from_secs(1);

/// Sets the lab's DNS to `state` with unbound's cache flushed, and back to
/// `old` (flushed) when dropped, even when the test panics.
struct DnsState;

impl DnsState {
    fn set(state: &str) -> DnsState {
        lab();
        let guard = DnsState;
        lab_script(&["dns", "set", state]);
        lab_script(&["dns", "flush"]);
        guard
    }
}

impl Drop for DnsState {
    fn drop(&mut self) {
        lab_script(&["dns", "set", "old"]);
        lab_script(&["dns", "flush"]);
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn state<'a>(record: &'a str, resolver: &'a str, state: &'a str) -> [(&'a str, &'a str); 3] {
    [("record", record), ("resolver", resolver), ("state", state)]
}

/// The DNS rows of `check --format json`, as (resolver, record, state, row).
fn dns_rows(json: &str) -> Vec<(String, String, String, Value)> {
    let rows: Vec<Value> = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let mut out = Vec::new();
    for row in rows {
        for d in row["dns"].as_array().cloned().unwrap_or_default() {
            out.push((
                row["env"].as_str().unwrap().to_string(),
                d["record"].as_str().unwrap().to_string(),
                d["state"].as_str().unwrap().to_string(),
                d,
            ));
        }
    }
    out
}

const SWITCH: &str = r#"
defaults: {interval: 1s, timeout: 800ms}
environments:
  old: {addresses: [127.0.0.10]}
  new: {addresses: [127.0.0.20]}
checks:
  - name: dns
    kind: dns
    resolvers: {authoritative: 127.0.0.30, lagging: 127.0.0.31}
    records:
      - {name: imap.example.test, type: A, expect_env_addresses: true}
"#;

#[test]
fn the_lagging_resolver_answers_old_until_its_ttl_runs_out_and_the_ratio_follows() {
    let _dns = DnsState::set("old");
    let d = Daemon::start(SWITCH);
    let imap = "imap.example.test";
    let ratio = [("check", "dns"), ("record", imap), ("type", "A")];
    for resolver in ["authoritative", "lagging"] {
        d.wait_for(
            "cutover_dns_answer_state",
            &state(imap, resolver, "old"),
            |v| v == 1.0,
            5 * SECS,
        );
    }
    d.wait_for("cutover_dns_cutover_ratio", &ratio, |v| v == 0.0, 5 * SECS);
    let s = d.scrape();
    // A stateset: every state present, exactly one of them 1.
    let states = s.series("cutover_dns_answer_state");
    let lagging: Vec<_> = states
        .iter()
        .filter(|(l, _)| l.iter().any(|(k, v)| k == "resolver" && v == "lagging"))
        .collect();
    assert_eq!(lagging.len(), 9, "{}", s.matching("cutover_dns_answer_state"));
    assert_eq!(lagging.iter().map(|(_, v)| v).sum::<f64>(), 1.0);

    lab_script(&["dns", "set", "new"]);
    d.wait_for(
        "cutover_dns_answer_state",
        &state(imap, "authoritative", "new"),
        |v| v == 1.0,
        5 * SECS,
    );
    d.wait_for("cutover_dns_cutover_ratio", &ratio, |v| v == 0.5, 5 * SECS);
    let s = d.scrape();
    assert_eq!(
        s.get("cutover_dns_answer_state", &state(imap, "lagging", "old")),
        Some(1.0)
    );
    // The deadline is the lagging resolver's last-seen time plus the TTL it gave.
    let ttl = s
        .get(
            "cutover_dns_answer_ttl_seconds",
            &[("record", imap), ("resolver", "lagging")],
        )
        .unwrap();
    let seen = s
        .get(
            "cutover_probe_last_run_timestamp_seconds",
            &[("check", "dns"), ("env", "lagging")],
        )
        .unwrap();
    let deadline = s
        .get("cutover_dns_propagation_deadline_timestamp_seconds", &ratio)
        .unwrap();
    assert!(ttl > 200.0 && ttl <= 300.0, "unbound's remaining TTL {ttl}");
    assert!(
        (deadline - (seen + ttl)).abs() < 2.0,
        "deadline {deadline}, last seen {seen} + TTL {ttl} = {}",
        seen + ttl
    );
    assert!(deadline > now() + 200.0);

    let flushed_at = now();
    lab_script(&["dns", "flush"]);
    d.wait_for("cutover_dns_cutover_ratio", &ratio, |v| v == 1.0, 5 * SECS);
    let s = d.scrape();
    assert_eq!(
        s.get("cutover_dns_answer_state", &state(imap, "lagging", "new")),
        Some(1.0)
    );
    // Nobody serves old any more: the deadline is when the last one switched.
    let switched = s
        .get("cutover_dns_propagation_deadline_timestamp_seconds", &ratio)
        .unwrap();
    assert!(switched >= flushed_at && switched <= now(), "switched at {switched}");
    for resolver in ["authoritative", "lagging"] {
        let labels = [("record", imap), ("resolver", resolver)];
        assert_eq!(
            s.get("cutover_dns_answer_changes_total", &labels),
            Some(1.0),
            "{resolver}"
        );
        let took = s.get("cutover_dns_query_duration_seconds", &labels).unwrap();
        assert!(took > 0.0 && took < 0.5, "{resolver} took {took}");
        assert_eq!(
            s.get("cutover_probe_success", &[("check", "dns"), ("env", resolver)]),
            Some(1.0)
        );
    }
}

#[test]
fn mixed_and_unexpected_answers_and_the_check_table() {
    let _dns = DnsState::set("mixed");
    let yaml = r#"
defaults: {interval: 10s, timeout: 2s}
environments:
  old: {addresses: [127.0.0.10]}
  new: {addresses: [127.0.0.20]}
checks:
  - name: dns
    kind: dns
    resolvers: {authoritative: 127.0.0.30, lagging: 127.0.0.31}
    records:
      - {name: imap.example.test, type: A, expect_env_addresses: true}
      - {name: webmail.example.test, type: A, old: [127.0.0.10], new: [127.0.0.99]}
      - {name: example.test, type: MX, old: ["10 mx-old.example.test"], new: ["10 MX.example.test."]}
"#;
    let (code, out, err) = check_cmd(yaml, &["--format", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let rows = dns_rows(&out);
    assert_eq!(rows.len(), 6, "{out}");
    for (resolver, record, state, row) in &rows {
        let want = match record.as_str() {
            "imap.example.test" => "mixed",
            "webmail.example.test" => "other",
            _ => "new",
        };
        assert_eq!(state, want, "{resolver} {record}: {row}");
        assert!(row["ttl_seconds"].as_u64().is_some_and(|t| t > 0 && t <= 300), "{row}");
    }

    // The go/no-go table shows record x resolver -> state and TTL.
    let (code, out, err) = check_cmd(yaml, &[]);
    assert_eq!(code, 0, "{out}{err}");
    for resolver in ["authoritative", "lagging"] {
        let line = out
            .lines()
            .find(|l| l.starts_with("dns/imap.example.test") && l.contains(resolver))
            .unwrap_or_else(|| panic!("no DNS line for {resolver}:\n{out}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[..4], ["dns/imap.example.test", "A", resolver, "mixed"], "{line}");
        assert!(
            cells[4].ends_with('s') && cells[4].trim_end_matches('s').parse::<u32>().is_ok(),
            "{line}"
        );
    }
    assert!(
        out.contains("dns/imap.example.test A: 0 of 2 resolvers answer new; old answers cached until "),
        "{out}"
    );
    assert!(
        out.contains("dns/example.test MX: 2 of 2 resolvers answer new\n"),
        "{out}"
    );
}

#[test]
fn nxdomain_servfail_refused_and_a_silent_resolver_each_get_their_own_state() {
    lab();
    // A resolver that never answers. The check's port (53) is shared by its
    // resolvers, so it gets its own loopback address.
    let _silent = UdpSocket::bind("127.0.0.39:53").expect("bind 127.0.0.39:53 (the lab runs as root)");
    let yaml = r#"
defaults: {interval: 2s, timeout: 1s}
environments:
  old: {addresses: [127.0.0.10]}
  new: {addresses: [127.0.0.20]}
checks:
  - name: faults
    kind: dns
    resolvers: {authoritative: 127.0.0.30, silent: 127.0.0.39}
    records:
      - {name: nope.example.test, type: A, expect_env_addresses: true}
      - {name: www.servfail.test, type: A, expect_env_addresses: true}
      - {name: www.example.org, type: A, expect_env_addresses: true}
"#;
    let d = Daemon::start(yaml);
    let cases = [
        ("nope.example.test", "nxdomain"),
        ("www.servfail.test", "servfail"),
        ("www.example.org", "refused"),
    ];
    for (record, want) in cases {
        d.wait_for(
            "cutover_dns_answer_state",
            &state(record, "authoritative", want),
            |v| v == 1.0,
            5 * SECS,
        );
        d.wait_for(
            "cutover_dns_answer_state",
            &state(record, "silent", "timeout"),
            |v| v == 1.0,
            5 * SECS,
        );
    }
    let s = d.scrape();
    let auth = [("check", "faults"), ("env", "authoritative")];
    let silent = [("check", "faults"), ("env", "silent")];
    // SERVFAIL and REFUSED mean the resolver is failing; NXDOMAIN is an answer.
    assert_eq!(s.get("cutover_probe_success", &auth), Some(0.0));
    assert!(
        s.get("cutover_probe_failures_total", &[auth[0], auth[1], ("reason", "dns")])
            .unwrap()
            >= 1.0
    );
    assert_eq!(s.get("cutover_probe_success", &silent), Some(0.0));
    assert!(
        s.get(
            "cutover_probe_failures_total",
            &[silent[0], silent[1], ("reason", "timeout")]
        )
        .unwrap()
            >= 1.0
    );
    // NXDOMAIN carries the zone's negative-caching TTL; failures have none.
    let ttl = |record| {
        s.get(
            "cutover_dns_answer_ttl_seconds",
            &[("record", record), ("resolver", "authoritative")],
        )
    };
    assert_eq!(ttl("nope.example.test"), Some(300.0));
    assert_eq!(ttl("www.servfail.test"), None);
    // The silent resolver does not delay the others: their own run ends at once.
    for (record, _) in cases {
        let took = |resolver| {
            s.get(
                "cutover_dns_query_duration_seconds",
                &[("record", record), ("resolver", resolver)],
            )
            .unwrap()
        };
        assert!(took("authoritative") < 0.2, "{record}: {}", took("authoritative"));
        assert!(took("silent") >= 0.8, "{record}: {}", took("silent"));
    }
    let run_seconds = |labels: &[(&str, &str)]| {
        s.get("cutover_probe_duration_seconds_sum", labels).unwrap()
            / s.get("cutover_probe_duration_seconds_count", labels).unwrap()
    };
    assert!(run_seconds(&auth) < 0.2, "{}", run_seconds(&auth));
    assert!(run_seconds(&silent) >= 0.8, "{}", run_seconds(&silent));
}

#[test]
fn a_truncated_udp_answer_is_retried_over_tcp() {
    // `dns set` rewrites the zone, which has a TXT set too large for 512 bytes.
    let _dns = DnsState::set("old");
    let chunks: Vec<String> = (1..=12)
        .map(|i| format!("\"chunk-{i:02}-abcdefghijklmnopqrstuvwxyz-0123456789-abcdefghijklmnopqrstuvwxyz\""))
        .collect();
    let yaml = format!(
        r#"
defaults: {{interval: 10s, timeout: 2s}}
environments:
  old: {{addresses: [127.0.0.10]}}
checks:
  - name: big
    kind: dns
    resolvers: {{authoritative: 127.0.0.30, lagging: 127.0.0.31}}
    records:
      - {{name: big.example.test, type: TXT, old: [{}], new: ["v=moved"]}}
"#,
        chunks.join(", ")
    );
    let (code, out, err) = check_cmd(&yaml, &["--format", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let rows = dns_rows(&out);
    assert_eq!(rows.len(), 2, "{out}");
    for (resolver, _, state, row) in rows {
        assert_eq!(state, "old", "{resolver}: {row}");
        assert_eq!(row["tcp"], Value::Bool(true), "{resolver}: {row}");
    }
}
