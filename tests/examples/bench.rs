//! ztunnel's whole-path benchmark, with public tools, in the local mesh: a client pod
//! on node-a and a server pod on node-b. Each figure is measured first on the direct
//! path (pods not enrolled) and then through two ztunnels over HBONE (same pods,
//! enrolled), in the same run, and reported as a ratio, because these machines are
//! noisy.
//!
//! - throughput: iperf3, 1 and 8 streams;
//! - latency: sockperf ping-pong with 1 KB messages, one-way p50 and p99;
//! - new connections per second: wrk with `Connection: close` against the test app's
//!   HTTP server.
//!
//! Run (as root): `scripts/bench.sh`. The report is printed and written to
//! `target/bench-report.md`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use ambit_localmesh::{Pod, PodSpec, Protocol};
use support::{two_nodes, Harness};

const RUN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Figures {
    gbps_1: f64,
    gbps_8: f64,
    p50_us: f64,
    p99_us: f64,
    conns_per_s: f64,
}

/// The number after `"key":` at or after `anchor` in iperf3's JSON.
fn json_number_after(text: &str, anchor: &str, key: &str) -> f64 {
    let from = text
        .find(anchor)
        .unwrap_or_else(|| panic!("no {anchor} in iperf3 output:\n{text}"));
    let rest = &text[from..];
    let at = rest
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("no {key} after {anchor}"));
    let num: String = rest[at + key.len() + 3..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == '+' || *c == '-')
        .collect();
    num.parse().unwrap_or_else(|_| panic!("bad number {num:?}"))
}

fn run(h: &Harness, pod: &Pod, program: &str, args: &[&str]) -> String {
    let out = h.mesh.run_in(pod.netns(), program, args, RUN).unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        out.log,
        h.logs()
    );
    out.log
}

fn measure(h: &Harness, client: &Pod, server: &Pod) -> Figures {
    let ip = server.ip().to_string();
    let iperf = |streams: &str| {
        let out = run(
            h,
            client,
            "iperf3",
            &["-c", &ip, "-p", "5201", "-t", "5", "-P", streams, "-J"],
        );
        json_number_after(&out, "\"sum_received\"", "bits_per_second") / 1e9
    };
    let gbps_1 = iperf("1");
    let gbps_8 = iperf("8");
    let sock = run(
        h,
        client,
        "sockperf",
        &[
            "ping-pong",
            "--tcp",
            "-i",
            &ip,
            "-p",
            "11111",
            "-m",
            "1024",
            "-t",
            "5",
        ],
    );
    let percentile = |p: &str| -> f64 {
        let line = sock
            .lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .unwrap_or_else(|| panic!("no percentile {p} in sockperf output:\n{sock}"));
        line.rsplit('=').next().unwrap().trim().parse().unwrap()
    };
    let (p50_us, p99_us) = (percentile("50.000"), percentile("99.000"));
    let url = format!("http://{ip}:8080/");
    let wrk = run(
        h,
        client,
        "wrk",
        &[
            "-t",
            "1",
            "-c",
            "8",
            "-d",
            "5s",
            "-H",
            "Connection: close",
            &url,
        ],
    );
    let conns_per_s = wrk
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{wrk}"));
    Figures {
        gbps_1,
        gbps_8,
        p50_us,
        p99_us,
        conns_per_s,
    }
}

#[tokio::main]
async fn main() {
    let mesh = two_nodes();
    let client = mesh
        .add_pod("node-a", PodSpec::new("bench", "client"))
        .unwrap();
    let server = mesh
        .add_pod("node-b", PodSpec::new("bench", "server"))
        .unwrap();
    mesh.set_protocol(&client, Protocol::Hbone).unwrap();
    mesh.set_protocol(&server, Protocol::Hbone).unwrap();
    let h = Harness::start(mesh);
    let _iperf = h
        .mesh
        .spawn_in(
            server.netns(),
            "iperf3",
            ["-s", "-p", "5201", "--forceflush"],
            &[],
        )
        .unwrap();
    _iperf.wait_for_log("Server listening", RUN).unwrap();
    let _sockperf = h
        .mesh
        .spawn_in(
            server.netns(),
            "sockperf",
            ["server", "--tcp", "-i", "0.0.0.0", "-p", "11111"],
            &[],
        )
        .unwrap();
    _sockperf.wait_for_log("sockperf: Warmup stage", RUN).ok();
    let _http = h.serve(&server, &["http", "--port", "8080", "--name", "server"]);

    eprintln!("==> direct path (pods not enrolled)");
    let direct = measure(&h, &client, &server);
    eprintln!("==> through two ztunnels over HBONE");
    h.enrol(&client).await;
    h.enrol(&server).await;
    let mesh = measure(&h, &client, &server);

    let row = |name: &str, d: f64, m: f64, unit: &str, ratio: String| {
        format!("| {name} | {d:.2} {unit} | {m:.2} {unit} | {ratio} |\n")
    };
    let mut report = String::from(
        "# ztunnel benchmark (local mesh, client on node-a, server on node-b)\n\n\
         | figure | direct | mesh | mesh vs direct |\n|---|---|---|---|\n",
    );
    report += &row(
        "iperf3, 1 stream",
        direct.gbps_1,
        mesh.gbps_1,
        "Gb/s",
        format!("{:.2}x", mesh.gbps_1 / direct.gbps_1),
    );
    report += &row(
        "iperf3, 8 streams",
        direct.gbps_8,
        mesh.gbps_8,
        "Gb/s",
        format!("{:.2}x", mesh.gbps_8 / direct.gbps_8),
    );
    report += &row(
        "sockperf 1 KB one-way p50",
        direct.p50_us,
        mesh.p50_us,
        "µs",
        format!("+{:.1} µs", mesh.p50_us - direct.p50_us),
    );
    report += &row(
        "sockperf 1 KB one-way p99",
        direct.p99_us,
        mesh.p99_us,
        "µs",
        format!("+{:.1} µs", mesh.p99_us - direct.p99_us),
    );
    report += &row(
        "wrk new connections/s",
        direct.conns_per_s,
        mesh.conns_per_s,
        "/s",
        format!("{:.2}x", mesh.conns_per_s / direct.conns_per_s),
    );
    print!("{report}");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-report.md");
    std::fs::write(&path, &report).unwrap();
    eprintln!("report written to {}", path.display());
}
