//! No password, AUTH string or its base64 forms appears anywhere a user can
//! see: logs at trace level (text and JSON), /metrics, /probe, the JSON APIs,
//! the status page as a browser renders it, and the `check` command's table
//! and JSON output, whether the login succeeds or fails — for every kind that
//! logs in, `mailflow` (SMTP and IMAP) included.

mod common;

use std::time::Duration;

use base64::Engine;
use common::{Daemon, lab};
use cutover_monitor::probe::smtp::secret_forms;

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
  - name: flow-good
    kind: mailflow
    envs: [old, new]
    interval: 2s
    send: {mode: submission, host: smtp.example.test, credentials: good, to: probe@example.test}
    watch:
      - {env: old, host: imap.example.test, credentials: good}
      - {env: new, host: imap.example.test, credentials: good}
  - name: flow-wrong
    kind: mailflow
    envs: [new]
    interval: 2s
    send: {mode: submission, host: smtp.example.test, credentials: wrong, to: probe@example.test}
    watch: [{env: new, host: imap.example.test, credentials: wrong}]
"#;

/// Every check of [`CONFIG`], for `/probe`.
const CHECKS: [&str; 14] = [
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
    "flow-good",
    "flow-wrong",
];

const WRONG: &str = "Wr0ng-Secret-For-Leak-Test";

/// The probes' username: the status page blanks it out of server text.
const USER: &str = "probe@example.test";

/// The password, and the forms an AUTH exchange would carry it in: whole, and
/// as the base64 fragments any encoding that contains it carries at each of
/// the three alignments (AUTH PLAIN `\0user\0pass`, `user:pass`, ...).
fn forms(password: &str) -> Vec<String> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let user = USER;
    let mut forms = vec![
        b64(&format!("\0{user}\0{password}")),
        b64(&format!("{user}\0{user}\0{password}")),
        b64(&format!("{user}:{password}")),
    ];
    forms.extend(secret_forms(password));
    for aligned in [format!("\0{user}\0{password}"), format!("{user}:{password}")] {
        let encoded = b64(&aligned);
        assert!(
            secret_forms(password)
                .iter()
                .skip(1)
                .any(|f| encoded.contains(f.as_str())),
            "the fragments find {aligned:?}"
        );
    }
    forms
}

/// The status page after its script fetched `/api/v1/status` and rendered
/// it, as headless Chromium leaves the DOM (tests/status.rs drives it alike).
fn rendered_page(addr: std::net::SocketAddr) -> String {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("headless Chromium is needed: apt-get install chromium (.ci/run installs it)");
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("http://{addr}/"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = String::from_utf8(out.stdout).unwrap();
    assert!(
        dom.contains("data-rendered=\"1\""),
        "the page's script did not render: {dom}"
    );
    dom
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
        // mailflow logged in over SMTP and IMAP: a mail went out and was
        // found again; with the wrong password its sending was refused.
        d.wait_for(
            "cutover_mail_delivered_total",
            &[("check", "flow-good"), ("route", "new"), ("delivered_env", "new")],
            |v| v >= 1.0,
            Duration::from_secs(30),
        );
        d.wait_for(
            "cutover_mail_send_failures_total",
            &[("check", "flow-wrong"), ("route", "new"), ("reason", "auth_failed")],
            |v| v >= 1.0,
            Duration::from_secs(10),
        );
        assert_clean("/metrics", &d.scrape().text, &secrets);
        for check in CHECKS {
            let (status, body) = d.http("GET", &format!("/probe?check={check}")).unwrap();
            assert_eq!(status, 200, "{check}: {body}");
            assert_clean(&format!("/probe?check={check}"), &body, &secrets);
        }
        for path in [
            "/",
            "/-/ready",
            "/-/healthy",
            "/api/v1/status",
            "/api/v1/domains",
            "/api/v1/domains?finding=ok",
        ] {
            let (status, body) = d.http("GET", path).unwrap();
            assert_eq!(status, 200, "{path}: {body}");
            assert_clean(path, &body, &secrets);
        }
        // The server text the page shows names no user.
        let (_, status) = d.http("GET", "/api/v1/status").unwrap();
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        let details: Vec<&str> = status["matrix"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row["cells"].as_array().unwrap())
            .filter_map(|cell| cell["detail"].as_str())
            .collect();
        assert!(
            details.iter().any(|d| d.contains("<redacted>")),
            "some failure detail quotes the user: {details:?}"
        );
        for detail in &details {
            assert!(!detail.contains(USER), "/api/v1/status shows the user: {detail}");
        }
        if format == "text" {
            let dom = rendered_page(d.addr);
            assert_clean("the rendered status page", &dom, &secrets);
            assert!(
                dom.contains("&lt;redacted&gt;") && dom.contains("auth_failed"),
                "the page shows the failures' server text: {dom}"
            );
            assert!(!dom.contains(USER), "the rendered page shows the user: {dom}");
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
