//! What on-call opens at 2 a.m., checked the way they meet it: the alert rules
//! through promtool and their runbooks in the README, the Grafana dashboard's
//! JSON, and every dashboard query and one alert on a real Prometheus (Debian's
//! `prometheus` package) scraping the daemon on the lab.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, lab, lab_fault};
use regex::Regex;
use serde_json::Value;

fn dashboards() -> PathBuf {
    common::root().join("dashboards")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dashboard() -> Value {
    let path = dashboards().join("cutover-monitor.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn alert_rules() -> serde_yaml::Value {
    serde_yaml::from_str(&read(&dashboards().join("alerts.yml"))).expect("alerts.yml is YAML")
}

/// Every rule of a rule file (alerting and recording).
fn rules(file: &serde_yaml::Value) -> Vec<&serde_yaml::Value> {
    file["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .collect()
}

/// Runs promtool in `dashboards/`; returns (success, stdout and stderr).
fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dashboards())
        .output()
        .expect("promtool must be installed (Debian package prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn assert_clean(args: &[&str]) {
    let (ok, text) = promtool(args);
    assert!(ok, "promtool {}: {text}", args.join(" "));
    assert!(text.contains("SUCCESS"), "promtool {}: {text}", args.join(" "));
    assert!(
        !text.to_lowercase().contains("warn"),
        "promtool {} warns: {text}",
        args.join(" ")
    );
}

/// A Prometheus duration (`90s`, `1h30m`, `2m`) in seconds.
fn prom_seconds(text: &str) -> f64 {
    let re = Regex::new(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)").unwrap();
    assert!(
        re.replace_all(text, "").is_empty() && !text.is_empty(),
        "not a Prometheus duration: {text:?}"
    );
    re.captures_iter(text)
        .map(|c| {
            let n: f64 = c[1].parse().unwrap();
            n * match &c[2] {
                "ms" => 0.001,
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                "d" => 86400.0,
                "w" => 7.0 * 86400.0,
                _ => 365.0 * 86400.0,
            }
        })
        .sum()
}

/// The metric name of an `input_series` entry (`name{labels}`).
fn series_metric(series: &str) -> &str {
    series.split('{').next().unwrap().trim()
}

/// Every rule is unit-tested both ways: a case where it fires, and a
/// *healthy* case. An `alert_rule_test` with `exp_alerts: []` (or none)
/// counts as healthy for rule R only when
/// 1. its `eval_time` is at least R's `for:` (the rule had time to fire);
/// 2. every metric R's expression names has an input series in that test
///    (a recording rule counts when any metric of its own expression does):
///    the silence is not merely missing series;
/// 3. the case still holds with every `for:` cut to 0: R's expression itself
///    is false at that time (healthy values), not a `for:` still pending.
///
/// (3) is checked by running promtool on one generated test file per
/// candidate, against a copy of the rules without `for:`.
#[test]
fn alert_rules_are_clean_and_every_rule_is_unit_tested_both_ways() {
    assert_clean(&["check", "rules", "alerts.yml"]);
    assert_clean(&["test", "rules", "alerts.test.yml"]);
    // The example Prometheus configuration loads the same rule file.
    assert_clean(&["check", "config", "prometheus.yml"]);

    let file = alert_rules();
    let tests: serde_yaml::Value =
        serde_yaml::from_str(&read(&dashboards().join("alerts.test.yml"))).expect("alerts.test.yml is YAML");
    let cases = tests["tests"].as_sequence().expect("tests");
    let recorded: BTreeMap<&str, BTreeSet<String>> = rules(&file)
        .iter()
        .filter_map(|r| Some((r["record"].as_str()?, metric_names(r["expr"].as_str()?))))
        .collect();
    let alerts: BTreeMap<&str, &serde_yaml::Value> = rules(&file)
        .into_iter()
        .filter_map(|r| Some((r["alert"].as_str()?, r)))
        .collect();

    // Alertnames with a firing case; candidate healthy cases as standalone
    // promtool test groups, with the alertname each one stands for.
    let mut fires = BTreeSet::new();
    let mut candidates: Vec<(String, serde_yaml::Value)> = Vec::new();
    let mut tested = BTreeSet::new();
    let mut expressions_tested = BTreeSet::new();
    for case in cases {
        let present: BTreeSet<&str> = case["input_series"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|s| series_metric(s["series"].as_str().expect("series")))
            .collect();
        for t in case["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = t["alertname"].as_str().unwrap().to_string();
            tested.insert(name.clone());
            if t["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()) {
                fires.insert(name);
                continue;
            }
            let Some(rule) = alerts.get(name.as_str()) else {
                continue;
            };
            let for_secs = rule["for"].as_str().map_or(0.0, prom_seconds);
            let eval = prom_seconds(t["eval_time"].as_str().expect("eval_time"));
            let all_present = metric_names(rule["expr"].as_str().unwrap()).iter().all(|m| {
                present.contains(m.as_str())
                    || recorded
                        .get(m.as_str())
                        .is_some_and(|src| src.iter().any(|s| present.contains(s.as_str())))
            });
            if eval >= for_secs && all_present {
                let mut group = case.clone();
                let g = group.as_mapping_mut().unwrap();
                g.remove("promql_expr_test");
                g.insert("alert_rule_test".into(), serde_yaml::Value::Sequence(vec![t.clone()]));
                candidates.push((name, group));
            }
        }
        for t in case["promql_expr_test"].as_sequence().into_iter().flatten() {
            expressions_tested.insert(t["expr"].as_str().unwrap().to_string());
        }
    }

    // (3): the candidates against the rules without `for:`.
    let dir = tempfile::tempdir().unwrap();
    let mut no_for = file.clone();
    for group in no_for["groups"].as_sequence_mut().unwrap() {
        for rule in group["rules"].as_sequence_mut().unwrap() {
            rule.as_mapping_mut().unwrap().remove("for");
        }
    }
    let rules_path = dir.path().join("alerts-without-for.yml");
    std::fs::write(&rules_path, serde_yaml::to_string(&no_for).unwrap()).unwrap();
    let mut files = Vec::new();
    for (i, (_, group)) in candidates.iter().enumerate() {
        let mut test_file = serde_yaml::Mapping::new();
        test_file.insert(
            "rule_files".into(),
            serde_yaml::Value::Sequence(vec![rules_path.to_str().unwrap().into()]),
        );
        test_file.insert("evaluation_interval".into(), tests["evaluation_interval"].clone());
        test_file.insert("tests".into(), serde_yaml::Value::Sequence(vec![group.clone()]));
        let path = dir.path().join(format!("healthy-{i}.yml"));
        std::fs::write(&path, serde_yaml::to_string(&test_file).unwrap()).unwrap();
        files.push(path.to_str().unwrap().to_string());
    }
    let args: Vec<&str> = std::iter::once("test")
        .chain(std::iter::once("rules"))
        .chain(files.iter().map(String::as_str))
        .collect();
    let (_, report) = promtool(&args);
    // promtool reports each file as "Unit Testing:  FILE" then SUCCESS or FAILED.
    let mut passed = BTreeSet::new();
    for section in report.split("Unit Testing:").skip(1) {
        let (path, result) = section.split_once('\n').unwrap_or((section, ""));
        if result.trim_start().starts_with("SUCCESS") {
            passed.insert(path.trim().to_string());
        }
    }
    let healthy: BTreeSet<&str> = candidates
        .iter()
        .zip(&files)
        .filter(|(_, f)| passed.contains(f.as_str()))
        .map(|((name, _), _)| name.as_str())
        .collect();

    for rule in rules(&file) {
        if let Some(record) = rule["record"].as_str() {
            assert!(
                expressions_tested.contains(record),
                "recording rule {record} has no promql_expr_test"
            );
            continue;
        }
        let name = rule["alert"].as_str().expect("alert or record");
        assert!(tested.contains(name), "{name} has no alert_rule_test");
        assert!(fires.contains(name), "{name} needs a test where it fires");
        assert!(
            healthy.contains(name),
            "{name} needs a healthy case: `exp_alerts: []` at an eval_time past its `for:`, \
             with every metric its expression names in input_series, that stays silent with \
             `for:` cut to 0 (see this test's doc comment)\npromtool on the candidates:\n{report}"
        );
        let labels = &rule["labels"];
        let severity = labels["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                rule["annotations"][key].as_str().is_some_and(|s| !s.is_empty()),
                "{name} lacks annotation {key}"
            );
        }
    }
}

/// GitHub's anchor for a heading: lower case, spaces to dashes, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_links_a_runbook_in_the_readme_and_every_runbook_has_an_alert() {
    let readme = read(&common::root().join("README.md"));
    let section = readme
        .split("\n## Alerts and runbooks\n")
        .nth(1)
        .expect("README has a section \"## Alerts and runbooks\"");
    let section = section.split("\n## ").next().unwrap();
    let runbooks: BTreeMap<String, &str> = section
        .split("\n### ")
        .skip(1)
        .map(|r| (anchor(r.lines().next().unwrap()), r))
        .collect();
    let file = alert_rules();
    let mut linked = BTreeSet::new();
    for rule in rules(&file).into_iter().filter(|r| r["alert"].is_string()) {
        let name = rule["alert"].as_str().unwrap();
        let url = rule["annotations"]["runbook_url"].as_str().unwrap();
        let target = url
            .strip_prefix("README.md#")
            .unwrap_or_else(|| panic!("{name}: runbook_url {url}"));
        let runbook = runbooks
            .get(target)
            .unwrap_or_else(|| panic!("{name}: no README heading for {url} in \"Alerts and runbooks\""));
        // What it means, the first three things to check, how to silence.
        for part in ["\n1. ", "\n2. ", "\n3. ", "Silence"] {
            assert!(runbook.contains(part), "runbook {name} lacks {part:?}");
        }
        linked.insert(target.to_string());
    }
    let orphans: Vec<_> = runbooks.keys().filter(|k| !linked.contains(*k)).collect();
    assert!(orphans.is_empty(), "runbooks without an alert: {orphans:?}");
}

/// Every panel, with the panels of collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// One query of the dashboard: where it is and its PromQL.
struct Query {
    /// `panel 7 "Status over time" A`, or the annotation's or variable's name.
    place: String,
    /// The panel's title (for the allow-list), empty for annotations and variables.
    title: String,
    expr: String,
}

fn queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            out.push(Query {
                place: format!("panel {} {title:?} {}", p["id"], t["refId"].as_str().unwrap_or("?")),
                title,
                expr: t["expr"].as_str().expect("every target has an expr").to_string(),
            });
        }
    }
    for a in dashboard["annotations"]["list"].as_array().expect("annotations") {
        if let Some(expr) = a["expr"].as_str() {
            out.push(Query {
                place: format!("annotation {}", a["name"]),
                title: String::new(),
                expr: expr.to_string(),
            });
        }
    }
    out
}

/// Grafana's built-in variables the dashboard may use, with the value the
/// test puts in.
const BUILTINS: &[(&str, &str)] = &[("__rate_interval", "1m"), ("__range", "5m")];

/// The dashboard's own variables, as Grafana substitutes them: `All` is `.*`
/// (each variable's `allValue`), a pick of several is a regex alternation.
fn substitute(expr: &str, vars: &BTreeMap<String, String>) -> String {
    let re = Regex::new(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?").unwrap();
    re.replace_all(expr, |c: &regex::Captures| {
        let name = &c[1];
        vars.get(name)
            .cloned()
            .or_else(|| BUILTINS.iter().find(|(b, _)| *b == name).map(|(_, v)| v.to_string()))
            .unwrap_or_else(|| panic!("variable ${name} is neither a dashboard variable nor a known built-in: {expr}"))
    })
    .into_owned()
}

fn variable_names(dashboard: &Value) -> BTreeSet<String> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| v["name"].as_str().expect("variable name").to_string())
        .collect()
}

/// Metric names a PromQL expression refers to (identifiers before a selector
/// or range, minus functions and keywords).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let no_strings = Regex::new(r#""[^"]*""#).unwrap().replace_all(expr, "\"\"");
    // Label matchers, ranges and variables name no metric.
    let no_strings = Regex::new(r"\{[^}]*\}|\[[^\]]*\]|\$\{?\w+\}?")
        .unwrap()
        .replace_all(&no_strings, "");
    let no_groupings = Regex::new(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
        .unwrap()
        .replace_all(&no_strings, "");
    let ident = Regex::new(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b\s*(\(?)").unwrap();
    let keywords = [
        "and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring", "inf", "nan",
    ];
    ident
        .captures_iter(&no_groupings)
        .filter(|c| c[2].is_empty())
        .map(|c| c[1].to_string())
        .filter(|n| !keywords.contains(&n.as_str()))
        .collect()
}

/// Whether a metric name exists: declared in `metrics::CATALOG` (histograms
/// with their series suffixes), or one Prometheus or the process collector adds.
fn known_metric(name: &str) -> bool {
    let declared = |n: &str| cutover_monitor::metrics::CATALOG.iter().any(|(c, _)| *c == n);
    declared(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|s| name.strip_suffix(s).is_some_and(declared))
        || ["up", "scrape_duration_seconds"].contains(&name)
        || name.starts_with("process_")
}

#[test]
fn the_dashboard_is_importable_grafana_json_with_sound_references() {
    let d = dashboard();
    assert!(d["uid"].is_string() && d["title"].is_string(), "uid and title");
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "Grafana 10 schema"
    );
    let vars = variable_names(&d);
    let list = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        list.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["check", "env"] {
        assert_eq!(var(name)["type"], "query", "{name}");
        assert!(
            var(name)["definition"].as_str().unwrap().starts_with("label_values("),
            "{name}"
        );
        assert_eq!(var(name)["allValue"], ".*", "{name}: All must be a regex for =~");
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}", "{name}");
    }

    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(u64, [u64; 4])> = Vec::new();
    for p in panels(&d) {
        let id = p["id"].as_u64().expect("every panel has a numeric id");
        assert!(ids.insert(id), "panel id {id} used twice");
        let g = &p["gridPos"];
        let pos: Vec<u64> = ["x", "y", "w", "h"]
            .iter()
            .map(|k| g[k].as_u64().unwrap_or_else(|| panic!("panel {id}: gridPos.{k}")))
            .collect();
        assert!(
            pos[0] + pos[2] <= 24 && pos[2] > 0 && pos[3] > 0,
            "panel {id}: gridPos {g}"
        );
        for (other, b) in &boxes {
            let overlap =
                pos[0] < b[0] + b[2] && b[0] < pos[0] + pos[2] && pos[1] < b[1] + b[3] && b[1] < pos[1] + pos[3];
            assert!(!overlap, "panels {id} and {other} overlap");
        }
        boxes.push((id, [pos[0], pos[1], pos[2], pos[3]]));
        if p["type"] == "row" {
            continue; // rows only group panels; they query nothing
        }
        assert!(
            p["title"].as_str().is_some_and(|t| !t.is_empty()),
            "panel {id} has a title"
        );
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {id} has targets"));
        assert!(!targets.is_empty(), "panel {id} has targets");
        for ds in std::iter::once(&p["datasource"]).chain(targets.iter().map(|t| &t["datasource"])) {
            assert_eq!(ds["uid"], "${datasource}", "panel {id}: datasource {ds}");
            assert_eq!(ds["type"], "prometheus", "panel {id}: datasource {ds}");
        }
        let refs: BTreeSet<_> = targets.iter().map(|t| t["refId"].as_str().unwrap()).collect();
        assert_eq!(refs.len(), targets.len(), "panel {id}: refIds unique");
    }
    for a in d["annotations"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["expr"].is_string())
    {
        assert_eq!(a["datasource"]["uid"], "${datasource}", "annotation {}", a["name"]);
    }

    // Every variable a query uses exists, and every metric name is real.
    let var_ref = Regex::new(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)").unwrap();
    let mut used_metrics = BTreeSet::new();
    // A variable's `label_values(SELECTOR, LABEL)`: its selector.
    let variable_queries = list.iter().filter_map(|v| v["definition"].as_str()).map(|def| {
        def.trim_start_matches("label_values(")
            .rsplit_once(',')
            .expect("label_values(selector, label)")
            .0
    });
    for expr in queries(&d).iter().map(|q| q.expr.as_str()).chain(variable_queries) {
        for c in var_ref.captures_iter(expr) {
            let name = &c[1];
            assert!(
                vars.contains(name) || BUILTINS.iter().any(|(b, _)| *b == name),
                "${name} is not defined: {expr}"
            );
        }
        for m in metric_names(expr) {
            assert!(
                known_metric(&m),
                "{m} is no metric the daemon or Prometheus exports: {expr}"
            );
            used_metrics.insert(m);
        }
    }
    // What the issue asks to see, each on at least one panel.
    for m in [
        "cutover_probe_success",
        "cutover_probe_phase_duration_seconds",
        "cutover_probe_failures_total",
        "cutover_dns_answer_state",
        "cutover_dns_cutover_ratio",
        "cutover_dns_propagation_deadline_timestamp_seconds",
        "cutover_mail_sent_total",
        "cutover_mail_delivered_total",
        "cutover_mail_in_flight",
        "cutover_mail_late_total",
        "cutover_mail_lost_total",
        "cutover_mail_delivery_seconds_bucket",
        "cutover_tls_cert_not_after_timestamp_seconds",
        "cutover_tls_cert_info",
        "cutover_migration_phase",
        "cutover_expected_serving_env_info",
        "cutover_config_last_reload_successful",
        "cutover_probe_runs_total",
        "scrape_duration_seconds",
        "process_resident_memory_bytes",
        "cutover_spf_result",
    ] {
        assert!(used_metrics.contains(m), "no panel shows {m}");
    }
    let types: BTreeSet<_> = panels(&d).iter().filter_map(|p| p["type"].as_str()).collect();
    for t in ["state-timeline", "heatmap"] {
        assert!(types.contains(t), "no {t} panel");
    }

    // The alert rules only name real metrics (or their own recordings).
    let file = alert_rules();
    let recorded: BTreeSet<_> = rules(&file).iter().filter_map(|r| r["record"].as_str()).collect();
    for rule in rules(&file) {
        let expr = rule["expr"].as_str().unwrap();
        for m in metric_names(expr) {
            assert!(
                known_metric(&m) || recorded.contains(m.as_str()),
                "{m} in alerts.yml is no metric: {expr}"
            );
        }
    }

    // Grafana's provisioning files point at the dashboard and at Prometheus.
    let yaml = |p: &str| -> serde_yaml::Value { serde_yaml::from_str(&read(&dashboards().join(p))).unwrap() };
    let provider = yaml("provisioning/dashboards/cutover-monitor.yml");
    assert_eq!(provider["apiVersion"], 1);
    assert_eq!(provider["providers"][0]["type"], "file");
    assert!(provider["providers"][0]["options"]["path"].is_string());
    let sources = yaml("provisioning/datasources/prometheus.yml");
    assert_eq!(sources["apiVersion"], 1);
    assert_eq!(sources["datasources"][0]["type"], "prometheus");
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        r#"max by (check) (rate(cutover_probe_runs_total{check=~"$check"}[5m])) > on(job) group_left() up offset 15m or vector(1)"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["cutover_probe_runs_total".to_string(), "up".to_string()])
    );
}

// ---------------------------------------------------------------------------
// A real Prometheus.
// ---------------------------------------------------------------------------

/// `prometheus` on a free port with its own storage; killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with `dashboards/prometheus.yml` made fast (1 s scrape
    /// and evaluation), scraping `target`, with `rules` written next to it.
    fn start(target: SocketAddr, rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let mut config: serde_yaml::Value = serde_yaml::from_str(&read(&dashboards().join("prometheus.yml"))).unwrap();
        config["global"]["scrape_interval"] = "1s".into();
        config["global"]["evaluation_interval"] = "1s".into();
        config["rule_files"] = serde_yaml::from_str("[alerts.yml]").unwrap();
        let job = &mut config["scrape_configs"][0];
        assert_eq!(job["job_name"], "cutover-monitor", "the example's job");
        job["static_configs"][0]["targets"] = serde_yaml::from_str(&format!("[\"{target}\"]")).unwrap();
        std::fs::write(dir.path().join("alerts.yml"), rules).unwrap();
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, serde_yaml::to_string(&config).unwrap()).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("prometheus.log")).unwrap(),
            ))
            .spawn()
            .expect("prometheus must be installed (Debian package prometheus)");
        let mut p = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(common::http(p.addr, "GET", "/-/ready"), Ok((200, _))) {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("prometheus exited with {status}: {}", p.log());
            }
            assert!(Instant::now() < deadline, "prometheus not ready in 20s: {}", p.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// A GET on the HTTP API; the `data` of a successful answer, else the error.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = common::http(self.addr, "GET", path).map_err(|e| e.to_string())?;
        let answer: Value = serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
        if status == 200 && answer["status"] == "success" {
            Ok(answer["data"].clone())
        } else {
            Err(format!("{status}: {} {}", answer["errorType"], answer["error"]))
        }
    }

    /// An instant query through /api/v1/query: the result's series.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(expr)))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Pending and firing alerts.
    fn alerts(&self) -> Vec<Value> {
        let data = self
            .api("/api/v1/alerts")
            .unwrap_or_else(|e| panic!("/api/v1/alerts: {e}"));
        data["alerts"].as_array().cloned().unwrap_or_default()
    }

    /// `lastEvaluation` of alerting rule `name`, as /api/v1/rules reports it.
    fn last_evaluation(&self, name: &str) -> Option<String> {
        let data = self.api("/api/v1/rules?type=alert").ok()?;
        data["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .find(|r| r["name"] == name)
            .and_then(|r| r["lastEvaluation"].as_str().map(str::to_string))
    }

    /// Waits until alerting rule `name` has finished two evaluations after
    /// this call: the one in progress at the call may have started before
    /// the data the caller saw; the next one started after it.
    fn wait_rule_evaluated(&self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = self.last_evaluation(name);
        let mut evaluations = 0;
        while evaluations < 2 {
            assert!(
                Instant::now() < deadline,
                "rule {name} not evaluated twice within {timeout:?} (last {last:?})\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
            let now = self.last_evaluation(name);
            if now.is_some() && now != last {
                evaluations += 1;
                last = now;
            }
        }
    }

    /// Waits until `expr` returns something.
    fn wait_for(&self, expr: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.query(expr).is_ok_and(|r| !r.is_empty()) {
            assert!(
                Instant::now() < deadline,
                "{expr} returned nothing within {timeout:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter (RFC 3986 unreserved characters stay).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// checks/lab.yaml at a test's pace (every kind the lab runs, every 2 s),
/// plus `extra` checks.
fn lab_checks_fast(extra: &[&str]) -> String {
    let mut config: serde_yaml::Value = serde_yaml::from_str(&read(&common::root().join("checks/lab.yaml"))).unwrap();
    config["defaults"]["interval"] = "2s".into();
    config["defaults"]["timeout"] = "1500ms".into();
    let checks = config["checks"].as_sequence_mut().expect("checks/lab.yaml has checks");
    // The lab's mail flow, fast enough to deliver, go late and show within a test.
    for check in checks.iter_mut().filter(|c| c["kind"] == "mailflow") {
        check["interval"] = "3s".into();
        check["late_after"] = "20s".into();
        check["lost_after"] = "60s".into();
    }
    checks.extend(
        extra
            .iter()
            .map(|c| serde_yaml::from_str::<serde_yaml::Value>(c).unwrap()),
    );
    serde_yaml::to_string(&config).unwrap()
}

/// Sets the daemon's migration phase by hand, the way on-call does.
fn set_phase(daemon: &Daemon, phase: &str) {
    let (code, out, err) = common::decode(
        common::bin()
            .args(["phase", "set", phase, "--web.listen-address", &daemon.addr.to_string()])
            .output()
            .unwrap(),
    );
    assert_eq!(code, 0, "cutover-monitor phase set {phase}: {out}{err}");
}

/// Panels allowed to return nothing, each with the kind (or feature) whose
/// metrics it shows and that this test's config does not run yet. Empty: the
/// lab's check file runs mailflow and mail_auth, and the test sets the phase, so
/// every panel must show data. Add a panel here only with its missing producer.
const EXPECTED_EMPTY: &[(&str, &str)] = &[];

/// One failing instance, so the failure panels have reasons to show.
const CLOSED_PORT: &str = "{name: closed-port, kind: tcp, host: imap.example.test, port: 1, envs: [old]}";

#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus_scraping_the_lab() {
    lab();
    let storage = tempfile::tempdir().unwrap();
    let yaml = lab_checks_fast(&[CLOSED_PORT]);
    let storage_arg = storage.path().to_str().unwrap();
    let daemon = Daemon::start_with(&yaml, &["--web.enable-lifecycle", "--storage.path", storage_arg]);
    set_phase(&daemon, "preparation");
    let prom = Prometheus::start(daemon.addr, &read(&dashboards().join("alerts.yml")));
    prom.wait_for("cutover_build_info", Duration::from_secs(20));
    // A reload, for the reload annotation: after Prometheus saw the first load.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(daemon.reload().0, 200, "POST /-/reload");

    let d = dashboard();
    let all: BTreeMap<String, String> = [("check", ".*"), ("env", ".*"), ("job", "cutover-monitor")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // closed-port fails in old: the failure panels have data for the pick too.
    let picked: BTreeMap<String, String> = [
        ("check", "(imap|mailflow|closed-port)"),
        ("env", "(old|new)"),
        ("job", "cutover-monitor"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for name in variable_names(&d).into_iter().filter(|n| n != "datasource") {
        assert!(all.contains_key(&name), "the test has no value for variable ${name}");
    }
    let queries = queries(&d);
    for (title, _) in EXPECTED_EMPTY {
        assert!(
            queries.iter().any(|q| q.title == *title),
            "EXPECTED_EMPTY names no panel {title:?}"
        );
    }
    let allowed_empty = |q: &Query| EXPECTED_EMPTY.iter().any(|(t, _)| *t == q.title);

    // Series appear as probes run and mail is delivered: wait until every
    // query that must show data does, then hold the dashboard to it.
    let deadline = Instant::now() + Duration::from_secs(90);
    let wrong = loop {
        let mut wrong = Vec::new();
        for q in &queries {
            let expr = substitute(&q.expr, &all);
            match prom.query(&expr) {
                Err(e) => panic!("{}: {e}\n{expr}", q.place),
                Ok(r) if r.is_empty() != allowed_empty(q) => {
                    wrong.push(format!("{}: {} series\n  {expr}", q.place, r.len()))
                }
                Ok(_) => {}
            }
        }
        if wrong.is_empty() || Instant::now() > deadline {
            break wrong;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(
        wrong.is_empty(),
        "queries returning nothing (or data although listed in EXPECTED_EMPTY):\n{}\n(the lab's DNS must be in its default state `old` for the deadline panels)",
        wrong.join("\n")
    );
    // A pick of values, as Grafana writes a multi-value selection: every
    // query that uses a variable returns data exactly when Prometheus has
    // series of its metrics for the picked values (the lab provides imap and
    // mailflow in old and new, not dns, mail-auth or customer-domains), and
    // what it returns carries only picked values. So a variable that is not
    // applied, or filters everything away, fails here.
    let uses = |expr: &str, var: &str| expr.contains(&format!("${var}")) || expr.contains(&format!("${{{var}}}"));
    let pick_matches = |var: &str, value: &str| Regex::new(&format!("^(?:{})$", picked[var])).unwrap().is_match(value);
    let deadline = Instant::now() + Duration::from_secs(30);
    let wrong = loop {
        let mut wrong = Vec::new();
        for q in queries
            .iter()
            .filter(|q| ["check", "env", "job"].iter().any(|v| uses(&q.expr, v)))
        {
            let expr = substitute(&q.expr, &picked);
            let result = prom.query(&expr).unwrap_or_else(|e| panic!("{}: {e}\n{expr}", q.place));
            let names: Vec<String> = metric_names(&q.expr).into_iter().collect();
            let mut selector = format!("__name__=~\"{}\"", names.join("|"));
            for var in ["check", "env", "job"].into_iter().filter(|v| uses(&q.expr, v)) {
                selector.push_str(&format!(",{var}=~\"{}\"", picked[var]));
            }
            let present = prom
                .query(&format!("group({{{selector}}})"))
                .unwrap_or_else(|e| panic!("{}: {e}\n{selector}", q.place));
            if present.is_empty() != result.is_empty() {
                wrong.push(format!(
                    "{}: {} series, although the lab has {} series of {{{selector}}}\n  {expr}",
                    q.place,
                    result.len(),
                    if present.is_empty() { "no" } else { "some" },
                ));
            }
            for series in &result {
                for var in ["check", "env"].into_iter().filter(|v| uses(&q.expr, v)) {
                    if let Some(value) = series["metric"][var].as_str() {
                        if !pick_matches(var, value) {
                            wrong.push(format!("{}: {var}={value} is not picked\n  {expr}", q.place));
                        }
                    }
                }
            }
        }
        if wrong.is_empty() || Instant::now() > deadline {
            break wrong;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(wrong.is_empty(), "queries with picked values:\n{}", wrong.join("\n"));
    // The variables' own queries list values.
    let label_values = Regex::new(r"^label_values\((.*),\s*(\w+)\)$").unwrap();
    for v in d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "query")
    {
        let def = v["definition"].as_str().unwrap();
        let c = label_values
            .captures(def)
            .unwrap_or_else(|| panic!("variable {}: {def}", v["name"]));
        let selector = substitute(&c[1], &all);
        let values = prom
            .api(&format!("/api/v1/label/{}/values?match[]={}", &c[2], encode(&selector)))
            .unwrap_or_else(|e| panic!("variable {}: {e}", v["name"]));
        assert!(
            values.as_array().is_some_and(|a| !a.is_empty()),
            "variable {} lists nothing: {def}",
            v["name"]
        );
    }
}

/// The daemon on checks/lab.yaml in `phase`, scraped by a Prometheus that
/// runs the shipped rule file with every `for:` cut to 1s.
fn alerting_lab(phase: &str) -> (Daemon, Prometheus) {
    lab();
    let daemon = Daemon::start_with(&lab_checks_fast(&[]), &["--web.enable-lifecycle"]);
    // The daemon's real phase metric, set as on-call would.
    set_phase(&daemon, phase);
    daemon.wait_for(
        "cutover_migration_phase",
        &[("phase", phase)],
        |v| v == 1.0,
        Duration::from_secs(5),
    );
    let mut file = alert_rules();
    for group in file["groups"].as_sequence_mut().unwrap() {
        for rule in group["rules"].as_sequence_mut().unwrap() {
            if rule.get("for").is_some() {
                rule["for"] = "1s".into();
            }
        }
    }
    let prom = Prometheus::start(daemon.addr, &serde_yaml::to_string(&file).unwrap());
    (daemon, prom)
}

/// The pending or firing alert `name` about `check` in `env`, if any.
fn alert_on(prom: &Prometheus, name: &str, check: &str, env: &str) -> Option<Value> {
    prom.alerts()
        .into_iter()
        .find(|a| a["labels"]["alertname"] == name && a["labels"]["check"] == check && a["labels"]["env"] == env)
}

#[test]
fn new_imap_down_before_the_switch_fires_the_alert_in_a_real_prometheus() {
    let (daemon, prom) = alerting_lab("preparation");
    let healthy = r#"cutover_probe_success{check="imap", env="new"} == 1"#;
    prom.wait_for(healthy, Duration::from_secs(20));
    let new_imap_alert =
        |state: &str| alert_on(&prom, "CutoverNewFailingBeforeSwitch", "imap", "new").filter(|a| a["state"] == state);
    // The rule has been evaluated on the healthy series (not merely time
    // has passed): nothing about new's IMAP, neither pending nor firing.
    prom.wait_rule_evaluated("CutoverNewFailingBeforeSwitch", Duration::from_secs(20));
    assert!(
        new_imap_alert("pending").is_none() && new_imap_alert("firing").is_none(),
        "{:?}",
        prom.alerts()
    );

    let stopped = Instant::now();
    let dovecot = lab_fault(&["svc", "stop", "new", "dovecot"], &["svc", "start", "new", "dovecot"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let firing = loop {
        if let Some(a) = new_imap_alert("firing") {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "CutoverNewFailingBeforeSwitch did not fire within 60s: {:#?}\ndaemon log:\n{}",
            prom.alerts(),
            daemon.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("new's IMAP stopped -> alert firing in {:?}", stopped.elapsed());
    assert_eq!(firing["labels"]["severity"], "critical");
    assert_eq!(
        firing["annotations"]["runbook_url"],
        "README.md#cutovernewfailingbeforeswitch"
    );
    // The description names the most frequent reason of the last 5 minutes;
    // while Dovecot shuts down a login may fail first, then connections are
    // refused at every run.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = new_imap_alert("firing").expect("the alert keeps firing while Dovecot is down");
        let description = a["annotations"]["description"].as_str().unwrap().to_string();
        assert!(
            description.contains("Check imap (imap) fails in env new at 127.0.0.20"),
            "{description}"
        );
        if description.ends_with("in the last 5 minutes: refused.") {
            break;
        }
        assert!(Instant::now() < deadline, "the reason is not `refused`: {description}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // After the switch new failing is live's business: the alert goes away.
    set_phase(&daemon, "switched");
    let deadline = Instant::now() + Duration::from_secs(20);
    while new_imap_alert("firing").is_some() || new_imap_alert("pending").is_some() {
        assert!(
            Instant::now() < deadline,
            "still firing after the switch: {:?}",
            prom.alerts()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(dovecot);
    // Runs every 2 s, failing or not, never looked stale to the estimate.
    let stale: Vec<_> = prom
        .alerts()
        .into_iter()
        .filter(|a| a["labels"]["alertname"] == "CutoverProbesStale")
        .collect();
    assert!(stale.is_empty(), "{stale:#?}");
}

#[test]
fn old_imap_down_during_the_window_pages_nobody_but_does_in_preparation() {
    let (daemon, prom) = alerting_lab("window");
    prom.wait_for(
        r#"cutover_probe_success{check="imap", env="old"} == 1"#,
        Duration::from_secs(20),
    );
    let dovecot = lab_fault(&["svc", "stop", "old", "dovecot"], &["svc", "start", "old", "dovecot"]);
    // Prometheus sees old failing, and the rules have had time to act on it
    // (scrape, evaluation and `for:` are 1s each).
    prom.wait_for(
        r#"cutover_probe_success{check="imap", env="old"} == 0"#,
        Duration::from_secs(20),
    );
    prom.wait_rule_evaluated("CutoverOldFailingWhileServing", Duration::from_secs(20));
    let quiet_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < quiet_until {
        let alert = alert_on(&prom, "CutoverOldFailingWhileServing", "imap", "old");
        assert!(alert.is_none(), "old is down on purpose during the window: {alert:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    // The same outage in preparation is an outage of production.
    set_phase(&daemon, "preparation");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !alert_on(&prom, "CutoverOldFailingWhileServing", "imap", "old").is_some_and(|a| a["state"] == "firing") {
        assert!(
            Instant::now() < deadline,
            "no page in preparation: {:#?}",
            prom.alerts()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(dovecot);
}
