//! ztunnel's whole-path benchmark, with public tools, in the local mesh: a client pod
//! on node-a and a server pod on node-b. Each figure is measured first on the direct
//! path (pods not enrolled) and then through two ztunnels over HBONE (same pods,
//! enrolled), in the same run, and reported as a ratio, because these machines are
//! noisy.
//!
//! - throughput: iperf3, 1 and 8 streams;
//! - latency: sockperf ping-pong with 1 KB messages, one-way p50 and p99;
//! - new connections per second: wrk with `Connection: close` against nginx;
//! - CPU at a fixed 1,000 requests/s: hey `-q` against nginx, the two ztunnels' CPU
//!   time (the tools' own CPU varies too much between runs to compare machines);
//! - memory of 10,000 idle proxied connections: each ztunnel's resident set before and
//!   while the test app holds them open (mesh only: the direct path has no proxy).
//!
//! Run (as root): `scripts/bench.sh`. The report is printed and written to
//! `target/bench-report.md`. `scripts/bench.sh idle` measures only the memory figure,
//! `scripts/bench.sh conns` only new connections/s through the mesh (20 s, to profile).
//! `scripts/bench.sh logs` what the access log costs: new connections/s through the
//! mesh at `info` and with the access log filtered off, alternated in one run.
//! `scripts/bench.sh waypoint [quick]` is the waypoint's benchmark, against Envoy
//! (`bench/waypoint.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;
#[path = "bench/waypoint.rs"]
mod waypoint;

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
    /// Requests/s hey reached at the fixed rate.
    fixed_rps: f64,
    /// CPU the ztunnels used during it, in cores (0 on the direct path).
    ztunnel_cores: f64,
}

/// Requests per second of the fixed-rate run: `-c` workers of `-q` each.
const FIXED_WORKERS: u32 = 10;
const FIXED_RATE_EACH: u32 = 100;
/// Idle connections held for the memory figure.
const IDLE_CONNECTIONS: u32 = 10_000;

/// User plus system CPU time of `pid`, in clock ticks.
fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after `comm` (which may hold spaces) start after the last `)`.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Resident set of `pid` in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

fn ticks_per_second() -> f64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// nginx's ports. Every new-connection run uses a port of its own, so no run meets the
/// previous run's TIME_WAITs and conntrack entries (a minute long) on its tuples, direct
/// or through the mesh alike.
const NGINX_PORTS: [u16; 8] = [8080, 8081, 8082, 8083, 8084, 8085, 8086, 8087];

/// nginx serving a fixed 200 on `NGINX_PORTS` in `pod`, its files under a fresh
/// directory.
fn start_nginx(h: &Harness, pod: &Pod) -> (ambit_localmesh::Process, std::path::PathBuf) {
    let listens = NGINX_PORTS
        .map(|p| format!("listen {p} reuseport backlog=4096;"))
        .join(" ");
    start_nginx_with(h, pod, |_| {
        format!("{listens}\n    location / {{ return 200 \"ok\\n\"; }}")
    })
}

/// nginx in `pod` with one `server` block, the text `server(dir)` returns (`dir`: its
/// fresh directory, for files it serves), one worker, no access log.
fn start_nginx_with(
    h: &Harness,
    pod: &Pod,
    server: impl FnOnce(&std::path::Path) -> String,
) -> (ambit_localmesh::Process, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "ambit-bench-nginx-{}-{}",
        std::process::id(),
        pod.name()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = format!(
        "daemon off;\nworker_processes 1;\nerror_log stderr;\npid {d}/nginx.pid;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{\n    {server}\n  }}\n}}\n",
        d = dir.display(),
        server = server(&dir),
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let nginx = h
        .mesh
        .spawn_in(
            pod.netns(),
            "nginx",
            [
                "-p",
                dir.to_str().unwrap(),
                "-c",
                conf_path.to_str().unwrap(),
            ],
            &[],
        )
        .unwrap();
    (nginx, dir)
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

fn measure(h: &Harness, client: &Pod, server: &Pod, enrolled: bool) -> Figures {
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
    // Each path gets nginx ports of its own (see `NGINX_PORTS`).
    let ports = if enrolled { [8082, 8083] } else { [8080, 8081] };
    let url = format!("http://{ip}:{}/", ports[0]);
    let conns_per_s = new_connections(h, client, &url, "5s");
    let url = format!("http://{ip}:{}/", ports[1]);
    let ztunnels: Vec<u32> = ["node-a", "node-b"]
        .iter()
        .map(|n| h.ztunnel(n).pid())
        .collect();
    let z_before: u64 = ztunnels.iter().map(|&p| process_ticks(p)).sum();
    let started = std::time::Instant::now();
    let (workers, rate) = (FIXED_WORKERS.to_string(), FIXED_RATE_EACH.to_string());
    let hey = run(
        h,
        client,
        "hey",
        &["-z", "10s", "-c", &workers, "-q", &rate, &url],
    );
    let wall = started.elapsed().as_secs_f64();
    let z_after: u64 = ztunnels.iter().map(|&p| process_ticks(p)).sum();
    let fixed_rps = hey
        .lines()
        .find(|l| l.trim_start().starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in hey output:\n{hey}"));
    assert!(
        hey.contains("[200]\t"),
        "hey got answers other than 200:\n{hey}"
    );
    let tck = ticks_per_second();
    let ztunnel_cores = if enrolled {
        (z_after - z_before) as f64 / tck / wall
    } else {
        0.0
    };
    Figures {
        gbps_1,
        gbps_8,
        p50_us,
        p99_us,
        conns_per_s,
        fixed_rps,
        ztunnel_cores,
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("waypoint") {
        waypoint::main(std::env::args().nth(2).as_deref()).await;
        return;
    }
    let mesh = two_nodes();
    let client = mesh
        .add_pod("node-a", PodSpec::new("bench", "client"))
        .unwrap();
    let server = mesh
        .add_pod("node-b", PodSpec::new("bench", "server"))
        .unwrap();
    mesh.set_protocol(&client, Protocol::Hbone).unwrap();
    mesh.set_protocol(&server, Protocol::Hbone).unwrap();
    // ztunnel's default log level, as a user runs it: the access log's line per
    // connection (`bench logs` measures what it costs).
    let h = Harness::start_logging(mesh, "info");
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
    let (_nginx, nginx_dir) = start_nginx(&h, &server);
    let _echo = h.serve(&server, &["echo", "--port", "9000"]);

    if std::env::args().nth(1).as_deref() == Some("conns") {
        // Only new connections/s, at several concurrencies, then through the mesh
        // for 20 s more (to profile).
        let url = |port: u16| format!("http://{}:{port}/", server.ip());
        let sweep = |h: &Harness, ports: &[u16]| -> Vec<f64> {
            ["1", "8", "32"]
                .iter()
                .zip(ports)
                .map(|(c, &port)| new_connections_with(h, &client, &url(port), "5s", c))
                .collect()
        };
        let direct = sweep(&h, &NGINX_PORTS[..3]);
        let direct_long = new_connections(&h, &client, &url(NGINX_PORTS[6]), "20s");
        h.enrol(&client).await;
        h.enrol(&server).await;
        let mesh = sweep(&h, &NGINX_PORTS[3..6]);
        for ((c, d), m) in ["1", "8", "32"].iter().zip(&direct).zip(&mesh) {
            println!(
                "{c} connections at a time: direct {d:.0}/s, mesh {m:.0}/s ({:.2}x)",
                m / d
            );
        }
        eprintln!("==> wrk through the mesh for 20 s");
        let rate = new_connections(&h, &client, &url(NGINX_PORTS[7]), "20s");
        println!("8 at a time for 20 s: direct {direct_long:.0}/s, mesh {rate:.0}/s");
        let _ = std::fs::remove_dir_all(&nginx_dir);
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("logs") {
        // The access log's cost per connection, with ztunnel at `info` (a line per
        // connection) and with the access log filtered off, alternated in the same
        // run (the machine is shared and noisy): wrk's new connections/s, and both
        // ztunnels' CPU at a fixed rate of new connections (hey, no keep-alive).
        h.enrol(&client).await;
        h.enrol(&server).await;
        let settings = [
            ("info,access=off", "access log off"),
            ("info", "info (access log on)"),
        ];
        let ztunnels: Vec<u32> = ["node-a", "node-b"]
            .iter()
            .map(|n| h.ztunnel(n).pid())
            .collect();
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
        let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
        for round in 0..4 {
            for (i, (filter, name)) in settings.iter().enumerate() {
                for node in ["node-a", "node-b"] {
                    let reply = ambit_localmesh::ambient::node_request(
                        &h.mesh,
                        node,
                        15000,
                        "POST",
                        &format!("/logging?level={filter}"),
                    )
                    .await
                    .unwrap();
                    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
                }
                // A port of its own each time: the client's TIME_WAIT sockets of one
                // run do not slow the next.
                let port = NGINX_PORTS[round * 2 + i];
                let url = format!("http://{}:{port}/", server.ip());
                let rate = new_connections(&h, &client, &url, "8s");
                std::thread::sleep(Duration::from_secs(2));
                let before: u64 = ztunnels.iter().map(|&p| process_ticks(p)).sum();
                let started = std::time::Instant::now();
                let hey = run(
                    &h,
                    &client,
                    "hey",
                    &[
                        "-z",
                        "8s",
                        "-c",
                        "5",
                        "-q",
                        "100",
                        "-disable-keepalive",
                        &url,
                    ],
                );
                let wall = started.elapsed().as_secs_f64();
                let after: u64 = ztunnels.iter().map(|&p| process_ticks(p)).sum();
                let rps: f64 = hey
                    .lines()
                    .find(|l| l.trim_start().starts_with("Requests/sec:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no Requests/sec in hey output:\n{hey}"));
                let millicores_per_1000 =
                    (after - before) as f64 / ticks_per_second() / wall * 1000.0 * 1000.0 / rps;
                eprintln!(
                    "round {round}, {name}: wrk {rate:.0} new connections/s; hey {rps:.0}/s new connections, both ztunnels {millicores_per_1000:.0} millicores per 1000/s"
                );
                rates[i].push(rate);
                cpu[i].push(millicores_per_1000);
            }
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        for (i, (_, name)) in settings.iter().enumerate() {
            println!(
                "{name}: wrk {:?} new connections/s (median {:.0}); ztunnels' CPU {:?} millicores per 1000 new connections/s (median {:.0})",
                rates[i].iter().map(|r| r.round()).collect::<Vec<_>>(),
                median(&rates[i]),
                cpu[i].iter().map(|r| r.round()).collect::<Vec<_>>(),
                median(&cpu[i]),
            );
        }
        println!(
            "access log on / off: wrk {:.3}x new connections/s, {:.3}x CPU per connection",
            median(&rates[1]) / median(&rates[0]),
            median(&cpu[1]) / median(&cpu[0])
        );
        let _ = std::fs::remove_dir_all(&nginx_dir);
        return;
    }
    if std::env::args().nth(1).as_deref() == Some("idle") {
        // Only the memory figure, for working on it: `bench idle`.
        h.enrol(&client).await;
        h.enrol(&server).await;
        for (node, per_conn) in idle_memory(&h, &client, &server) {
            println!("ztunnel on {node}: {per_conn:.0} B per idle proxied connection");
        }
        let _ = std::fs::remove_dir_all(&nginx_dir);
        return;
    }
    eprintln!("==> direct path (pods not enrolled)");
    let direct = measure(&h, &client, &server, false);
    eprintln!("==> through two ztunnels over HBONE");
    h.enrol(&client).await;
    h.enrol(&server).await;
    let mesh = measure(&h, &client, &server, true);
    let idle = idle_memory(&h, &client, &server);
    let _ = std::fs::remove_dir_all(&nginx_dir);

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
        format!(
            "+{:.1} µs (round trip +{:.1} µs)",
            mesh.p50_us - direct.p50_us,
            2.0 * (mesh.p50_us - direct.p50_us)
        ),
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
    report += &row(
        "hey fixed rate, requests/s reached",
        direct.fixed_rps,
        mesh.fixed_rps,
        "/s",
        format!("{:.2}x", mesh.fixed_rps / direct.fixed_rps),
    );
    report += &format!(
        "| both ztunnels' CPU per 1000 requests/s | - | {:.0} millicores | - |\n",
        mesh.ztunnel_cores * 1000.0 * 1000.0 / mesh.fixed_rps
    );
    for (node, per_conn) in &idle {
        report += &format!(
            "| ztunnel on {node}, memory per idle proxied connection ({IDLE_CONNECTIONS} held) | - | {:.0} B | - |\n",
            per_conn
        );
    }
    print!("{report}");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-report.md");
    std::fs::write(&path, &report).unwrap();
    eprintln!("report written to {}", path.display());
}

/// Bytes of resident memory each ztunnel adds per idle proxied connection: its
/// resident set before and while the client holds `IDLE_CONNECTIONS` to the echo
/// server, each checked with an echoed byte.
fn idle_memory(h: &Harness, client: &Pod, server: &Pod) -> Vec<(String, f64)> {
    let nodes = ["node-a", "node-b"];
    let before: Vec<u64> = nodes
        .iter()
        .map(|n| rss_bytes(h.ztunnel(n).pid()))
        .collect();
    let to = format!("{}:9000", server.ip());
    let connections = IDLE_CONNECTIONS.to_string();
    let hold = h
        .mesh
        .spawn_in(
            client.netns(),
            support::app(),
            ["hold", "--to", &to, "--connections", &connections],
            &[],
        )
        .unwrap();
    hold.wait_for_log(&format!("holding {IDLE_CONNECTIONS} connections"), RUN)
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", hold.log(), h.logs()));
    // Let both sides settle (h2 settings, window updates) before reading.
    std::thread::sleep(Duration::from_secs(2));
    let during: Vec<u64> = nodes
        .iter()
        .map(|n| rss_bytes(h.ztunnel(n).pid()))
        .collect();
    let _ = hold.stop();
    nodes
        .iter()
        .zip(before.iter().zip(&during))
        .map(|(n, (b, d))| {
            (
                n.to_string(),
                d.saturating_sub(*b) as f64 / f64::from(IDLE_CONNECTIONS),
            )
        })
        .collect()
}

/// wrk with `Connection: close` against nginx for `duration`: new connections/s.
fn new_connections(h: &Harness, client: &Pod, url: &str, duration: &str) -> f64 {
    new_connections_with(h, client, url, duration, "8")
}

/// [`new_connections`] with `concurrency` connections at a time.
fn new_connections_with(
    h: &Harness,
    client: &Pod,
    url: &str,
    duration: &str,
    concurrency: &str,
) -> f64 {
    let wrk = run(
        h,
        client,
        "wrk",
        &[
            "-t",
            "1",
            "-c",
            concurrency,
            "-d",
            duration,
            "-H",
            "Connection: close",
            url,
        ],
    );
    wrk.lines()
        .find(|l| l.starts_with("Requests/sec:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{wrk}"))
}
