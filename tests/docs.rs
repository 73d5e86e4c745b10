//! The README documents what the code declares: every metric, every failure
//! reason, and the two commands it opens with.

mod common;

use cutover_monitor::metrics::CATALOG;
use cutover_monitor::probe::FailureReason;

fn readme() -> String {
    std::fs::read_to_string(common::root().join("README.md")).unwrap()
}

#[test]
fn every_metric_is_in_the_readme_reference() {
    let readme = readme();
    for (name, help) in CATALOG {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "README lacks a row for {name}"
        );
        assert!(!help.is_empty() && name.starts_with("cutover_"), "{name}");
    }
}

#[test]
fn every_failure_reason_is_in_the_readme() {
    let readme = readme();
    for reason in FailureReason::ALL {
        assert!(
            readme.contains(&format!("| `{reason}` |")),
            "README lacks reason {reason}"
        );
    }
}

#[test]
fn the_readme_opens_with_the_run_and_test_commands() {
    let readme = readme();
    let blocks: Vec<&str> = readme
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap().trim())
        .collect();
    assert_eq!(
        blocks[0],
        "tests/lab/up && cargo run -- run --config.file checks/lab.yaml"
    );
    assert_eq!(blocks[1], "tests/run");
    let ci = std::fs::read_to_string(common::root().join(".ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == "tests/run"),
        ".ci/run must run the README's test command"
    );
}

#[test]
fn the_schema_command_prints_a_json_schema_of_the_check_file() {
    let (code, out, err) = common::decode(common::bin().arg("schema").output().unwrap());
    assert_eq!(code, 0, "{err}");
    let schema: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(schema["type"], "object", "{out}");
    for section in ["defaults", "environments", "credentials", "checks"] {
        assert!(schema["properties"][section].is_object(), "schema lacks {section}");
    }
    assert!(
        out.contains("\"http\"") && out.contains("\"tcp\""),
        "kinds in the schema: {out}"
    );
}
