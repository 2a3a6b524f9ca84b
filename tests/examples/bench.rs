//! ztunnel's whole-path benchmark, with public tools, in the local mesh, side by side
//! with Istio's ztunnel (issue 16). Three paths, each a client pod on node-a and a
//! server pod on node-b of its own, all in the same run:
//!
//! - direct: pods not enrolled, nothing in between;
//! - Istio ×2: Istio's ztunnel release binary in each pod's network namespace
//!   (dedicated mode, not enrolled in Ambit; `bench/istio.rs`), HBONE between them,
//!   when the anchor binary is there (else the run says so and skips it);
//! - Ambit ×2: the pods enrolled, the two nodes' Ambit ztunnels carrying HBONE.
//!
//! Rounds: each path once per round, the order rotated, several rounds; the report
//! gives medians and ranges, and Ambit's median over Istio's, because these machines
//! are noisy and only ratios within one run mean anything. Per path and round:
//!
//! - throughput: iperf3, 1 and 8 streams;
//! - latency: sockperf ping-pong with 1 KB messages, p50, p90 and p99 of the half
//!   round trip (sockperf's one-way figure);
//! - new connections per second: wrk with `Connection: close` against nginx, 8 at a
//!   time; keep-alive requests per second: wrk, 4 connections;
//! - at a fixed 1,000 requests/s (hey `-q`, keep-alive): both proxies' CPU time per
//!   1,000 requests/s (the tools' own CPU varies too much to compare), and p50, p90 and
//!   p99 latency, reported as added over the direct path of the same round, as Istio
//!   publishes its figures;
//!
//! and once per proxy after the rounds: both proxies' resident sets, idle, and what
//! each adds per idle proxied connection while the client holds 10,000 open. Every
//! round checks that the proxies carried the path's traffic: both count at least the
//! connections wrk opened (`istio_tcp_connections_opened_total`, which both export).
//!
//! Run (as root): `scripts/bench.sh` (4 rounds; `scripts/bench.sh quick`: one short
//! round and 2,000 idle connections; `AMBIT_BENCH_ROUNDS=N` sets the rounds). The
//! report is printed and written to `target/bench-report.md`. `scripts/bench.sh idle`
//! measures only Ambit's memory figure, `scripts/bench.sh conns` only new
//! connections/s through Ambit's mesh (20 s, to profile). `scripts/bench.sh logs`
//! what the access log costs: new connections/s through the mesh at `info` and with
//! the access log filtered off, alternated in one run. `scripts/bench.sh profile
//! [istio|ambit|direct] [sockperf|keepalive|iperf|fixed]` loads one path with one tool
//! for 30 s, printing the proxies' pids, to attach `perf record -g -p PID`.
//! `scripts/bench.sh waypoint [quick]` is the waypoint's benchmark, against Envoy
//! (`bench/waypoint.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "bench/istio.rs"]
mod istio;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "bench/waypoint.rs"]
mod waypoint;

use std::time::Duration;

use ambit_localmesh::{Pod, PodSpec, Process, Protocol};
use support::{metric, two_nodes, Harness};

const RUN: Duration = Duration::from_secs(60);

/// Requests per second of the fixed-rate run: `-c` workers of `-q` each.
const FIXED_WORKERS: u32 = 10;
const FIXED_RATE_EACH: u32 = 100;
/// Idle connections held for the memory figure.
const IDLE_CONNECTIONS: u32 = 10_000;
/// The echo server's port (the memory figure's connections).
const ECHO_PORT: u16 = 9000;

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

/// How long each tool runs, how many rounds, how many idle connections.
struct Plan {
    rounds: usize,
    /// iperf3, sockperf and wrk, each.
    tool: Duration,
    /// hey at the fixed rate.
    fixed: Duration,
    idle: u32,
}

impl Plan {
    /// Four rounds of 5 s per tool, or (`quick`) one of 3 s; `AMBIT_BENCH_ROUNDS`
    /// overrides the rounds.
    fn new(quick: bool) -> Plan {
        let rounds = std::env::var("AMBIT_BENCH_ROUNDS").ok().map(|v| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .unwrap_or_else(|| {
                    eprintln!("AMBIT_BENCH_ROUNDS={v}: not a positive number of rounds");
                    std::process::exit(2)
                })
        });
        if quick {
            Plan {
                rounds: rounds.unwrap_or(1),
                tool: Duration::from_secs(3),
                fixed: Duration::from_secs(5),
                idle: 2_000,
            }
        } else {
            Plan {
                rounds: rounds.unwrap_or(4),
                tool: Duration::from_secs(5),
                fixed: Duration::from_secs(10),
                idle: IDLE_CONNECTIONS,
            }
        }
    }
}

/// One path's figures in one round.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    gbps_1: f64,
    gbps_8: f64,
    /// sockperf's one-way latency (half the round trip), µs.
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    conns_per_s: f64,
    /// Requests wrk completed with `Connection: close`: each a new connection.
    close_requests: f64,
    keepalive_rps: f64,
    /// Requests/s hey reached at the fixed rate, and its latency, ms.
    fixed_rps: f64,
    fixed_p50_ms: f64,
    fixed_p90_ms: f64,
    fixed_p99_ms: f64,
    /// Both proxies' CPU during it, cores per 1,000 requests/s (0 on the direct path).
    cpu_per_1k: f64,
}

/// What carries a path's traffic between its two pods.
enum Carrier {
    Direct,
    Istio(Box<istio::Pair>),
    Ambit,
}

/// One path of the comparison: its pods (client on node-a, server on node-b), the
/// servers in the server pod, and what is in between.
struct Lane {
    name: &'static str,
    client: Pod,
    server: Pod,
    carrier: Carrier,
    _servers: Servers,
}

impl Lane {
    /// The proxies' pids: client side, server side (none on the direct path).
    fn pids(&self, h: &Harness) -> Vec<u32> {
        match &self.carrier {
            Carrier::Direct => Vec::new(),
            Carrier::Istio(pair) => pair.pids(),
            Carrier::Ambit => ["node-a", "node-b"]
                .iter()
                .map(|n| h.ztunnel(n).pid())
                .collect(),
        }
    }

    /// Connections the client side's and the server side's proxy have counted.
    async fn opened(&self, h: &Harness) -> Option<[f64; 2]> {
        match &self.carrier {
            Carrier::Direct => None,
            Carrier::Istio(pair) => Some(pair.opened().await),
            Carrier::Ambit => {
                let opened = |text: &str, reporter: &str| {
                    metric(
                        text,
                        "istio_tcp_connections_opened_total",
                        &[("reporter", reporter)],
                    )
                };
                Some([
                    opened(&h.metrics("node-a").await, "source"),
                    opened(&h.metrics("node-b").await, "destination"),
                ])
            }
        }
    }
}

/// The servers of a benchmark pod: iperf3 (5201), sockperf (11111), nginx
/// (`NGINX_PORTS`) and the echo server (`ECHO_PORT`).
struct Servers {
    _processes: Vec<Process>,
    nginx_dir: std::path::PathBuf,
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.nginx_dir);
    }
}

fn start_servers(h: &Harness, pod: &Pod) -> Servers {
    let iperf = h
        .mesh
        .spawn_in(
            pod.netns(),
            "iperf3",
            ["-s", "-p", "5201", "--forceflush"],
            &[],
        )
        .unwrap();
    iperf.wait_for_log("Server listening", RUN).unwrap();
    let sockperf = h
        .mesh
        .spawn_in(
            pod.netns(),
            "sockperf",
            ["server", "--tcp", "-i", "0.0.0.0", "-p", "11111"],
            &[],
        )
        .unwrap();
    sockperf.wait_for_log("sockperf: Warmup stage", RUN).ok();
    let (nginx, nginx_dir) = start_nginx(h, pod);
    let echo = h.serve(pod, &["echo", "--port", &ECHO_PORT.to_string()]);
    Servers {
        _processes: vec![iperf, sockperf, nginx, echo],
        nginx_dir,
    }
}

/// The port of a round's `Connection: close` run (a port of its own, see
/// `NGINX_PORTS`), and the one the keep-alive runs share.
fn close_port(round: usize) -> u16 {
    NGINX_PORTS[round % (NGINX_PORTS.len() - 1)]
}
const KEEPALIVE_PORT: u16 = NGINX_PORTS[NGINX_PORTS.len() - 1];

fn measure(h: &Harness, lane: &Lane, plan: &Plan, round: usize) -> Figures {
    let client = &lane.client;
    let ip = lane.server.ip().to_string();
    let secs = plan.tool.as_secs().to_string();
    let iperf = |streams: &str| {
        let out = run(
            h,
            client,
            "iperf3",
            &["-c", &ip, "-p", "5201", "-t", &secs, "-P", streams, "-J"],
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
            &secs,
        ],
    );
    let percentile = |p: &str| -> f64 {
        let line = sock
            .lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .unwrap_or_else(|| panic!("no percentile {p} in sockperf output:\n{sock}"));
        line.rsplit('=').next().unwrap().trim().parse().unwrap()
    };
    let duration = format!("{secs}s");
    let close_url = format!("http://{ip}:{}/", close_port(round));
    let keepalive_url = format!("http://{ip}:{KEEPALIVE_PORT}/");
    let (conns_per_s, close_requests) = wrk(h, client, &close_url, &duration, "8", true);
    let (keepalive_rps, _) = wrk(h, client, &keepalive_url, &duration, "4", false);
    let pids = lane.pids(h);
    let ticks = || -> u64 { pids.iter().map(|&p| process_ticks(p)).sum() };
    let before = ticks();
    let started = std::time::Instant::now();
    let (workers, rate) = (FIXED_WORKERS.to_string(), FIXED_RATE_EACH.to_string());
    let fixed = format!("{}s", plan.fixed.as_secs());
    let hey = run(
        h,
        client,
        "hey",
        &["-z", &fixed, "-c", &workers, "-q", &rate, &keepalive_url],
    );
    let wall = started.elapsed().as_secs_f64();
    let cores = (ticks() - before) as f64 / ticks_per_second() / wall;
    let codes = hey
        .lines()
        .filter(|l| l.trim_start().starts_with('['))
        .count();
    assert!(
        codes == 1 && hey.contains("[200]\t") && !hey.contains("Error distribution"),
        "{}: hey got answers other than 200:\n{hey}",
        lane.name
    );
    let fixed_rps = number_after(&hey, "Requests/sec:");
    Figures {
        gbps_1,
        gbps_8,
        p50_us: percentile("50.000"),
        p90_us: percentile("90.000"),
        p99_us: percentile("99.000"),
        conns_per_s,
        close_requests,
        keepalive_rps,
        fixed_rps,
        fixed_p50_ms: number_after(&hey, "50% in") * 1000.0,
        fixed_p90_ms: number_after(&hey, "90% in") * 1000.0,
        fixed_p99_ms: number_after(&hey, "99% in") * 1000.0,
        cpu_per_1k: cores * 1000.0 / fixed_rps,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str);
    if mode == Some("waypoint") {
        waypoint::main(args.get(1).map(String::as_str)).await;
        return;
    }
    let compared = matches!(mode, None | Some("quick") | Some("profile"));
    if !compared && !matches!(mode, Some("conns" | "logs" | "idle")) {
        eprintln!(
            "usage: bench [quick | profile [direct|istio|ambit] [sockperf|keepalive|iperf|fixed] \
             | idle | conns | logs | waypoint [quick|profile ...]]"
        );
        std::process::exit(2);
    }
    let anchor = if compared {
        istio::anchor_binary().unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        })
    } else {
        Err("not compared in this mode".to_owned())
    };
    let mesh = two_nodes();
    let pair = |name: &str| {
        let client = mesh
            .add_pod("node-a", PodSpec::new("bench", &format!("{name}-client")))
            .unwrap();
        let server = mesh
            .add_pod("node-b", PodSpec::new("bench", &format!("{name}-server")))
            .unwrap();
        (client, server)
    };
    let (client, server) = pair("ambit");
    mesh.set_protocol(&client, Protocol::Hbone).unwrap();
    mesh.set_protocol(&server, Protocol::Hbone).unwrap();
    let direct = compared.then(|| pair("direct"));
    let anchored = (compared && anchor.is_ok()).then(|| pair("istio"));
    // ztunnel's default log level, as a user runs it: the access log's line per
    // connection (`bench logs` measures what it costs). Istio's runs at its own
    // default, `info`, which logs a line per connection too.
    let h = Harness::start_logging(mesh, "info");
    let servers = start_servers(&h, &server);
    match mode {
        Some("conns") => return conns(&h, &client, &server).await,
        Some("logs") => return logs(&h, &client, &server).await,
        Some("idle") => {
            // Only the memory figure, for working on it.
            h.enrol(&client).await;
            h.enrol(&server).await;
            let pids: Vec<u32> = ["node-a", "node-b"]
                .iter()
                .map(|n| h.ztunnel(n).pid())
                .collect();
            let memory = idle_memory(&h, &client, &server, &pids, IDLE_CONNECTIONS);
            for (node, m) in ["node-a", "node-b"].iter().zip(memory) {
                println!(
                    "ztunnel on {node}: {:.0} B per idle proxied connection ({:.1} MB idle)",
                    m.per_connection,
                    m.idle_rss / 1e6
                );
            }
            return;
        }
        _ => {}
    }
    h.enrol(&client).await;
    h.enrol(&server).await;
    let mut lanes = Vec::new();
    if let Some((client, server)) = direct {
        let servers = start_servers(&h, &server);
        lanes.push(Lane {
            name: "direct",
            client,
            server,
            carrier: Carrier::Direct,
            _servers: servers,
        });
    }
    let skipped = match (&anchor, anchored) {
        (Ok(binary), Some((client, server))) => {
            let servers = start_servers(&h, &server);
            let pair = istio::start(&h, binary, &client, &server, KEEPALIVE_PORT).await;
            eprintln!(
                "==> Istio's ztunnel ({}): pids {} (client side) and {} (server side)",
                binary.display(),
                pair.client.pid(),
                pair.server.pid()
            );
            lanes.push(Lane {
                name: "Istio ×2",
                client,
                server,
                carrier: Carrier::Istio(Box::new(pair)),
                _servers: servers,
            });
            None
        }
        (Err(reason), _) => {
            eprintln!("==> Istio's ztunnel skipped: {reason}");
            Some(reason.clone())
        }
        (Ok(_), None) => unreachable!("the Istio pods exist whenever the anchor does"),
    };
    lanes.push(Lane {
        name: "Ambit ×2",
        client,
        server,
        carrier: Carrier::Ambit,
        _servers: servers,
    });
    if mode == Some("profile") {
        return profile(&h, &lanes, args.get(1), args.get(2));
    }
    let plan = Plan::new(mode == Some("quick"));
    let mut samples: Vec<Vec<Figures>> = Vec::new();
    for round in 0..plan.rounds {
        let mut s = vec![Figures::default(); lanes.len()];
        // Each round starts with another path, so none always goes first.
        for k in 0..lanes.len() {
            let i = (k + round) % lanes.len();
            let lane = &lanes[i];
            eprintln!("==> round {} of {}: {}", round + 1, plan.rounds, lane.name);
            let before = lane.opened(&h).await;
            s[i] = measure(&h, lane, &plan, round);
            // The proxies carried the path's traffic: each counted at least the new
            // connections wrk made.
            if let (Some(before), Some(after)) = (before, lane.opened(&h).await) {
                for (side, (b, a)) in ["client", "server"].iter().zip(before.iter().zip(after)) {
                    assert!(
                        a - b >= s[i].close_requests,
                        "{}: the {side} side's proxy counted {} new connections, wrk alone made {}",
                        lane.name,
                        a - b,
                        s[i].close_requests
                    );
                }
            }
            eprintln!("    {:?}", s[i]);
        }
        samples.push(s);
    }
    let memory: Vec<Option<Vec<Memory>>> = lanes
        .iter()
        .map(|lane| {
            if matches!(lane.carrier, Carrier::Direct) {
                return None;
            }
            eprintln!("==> {}: {} idle connections", lane.name, plan.idle);
            let pids = lane.pids(&h);
            Some(idle_memory(
                &h,
                &lane.client,
                &lane.server,
                &pids,
                plan.idle,
            ))
        })
        .collect();
    let report = report(&lanes, &samples, &memory, skipped.as_deref(), &plan);
    print!("{report}");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-report.md");
    std::fs::write(&path, &report).unwrap();
    eprintln!("report written to {}", path.display());
}

/// `bench profile [path] [tool]`: one tool on one path for 30 s, the proxies' pids
/// printed first, to attach a profiler (`perf record -g -p PID`).
fn profile(h: &Harness, lanes: &[Lane], path: Option<&String>, tool: Option<&String>) {
    let wanted = path.map_or("ambit", String::as_str);
    let lane = lanes
        .iter()
        .find(|l| l.name.to_lowercase().starts_with(wanted))
        .unwrap_or_else(|| panic!("no path {wanted} in this run (direct, istio, ambit)"));
    let ip = lane.server.ip().to_string();
    let url = format!("http://{ip}:{KEEPALIVE_PORT}/");
    let tool = tool.map_or("sockperf", String::as_str);
    println!(
        "==> {}: proxies' pids {:?}; 30 s of {tool}",
        lane.name,
        lane.pids(h)
    );
    let client = &lane.client;
    let out = match tool {
        "sockperf" => run(
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
                "30",
            ],
        ),
        "keepalive" => run(h, client, "wrk", &["-t", "1", "-c", "4", "-d", "30s", &url]),
        "iperf" => run(h, client, "iperf3", &["-c", &ip, "-p", "5201", "-t", "30"]),
        "fixed" => run(
            h,
            client,
            "hey",
            &["-z", "30s", "-c", "10", "-q", "100", &url],
        ),
        other => panic!("no tool {other} (sockperf, keepalive, iperf, fixed)"),
    };
    println!("{out}");
}

fn report(
    lanes: &[Lane],
    samples: &[Vec<Figures>],
    memory: &[Option<Vec<Memory>>],
    skipped: Option<&str>,
    plan: &Plan,
) -> String {
    let find = |f: fn(&Carrier) -> bool| lanes.iter().position(|l| f(&l.carrier));
    let direct = find(|c| matches!(c, Carrier::Direct)).unwrap();
    let istio = find(|c| matches!(c, Carrier::Istio(_)));
    let ambit = find(|c| matches!(c, Carrier::Ambit)).unwrap();
    // The comparison: Ambit's median over Istio's, or over the direct path's when
    // Istio's was skipped.
    let versus = istio.unwrap_or(direct);
    let single = samples.len() == 1;
    let fmt = |v: Vec<f64>, d: usize| {
        let (m, lo, hi) = spread(v);
        if single {
            format!("{m:.d$}")
        } else {
            format!("{m:.d$} ({lo:.d$}–{hi:.d$})")
        }
    };
    let signed = |v: Vec<f64>, d: usize| {
        let (m, lo, hi) = spread(v);
        if single {
            format!("{m:+.d$}")
        } else {
            format!("{m:+.d$} ({lo:+.d$} to {hi:+.d$})")
        }
    };
    let col = |i: usize, f: &dyn Fn(&Figures) -> f64| -> Vec<f64> {
        samples.iter().map(|s| f(&s[i])).collect()
    };
    let added = |i: usize, f: &dyn Fn(&Figures) -> f64| -> Vec<f64> {
        samples.iter().map(|s| f(&s[i]) - f(&s[direct])).collect()
    };
    let median = |v: Vec<f64>| spread(v).0;
    let mut out = format!(
        "# ztunnel benchmark: {} (local mesh, client pod on node-a, server pod on \
         node-b)\n\n\
         {} round(s), each path once per round in rotated order; median (range over the \
         rounds). Each tool {} s: iperf3; sockperf ping-pong, 1 KB, one-way = half the \
         round trip; wrk -t1 -c8 `Connection: close`; wrk -t1 -c4 keep-alive; hey -c \
         {FIXED_WORKERS} -q {FIXED_RATE_EACH} (1,000 requests/s, keep-alive) for {} s. \
         Memory: {} idle connections held through each mesh. ↑: higher is better, ↓: lower \
         is better. The last column is Ambit's median over {}'s.\n\n",
        lanes.iter().map(|l| l.name).collect::<Vec<_>>().join(", "),
        samples.len(),
        plan.tool.as_secs(),
        plan.fixed.as_secs(),
        plan.idle,
        lanes[versus].name,
    );
    if let Some(reason) = skipped {
        out += &format!("**Istio ×2 skipped**: {reason}.\n\n");
    }
    let names: Vec<&str> = lanes.iter().map(|l| l.name).collect();
    out += &format!(
        "| figure | {} | Ambit vs {} |\n|---|{}---|\n",
        names.join(" | "),
        if istio.is_some() { "Istio" } else { "direct" },
        "---|".repeat(lanes.len())
    );
    let line = |label: String, cells: Vec<String>, ratio: String| {
        format!("| {label} | {} | {ratio} |\n", cells.join(" | "))
    };
    // A figure every path has, higher is better.
    let raw = |label: &str, d: usize, f: &dyn Fn(&Figures) -> f64| {
        let cells = (0..lanes.len()).map(|i| fmt(col(i, f), d)).collect();
        let ratio = median(col(ambit, f)) / median(col(versus, f));
        line(format!("{label} ↑"), cells, format!("{ratio:.2}×"))
    };
    // A latency: the ratio of the raw figures and of what each mesh adds.
    let latency = |label: &str, d: usize, f: &dyn Fn(&Figures) -> f64| {
        let cells = (0..lanes.len()).map(|i| fmt(col(i, f), d)).collect();
        let ratio = median(col(ambit, f)) / median(col(versus, f));
        let ratio = match istio {
            Some(istio) => format!(
                "{ratio:.2}× (added: {:.2}×)",
                median(added(ambit, f)) / median(added(istio, f))
            ),
            None => format!("{ratio:.2}× ({:+.1} added)", median(added(ambit, f))),
        };
        line(format!("{label} ↓"), cells, ratio)
    };
    // What each mesh adds to the direct path's latency in the same round.
    let addition = |label: &str, d: usize, f: &dyn Fn(&Figures) -> f64| {
        let cells = (0..lanes.len())
            .map(|i| {
                if i == direct {
                    format!("{} itself", fmt(col(i, f), d))
                } else {
                    signed(added(i, f), d)
                }
            })
            .collect();
        let ratio = match istio {
            Some(istio) => format!("{:.2}×", median(added(ambit, f)) / median(added(istio, f))),
            None => "-".to_owned(),
        };
        line(format!("{label} ↓"), cells, ratio)
    };
    out += &raw("iperf3, 1 stream, Gb/s", 2, &|s| s.gbps_1);
    out += &raw("iperf3, 8 streams, Gb/s", 2, &|s| s.gbps_8);
    out += &latency("sockperf 1 KB half round trip p50, µs", 1, &|s| s.p50_us);
    out += &latency("sockperf p90, µs", 1, &|s| s.p90_us);
    out += &latency("sockperf p99, µs", 1, &|s| s.p99_us);
    out += &raw(
        "new connections/s (wrk, Connection: close, 8 at a time)",
        0,
        &|s| s.conns_per_s,
    );
    out += &raw("keep-alive requests/s (wrk, 4 conns)", 0, &|s| {
        s.keepalive_rps
    });
    out += &raw("hey at the fixed rate: requests/s reached", 0, &|s| {
        s.fixed_rps
    });
    out += &addition("added latency at 1,000 req/s, p50, ms", 2, &|s| {
        s.fixed_p50_ms
    });
    out += &addition("added latency at 1,000 req/s, p90, ms", 2, &|s| {
        s.fixed_p90_ms
    });
    out += &addition("added latency at 1,000 req/s, p99, ms", 2, &|s| {
        s.fixed_p99_ms
    });
    // Figures only proxies have.
    let proxies = |label: &str, cell: &dyn Fn(usize) -> Option<(f64, String)>| {
        let cells: Vec<(f64, String)> = (0..lanes.len())
            .map(|i| cell(i).unwrap_or((f64::NAN, "-".to_owned())))
            .collect();
        let ratio = match istio {
            Some(istio) => format!("{:.2}×", cells[ambit].0 / cells[istio].0),
            None => "-".to_owned(),
        };
        line(
            format!("{label} ↓"),
            cells.into_iter().map(|(_, s)| s).collect(),
            ratio,
        )
    };
    out += &proxies("CPU of both proxies per 1,000 req/s (hey -q), vCPU", &|i| {
        (i != direct).then(|| {
            let v = col(i, &|s| s.cpu_per_1k);
            (median(v.clone()), fmt(v, 3))
        })
    });
    out += &proxies("RSS of both proxies, idle, MB", &|i| {
        memory[i].as_ref().map(|m| {
            let total: f64 = m.iter().map(|m| m.idle_rss / 1e6).sum();
            let sides: Vec<String> = m
                .iter()
                .map(|m| format!("{:.1}", m.idle_rss / 1e6))
                .collect();
            (total, format!("{total:.1} ({})", sides.join(" + ")))
        })
    });
    out += &proxies("memory per idle proxied connection, both sides, KB", &|i| {
        memory[i].as_ref().map(|m| {
            let total: f64 = m.iter().map(|m| m.per_connection / 1e3).sum();
            let sides: Vec<String> = m
                .iter()
                .map(|m| format!("{:.0}", m.per_connection))
                .collect();
            (total, format!("{total:.2} ({} B)", sides.join(" + ")))
        })
    });
    out += "\nAdded latency: each round's figure minus the direct path's in the same round \
            (hey reports whole 0.1 ms). Sockperf's ratio in brackets is of what each mesh \
            adds to the direct path. Memory: the client side's + the server side's proxy. \
            Every round checked that both proxies of a mesh counted at least the new \
            connections wrk made on it (`istio_tcp_connections_opened_total`). Istio's \
            ztunnel runs in dedicated mode in its pods with one nat `REDIRECT` rule in the \
            client pod (evaluated once per connection) and no inbound plaintext capture; \
            Ambit's pods have its whole in-pod rule set, evaluated on every packet.\n";
    out
}

/// A proxy's resident set, idle, and what it adds per idle proxied connection.
#[derive(Debug, Clone, Copy)]
struct Memory {
    idle_rss: f64,
    per_connection: f64,
}

/// Each of `pids`' resident set before, and the bytes it adds per idle proxied
/// connection while the client holds `connections` to the echo server, each checked
/// with an echoed byte.
fn idle_memory(
    h: &Harness,
    client: &Pod,
    server: &Pod,
    pids: &[u32],
    connections: u32,
) -> Vec<Memory> {
    let before: Vec<u64> = pids.iter().map(|&p| rss_bytes(p)).collect();
    let to = format!("{}:{ECHO_PORT}", server.ip());
    let count = connections.to_string();
    let hold = h
        .mesh
        .spawn_in(
            client.netns(),
            support::app(),
            ["hold", "--to", &to, "--connections", &count],
            &[],
        )
        .unwrap();
    hold.wait_for_log(&format!("holding {connections} connections"), RUN)
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", hold.log(), h.logs()));
    // Let both sides settle (h2 settings, window updates) before reading.
    std::thread::sleep(Duration::from_secs(2));
    let during: Vec<u64> = pids.iter().map(|&p| rss_bytes(p)).collect();
    let _ = hold.stop();
    before
        .iter()
        .zip(&during)
        .map(|(b, d)| Memory {
            idle_rss: *b as f64,
            per_connection: d.saturating_sub(*b) as f64 / f64::from(connections),
        })
        .collect()
}

/// wrk, one thread, `connections` at a time for `duration` (`close`: a new connection
/// per request, `Connection: close`): requests/s, and requests completed.
fn wrk(
    h: &Harness,
    client: &Pod,
    url: &str,
    duration: &str,
    connections: &str,
    close: bool,
) -> (f64, f64) {
    let mut args = vec!["-t", "1", "-c", connections, "-d", duration];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let out = run(h, client, "wrk", &args);
    assert!(
        !out.contains("Non-2xx"),
        "wrk {url}: answers other than 2xx:\n{out}"
    );
    // "  12345 requests in 5.00s, 1.23MB read"
    let requests = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `requests in` in wrk output:\n{out}"));
    (number_after(&out, "Requests/sec:"), requests)
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
    wrk(h, client, url, duration, concurrency, true).0
}

/// The first number after `anchor` in `text`.
fn number_after(text: &str, anchor: &str) -> f64 {
    let at = text
        .find(anchor)
        .unwrap_or_else(|| panic!("no {anchor:?} in:\n{text}"));
    let num: String = text[at + anchor.len()..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse()
        .unwrap_or_else(|_| panic!("bad number {num:?} after {anchor:?} in:\n{text}"))
}

/// The median and the range of `values`.
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (median, values[0], values[n - 1])
}

/// `bench conns`: new connections/s only, at 1, 8 and 32 at a time, direct and
/// through the mesh (the same pods, then enrolled), then through the mesh for 20 s more
/// (to profile).
async fn conns(h: &Harness, client: &Pod, server: &Pod) {
    // Only new connections/s, at several concurrencies, then through the mesh
    // for 20 s more (to profile).
    let url = |port: u16| format!("http://{}:{port}/", server.ip());
    let sweep = |h: &Harness, ports: &[u16]| -> Vec<f64> {
        ["1", "8", "32"]
            .iter()
            .zip(ports)
            .map(|(c, &port)| new_connections_with(h, client, &url(port), "5s", c))
            .collect()
    };
    let direct = sweep(h, &NGINX_PORTS[..3]);
    let direct_long = new_connections(h, client, &url(NGINX_PORTS[6]), "20s");
    h.enrol(client).await;
    h.enrol(server).await;
    let mesh = sweep(h, &NGINX_PORTS[3..6]);
    for ((c, d), m) in ["1", "8", "32"].iter().zip(&direct).zip(&mesh) {
        println!(
            "{c} connections at a time: direct {d:.0}/s, mesh {m:.0}/s ({:.2}x)",
            m / d
        );
    }
    eprintln!("==> wrk through the mesh for 20 s");
    let rate = new_connections(h, client, &url(NGINX_PORTS[7]), "20s");
    println!("8 at a time for 20 s: direct {direct_long:.0}/s, mesh {rate:.0}/s");
}

/// `bench logs`: the access log's cost per connection.
async fn logs(h: &Harness, client: &Pod, server: &Pod) {
    // The access log's cost per connection, with ztunnel at `info` (a line per
    // connection) and with the access log filtered off, alternated in the same
    // run (the machine is shared and noisy): wrk's new connections/s, and both
    // ztunnels' CPU at a fixed rate of new connections (hey, no keep-alive).
    h.enrol(client).await;
    h.enrol(server).await;
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
            let rate = new_connections(h, client, &url, "8s");
            std::thread::sleep(Duration::from_secs(2));
            let before: u64 = ztunnels.iter().map(|&p| process_ticks(p)).sum();
            let started = std::time::Instant::now();
            let hey = run(
                h,
                client,
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
}
