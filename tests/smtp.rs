//! The `smtp` probe against the lab's real Postfix in old and new: MX
//! acceptance that sends nothing, submission whose message lands in the right
//! environment's mailbox, AUTH failures, a stopped server, relay checks
//! against a really open relay, and in-process fakes for the faults Postfix
//! will not produce on demand.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

use common::{Daemon, check_cmd, lab, lab_fault};

/// Environments and the lab credential; checks are appended.
const BASE: &str = r#"
defaults: {interval: 30s, timeout: 5s, ca_file: "{{CA}}"}
environments:
  old: {addresses: [127.0.0.10]}
  new: {addresses: [127.0.0.20]}
credentials:
  probe: {username: probe@example.test, password_file: "{{PASSWORD_FILE}}"}
checks:
"#;

const ENVS: [(&str, &str); 2] = [("old", "127.0.0.10"), ("new", "127.0.0.20")];

/// `check --format json` on BASE plus `checks`; the rows and everything printed.
fn check_json(checks: &str, args: &[&str]) -> (Vec<Value>, String) {
    let mut all = vec!["--format", "json"];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = check_cmd(&format!("{BASE}{checks}"), &all);
    let rows: Vec<Value> = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("check exited {code} without JSON ({e}):\n{stdout}\n{stderr}"));
    (rows, format!("{stdout}\n{stderr}"))
}

fn row<'a>(rows: &'a [Value], check: &str, env: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["check"] == check && r["env"] == env)
        .unwrap_or_else(|| panic!("no row for {check}/{env} in {rows:#?}"))
}

fn phases(row: &Value) -> Vec<&str> {
    row["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect()
}

/// Asserts a failed row's reason and phase; returns its detail.
fn failed<'a>(row: &'a Value, reason: &str, phase: &str) -> &'a str {
    assert_eq!(row["success"], false, "{row:#}");
    assert_eq!(
        (row["reason"].as_str(), row["phase"].as_str()),
        (Some(reason), Some(phase)),
        "{row:#}"
    );
    row["detail"].as_str().unwrap()
}

fn ok(row: &Value) {
    assert_eq!(row["success"], true, "{row:#}");
}

/// A name no other run (or other engineer's test) uses.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn lab_dir() -> PathBuf {
    PathBuf::from(lab().var("DIR"))
}

/// Files under `dir` whose bytes contain `needle` (mailboxes, queue files).
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_containing(&path, needle));
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                found.push(path);
            }
        }
    }
    found
}

/// Waits until the env's Postfix log, from byte `from` on, contains `needle`.
fn wait_log(env: &str, from: u64, needle: &str) {
    let path = lab_dir().join(format!("log/{env}-postfix.log"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read(&path).unwrap_or_default();
        let new = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
        if new.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} has no {needle:?} since our run:\n{new}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn log_len(env: &str) -> u64 {
    std::fs::metadata(lab_dir().join(format!("log/{env}-postfix.log"))).map_or(0, |m| m.len())
}

#[test]
fn mx_accepts_the_local_recipient_in_both_envs_says_which_server_answered_and_sends_nothing() {
    lab();
    let helo = format!("{}.cutover.invalid", unique("mx-test"));
    let mut checks = String::new();
    for (env, _) in ENVS {
        checks += &format!(
            r#"
  - name: mx-{env}
    kind: smtp
    envs: [{env}]
    host: mx.example.test
    mode: mx
    helo: {helo}
    rcpt_to: probe@example.test
    expect:
      banner: "^mx-{env}\\.example\\.test ESMTP"
      ehlo: "^mx-{env}\\.example\\.test$"
      extensions: [SIZE, 8BITMIME, PIPELINING]
"#
        );
    }
    checks += r#"
  - name: mx-is-old
    kind: smtp
    host: mx.example.test
    mode: mx
    rcpt_to: probe@example.test
    expect: {banner: "^mx-old\\."}
"#;
    let logs = ENVS.map(|(env, _)| log_len(env));
    let (rows, _) = check_json(&checks, &[]);
    for (env, _) in ENVS {
        let r = row(&rows, &format!("mx-{env}"), env);
        ok(r);
        assert_eq!(
            phases(r),
            [
                "connect",
                "banner",
                "ehlo",
                "starttls",
                "tls",
                "mail_from",
                "rcpt_to",
                "quit"
            ],
            "{r:#}"
        );
        assert!(r["cert_sha256"].is_string(), "STARTTLS certificate recorded: {r:#}");
    }
    // The banner is the cheapest proof of which server answered.
    ok(row(&rows, "mx-is-old", "old"));
    let detail = failed(row(&rows, "mx-is-old", "new"), "content_mismatch", "banner");
    assert!(detail.contains("mx-new.example.test"), "{detail}");

    // Postfix's own session summary: the recipient was accepted, then RSET
    // and QUIT, and no DATA.
    for (i, (env, _)) in ENVS.iter().enumerate() {
        wait_log(env, logs[i], "ehlo=2 starttls=1 mail=1 rcpt=1 rset=1 quit=1 commands=7");
    }
    // A delivered or queued message would carry our EHLO name in its Received header.
    std::thread::sleep(Duration::from_secs(1));
    for (env, _) in ENVS {
        for dir in ["mail", "spool"] {
            let found = files_containing(&lab_dir().join(env).join(dir), &helo);
            assert!(found.is_empty(), "mx mode sent mail in {env}: {found:?}");
        }
    }
}

/// Finds messages whose subject contains `subject` in probe@'s INBOX over
/// IMAPS at `ip`, waiting up to `wait` for delivery, and deletes them.
fn imap_take(ip: &str, subject: &str, wait: Duration) -> usize {
    let lab = lab();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::pem::PemObject::pem_file_iter(lab.var("CA")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let deadline = Instant::now() + wait;
        loop {
            let tcp = tokio::net::TcpStream::connect((ip, 993)).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("imap.example.test").unwrap();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config.clone()))
                .connect(name, tcp)
                .await
                .unwrap();
            let mut client = async_imap::Client::new(tls);
            client.read_response().await.unwrap();
            let mut session = client
                .login(lab.var("USER"), lab.password())
                .await
                .map_err(|(e, _)| e)
                .unwrap();
            session.select("INBOX").await.unwrap();
            let found = session.search(format!("SUBJECT \"{subject}\"")).await.unwrap();
            if !found.is_empty() {
                let set: Vec<String> = found.iter().map(u32::to_string).collect();
                {
                    use futures::StreamExt;
                    let stream = session.store(set.join(","), "+FLAGS (\\Deleted)").await.unwrap();
                    let _: Vec<_> = stream.collect().await;
                    let stream = session.expunge().await.unwrap();
                    let _: Vec<_> = stream.collect().await;
                }
            }
            session.logout().await.unwrap();
            if !found.is_empty() || Instant::now() > deadline {
                return found.len();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

#[test]
fn submission_on_587_logs_in_and_its_message_lands_in_that_envs_mailbox() {
    lab();
    let name = unique("submit");
    let checks = format!(
        r#"
  - name: {name}
    kind: smtp
    host: smtp.example.test
    mode: submission
    credentials: probe
    rcpt_to: probe@example.test
    expect: {{ehlo: "^mx-(old|new)\\.example\\.test$", extensions: ["AUTH PLAIN", SIZE]}}
"#
    );
    let (rows, _) = check_json(&checks, &[]);
    for (env, _) in ENVS {
        let r = row(&rows, &name, env);
        ok(r);
        assert_eq!(
            phases(r),
            [
                "connect",
                "banner",
                "ehlo",
                "starttls",
                "tls",
                "auth",
                "mail_from",
                "rcpt_to",
                "data",
                "quit"
            ],
            "{r:#}"
        );
    }
    // Read back over IMAP: each environment's message is in its own mailbox only.
    for (env, ip) in ENVS {
        let subject = format!("{name} via {ip}:587");
        assert_eq!(imap_take(ip, &subject, Duration::from_secs(10)), 1, "{env}: {subject}");
        let other = if ip == "127.0.0.10" { "127.0.0.20" } else { "127.0.0.10" };
        assert_eq!(
            imap_take(other, &subject, Duration::ZERO),
            0,
            "{subject} leaked to {other}"
        );
    }
}

#[test]
fn submission_on_465_uses_implicit_tls_and_each_env_shows_its_certificate() {
    lab();
    let checks = r#"
  - name: smtps
    kind: smtp
    host: smtp.example.test
    mode: submission
    tls: implicit
    credentials: probe
    expect: {banner: "^mx-(old|new)\\.example\\.test ESMTP", extensions: ["AUTH PLAIN"]}
"#;
    let (rows, _) = check_json(checks, &[]);
    for (env, _) in ENVS {
        let r = row(&rows, "smtps", env);
        ok(r);
        assert_eq!(
            phases(r),
            ["connect", "tls", "banner", "ehlo", "auth", "mail_from", "quit"],
            "{r:#}"
        );
    }
    assert_ne!(
        row(&rows, "smtps", "old")["cert_sha256"],
        row(&rows, "smtps", "new")["cert_sha256"]
    );
}

/// Every base64 form a password could take in an AUTH exchange.
fn leaked_forms(user: &str, password: &str) -> Vec<String> {
    let mut forms = vec![
        password.to_string(),
        BASE64.encode(password),
        BASE64.encode(format!("\0{user}\0{password}")),
        BASE64.encode(format!("{user}\0{user}\0{password}")),
    ];
    for shift in 1..3 {
        let encoded = BASE64.encode([vec![0u8; shift], password.as_bytes().to_vec()].concat());
        forms.push(encoded[4..4 * ((shift + password.len()) / 3)].to_string());
    }
    forms
}

#[test]
fn a_wrong_password_is_auth_failed_and_never_printed_even_at_trace_level() {
    lab();
    let dir = tempfile::tempdir().unwrap();
    let wrong = "Wr0ng-but-long-password-4711";
    let file = dir.path().join("wrong.password");
    std::fs::write(&file, format!("{wrong}\n")).unwrap();
    let checks = r#"
  - name: submit-wrong
    kind: smtp
    host: smtp.example.test
    mode: submission
    credentials: wrong
  - name: smtps-wrong
    kind: smtp
    host: smtp.example.test
    mode: submission
    tls: implicit
    credentials: wrong
"#;
    let yaml = format!(
        "{}{checks}",
        BASE.replace(
            "credentials:\n",
            &format!(
                "credentials:\n  wrong: {{username: probe@example.test, password_file: \"{}\"}}\n",
                file.display()
            )
        )
    );
    let (code, stdout, stderr) = check_cmd(&yaml, &["--format", "json", "--log.level", "trace"]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    let rows: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    for check in ["submit-wrong", "smtps-wrong"] {
        for (env, _) in ENVS {
            let detail = failed(row(&rows, check, env), "auth_failed", "auth");
            assert!(detail.contains("535"), "{detail}");
        }
    }
    let (_, table, table_err) = check_cmd(&yaml, &["--log.level", "trace"]);
    let everything = format!("{stdout}{stderr}{table}{table_err}");
    for form in leaked_forms("probe@example.test", wrong) {
        assert!(!everything.contains(&form), "output contains {form:?}:\n{everything}");
    }
}

#[test]
fn a_password_changed_only_on_new_fails_new_with_auth_failed_and_not_old() {
    let lab = lab();
    let checks = r#"
  - name: submit
    kind: smtp
    host: smtp.example.test
    mode: submission
    credentials: probe
"#;
    let _restore = lab_fault(
        &["user", "passwd", "new", "probe", "migrated-wrongly-0815"],
        &["user", "reset"],
    );
    let (rows, out) = check_json(checks, &[]);
    ok(row(&rows, "submit", "old"));
    let detail = failed(row(&rows, "submit", "new"), "auth_failed", "auth");
    assert!(
        detail.contains("probe@example.test") && detail.contains("535"),
        "{detail}"
    );
    assert!(!out.contains(lab.password()), "the lab password was printed");
}

#[test]
fn stopping_new_postfix_fails_new_with_refused_and_leaves_old_alone() {
    lab();
    let checks = r#"
  - name: mx
    kind: smtp
    host: mx.example.test
    mode: mx
    rcpt_to: probe@example.test
  - name: submit
    kind: smtp
    host: smtp.example.test
    mode: submission
    credentials: probe
"#;
    let _restore = lab_fault(&["svc", "stop", "new", "postfix"], &["svc", "start", "new", "postfix"]);
    let (rows, _) = check_json(checks, &[]);
    for check in ["mx", "submit"] {
        ok(row(&rows, check, "old"));
        failed(row(&rows, check, "new"), "refused", "connect");
    }
}

/// Restores an environment's Postfix main.cf byte for byte and reloads it,
/// even when the test panics.
struct PostfixConfig {
    dir: PathBuf,
    original: Vec<u8>,
}

impl PostfixConfig {
    fn change(env: &str, setting: &str) -> PostfixConfig {
        let dir = lab_dir().join(env).join("postfix");
        let guard = PostfixConfig {
            original: std::fs::read(dir.join("main.cf")).unwrap(),
            dir,
        };
        guard.postfix("postconf", &["-e", setting]);
        guard.postfix("postfix", &["reload"]);
        guard
    }

    fn postfix(&self, tool: &str, args: &[&str]) {
        let bin = Path::new("/usr/sbin").join(tool);
        let out = Command::new(if bin.exists() { bin } else { PathBuf::from(tool) })
            .arg("-c")
            .arg(&self.dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PostfixConfig {
    fn drop(&mut self) {
        std::fs::write(self.dir.join("main.cf"), &self.original).unwrap();
        self.postfix("postfix", &["reload"]);
    }
}

const RELAY_CHECK: &str = r#"
  - name: relay
    kind: smtp
    host: mx.example.test
    mode: relay_check
    rcpt_to: someone@external.invalid
"#;

#[test]
fn relay_check_passes_on_the_lab_and_catches_a_really_open_relay() {
    lab();
    let (rows, _) = check_json(RELAY_CHECK, &[]);
    for (env, _) in ENVS {
        let r = row(&rows, "relay", env);
        ok(r);
        assert!(phases(r).contains(&"rcpt_to") && !phases(r).contains(&"data"), "{r:#}");
    }
    {
        // The classic mistake: trusting "local" clients, which behind a proxy
        // or load balancer is everybody.
        let _open = PostfixConfig::change(
            "new",
            "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let rows = loop {
            let (rows, _) = check_json(RELAY_CHECK, &[]);
            if row(&rows, "relay", "new")["success"] == false || Instant::now() > deadline {
                break rows;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        ok(row(&rows, "relay", "old"));
        let detail = failed(row(&rows, "relay", "new"), "open_relay", "rcpt_to");
        assert!(
            detail.contains("someone@external.invalid") && detail.contains("250"),
            "{detail}"
        );
    }
    // Restored: the guard's reload closes the relay again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (rows, _) = check_json(RELAY_CHECK, &["--env", "new"]);
        if row(&rows, "relay", "new")["success"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "new is still an open relay: {rows:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn each_steps_last_reply_code_is_exported() {
    lab();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let yaml = format!(
        "{}{RELAY_CHECK}{}",
        BASE.replace("interval: 30s, timeout: 5s", "interval: 2s, timeout: 1500ms")
            .replace(
                "credentials:\n",
                &format!(
                    "credentials:\n  wrong: {{username: probe@example.test, password_file: \"{}\"}}\n",
                    wrong.display()
                )
            ),
        r#"
  - name: mx
    kind: smtp
    host: mx.example.test
    mode: mx
    rcpt_to: probe@example.test
  - name: submit-wrong
    kind: smtp
    envs: [new]
    host: smtp.example.test
    mode: submission
    credentials: wrong
"#
    );
    let d = Daemon::start(&yaml);
    let code = |check: &'static str, env: &'static str, step: &'static str, want: f64| {
        d.wait_for(
            "cutover_smtp_last_reply_code",
            &[("check", check), ("env", env), ("step", step)],
            |v| v == want,
            Duration::from_secs(10),
        );
    };
    for (env, _) in ENVS {
        code("mx", env, "banner", 220.0);
        code("mx", env, "ehlo", 250.0);
        code("mx", env, "starttls", 220.0);
        code("mx", env, "mail_from", 250.0);
        code("mx", env, "rcpt_to", 250.0);
        code("mx", env, "rset", 250.0);
        code("mx", env, "quit", 221.0);
        code("relay", env, "rcpt_to", 554.0);
    }
    code("submit-wrong", "new", "auth", 535.0);
    let failures = [("check", "submit-wrong"), ("env", "new"), ("reason", "auth_failed")];
    d.wait_for(
        "cutover_probe_failures_total",
        &failures,
        |v| v >= 1.0,
        Duration::from_secs(10),
    );
    let s = d.scrape();
    assert_eq!(
        s.get(
            "cutover_smtp_last_reply_code",
            &[("check", "submit-wrong"), ("step", "mail_from")]
        ),
        None,
        "no MAIL FROM after a failed AUTH"
    );
}

// ---------------------------------------------------------------------------
// In-process fakes for faults Postfix will not produce on demand.
// ---------------------------------------------------------------------------

/// A one-connection SMTP server on 127.0.0.1 playing `script`; returns its
/// port and what the client sent.
fn fake(script: fn(&mut BufReader<TcpStream>, &mut TcpStream)) -> (u16, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        script(&mut reader, &mut stream);
        // Report whatever else the client said until it hangs up.
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut rest = String::new();
        while reader.read_line(&mut rest).is_ok_and(|n| n > 0) {}
        let _ = tx.send(rest);
    });
    (port, rx)
}

fn fake_check(port: u16, timeout: &str) -> Value {
    let yaml = format!(
        r#"
defaults: {{interval: 30s, timeout: {timeout}}}
environments:
  fake: {{addresses: [127.0.0.1]}}
checks:
  - name: fake
    kind: smtp
    host: mx.example.test
    port: {port}
    mode: mx
    rcpt_to: probe@example.test
"#
    );
    let (_, stdout, stderr) = check_cmd(&yaml, &["--format", "json"]);
    let rows: Vec<Value> = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}"));
    rows.into_iter().next().unwrap()
}

fn expect_line(reader: &mut BufReader<TcpStream>, prefix: &str) {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with(prefix), "expected {prefix}, client sent {line:?}");
}

#[test]
fn a_server_that_greets_and_hangs_times_out_in_ehlo_within_the_timeout() {
    let (port, _) = fake(|reader, stream| {
        stream.write_all(b"220 fake ESMTP\r\n").unwrap();
        expect_line(reader, "EHLO cutover-monitor.invalid");
        std::thread::sleep(Duration::from_secs(5));
    });
    let r = fake_check(port, "1s");
    failed(&r, "timeout", "ehlo");
    let took = r["duration_seconds"].as_f64().unwrap();
    assert!((1.0..1.1).contains(&took), "took {took}s for a 1s timeout");
}

#[test]
fn a_server_that_answers_garbage_is_a_protocol_failure() {
    let (port, _) = fake(|_, stream| {
        stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
    });
    let detail = failed(&fake_check(port, "2s"), "protocol", "banner").to_string();
    assert!(detail.contains("HTTP/1.1 400"), "{detail}");
}

#[test]
fn a_server_without_starttls_is_starttls_missing_and_gets_a_quit() {
    let (port, said) = fake(|reader, stream| {
        stream.write_all(b"220 fake ESMTP\r\n").unwrap();
        expect_line(reader, "EHLO ");
        stream
            .write_all(b"250-fake\r\n250-SIZE 1000\r\n250 8BITMIME\r\n")
            .unwrap();
    });
    let r = fake_check(port, "2s");
    failed(&r, "starttls_missing", "starttls");
    let said = said.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(said, "QUIT\r\n", "no mail command after a missing STARTTLS");
}

#[test]
fn a_421_to_ehlo_is_smtp_4xx_naming_the_step_and_the_server_text() {
    let (port, _) = fake(|reader, stream| {
        stream.write_all(b"220 fake ESMTP\r\n").unwrap();
        expect_line(reader, "EHLO ");
        stream.write_all(b"421 4.3.2 Service shutting down\r\n").unwrap();
    });
    let detail = failed(&fake_check(port, "2s"), "smtp_4xx", "ehlo").to_string();
    assert!(
        detail.contains("EHLO") && detail.contains("421 4.3.2 Service shutting down"),
        "{detail}"
    );
}
