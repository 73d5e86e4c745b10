//! The operator surface of migration night against the real lab: migration
//! phases from the check file and set by hand (API and CLI, through reloads),
//! `/api/v1/status`, and the status page `/` as headless Chromium renders it —
//! its matrix read back from the DOM, screenshots at desktop and phone width
//! under `target/test-output/`.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{Daemon, lab, lab_fault};
use regex::Regex;
use serde_json::Value;

/// Webmail and IMAP in old, new and live, and the DNS view, every 2 s; plus
/// an SMTP login with a wrong password, whose failure quotes the username.
const CHECKS: &str = r#"
defaults: {interval: 2s, timeout: 1500ms, ca_file: "{{CA}}"}
environments:
  old: {addresses: [127.0.0.10]}
  new: {addresses: [127.0.0.20]}
  live: {resolver: 127.0.0.30}
credentials:
  probe: {username: "{{USER}}", password_file: "{{PASSWORD_FILE}}"}
  wrong: {username: "{{USER}}", password_file: "{{WRONG_PASSWORD_FILE}}"}
checks:
  - name: webmail
    kind: http
    url: https://webmail.example.test/
    expect: {status: [200], body_regex: "environment: (old|new)"}
  - {name: imap, kind: imap, host: imap.example.test, credentials: probe}
  - name: dns
    kind: dns
    resolvers: {authoritative: 127.0.0.30, lagging: 127.0.0.31}
    records:
      - {name: webmail.example.test, type: A, expect_env_addresses: true}
      - {name: example.test, type: MX, old: ["10 mx.example.test"], new: ["10 mx.example.test"]}
  - {name: submission-wrong-password, kind: smtp, host: smtp.example.test, mode: submission, credentials: wrong, envs: [new], interval: 5s, timeout: 4s}
"#;

/// RFC 3339 of now plus `offset` seconds.
fn at(offset: i64) -> String {
    let now = SystemTime::now();
    let t = if offset >= 0 {
        now + Duration::from_secs(offset as u64)
    } else {
        now - Duration::from_secs((-offset) as u64)
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Preparation since an hour ago, the window in an hour.
fn plan() -> String {
    format!(
        "migration:\n  phases:\n    - {{name: preparation, start: {}}}\n    - {{name: window, start: {}, end: {}}}\n    - {{name: switched, start: {}}}\n",
        at(-3600),
        at(3600),
        at(7200),
        at(7200)
    )
}

/// The checks with a wrong-password file and the lab user filled in; the
/// returned directory holds the file.
fn checks(extra: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let yaml = CHECKS
        .replace("{{USER}}", lab().var("USER"))
        .replace("{{WRONG_PASSWORD_FILE}}", wrong.to_str().unwrap());
    (dir, yaml + extra)
}

/// An HTTP/1.1 request with headers and a body; returns (status, body).
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    common::request(addr, method, path, headers, body).unwrap()
}

fn status(d: &Daemon) -> Value {
    let (code, body) = d.http("GET", "/api/v1/status").unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The cell of `check` in `env`.
fn cell<'a>(s: &'a Value, check: &str, env: &str) -> &'a Value {
    let row = s["matrix"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["check"] == check)
        .unwrap_or_else(|| panic!("no matrix row {check}: {s:#}"));
    row["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["env"] == env)
        .unwrap_or_else(|| panic!("no {env} cell in row {check}: {row:#}"))
}

/// Waits until `pred` holds for `/api/v1/status`.
fn wait_status(d: &Daemon, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(d);
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 20s:\n{s:#}\nlog:\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn all_ran(s: &Value) -> bool {
    s["matrix"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["cells"].as_array().unwrap().iter().all(|c| c["status"] != "pending"))
}

/// Label value -> value, sorted.
type Series = Vec<(String, f64)>;

/// `cutover_migration_phase` by phase, `cutover_expected_serving_env_info` by
/// env, and `cutover_migration_phase_override`.
fn phase_metrics(d: &Daemon) -> (Series, Series, Option<f64>) {
    let s = d.scrape();
    let label = |series: Vec<(common::Labels, f64)>, key: &str| -> Series {
        let mut out: Series = series
            .into_iter()
            .map(|(l, v)| (l.iter().find(|(k, _)| k == key).unwrap().1.clone(), v))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    };
    (
        label(s.series("cutover_migration_phase"), "phase"),
        label(s.series("cutover_expected_serving_env_info"), "env"),
        s.get("cutover_migration_phase_override", &[]),
    )
}

fn stateset(current: &str) -> Series {
    let mut all: Series = ["decommission", "preparation", "switched", "window"]
        .iter()
        .map(|p| (p.to_string(), if *p == current { 1.0 } else { 0.0 }))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[test]
fn status_json_has_the_phase_the_old_new_live_matrix_dns_and_certificates_and_no_secret() {
    let lab = lab();
    let (_dir, yaml) = checks(&plan());
    let d = Daemon::start(&yaml);
    let s = wait_status(&d, "every instance ran, the wrong password failed", |s| {
        all_ran(s) && cell(s, "submission-wrong-password", "new")["reason"] == "auth_failed"
    });

    assert_eq!(s["phase"]["phase"], "preparation", "{:#}", s["phase"]);
    assert_eq!(s["phase"]["serving"], "old");
    assert_eq!(s["phase"]["source"], "clock");
    assert_eq!(s["phase"]["next"]["name"], "window");
    assert_eq!(s["phase"]["phases"].as_array().unwrap().len(), 3);
    let envs: Vec<&str> = s["environments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(envs, ["old", "new", "live"]);
    for check in ["webmail", "imap"] {
        for (env, address) in [("old", "127.0.0.10"), ("new", "127.0.0.20"), ("live", "resolved")] {
            let c = cell(&s, check, env);
            assert_eq!(
                (c["status"].as_str(), c["address"].as_str()),
                (Some("ok"), Some(address)),
                "{c:#}"
            );
            assert!(
                c["since"].as_f64().unwrap() <= s["generated_at"].as_f64().unwrap(),
                "{c:#}"
            );
        }
        let live = cell(&s, check, "live");
        let resolved = live["resolved_env"].as_str().unwrap();
        assert!(["old", "new"].contains(&resolved), "{live:#}");
    }
    // Before the window the question is whether new is ready, and it is not:
    // the wrong password fails on new.
    let verdict = &s["verdicts"][0];
    assert_eq!(
        (verdict["question"].as_str(), verdict["answer"].as_str()),
        (Some("Is new ready?"), Some("no")),
        "{verdict:#}"
    );
    assert!(
        verdict["detail"]
            .as_str()
            .unwrap()
            .contains("submission-wrong-password 127.0.0.20 (auth_failed)"),
        "{verdict:#}"
    );
    // The failure detail names the account: the page shows it blanked out.
    let failed = cell(&s, "submission-wrong-password", "new");
    assert_eq!(failed["reason"], "auth_failed", "{failed:#}");
    assert!(failed["detail"].as_str().unwrap().contains("<redacted>"), "{failed:#}");
    let text = s.to_string();
    for secret in [lab.password(), lab.var("USER"), "not-the-password"] {
        assert!(!text.contains(secret), "status JSON carries `{secret}`: {text}");
    }
    let (code, page) = d.http("GET", "/").unwrap();
    assert_eq!(code, 200);
    assert!(!page.contains(lab.var("USER")) && !page.contains(lab.password()));

    // The DNS view: one record, both resolvers.
    let record = &s["dns"][0];
    assert_eq!(record["record"], "webmail.example.test", "{:#}", s["dns"]);
    let resolvers: Vec<&str> = record["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["resolver"].as_str().unwrap())
        .collect();
    assert_eq!(resolvers, ["authoritative", "lagging"]);
    assert_eq!(record["unchanged"], false, "{record:#}");
    // A record whose old and new answers are the same does not move: it says
    // so instead of counting resolvers "answering new".
    let mx = &s["dns"][1];
    assert_eq!(
        (&mx["record"], &mx["type"]),
        (&"example.test".into(), &"MX".into()),
        "{mx:#}"
    );
    assert_eq!(mx["unchanged"], true, "{mx:#}");
    let scrape = d.scrape();
    let ratio = |record: &str| scrape.get("cutover_dns_cutover_ratio", &[("record", record)]);
    assert!(
        ratio("webmail.example.test").is_some(),
        "{}",
        scrape.matching("cutover_dns_cutover_ratio")
    );
    assert_eq!(
        ratio("example.test"),
        None,
        "a record that does not move has no cutover ratio"
    );
    // Certificates per environment: old and new present different ones.
    let certs = s["certificates"].as_array().unwrap();
    let fp = |env: &str| {
        certs
            .iter()
            .find(|c| c["env"] == env)
            .unwrap_or_else(|| panic!("no {env} certificate: {certs:#?}"))["sha256_prefix"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(fp("old").len(), 16);
    assert_ne!(fp("old"), fp("new"));
    assert_eq!(s["mail"]["configured"], false);

    assert_eq!(
        phase_metrics(&d),
        (stateset("preparation"), vec![("old".into(), 1.0)], Some(0.0))
    );
}

#[test]
fn a_phase_set_by_hand_wins_over_the_clock_survives_a_reload_and_is_gated_by_lifecycle() {
    lab();
    let (_dir, yaml) = checks(&plan());
    let d = Daemon::start_with(&yaml, &["--web.enable-lifecycle"]);
    assert_eq!(phase_metrics(&d).0, stateset("preparation"));

    // JSON body.
    let (code, body) = request(
        d.addr,
        "POST",
        "/api/v1/phase",
        &[("Content-Type", "application/json")],
        r#"{"phase":"switched"}"#,
    );
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (answer["phase"].as_str(), answer["source"].as_str()),
        (Some("switched"), Some("manual"))
    );
    assert_eq!(answer["clock"], "preparation");
    assert_eq!(
        phase_metrics(&d),
        (stateset("switched"), vec![("new".into(), 1.0)], Some(1.0))
    );
    let s = status(&d);
    assert_eq!(
        (s["phase"]["phase"].as_str(), s["phase"]["serving"].as_str()),
        (Some("switched"), Some("new"))
    );
    let questions: Vec<&str> = s["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["question"].as_str().unwrap())
        .collect();
    assert_eq!(questions, ["Is live = new?", "Is new serving?"]);

    // Form body, as `curl -d phase=window` sends it.
    let (code, body) = request(
        d.addr,
        "POST",
        "/api/v1/phase",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "phase=window",
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        phase_metrics(&d),
        (stateset("window"), vec![("none".into(), 1.0)], Some(1.0))
    );
    // Refused: unknown phase, and a browser posting from another site's page.
    let (code, body) = request(d.addr, "POST", "/api/v1/phase", &[], r#"{"phase":"rollback"}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("unknown phase `rollback`"), "{body}");
    let (code, body) = request(
        d.addr,
        "POST",
        "/api/v1/phase",
        &[("Origin", "http://evil.example")],
        "phase=decommission",
    );
    assert_eq!(code, 403, "{body}");
    assert_eq!(phase_metrics(&d).0, stateset("window"));

    // The CLI, as on-call uses it.
    let cli = |args: &[&str]| {
        common::decode(
            common::bin()
                .args(args)
                .args(["--web.listen-address", &d.addr.to_string()])
                .output()
                .unwrap(),
        )
    };
    let (code, out, err) = cli(&["phase", "set", "decommission"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("decommission (set by hand at"), "{out}");
    assert!(out.contains("the clock says preparation); new should serve"), "{out}");

    // A reload with a changed plan keeps the override.
    std::fs::write(
        &d.config,
        lab().render(&yaml.replace("name: preparation", "name: preparation, serving: old")),
    )
    .unwrap();
    let (code, body) = d.reload();
    assert_eq!(code, 200, "{body}");
    let (code, out, err) = cli(&["phase", "show"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("MIGRATION PHASE: decommission (set by hand"), "{out}");
    assert!(out.contains("GO/NO-GO:") && out.contains("Is live = new?"), "{out}");
    assert_eq!(phase_metrics(&d).0, stateset("decommission"));

    // Cleared: the clock rules again.
    let (code, out, err) = cli(&["phase", "clear"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("preparation (by the clock since"), "{out}");
    assert_eq!(
        phase_metrics(&d),
        (stateset("preparation"), vec![("old".into(), 1.0)], Some(0.0))
    );

    // Without --web.enable-lifecycle the phase cannot be changed over HTTP.
    let closed = Daemon::start(&yaml);
    let (code, body) = request(closed.addr, "POST", "/api/v1/phase", &[], r#"{"phase":"switched"}"#);
    assert_eq!(code, 403, "{body}");
    let (code, out, err) = common::decode(
        common::bin()
            .args([
                "phase",
                "set",
                "switched",
                "--web.listen-address",
                &closed.addr.to_string(),
            ])
            .output()
            .unwrap(),
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("403 Forbidden") && err.contains("--web.enable-lifecycle"),
        "{err}"
    );
    assert_eq!(phase_metrics(&closed).0, stateset("preparation"));
}

#[test]
fn without_a_migration_section_the_phase_is_unknown_until_set_by_hand() {
    lab();
    let (_dir, yaml) = checks("");
    let d = Daemon::start_with(&yaml, &["--web.enable-lifecycle"]);
    let s = status(&d);
    assert_eq!(s["phase"]["source"], "unconfigured");
    assert!(s["verdicts"].as_array().unwrap().is_empty());
    assert_eq!(phase_metrics(&d), (stateset("none"), vec![], Some(0.0)));
    let (code, body) = request(d.addr, "POST", "/api/v1/phase", &[], "phase=switched");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        phase_metrics(&d),
        (stateset("switched"), vec![("new".into(), 1.0)], Some(1.0))
    );
}

#[test]
fn phase_mistakes_in_the_check_file_are_reported_with_positions() {
    lab();
    let yaml = "environments:\n  old: {addresses: [127.0.0.10]}\n  new: {addresses: [127.0.0.20]}\nchecks: []\nmigration:\n  phases:\n    - {name: window, start: 2025-06-14T22:00:00+02:00, end: 2025-06-15T02:00:00+02:00}\n    - {name: switched, start: 2025-06-15T01:00:00+02:00, serving: newer}\n    - {name: decommission, start: 2025-06-16 08:00}\n";
    let (_dir, path) = common::write_config(yaml);
    let (code, _, err) = common::validate(&path, None);
    assert_eq!(code, 1, "{err}");
    let file = path.display();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert_eq!(
        lines[0],
        format!(
            "{file}:8:58: field `migration.phases[1].serving`: unknown environment `newer`: expected `none` or one of `old`, `new`"
        )
    );
    // Offsets count: 01:00+02:00 starts before 02:00+02:00 ends.
    assert_eq!(
        lines[1],
        format!(
            "{file}:8:24: field `migration.phases[1].start`: phase `switched` starts (2025-06-14T23:00:00Z) before `window` (migration.phases[0]) ends (2025-06-15T00:00:00Z): phases must not overlap"
        )
    );
    let bad_time = format!(
        "{file}:9:28: field `migration.phases[2].start`: expected an RFC 3339 time like `2025-06-14T22:00:00+02:00`, got `2025-06-16 08:00` ("
    );
    assert!(lines[2].starts_with(&bad_time), "{}", lines[2]);
}

// ---------------------------------------------------------------------------
// The page in a real browser.
// ---------------------------------------------------------------------------

/// Debian's chromium; the test fails, never skips, without it.
fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("headless Chromium is needed: apt-get install chromium (.ci/run installs it)"))
}

/// Where screenshots go.
fn output_dir() -> PathBuf {
    let dir = common::root().join("target/test-output");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs headless Chromium on the page with a fresh profile, after giving the
/// page's script 5 s of virtual time to fetch and render.
fn browse(addr: SocketAddr, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(format!("http://{addr}/"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The rendered DOM.
fn dom(addr: SocketAddr) -> String {
    let dom = browse(addr, &["--dump-dom"]);
    assert!(
        dom.contains("data-rendered=\"1\""),
        "the page's script did not render: {dom}"
    );
    dom
}

/// A screenshot at `size` (`W,H`); asserts it is a real, non-trivial PNG.
fn screenshot(addr: SocketAddr, size: &str, name: &str) -> PathBuf {
    let path = output_dir().join(name);
    let _ = std::fs::remove_file(&path);
    browse(
        addr,
        &[
            &format!("--window-size={size}"),
            &format!("--screenshot={}", path.display()),
        ],
    );
    let png = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", path.display());
    assert!(
        png.len() > 20_000,
        "{} is only {} bytes: a blank page?",
        path.display(),
        png.len()
    );
    path
}

/// The rendered instance block of `check` in `env`: (status, its text).
fn instance(dom: &str, check: &str, env: &str) -> (String, String) {
    let re = Regex::new(&format!(
        r#"(?s)<div class="inst" data-check="{}" data-env="{}" data-address="[^"]*" data-status="(\w+)">(.*?)</td>"#,
        regex::escape(check),
        regex::escape(env)
    ))
    .unwrap();
    let caps = re
        .captures(dom)
        .unwrap_or_else(|| panic!("no {check}/{env} cell in the DOM:\n{dom}"));
    let text = Regex::new("<[^>]*>").unwrap().replace_all(&caps[2], " ").to_string();
    (
        caps[1].to_string(),
        text.split_whitespace().collect::<Vec<_>>().join(" "),
    )
}

fn text_of(dom: &str, id: &str) -> String {
    let re = Regex::new(&format!(r#"(?s)id="{id}"[^>]*>(.*?)</span>"#)).unwrap();
    let caps = re
        .captures(dom)
        .unwrap_or_else(|| panic!("no #{id} in the DOM:\n{dom}"));
    caps[1].to_string()
}

#[test]
fn the_status_page_renders_the_matrix_in_headless_chromium_and_shows_new_webmail_refused() {
    lab();
    let (_dir, yaml) = checks(&plan());
    let d = Daemon::start(&yaml);
    wait_status(&d, "every instance ran", all_ran);

    let page = dom(d.addr);
    assert_eq!(text_of(&page, "phase-name"), "Phase: preparation");
    assert_eq!(text_of(&page, "phase-serving"), "old should serve");
    for check in ["webmail", "imap"] {
        for env in ["old", "new", "live"] {
            let (status, text) = instance(&page, check, env);
            assert_eq!(status, "ok", "{check}/{env}: {text}");
            assert!(text.starts_with("✓ OK"), "{check}/{env}: {text}");
        }
        let (_, live) = instance(&page, check, "live");
        assert!(
            live.contains("→ old 127.0.0.10") || live.contains("→ new 127.0.0.20"),
            "{live}"
        );
    }
    let (status, text) = instance(&page, "submission-wrong-password", "new");
    assert_eq!(status, "fail");
    assert!(
        text.contains("✗ FAIL") && text.contains("auth_failed in auth"),
        "{text}"
    );
    assert!(
        text.contains("<redacted>") || text.contains("&lt;redacted&gt;"),
        "{text}"
    );
    assert!(
        page.contains(r#"<li data-answer="no">"#),
        "go/no-go in the DOM:\n{page}"
    );
    assert!(page.contains("no mail flow configured"));
    assert!(page.contains(r#"data-record="webmail.example.test""#));
    let mx_row = page
        .split(r#"data-record="example.test""#)
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap_or_else(|| panic!("no MX row in the DNS table:\n{page}"));
    assert!(mx_row.contains("unchanged") && !mx_row.contains(" of 2"), "{mx_row}");
    assert!(!page.contains(lab().var("USER")), "the rendered page names the account");

    screenshot(d.addr, "1280,900", "status-desktop.png");
    screenshot(d.addr, "390,844", "status-phone.png");

    // New's web server stops: the page shows new webmail failing, refused.
    let _nginx = lab_fault(&["svc", "stop", "new", "nginx"], &["svc", "start", "new", "nginx"]);
    wait_status(&d, "new webmail refused", |s| {
        cell(s, "webmail", "new")["reason"] == "refused"
    });
    let page = dom(d.addr);
    let (status, text) = instance(&page, "webmail", "new");
    assert_eq!(status, "fail", "{text}");
    assert!(
        text.starts_with("✗ FAIL 127.0.0.20 refused in connect failing since"),
        "{text}"
    );
    assert_eq!(instance(&page, "webmail", "old").0, "ok");
    assert_eq!(instance(&page, "imap", "new").0, "ok");
    screenshot(d.addr, "1280,900", "status-desktop-new-nginx-down.png");
    screenshot(d.addr, "390,844", "status-phone-new-nginx-down.png");
}

#[test]
fn the_phase_command_logs_in_when_the_daemon_asks_for_basic_auth() {
    lab();
    let (dir, yaml) = checks(&plan());
    let web = dir.path().join("web.yaml");
    let hash = bcrypt::hash("night-shift", 4).unwrap();
    // The harness waits for /-/ready without credentials.
    std::fs::write(
        &web,
        format!("basic_auth_users:\n  oncall: '{hash}'\nauth_excluded_paths: [/-/ready]\n"),
    )
    .unwrap();
    let d = Daemon::start_with(
        &yaml,
        &["--web.enable-lifecycle", "--web.config.file", web.to_str().unwrap()],
    );
    let phase = |password: Option<&str>| {
        let mut cmd = common::bin();
        cmd.args([
            "phase",
            "set",
            "window",
            "--web.username",
            "oncall",
            "--web.listen-address",
        ])
        .arg(d.addr.to_string())
        .env_remove("CUTOVER_WEB_PASSWORD");
        if let Some(p) = password {
            cmd.env("CUTOVER_WEB_PASSWORD", p);
        }
        common::decode(cmd.output().unwrap())
    };
    let (code, _, err) = phase(None);
    assert_eq!(code, 1);
    assert!(
        err.contains("put the password in the environment variable CUTOVER_WEB_PASSWORD"),
        "{err}"
    );
    let (code, _, err) = phase(Some("wrong"));
    assert_eq!(code, 1);
    assert!(err.contains("401 Unauthorized"), "{err}");
    let (code, out, err) = phase(Some("night-shift"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("window (set by hand at"), "{out}");
    // The status page needs the login too.
    assert_eq!(d.http("GET", "/api/v1/status").unwrap().0, 401);
}

#[test]
fn the_status_page_shows_the_customer_domain_audit_with_links_to_its_rows() {
    let lab = lab();
    // The first 100 of the lab's generated customers: every finding occurs.
    let all = std::fs::read_to_string(format!("{}/customers/domains.txt", lab.var("DIR")))
        .expect("tests/lab/up generates the customer domains");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("domains.txt");
    let first: String = all
        .lines()
        .filter(|l| !l.starts_with('#'))
        .take(100)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&file, first).unwrap();
    let yaml = format!(
        "environments:\n  old: {{addresses: [127.0.0.10]}}\n  new: {{addresses: [127.0.0.20]}}\n\
         checks:\n  - {{name: customers, kind: hosted_domains, domains_file: {}, resolvers: {{authoritative: 127.0.0.30}}, \
         mx_hosts: [mx.example.test], spf_include: spf.example.test, rate_limit: 2000}}\n",
        file.display()
    );
    let d = Daemon::start(&yaml);
    d.wait_for(
        "cutover_hosted_domains_audited",
        &[("check", "customers")],
        |v| v == 100.0,
        Duration::from_secs(20),
    );
    let dom = dom(d.addr);
    let table = dom
        .split("id=\"domains-table\"")
        .nth(1)
        .unwrap_or_else(|| panic!("no customer-domain table in {dom}"));
    assert!(table.contains("100 domains"), "{table}");
    // Of the first 100: 10 + 5 + 5 SPF, 8 MX, 3 + 2 autoconfig, 2 with all of them.
    assert!(table.contains("! 35 domains"), "{table}");
    assert!(
        table.contains("href=\"api/v1/domains?check=customers&amp;finding=mx_old_ip\""),
        "{table}"
    );
    screenshot(d.addr, "1280,1600", "status-domains.png");
}
