//! A ztunnel upgrade in place under load, in the local mesh (needs root):
//! `ambitctl local upgrade-ztunnel` replaces both nodes' ztunnels, one node at a time,
//! while the frontend (node-a) opens a new connection to the catalog's echo (node-b)
//! every 10 ms and keeps one long-lived connection open across it. No connection may
//! be refused or reset, the long-lived one carries on to its end, and the replaced
//! ztunnels drain it and exit without being cut off at their drain deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::bin;
use support::ctl::Ctl;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// `python3 -c script args...` in the frontend pod, through `ambitctl local exec`.
fn in_frontend(ctl: &Ctl, script: &str, args: &[&Path]) -> Child {
    Command::new(bin("ambitctl"))
        .args([
            "local",
            "exec",
            "bookshop/frontend",
            "--",
            "python3",
            "-c",
            script,
        ])
        .args(args)
        .env("AMBITCTL_STATE_DIR", ctl.state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to exit: its status and everything it wrote.
fn finish(mut child: Child) -> (std::process::ExitStatus, String) {
    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    (status, out)
}

/// How many connections the churn client has completed so far.
fn made(progress: &Path) -> u64 {
    std::fs::read_to_string(progress)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn upgrading_every_ztunnel_in_place_refuses_and_resets_no_connection() {
    let ctl = Ctl::new();
    let dir = example("bookshop");
    ctl.ok(&["local", "up", dir.to_str().unwrap()]);
    let vip = PathBuf::from(ctl.vip("catalog"));
    let port = PathBuf::from("9000");
    let stop = ctl.state.path().join("stop-clients");
    let progress = ctl.state.path().join("churn-progress");

    let long_lived = in_frontend(&ctl, support::ctl::LONG_LIVED_ECHO, &[&vip, &port, &stop]);
    let churn = in_frontend(
        &ctl,
        support::ctl::CHURN_ECHO,
        &[&vip, &port, &stop, &progress],
    );
    // Traffic flows before the upgrade starts.
    support::poll_until(
        Duration::from_secs(30),
        || made(&progress) >= 50,
        || {
            format!(
                "50 connections before the upgrade; made {}",
                made(&progress)
            )
        },
    );

    let upgraded = ctl.run(&["local", "upgrade-ztunnel"]);
    let upgrade_out = String::from_utf8_lossy(&upgraded.stdout).into_owned()
        + &String::from_utf8_lossy(&upgraded.stderr);
    // Traffic keeps flowing through the new ztunnels, for another second at least.
    let after = made(&progress);
    let start = std::time::Instant::now();
    while made(&progress) < after + 100 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let carried_on = made(&progress) >= after + 100;
    std::fs::write(&stop, "").unwrap();
    let (churn_status, churn_out) = finish(churn);
    let (long_status, long_out) = finish(long_lived);

    assert!(
        upgraded.status.success(),
        "upgrade-ztunnel failed:\n{upgrade_out}\n{}",
        ctl.logs()
    );
    let old_pids: Vec<u64> = upgrade_out
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("; pid ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect();
    for node in ["node-a", "node-b"] {
        assert!(
            upgrade_out.contains(&format!("{node}: ztunnel pid ")),
            "{node} upgraded:\n{upgrade_out}"
        );
    }
    assert_eq!(
        old_pids.len(),
        2,
        "two replaced ztunnels in:\n{upgrade_out}"
    );
    assert!(
        churn_status.success() && churn_out.contains(" failed 0"),
        "new connections failed during the upgrade ({churn_status}):\n{churn_out}\n{}",
        ctl.logs()
    );
    assert!(
        carried_on,
        "traffic stopped after the upgrade:\n{churn_out}"
    );
    assert!(
        long_status.success() && long_out.starts_with("OK "),
        "the long-lived connection did not carry on ({long_status}): {long_out}\n{}",
        ctl.logs()
    );
    println!(
        "upgrade: {} / long-lived: {}",
        churn_out.lines().next().unwrap_or(""),
        long_out.trim()
    );

    // The replaced ztunnels drained what they had (the long-lived connection ended
    // first) and exited on their own, before their drain deadline.
    support::poll_until(
        Duration::from_secs(60),
        || old_pids.iter().all(|p| !support::ctl::alive(*p)),
        || format!("the replaced ztunnels {old_pids:?} to exit"),
    );
    let logs = ctl.logs();
    let stopped = logs
        .lines()
        .filter(|l| l.contains("ztunnel stopped"))
        .collect::<Vec<_>>();
    assert!(
        stopped.len() >= 2 && stopped.iter().all(|l| l.contains("left=0")),
        "every replaced ztunnel stopped with no connection left: {stopped:?}"
    );

    // And the new ones serve new connections on their own.
    let got = ctl.ok(&[
        "local",
        "exec",
        "bookshop/frontend",
        "--",
        "ambitctl",
        "app",
        "get",
        "http://catalog.bookshop/",
    ]);
    assert!(got.contains("hello from bookshop/catalog"), "{got}");
    ctl.ok(&["local", "down"]);
}
