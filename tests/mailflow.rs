//! `kind: mailflow` against the lab's real Postfix and Dovecot: probe mails are
//! sent, found again over IMAP, accounted for in the ledger and cleaned up —
//! and nothing else in the mailbox is touched.
//!
//! The tests watch `other@example.test`, which no other test uses, and read the
//! ledger (`<storage>/ledger.sqlite`) directly, as an operator would.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, lab, lab_script};
use cutover_monitor::probe::mailflow::marker;

const USER: &str = "other";

/// A mailflow check sending through `send_env`'s submission port to `other`,
/// watching `other`'s INBOX in old and new.
fn config(interval: &str, timeout: &str, extra: &str, envs: &str, send: &str) -> String {
    format!(
        "defaults:
  ca_file: {{{{CA}}}}
environments:
  old: {{addresses: [127.0.0.10]}}
  new: {{addresses: [127.0.0.20]}}
  live: {{resolver: 127.0.0.30}}
credentials:
  probe: {{username: probe@example.test, password_file: {{{{PASSWORD_FILE}}}}}}
  other: {{username: other@example.test, password_file: {{{{PASSWORD_FILE}}}}}}
checks:
  - name: flow
    kind: mailflow
    envs: [{envs}]
    interval: {interval}
    timeout: {timeout}
{extra}    send: {send}
    watch:
      - {{env: old, host: imap.example.test, credentials: other}}
      - {{env: new, host: imap.example.test, credentials: other}}
"
    )
}

const SUBMISSION: &str = "{mode: submission, host: smtp.example.test, credentials: probe, to: other@example.test}";

/// The daemon on a storage directory that outlives it (restarts reuse it).
fn start(yaml: &str, storage: &Path) -> Daemon {
    Daemon::start_with(yaml, &["--storage.path", storage.to_str().unwrap()])
}

/// `$LAB/<env>/mail/example.test/<user>`.
fn maildir(env: &str) -> PathBuf {
    PathBuf::from(lab().var("DIR"))
        .join(env)
        .join("mail/example.test")
        .join(USER)
}

/// The messages in a Maildir INBOX (new and cur), with their content.
fn messages(env: &str) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(dir) = std::fs::read_dir(maildir(env).join(sub)) else {
            continue;
        };
        for entry in dir.flatten() {
            if let Ok(text) = std::fs::read_to_string(entry.path()) {
                out.push((entry.path(), text));
            }
        }
    }
    out
}

/// Removes messages this test put there (by a marker text), so the next test
/// starts from the same mailbox.
fn purge(needle: &str) {
    for env in ["old", "new"] {
        for (path, text) in messages(env) {
            if text.contains(needle) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Purges the probe mails of the daemon keeping its identity in this storage
/// directory when dropped, even when the test failed. Declare it before the
/// daemon, so the daemon is stopped first.
struct PurgeOnDrop(PathBuf);

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        if let Ok(instance) = std::fs::read_to_string(self.0.join(cutover_monitor::ledger::INSTANCE_FILE)) {
            purge(&format!("instance={}", instance.trim()));
        }
    }
}

/// This daemon's instance id and marker key, as it keeps them in the storage directory.
fn identity(storage: &Path) -> (String, String) {
    let read = |f: &str| std::fs::read_to_string(storage.join(f)).unwrap().trim().to_string();
    (
        read(cutover_monitor::ledger::INSTANCE_FILE),
        read(cutover_monitor::ledger::KEY_FILE),
    )
}

/// Creates the identity files before the daemon first starts, so a test can
/// plant mails for it.
fn make_identity(storage: &Path, instance: &str, key: &str) {
    std::fs::create_dir_all(storage).unwrap();
    std::fs::write(storage.join(cutover_monitor::ledger::INSTANCE_FILE), instance).unwrap();
    std::fs::write(storage.join(cutover_monitor::ledger::KEY_FILE), key).unwrap();
}

/// Delivers a raw message through `ip`'s port 25 (no AUTH: a local recipient).
fn inject(ip: &str, message: &str) {
    let stream = TcpStream::connect((ip, 25)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    let expect = |reader: &mut BufReader<TcpStream>, code: &str| loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with(code), "wanted {code}, got {line:?}");
        if line.as_bytes().get(3) == Some(&b' ') {
            break;
        }
    };
    expect(&mut reader, "220");
    for (cmd, code) in [
        ("EHLO test.invalid", "250"),
        ("MAIL FROM:<>", "250"),
        ("RCPT TO:<other@example.test>", "250"),
        ("DATA", "354"),
    ] {
        write!(w, "{cmd}\r\n").unwrap();
        expect(&mut reader, code);
    }
    let body = message.replace("\r\n", "\n").replace('\n', "\r\n");
    write!(w, "{body}\r\n.\r\n").unwrap();
    expect(&mut reader, "250");
    write!(w, "QUIT\r\n").unwrap();
}

fn mail(subject: &str, marker: Option<&str>) -> String {
    let marker = marker.map_or(String::new(), |m| format!("X-Cutover-Probe: {m}\n"));
    format!(
        "From: <test@example.test>\nTo: <other@example.test>\nSubject: {subject}\nMessage-ID: <{subject}@test.invalid>\n{marker}\nplanted by tests/mailflow.rs\n"
    )
}

/// The ledger, read-only, while the daemon may still be writing (WAL).
fn ledger(storage: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        storage.join(cutover_monitor::ledger::DB_FILE),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
}

/// The first column of every row `sql` selects.
fn column<T: rusqlite::types::FromSql>(db: &rusqlite::Connection, sql: &str) -> Vec<T> {
    db.prepare(sql)
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn count(db: &rusqlite::Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn states(storage: &Path) -> HashMap<String, i64> {
    let db = ledger(storage);
    let mut stmt = db.prepare("SELECT state, COUNT(*) FROM mails GROUP BY state").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "{what} did not happen within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn value(d: &Daemon, name: &str, labels: &[(&str, &str)]) -> f64 {
    d.scrape().get(name, labels).unwrap_or(0.0)
}

/// `late_after`/`lost_after` short enough that a missing mail is declared
/// lost within a test.
const SHORT_AGES: &str = "    late_after: 5s\n    lost_after: 15s\n";
/// `lost_after` of [`SHORT_AGES`].
const SHORT_LOST_AFTER: Duration = Duration::from_secs(15);

/// Waits until every mail accepted so far is settled — delivered, or lost
/// once [`SHORT_LOST_AFTER`] has passed — then asserts none was lost, in the
/// ledger and in `cutover_mail_lost_total`.
fn settle_then_assert_none_lost(d: &Daemon, storage: &Path, labels: &[(&str, &str)]) {
    let now = cutover_monitor::unix_now();
    wait_until(
        "every mail accepted so far delivered or lost",
        SHORT_LOST_AFTER + Duration::from_secs(10),
        || {
            count(
                &ledger(storage),
                &format!("SELECT COUNT(*) FROM mails WHERE state = 'sent' AND accepted < {now}"),
            ) == 0
        },
    );
    let db = ledger(storage);
    let lost: Vec<String> = column(&db, "SELECT id FROM mails WHERE state = 'lost'");
    assert!(lost.is_empty(), "lost mails: {lost:?}\nlog:\n{}", d.logs());
    assert_eq!(value(d, "cutover_mail_lost_total", labels), 0.0);
}

#[test]
fn submission_to_new_is_delivered_in_new_with_its_latency_and_cleaned_up() {
    let storage = tempfile::tempdir().unwrap();
    let _purge = PurgeOnDrop(storage.path().to_owned());
    // Daemons elsewhere (a soak, another checkout's tests) may share the
    // mailbox: its size is counted without their probe mails.
    let ordinary = || {
        messages("new")
            .iter()
            .filter(|(_, t)| !t.contains("X-Cutover-Probe:"))
            .count()
    };
    let before = ordinary();
    let d = start(&config("3s", "2s", "", "new", SUBMISSION), storage.path());
    let route = [("check", "flow"), ("route", "new"), ("delivered_env", "new")];
    d.wait_for(
        "cutover_mail_delivered_total",
        &route,
        |v| v >= 2.0,
        Duration::from_secs(30),
    );
    let db = ledger(storage.path());
    let latencies: Vec<f64> = column(
        &db,
        "SELECT latency FROM mails WHERE state = 'delivered' AND latency IS NOT NULL",
    );
    println!("delivery latencies (s): {latencies:?}");
    assert!(!latencies.is_empty() && latencies.iter().all(|l| *l >= 0.0 && *l < 30.0));
    let scrape = d.scrape();
    let labels = [("check", "flow"), ("route", "new")];
    assert!(scrape.get("cutover_mail_delivery_seconds_count", &labels).unwrap() >= 2.0);
    assert!(scrape.get("cutover_mail_sent_total", &labels).unwrap() >= 2.0);
    assert!(
        scrape
            .get("cutover_mail_last_delivered_timestamp_seconds", &route)
            .unwrap()
            > 1.7e9
    );
    assert_eq!(scrape.get("cutover_mail_lost_total", &labels), Some(0.0));
    assert_eq!(
        scrape.get("cutover_mail_delivered_total", &[("delivered_env", "old")]),
        None,
        "{}",
        scrape.matching("cutover_mail_delivered_total")
    );
    // The watcher deletes what it recorded: the mailbox is back to its size.
    let (instance, _) = identity(storage.path());
    let own = format!("instance={instance}");
    wait_until("the mailbox back to its size", Duration::from_secs(10), || {
        ordinary() == before && !messages("new").iter().any(|(_, t)| t.contains(&own))
    });
    drop(d);
    purge(&format!("instance={instance}"));
}

#[test]
fn check_sends_one_mail_and_waits_for_it() {
    let (code, out, err) = common::check_cmd(
        &config("1m", "10s", "", "new", SUBMISSION),
        &["--format", "json", "--log.format", "json"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let phases: Vec<&str> = rows[0]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect();
    assert!(phases.ends_with(&["quit", "delivery"]), "{phases:?}");
    // It cleaned up after itself (other daemons may share the mailbox: look for its own mail).
    let id = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|l| l["fields"]["id"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no delivered id logged: {err}"));
    assert!(
        !messages("new").iter().any(|(_, t)| t.contains(&id)),
        "{id} left behind"
    );
}

#[test]
fn cleanup_removes_only_this_instances_verified_probe_mails() {
    let storage = tempfile::tempdir().unwrap();
    let _purge = PurgeOnDrop(storage.path().to_owned());
    let (instance, key) = ("00c0ffee00c0ffee", "0123456789abcdef0123456789abcdef");
    make_identity(storage.path(), instance, key);
    let tag = format!("cleanup-{}", std::process::id());
    let planted = [
        (format!("{tag}-ordinary-1"), None),
        (format!("{tag}-ordinary-2"), None),
        (
            format!("{tag}-forged"),
            Some(format!("v1 instance={instance} id=abcdef01 mac={}", "00".repeat(32))),
        ),
        (
            format!("{tag}-second-instance-1"),
            Some(marker(b"another key, another daemon", "feedfacefeedface", "aaaa0001")),
        ),
        (
            format!("{tag}-second-instance-2"),
            Some(marker(b"another key, another daemon", "feedfacefeedface", "aaaa0002")),
        ),
        // Ours and valid, from an earlier run this ledger never saw: stale, cleaned.
        (
            format!("{tag}-stale-own"),
            Some(marker(key.as_bytes(), instance, "bbbb0001")),
        ),
    ];
    for (subject, m) in &planted {
        inject("127.0.0.20", &mail(subject, m.as_deref()));
    }
    wait_until("the planted mails in new", Duration::from_secs(10), || {
        messages("new").iter().filter(|(_, t)| t.contains(&tag)).count() == planted.len()
    });
    let d = start(&config("3s", "2s", "", "new", SUBMISSION), storage.path());
    d.wait_for(
        "cutover_mail_delivered_total",
        &[("delivered_env", "new")],
        |v| v >= 2.0,
        Duration::from_secs(30),
    );
    wait_until("the stale own mail removed", Duration::from_secs(10), || {
        !messages("new")
            .iter()
            .any(|(_, t)| t.contains(&format!("{tag}-stale-own")))
    });
    let left: Vec<String> = messages("new")
        .iter()
        .filter_map(|(_, t)| {
            t.lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .filter(|s| s.starts_with(&tag))
                .map(str::to_string)
        })
        .collect();
    let mut left = left;
    left.sort();
    let mut want: Vec<String> = planted[..5].iter().map(|(s, _)| s.clone()).collect();
    want.sort();
    assert_eq!(left, want, "only the stale own probe mail may go");
    let db = ledger(storage.path());
    assert_eq!(count(&db, "SELECT COUNT(*) FROM mails WHERE state = 'stray'"), 1);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM mails WHERE id IN ('abcdef01', 'aaaa0001', 'aaaa0002')"
        ),
        0
    );
    assert!(d.logs().contains("marker does not verify"), "{}", d.logs());
    drop(d);
    purge(&tag);
    purge(&format!("instance={instance}"));
}

/// How many kill -9 cycles: 20 in CI, more from `tests/bench/crash-loop`.
fn crash_loops() -> usize {
    std::env::var("CUTOVER_CRASH_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// A pseudo-random delay without a rand dependency: the std hasher is seeded randomly.
fn random_delay(min_ms: u64, max_ms: u64) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(min_ms);
    Duration::from_millis(min_ms + h.finish() % (max_ms - min_ms))
}

#[test]
fn kill_9_at_random_points_loses_and_double_counts_nothing() {
    let storage = tempfile::tempdir().unwrap();
    let _purge = PurgeOnDrop(storage.path().to_owned());
    let loops = crash_loops();
    let flowing = config(
        "1s",
        "900ms",
        "    late_after: 5s\n    lost_after: 10s\n",
        "new",
        SUBMISSION,
    );
    let started = Instant::now();
    // Sends start at a stable offset within each second (the scheduler's):
    // every other kill aims at the few milliseconds of an SMTP session, where
    // a crash leaves a mail whose reply was never recorded.
    let inst = cutover_monitor::metrics::Instance {
        check: "flow".into(),
        kind: cutover_monitor::config::Kind::Mailflow,
        env: "new".into(),
        address: "127.0.0.20".into(),
    };
    let send_at = cutover_monitor::scheduler::offset(&inst, Duration::from_secs(1)).as_secs_f64();
    for i in 0..loops {
        let d = start(&flowing, storage.path());
        let delay = if i % 2 == 0 {
            random_delay(200, 2500)
        } else {
            let target = send_at + random_delay(1, 20).as_secs_f64();
            let phase = cutover_monitor::unix_now().rem_euclid(1.0);
            Duration::from_secs_f64(1.0 + (target - phase).rem_euclid(1.0))
        };
        std::thread::sleep(delay);
        d.signal("KILL");
        drop(d);
    }
    let killing = started.elapsed();
    // A last daemon that (almost) never sends, so everything in flight settles.
    let settle = config(
        "1h",
        "10s",
        "    late_after: 5s\n    lost_after: 10s\n",
        "new",
        SUBMISSION,
    );
    let d = start(&settle, storage.path());
    wait_until("every mail settled", Duration::from_secs(40), || {
        let s = states(storage.path());
        ["intent", "sent", "send_unknown"].iter().all(|k| !s.contains_key(*k))
    });
    let s = states(storage.path());
    let db = ledger(storage.path());
    let delivered = s.get("delivered").copied().unwrap_or(0);
    let crashed_before_reply = count(
        &db,
        "SELECT COUNT(*) FROM mails WHERE state = 'delivered' AND reply IS NULL",
    );
    let failures: Vec<(String, i64)> = db
        .prepare("SELECT reply, COUNT(*) FROM mails WHERE state = 'send_failed' GROUP BY reply")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    println!(
        "{loops} kills in {killing:?}: states {s:?}; delivered although the crash hid the reply: {crashed_before_reply}; send failures by reason: {failures:?}"
    );
    assert!(delivered >= loops as i64 / 2, "{s:?}");
    assert_eq!(s.get("lost"), None, "{s:?}");
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM mails WHERE accepted IS NOT NULL AND state != 'delivered'"
        ),
        0
    );
    assert_eq!(count(&db, "SELECT COALESCE(SUM(duplicates), 0) FROM mails"), 0);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM (SELECT id FROM sightings GROUP BY id HAVING COUNT(*) > 1)"
        ),
        0
    );
    // Counters equal the ledger.
    let labels = [("check", "flow"), ("route", "new")];
    let scrape = d.scrape();
    assert_eq!(scrape.get("cutover_mail_sent_total", &labels), Some(delivered as f64));
    assert_eq!(
        scrape.get(
            "cutover_mail_delivered_total",
            &[("route", "new"), ("delivered_env", "new")]
        ),
        Some(delivered as f64)
    );
    assert_eq!(scrape.get("cutover_mail_lost_total", &labels).unwrap_or(0.0), 0.0);
    assert_eq!(scrape.get("cutover_mail_duplicates_total", &labels).unwrap_or(0.0), 0.0);
    assert_eq!(scrape.get("cutover_mail_in_flight", &labels), Some(0.0));
    // And every probe mail was cleaned up.
    let (instance, _) = identity(storage.path());
    let needle = format!("instance={instance}");
    wait_until("no probe mail of this instance left", Duration::from_secs(10), || {
        !messages("new").iter().any(|(_, t)| t.contains(&needle))
    });
    drop(d);
}

#[test]
fn a_reinjected_probe_mail_counts_once_as_a_duplicate() {
    let storage = tempfile::tempdir().unwrap();
    let _purge = PurgeOnDrop(storage.path().to_owned());
    let d = start(&config("3s", "2s", "", "new", SUBMISSION), storage.path());
    let labels = [("check", "flow"), ("route", "new")];
    d.wait_for(
        "cutover_mail_delivered_total",
        &labels,
        |v| v >= 1.0,
        Duration::from_secs(30),
    );
    let (instance, key) = identity(storage.path());
    let id: String = ledger(storage.path())
        .query_row("SELECT id FROM mails WHERE state = 'delivered' LIMIT 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    inject(
        "127.0.0.20",
        &mail("reinjected", Some(&marker(key.as_bytes(), &instance, &id))),
    );
    d.wait_for(
        "cutover_mail_duplicates_total",
        &labels,
        |v| v == 1.0,
        Duration::from_secs(15),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(value(&d, "cutover_mail_duplicates_total", &labels), 1.0);
    let dup: i64 = ledger(storage.path())
        .query_row("SELECT duplicates FROM mails WHERE id = ?1", [&id], |r| r.get(0))
        .unwrap();
    assert_eq!(dup, 1);
    wait_until("the copy deleted", Duration::from_secs(10), || {
        !messages("new").iter().any(|(_, t)| t.contains("Subject: reinjected"))
    });
    drop(d);
    purge(&format!("instance={instance}"));
}

#[test]
fn a_watcher_reconnects_after_dovecot_restarts_and_misses_nothing() {
    let storage = tempfile::tempdir().unwrap();
    let _purge = PurgeOnDrop(storage.path().to_owned());
    // lost_after in seconds, so a mail the restart made the watcher miss is
    // counted lost within this test (the default 15m never would be).
    let d = start(&config("2s", "1500ms", SHORT_AGES, "new", SUBMISSION), storage.path());
    let labels = [("check", "flow"), ("route", "new")];
    d.wait_for(
        "cutover_mail_delivered_total",
        &labels,
        |v| v >= 1.0,
        Duration::from_secs(30),
    );
    lab_script(&["svc", "restart", "new", "dovecot"]);
    let after = value(&d, "cutover_mail_sent_total", &labels);
    d.wait_for(
        "cutover_mail_delivered_total",
        &labels,
        |v| v >= after + 2.0,
        Duration::from_secs(60),
    );
    assert!(d.logs().contains("reconnecting"), "{}", d.logs());
    // Everything accepted so far is found: nothing went missing while the watcher was away.
    settle_then_assert_none_lost(&d, storage.path(), &labels);
    let (instance, _) = identity(storage.path());
    drop(d);
    purge(&format!("instance={instance}"));
}

/// new's Postfix configuration directory.
fn new_postfix() -> String {
    format!("{}/new/postfix", lab().var("DIR"))
}

/// Runs a Postfix command, asserting it succeeded; returns what it printed.
fn postfix(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Holds delivery on new while it lives: submitted mails are accepted and
/// stay in the queue. Dropped, even on failure, it releases them.
struct Release(String);

impl Drop for Release {
    fn drop(&mut self) {
        let _ = std::process::Command::new("postconf")
            .args(["-c", &self.0, "-e", "defer_transports="])
            .status();
        let _ = std::process::Command::new("postfix")
            .args(["-c", &self.0, "reload"])
            .status();
        // The reload restarts qmgr asynchronously: flush once it runs with the new setting.
        std::thread::sleep(Duration::from_millis(1500));
        let _ = std::process::Command::new("postqueue")
            .args(["-c", &self.0, "-f"])
            .status();
    }
}

/// Defers local delivery on new (`defer_transports=lmtp`) until the guard is dropped.
fn hold_delivery() -> Release {
    let conf = new_postfix();
    let release = Release(conf.clone());
    postfix(&["postconf", "-c", &conf, "-e", "defer_transports=lmtp"]);
    postfix(&["postfix", "-c", &conf, "reload"]);
    release
}

#[test]
fn held_queue_makes_mail_late_release_delivers_all_and_deleted_mail_is_lost() {
    let storage = tempfile::tempdir().unwrap();
    let _purge = PurgeOnDrop(storage.path().to_owned());
    let conf = new_postfix();
    let d = start(
        &config(
            "2s",
            "1500ms",
            "    late_after: 4s\n    lost_after: 20s\n",
            "new",
            SUBMISSION,
        ),
        storage.path(),
    );
    let labels = [("check", "flow"), ("route", "new")];
    d.wait_for(
        "cutover_mail_delivered_total",
        &labels,
        |v| v >= 1.0,
        Duration::from_secs(30),
    );
    let release = hold_delivery();
    d.wait_for("cutover_mail_in_flight", &labels, |v| v >= 3.0, Duration::from_secs(30));
    d.wait_for(
        "cutover_mail_late_total",
        &labels,
        |v| v >= 1.0,
        Duration::from_secs(30),
    );
    println!(
        "held: in_flight {}, oldest {}s, late {}",
        value(&d, "cutover_mail_in_flight", &labels),
        value(&d, "cutover_mail_oldest_in_flight_age_seconds", &labels),
        value(&d, "cutover_mail_late_total", &labels)
    );
    drop(release);
    // Every held mail arrives; flush again in case a retry was scheduled meanwhile.
    let released_at = cutover_monitor::unix_now();
    wait_until("the held mails delivered", Duration::from_secs(30), || {
        let _ = std::process::Command::new("postqueue")
            .args(["-c", &conf, "-f"])
            .status();
        let db = ledger(storage.path());
        count(
            &db,
            &format!("SELECT COUNT(*) FROM mails WHERE state != 'delivered' AND created < {released_at}"),
        ) == 0
    });
    assert_eq!(value(&d, "cutover_mail_lost_total", &labels), 0.0);
    let delivered_before = value(&d, "cutover_mail_delivered_total", &labels);

    // Hold again and delete what is queued: those are lost after lost_after.
    let release = hold_delivery();
    d.wait_for("cutover_mail_in_flight", &labels, |v| v >= 2.0, Duration::from_secs(30));
    let deleted_at = cutover_monitor::unix_now();
    postfix(&["postsuper", "-c", &conf, "-d", "ALL"]);
    let in_flight = value(&d, "cutover_mail_in_flight", &labels);
    drop(release);
    // Every mail accepted before the deletion ends as lost (it was queued)
    // or delivered (it had left already); none stays in flight.
    wait_until("the deleted mails declared lost", Duration::from_secs(40), || {
        let db = ledger(storage.path());
        count(
            &db,
            &format!("SELECT COUNT(*) FROM mails WHERE state = 'sent' AND accepted < {deleted_at}"),
        ) == 0
    });
    let db = ledger(storage.path());
    let lost = count(&db, "SELECT COUNT(*) FROM mails WHERE state = 'lost'");
    assert!(lost >= 1);
    assert_eq!(
        count(
            &db,
            &format!("SELECT COUNT(*) FROM mails WHERE state = 'lost' AND accepted > {deleted_at}")
        ),
        0
    );
    assert_eq!(value(&d, "cutover_mail_lost_total", &labels), lost as f64);
    println!(
        "deleted the queue with {in_flight} in flight; lost {lost}, delivered {} -> {}",
        delivered_before,
        value(&d, "cutover_mail_delivered_total", &labels)
    );
    let (instance, _) = identity(storage.path());
    drop(d);
    purge(&format!("instance={instance}"));
}

#[test]
fn live_follows_the_mx_switch_and_the_ledger_shows_where_each_mail_landed() {
    let storage = tempfile::tempdir().unwrap();
    let _purge = PurgeOnDrop(storage.path().to_owned());
    let mx = "{mode: mx, host: mx.example.test, to: other@example.test}";
    let d = start(&config("2s", "1500ms", SHORT_AGES, "live", mx), storage.path());
    let labels = [("check", "flow"), ("route", "live")];
    d.wait_for(
        "cutover_mail_delivered_total",
        &[("route", "live"), ("delivered_env", "old")],
        |v| v >= 2.0,
        Duration::from_secs(30),
    );
    let _dns = common::dns_fault("new");
    d.wait_for(
        "cutover_mail_delivered_total",
        &[("route", "live"), ("delivered_env", "new")],
        |v| v >= 2.0,
        Duration::from_secs(30),
    );
    let db = ledger(storage.path());
    let landed: Vec<String> = column(
        &db,
        "SELECT delivered_env FROM mails WHERE state = 'delivered' ORDER BY accepted",
    );
    println!("landed in order: {landed:?}");
    let first_new = landed.iter().position(|e| e == "new").unwrap();
    assert!(
        landed[..first_new].iter().all(|e| e == "old") && first_new >= 2,
        "{landed:?}"
    );
    assert!(landed[first_new..].iter().all(|e| e == "new"), "{landed:?}");
    // No mail sent around the switch went missing.
    settle_then_assert_none_lost(&d, storage.path(), &labels);
    let (instance, _) = identity(storage.path());
    drop(d);
    purge(&format!("instance={instance}"));
}

/// Asserts `sent = delivered + lost - recovered + in flight` for a route,
/// twice: in the ledger (its stored totals and the rows still in flight) and
/// in the counters a scrape shows. Nothing may be `send_unknown` (which the
/// in-flight gauge counts but `sent` does not yet).
fn assert_balanced(d: &Daemon, storage: &Path, route: &str) {
    let db = ledger(storage);
    let total = |event: &str| {
        count(
            &db,
            &format!(
                "SELECT COALESCE(SUM(value), 0) FROM totals WHERE check_name = 'flow' AND route = '{route}' AND event = '{event}'"
            ),
        )
    };
    let [sent, delivered, lost, recovered] = ["sent", "delivered", "lost", "recovered"].map(total);
    let rows = |state: &str| {
        count(
            &db,
            &format!(
                "SELECT COUNT(*) FROM mails WHERE check_name = 'flow' AND route = '{route}' AND state = '{state}'"
            ),
        )
    };
    assert_eq!(rows("send_unknown"), 0);
    let in_flight = rows("sent");
    assert_eq!(
        sent,
        delivered + lost - recovered + in_flight,
        "ledger: sent {sent}, delivered {delivered}, lost {lost}, recovered {recovered}, in flight {in_flight}"
    );
    let scrape = d.scrape();
    let labels = [("check", "flow"), ("route", route)];
    let c = |name: &str| scrape.sum(name, &labels);
    let counters = [
        "cutover_mail_sent_total",
        "cutover_mail_delivered_total",
        "cutover_mail_lost_total",
        "cutover_mail_recovered_total",
        "cutover_mail_in_flight",
    ]
    .map(c);
    let [sent_c, delivered_c, lost_c, recovered_c, in_flight_c] = counters;
    assert_eq!(
        sent_c,
        delivered_c + lost_c - recovered_c + in_flight_c,
        "counters: sent, delivered, lost, recovered, in flight = {counters:?}"
    );
    assert_eq!(
        [sent_c, delivered_c, lost_c, recovered_c],
        [sent, delivered, lost, recovered].map(|v| v as f64),
        "the counters equal the ledger"
    );
}

/// Issue 14.10: a mail accepted while the daemon was down past `lost_after`
/// was counted lost at start-up and found in the same second. Now the
/// watchers search every mailbox before anything may be declared lost.
#[test]
fn a_mail_that_arrived_while_the_daemon_was_down_counts_late_not_lost() {
    let storage = tempfile::tempdir().unwrap();
    let _purge = PurgeOnDrop(storage.path().to_owned());
    let labels = [("check", "flow"), ("route", "new")];
    let ages = "    late_after: 3s\n    lost_after: 8s\n";
    let lost_after = Duration::from_secs(8);
    let held = hold_delivery();
    let mut d = start(&config("2s", "1500ms", ages, "new", SUBMISSION), storage.path());
    d.wait_for(
        "cutover_mail_sent_total",
        &labels,
        |v| v >= 1.0,
        Duration::from_secs(30),
    );
    d.signal("TERM");
    assert!(d.wait_exit(Duration::from_secs(5)).is_some(), "{}", d.logs());
    drop(d);
    let db = ledger(storage.path());
    let held_mails = count(&db, "SELECT COUNT(*) FROM mails WHERE state = 'sent'");
    let last_accepted: f64 = db
        .query_row("SELECT MAX(accepted) FROM mails WHERE state = 'sent'", [], |r| r.get(0))
        .unwrap();
    drop(db);
    assert!(held_mails >= 1, "{:?}", states(storage.path()));
    // Down for longer than lost_after, then the queue is released: the mails
    // are in the mailbox before the daemon is back.
    let due = last_accepted + lost_after.as_secs_f64() + 2.0;
    std::thread::sleep(Duration::from_secs_f64((due - cutover_monitor::unix_now()).max(0.0)));
    drop(held);
    let (instance, _) = identity(storage.path());
    let own = format!("instance={instance}");
    wait_until("the held mails in new's mailbox", Duration::from_secs(30), || {
        let _ = std::process::Command::new("postqueue")
            .args(["-c", &new_postfix(), "-f"])
            .status();
        messages("new").iter().filter(|(_, t)| t.contains(&own)).count() as i64 >= held_mails
    });
    // Back, sending nothing more this hour: only the held mails are counted.
    let d = start(&config("1h", "10s", ages, "new", SUBMISSION), storage.path());
    wait_until("the held mails delivered", Duration::from_secs(30), || {
        count(
            &ledger(storage.path()),
            "SELECT COUNT(*) FROM mails WHERE state = 'sent'",
        ) == 0
    });
    // Sweeps keep running: still nothing lost a few sweeps later.
    std::thread::sleep(Duration::from_secs(3));
    let db = ledger(storage.path());
    let s = states(storage.path());
    // The held mails (a send at this hour's slot, if it came, is not one).
    let latencies: Vec<f64> = column(
        &db,
        &format!("SELECT latency FROM mails WHERE state = 'delivered' AND late = 1 AND accepted <= {last_accepted}"),
    );
    println!("held {held_mails}; states {s:?}; latencies {latencies:?}");
    assert_eq!(s.get("lost"), None, "{s:?}\n{}", d.logs());
    assert_eq!(latencies.len() as i64, held_mails, "{s:?}");
    assert!(latencies.iter().all(|l| *l > lost_after.as_secs_f64()), "{latencies:?}");
    assert_eq!(value(&d, "cutover_mail_lost_total", &labels), 0.0);
    assert_eq!(value(&d, "cutover_mail_recovered_total", &labels), 0.0);
    assert_eq!(value(&d, "cutover_mail_late_total", &labels), held_mails as f64);
    assert!(
        value(
            &d,
            "cutover_mail_delivered_total",
            &[("route", "new"), ("delivered_env", "new")]
        ) >= held_mails as f64
    );
    assert_balanced(&d, storage.path(), "new");
    drop(d);
    purge(&own);
}

/// A FETCH response imap-proto 0.17 panics on (it unwraps INTERNALDATE's
/// nstring, and `NIL` is one; src/probe/imap.rs pins that). Plain ASCII, so
/// the probe's stream guard lets it through. Real servers do not send it on
/// demand, hence a fake in front of the real one.
const PANICS_IMAP_PROTO: &[u8] = b"* 1 FETCH (UID 1 INTERNALDATE NIL)\r\n";

/// An IMAP server in this process, in plain text on 127.0.0.20 (new's
/// address, another port), relaying each connection to new's Dovecot over
/// TLS. On the first connection it answers the client's IDLE with
/// [`PANICS_IMAP_PROTO`]; the others it relays untouched. Returns its port
/// and how many connections it accepted.
fn poisoning_proxy(rt: &tokio::runtime::Runtime) -> (u16, Arc<AtomicUsize>) {
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(lab().var("CA")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client));
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.20:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    rt.spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let poison = counted.fetch_add(1, Ordering::SeqCst) == 0;
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(tcp) = tokio::net::TcpStream::connect("127.0.0.20:993").await else {
                    return;
                };
                let name = rustls::pki_types::ServerName::try_from("imap.example.test").unwrap();
                if let Ok(upstream) = tls.connect(name, tcp).await {
                    relay(client, upstream, poison).await;
                }
            });
        }
    });
    (port, accepted)
}

/// Relays bytes both ways until either side closes; with `poison`, sends
/// [`PANICS_IMAP_PROTO`] once after the server's answer to IDLE.
async fn relay<S>(client: tokio::net::TcpStream, upstream: S, poison: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = tokio::io::split(upstream);
    let (mut up, mut down) = ([0u8; 16 * 1024], [0u8; 16 * 1024]);
    let (mut idling, mut poisoned) = (false, !poison);
    loop {
        tokio::select! {
            n = from_client.read(&mut up) => {
                let Ok(n @ 1..) = n else { return };
                idling |= up[..n].ends_with(b" IDLE\r\n");
                if to_server.write_all(&up[..n]).await.is_err() || to_server.flush().await.is_err() {
                    return;
                }
            }
            n = from_server.read(&mut down) => {
                let Ok(n @ 1..) = n else { return };
                if to_client.write_all(&down[..n]).await.is_err() {
                    return;
                }
                // Dovecot's `+ idling` ends its line: the poison is a line of its own.
                if idling && !poisoned && down[..n].ends_with(b"\r\n") {
                    poisoned = true;
                    let _ = to_client.write_all(PANICS_IMAP_PROTO).await;
                }
            }
        }
    }
}

/// Issue 14.1: a watcher whose IMAP library panics is restarted (counted
/// once, logged once) and watches again: a mail sent through the real lab
/// Postfix after the panic is found and counted delivered.
#[test]
fn a_watcher_whose_imap_library_panics_is_restarted_and_finds_mail_again() {
    let storage = tempfile::tempdir().unwrap();
    let _purge = PurgeOnDrop(storage.path().to_owned());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (port, connections) = poisoning_proxy(&rt);
    let yaml = format!(
        "defaults:
  ca_file: {{{{CA}}}}
environments:
  new: {{addresses: [127.0.0.20]}}
credentials:
  probe: {{username: probe@example.test, password_file: {{{{PASSWORD_FILE}}}}}}
  other: {{username: other@example.test, password_file: {{{{PASSWORD_FILE}}}}}}
checks:
  - name: flow
    kind: mailflow
    envs: [new]
    interval: 2s
    timeout: 1500ms
{SHORT_AGES}    send: {SUBMISSION}
    watch:
      - {{env: new, host: imap.example.test, port: {port}, tls: none, credentials: other}}
"
    );
    let d = start(&yaml, storage.path());
    let watcher = [("task", "mailflow_watch:flow:new:INBOX")];
    d.wait_for(
        "cutover_task_restarts_total",
        &watcher,
        |v| v >= 1.0,
        Duration::from_secs(30),
    );
    let restarted_at = cutover_monitor::unix_now();
    let labels = [("check", "flow"), ("route", "new")];
    // A mail accepted after the panic, found by the restarted watcher.
    wait_until("a mail sent after the panic delivered", Duration::from_secs(30), || {
        count(
            &ledger(storage.path()),
            &format!("SELECT COUNT(*) FROM mails WHERE state = 'delivered' AND accepted > {restarted_at}"),
        ) >= 1
    });
    assert!(value(&d, "cutover_mail_delivered_total", &labels) >= 1.0);
    let logs = d.logs();
    assert_eq!(value(&d, "cutover_task_restarts_total", &watcher), 1.0, "{logs}");
    assert_eq!(
        d.scrape()
            .get("cutover_task_restarts_total", &[("task", "mailflow_sweep:flow")]),
        Some(0.0)
    );
    // One panic, one connection that stays: no restart loop.
    assert_eq!(connections.load(Ordering::SeqCst), 2, "{logs}");
    let stopped: Vec<&str> = logs.lines().filter(|l| l.contains("background task stopped")).collect();
    assert_eq!(stopped.len(), 1, "{logs}");
    assert!(
        stopped[0].contains("mailflow_watch:flow:new:INBOX") && stopped[0].contains("panicked"),
        "{}",
        stopped[0]
    );
    settle_then_assert_none_lost(&d, storage.path(), &labels);
    assert_balanced(&d, storage.path(), "new");
    let (instance, _) = identity(storage.path());
    drop(d);
    purge(&format!("instance={instance}"));
}
