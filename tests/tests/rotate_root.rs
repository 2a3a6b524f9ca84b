//! CA root rotation with overlap in the local mesh (needs root; decision 0014):
//! `ambitctl local rotate-root --wait` while a long-lived connection and a stream of
//! new ones cross nodes, with workload certificates living 20 s (Istio's SECRET_TTL)
//! so the whole rotation takes about a minute. No connection may fail; afterwards the
//! published bundle holds only the new root, and every workload certificate chains to
//! it with only it in its trust bundle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use support::bin;
use support::ctl::Ctl;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// Hex SHA-256 of each certificate in a PEM file, in order.
fn fingerprints(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .map(|block| {
            let b64: String = block
                .split("-----END CERTIFICATE-----")
                .next()
                .unwrap()
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            let der = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap();
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der)
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .collect()
}

/// ztunnel's `/certs` on the node whose network namespace is `netns`.
fn node_certs(netns: &Path) -> serde_json::Value {
    use std::io::Write as _;
    let ns = ambit_net::netns::NetnsHandle::from_path(netns).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = rt
        .block_on(ns.run(|| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", 15000))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /certs HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        }))
        .unwrap();
    let json = body.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(json).unwrap_or_else(|e| panic!("/certs: {e}: {body}"))
}

#[test]
fn rotate_root_with_traffic_flowing_fails_no_connection() {
    let ctl = Ctl::new();
    let dir = example("bookshop");
    let up = ctl.run_env(
        &["local", "up", dir.to_str().unwrap()],
        &[("SECRET_TTL", "20s")],
    );
    assert!(
        up.status.success(),
        "up failed:\n{}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    let mesh = ctl.mesh();
    let ca_dir = PathBuf::from(mesh["dir"].as_str().unwrap()).join("ca");
    let bundle = ca_dir.join("root-cert.pem");
    let old = fingerprints(&bundle);
    assert_eq!(old.len(), 1, "one root before the rotation");
    let nodes: Vec<PathBuf> = mesh["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| PathBuf::from(n["netns"].as_str().unwrap()))
        .collect();
    // Every workload certificate chains to the old root before.
    support::poll_until(
        Duration::from_secs(30),
        || {
            nodes.iter().all(|n| {
                let certs = node_certs(n);
                let list = certs.as_array().cloned().unwrap_or_default();
                !list.is_empty() && list.iter().all(|c| c["chainsTo"] == old[0].as_str())
            })
        },
        || {
            format!(
                "certificates chaining to the old root: {:?}",
                nodes.iter().map(|n| node_certs(n)).collect::<Vec<_>>()
            )
        },
    );
    let vip = ctl.vip("catalog");

    // A long-lived connection, frontend (node-a) to the catalog's echo (node-b).
    let stop_file = ctl.state.path().join("stop-long-lived");
    let mut long_lived = Command::new(bin("ambitctl"))
        .args([
            "local",
            "exec",
            "bookshop/frontend",
            "--",
            "python3",
            "-c",
            support::ctl::LONG_LIVED_ECHO,
        ])
        .arg(&vip)
        .arg("9000")
        .arg(&stop_file)
        .env("AMBITCTL_STATE_DIR", ctl.state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // New connections, one after the other, for as long as the rotation lasts.
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let state = ctl.state.path().to_owned();
    let churn = {
        let (stop, made, failures, vip) =
            (stop.clone(), made.clone(), failures.clone(), vip.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let out = Command::new(bin("ambitctl"))
                    .args([
                        "local",
                        "exec",
                        "bookshop/frontend",
                        "--",
                        "ambitctl",
                        "app",
                        "get",
                    ])
                    .arg(format!("http://{vip}/"))
                    .env("AMBITCTL_STATE_DIR", &state)
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                if !out.status.success() || !text.contains("hello from bookshop/catalog") {
                    failures.lock().unwrap().push(format!(
                        "{}: {text}{}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                made.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let rotated = ctl.run(&["local", "rotate-root", "--wait", "--timeout", "4m"]);
    let rotate_out = String::from_utf8_lossy(&rotated.stdout).into_owned();
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    std::fs::write(&stop_file, "").unwrap();
    let status = long_lived.wait().unwrap();
    let mut long_out = String::new();
    long_lived
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut long_out)
        .unwrap();
    let mut long_err = String::new();
    long_lived
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut long_err)
        .unwrap();

    assert!(
        rotated.status.success(),
        "rotate-root failed:\n{rotate_out}{}\n{}",
        String::from_utf8_lossy(&rotated.stderr),
        ctl.logs()
    );
    for want in [
        "added to the trust bundle",
        "signing switched to the new root",
        "done",
    ] {
        assert!(rotate_out.contains(want), "{want:?} in:\n{rotate_out}");
    }
    let failures = failures.lock().unwrap();
    let made = made.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {made} new connections failed during the rotation:\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        ctl.logs()
    );
    assert!(made >= 10, "only {made} new connections were made");
    assert!(
        status.success() && long_out.starts_with("OK "),
        "the long-lived connection failed ({status}): {long_out}{long_err}\n{}",
        ctl.logs()
    );
    println!(
        "rotation: {made} new connections, long-lived: {}",
        long_out.trim()
    );

    // The published bundle holds only the new root...
    let new = fingerprints(&bundle);
    assert_eq!(new.len(), 1, "one root after the rotation");
    assert_ne!(new, old, "the root was replaced");
    // ...every workload certificate chains to it, and (once each has renewed after
    // the old root left) trusts it alone.
    support::poll_until(
        Duration::from_secs(60),
        || {
            nodes.iter().all(|n| {
                let list = node_certs(n).as_array().cloned().unwrap_or_default();
                !list.is_empty()
                    && list.iter().all(|c| {
                        c["chainsTo"] == new[0].as_str()
                            && c["roots"] == serde_json::json!([new[0]])
                    })
            })
        },
        || {
            format!(
                "every certificate on the new root alone: {:?}",
                nodes.iter().map(|n| node_certs(n)).collect::<Vec<_>>()
            )
        },
    );
    // And traffic still flows, over new connections.
    let got = ctl.ok(&[
        "local",
        "exec",
        "bookshop/frontend",
        "--",
        "ambitctl",
        "app",
        "get",
        &format!("http://{vip}/"),
    ]);
    assert!(got.contains("hello from bookshop/catalog"), "{got}");
    ctl.ok(&["local", "down"]);
}
