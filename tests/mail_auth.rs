//! The `mail_auth` check against the lab's authoritative nsd (127.0.0.30):
//! SPF of example.test for the old and new outbound addresses before and after
//! the new one is added, PTR/FCrDNS of good and broken reverse names, DKIM and
//! DMARC records present and absent, and a resolver that is silent or gone.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::{Daemon, check_cmd, lab, lab_fault};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// A check of example.test asked of nsd, old and new as outbound environments.
fn config(extra_envs: &str, check: &str) -> String {
    format!(
        r#"
defaults: {{interval: 2s, timeout: 1s}}
environments:
  old: {{addresses: [127.0.0.10]}}
  new: {{addresses: [127.0.0.20]}}
  live: {{resolver: 127.0.0.30}}
{extra_envs}
checks:
  - name: auth
    kind: mail_auth
    domain: example.test
    resolver: 127.0.0.30
    dkim_selector: lab
{check}
"#
    )
}

fn spf<'a>(env: &'a str, result: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("check", "auth"),
        ("domain", "example.test"),
        ("env", env),
        ("result", result),
    ]
}

const INSTANCE: [(&str, &str); 2] = [("check", "auth"), ("env", "resolver")];

/// The rows of `check --format json`.
fn rows(json: &str) -> Vec<Value> {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"))
}

#[test]
fn spf_fails_for_new_until_the_policy_lists_its_address() {
    lab();
    // The lab's SPF lists only the old address (`-all`); make sure, and restore it.
    let _spf = lab_fault(&["dns", "spf", "old"], &["dns", "spf", "old"]);
    let daemon = Daemon::start(&config("", ""));
    daemon.wait_for("cutover_spf_result", &spf("new", "fail"), |v| v == 1.0, WAIT);
    let s = daemon.scrape();
    assert_eq!(
        s.get("cutover_spf_result", &spf("old", "pass")),
        Some(1.0),
        "{}",
        s.matching("cutover_spf")
    );
    assert_eq!(s.get("cutover_spf_result", &spf("new", "pass")), Some(0.0));
    assert_eq!(s.get("cutover_spf_result", &spf("old", "fail")), Some(0.0));
    // The address label carries the outbound address, not the resolver's.
    assert_eq!(
        s.get(
            "cutover_spf_result",
            &[("env", "new"), ("address", "127.0.0.20"), ("result", "fail")]
        ),
        Some(1.0)
    );
    // No series for `live`: it has no fixed outbound address.
    assert!(
        s.series("cutover_spf_result")
            .iter()
            .all(|(l, _)| !l.contains(&("env".into(), "live".into())))
    );
    // `new` must pass by default, so the check fails, naming env, address and result.
    assert_eq!(s.get("cutover_probe_success", &INSTANCE), Some(0.0));
    assert!(
        s.get(
            "cutover_probe_failures_total",
            &[INSTANCE[0], INSTANCE[1], ("reason", "content_mismatch")]
        )
        .is_some_and(|n| n >= 1.0),
        "{}",
        s.matching("cutover_probe_failures_total")
    );
    let (code, out, err) = check_cmd(&config("", ""), &["--format", "json"]);
    assert_eq!(code, 2, "{out}{err}");
    let row = &rows(&out)[0];
    assert_eq!(row["reason"], "content_mismatch", "{row}");
    assert_eq!(
        row["detail"], "SPF of example.test does not pass: new 127.0.0.20 gets fail",
        "{row}"
    );

    // The new address added to the policy: both pass, the check with them.
    let _both = lab_fault(&["dns", "spf", "both"], &["dns", "spf", "old"]);
    daemon.wait_for("cutover_spf_result", &spf("new", "pass"), |v| v == 1.0, WAIT);
    daemon.wait_for("cutover_probe_success", &INSTANCE, |v| v == 1.0, WAIT);
    let s = daemon.scrape();
    assert_eq!(s.get("cutover_spf_result", &spf("old", "pass")), Some(1.0));
    assert_eq!(s.get("cutover_spf_result", &spf("new", "fail")), Some(0.0));
    let (code, out, err) = check_cmd(&config("", ""), &[]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn require_pass_names_the_environments_that_must_pass() {
    lab();
    let _spf = lab_fault(&["dns", "spf", "old"], &["dns", "spf", "old"]);
    // Only old must pass: new's `fail` is visible in the metrics, not a failure.
    let (code, out, err) = check_cmd(&config("", "    require_pass: [old]"), &["--format", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    // Nothing must pass but old is not outbound: the config says where.
    let (code, _, err) = check_cmd(&config("", "    outbound: [new]\n    require_pass: [old]"), &[]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("checks[0].require_pass[0]") && err.contains("`old` is not an outbound environment"),
        "{err}"
    );
    let (code, _, err) = check_cmd(&config("", "    outbound: [live]"), &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("checks[0].outbound[0]") && err.contains("live"), "{err}");
}

#[test]
fn ptr_names_must_resolve_back_to_the_address() {
    lab();
    // .11's PTR names mx-old (which is .10), .12's names a host without
    // addresses, .13 has no PTR at all.
    let envs = "  broken: {addresses: [127.0.0.11, 127.0.0.12, 127.0.0.13]}";
    let daemon = Daemon::start(&config(envs, "    require_pass: []"));
    let ptr = |env, address| [("check", "auth"), ("env", env), ("address", address)];
    daemon.wait_for("cutover_ptr_ok", &ptr("new", "127.0.0.20"), |v| v == 1.0, WAIT);
    let s = daemon.scrape();
    assert_eq!(
        s.get("cutover_ptr_ok", &ptr("old", "127.0.0.10")),
        Some(1.0),
        "{}",
        s.matching("cutover_ptr")
    );
    for address in ["127.0.0.11", "127.0.0.12", "127.0.0.13"] {
        assert_eq!(s.get("cutover_ptr_ok", &ptr("broken", address)), Some(0.0), "{address}");
    }
    // Missing reverse names are findings, not resolver failures: the run succeeds.
    assert_eq!(
        s.get("cutover_probe_success", &INSTANCE),
        Some(1.0),
        "{}",
        daemon.logs()
    );
}

#[test]
fn dkim_and_dmarc_records_present_and_absent() {
    lab();
    let daemon = Daemon::start(&config("", ""));
    let dkim = [("check", "auth"), ("domain", "example.test"), ("selector", "lab")];
    let dmarc = [("check", "auth"), ("domain", "example.test")];
    daemon.wait_for("cutover_dkim_record_ok", &dkim, |v| v == 1.0, WAIT);
    daemon.wait_for("cutover_dmarc_record_ok", &dmarc, |v| v == 1.0, WAIT);
    {
        let _dkim = lab_fault(&["dns", "dkim", "off"], &["dns", "dkim", "on"]);
        daemon.wait_for("cutover_dkim_record_ok", &dkim, |v| v == 0.0, WAIT);
        assert_eq!(daemon.scrape().get("cutover_dmarc_record_ok", &dmarc), Some(1.0));
    }
    daemon.wait_for("cutover_dkim_record_ok", &dkim, |v| v == 1.0, WAIT);
    let _dmarc = lab_fault(&["dns", "dmarc", "off"], &["dns", "dmarc", "on"]);
    daemon.wait_for("cutover_dmarc_record_ok", &dmarc, |v| v == 0.0, WAIT);
    assert_eq!(daemon.scrape().get("cutover_dkim_record_ok", &dkim), Some(1.0));
}

#[test]
fn a_silent_resolver_is_a_timeout_and_a_missing_one_a_dns_failure() {
    lab();
    // Holds a UDP port and never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let yaml = config("", "").replace(
        "resolver: 127.0.0.30\n    dkim",
        &format!("resolver: 127.0.0.1:{port}\n    dkim"),
    );
    let (code, out, err) = check_cmd(&yaml, &["--format", "json"]);
    assert_eq!(code, 2, "{out}{err}");
    let row = &rows(&out)[0];
    assert_eq!(row["reason"], "timeout", "{row}");
    assert_eq!(row["phase"], "lookup", "{row}");
    let detail = row["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("no answer from 127.0.0.1:{port}")), "{detail}");

    // Nothing listens on the port: the resolver is unreachable.
    drop(silent);
    let (code, out, err) = check_cmd(&yaml, &["--format", "json"]);
    assert_eq!(code, 2, "{out}{err}");
    let row = &rows(&out)[0];
    assert_eq!(row["reason"], "dns", "{row}");
    assert!(
        row["detail"].as_str().unwrap().contains(&format!("127.0.0.1:{port}")),
        "{row}"
    );
}

/// Go/no-go counts every check that judges new, not only new's own instances:
/// mail sent from new is rejected while SPF fails for its address, so new is
/// not ready however green its servers are. A check that judges old only
/// (`require_pass: [old]`) does not block new.
#[test]
fn new_is_not_ready_while_spf_fails_for_its_outbound_address() {
    lab();
    let _spf = lab_fault(&["dns", "spf", "old"], &["dns", "spf", "old"]);
    let plan = "migration:\n  phases:\n    - {name: preparation, start: 2025-01-01T00:00:00Z}\n";
    let web = "  - {name: web, kind: http, url: \"https://webmail.example.test/\", envs: [new]}\n";
    let with_ca = |yaml: String| yaml.replace("timeout: 1s}", "timeout: 1s, ca_file: \"{{CA}}\"}");
    let yaml = with_ca(config(plan, web));
    let ready = |out: &str| {
        out.lines()
            .find(|l| l.contains("Is new ready?"))
            .unwrap_or_else(|| panic!("no readiness verdict in:\n{out}"))
            .to_string()
    };
    let (code, out, err) = check_cmd(&yaml, &[]);
    assert_eq!(code, 2, "{out}{err}");
    let line = ready(&out);
    assert!(line.contains("NO-GO"), "{line}\n{out}");
    assert!(line.contains("auth via resolver (content_mismatch)"), "{line}");
    assert!(!line.contains("web "), "new's own web check passes: {line}");

    // Judging old only: new's failing SPF is visible, not a verdict on new.
    let old_only = with_ca(config(plan, &format!("    require_pass: [old]\n{web}")));
    let (code, out, err) = check_cmd(&old_only, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(ready(&out).contains("GO") && !ready(&out).contains("NO-GO"), "{out}");

    // The policy lists new: GO.
    let _both = lab_fault(&["dns", "spf", "both"], &["dns", "spf", "old"]);
    let (code, out, err) = check_cmd(&yaml, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let line = ready(&out);
    assert!(line.contains("GO") && !line.contains("NO-GO"), "{line}\n{out}");
    assert!(line.contains("all 2 new instances OK"), "{line}");
}
