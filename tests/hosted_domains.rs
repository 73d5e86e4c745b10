//! `kind: hosted_domains` against the lab's real nsd, which serves 2,000
//! generated customer domains with a known mix (tests/lab/customers): exact
//! counts per finding, rows and fixes, a fixed zone, a resolver that times out
//! for some domains, the rate limit as the server counts it, bad input.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, bin, decode, lab};

const SECS: Duration = Duration::from_secs(1);

/// The lab's provider facts; `{{DOMAINS}}` and `{{RESOLVERS}}` filled per test.
const AUDIT: &str = "environments:
  old: {addresses: [127.0.0.10]}
  new: {addresses: [127.0.0.20]}
checks:
  - name: customers
    kind: hosted_domains
    domains_file: {{DOMAINS}}
    resolvers: {{RESOLVERS}}
    mx_hosts: [mx.example.test]
    spf_include: spf.example.test
    rate_limit: {{RATE}}
    concurrency: 64
    query_timeout: 300ms
    retries: 1
";

fn audit_config(domains: &str, resolvers: &str, rate: u32) -> String {
    AUDIT
        .replace("{{DOMAINS}}", domains)
        .replace("{{RESOLVERS}}", resolvers)
        .replace("{{RATE}}", &rate.to_string())
}

/// Runs `tests/lab/customers ARGS` and returns its stdout.
fn customers(args: &[&str]) -> String {
    common::lab_script(&[&["customers"], args].concat())
}

/// A domains file with the first `n` generated customers (each category of
/// the generator occurs once per 100), in a directory that lives as long as
/// the returned guard.
fn first_customers(want: &BTreeMap<String, Vec<String>>, n: usize) -> (tempfile::TempDir, String, Vec<&String>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("domains.txt");
    let subset: Vec<&String> = want.keys().take(n).collect();
    std::fs::write(&file, subset.iter().map(|d| format!("{d}\n")).collect::<String>()).unwrap();
    let path = file.to_str().unwrap().to_string();
    (dir, path, subset)
}

/// Regenerates the lab's customers when dropped, so a domain a test fixed is
/// broken again for the next test, even when this one fails.
struct Regenerate;

impl Drop for Regenerate {
    fn drop(&mut self) {
        customers(&["generate", "--count", "2000"]);
    }
}

/// A fresh set of 2,000 customer domains in nsd; returns domain -> expected findings.
fn fresh_customers() -> BTreeMap<String, Vec<String>> {
    let lab = lab();
    customers(&["generate", "--count", "2000"]);
    expected(&lab)
}

fn expected(lab: &common::Lab) -> BTreeMap<String, Vec<String>> {
    let tsv = std::fs::read_to_string(format!("{}/customers/expected.tsv", lab.var("DIR"))).unwrap();
    tsv.lines()
        .skip(1) // the header
        .filter(|l| !l.is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            let mut findings: Vec<String> = cols[2].split(',').map(str::to_string).collect();
            findings.sort();
            (cols[0].to_string(), findings)
        })
        .collect()
}

fn domains_file(lab: &common::Lab) -> String {
    format!("{}/customers/domains.txt", lab.var("DIR"))
}

/// Runs `cutover-monitor domains` with `args`; returns (code, stdout, stderr).
fn domains_cmd(yaml: &str, args: &[&str]) -> (i32, String, String) {
    let (_dir, path) = common::write_config(yaml);
    decode(
        bin()
            .arg("domains")
            .arg("--config.file")
            .arg(&path)
            .args(args)
            .output()
            .unwrap(),
    )
}

/// domain -> (sorted findings, the whole row) from `domains --format json`.
fn rows_by_domain(json: &str) -> HashMap<String, (Vec<String>, serde_json::Value)> {
    let rows: Vec<serde_json::Value> = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    rows.into_iter()
        .map(|row| {
            let mut findings: Vec<String> = row["findings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            findings.sort();
            (row["domain"].as_str().unwrap().to_string(), (findings, row))
        })
        .collect()
}

const ALL_FINDINGS: &str =
    "ok,mx_old_ip,mx_foreign,spf_old_ip_literal,spf_fails_new,spf_permerror,autoconfig_old_ip,dns_error,nxdomain";

#[test]
fn the_audit_of_2000_lab_domains_finds_exactly_the_generated_mix() {
    let lab = lab();
    let want = fresh_customers();
    assert_eq!(want.len(), 2000);
    let yaml = audit_config(&domains_file(&lab), "{authoritative: 127.0.0.30}", 4000);
    let (code, out, err) = domains_cmd(&yaml, &["--format", "json", "--finding", ALL_FINDINGS]);
    assert_eq!(code, 0, "{err}");
    let got = rows_by_domain(&out);
    assert_eq!(got.len(), 2000, "{err}");
    let wrong: Vec<String> = want
        .iter()
        .filter(|(d, f)| got.get(*d).map(|g| &g.0) != Some(f))
        .take(10)
        .map(|(d, f)| format!("{d}: expected {f:?}, got {:?}", got.get(d).map(|g| &g.0)))
        .collect();
    assert!(wrong.is_empty(), "domains classified wrongly:\n{}", wrong.join("\n"));

    // The exact count per finding for 2,000 domains (20 x the generator's slots).
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (findings, _) in got.values() {
        for f in findings {
            *counts.entry(f.as_str()).or_default() += 1;
        }
    }
    let expected_counts = BTreeMap::from([
        ("ok", 980),
        ("spf_old_ip_literal", 340),
        ("spf_fails_new", 340),
        ("mx_old_ip", 200),
        ("mx_foreign", 100),
        ("spf_permerror", 120),
        ("autoconfig_old_ip", 140),
        ("nxdomain", 60),
        ("dns_error", 40),
    ]);
    assert_eq!(counts, expected_counts);
    // The summary on stderr says the same.
    assert!(
        err.contains("customers: 2000 domains audited in") && err.contains("ok 980, mx_old_ip 200, mx_foreign 100, spf_old_ip_literal 340, spf_fails_new 340, spf_permerror 120, autoconfig_old_ip 140, dns_error 40, nxdomain 60"),
        "{err}"
    );

    // Spot checks: the offending record and the suggested fix.
    let row = |d: &str| got[d].1.clone();
    let text = |v: &serde_json::Value| v.to_string();
    // c00048: SPF with the old address only.
    let r = row("c00048.customers.test");
    assert_eq!(r["records"][0], "TXT \"v=spf1 ip4:127.0.0.10 -all\"", "{r}");
    assert!(
        text(&r["fixes"]).contains("replace ip4:127.0.0.10 with include:spf.example.test in the SPF record"),
        "{r}"
    );
    // c00058: old literal next to the provider's include.
    let r = row("c00058.customers.test");
    assert_eq!(
        r["fixes"][0],
        "remove ip4:127.0.0.10 from the SPF record (include:spf.example.test already authorizes the new servers)"
    );
    // c00063: `-all` without the new addresses.
    let r = row("c00063.customers.test");
    assert!(
        text(&r["fixes"]).contains(
            "add include:spf.example.test to the SPF record, before its `all` (the new server 127.0.0.20 gets fail)"
        ),
        "{r}"
    );
    // c00068: its own MX host at the old address.
    let r = row("c00068.customers.test");
    assert_eq!(r["records"][0], "MX 10 mx.c00068.customers.test. -> A 127.0.0.10 (old)");
    assert!(text(&r["fixes"]).contains("point the MX at mx.example.test."), "{r}");
    // c00076: mail goes elsewhere.
    assert_eq!(row("c00076.customers.test")["records"][0], "MX 10 mx.elsewhere.test.");
    // c00081: two SPF records; c00084: more than 10 lookups (the crate's limit).
    assert!(text(&row("c00081.customers.test")["fixes"]).contains("merge the 2 `v=spf1` TXT records into one"));
    assert!(text(&row("c00084.customers.test")["fixes"]).contains("more than 10 DNS lookups"));
    // c00087: autoconfig A at the old address; c00090: an SRV target at it.
    assert_eq!(
        row("c00087.customers.test")["records"][0],
        "autoconfig.c00087.customers.test. A 127.0.0.10 (old)"
    );
    assert!(
        text(&row("c00090.customers.test")["records"]).contains("_imaps._tcp.c00090.customers.test. SRV 0 1 993"),
        "{}",
        row("c00090.customers.test")
    );
    // c00092: NXDOMAIN; c00095: the zone SERVFAILs.
    assert!(text(&row("c00092.customers.test")["records"]).contains("NXDOMAIN"));
    assert!(text(&row("c00095.customers.test")["records"]).contains("answered SERVFAIL"));
    // c00097 has everything on old, and DMARC p=reject: its mail would bounce.
    let r = row("c00097.customers.test");
    assert!(
        text(&r["records"]).contains("_dmarc.c00097.customers.test. TXT \\\"v=DMARC1; p=reject\\\""),
        "{r}"
    );
    assert!(
        text(&r["fixes"]).contains("urgent: the DMARC policy asks receivers to reject"),
        "{r}"
    );
    // c00048 fails SPF too, but has no DMARC policy: nothing urgent.
    assert!(!text(&row("c00048.customers.test")["fixes"]).contains("urgent"));
    // Fine domains carry nothing.
    let r = row("c00001.customers.test");
    assert_eq!(
        (
            r["records"].as_array().unwrap().len(),
            r["fixes"].as_array().unwrap().len()
        ),
        (0, 0)
    );
}

#[test]
fn the_daemon_publishes_counts_rows_and_logs_each_fix_once() {
    let want = fresh_customers();
    // The first 200 domains: every category, ten times.
    let (_dir, file, _subset) = first_customers(&want, 200);
    let yaml = audit_config(&file, "{authoritative: 127.0.0.30}", 2000) + "    interval: 4s\n    timeout: 3s\n";
    let d = Daemon::start(&yaml);
    d.wait_for(
        "cutover_hosted_domains_audited",
        &[("check", "customers")],
        |v| v == 200.0,
        20 * SECS,
    );
    let scrape = d.scrape();
    let count = |f: &str| scrape.get("cutover_hosted_domains", &[("check", "customers"), ("finding", f)]);
    assert_eq!(count("ok"), Some(98.0));
    assert_eq!(count("spf_old_ip_literal"), Some(34.0));
    assert_eq!(count("dns_error"), Some(4.0));
    assert_eq!(count("nxdomain"), Some(6.0));
    // Low cardinality: no series names a domain.
    assert!(!scrape.text.contains("customers.test"), "a domain leaked into /metrics");
    assert!(scrape.sum("cutover_hosted_domains_queries_total", &[("resolver", "authoritative")]) > 200.0);

    // The rows, filtered.
    let (code, body) = d.http("GET", "/api/v1/domains?finding=spf_old_ip_literal").unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rows = v["audits"][0]["domains"].as_array().unwrap();
    assert_eq!(rows.len(), 34);
    assert!(
        rows.iter()
            .all(|r| r["findings"].to_string().contains("spf_old_ip_literal"))
    );
    assert_eq!(v["audits"][0]["counts"]["mx_old_ip"], 20);
    let (code, body) = d.http("GET", "/api/v1/domains?finding=spf").unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("unknown finding `spf`; one of ok, mx_old_ip"), "{body}");
    let (code, body) = d.http("GET", "/api/v1/domains?check=nope").unwrap();
    assert_eq!(
        (code, body.trim()),
        (404, "no hosted_domains check `nope`; configured: customers")
    );

    // A customer fixes their SPF: that domain alone moves to ok, logged once.
    let _regenerate = Regenerate;
    customers(&["fix", "c00048.customers.test"]);
    d.wait_for(
        "cutover_hosted_domains_changes_total",
        &[("check", "customers"), ("direction", "fixed")],
        |v| v == 1.0,
        20 * SECS,
    );
    let before = d
        .scrape()
        .get("cutover_probe_runs_total", &[("check", "customers")])
        .unwrap();
    // Two more audits: nothing else changes, nothing is logged again.
    d.wait_for(
        "cutover_probe_runs_total",
        &[("check", "customers")],
        |v| v >= before + 2.0,
        20 * SECS,
    );
    let scrape = d.scrape();
    assert_eq!(
        scrape.get("cutover_hosted_domains", &[("check", "customers"), ("finding", "ok")]),
        Some(99.0)
    );
    assert_eq!(
        scrape.sum("cutover_hosted_domains_changes_total", &[("check", "customers")]),
        1.0,
        "only the fixed domain changed"
    );
    let logs = d.logs();
    let fixed: Vec<&str> = logs.lines().filter(|l| l.contains("hosted domain fixed")).collect();
    assert_eq!(fixed.len(), 1, "{logs}");
    assert!(
        fixed[0].contains("c00048.customers.test") && fixed[0].contains("spf_old_ip_literal,spf_fails_new"),
        "{}",
        fixed[0]
    );
    let (_, body) = d.http("GET", "/api/v1/domains?finding=ok").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let changes = v["audits"][0]["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["domain"], "c00048.customers.test");
    assert_eq!(changes[0]["direction"], "fixed");

    // And back: regenerating the lab undoes the fix; logged once as regressed.
    customers(&["generate", "--count", "2000"]);
    d.wait_for(
        "cutover_hosted_domains_changes_total",
        &[("check", "customers"), ("direction", "regressed")],
        |v| v == 1.0,
        20 * SECS,
    );
    let logs = d.logs();
    assert_eq!(logs.matches("hosted domain regressed").count(), 1, "{logs}");
}

/// A DNS server on 127.0.0.32:53 (next to the lab's) that forwards to nsd but
/// drops every query for a name at or under one of `silent`, as a resolver
/// does whose upstream for those zones hangs; counts queries per (name, type).
struct FlakyResolver {
    asked: Arc<Mutex<HashMap<(String, u16), usize>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FlakyResolver {
    fn start(silent: &[&str]) -> FlakyResolver {
        let socket = UdpSocket::bind("127.0.0.32:53").expect("bind 127.0.0.32:53 (tests run as root)");
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let silent: Vec<String> = silent.iter().map(|s| s.to_string()).collect();
        let asked = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (counts, stopped) = (asked.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
            upstream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Some((name, qtype)) = question(&buf[..n]) else {
                    continue;
                };
                *counts.lock().unwrap().entry((name.clone(), qtype)).or_default() += 1;
                if silent.iter().any(|s| name == *s || name.ends_with(&format!(".{s}"))) {
                    continue;
                }
                upstream.send_to(&buf[..n], "127.0.0.30:53").unwrap();
                let mut reply = [0u8; 4096];
                if let Ok(m) = upstream.recv(&mut reply) {
                    let _ = socket.send_to(&reply[..m], peer);
                }
            }
        });
        FlakyResolver {
            asked,
            stop,
            thread: Some(thread),
        }
    }

    fn asked(&self, name: &str, qtype: u16) -> usize {
        self.asked
            .lock()
            .unwrap()
            .get(&(name.to_string(), qtype))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for FlakyResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Its socket is free once the thread is gone.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The question's name (lower case, no trailing dot) and type of a DNS query.
fn question(msg: &[u8]) -> Option<(String, u16)> {
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(msg.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    Some((labels.join("."), qtype))
}

#[test]
fn a_resolver_silent_for_some_domains_gives_dns_error_for_those_only() {
    let want = fresh_customers();
    let (_dir, file, subset) = first_customers(&want, 100);
    // c00001..c00003 are fine domains, c00068 has its MX at the old address.
    let silent = [
        "c00001.customers.test",
        "c00002.customers.test",
        "c00003.customers.test",
        "c00068.customers.test",
    ];
    let flaky = FlakyResolver::start(&silent);
    let yaml = audit_config(&file, "{flaky: 127.0.0.32}", 2000);
    let (code, out, err) = domains_cmd(&yaml, &["--format", "json", "--finding", ALL_FINDINGS]);
    assert_eq!(code, 0, "{err}");
    let got = rows_by_domain(&out);
    assert_eq!(got.len(), 100);
    for (domain, findings) in subset.iter().map(|d| (d.as_str(), &want[*d])) {
        let expected = if silent.contains(&domain) {
            vec!["dns_error".to_string()]
        } else {
            findings.clone()
        };
        assert_eq!(got[domain].0, expected, "{domain}: {}", got[domain].1);
    }
    let row = &got["c00001.customers.test"].1;
    assert!(
        row["records"][0]
            .as_str()
            .unwrap()
            .contains("no answer from flaky within 300ms"),
        "{row}"
    );
    // Each query for a silent name was tried twice (retries: 1), no more.
    assert_eq!(flaky.asked("c00001.customers.test", 15), 2, "MX");
    // What domains share is asked once per audit: the provider's include, its
    // HELO name; and each domain's own TXT once although both we and the SPF
    // evaluator read it.
    assert_eq!(flaky.asked("spf.example.test", 16), 1, "the provider's include");
    assert_eq!(flaky.asked("c00048.customers.test", 16), 1, "a domain's TXT");
    assert_eq!(flaky.asked("h1.lookups.test", 1), 1, "a host shared by SPF records");
    drop(flaky);

    // With a second resolver, a failed query is retried there: nothing is an error.
    let flaky = FlakyResolver::start(&silent);
    let yaml = audit_config(&file, "{a-flaky: 127.0.0.32, b-nsd: 127.0.0.30}", 2000);
    let (code, out, err) = domains_cmd(&yaml, &["--format", "json", "--finding", ALL_FINDINGS]);
    assert_eq!(code, 0, "{err}");
    let got = rows_by_domain(&out);
    for domain in &subset {
        assert_eq!(&got[domain.as_str()].0, &want[*domain], "{domain}");
    }
    assert!(flaky.asked("c00001.customers.test", 15) <= 1);
    // Queries are spread over both: the flaky one got about half.
    let asked: usize = flaky.asked.lock().unwrap().values().sum();
    let total: u64 = err
        .split(" with ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        asked as f64 > 0.3 * total as f64 && (asked as f64) < 0.7 * total as f64,
        "{asked} of {total}"
    );
}

/// nsd's own count of the queries it received.
fn nsd_queries() -> u64 {
    customers(&["queries"]).trim().parse().expect("a query count")
}

#[test]
fn the_rate_limit_holds_as_the_server_counts_queries() {
    let want = fresh_customers();
    let (_dir, file, _subset) = first_customers(&want, 400);
    let rate = 400;
    let yaml = audit_config(&file, "{authoritative: 127.0.0.30}", rate);
    let (_cfg_dir, path) = common::write_config(&yaml);
    // nsd's counter, read between two clock readings: the read happened
    // somewhere in [from, to] (reading it spawns nsd-control, ~50 ms).
    let start = Instant::now();
    let sample = || {
        let from = start.elapsed();
        let count = nsd_queries();
        (from, start.elapsed(), count)
    };
    let first = sample();
    let before = first.2;
    let mut child = bin()
        .args(["domains", "--format", "json", "--config.file"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Sample every 250 ms while the audit runs.
    let mut samples = vec![first];
    while child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(250));
        samples.push(sample());
    }
    let out = child.wait_with_output().unwrap();
    let (code, _, err) = decode(out);
    assert_eq!(code, 0, "{err}");
    let total = nsd_queries() - before;
    let took = start.elapsed().as_secs_f64();
    // Our own count agrees with the server's.
    let ours: u64 = err
        .split(" with ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no query count in {err}"));
    assert_eq!(ours, total, "queries we counted vs queries nsd received");
    // The limiter is a token bucket of 10 ms worth of queries (4 at 400/s):
    // between any two readings the server can have seen at most rate x (the
    // longest the time between them can have been) + 4.
    let burst = (f64::from(rate) * 0.010).max(1.0);
    let mut busiest = 0.0f64;
    for (i, (from_i, _, q_i)) in samples.iter().enumerate() {
        for (_, to_j, q_j) in &samples[i + 1..] {
            let longest = (*to_j - *from_i).as_secs_f64();
            let allowed = f64::from(rate) * longest + burst;
            assert!(
                (q_j - q_i) as f64 <= allowed,
                "{} queries within at most {longest:.3} s: more than {rate}/s",
                q_j - q_i
            );
            if longest >= 1.0 {
                busiest = busiest.max((q_j - q_i) as f64 / longest);
            }
        }
    }
    eprintln!(
        "{total} queries in {took:.2} s = {:.0}/s (limit {rate}/s); busiest window of 1 s or more: {busiest:.0}/s",
        total as f64 / took
    );
    // And the audit does not dawdle either: at least 3/4 of the allowed rate
    // over the audit (process start and the last replies included).
    assert!(
        total as f64 / took >= 0.75 * f64::from(rate),
        "{total} queries in {took:.2} s"
    );
}

#[test]
fn bad_domains_files_get_clear_messages_and_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    // Unreadable: a directory, and a file that does not exist.
    for (path, message) in [
        (dir.path().to_str().unwrap().to_string(), "Is a directory"),
        (
            format!("{}/none.txt", dir.path().display()),
            "No such file or directory",
        ),
    ] {
        let yaml = audit_config(&path, "{authoritative: 127.0.0.30}", 100);
        let (_d, config) = common::write_config(&yaml);
        let (code, _, err) = common::validate(&config, None);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("checks.yaml:7:5: field `checks[0].domains_file`: cannot read") && err.contains(message),
            "{err}"
        );
    }

    // 100,000 lines: a few invalid names and duplicates among them, plus one
    // 40 MiB line without a newline at the end.
    let file = dir.path().join("big.txt");
    let mut text = String::from("# 100,000 customers\n");
    for i in 0..100_000 {
        match i % 10_000 {
            1 => text.push_str("not a domain\n"),
            2 => text.push_str("c0000001.customers.test\n"),
            3 => text.push_str("bad_label.customers.test\n"),
            _ => text.push_str(&format!("c{i:07}.customers.test\n")),
        }
    }
    text.push_str(&"x".repeat(40 << 20));
    std::fs::write(&file, text).unwrap();
    let yaml = audit_config(file.to_str().unwrap(), "{authoritative: 127.0.0.30}", 100);
    let (_d, config) = common::write_config(&yaml);
    let (code, out, err) = common::validate(&config, None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("OK, 1 checks"), "{out}");
    // The audit's own summary names the skipped lines with file:line.
    let probe = {
        let config = cutover_monitor::probe::load(&config).unwrap();
        match &config.checks[0].check.kind {
            cutover_monitor::config::KindSpec::HostedDomains(spec) => {
                cutover_monitor::probe::hosted_domains::read_domains(&spec.domains_path).unwrap()
            }
            _ => unreachable!(),
        }
    };
    let (domains, input) = probe;
    // 100,000 names, of which 10 invalid, 10 a repeat (the first is kept), 10
    // with an underscore; plus the comment and the long line.
    assert_eq!(domains.len(), 99_971);
    assert_eq!((input.lines, input.invalid, input.duplicates), (100_002, 21, 9));
    assert!(
        input.problems[0].ends_with("big.txt:3: `not a domain` is not one domain (one per line)"),
        "{:?}",
        input.problems
    );
    assert!(input.problems.len() == 20, "only the first problems are kept");
    // Bounded memory: reading the 40 MiB line whole would show in the peak.
    let rss = peak_rss_kib(&config);
    let small = dir.path().join("small.txt");
    std::fs::write(&small, "one.customers.test\n").unwrap();
    let (_d2, baseline_config) = common::write_config(&audit_config(
        small.to_str().unwrap(),
        "{authoritative: 127.0.0.30}",
        100,
    ));
    let baseline = peak_rss_kib(&baseline_config);
    eprintln!("validate: peak RSS {rss} KiB with 100,000 lines, {baseline} KiB with one");
    // ~100 bytes per domain (the name twice: the list and the duplicate check).
    assert!(rss - baseline < 20 * 1024, "peak RSS {rss} KiB vs {baseline} KiB");
}

/// Peak RSS of `validate` on `config`, from the kernel's accounting.
fn peak_rss_kib(config: &std::path::Path) -> u64 {
    let mut child = bin()
        .args(["validate", "--config.file"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0;
    // VmHWM while it runs; the last reading before exit is the peak.
    while child.try_wait().unwrap().is_none() {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kib) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
            {
                peak = peak.max(kib);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(peak > 0, "could not read the peak RSS of validate");
    peak
}

#[test]
fn a_restart_serves_the_last_audit_at_once_and_logs_what_changed_meanwhile() {
    let want = fresh_customers();
    let (dir, file, _subset) = first_customers(&want, 100);
    let storage = dir.path().join("data");
    let args = ["--storage.path", storage.to_str().unwrap()];
    // Hourly: the first audit runs at start, the next not within this test.
    let hourly = audit_config(&file, "{authoritative: 127.0.0.30}", 2000);
    let first = Daemon::start_with(&hourly, &args);
    first.wait_for(
        "cutover_hosted_domains_audited",
        &[("check", "customers")],
        |v| v == 100.0,
        20 * SECS,
    );
    let kept = storage.join("hosted-domains/customers.json");
    let deadline = Instant::now() + 5 * SECS;
    while !kept.exists() {
        assert!(
            Instant::now() < deadline,
            "the audit was not kept at {}",
            kept.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(first);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777, 0o600);

    // A customer fixes their SPF while the daemon is down.
    let _regenerate = Regenerate;
    customers(&["fix", "c00048.customers.test"]);

    // Restarted: the last audit is served at once, without auditing again.
    let second = Daemon::start_with(&hourly, &args);
    let scrape = second.scrape();
    assert_eq!(
        scrape.get(
            "cutover_hosted_domains",
            &[("check", "customers"), ("finding", "spf_old_ip_literal")]
        ),
        Some(17.0),
        "{}",
        second.logs()
    );
    assert_eq!(scrape.get("cutover_probe_runs_total", &[("check", "customers")]), None);
    let (_, body) = second
        .http("GET", "/api/v1/domains?finding=spf_old_ip_literal")
        .unwrap();
    assert!(body.contains("c00048.customers.test"), "{body}");
    assert!(
        second.logs().contains("restored the last hosted-domain audit"),
        "{}",
        second.logs()
    );

    // A shorter interval makes the kept audit old: the next one runs at once
    // and compares with it, so the fix made during the restart is logged.
    std::fs::write(
        &second.config,
        common::lab().render(&format!("{hourly}    interval: 3s\n    timeout: 2s\n")),
    )
    .unwrap();
    second.signal("HUP");
    second.wait_for(
        "cutover_hosted_domains_changes_total",
        &[("check", "customers"), ("direction", "fixed")],
        |v| v == 1.0,
        20 * SECS,
    );
    let logs = second.logs();
    let fixed: Vec<&str> = logs.lines().filter(|l| l.contains("hosted domain fixed")).collect();
    assert_eq!(fixed.len(), 1, "{logs}");
    assert!(fixed[0].contains("c00048.customers.test"), "{}", fixed[0]);
}

#[test]
fn mistakes_in_a_hosted_domains_check_name_their_field() {
    let lab = lab();
    let base = audit_config(&domains_file(&lab), "{authoritative: 127.0.0.30}", 50);
    for (from, to, expected) in [
        (
            "rate_limit: 50",
            "rate_limit: 0",
            "field `checks[0].rate_limit`: expected queries per second above 0",
        ),
        (
            "concurrency: 64",
            "concurrency: 0",
            "field `checks[0].concurrency`: must be at least 1",
        ),
        (
            "mx_hosts: [mx.example.test]",
            "mx_hosts: [\"not a host\"]",
            "field `checks[0].mx_hosts[0]`: expected a host name",
        ),
        (
            "spf_include: spf.example.test",
            "spf_include: spf.example.test\n    old_env: live",
            "field `checks[0].old_env`: unknown environment `live`",
        ),
        (
            "retries: 1",
            "retries: 1\n    envs: [old]",
            "field `checks[0].envs`: a `hosted_domains` check asks its own resolvers",
        ),
        (
            "retries: 1",
            "retries: 1\n    resolver: 127.0.0.30",
            "unknown field `resolver`",
        ),
    ] {
        let yaml = base.replace(from, to);
        assert_ne!(yaml, base, "{from}");
        let (_d, config) = common::write_config(&yaml);
        let (code, _, err) = common::validate(&config, None);
        assert_eq!(code, 1, "{to}: {err}");
        assert!(err.contains("checks.yaml:") && err.contains(expected), "{to}: {err}");
    }
}
