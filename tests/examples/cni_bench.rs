//! What the CNI plugin and the node agent cost, in the local mesh (as root), all in one
//! run so the figures compare:
//!
//! - pod creation (the runtime's whole CNI ADD: loopback, `ptp` + `host-local`, then
//!   the rest of the chain): before the agent joined the chain (baseline), with
//!   `ambit-cni` in the chain for a pod that is not enrolled, and for one that is (rules,
//!   hand-off to ztunnel, certificate, report);
//! - a namespace labelled: time until every ztunnel sees each of its running pods as
//!   HBONE (the agent finds them by IP, captures them, reports);
//! - a ztunnel restarted: time until the agent has handed it every enrolled pod again.
//!
//! Run: `cargo run --release -p ambit-tests --example cni_bench` (after
//! `cargo build --release --bins`). The report is printed and written to
//! `target/cni-bench-report.md`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ambit_localmesh::{LocalMesh, PodSpec, Protocol};
use support::Harness;

/// Pods per figure.
const PODS: usize = 20;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn row(name: &str, samples: &mut [Duration]) -> String {
    format!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} |\n",
        samples.len(),
        percentile(samples, 0.5).as_secs_f64() * 1000.0,
        percentile(samples, 0.9).as_secs_f64() * 1000.0,
        percentile(samples, 1.0).as_secs_f64() * 1000.0,
    )
}

fn make(mesh: &LocalMesh, namespace: &str, n: usize, prefix: &str) -> Vec<Duration> {
    (0..n)
        .map(|i| {
            let started = Instant::now();
            mesh.add_pod(
                "node-a",
                PodSpec::new(namespace, &format!("{prefix}{i}")).service_account("app"),
            )
            .unwrap();
            started.elapsed()
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let mesh = LocalMesh::builder()
        .nodes(["node-a", "node-b"])
        .build()
        .unwrap();
    // Baseline: the chain without ambit-cni (the agents have not joined it yet).
    let mut baseline = make(&mesh, "plain", PODS, "b");
    let running: Vec<_> = (0..PODS)
        .map(|i| support::pod(&mesh, "node-b", "later", &format!("r{i}"), "app"))
        .collect();
    let mut h = Harness::start_with_agents(mesh);

    let mut not_enrolled = make(&h.mesh, "plain", PODS, "n");
    let ambient: BTreeMap<String, String> =
        [("istio.io/dataplane-mode".to_owned(), "ambient".to_owned())].into();
    h.mesh.set_namespace_labels("shop", ambient.clone());
    h.mesh.write_kubernetes().unwrap();
    let mut enrolled = make(&h.mesh, "shop", PODS, "e");

    // Running pods, enrolled by a namespace label.
    let started = Instant::now();
    h.mesh.set_namespace_labels("later", ambient);
    h.mesh.write_kubernetes().unwrap();
    let mut relabel = Vec::new();
    for pod in &running {
        h.ambient
            .wait_for_protocol(&h.mesh, pod, Protocol::Hbone)
            .await
            .unwrap();
        relabel.push(started.elapsed());
    }

    // node-b's ztunnel restarted: its pods handed over again.
    let ztunnel = h.ztunnel("node-b");
    ztunnel.signal(ambit_localmesh::Signal::SIGKILL);
    ztunnel.wait(support::DEADLINE).unwrap();
    let started = Instant::now();
    h.ambient.restart_ztunnel(&h.mesh, "node-b").unwrap();
    let restarted = started.elapsed();
    let pattern = format!("pods handed over pods={PODS} refused=0");
    h.ambient
        .node_agent("node-b")
        .unwrap()
        .wait_for_log(&pattern, support::DEADLINE)
        .unwrap();
    let handed = started.elapsed();

    let mut report = String::from(
        "# CNI plugin and node agent\n\n\
         Local mesh, two nodes, release build; milliseconds.\n\n\
         | what | n | p50 | p90 | max |\n|---|---|---|---|---|\n",
    );
    report += &row(
        "pod creation, chain without ambit-cni (baseline)",
        &mut baseline,
    );
    report += &row(
        "pod creation, ambit-cni in the chain, pod not enrolled",
        &mut not_enrolled,
    );
    report += &row(
        "pod creation, ambit-cni in the chain, pod enrolled at ADD",
        &mut enrolled,
    );
    report += &row(
        &format!(
            "namespace labelled → each of {PODS} running pods HBONE in every ztunnel (cumulative)"
        ),
        &mut relabel,
    );
    report += &format!(
        "\nztunnel restarted with {PODS} enrolled pods: ready after {:.0} ms, all pods handed over again after {:.0} ms.\n\
         \nRatios to the baseline p50: not enrolled {:.2}x, enrolled {:.2}x.\n",
        restarted.as_secs_f64() * 1000.0,
        handed.as_secs_f64() * 1000.0,
        percentile(&mut not_enrolled, 0.5).as_secs_f64() / percentile(&mut baseline, 0.5).as_secs_f64(),
        percentile(&mut enrolled, 0.5).as_secs_f64() / percentile(&mut baseline, 0.5).as_secs_f64(),
    );
    println!("{report}");
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cni-bench-report.md");
    std::fs::write(&path, &report).unwrap();
    eprintln!("written to {}", path.display());
}
