//! The `webmail_login` probe against the lab's real Roundcube 1.6.5 in old and
//! new: full sessions in every environment, a password changed only in new
//! (and the backoff that follows), a stopped Dovecot, a stopped php-fpm,
//! sessions that cannot be stored, a plugin missing in new, and a redirect to
//! another host. Every fault is undone by a guard, also when a test fails.
//!
//! These tests change the shared lab: run them under its lock,
//! `flock /tmp/cutover-lab.lock cargo nextest run --test webmail_login`.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Scrape, check_cmd, lab, lab_fault, lab_script};

const SECS: Duration = Duration::from_secs(1);

/// A failed Roundcube login takes ~1.5 s (Dovecot's auth delay): runs get 3.5 s.
const WEBMAIL: &str = r#"
defaults: {interval: 4s, timeout: 3500ms, ca_file: "{{CA}}"}
environments:
  old: {addresses: [127.0.0.10]}
  new: {addresses: [127.0.0.20]}
  live: {resolver: 127.0.0.30}
credentials:
  probe: {username: probe@example.test, password_file: "{{PASSWORD_FILE}}"}
checks:
  - name: webmail-login
    kind: webmail_login
    app: roundcube
    url: https://webmail.example.test/roundcube/
    credentials: probe
    auth_backoff: 1h
  - {name: roundcube-page, kind: http, url: "https://webmail.example.test/roundcube/", expect: {status: [200]}}
  - {name: imap, kind: imap, host: imap.example.test, credentials: probe}
"#;

fn at<'a>(check: &'a str, env: &'a str) -> [(&'a str, &'a str); 2] {
    [("check", check), ("env", env)]
}

/// The labels of the one series of `name` for `env`.
fn labels_of(s: &Scrape, name: &str, env: &str) -> Vec<(String, String)> {
    let found: Vec<_> = s
        .series(name)
        .into_iter()
        .filter(|(l, _)| l.iter().any(|(k, v)| k == "env" && v == env))
        .collect();
    assert_eq!(found.len(), 1, "{name} for {env}: {}", s.matching(name));
    found.into_iter().next().unwrap().0
}

fn label<'a>(labels: &'a [(String, String)], key: &str) -> &'a str {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// One `check` row (JSON) for `env`.
fn check_row(yaml: &str, env: &str) -> serde_json::Value {
    let (_, out, err) = check_cmd(yaml, &["--format", "json", "--check", "webmail-login", "--env", env]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["env"] == env && r["check"] == "webmail-login")
        .unwrap_or_else(|| panic!("no webmail-login row for {env}: {out}\n{err}"))
        .clone()
}

/// The probe's requests to an environment's Roundcube (`POST` or any), from
/// nginx's access log.
fn roundcube_requests(env: &str, method: &str) -> usize {
    let log = format!("{}/log/{env}-nginx-access.log", lab().var("DIR"));
    std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("\"{method} /roundcube/")) && l.contains("cutover-monitor/"))
        .count()
}

#[test]
fn old_new_and_live_log_in_and_the_inbox_count_is_imaps() {
    lab();
    let d = Daemon::start(WEBMAIL);
    for env in ["old", "new", "live"] {
        d.wait_for(
            "cutover_probe_success",
            &at("webmail-login", env),
            |v| v == 1.0,
            15 * SECS,
        );
    }
    let s = d.scrape();
    for env in ["old", "new"] {
        for phase in ["login_page", "login", "mail_page", "list", "logout"] {
            let v = s.get(
                "cutover_probe_phase_duration_seconds",
                &[("check", "webmail-login"), ("env", env), ("phase", phase)],
            );
            assert!(v.is_some_and(|v| v > 0.0 && v < 3.0), "{env} phase {phase}: {v:?}");
        }
        let app = labels_of(&s, "cutover_webmail_app_info", env);
        assert_eq!(label(&app, "app"), "roundcube", "{app:?}");
        assert_eq!(label(&app, "version"), "1.6.5", "{app:?}");
        assert_eq!(label(&app, "skin"), "elastic", "{app:?}");
        assert_eq!(label(&app, "plugins"), "archive,jqueryui,zipdownload", "{app:?}");
    }
    assert_eq!(
        s.get("cutover_webmail_parity", &[("check", "webmail-login")]),
        Some(1.0),
        "{}",
        s.matching("cutover_webmail")
    );

    // The webmail's count is IMAP's count of the same mailbox. Mail may land
    // between the two runs (other tests' probe mails): retry a few times.
    for env in ["old", "new"] {
        let mut last = (None, None);
        for _ in 0..5 {
            let probe = |check: &str| {
                let (status, body) = d.http("GET", &format!("/probe?check={check}&env={env}")).unwrap();
                assert_eq!(status, 200, "{body}");
                Scrape::parse(&body)
            };
            let web =
                probe("webmail-login").get("cutover_webmail_inbox_messages", &[("env", env), ("mailbox", "INBOX")]);
            let imap = probe("imap").get("cutover_imap_mailbox_messages", &[("env", env), ("mailbox", "INBOX")]);
            last = (web, imap);
            if web.is_some() && web == imap {
                break;
            }
            std::thread::sleep(SECS);
        }
        assert!(
            last.0.is_some() && last.0 == last.1,
            "{env}: webmail {:?}, imap {:?}",
            last.0,
            last.1
        );
    }
}

#[test]
fn a_password_changed_only_in_new_fails_new_once_then_backs_off() {
    lab();
    let _reset = lab_fault(
        &["user", "passwd", "new", "probe", "Changed-In-New-Only-1"],
        &["user", "reset"],
    );
    let posts_before = roundcube_requests("new", "POST");
    // Without the http check of the same page, every request in new's log is a login's.
    let only_logins: Vec<&str> = WEBMAIL.lines().filter(|l| !l.contains("roundcube-page")).collect();
    let d = Daemon::start(&only_logins.join("\n"));
    d.wait_for(
        "cutover_probe_success",
        &at("webmail-login", "old"),
        |v| v == 1.0,
        15 * SECS,
    );
    let failed = [("check", "webmail-login"), ("env", "new"), ("reason", "auth_failed")];
    // The first run is rejected by Roundcube, the next ones are held back.
    d.wait_for("cutover_probe_failures_total", &failed, |v| v >= 2.0, 20 * SECS);
    // A held-back run sends nothing at all, not even the login page.
    let gets = roundcube_requests("new", "GET");
    d.wait_for("cutover_probe_failures_total", &failed, |v| v >= 3.0, 20 * SECS);
    assert_eq!(roundcube_requests("new", "GET"), gets, "a held-back run sent a request");
    assert_eq!(
        d.scrape().get("cutover_probe_success", &at("webmail-login", "old")),
        Some(1.0)
    );
    let (_, status) = d.http("GET", "/api/v1/status").unwrap();
    assert!(status.contains("backing off"), "{status}");
    assert_eq!(
        roundcube_requests("new", "POST") - posts_before,
        1,
        "one login POST to new, then none during the backoff"
    );

    // `check` (a fresh process) says why in the table's words.
    let row = check_row(WEBMAIL, "new");
    assert_eq!(row["reason"], "auth_failed", "{row}");
    assert_eq!(row["phase"], "login", "{row}");
    assert!(row["detail"].as_str().unwrap().contains("Login failed."), "{row}");
}

#[test]
fn a_stopped_dovecot_in_new_is_a_storage_error_while_the_page_still_loads() {
    lab();
    let _start = lab_fault(&["svc", "stop", "new", "dovecot"], &["svc", "start", "new", "dovecot"]);
    let d = Daemon::start(WEBMAIL);
    let reason = [("check", "webmail-login"), ("env", "new"), ("reason", "storage_error")];
    d.wait_for("cutover_probe_failures_total", &reason, |v| v >= 1.0, 15 * SECS);
    d.wait_for(
        "cutover_probe_success",
        &at("roundcube-page", "new"),
        |v| v == 1.0,
        15 * SECS,
    );
    d.wait_for(
        "cutover_probe_success",
        &at("webmail-login", "old"),
        |v| v == 1.0,
        15 * SECS,
    );
    assert_eq!(
        d.scrape().get("cutover_probe_success", &at("webmail-login", "new")),
        Some(0.0)
    );
}

#[test]
fn a_stopped_php_fpm_in_new_fails_the_login_page_with_the_status() {
    lab();
    let _start = lab_fault(&["svc", "stop", "new", "php-fpm"], &["svc", "start", "new", "php-fpm"]);
    let row = check_row(WEBMAIL, "new");
    assert_eq!(row["reason"], "unexpected_status", "{row}");
    assert_eq!(row["phase"], "login_page", "{row}");
    assert!(row["detail"].as_str().unwrap().contains("502"), "{row}");
}

#[test]
fn sessions_that_cannot_be_stored_are_an_invalid_request() {
    lab();
    let _fix = lab_fault(
        &["webmail", "break-sessions", "new"],
        &["webmail", "fix-sessions", "new"],
    );
    let row = check_row(WEBMAIL, "new");
    assert_eq!(row["reason"], "invalid_request", "{row}");
    assert_eq!(row["phase"], "login", "{row}");
    assert!(row["detail"].as_str().unwrap().contains("Invalid request"), "{row}");
}

#[test]
fn a_plugin_missing_in_new_breaks_parity_naming_it_and_reset_restores_it() {
    lab();
    let _reset = lab_fault(&["webmail", "plugins", "new", "archive"], &["webmail", "reset"]);
    let d = Daemon::start(WEBMAIL);
    let parity = [("check", "webmail-login")];
    d.wait_for("cutover_webmail_parity", &parity, |v| v == 0.0, 15 * SECS);
    let s = d.scrape();
    let new = labels_of(&s, "cutover_webmail_app_info", "new");
    assert_eq!(label(&new, "plugins"), "archive,jqueryui", "{new:?}");
    // Both still log in: parity is a warning, not a failed login.
    assert_eq!(s.get("cutover_probe_success", &at("webmail-login", "new")), Some(1.0));
    let deadline = Instant::now() + 5 * SECS;
    while !d.logs().contains("zipdownload only in old") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(d.logs().contains("plugins: zipdownload only in old"), "{}", d.logs());
    // What differs is on the status page beside the instance, and under `check`'s table.
    let (code, body) = d.http("GET", "/api/v1/status").unwrap();
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let notes: Vec<String> = status["matrix"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["check"] == "webmail-login")
        .flat_map(|row| row["cells"].as_array().unwrap().iter())
        .flat_map(|cell| cell["notes"].as_array().unwrap().iter())
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    assert!(notes.iter().any(|n| n.contains("zipdownload only in old")), "{notes:?}");
    let (_, out, err) = check_cmd(WEBMAIL, &[]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("NOTE webmail-login ") && l.contains("zipdownload only in old")),
        "{out}{err}"
    );

    lab_script(&["webmail", "reset"]);
    d.wait_for("cutover_webmail_parity", &parity, |v| v == 1.0, 15 * SECS);
    let s = d.scrape();
    let new = labels_of(&s, "cutover_webmail_app_info", "new");
    assert_eq!(label(&new, "plugins"), "archive,jqueryui,zipdownload", "{new:?}");
    assert!(d.logs().contains("old and new run the same"), "{}", d.logs());
}

#[test]
fn a_redirect_to_another_host_fails_naming_it() {
    lab();
    // The lab's only cross-host redirect: DAV's well-known path sent to dav-old.
    let _ok = lab_fault(
        &["dav", "wellknown", "new", "old-host"],
        &["dav", "wellknown", "new", "ok"],
    );
    let yaml = WEBMAIL.replace(
        "url: https://webmail.example.test/roundcube/",
        "url: https://dav.example.test/.well-known/caldav",
    );
    // nginx's reload lets an old worker answer the old redirect for a moment
    // after `dav wellknown` returns: wait until the new one answers.
    let deadline = Instant::now() + 5 * SECS;
    let mut row = check_row(&yaml, "new");
    while row["reason"] != "unexpected_status" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        row = check_row(&yaml, "new");
    }
    assert_eq!(row["reason"], "unexpected_status", "{row}");
    assert_eq!(row["phase"], "login_page", "{row}");
    assert!(
        row["detail"]
            .as_str()
            .unwrap()
            .contains("another host (dav-old.example.test)"),
        "{row}"
    );
}
