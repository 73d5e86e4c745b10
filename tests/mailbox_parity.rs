//! `kind: mailbox_parity` against real Dovecot on both sides (the lab's
//! parity instances, port 10993), which serve accounts generated with a known
//! mix (tests/lab/parity): exact counts per finding, rows, a fixed account, a
//! master user logging in both ways, a wrong admin password, a server stopped
//! mid-audit, mail landing on old after the switch, bad input.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Daemon, bin, decode, lab, lab_script};
use cutover_monitor::config;
use cutover_monitor::probe::hosted_domains::Progress;
use cutover_monitor::probe::mailbox_parity::{Finding, MailboxParityProbe, ParityReport, read_accounts};

const SECS: Duration = Duration::from_secs(1);

/// The audit of the lab's generated accounts; `{{…}}` filled per test.
const AUDIT: &str = "environments:
  old: {addresses: [127.0.0.10]}
  new: {addresses: [127.0.0.20]}
defaults:
  ca_file: {{CA}}
credentials:
  admin: {username: admin, password_file: {{ADMIN_PASSWORD_FILE}}}
checks:
  - name: parity
    kind: mailbox_parity
    accounts_file: {{ACCOUNTS}}
    host: imap.example.test
    port: 10993
    credentials: admin
    admin_login: {{LOGIN}}
    concurrency: 8
    rate_limit: 200
    session_timeout: 10s
{{EXTRA}}";

fn audit_config(accounts: &str, login: &str, extra: &str) -> String {
    let lab = lab();
    AUDIT
        .replace("{{ADMIN_PASSWORD_FILE}}", lab.var("ADMIN_PASSWORD_FILE"))
        .replace("{{ACCOUNTS}}", accounts)
        .replace("{{LOGIN}}", login)
        .replace("{{EXTRA}}", extra)
}

fn parity(args: &[&str]) -> String {
    lab_script(&[&["parity"], args].concat())
}

/// A fresh set of `n` accounts; returns account -> expected findings.
fn generate(n: usize) -> BTreeMap<String, Vec<String>> {
    parity(&["generate", &n.to_string()]);
    expected()
}

fn expected() -> BTreeMap<String, Vec<String>> {
    let tsv = std::fs::read_to_string(format!("{}/parity/expected.tsv", lab().var("DIR"))).unwrap();
    tsv.lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            (cols[0].to_string(), cols[2].split(',').map(str::to_string).collect())
        })
        .collect()
}

/// The generator's own counts per finding (from its mix table, not from a run).
fn expected_counts() -> BTreeMap<String, usize> {
    let tsv = std::fs::read_to_string(format!("{}/parity/counts.tsv", lab().var("DIR"))).unwrap();
    tsv.lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(f, n)| (f.to_string(), n.parse().unwrap()))
        .collect()
}

fn accounts_file() -> String {
    format!("{}/parity/accounts.txt", lab().var("DIR"))
}

/// Regenerates the accounts when dropped, so a fix or a late delivery never
/// leaks into the next test.
struct Regenerate(usize);

impl Drop for Regenerate {
    fn drop(&mut self) {
        parity(&["generate", &self.0.to_string()]);
    }
}

/// The `parity` command on a config: (exit code, stdout, stderr).
fn run_cli(yaml: &str, args: &[&str]) -> (i32, String, String) {
    let (_dir, path) = common::write_config(yaml);
    decode(
        bin()
            .arg("parity")
            .arg("--config.file")
            .arg(&path)
            .args(args)
            .output()
            .unwrap(),
    )
}

/// Every row of a `parity --format json` run: account -> findings.
fn rows(json: &str) -> BTreeMap<String, Vec<String>> {
    let rows: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
    rows.iter()
        .map(|r| {
            let findings = r["findings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_string())
                .collect();
            (r["account"].as_str().unwrap().to_string(), findings)
        })
        .collect()
}

fn counts(rows: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = Finding::ALL.iter().map(|f| (f.as_str().to_string(), 0)).collect();
    for findings in rows.values() {
        for f in findings {
            *counts.get_mut(f).unwrap() += 1;
        }
    }
    counts
}

const ALL: &str = "ok,folder_missing,fewer_messages,uid_regressed,uidvalidity_changed,size_differs,unseen_differs,login_failed,old_still_receiving";

#[test]
fn exact_counts_per_finding_match_the_generators_mix_and_rows_read_right() {
    let _regenerate = Regenerate(1000);
    let want = generate(1000);
    let want_counts = expected_counts();
    assert_eq!(want_counts["ok"], 650, "the mix table changed: {want_counts:?}");
    let start = Instant::now();
    let (code, out, err) = run_cli(
        &audit_config(&accounts_file(), "master_user", ""),
        &["--format", "json", "--finding", ALL],
    );
    let took = start.elapsed();
    assert_eq!(code, 0, "{err}");
    let got = rows(&out);
    assert_eq!(counts(&got), want_counts, "{err}");
    assert_eq!(got, want, "rows differ from tests/lab/parity's expected.tsv");
    eprintln!("1000 accounts audited in {:.1} s", took.as_secs_f64());
    // The numbers and names a support engineer reads.
    let (_, table, _) = run_cli(&audit_config(&accounts_file(), "master_user", ""), &[]);
    for line in [
        "p00011@parity.test  folder_missing",
        "Projects: missing on new (3 messages on old)",
        "INBOX: 3 messages on new, 5 on old (2 missing, 296 bytes)",
        "INBOX: UIDNEXT 6 on new, 10 on old with the same UIDVALIDITY 1700000013",
        "INBOX: UIDVALIDITY 1700500014 on new, 1700000014 on old",
        "new: imap.example.test rejected the login",
        "INBOX: 5 unseen on new, 0 on old",
        "INBOX: 888 bytes in 6 messages on new, 740 bytes in 5 on old",
    ] {
        assert!(
            table.contains(line),
            "missing {line:?} in\n{}",
            &table[..2000.min(table.len())]
        );
    }
    // `Sent` on old matched `Sent Items` on new; `Archive.2024` matched `Archive/2024`.
    assert_eq!(got["p00015@parity.test"], ["ok"]);
    assert_eq!(got["p00019@parity.test"], ["ok"]);
    assert!(
        !table.contains("p00015@parity.test"),
        "an ok account is listed by default"
    );
}

#[test]
fn fixing_one_account_moves_exactly_it_to_ok_with_either_master_login() {
    let _regenerate = Regenerate(200);
    generate(200);
    let yaml = |login: &str| audit_config(&accounts_file(), login, "");
    let (code, out, err) = run_cli(&yaml("master_user"), &["--format", "json", "--finding", ALL]);
    assert_eq!(code, 0, "{err}");
    let before = rows(&out);
    // The same audit through SASL PLAIN with an authorization identity.
    let (code, out, err) = run_cli(&yaml("authzid"), &["--format", "json", "--finding", ALL]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(rows(&out), before, "authzid and separator logins disagree");
    for account in ["p00011@parity.test", "p00016@parity.test"] {
        parity(&["fix", account]);
    }
    let (code, out, err) = run_cli(&yaml("master_user"), &["--format", "json", "--finding", ALL]);
    assert_eq!(code, 0, "{err}");
    let after = rows(&out);
    let moved: Vec<&String> = after.keys().filter(|a| after[*a] != before[*a]).collect();
    assert_eq!(moved, ["p00011@parity.test", "p00016@parity.test"]);
    assert_eq!(after["p00011@parity.test"], ["ok"]);
    assert_eq!(after["p00016@parity.test"], ["ok"]);
    assert_eq!(after, expected(), "expected.tsv follows `parity fix`");
}

#[test]
fn a_wrong_admin_password_is_one_clear_error_not_an_audit_of_failed_logins() {
    let _regenerate = Regenerate(100);
    generate(100);
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-admin-password\n").unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let yaml = audit_config(&accounts_file(), "master_user", "")
        .replace(lab().var("ADMIN_PASSWORD_FILE"), wrong.to_str().unwrap());
    let start = Instant::now();
    let (code, out, err) = run_cli(&yaml, &[]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.is_empty(), "no rows for a wrong credential: {out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(
            "auth_failed: old (127.0.0.10) rejects the admin login for each of the first 3 accounts (p00001@parity.test, p00002@parity.test, p00003@parity.test): check the admin credential"
        ),
        "{err}"
    );
    assert!(!err.contains("not-the-admin-password"));
    assert!(start.elapsed() < 20 * SECS, "took {:?}", start.elapsed());
}

/// Builds the parity probe of a config as the `parity` command does.
fn probe_of(yaml: &str) -> (tempfile::TempDir, MailboxParityProbe) {
    let (dir, path) = common::write_config(yaml);
    let build = |check: &config::Check, credentials: &config::Credentials| match &check.kind {
        config::KindSpec::MailboxParity(spec) => MailboxParityProbe::new(spec, check, credentials).map(Some),
        _ => Ok(None),
    };
    let mut loaded = config::load(&path, &build).unwrap_or_else(|e| panic!("{e}"));
    let probe = loaded.checks.remove(0).probe.unwrap();
    (dir, probe)
}

fn runtime() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn mail_delivered_to_old_after_the_switch_flags_that_account_only() {
    let _regenerate = Regenerate(100);
    generate(100);
    let (_dir, probe) = probe_of(&audit_config(&accounts_file(), "master_user", ""));
    let rt = runtime();
    let audit = |phase| {
        let report = rt.block_on(probe.audit(&Progress::default(), phase)).unwrap();
        probe.remember(Arc::new(report.clone()));
        report
    };
    let flagged = |r: &ParityReport| -> Vec<String> {
        r.accounts
            .iter()
            .filter(|a| a.has(Finding::OldStillReceiving))
            .map(|a| a.account.clone())
            .collect()
    };
    use cutover_monitor::migration::Phase;
    // Before the switch a delivery to old is normal: not judged.
    parity(&["deliver-old", "p00002@parity.test"]);
    assert!(flagged(&audit(Some(Phase::Preparation))).is_empty());
    // The first audit after the switch takes old's INBOX as the base.
    assert!(flagged(&audit(Some(Phase::Switched))).is_empty());
    parity(&["deliver-old", "p00001@parity.test"]);
    let report = audit(Some(Phase::Switched));
    assert_eq!(flagged(&report), ["p00001@parity.test"]);
    let row = report
        .accounts
        .iter()
        .find(|a| a.account == "p00001@parity.test")
        .unwrap();
    assert!(
        row.details
            .iter()
            .any(|d| d.contains("old INBOX: UIDNEXT 7, 6 at the switch: 1 message(s)")),
        "{row:?}"
    );
    // It stays flagged (the mail is still on old) in the next audit too.
    assert_eq!(flagged(&audit(Some(Phase::Decommission))), ["p00001@parity.test"]);
}

#[test]
fn new_stopped_mid_audit_fails_those_accounts_and_the_daemon_keeps_the_last_audit() {
    let _regenerate = Regenerate(100);
    generate(100);
    let lab = lab();
    let yaml = audit_config(&accounts_file(), "master_user", "    interval: 20s\n    timeout: 18s\n")
        .replace("concurrency: 8", "concurrency: 2")
        .replace("rate_limit: 200", "rate_limit: 20");
    let d = Daemon::start(&yaml);
    d.wait_for(
        "cutover_mailbox_parity_audited",
        &[("check", "parity")],
        |v| v == 100.0,
        30 * SECS,
    );
    let scrape = d.scrape();
    let last = scrape
        .get(
            "cutover_mailbox_parity_last_audit_timestamp_seconds",
            &[("check", "parity")],
        )
        .unwrap();
    let fewer = scrape
        .get(
            "cutover_mailbox_parity_accounts",
            &[("check", "parity"), ("finding", "fewer_messages")],
        )
        .unwrap();
    assert_eq!(fewer, 5.0);
    // The CLI mid-audit: new goes away after the first accounts.
    let cli = {
        let yaml = yaml.clone();
        std::thread::spawn(move || run_cli(&yaml, &["--format", "json", "--finding", ALL]))
    };
    std::thread::sleep(SECS);
    let _restore = common::lab_fault(
        &["svc", "stop", "new", "parity-imap"],
        &["svc", "start", "new", "parity-imap"],
    );
    let (code, out, err) = cli.join().unwrap();
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("new did not answer for"), "{err}");
    let got = rows(&out);
    let failed: Vec<&String> = got
        .iter()
        .filter(|(_, f)| f.as_slice() == ["login_failed"])
        .map(|(a, _)| a)
        .collect();
    assert!(failed.len() > 10 && failed.len() < 100, "{} failed", failed.len());
    let tail = got.keys().last().unwrap();
    assert_eq!(got[tail], ["login_failed"], "the last accounts ran after the stop");
    // The daemon's next audit fails; the last one stays in force.
    d.wait_for("cutover_probe_success", &[("check", "parity")], |v| v == 0.0, 40 * SECS);
    let scrape = d.scrape();
    assert_eq!(
        scrape.get(
            "cutover_mailbox_parity_last_audit_timestamp_seconds",
            &[("check", "parity")]
        ),
        Some(last)
    );
    assert_eq!(
        scrape.get(
            "cutover_mailbox_parity_accounts",
            &[("check", "parity"), ("finding", "login_failed")]
        ),
        Some(5.0)
    );
    let (status, body) = d.http("GET", "/api/v1/parity?finding=fewer_messages").unwrap();
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["audits"][0]["accounts"].as_array().unwrap().len(), 5);
    assert_eq!(answer["audits"][0]["counts"]["ok"], 65);
    assert!(d.logs().contains("keeping the last audit"), "{}", d.logs());
    assert!(
        !d.logs()
            .contains(std::fs::read_to_string(lab.var("ADMIN_PASSWORD_FILE")).unwrap().trim())
    );
}

#[test]
fn bad_accounts_files_give_clear_messages_and_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    // Unreadable: the loader names the field and the file.
    let missing = dir.path().join("nope.txt");
    let (code, _, err) = run_cli(&audit_config(missing.to_str().unwrap(), "master_user", ""), &[]);
    assert_eq!(code, 3);
    assert!(
        err.contains("field `checks[0].accounts_file`: cannot read") && err.contains("nope.txt: No such file"),
        "{err}"
    );
    // Invalid lines and duplicates are skipped, counted and named.
    let file = dir.path().join("accounts.txt");
    std::fs::write(
        &file,
        "# accounts\nA@Example.test\nnot-an-address\na@example.test\nb*admin@example.test\nc@example.test # note\n",
    )
    .unwrap();
    let (accounts, input) = read_accounts(&file).unwrap();
    assert_eq!(accounts, ["a@example.test", "c@example.test"]);
    assert_eq!((input.lines, input.invalid, input.duplicates), (6, 2, 1));
    let problems = input.problems.join("\n");
    for want in [
        "accounts.txt:3: `not-an-address` is not a mail address",
        "accounts.txt:4: `a@example.test` is listed before; skipped",
        "accounts.txt:5: `b*admin@example.test` is not a mail address: local part `b*admin`",
    ] {
        assert!(problems.contains(want), "missing {want:?} in\n{problems}");
    }
    // 100,000 lines: read in well under a second, at most 20 problems kept.
    let mut big = String::new();
    for i in 0..100_000 {
        if i % 10 == 0 {
            big.push_str("bad line\n");
        } else {
            big.push_str(&format!("user{}@big.test\n", i % 50_000));
        }
    }
    std::fs::write(&file, big).unwrap();
    let start = Instant::now();
    let (accounts, input) = read_accounts(&file).unwrap();
    assert!(start.elapsed() < 2 * SECS, "{:?}", start.elapsed());
    assert_eq!(accounts.len(), 45_000);
    assert_eq!((input.invalid, input.duplicates), (10_000, 45_000));
    assert_eq!(input.problems.len(), 20);
}
