//! `ambitctl analyze` as a user runs it: on a directory of deliberately broken YAML,
//! one file per finding, each file naming the findings it must give (`# expect: CODE
//! KIND NAMESPACE/NAME`, or `-` for a document that is no object); and on the
//! project's clean examples, which must give none.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn ambitctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ambitctl"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn broken() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/analyze/broken");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// `(code, kind, object)` of each finding.
fn findings(json: &str) -> Vec<(String, String, String)> {
    let v: Value = serde_json::from_str(json).unwrap();
    let mut out: Vec<(String, String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["code"].as_str().unwrap().to_owned(),
                f["kind"].as_str().unwrap().to_owned(),
                f["object"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn each_broken_file_gives_exactly_its_findings_with_a_place_and_a_fix() {
    let files = broken();
    let codes: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy()[..7].to_owned())
        .collect();
    // Every code has its file.
    let (_, list, _) = ambitctl(&["analyze", "--list-codes"]);
    for line in list.lines().skip(1) {
        let code = line.split_whitespace().next().unwrap();
        assert!(codes.iter().any(|c| c == code), "no file for {code}");
    }
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let mut expected: Vec<(String, String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                match words.as_slice() {
                    [code, "-"] => ((*code).to_owned(), String::new(), String::new()),
                    [code, kind, object] => {
                        ((*code).to_owned(), (*kind).to_owned(), (*object).to_owned())
                    }
                    _ => panic!("{}: bad expect line {l:?}", file.display()),
                }
            })
            .collect();
        expected.sort();
        assert!(!expected.is_empty(), "{}: no expect line", file.display());
        let path = file.to_str().unwrap();
        let (status, out, err) = ambitctl(&["analyze", "-f", path, "-o", "json"]);
        assert_eq!(findings(&out), expected, "{path}: {out}{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        for f in v.as_array().unwrap() {
            assert!(f["place"].as_str().unwrap().starts_with(path), "{f}");
            assert!(!f["fix"].as_str().unwrap().is_empty(), "{f}");
        }
        let error = v
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["severity"] == "Error");
        assert_eq!(status, if error { 79 } else { 0 }, "{path}: {err}");
        // The table says the same, one line per finding and its fix.
        let (_, table, _) = ambitctl(&["analyze", "-f", path]);
        for (code, kind, object) in &expected {
            assert!(
                table.lines().any(|l| l.contains(&format!("[{code}]"))
                    && l.contains(&format!("{kind} {object}").trim().to_string())),
                "{path}: {table}"
            );
        }
    }
}

#[test]
fn the_whole_directory_gives_each_finding_once_and_the_thresholds_choose_the_exit_status() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/analyze/broken");
    let (status, out, _) = ambitctl(&["analyze", "-f", dir.to_str().unwrap(), "-o", "yaml"]);
    assert_eq!(status, 79);
    let v: Vec<Value> = serde_yaml_ng::from_str(&out).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for f in &v {
        let id = (
            f["code"].clone(),
            f["kind"].clone(),
            f["object"].clone(),
            f["message"].clone(),
        );
        assert!(seen.insert(format!("{id:?}")), "reported twice: {f:?}");
    }
    // A warning alone passes unless warnings fail.
    let warning = dir.join("AMB0009-selects-nothing.yaml");
    let warning = warning.to_str().unwrap();
    assert_eq!(ambitctl(&["analyze", "-f", warning]).0, 0);
    assert_eq!(
        ambitctl(&["analyze", "-f", warning, "--failure-threshold", "warning"]).0,
        79
    );
    let (_, out, _) = ambitctl(&["analyze", "-f", warning, "--output-threshold", "error"]);
    assert!(out.contains("No findings"), "{out}");
}

#[test]
fn a_namespace_filter_keeps_that_namespaces_findings_and_reads_everything() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/analyze/broken");
    let dir = dir.to_str().unwrap();
    let (_, all, _) = ambitctl(&["analyze", "-f", dir, "-o", "json"]);
    let all = findings(&all);
    let namespaces: std::collections::BTreeSet<&str> = all
        .iter()
        .filter_map(|(_, _, object)| object.split_once('/').map(|(ns, _)| ns))
        .collect();
    assert!(namespaces.len() > 1, "{all:?}");
    for ns in namespaces {
        let (status, out, err) = ambitctl(&["analyze", "-f", dir, "-n", ns, "-o", "json"]);
        let expected: Vec<_> = all
            .iter()
            .filter(|(_, kind, object)| {
                object.starts_with(&format!("{ns}/")) || (kind == "Namespace" && object == ns)
            })
            .cloned()
            .collect();
        assert_eq!(findings(&out), expected, "-n {ns}: {err}");
        // The exit status follows what is reported, not what was read.
        let fails = serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["severity"] == "Error");
        assert_eq!(status, if fails { 79 } else { 0 }, "-n {ns}: {out}");
    }
    let (status, out, _) = ambitctl(&["analyze", "-f", dir, "-n", "no-such-namespace"]);
    assert_eq!(status, 0);
    assert!(
        out.contains("No findings in namespace no-such-namespace of"),
        "{out}"
    );
    let (status, _, err) = ambitctl(&["analyze", "-f", dir, "-n", "x", "-A"]);
    assert_eq!(status, 2, "{err}");
}

#[test]
fn the_examples_give_no_findings() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let (status, out, err) = ambitctl(&["analyze", "-f", examples.to_str().unwrap()]);
    assert_eq!(
        (status, out.contains("No findings")),
        (0, true),
        "{out}{err}"
    );
}

#[test]
fn bad_input_names_what_is_wrong() {
    let (status, _, err) = ambitctl(&["analyze", "-f", "/nonexistent/policies"]);
    assert_ne!(status, 0);
    assert!(err.contains("/nonexistent/policies"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let (status, _, err) = ambitctl(&["analyze", "-f", empty.path().to_str().unwrap()]);
    assert_ne!(status, 0);
    assert!(err.contains("no .yaml, .yml or .json file"), "{err}");
    let (status, _, err) = ambitctl(&["analyze", "-f", ".", "-o", "xml"]);
    assert_ne!(status, 0);
    assert!(err.contains("-o \"xml\""), "{err}");
    let (status, _, err) = ambitctl(&["analyze", "-f", ".", "--failure-threshold", "fatal"]);
    assert_ne!(status, 0);
    assert!(err.contains("--failure-threshold \"fatal\""), "{err}");
}

/// Without -f, the kubeconfig's cluster: every kind the control plane reads, listed
/// from the API server (here the fake one), analyzed the same way; a document the
/// control plane could not read is reported as it would log it.
#[tokio::test]
async fn without_files_it_analyzes_the_cluster_of_the_kubeconfig() {
    let api = ambit_kubefake::FakeApi::start().await;
    let broken = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/analyze/broken");
    for file in [
        "AMB0002-invalid-policy.yaml",
        "AMB0010-service-outside-mesh.yaml",
    ] {
        let text = std::fs::read_to_string(broken.join(file)).unwrap();
        for doc in text.split("\n---\n") {
            let body: String = doc
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n");
            api.put(&body);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: fake, user: {{token: test}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n",
            api.addr()
        ),
    )
    .unwrap();
    let kc = kubeconfig.to_str().unwrap().to_owned();
    let (status, out, err) = tokio::task::spawn_blocking(move || {
        ambitctl(&["analyze", "--kubeconfig", &kc, "-o", "json"])
    })
    .await
    .unwrap();
    assert_eq!(status, 79, "{out}{err}");
    assert_eq!(
        findings(&out),
        [
            (
                "AMB0002".to_owned(),
                "AuthorizationPolicy".to_owned(),
                "shop/deny-typo".to_owned()
            ),
            (
                "AMB0010".to_owned(),
                "Service".to_owned(),
                "legacy/old".to_owned()
            ),
        ],
        "{out}"
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|f| f["place"] == "cluster fake"),
        "{out}"
    );
    // A kubeconfig pointing nowhere is an error naming it.
    drop(api);
    let kc = kubeconfig.to_str().unwrap().to_owned();
    let (status, _, err) =
        tokio::task::spawn_blocking(move || ambitctl(&["analyze", "--kubeconfig", &kc]))
            .await
            .unwrap();
    assert_ne!(status, 0);
    assert!(!err.is_empty(), "{err}");
}
