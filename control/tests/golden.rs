//! Golden translation tests: Kubernetes YAML in, Ambit's model out.
//!
//! Each directory under `tests/golden/` is a case. Its `input/` files are loaded
//! through the directory source and translated; the model and the skipped objects must
//! equal `expected.yaml`. A case with a `change/` directory then gets those files
//! written over its input (a file `X.deleted` removes `X`), is reloaded, and must equal
//! `expected-after-change.yaml`.
//!
//! After an intended change of output, `AMBIT_BLESS=1 cargo test -p ambit-control
//! --test golden` rewrites the expected files; review their diff before committing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use ambit_control::directory::Directory;
use ambit_control::translate;
use ambit_core::model::MeshConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Expected {
    model: MeshConfig,
    /// `Kind namespace/name: reason`, in order.
    skipped: Vec<String>,
    /// Objects kept without something they asked for, same form.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
    /// `namespace/name: Reason: message` of each AuthorizationPolicy (condition
    /// ZtunnelAccepted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    policies: Vec<String>,
    /// The status conditions of waypoint objects (`istio.io/WaypointBound`,
    /// `WaypointAccepted`, a Gateway's own), `Kind namespace/name: Type=Status
    /// (Reason): message`, and a Gateway's address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    status: Vec<String>,
}

#[test]
fn golden_translations() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases under {}", root.display());
    let mut failures = Vec::new();
    for case in &cases {
        let work = tempfile::tempdir().unwrap();
        copy_over(&case.join("input"), work.path());
        let mut directory = Directory::new(work.path());
        check(case, &mut directory, "expected.yaml", &mut failures);
        let change = case.join("change");
        if change.is_dir() {
            copy_over(&change, work.path());
            check(
                case,
                &mut directory,
                "expected-after-change.yaml",
                &mut failures,
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn check(case: &Path, directory: &mut Directory, expected: &str, failures: &mut Vec<String>) {
    let errors = directory.reload().unwrap();
    assert!(errors.is_empty(), "{}: {errors:?}", case.display());
    let translation = translate(&directory.resources());
    let got = Expected {
        model: translation.config,
        skipped: translation
            .skipped
            .iter()
            .map(ToString::to_string)
            .collect(),
        warnings: translation
            .warnings
            .iter()
            .map(ToString::to_string)
            .collect(),
        policies: translation
            .policy_status
            .iter()
            .map(|(kind, key, a)| format!("{kind} {key}: {}: {}", a.reason, a.message))
            .collect(),
        status: waypoint_status(&translation.waypoint_status)
            .into_iter()
            .chain(route_status(&translation.route_status))
            .collect(),
    };
    // Whatever the input, ztunnel must accept the model as a whole, as it arrives
    // over xDS: a clash the translation let through would make it reject everything.
    let resources = ambit_net::xds::to_resources(&got.model);
    let (received, errors) = ambit_net::xds::from_resources(&resources);
    if !errors.is_empty() {
        failures.push(format!(
            "{}: xDS resources rejected: {errors:?}",
            case.display()
        ));
    }
    if let Err(e) =
        ambit_core::model::MeshState::build(&received, &"cluster.local".parse().unwrap())
    {
        failures.push(format!(
            "{}: ztunnel would reject the model: {e}",
            case.display()
        ));
    }
    let path = case.join(expected);
    if std::env::var_os("AMBIT_BLESS").is_some() {
        fs::write(&path, serde_yaml_ng::to_string(&got).unwrap()).unwrap();
        return;
    }
    let text = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (AMBIT_BLESS=1 writes it)", path.display()));
    let want: Expected = serde_yaml_ng::from_str(&text).unwrap();
    if got != want {
        failures.push(format!(
            "{} differs; got:\n{}",
            path.display(),
            serde_yaml_ng::to_string(&got).unwrap()
        ));
    }
}

fn waypoint_status(status: &translate::waypoints::WaypointStatus) -> Vec<String> {
    let line =
        |kind: &str, key: &dyn std::fmt::Display, ty: &str, c: &translate::waypoints::Condition| {
            format!(
                "{kind} {key}: {ty}={} ({}): {}",
                if c.status { "True" } else { "False" },
                c.reason,
                c.message
            )
        };
    let mut lines = Vec::new();
    for (kind, key, c) in &status.bound {
        lines.push(line(kind, key, "istio.io/WaypointBound", c));
    }
    for (key, c) in &status.policies {
        lines.push(line("AuthorizationPolicy", key, "WaypointAccepted", c));
    }
    for (key, g) in &status.gateways {
        lines.push(line("Gateway", key, "Accepted", &g.accepted));
        lines.push(line("Gateway", key, "Programmed", &g.programmed));
        for (name, accepted, _) in &g.listeners {
            lines.push(line(
                "Gateway",
                key,
                &format!("listener {name} Accepted"),
                accepted,
            ));
        }
        if let Some(h) = &g.hostname {
            lines.push(format!("Gateway {key}: address {h}"));
        }
    }
    lines
}

fn route_status(status: &translate::routes::RouteStatus) -> Vec<String> {
    let mut lines = Vec::new();
    for (kind, key, c) in &status.conditions {
        lines.push(format!(
            "{kind} {key}: Accepted={} ({}): {}",
            if c.status { "True" } else { "False" },
            c.reason,
            c.message
        ));
    }
    for (kind, key, parents) in &status.parents {
        for p in parents {
            for (ty, c) in [
                ("Accepted", &p.accepted),
                ("ResolvedRefs", &p.resolved_refs),
            ] {
                lines.push(format!(
                    "{kind} {key}: parent {} {}/{}: {ty}={} ({}): {}",
                    p.kind,
                    p.namespace,
                    p.name,
                    if c.status { "True" } else { "False" },
                    c.reason,
                    c.message
                ));
            }
        }
    }
    lines
}

/// Copies the files of `from` into `to`; `X.deleted` deletes `X` instead.
fn copy_over(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        match name.strip_suffix(".deleted") {
            Some(deleted) => fs::remove_file(to.join(deleted)).unwrap(),
            None => {
                fs::copy(&path, to.join(name)).unwrap();
            }
        }
    }
}
