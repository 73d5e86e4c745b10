//! The daemon's core against the real lab: pinning, live DNS, failures with
//! their reasons, timeouts, reloads, the `check` and `validate` commands and
//! the exposition format.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Lab, TestCa, check_cmd, lab, lab_fault};

/// old, new and live, webmail plus a check that proves which server answered.
const WEBMAIL: &str = r#"
defaults: {interval: 1s, timeout: 800ms, ca_file: "{{CA}}"}
environments:
  old: {addresses: [127.0.0.10]}
  new: {addresses: [127.0.0.20]}
  live: {resolver: 127.0.0.30}
checks:
  - name: webmail
    kind: http
    url: https://webmail.example.test/
    expect: {status: [200], body_regex: "environment: (old|new)"}
  - name: webmail-is-old
    kind: http
    url: https://webmail.example.test/
    expect: {body_contains: "environment: old"}
"#;

fn labels<'a>(check: &'a str, env: &'a str) -> [(&'a str, &'a str); 2] {
    [("check", check), ("env", env)]
}

const SECS: Duration = Duration::from_secs(1);

#[test]
fn webmail_is_up_in_old_new_and_live_and_each_env_reaches_its_own_server() {
    lab();
    let d = Daemon::start(WEBMAIL);
    for env in ["old", "new", "live"] {
        d.wait_for("cutover_probe_success", &labels("webmail", env), |v| v == 1.0, 5 * SECS);
    }
    // The same hostname, pinned: only old's server says "environment: old".
    d.wait_for(
        "cutover_probe_success",
        &labels("webmail-is-old", "old"),
        |v| v == 1.0,
        5 * SECS,
    );
    d.wait_for(
        "cutover_probe_success",
        &labels("webmail-is-old", "new"),
        |v| v == 0.0,
        5 * SECS,
    );
    let s = d.scrape();
    let reason = [
        ("check", "webmail-is-old"),
        ("env", "new"),
        ("reason", "content_mismatch"),
    ];
    assert!(s.get("cutover_probe_failures_total", &reason).unwrap() >= 1.0);
    assert_eq!(
        s.get(
            "cutover_probe_success",
            &[("check", "webmail"), ("env", "old"), ("address", "127.0.0.10")]
        ),
        Some(1.0)
    );
    for phase in ["connect", "tls", "first_byte", "transfer"] {
        let v = s.get(
            "cutover_probe_phase_duration_seconds",
            &[("check", "webmail"), ("env", "new"), ("phase", phase)],
        );
        assert!(v.is_some_and(|v| v > 0.0 && v < 1.0), "phase {phase}: {v:?}");
    }
    let resolve = s.get(
        "cutover_probe_phase_duration_seconds",
        &[("check", "webmail"), ("env", "live"), ("phase", "resolve")],
    );
    assert!(resolve.is_some_and(|v| v > 0.0), "live resolves: {resolve:?}");
    // Certificate facts, per environment: the lab gives old and new different certificates.
    let fingerprint = |env: &str| {
        s.series("cutover_tls_cert_info")
            .into_iter()
            .find(|(l, _)| {
                l.iter().any(|(k, v)| k == "env" && v == env) && l.iter().any(|(k, v)| k == "check" && v == "webmail")
            })
            .and_then(|(l, _)| l.into_iter().find(|(k, _)| k == "sha256").map(|(_, v)| v))
            .unwrap()
    };
    assert_ne!(fingerprint("old"), fingerprint("new"));
    assert_eq!(fingerprint("old").len(), 64);
    let not_after = s
        .get(
            "cutover_tls_cert_not_after_timestamp_seconds",
            &labels("webmail", "new"),
        )
        .unwrap();
    assert!(not_after > cutover_monitor::unix_now() + 86_400.0, "{not_after}");
}

#[test]
fn stopping_new_nginx_fails_new_with_refused_and_leaves_old_alone() {
    lab();
    let d = Daemon::start(WEBMAIL);
    d.wait_for(
        "cutover_probe_success",
        &labels("webmail", "new"),
        |v| v == 1.0,
        5 * SECS,
    );
    {
        let _restore = lab_fault(&["svc", "stop", "new", "nginx"], &["svc", "start", "new", "nginx"]);
        let stopped = Instant::now();
        d.wait_for(
            "cutover_probe_success",
            &labels("webmail", "new"),
            |v| v == 0.0,
            3 * SECS,
        );
        // Within one interval (1 s) plus a scrape's worth of slack.
        assert!(
            stopped.elapsed() < Duration::from_millis(1500),
            "{:?}",
            stopped.elapsed()
        );
        let reason = [("check", "webmail"), ("env", "new"), ("reason", "refused")];
        assert!(d.scrape().get("cutover_probe_failures_total", &reason).unwrap() >= 1.0);
        assert_eq!(
            d.scrape().get("cutover_probe_success", &labels("webmail", "old")),
            Some(1.0)
        );
        assert!(d.logs().contains("check instance is down"), "{}", d.logs());
    }
    d.wait_for(
        "cutover_probe_success",
        &labels("webmail", "new"),
        |v| v == 1.0,
        5 * SECS,
    );
    let ups = d.logs().matches("check instance is up").count();
    // One line per state change, not per success: first up for each of the
    // instances, then new's recovery.
    std::thread::sleep(2 * SECS);
    assert_eq!(d.logs().matches("check instance is up").count(), ups, "{}", d.logs());
}

#[test]
fn live_follows_the_dns_switch() {
    lab();
    let d = Daemon::start(WEBMAIL);
    let live = |resolved: &'static str| {
        move |s: &common::Scrape| {
            s.get(
                "cutover_live_resolved_env_info",
                &[("check", "webmail"), ("env", "live"), ("resolved_env", resolved)],
            )
        }
    };
    d.wait_for(
        "cutover_live_resolved_env_info",
        &[("check", "webmail"), ("resolved_env", "old"), ("address", "127.0.0.10")],
        |v| v == 1.0,
        5 * SECS,
    );
    {
        let _restore = common::dns_fault("new");
        d.wait_for(
            "cutover_live_resolved_env_info",
            &[("check", "webmail"), ("resolved_env", "new"), ("address", "127.0.0.20")],
            |v| v == 1.0,
            5 * SECS,
        );
        let s = d.scrape();
        assert_eq!(
            live("old")(&s),
            None,
            "the old answer's series is gone:\n{}",
            s.matching("cutover_live")
        );
        // Live now reaches new's server: the old-only content check fails in live.
        d.wait_for(
            "cutover_probe_success",
            &labels("webmail-is-old", "live"),
            |v| v == 0.0,
            5 * SECS,
        );
    }
    d.wait_for(
        "cutover_live_resolved_env_info",
        &[("check", "webmail"), ("resolved_env", "old")],
        |v| v == 1.0,
        5 * SECS,
    );
}

/// A check against a fake TLS server presenting `cert`, trusting `ca_pem`.
fn tls_check(lab: &Lab, port: u16, ca_pem: &str) -> (i32, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let yaml = format!(
        "environments:\n  fake: {{addresses: [127.0.0.1]}}\nchecks:\n  - {{name: tls, kind: tcp, host: imap.example.test, port: {port}, tls: true, ca_file: \"{}\", timeout: 2s}}\n",
        ca.display()
    );
    let _ = lab;
    let (code, out, err) = check_cmd(&yaml, &["--format", "json"]);
    (
        code,
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}")),
    )
}

#[test]
fn certificate_problems_each_have_their_own_reason() {
    let lab = lab();
    let ca = TestCa::new("Test CA");
    let other = TestCa::new("Unknown CA");
    let cases = [
        (
            "good",
            common::tls_server(ca.leaf(&["imap.example.test"], false), b"* OK\r\n"),
            &ca.pem,
            None,
        ),
        (
            "wrong name",
            common::tls_server(ca.leaf(&["other.example.test"], false), b"* OK\r\n"),
            &ca.pem,
            Some("cert_name_mismatch"),
        ),
        (
            "expired",
            common::tls_server(ca.leaf(&["imap.example.test"], true), b"* OK\r\n"),
            &ca.pem,
            Some("cert_expired"),
        ),
        (
            "untrusted",
            common::tls_server(other.leaf(&["imap.example.test"], false), b"* OK\r\n"),
            &ca.pem,
            Some("cert_untrusted"),
        ),
    ];
    for (what, port, ca_pem, reason) in cases {
        let (code, rows) = tls_check(&lab, port, ca_pem);
        let row = &rows[0];
        assert_eq!(row["reason"].as_str(), reason, "{what}: {row}");
        assert_eq!(code, if reason.is_some() { 2 } else { 0 }, "{what}");
        // The certificate is described even when it is refused.
        assert_eq!(row["cert_sha256"].as_str().map(str::len), Some(64), "{what}: {row}");
    }
}

#[test]
fn a_hung_server_times_out_at_the_timeout_without_delaying_other_instances() {
    lab();
    let hung = common::hung_server();
    let yaml = format!(
        r#"
environments:
  fake: {{addresses: [127.0.0.1]}}
  old: {{addresses: [127.0.0.10]}}
checks:
  - {{name: hung, kind: tcp, host: imap.example.test, port: {hung}, expect_banner: "^\\* OK", envs: [fake], interval: 3s, timeout: 2s}}
  - {{name: fast, kind: tcp, host: imap.example.test, port: 143, expect_banner: "^\\* OK", envs: [old], interval: 500ms, timeout: 400ms}}
"#
    );
    // One-shot: the timeout is reported within +100 ms and names the phase.
    let (code, out, _) = check_cmd(&yaml, &["--format", "json", "--check", "hung"]);
    assert_eq!(code, 2);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows[0]["reason"], "timeout", "{out}");
    assert_eq!(rows[0]["phase"], "banner", "{out}");
    let took = rows[0]["duration_seconds"].as_f64().unwrap();
    assert!((2.0..2.1).contains(&took), "timed out after {took}s");

    // In the daemon, the fast instance keeps its pace while the hung one hangs.
    let d = Daemon::start(&yaml);
    d.wait_for("cutover_probe_runs_total", &[("check", "hung")], |v| v >= 1.0, 6 * SECS);
    let runs = |s: &common::Scrape| s.get("cutover_probe_runs_total", &[("check", "fast")]).unwrap();
    let before = runs(&d.scrape());
    std::thread::sleep(3 * SECS);
    let after = runs(&d.scrape());
    assert!(after - before >= 5.0, "fast ran {} times in 3 s", after - before);
    assert_eq!(d.scrape().get("cutover_probe_success", &[("check", "fast")]), Some(1.0));
    let hung_reason = [("check", "hung"), ("reason", "timeout")];
    assert!(d.scrape().get("cutover_probe_failures_total", &hung_reason).unwrap() >= 1.0);
}

#[test]
fn a_broken_reload_keeps_the_old_checks_and_a_good_one_applies() {
    lab();
    let d = Daemon::start_with(WEBMAIL, &["--web.enable-lifecycle"]);
    d.wait_for(
        "cutover_probe_success",
        &labels("webmail", "old"),
        |v| v == 1.0,
        5 * SECS,
    );
    assert_eq!(d.scrape().get("cutover_config_last_reload_successful", &[]), Some(1.0));

    std::fs::write(&d.config, "environments: {old: {addresses: [127.0.0.10]}}\nchecks:\n  - name: x\n    kind: http\n    url: 42\n    intervall: 1s\n").unwrap();
    let (status, body) = d.reload();
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains("checks.yaml:6:5: field `checks[0].intervall`: unknown field"),
        "{body}"
    );
    assert_eq!(d.scrape().get("cutover_config_last_reload_successful", &[]), Some(0.0));
    // The old checks keep running.
    let runs = d
        .scrape()
        .get("cutover_probe_runs_total", &labels("webmail", "old"))
        .unwrap();
    d.wait_for(
        "cutover_probe_runs_total",
        &labels("webmail", "old"),
        |v| v >= runs + 2.0,
        5 * SECS,
    );

    // A good config via SIGHUP: webmail-is-old is gone, a tcp check appears.
    let good = lab().render(
        "defaults: {interval: 1s, timeout: 800ms, ca_file: \"{{CA}}\"}\nenvironments:\n  old: {addresses: [127.0.0.10]}\n  new: {addresses: [127.0.0.20]}\nchecks:\n  - {name: webmail, kind: http, url: \"https://webmail.example.test/\"}\n  - {name: imaps, kind: tcp, host: imap.example.test, port: 993, tls: true}\n",
    );
    std::fs::write(&d.config, good).unwrap();
    d.signal("HUP");
    d.wait_for("cutover_config_last_reload_successful", &[], |v| v == 1.0, 5 * SECS);
    d.wait_for("cutover_probe_success", &labels("imaps", "new"), |v| v == 1.0, 5 * SECS);
    let s = d.scrape();
    assert!(
        s.series("cutover_probe_success")
            .iter()
            .all(|(l, _)| !l.iter().any(|(_, v)| v == "webmail-is-old" || v == "live")),
        "{}",
        s.matching("cutover_probe_success")
    );
    assert_eq!(s.get("cutover_check_instances", &[]), Some(4.0));
    assert!(
        s.get("cutover_probe_runs_total", &labels("webmail", "old")).unwrap() > runs,
        "counters survive a reload"
    );
}

#[test]
fn check_exits_0_when_all_pass_2_when_any_fails_3_when_it_cannot_run() {
    lab();
    let (code, out, _) = check_cmd(WEBMAIL, &["--check", "webmail"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("CHECK"), "{out}");
    assert!(out.contains("resolved -> 127.0.0.10 (old)"), "{out}");
    assert!(out.contains("3 of 3 instances OK, 0 failing"), "{out}");

    let (code, out, _) = check_cmd(WEBMAIL, &["--check", "webmail-is-old"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("webmail-is-old  new") && l.contains("FAIL") && l.contains("content_mismatch")),
        "{out}"
    );

    let (code, out, _) = check_cmd(WEBMAIL, &["--env", "new", "--format", "json"]);
    assert_eq!(code, 2);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert!(rows.as_array().unwrap().iter().all(|r| r["env"] == "new"));

    let (code, _, err) = check_cmd(WEBMAIL, &["--check", "nope"]);
    assert_eq!(code, 3, "{err}");
    let (code, _, err) = check_cmd("checks: 1\n", &[]);
    assert_eq!(code, 3, "{err}");
}

#[test]
fn validate_reports_every_problem_with_file_line_and_field() {
    let (_dir, path) = common::write_config(
        "defaults: {interval: 30}\nenvironments:\n  old: {addresses: [127.0.0.10]}\n  bad: {}\ncredentials:\n  probe: {username: u, password: hunter2}\nchecks:\n  - {name: a, kind: tcp, host: h, port: 1}\n  - {name: a, kind: http, url: \"ftp://x\"}\n  - {name: b, kind: smoke}\n",
    );
    let (code, out, err) = common::validate(&path, None);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    let file = path.display().to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 6, "{err}");
    assert_eq!(
        lines[0],
        format!("{file}:1:12: field `defaults.interval`: expected a duration like `30s`, got `30`")
    );
    assert!(
        lines[1].starts_with(&format!("{file}:4:3: field `environments.bad`: set `addresses`")),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!(
            "{file}:6:24: field `credentials.probe.password`: inline passwords are not allowed"
        )),
        "{err}"
    );
    assert!(
        lines[3].starts_with(&format!("{file}:9:6: field `checks[1].name`: duplicate check name `a`")),
        "{err}"
    );
    assert!(
        lines[4].starts_with(&format!("{file}:9:27: field `checks[1].url`"))
            && lines[4].contains("http:// or https://"),
        "{err}"
    );
    assert!(
        lines[5].starts_with(&format!(
            "{file}:10:15: field `checks[2].kind`: unknown variant `smoke`"
        )),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");

    let (code, out, _) = common::decode(
        common::bin()
            .args(["validate", "--config.file", "checks/lab.yaml"])
            .current_dir(common::root())
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "{out}");
}

#[test]
fn promtool_finds_the_exposition_clean() {
    lab();
    // Every probe kind of the lab's own check file, at a test's pace.
    let lab_yaml = std::fs::read_to_string(common::root().join("checks/lab.yaml")).unwrap();
    // Plus failing instances, so the failure series are exposed too.
    let closed = "  - {name: closed-port, kind: tcp, host: imap.example.test, port: 1, envs: [old]}\n  \
                  - {name: mail-closed, kind: mailflow, envs: [old], interval: 2s, \
                  send: {mode: submission, host: smtp.example.test, port: 1, credentials: probe, to: probe@example.test}, \
                  watch: [{env: old, host: imap.example.test, credentials: probe}]}\n";
    // And a small mailbox-parity audit (the lab's parity Dovecots, 20
    // generated accounts), so its families are exposed within the wait.
    common::lab_script(&["parity", "generate", "20"]);
    let lab = lab();
    let parity = format!(
        "  - {{name: parity, kind: mailbox_parity, accounts_file: \"{}/parity/accounts.txt\", \
         host: imap.example.test, port: 10993, credentials: admin, concurrency: 4}}\n",
        lab.var("DIR")
    );
    let admin = format!(
        "credentials:\n  admin: {{username: {}, password_file: \"{}\"}}\n",
        lab.var("ADMIN_USER"),
        lab.var("ADMIN_PASSWORD_FILE")
    );
    let yaml = lab_yaml
        .replace("interval: 15s", "interval: 2s")
        .replace("timeout: 5s", "timeout: 1500ms")
        .replacen("credentials:\n", &admin, 1)
        + closed
        + &parity;
    let d = Daemon::start(&yaml);
    let config = cutover_monitor::probe::load(&common::root().join("checks/lab.yaml")).unwrap();
    let every_instance_ran = |s: &common::Scrape| {
        let instances = s.get("cutover_check_instances", &[]).unwrap_or(0.0);
        let ran = s.series("cutover_probe_runs_total").len() as f64;
        config
            .checks
            .iter()
            .all(|c| s.sum("cutover_probe_runs_total", &[("check", &c.check.name)]) >= 1.0)
            && ran == instances
    };
    let missing = |s: &common::Scrape| -> Vec<&str> {
        let catalog = cutover_monitor::metrics::CATALOG.iter().map(|(n, _)| *n);
        catalog.filter(|n| !s.text.contains(&format!("# HELP {n} "))).collect()
    };
    let text = d
        .wait_until(
            "every instance of checks/lab.yaml ran and every metric family is exposed",
            |s| every_instance_ran(s) && missing(s).is_empty(),
            20 * SECS,
        )
        .text;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool must be installed (Debian package prometheus)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && report.trim().is_empty(), "promtool: {report}");
}

#[test]
fn probe_endpoint_runs_a_check_now_and_health_endpoints_answer() {
    lab();
    let d = Daemon::start(WEBMAIL);
    let (status, body) = d.http("GET", "/probe?check=webmail&env=new").unwrap();
    assert_eq!(status, 200, "{body}");
    let s = common::Scrape::parse(&body);
    assert_eq!(
        s.get("cutover_probe_success", &labels("webmail", "new")),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        s.get("cutover_probe_success", &labels("webmail", "old")),
        None,
        "{body}"
    );
    assert!(!body.contains("cutover_config_last_reload"), "{body}");
    assert_eq!(d.http("GET", "/probe?check=nope").unwrap().0, 400);
    assert_eq!(d.http("GET", "/-/healthy").unwrap().0, 200);
    assert_eq!(d.http("GET", "/-/ready").unwrap().0, 200);
    assert_eq!(d.http("GET", "/-/reload").unwrap().0, 405, "GET never changes state");
}

#[test]
fn sigterm_stops_the_daemon_within_a_second() {
    lab();
    let mut d = Daemon::start(WEBMAIL);
    d.wait_for(
        "cutover_probe_success",
        &labels("webmail", "old"),
        |v| v == 1.0,
        5 * SECS,
    );
    d.signal("TERM");
    let took = d.wait_exit(Duration::from_secs(3)).expect("daemon did not exit");
    assert!(took < SECS, "{took:?}");
}

#[test]
fn the_webmail_http_redirect_is_followed_to_https_on_the_same_pinned_address() {
    let lab = lab();
    // A query string no other request carries: nginx's redirect keeps it, so
    // each environment's access log shows where both hops went. The lab's DNS
    // hands out old's address: following the redirect through DNS would land there.
    let nonce = format!(
        "redirect-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let yaml = format!(
        "defaults: {{ca_file: \"{{{{CA}}}}\"}}\nenvironments:\n  new: {{addresses: [127.0.0.20]}}\nchecks:\n  - {{name: w, kind: http, url: \"http://webmail.example.test/?t={nonce}\", expect: {{body_contains: \"environment: new\"}}}}\n  - {{name: no-follow, kind: http, url: \"http://webmail.example.test/\", max_redirects: 0, expect: {{status: [301]}}}}\n"
    );
    let (code, out, err) = check_cmd(&yaml, &["--format", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["check"] == "w")
        .unwrap_or_else(|| panic!("no row for w: {out}"));
    assert_eq!(row["address"], "127.0.0.20", "{out}");
    assert_eq!(row["success"], true, "{out}");
    let phases = row["phases"].as_array().unwrap();
    assert!(phases.iter().any(|p| p[0] == "tls"), "the redirect led to TLS: {out}");
    // Both hops reached new's nginx (127.0.0.20): the 301 on port 80, then
    // the 200, which only its port 443 serves for `/`; old's never saw it.
    let access_log = |env: &str| {
        let path = std::path::Path::new(lab.var("DIR")).join(format!("log/{env}-nginx-access.log"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let new_log: Vec<String> = access_log("new")
        .lines()
        .filter(|l| l.contains(&nonce))
        .map(str::to_string)
        .collect();
    let request = format!("\"GET /?t={nonce} HTTP/1.1\"");
    for status in ["301", "200"] {
        assert!(
            new_log.iter().any(|l| l.contains(&format!("{request} {status} "))),
            "new's nginx did not answer {request} with {status}: {new_log:#?}"
        );
    }
    assert!(
        !access_log("old").contains(&nonce),
        "the redirect was followed to old's address"
    );
}

#[test]
fn every_address_of_an_environment_is_probed_and_labelled() {
    lab();
    // 127.0.0.11 has no server: its failure must not hide behind 127.0.0.10.
    let yaml = "defaults: {ca_file: \"{{CA}}\"}\nenvironments:\n  old: {addresses: [127.0.0.10, 127.0.0.11]}\nchecks:\n  - {name: w, kind: http, url: \"https://webmail.example.test/\"}\n";
    let (code, out, _) = check_cmd(yaml, &["--format", "json"]);
    assert_eq!(code, 2, "{out}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let by_address = |a: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["address"] == a)
            .unwrap()
            .clone()
    };
    assert_eq!(by_address("127.0.0.10")["success"], true, "{out}");
    assert_eq!(by_address("127.0.0.11")["reason"], "refused", "{out}");
}

#[test]
fn json_logs_carry_one_structured_line_per_state_change() {
    lab();
    let yaml = "defaults: {interval: 500ms, timeout: 400ms}\nenvironments:\n  old: {addresses: [127.0.0.10]}\nchecks:\n  - {name: closed, kind: tcp, host: imap.example.test, port: 1}\n";
    let d = Daemon::start_with(yaml, &["--log.format", "json"]);
    d.wait_for(
        "cutover_probe_runs_total",
        &[("check", "closed")],
        |v| v >= 4.0,
        5 * SECS,
    );
    let logs = d.logs();
    let downs: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v| v["fields"]["message"] == "check instance is down")
        .collect();
    assert_eq!(downs.len(), 1, "four failed runs, one state change:\n{logs}");
    assert_eq!(downs[0]["fields"]["reason"], "refused");
    assert_eq!(downs[0]["fields"]["check"], "closed");
    assert_eq!(downs[0]["level"], "WARN");
}
