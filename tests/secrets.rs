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
  # A failed Roundcube login takes ~1.5 s: these get their own timeout.
  - {name: webmail-good, kind: webmail_login, app: roundcube, url: "https://webmail.example.test/roundcube/", credentials: good, interval: 6s, timeout: 5s}
  - {name: webmail-wrong, kind: webmail_login, app: roundcube, url: "https://webmail.example.test/roundcube/", credentials: wrong, interval: 6s, timeout: 5s}
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
        for check in ["imap-good", "smtp-good", "webmail-good", "dav-good"] {
            d.wait_for(
                "cutover_probe_success",
                &[("check", check), ("env", "new")],
                |v| v == 1.0,
                Duration::from_secs(10),
            );
        }
        for check in [
            "imap-plain-wrong",
            "imap-login-wrong",
            "smtp-wrong",
            "webmail-wrong",
            "dav-wrong",
        ] {
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
            "webmail-good",
            "webmail-wrong",
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

/// Operator-named secret and key files are read bounded, and what is no
/// regular file (`/dev/zero`, a FIFO nobody writes to) is refused at once
/// with the file and field named, instead of hanging the loader.
#[test]
fn secret_and_key_files_that_are_no_small_regular_file_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 64 * 1024 + 1]).unwrap();
    let config = dir.path().join("checks.yaml");
    let web = dir.path().join("web.yml");
    for (path, reason) in [
        ("/dev/zero", "not a regular file"),
        (fifo.to_str().unwrap(), "not a regular file"),
        (big.to_str().unwrap(), "larger than the limit of 65536 bytes"),
    ] {
        std::fs::write(
            &config,
            format!(
                "environments:\n  old: {{addresses: [127.0.0.10]}}\ncredentials:\n  probe: {{username: u@example.test, password_file: {path}}}\nchecks:\n  - {{name: i, kind: imap, host: imap.example.test, credentials: probe}}\n"
            ),
        )
        .unwrap();
        std::fs::write(
            &web,
            format!("tls_server_config:\n  cert_file: {path}\n  key_file: {path}\n"),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let (code, out, err) = common::validate(&config, Some(&web));
        assert!(started.elapsed() < Duration::from_secs(5), "validate hung on {path}");
        assert_ne!(code, 0, "{out}{err}");
        let text = format!("{out}{err}");
        for field in [
            "credentials.probe.password_file",
            "tls_server_config.cert_file",
            "tls_server_config.key_file",
        ] {
            assert!(
                text.contains(&format!("field `{field}`")) && text.contains(&format!("cannot read {path}: {reason}")),
                "{field} {path}: {text}"
            );
        }
    }
}
