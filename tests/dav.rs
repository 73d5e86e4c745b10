//! The `dav` probe against the lab's real Radicale in old and new (behind each
//! environment's nginx, README "CalDAV/CardDAV (Radicale)"): discovery,
//! counts of the seeded data, a stopped server, broken well-known redirects,
//! a password changed in new only, a collection or events missing in new
//! (parity), and the write round trip with its sweep of leftovers. Then
//! in-process fakes for what Radicale will not do on demand: a 50 MB
//! multistatus and malformed XML.
//!
//! Every test that changes the lab restores it in a guard that also runs when
//! the test fails. Run them under `flock /tmp/cutover-lab.lock`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Daemon, check_cmd, lab, lab_script};
use cutover_monitor::config::{Credential, Secret};
use cutover_monitor::probe::dav::{Marker, Measured};
use cutover_monitor::probe::{self, Measurement, Outcome};
use cutover_monitor::scheduler;

/// Seeded data (tests/lab/README.md, "Seeded data"): probe@ has 5 events in
/// `calendar/` (4 of them in January 2030), an empty `probe-writes/` calendar
/// and 7 vCards in `contacts/`.
const PROBE_EVENTS: f64 = 5.0;
const PROBE_EVENTS_JANUARY: f64 = 4.0;
const PROBE_CONTACTS: f64 = 7.0;
const PROBE_CALENDARS: f64 = 2.0;
const PROBE_ADDRESSBOOKS: f64 = 1.0;

const HEAD: &str = r#"
defaults: {interval: 2s, timeout: 1500ms, ca_file: "{{CA}}"}
environments:
  old: {addresses: [127.0.0.10]}
  new: {addresses: [127.0.0.20]}
  live: {resolver: 127.0.0.30}
credentials:
  probe: {username: probe@example.test, password_file: "{{PASSWORD_FILE}}"}
checks:
"#;

const CHECKS: &str = r#"
  - {name: caldav, kind: dav, service: caldav, url: "https://dav.example.test/", credentials: probe, collection: calendar, expect: {collections: [calendar, probe-writes], min_collections: 2}}
  - {name: caldav-january, kind: dav, service: caldav, url: "https://dav.example.test/", credentials: probe, collection: calendar, time_range: {start: 20300101T000000Z, end: 20300201T000000Z}}
  - {name: carddav, kind: dav, service: carddav, url: "https://dav.example.test/", credentials: probe, collection: contacts, expect: {collections: [contacts]}}
  - {name: legacy, kind: dav, service: caldav, url: "https://dav.example.test/", credentials: probe, collection: calendar, legacy_urls: [/SOGo/dav/, /SOGo/dav/probe%40example.test/]}
"#;

const WRITE: &str = r#"
  - {name: caldav-write, kind: dav, service: caldav, url: "https://dav.example.test/", credentials: probe, collection: calendar, write: true, write_collection: probe-writes}
  - {name: carddav-write, kind: dav, service: carddav, url: "https://dav.example.test/", credentials: probe, collection: contacts, write: true}
"#;

/// Restores what these tests change (services, passwords, DAV data and
/// well-known redirects), also when the test panics.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        for args in [
            &["svc", "start", "old", "radicale"][..],
            &["svc", "start", "new", "radicale"],
            &["user", "reset"],
            &["dav", "reset"],
        ] {
            let out = std::process::Command::new(common::root().join("tests/lab").join(args[0]))
                .args(&args[1..])
                .output();
            if !out.as_ref().is_ok_and(|o| o.status.success()) {
                eprintln!("restoring the lab: tests/lab/{} failed: {out:?}", args.join(" "));
            }
        }
    }
}

/// The lab with both Radicales up (the lab is shared: a test elsewhere may
/// have left one stopped) and reseeded; restored when the guard drops.
fn fresh_lab() -> Restore {
    lab();
    let guard = Restore;
    for env in ["old", "new"] {
        lab_script(&["svc", "start", env, "radicale"]);
    }
    lab_script(&["dav", "reset"]);
    guard
}

/// One row of `check --format json`.
#[derive(Debug)]
struct Row {
    success: bool,
    reason: String,
    phase: String,
    detail: String,
}

/// Runs `check` on `checks`; returns each (check, env)'s row and stderr (the log).
fn check(checks: &str, only: &[&str]) -> (Vec<(String, String, Row)>, String) {
    let mut args = vec!["--format", "json"];
    for c in only {
        args.extend(["--check", c]);
    }
    let (_code, out, err) = check_cmd(&format!("{HEAD}{checks}"), &args);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let rows = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                text(&r["check"]),
                text(&r["env"]),
                Row {
                    success: r["success"].as_bool().unwrap(),
                    reason: text(&r["reason"]),
                    phase: text(&r["phase"]),
                    detail: text(&r["detail"]),
                },
            )
        })
        .collect();
    (rows, err)
}

/// [`check`] again until `done` holds for new's rows (at most 5 s): nginx
/// reloads gracefully, so a connection may still meet a worker with the
/// previous well-known setting for a moment after the lab script returns.
fn check_until(checks: &str, only: &[&str], new_reason: &str) -> (Vec<(String, String, Row)>, String) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (rows, log) = check(checks, only);
        let done = rows
            .iter()
            .filter(|(_, e, _)| e == "new")
            .all(|(_, _, r)| r.reason == new_reason);
        if done || Instant::now() > deadline {
            return (rows, log);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn row<'a>(rows: &'a [(String, String, Row)], check: &str, env: &str) -> &'a Row {
    rows.iter()
        .find(|(c, e, _)| c == check && e == env)
        .map(|(_, _, r)| r)
        .unwrap_or_else(|| panic!("no row {check} {env} in {rows:?}"))
}

#[test]
fn old_new_and_live_find_the_seeded_calendars_and_contacts() {
    let _lab = fresh_lab();
    let d = Daemon::start(&format!("{HEAD}{CHECKS}"));
    let at = |check: &'static str, env: &'static str| [("check", check), ("env", env)];
    for env in ["old", "new", "live"] {
        for check in ["caldav", "caldav-january", "carddav", "legacy"] {
            d.wait_for(
                "cutover_probe_success",
                &at(check, env),
                |v| v == 1.0,
                Duration::from_secs(10),
            );
        }
    }
    let s = d.scrape();
    for env in ["old", "new", "live"] {
        let get = |name: &str, check: &'static str| s.get(name, &at(check, env));
        assert_eq!(get("cutover_dav_objects", "caldav"), Some(PROBE_EVENTS), "{env}");
        assert_eq!(
            get("cutover_dav_objects", "caldav-january"),
            Some(PROBE_EVENTS_JANUARY),
            "{env}"
        );
        assert_eq!(get("cutover_dav_objects", "carddav"), Some(PROBE_CONTACTS), "{env}");
        assert_eq!(get("cutover_dav_collections", "caldav"), Some(PROBE_CALENDARS), "{env}");
        assert_eq!(
            get("cutover_dav_collections", "carddav"),
            Some(PROBE_ADDRESSBOOKS),
            "{env}"
        );
        for phase in ["discovery", "principal", "collections", "read"] {
            let v = s.get(
                "cutover_probe_phase_duration_seconds",
                &[("check", "caldav"), ("env", env), ("phase", phase)],
            );
            assert!(
                v.is_some_and(|v| v > 0.0 && v < 1.5),
                "caldav {env} phase {phase}: {v:?}"
            );
        }
        let legacy = s.get(
            "cutover_probe_phase_duration_seconds",
            &[("check", "legacy"), ("env", env), ("phase", "legacy")],
        );
        assert!(legacy.is_some(), "{env}: {}", s.matching("cutover_probe_phase"));
    }
    for check in ["caldav", "caldav-january", "carddav"] {
        assert_eq!(s.get("cutover_dav_parity", &[("check", check)]), Some(1.0), "{check}");
    }
    // Old and new present their own certificates, as users see them.
    let certs = s.series("cutover_tls_cert_info");
    assert!(
        certs
            .iter()
            .any(|(l, _)| l.iter().any(|(k, v)| k == "check" && v == "caldav")),
        "{}",
        s.matching("cutover_tls_cert_info")
    );
}

#[test]
fn a_stopped_radicale_fails_new_naming_the_step_and_old_stays_fine() {
    let _lab = fresh_lab();
    lab_script(&["svc", "stop", "new", "radicale"]);
    let (rows, _) = check(CHECKS, &["caldav", "carddav"]);
    for c in ["caldav", "carddav"] {
        let new = row(&rows, c, "new");
        assert!(!new.success, "{c}: {new:?}");
        // nginx still answers the well-known redirect; the first PROPFIND gets 502.
        assert_eq!(
            (new.reason.as_str(), new.phase.as_str()),
            ("unexpected_status", "principal"),
            "{c}: {new:?}"
        );
        assert!(
            new.detail.contains("502") && new.detail.contains("PROPFIND"),
            "{c}: {new:?}"
        );
        assert!(row(&rows, c, "old").success, "{c}: {rows:?}");
    }
}

#[test]
fn broken_well_known_redirects_are_named() {
    let _lab = fresh_lab();
    lab_script(&["dav", "wellknown", "new", "missing"]);
    let (rows, _) = check_until(CHECKS, &["caldav", "carddav"], "wellknown_missing");
    for c in ["caldav", "carddav"] {
        let new = row(&rows, c, "new");
        assert_eq!(
            (new.reason.as_str(), new.phase.as_str()),
            ("wellknown_missing", "discovery"),
            "{c}: {new:?}"
        );
        assert!(new.detail.contains("404"), "{new:?}");
        assert!(row(&rows, c, "old").success, "{rows:?}");
    }
    lab_script(&["dav", "wellknown", "new", "old-host"]);
    let (rows, _) = check_until(CHECKS, &["caldav", "carddav"], "wellknown_wrong_target");
    for c in ["caldav", "carddav"] {
        let new = row(&rows, c, "new");
        assert_eq!(
            (new.reason.as_str(), new.phase.as_str()),
            ("wellknown_wrong_target", "discovery"),
            "{c}: {new:?}"
        );
        assert!(new.detail.contains("dav-old.example.test"), "{new:?}");
        assert!(row(&rows, c, "old").success, "{rows:?}");
    }
}

#[test]
fn a_password_changed_in_new_only_is_auth_failed_in_new_only() {
    let lab = fresh_lab_with_password();
    let (rows, err) = check(CHECKS, &["caldav", "carddav"]);
    for c in ["caldav", "carddav"] {
        let new = row(&rows, c, "new");
        assert_eq!(
            (new.reason.as_str(), new.phase.as_str()),
            ("auth_failed", "principal"),
            "{c}: {new:?}"
        );
        assert!(row(&rows, c, "old").success, "{rows:?}");
    }
    assert!(!format!("{rows:?}{err}").contains(&lab.1), "the password leaked");
}

/// The lab with probe@'s password changed in new only; returns the guard
/// and the lab password.
fn fresh_lab_with_password() -> (Restore, String) {
    let guard = fresh_lab();
    lab_script(&["user", "passwd", "new", "probe", "Changed-In-New-Only-1"]);
    (guard, lab().password().to_string())
}

#[test]
fn a_collection_dropped_in_new_is_missing_and_breaks_parity_by_name() {
    let _lab = fresh_lab();
    lab_script(&["dav", "drop-collection", "new", "probe", "calendar"]);
    let (rows, log) = check(CHECKS, &["caldav"]);
    let new = row(&rows, "caldav", "new");
    assert_eq!(
        (new.reason.as_str(), new.phase.as_str()),
        ("collection_missing", "collections"),
        "{new:?}"
    );
    assert!(new.detail.contains("`calendar`"), "{new:?}");
    assert!(row(&rows, "caldav", "old").success, "{rows:?}");
    assert!(
        log.contains("dav parity: new differs from old")
            && log.contains("collection `calendar` is in old but missing in new"),
        "{log}"
    );
    // The metric a dashboard reads.
    let d = Daemon::start(&format!("{HEAD}{CHECKS}"));
    d.wait_for(
        "cutover_dav_parity",
        &[("check", "caldav")],
        |v| v == 0.0,
        Duration::from_secs(10),
    );
    d.wait_for(
        "cutover_probe_failures_total",
        &[("check", "caldav"), ("env", "new"), ("reason", "collection_missing")],
        |v| v >= 1.0,
        Duration::from_secs(10),
    );
}

#[test]
fn events_dropped_in_new_show_in_parity_with_both_counts() {
    let _lab = fresh_lab();
    lab_script(&["dav", "drop-events", "new", "probe", "calendar", "2"]);
    let (rows, log) = check(CHECKS, &["caldav"]);
    // The account still works: only parity tells.
    assert!(rows.iter().all(|(_, _, r)| r.success), "{rows:?}");
    assert!(log.contains("`calendar`: old has 5 objects, new 3"), "{log}");
    // `check` says it beside the rows too, not only in the log.
    let (_, out, err) = check_cmd(&format!("{HEAD}{CHECKS}"), &["--format", "json", "--check", "caldav"]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let noted = rows.as_array().unwrap().iter().any(|r| {
        r["notes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n == "`calendar`: old has 5 objects, new 3"))
    });
    assert!(noted, "{rows:#}");
    let d = Daemon::start(&format!("{HEAD}{CHECKS}"));
    d.wait_for(
        "cutover_dav_parity",
        &[("check", "caldav")],
        |v| v == 0.0,
        Duration::from_secs(10),
    );
    let s = d.wait_until(
        "both counts",
        |s| {
            s.get("cutover_dav_objects", &[("check", "caldav"), ("env", "new")])
                .is_some()
        },
        Duration::from_secs(10),
    );
    assert_eq!(
        s.get("cutover_dav_objects", &[("check", "caldav"), ("env", "new")]),
        Some(PROBE_EVENTS - 2.0)
    );
    assert_eq!(
        s.get("cutover_dav_objects", &[("check", "caldav"), ("env", "old")]),
        Some(PROBE_EVENTS)
    );
}

/// Runs every instance of `checks` once, in this process; returns
/// (check, env, outcome).
async fn run_once(yaml: &str) -> Vec<(String, String, Outcome)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (_dir, path) = common::write_config(yaml);
    let config = Arc::new(probe::load(&path).unwrap_or_else(|e| panic!("{e}")));
    let runs = scheduler::instances(&config).into_iter().map(|spec| {
        let config = config.clone();
        tokio::spawn(async move {
            let outcome = scheduler::run_once(&spec, &config).await;
            (spec.inst.check.clone(), spec.inst.env.clone(), outcome)
        })
    });
    futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

fn measured(outcome: &Outcome) -> Vec<Measured> {
    outcome
        .measurements
        .iter()
        .filter_map(|m| match m {
            Measurement::Dav(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

/// The objects on disk in one of probe@'s collections in `env`.
fn on_disk(env: &str, collection: &str) -> Vec<String> {
    let dir = collection_dir(env, collection);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ics") || n.ends_with(".vcf"))
        .collect();
    names.sort();
    names
}

fn collection_dir(env: &str, collection: &str) -> PathBuf {
    Path::new(lab().var("DIR"))
        .join(env)
        .join("radicale/collections/collection-root/probe@example.test")
        .join(collection)
}

fn plant(env: &str, collection: &str, uid: &str) {
    let body = format!(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20000101T000000Z\r\nDTSTART:20000101T000000Z\r\nDTEND:20000101T000100Z\r\nSUMMARY:cutover-monitor probe\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    );
    std::fs::write(collection_dir(env, collection).join(format!("{uid}.ics")), body).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_write_round_trip_leaves_nothing_and_sweeps_only_our_leftovers() {
    let _lab = fresh_lab();
    let yaml = format!("{HEAD}{WRITE}");
    let seeded_contacts = on_disk("new", "contacts");
    let log = Path::new(lab().var("DIR")).join("log/new-radicale.log");
    let logged_before = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
    for (check, env, outcome) in run_once(&yaml).await {
        assert!(outcome.success(), "{check} {env}: {:?}", outcome.result);
        assert!(outcome.phases.iter().any(|(p, _)| *p == "write"), "{check} {env}");
        let m = measured(&outcome);
        assert!(
            m.iter()
                .any(|m| matches!(m, Measured::WriteRoundtrip { seconds } if *seconds > 0.0)),
            "{check} {env}: {m:?}"
        );
        assert!(m.contains(&Measured::Orphans { removed: 0 }), "{check} {env}: {m:?}");
    }
    // Radicale saw the object created and then deleted by its ETag ...
    let log = std::fs::read(&log).unwrap();
    let log = String::from_utf8_lossy(&log[logged_before.min(log.len())..]);
    let created: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("PUT response status") && l.ends_with("201 Created"))
        .filter_map(|l| l.split('\'').nth(1))
        .filter(|p| p.contains("/cutover-probe-"))
        .collect();
    assert!(
        created.iter().any(|p| p.contains("/probe-writes/")) && created.iter().any(|p| p.contains("/contacts/")),
        "{log}"
    );
    for path in &created {
        assert!(
            log.lines()
                .any(|l| l.contains("DELETE response status") && l.contains(path) && l.ends_with("200 OK")),
            "{path} was not deleted: {log}"
        );
    }
    // ... within the run: nothing left on either disk.
    for env in ["old", "new"] {
        assert_eq!(on_disk(env, "probe-writes"), Vec::<String>::new(), "{env}");
    }
    assert_eq!(on_disk("new", "contacts"), seeded_contacts);

    // A run of caldav-write in new killed before its DELETE left an object;
    // beside it, objects that only look like ours.
    let credential = Credential {
        username: "probe@example.test".into(),
        password: Secret::new(lab().password().to_string()),
    };
    let long_ago = 1_700_000_000_000;
    let ours = Marker::new(&credential, "caldav-write", "new").uid(long_ago, "0badc0de");
    let other_env = Marker::new(&credential, "caldav-write", "old").uid(long_ago, "0badc0de");
    let other_check = Marker::new(&credential, "another-check", "new").uid(long_ago, "0badc0de");
    let forged = format!("{}-0000000000000000", ours.rsplit_once('-').unwrap().0);
    let similar = ours.replace("cutover-probe-", "cutover-probes-");
    for uid in [&ours, &other_env, &other_check, &forged, &similar] {
        plant("new", "probe-writes", uid);
    }
    let results = run_once(&yaml).await;
    let (_, _, new) = results
        .iter()
        .find(|(c, e, _)| c == "caldav-write" && e == "new")
        .unwrap();
    assert!(new.success(), "{:?}", new.result);
    assert!(
        measured(new).contains(&Measured::Orphans { removed: 1 }),
        "{:?}",
        measured(new)
    );
    let mut left = vec![
        format!("{other_env}.ics"),
        format!("{other_check}.ics"),
        format!("{forged}.ics"),
        format!("{similar}.ics"),
    ];
    left.sort();
    assert_eq!(on_disk("new", "probe-writes"), left);
    // The probe objects that stay never count as data.
    let reads = run_once(&format!("{HEAD}  - {{name: c, kind: dav, service: caldav, url: \"https://dav.example.test/\", credentials: probe, collection: probe-writes}}\n")).await;
    let (_, _, new) = reads.iter().find(|(_, e, _)| e == "new").unwrap();
    assert!(
        measured(new).contains(&Measured::Objects { count: 1 }),
        "only `similar` does not start with the marker prefix: {:?}",
        measured(new)
    );
}

// --- In-process fakes -------------------------------------------------------

/// What the fake DAV server answers to anything but the well-known path.
#[derive(Clone, Copy)]
enum Answer {
    /// A 207 whose multistatus goes on for this many bytes, sent without a
    /// Content-Length (the probe must stop reading, not trust a header).
    Huge(usize),
    /// The same with its Content-Length announced.
    HugeAnnounced(usize),
    /// A 207 whose body is not well-formed XML.
    Malformed,
}

/// An HTTPS server on 127.0.0.1 with a certificate for dav.example.test from
/// a test CA; returns its port and the CA's PEM.
async fn fake_dav(answer: Answer) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = common::TestCa::new("DAV test CA");
    let (cert, key) = ca.leaf(&["dav.example.test"], false);
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&head).to_string();
                if text.starts_with("GET /.well-known/") {
                    let reply = format!(
                        "HTTP/1.1 301 Moved\r\nLocation: https://dav.example.test:{port}/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                    let _ = s.shutdown().await;
                    return;
                }
                let open = "<?xml version=\"1.0\"?><multistatus xmlns=\"DAV:\">";
                let (length, size) = match answer {
                    Answer::Malformed => {
                        let body = format!("{open}<response><href>/p/</href></multistatus>");
                        let reply = format!(
                            "HTTP/1.1 207 Multi-Status\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(reply.as_bytes()).await;
                        let _ = s.shutdown().await;
                        return;
                    }
                    Answer::Huge(n) => (String::new(), n),
                    Answer::HugeAnnounced(n) => (format!("Content-Length: {n}\r\n"), n),
                };
                let reply = format!(
                    "HTTP/1.1 207 Multi-Status\r\nContent-Type: application/xml\r\n{length}Connection: close\r\n\r\n{open}"
                );
                if s.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = "<response><href>/probe/x.ics</href></response>".repeat(1400);
                let mut sent = open.len();
                while sent < size {
                    if s.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    sent += chunk.len();
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (port, ca.pem)
}

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

async fn fake_run(answer: Answer) -> Outcome {
    let (port, ca) = fake_dav(answer).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca).unwrap();
    std::fs::write(dir.path().join("password"), "Fake-Dav-Password").unwrap();
    let yaml = format!(
        "defaults: {{interval: 30s, timeout: 10s, ca_file: ca.pem}}\nenvironments:\n  local: {{addresses: [127.0.0.1]}}\ncredentials:\n  probe: {{username: probe@example.test, password_file: password}}\nchecks:\n  - {{name: fake, kind: dav, service: caldav, url: \"https://dav.example.test:{port}/\", credentials: probe, collection: calendar}}\n"
    );
    let path = dir.path().join("checks.yaml");
    std::fs::write(&path, yaml).unwrap();
    let config = Arc::new(probe::load(&path).unwrap_or_else(|e| panic!("{e}")));
    let spec = scheduler::instances(&config).into_iter().next().unwrap();
    scheduler::run_once(&spec, &config).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_50_mb_multistatus_is_oversize_and_memory_stays_bounded() {
    const FIFTY_MB: usize = 50 * 1024 * 1024;
    for answer in [Answer::Huge(FIFTY_MB), Answer::HugeAnnounced(FIFTY_MB)] {
        let before = peak_rss();
        let outcome = fake_run(answer).await;
        let failure = outcome.result.as_ref().unwrap_err();
        assert_eq!(failure.reason.as_str(), "oversize", "{failure}");
        assert_eq!(failure.phase, Some("principal"), "{failure}");
        let grew = peak_rss().saturating_sub(before);
        // The probe reads at most 4 MiB; a buffered 50 MB body would show.
        assert!(grew < 24 * 1024 * 1024, "peak memory grew by {grew} bytes");
        assert!(outcome.duration < Duration::from_secs(5), "{:?}", outcome.duration);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_xml_is_a_protocol_failure() {
    let outcome = fake_run(Answer::Malformed).await;
    let failure = outcome.result.as_ref().unwrap_err();
    assert_eq!(failure.reason.as_str(), "protocol", "{failure}");
    assert_eq!(failure.phase, Some("principal"), "{failure}");
    assert!(failure.detail.contains("not XML"), "{failure}");
}
