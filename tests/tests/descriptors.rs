//! ztunnel at its open-file limit (issue 12 item 8): when the destination ztunnel has
//! no descriptor left for a tunnel's app socket, the CONNECT is refused (503, counted)
//! and the client's connection is reset, so every connection either carries verified
//! data end to end or is refused explicitly — none is accepted and then closed as if
//! it had finished.
//!
//! The CI test lowers the destination ztunnel's `RLIMIT_NOFILE` (with `prlimit` on the
//! running process) to what it holds plus 900, and opens 1,200 connections over one
//! HBONE connection, so that each refusal is the destination's 503 (about 11 s). The
//! scale versions, ignored by default, hold 10,000 connections over ztunnel's default
//! pooling, at a 20,000-descriptor limit (the host the issue was found on: all are
//! verified) and against room for 8,000 (about a minute each on the 2-core
//! development machine): `cargo nextest run -p ambit-tests --test descriptors
//! --run-ignored only` (or `cargo test -p ambit-tests --test descriptors --
//! --ignored`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_localmesh::PodSpec;
use ambit_net::handoff::HandoffClient;
use ambit_net::netns::{ConnectOpts, NetnsHandle};
use support::{eventually, metric, two_nodes, Harness, DEADLINE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes each connection sends and expects back.
const BYTES: usize = 1000;

/// How long a connection waits, before it sends, for the far side to speak or to
/// refuse it, as a client of a server-first protocol (SMTP, MySQL) would: a refusal
/// then shows as what the client sees before it has sent anything, where a clean end
/// of stream would look like a server that had nothing to say.
const LISTEN_FIRST: Duration = Duration::from_secs(2);

/// Longest a connection may wait for its echo (the source's pool may wait for an
/// HBONE connection the destination cannot accept before giving up).
const ANSWER: Duration = Duration::from_secs(60);

/// What happened to one connection, as its client saw it.
enum Outcome {
    /// Every byte came back intact; held open until all connections are done, so the
    /// destination's descriptors stay taken.
    Verified(TcpStream),
    /// Reset (or refused at connect) before any data: an explicit refusal.
    Refused,
    /// Closed cleanly with no data: accepted and then dropped. The defect.
    Silent,
    /// Data lost or wrong after the connection carried some.
    Broken(String),
    /// No answer at all within [`ANSWER`].
    Hung,
}

fn pattern(id: u64) -> Vec<u8> {
    (0..BYTES as u64)
        .map(|i| ((id * 7 + i) % 251) as u8)
        .collect()
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::BrokenPipe
    )
}

/// One connection from the client pod's app (unmarked, so captured by its ztunnel):
/// listen first, then send [`BYTES`] and read them back.
async fn exchange(ns: &NetnsHandle, to: SocketAddr, id: u64) -> Outcome {
    let opts = ConnectOpts {
        mark: None,
        timeout: ANSWER,
        ..ConnectOpts::default()
    };
    let mut stream = match ns.connect(to, opts).await {
        Ok(s) => s,
        Err(e) if is_reset(&e) => return Outcome::Refused,
        Err(e) => return Outcome::Broken(format!("connect: {e}")),
    };
    let mut first = [0u8; 1];
    match tokio::time::timeout(LISTEN_FIRST, stream.read(&mut first)).await {
        Err(_quiet) => {}
        Ok(Ok(0)) => return Outcome::Silent,
        Ok(Ok(_)) => return Outcome::Broken("the echo server spoke first".into()),
        Ok(Err(e)) if is_reset(&e) => return Outcome::Refused,
        Ok(Err(e)) => return Outcome::Broken(format!("read before sending: {e}")),
    }
    let data = pattern(id);
    match stream.write_all(&data).await {
        Ok(()) => {}
        Err(e) if is_reset(&e) => return Outcome::Refused,
        Err(e) => return Outcome::Broken(format!("write: {e}")),
    }
    let mut back = vec![0u8; BYTES];
    let mut got = 0;
    while got < BYTES {
        match tokio::time::timeout(ANSWER, stream.read(&mut back[got..])).await {
            Err(_) => return Outcome::Hung,
            Ok(Ok(0)) if got == 0 => return Outcome::Silent,
            Ok(Ok(0)) => return Outcome::Broken(format!("ended after {got} of {BYTES} bytes")),
            Ok(Ok(n)) => got += n,
            Ok(Err(e)) if got == 0 && is_reset(&e) => return Outcome::Refused,
            Ok(Err(e)) => return Outcome::Broken(format!("after {got} bytes: {e}")),
        }
    }
    if back != data {
        return Outcome::Broken("echoed bytes differ".into());
    }
    Outcome::Verified(stream)
}

/// Sets `pid`'s open-file limit with `prlimit`. Only ever lowered from the hard limit
/// the test started with: raising a hard limit needs `CAP_SYS_RESOURCE`.
fn set_nofile(pid: u32, soft: u64, hard: u64) {
    let out = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={soft}:{hard}"),
        ])
        .output()
        .expect("prlimit (util-linux)");
    assert!(out.status.success(), "prlimit: {out:?}");
}

/// The lowest descriptor number `pid` could open next: at this limit it can open none.
fn lowest_free_descriptor(pid: u32) -> u64 {
    let open: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !open.contains(n)).unwrap()
}

/// Has a node agent connect while node-b's ztunnel can open no descriptor at all
/// (its soft limit at the lowest free descriptor number), and returns once ztunnel
/// failed to accept it; the agent's hello is answered by the returned task, once
/// ztunnel has descriptors again. A failed `accept` there once ended the hand-off
/// socket for good: no pod could be enrolled until a restart.
async fn node_agent_connecting_with_no_descriptor_left(
    h: &Harness,
    pid: u32,
    limit: u64,
) -> tokio::task::JoinHandle<Result<HandoffClient, ambit_net::handoff::HandoffError>> {
    set_nofile(pid, lowest_free_descriptor(pid), limit);
    let socket = h.ambient.handoff_socket("node-b").unwrap().to_owned();
    let agent = tokio::spawn(async move { HandoffClient::connect(&socket).await });
    let ztunnel = h.ztunnel("node-b");
    eventually(
        DEADLINE,
        || async {
            let log = ztunnel.log();
            (log.contains("accept failed on the hand-off socket")
                || log.contains("hand-off socket failed"))
            .then_some(())
        },
        || format!("ztunnel to fail accepting the node agent\n{}", h.logs()),
    )
    .await;
    set_nofile(pid, limit, limit);
    agent
}

fn open_descriptors(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

/// The destination ztunnel's open-file limit for a run.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// What it holds once the pods are enrolled, plus this many.
    Headroom(u64),
    /// This many.
    Total(u64),
}

/// What a run saw.
struct Seen {
    verified: u64,
    refused: u64,
}

/// How the source carries the tunnels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pooling {
    /// All on one HBONE connection (`--hbone-max-streams` above the count): every
    /// refusal is then the destination's 503 for want of a descriptor.
    OneConnection,
    /// ztunnel's default of 100 per connection: past the limit the destination can
    /// also not accept a new HBONE connection, and the source's attempt times out.
    Default,
}

/// `connections` concurrent connections from a client pod on node-a to an echo server
/// pod on node-b, whose ztunnel runs at `limit`: every one verified or refused
/// explicitly, each refusal counted by the source ztunnel, and the mesh serves again
/// once they are closed.
async fn at_the_limit(connections: u64, limit: Limit, pooling: Pooling) -> Seen {
    ambit_localmesh::raise_nofile_limit().unwrap();
    let mesh = two_nodes();
    let client = mesh
        .add_pod(
            "node-a",
            PodSpec::new("shop", "client").service_account("client"),
        )
        .unwrap();
    let server = mesh
        .add_pod(
            "node-b",
            PodSpec::new("shop", "server").service_account("server"),
        )
        .unwrap();
    // Per-connection debug lines would be thousands; refusals are logged at info.
    let streams = (connections + 100).to_string();
    let flags: &[&str] = match pooling {
        Pooling::OneConnection => &["--hbone-max-streams", &streams],
        Pooling::Default => &[],
    };
    let h = Harness::start_with(mesh, "info", flags);
    let _echo = h.serve(&server, &["echo", "--port", "8080"]);
    h.enrol(&client).await;
    h.enrol(&server).await;
    let to = server.addr(8080);
    h.send_ok(&client, to, 10_000, 1);

    let pid = h.ztunnel("node-b").pid();
    let limit = match limit {
        Limit::Headroom(n) => open_descriptors(pid) + n,
        Limit::Total(n) => n,
    };
    set_nofile(pid, limit, limit);
    println!(
        "destination ztunnel: {} descriptors open, limit {limit}; {connections} connections",
        open_descriptors(pid)
    );

    let ns = Arc::new(NetnsHandle::from_path(client.netns().path()).unwrap());
    // At most 400 connecting at once; all are held.
    let gate = Arc::new(tokio::sync::Semaphore::new(400));
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|id| {
            let (ns, gate) = (ns.clone(), gate.clone());
            tokio::spawn(async move {
                let _permit = gate.acquire().await.unwrap();
                exchange(&ns, to, id).await
            })
        })
        .collect();
    let mut held = Vec::new();
    let (mut refused, mut silent, mut hung) = (0u64, 0u64, 0u64);
    let mut broken = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Outcome::Verified(s) => held.push(s),
            Outcome::Refused => refused += 1,
            Outcome::Silent => silent += 1,
            Outcome::Hung => hung += 1,
            Outcome::Broken(why) => broken.push(why),
        }
    }
    let verified = held.len() as u64;
    println!(
        "{verified} verified, {refused} refused, {silent} closed with no data, {hung} hung, {} broken, in {:?}",
        broken.len(),
        started.elapsed()
    );
    let what = || {
        format!(
            "{verified} verified, {refused} refused, {silent} accepted and closed with no data, \
             {hung} hung, broken: {broken:?}\n{}",
            h.logs()
        )
    };
    assert_eq!(
        silent,
        0,
        "connections accepted and then dropped: {}",
        what()
    );
    assert!(broken.is_empty() && hung == 0, "{}", what());
    assert_eq!(verified + refused, connections, "{}", what());

    let agent = if refused > 0 {
        Some(node_agent_connecting_with_no_descriptor_left(&h, pid, limit).await)
    } else {
        None
    };

    // Closed, the destination has descriptors again: the node agent is served, and
    // the metrics say why connections were refused.
    drop(held);
    if let Some(agent) = agent {
        let hello = tokio::time::timeout(DEADLINE, agent)
            .await
            .expect("the node agent's hello answered in time")
            .unwrap();
        assert!(
            hello.is_ok(),
            "the node agent's hello once descriptors were free again: {:?}\n{}",
            hello.err(),
            h.logs()
        );
    }
    let (source, destination) = eventually(
        DEADLINE,
        || async {
            let source = h.metrics("node-a").await;
            let refused_at_source = metric(
                &source,
                "ambit_connections_refused_total",
                &[("reporter", "source")],
            );
            (refused_at_source >= refused as f64).then_some(())?;
            Some((source, h.metrics("node-b").await))
        },
        || format!("the source to count {refused} refusals\n{}", h.logs()),
    )
    .await;
    for line in source.lines().chain(destination.lines()) {
        if line.starts_with("ambit_connections_refused_total") {
            println!("{line}");
        }
    }
    let counted = |text: &str, labels: &[(&str, &str)]| {
        metric(text, "ambit_connections_refused_total", labels)
    };
    assert_eq!(
        counted(&source, &[("reporter", "source")]),
        refused as f64,
        "each refused connection is counted once at the source:\n{source}"
    );
    if pooling == Pooling::OneConnection && refused > 0 {
        // Each refusal was the destination's, for want of a descriptor, and the
        // source says so.
        let exhausted = counted(
            &destination,
            &[
                ("reporter", "destination"),
                ("reason", "descriptors_exhausted"),
                ("destination_workload", "server"),
            ],
        );
        assert_eq!(
            exhausted, refused as f64,
            "the destination counts why it refused:\n{destination}"
        );
        assert_eq!(
            counted(&source, &[("reason", "destination_descriptors_exhausted")]),
            refused as f64,
            "{source}"
        );
        assert!(
            h.ztunnel("node-b")
                .log()
                .contains("ztunnel is out of file descriptors"),
            "{}",
            h.logs()
        );
    }
    // And serves again.
    h.send_ok(&client, to, 10_000, 10);
    Seen { verified, refused }
}

/// Issue 12 item 8, at about a thousand connections: with 1,200 connections against
/// room for about 900, some are refused and some carry data, and none is lost.
#[tokio::test(flavor = "multi_thread")]
async fn at_the_descriptor_limit_every_connection_carries_verified_data_or_is_refused() {
    let seen = at_the_limit(1200, Limit::Headroom(900), Pooling::OneConnection).await;
    assert!(
        seen.refused > 0,
        "the limit was never reached: the test proves nothing"
    );
    assert!(seen.verified > 0, "nothing got through below the limit");
}

/// The issue's own scale: 10,000 concurrent connections to one pod at a
/// 20,000-descriptor limit, where 70 were lost when a tunnel held two descriptors:
/// with one per tunnel, all of them carry verified data. Minutes; run on demand.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "scale: 10,000 concurrent connections; run with --run-ignored"]
async fn ten_thousand_concurrent_connections_at_a_20000_descriptor_limit_all_carry_verified_data() {
    let seen = at_the_limit(10_000, Limit::Total(20_000), Pooling::Default).await;
    assert_eq!(seen.refused, 0, "refused below the limit");
}

/// The same, over the limit: 10,000 connections against room for 8,000.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "scale: 10,000 concurrent connections; run with --run-ignored"]
async fn ten_thousand_concurrent_connections_over_the_descriptor_limit_are_verified_or_refused() {
    let seen = at_the_limit(10_000, Limit::Headroom(8_000), Pooling::Default).await;
    assert!(seen.refused > 0 && seen.verified > 0);
}
