//! The `imap` probe against the lab's real Dovecot in old and new: logins on
//! 993 and on 143 with STARTTLS, wrong and migrated-wrong passwords, a stopped
//! server, and in-process fakes for what Dovecot will not do on demand (hang,
//! garbage, no STARTTLS, echoing the password back).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::{Daemon, check_cmd, lab, lab_fault};

const SECS: Duration = Duration::from_secs(1);

/// Both environments and live, 993 and 143; each greeting names its server.
const IMAP: &str = r#"
defaults: {interval: 1s, timeout: 900ms, ca_file: "{{CA}}"}
environments:
  old: {addresses: [127.0.0.10]}
  new: {addresses: [127.0.0.20]}
  live: {resolver: 127.0.0.30}
credentials:
  probe: {username: probe@example.test, password_file: "{{PASSWORD_FILE}}"}
checks:
  - name: imaps
    kind: imap
    host: imap.example.test
    credentials: probe
    expect: {greeting: "^Dovecot \\((old|new)\\) ready\\.$", capability: "AUTH=PLAIN", folders: [INBOX]}
  - name: imap-starttls
    kind: imap
    host: imap.example.test
    tls: starttls
    auth: plain
    credentials: probe
  - {name: imaps-is-old, kind: imap, host: imap.example.test, credentials: probe, envs: [old, new], expect: {greeting: "Dovecot \\(old\\)"}}
  - {name: imaps-is-new, kind: imap, host: imap.example.test, credentials: probe, envs: [old, new], expect: {greeting: "Dovecot \\(new\\)"}}
  - {name: imap-starttls-is-new, kind: imap, host: imap.example.test, tls: starttls, credentials: probe, envs: [old, new], expect: {greeting: "Dovecot \\(new\\)"}}
"#;

fn at<'a>(check: &'a str, env: &'a str) -> [(&'a str, &'a str); 2] {
    [("check", check), ("env", env)]
}

#[test]
fn login_works_on_993_and_143_starttls_in_both_envs_and_the_greeting_proves_which() {
    lab();
    let d = Daemon::start(IMAP);
    for env in ["old", "new", "live"] {
        for check in ["imaps", "imap-starttls"] {
            d.wait_for("cutover_probe_success", &at(check, env), |v| v == 1.0, 5 * SECS);
        }
    }
    // The same hostname, pinned: only the pinned environment's Dovecot matches.
    for (check, good, bad) in [
        ("imaps-is-old", "old", "new"),
        ("imaps-is-new", "new", "old"),
        ("imap-starttls-is-new", "new", "old"),
    ] {
        d.wait_for("cutover_probe_success", &at(check, good), |v| v == 1.0, 5 * SECS);
        d.wait_for("cutover_probe_success", &at(check, bad), |v| v == 0.0, 5 * SECS);
        let reason = [("check", check), ("env", bad), ("reason", "content_mismatch")];
        assert!(d.scrape().get("cutover_probe_failures_total", &reason).unwrap() >= 1.0);
    }
    let s = d.scrape();
    let phase = |check: &str, env: &str, phase: &str| {
        s.get(
            "cutover_probe_phase_duration_seconds",
            &[("check", check), ("env", env), ("phase", phase)],
        )
    };
    for env in ["old", "new"] {
        for p in [
            "connect",
            "tls",
            "greeting",
            "capability",
            "login",
            "select",
            "list",
            "logout",
        ] {
            let v = phase("imaps", env, p);
            assert!(v.is_some_and(|v| v > 0.0 && v < 1.0), "imaps {env} phase {p}: {v:?}");
        }
        for p in [
            "connect",
            "greeting",
            "capability",
            "starttls",
            "tls",
            "login",
            "select",
            "logout",
        ] {
            let v = phase("imap-starttls", env, p);
            assert!(
                v.is_some_and(|v| v > 0.0 && v < 1.0),
                "imap-starttls {env} phase {p}: {v:?}"
            );
        }
        let messages = s.get(
            "cutover_imap_mailbox_messages",
            &[("check", "imaps"), ("env", env), ("mailbox", "INBOX")],
        );
        assert!(
            messages.is_some_and(|m| m >= 0.0),
            "{env}: {}",
            s.matching("cutover_imap")
        );
    }
    // Old and new present their own certificates, on 993 and after STARTTLS.
    let fingerprint = |check: &str, env: &str| {
        s.series("cutover_tls_cert_info")
            .into_iter()
            .find(|(l, _)| {
                l.iter().any(|(k, v)| k == "env" && v == env) && l.iter().any(|(k, v)| k == "check" && v == check)
            })
            .and_then(|(l, _)| l.into_iter().find(|(k, _)| k == "sha256").map(|(_, v)| v))
            .unwrap_or_else(|| panic!("no certificate for {check} {env}"))
    };
    assert_ne!(fingerprint("imaps", "old"), fingerprint("imaps", "new"));
    assert_eq!(fingerprint("imaps", "new"), fingerprint("imap-starttls", "new"));
}

#[test]
fn a_wrong_password_is_auth_failed_and_never_shown() {
    let lab = lab();
    let dir = tempfile::tempdir().unwrap();
    let wrong = "Wr0ng-\"pass\\word";
    let file = dir.path().join("wrong.password");
    std::fs::write(&file, format!("{wrong}\n")).unwrap();
    let yaml = format!(
        "defaults: {{timeout: 5s, ca_file: \"{{{{CA}}}}\"}}\nenvironments:\n  old: {{addresses: [127.0.0.10]}}\n  new: {{addresses: [127.0.0.20]}}\ncredentials:\n  wrong: {{username: probe@example.test, password_file: \"{}\"}}\nchecks:\n  - {{name: imaps, kind: imap, host: imap.example.test, credentials: wrong}}\n  - {{name: imap-plain, kind: imap, host: imap.example.test, tls: starttls, auth: plain, credentials: wrong}}\n",
        file.display()
    );
    let (code, out, err) = check_cmd(&yaml, &["--format", "json"]);
    assert_eq!(code, 2, "{out}{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 4, "{out}");
    for row in rows.as_array().unwrap() {
        assert_eq!(row["reason"], "auth_failed", "{row}");
        assert_eq!(row["phase"], "login", "{row}");
        let detail = row["detail"].as_str().unwrap();
        assert!(detail.contains("Authentication failed"), "{row}");
    }
    for text in [&out, &err] {
        assert!(!text.contains("Wr0ng") && !text.contains(lab.password()), "{text}");
    }
}

#[test]
fn a_password_changed_only_on_new_fails_new_and_not_old() {
    lab();
    let d = Daemon::start(IMAP);
    for env in ["old", "new"] {
        d.wait_for("cutover_probe_success", &at("imaps", env), |v| v == 1.0, 5 * SECS);
    }
    let guard = lab_fault(
        &["user", "passwd", "new", "probe@example.test", "not-migrated-42"],
        &["user", "reset"],
    );
    for check in ["imaps", "imap-starttls"] {
        d.wait_for("cutover_probe_success", &at(check, "new"), |v| v == 0.0, 5 * SECS);
        let reason = [("check", check), ("env", "new"), ("reason", "auth_failed")];
        d.wait_for("cutover_probe_failures_total", &reason, |v| v >= 1.0, 5 * SECS);
    }
    // Old ran meanwhile and never failed.
    let s = d.scrape();
    for check in ["imaps", "imap-starttls"] {
        assert_eq!(s.get("cutover_probe_success", &at(check, "old")), Some(1.0));
        let old_failures = s
            .series("cutover_probe_failures_total")
            .into_iter()
            .filter(|(l, _)| {
                l.iter().any(|(k, v)| k == "env" && v == "old") && l.iter().any(|(k, v)| k == "check" && v == check)
            })
            .count();
        assert_eq!(old_failures, 0, "{}", s.matching("cutover_probe_failures_total"));
    }
    drop(guard);
    d.wait_for("cutover_probe_success", &at("imaps", "new"), |v| v == 1.0, 5 * SECS);
}

#[test]
fn stopping_new_dovecot_fails_new_with_refused_and_leaves_old_alone() {
    lab();
    let d = Daemon::start(IMAP);
    for env in ["old", "new"] {
        d.wait_for("cutover_probe_success", &at("imaps", env), |v| v == 1.0, 5 * SECS);
    }
    let guard = lab_fault(&["svc", "stop", "new", "dovecot"], &["svc", "start", "new", "dovecot"]);
    for check in ["imaps", "imap-starttls"] {
        d.wait_for("cutover_probe_success", &at(check, "new"), |v| v == 0.0, 5 * SECS);
        let reason = [("check", check), ("env", "new"), ("reason", "refused")];
        d.wait_for("cutover_probe_failures_total", &reason, |v| v >= 1.0, 5 * SECS);
    }
    let s = d.scrape();
    assert_eq!(s.get("cutover_probe_success", &at("imaps", "old")), Some(1.0));
    assert_eq!(s.get("cutover_probe_success", &at("imap-starttls", "old")), Some(1.0));
    // A refused run has no later phases and no mailbox count.
    assert_eq!(
        s.get(
            "cutover_probe_phase_duration_seconds",
            &[("check", "imaps"), ("env", "new"), ("phase", "login")]
        ),
        None
    );
    assert_eq!(s.get("cutover_imap_mailbox_messages", &at("imaps", "new")), None);
    drop(guard);
    for check in ["imaps", "imap-starttls"] {
        d.wait_for("cutover_probe_success", &at(check, "new"), |v| v == 1.0, 10 * SECS);
    }
}

// ---------------------------------------------------------------------------
// Fakes: what the real servers will not do on demand.
// ---------------------------------------------------------------------------

/// A plain-text IMAP server on 127.0.0.1 that runs `script` for every
/// connection, with the client's lines readable through the reader.
fn fake(script: fn(&mut BufReader<TcpStream>, &mut TcpStream)) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut out = stream.try_clone().unwrap();
                let mut input = BufReader::new(stream);
                script(&mut input, &mut out);
                // Hold the connection open until the client goes.
                let mut rest = String::new();
                while input.read_line(&mut rest).is_ok_and(|n| n > 0) {}
            });
        }
    });
    port
}

/// Reads one command line and returns its tag.
fn command(input: &mut BufReader<TcpStream>) -> (String, String) {
    let mut line = String::new();
    input.read_line(&mut line).unwrap();
    let (tag, rest) = line.trim_end().split_once(' ').unwrap_or(("?", ""));
    (tag.to_string(), rest.to_string())
}

fn greet_and_answer_capability(input: &mut BufReader<TcpStream>, out: &mut TcpStream, caps: &str) {
    out.write_all(b"* OK fake IMAP ready\r\n").unwrap();
    let (tag, cmd) = command(input);
    assert_eq!(cmd, "CAPABILITY");
    write!(out, "* CAPABILITY {caps}\r\n{tag} OK done\r\n").unwrap();
}

/// Runs one check against a fake on `port` and returns its JSON row.
fn run_fake(port: u16, tls: &str, timeout: &str) -> serde_json::Value {
    let yaml = format!(
        "environments:\n  fake: {{addresses: [127.0.0.1]}}\ncredentials:\n  probe: {{username: probe@example.test, password_file: \"{{{{PASSWORD_FILE}}}}\"}}\nchecks:\n  - {{name: fake, kind: imap, host: imap.example.test, port: {port}, tls: {tls}, credentials: probe, timeout: {timeout}}}\n"
    );
    let (code, out, err) = check_cmd(&yaml, &["--format", "json"]);
    assert_eq!(code, 2, "{out}{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    assert!(!out.contains(lab().password()) && !err.contains(lab().password()));
    rows[0].clone()
}

#[test]
fn a_server_that_greets_then_hangs_times_out_naming_the_phase() {
    lab();
    let at_capability = fake(|_, out| out.write_all(b"* OK fake IMAP ready\r\n").unwrap());
    let at_login = fake(|input, out| greet_and_answer_capability(input, out, "IMAP4rev1 AUTH=PLAIN"));
    for (port, phase) in [(at_capability, "capability"), (at_login, "login")] {
        let row = run_fake(port, "none", "1s");
        assert_eq!(row["reason"], "timeout", "{row}");
        assert_eq!(row["phase"], phase, "{row}");
        let took = row["duration_seconds"].as_f64().unwrap();
        assert!((1.0..1.1).contains(&took), "took {took}s for a 1s timeout: {row}");
    }
}

#[test]
fn garbage_instead_of_imap_is_a_protocol_failure() {
    lab();
    let http = fake(|_, out| out.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap());
    let row = run_fake(http, "none", "2s");
    assert_eq!(row["reason"], "protocol", "{row}");
    assert_eq!(row["phase"], "greeting", "{row}");
    // Garbage after a good greeting, and a huge literal, are caught as well.
    let bad_caps = fake(|input, out| {
        out.write_all(b"* OK fake IMAP ready\r\n").unwrap();
        command(input);
        out.write_all(b"* CAPABILITY \x01\x02 ]]]\r\n").unwrap();
    });
    let row = run_fake(bad_caps, "none", "2s");
    assert_eq!(
        (row["reason"].as_str(), row["phase"].as_str()),
        (Some("protocol"), Some("capability")),
        "{row}"
    );
    let huge = fake(|input, out| {
        out.write_all(b"* OK fake IMAP ready\r\n").unwrap();
        command(input);
        out.write_all(b"* CAPABILITY {400000000}\r\n").unwrap();
    });
    let row = run_fake(huge, "none", "2s");
    assert_eq!(
        (row["reason"].as_str(), row["phase"].as_str()),
        (Some("oversize"), Some("capability")),
        "{row}"
    );
}

#[test]
fn a_server_without_starttls_is_starttls_missing_and_gets_no_password() {
    lab();
    let port = fake(|input, out| greet_and_answer_capability(input, out, "IMAP4rev1 AUTH=PLAIN"));
    let row = run_fake(port, "starttls", "2s");
    assert_eq!(row["reason"], "starttls_missing", "{row}");
    // It stopped at the capability list: no login was attempted in clear.
    assert_eq!(row["phase"], "capability", "{row}");
    let phases: Vec<&str> = row["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["connect", "greeting", "capability"], "{row}");
    assert!(
        row["detail"].as_str().unwrap().contains("IMAP4rev1 AUTH=PLAIN"),
        "{row}"
    );
}

#[test]
fn a_server_echoing_the_login_back_does_not_leak_the_password() {
    lab();
    let port = fake(|input, out| {
        greet_and_answer_capability(input, out, "IMAP4rev1 AUTH=PLAIN");
        let (tag, cmd) = command(input);
        write!(out, "{tag} NO [AUTHENTICATIONFAILED] you sent: {cmd}\r\n").unwrap();
    });
    let row = run_fake(port, "none", "2s");
    assert_eq!(row["reason"], "auth_failed", "{row}");
    let detail = row["detail"].as_str().unwrap();
    assert!(
        detail.contains(r#"you sent: LOGIN "probe@example.test" "<redacted>""#),
        "{detail}"
    );
}
