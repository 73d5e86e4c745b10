//! No password, AUTH string or its base64 forms appears anywhere a user can
//! see: logs at trace level (text and JSON), /metrics, /probe, and the `check`
//! command's table and JSON output, whether the login succeeds or fails.

mod common;

use std::time::Duration;

use base64::Engine;
use common::{Daemon, lab};

/// Every probe kind that touches credentials or the lab, with a good and a
/// wrong password. The wrong one is known too, so its leaks are caught as well.
const CONFIG: &str = r#"
defaults: {interval: 1s, timeout: 900ms, ca_file: "{{CA}}"}
environments:
  old: {addresses: [127.0.0.10]}
  new: {addresses: [127.0.0.20]}
  live: {resolver: 127.0.0.30}
credentials:
  good: {username: probe@example.test, password_file: "{{PASSWORD_FILE}}"}
  wrong: {username: probe@example.test, password_file: "{{WRONG_FILE}}"}
checks:
  - {name: web, kind: http, url: "https://webmail.example.test/"}
  - {name: tcp, kind: tcp, host: imap.example.test, port: 993, tls: true}
  - {name: imap-good, kind: imap, host: imap.example.test, credentials: good}
  - {name: imap-plain-wrong, kind: imap, host: imap.example.test, tls: starttls, auth: plain, credentials: wrong}
  - {name: imap-login-wrong, kind: imap, host: imap.example.test, credentials: wrong}
  - {name: smtp-good, kind: smtp, host: smtp.example.test, mode: submission, credentials: good}
  - {name: smtp-wrong, kind: smtp, host: smtp.example.test, mode: submission, credentials: wrong}
  - {name: dav-good, kind: dav, service: caldav, url: "https://dav.example.test/", credentials: good, collection: calendar, write: true, write_collection: probe-writes, legacy_urls: [/SOGo/dav/]}
  - {name: dav-wrong, kind: dav, service: carddav, url: "https://dav.example.test/", credentials: wrong, collection: contacts}
  - name: dns
    kind: dns
    resolvers: {authoritative: 127.0.0.30}
    records: [{name: imap.example.test, type: A, expect_env_addresses: true}]
"#;

const WRONG: &str = "Wr0ng-Secret-For-Leak-Test";

/// The password, and the forms an AUTH exchange would carry it in.
fn forms(password: &str) -> Vec<String> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let user = "probe@example.test";
    vec![
        password.to_string(),
        b64(password),
        b64(&format!("\0{user}\0{password}")),
        b64(&format!("{user}\0{user}\0{password}")),
        b64(&format!("{user}:{password}")),
    ]
}

fn assert_clean(what: &str, text: &str, secrets: &[String]) {
    assert!(!text.is_empty(), "{what} is empty: nothing was checked");
    for s in secrets {
        assert!(
            !text.contains(s.as_str()),
            "{what} contains a secret form ({} chars)",
            s.len()
        );
    }
}

#[test]
fn no_secret_reaches_logs_metrics_or_check_output() {
    let lab = lab();
    let dir = tempfile::tempdir().unwrap();
    let wrong_file = dir.path().join("wrong.password");
    std::fs::write(&wrong_file, WRONG).unwrap();
    let yaml = CONFIG.replace("{{WRONG_FILE}}", &wrong_file.display().to_string());
    let mut secrets = forms(lab.password());
    secrets.extend(forms(WRONG));

    for format in ["text", "json"] {
        let d = Daemon::start_with(&yaml, &["--log.level", "trace", "--log.format", format]);
        for check in ["imap-good", "smtp-good", "dav-good"] {
            d.wait_for(
                "cutover_probe_success",
                &[("check", check), ("env", "new")],
                |v| v == 1.0,
                Duration::from_secs(10),
            );
        }
        for check in ["imap-plain-wrong", "imap-login-wrong", "smtp-wrong", "dav-wrong"] {
            let labels = [("check", check), ("env", "new"), ("reason", "auth_failed")];
            d.wait_for(
                "cutover_probe_failures_total",
                &labels,
                |v| v >= 1.0,
                Duration::from_secs(10),
            );
        }
        assert_clean("/metrics", &d.scrape().text, &secrets);
        for check in [
            "web",
            "tcp",
            "imap-good",
            "imap-plain-wrong",
            "imap-login-wrong",
            "smtp-good",
            "smtp-wrong",
            "dav-good",
            "dav-wrong",
            "dns",
        ] {
            let (status, body) = d.http("GET", &format!("/probe?check={check}")).unwrap();
            assert_eq!(status, 200, "{check}: {body}");
            assert_clean(&format!("/probe?check={check}"), &body, &secrets);
        }
        for path in ["/", "/-/ready", "/-/healthy"] {
            assert_clean(path, &d.http("GET", path).unwrap().1, &secrets);
        }
        let logs = d.logs();
        assert!(logs.contains("auth_failed"), "the failures were logged: {logs}");
        assert_clean(&format!("{format} log at trace"), &logs, &secrets);
    }

    for format in ["table", "json"] {
        let (_d, path) = common::write_config(&yaml);
        let out = common::bin()
            .args(["--log.level", "trace", "check", "--format", format, "--config.file"])
            .arg(&path)
            .output()
            .unwrap();
        let (code, stdout, stderr) = common::decode(out);
        assert_eq!(code, 2, "the wrong passwords fail: {stdout}");
        assert!(stdout.contains("auth_failed"), "{stdout}");
        assert_clean(&format!("check --format {format}"), &stdout, &secrets);
        assert_clean(
            &format!("check --format {format} stderr"),
            &format!("{stderr} "),
            &secrets,
        );
    }
}
