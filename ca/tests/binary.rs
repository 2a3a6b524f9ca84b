//! The `ambit-ca` binary as a user runs it: started as a process, called over the
//! network, restarted, and given bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ambit_net::ca_client::GrpcCaClient;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_ambit-ca");

/// A running `ambit-ca`, killed when dropped (also when a test fails).
struct Process {
    child: Child,
    addr: SocketAddr,
    log: mpsc::Receiver<String>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(root_dir: &Path, tokens: Option<&Path>) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("--root-dir")
        .arg(root_dir)
        .arg("--listen")
        .arg("127.0.0.1:0");
    if let Some(t) = tokens {
        cmd.arg("--tokens").arg(t);
    }
    // Keep a developer's environment out of the test.
    for (k, _) in std::env::vars() {
        if k.starts_with("AMBIT_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Starts the CA and waits (with a deadline) for its "CA serving" log line.
fn start(root_dir: &Path, tokens: Option<&Path>) -> Process {
    let mut child = command(root_dir, tokens).spawn().expect("spawn ambit-ca");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // From here on the guard kills and reaps the child whatever happens.
    let mut p = Process {
        child,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        log: rx,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match p.log.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains("CA serving") => {
                p.addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .expect("addr in log line")
                    .parse()
                    .unwrap();
                return p;
            }
            Ok(line) => seen.push(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(status) = p.child.try_wait().unwrap() {
                    panic!(
                        "ambit-ca exited with {status} before serving:\n{}",
                        seen.join("\n")
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    panic!(
        "ambit-ca did not start serving within 30s:\n{}",
        seen.join("\n")
    );
}

/// Runs the CA expecting it to fail at startup; returns (exit code, stderr).
fn run_failing(root_dir: &Path, tokens: Option<&Path>) -> (i32, String) {
    let out = command(root_dir, tokens).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn request(
    p: &Process,
    root_dir: &Path,
    token: &str,
    impersonate: bool,
    identity: &str,
) -> Vec<String> {
    let client =
        GrpcCaClient::new(client_config(p.addr, root_dir, Some(token), impersonate)).unwrap();
    fetch_raw(&client, identity, None).await.unwrap()
}

#[tokio::test]
async fn binary_issues_over_the_network_and_keeps_its_root_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let root_dir = dir.path().join("ca");
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(&tokens, tokens_yaml()).unwrap();

    let p = start(&root_dir, Some(&tokens));
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        assert!(root_dir.join(f).exists(), "{f} not written");
    }
    let root = std::fs::read_to_string(root_dir.join("root-cert.pem")).unwrap();
    let chain = request(&p, &root_dir, AGENT_TOKEN, true, PAY).await;
    assert_eq!(chain.last().unwrap(), &root);
    assert_eq!(
        ambit_net::tls::identity_of(&der(&chain[0])).unwrap(),
        id(PAY)
    );
    // The issuance is logged with caller and identity.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut logged = false;
    while !logged && Instant::now() < deadline {
        if let Ok(line) = p.log.recv_timeout(Duration::from_millis(200)) {
            logged =
                line.contains("issued certificate") && line.contains(ZTUNNEL) && line.contains(PAY);
        }
    }
    assert!(logged, "no issuance log line naming caller and identity");
    drop(p);

    // Restart: same root, still issuing.
    let p = start(&root_dir, Some(&tokens));
    assert_eq!(
        std::fs::read_to_string(root_dir.join("root-cert.pem")).unwrap(),
        root
    );
    let chain = request(&p, &root_dir, WORKLOAD_TOKEN, false, CART).await;
    assert_eq!(chain.last().unwrap(), &root);
}

#[test]
fn bad_tokens_file_stops_startup_naming_file_and_entry() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(
        &tokens,
        format!("{}- token: \"short\"\n  identity: {PAY}\n", tokens_yaml()),
    )
    .unwrap();
    let (code, stderr) = run_failing(&dir.path().join("ca"), Some(&tokens));
    assert_ne!(code, 0);
    assert!(
        stderr.contains("tokens.yaml:7: entry 2: token must be at least 16 characters"),
        "{stderr}"
    );

    let (code, stderr) = run_failing(
        &dir.path().join("ca"),
        Some(&dir.path().join("missing.yaml")),
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("missing.yaml: No such file"), "{stderr}");
}

#[test]
fn incomplete_root_dir_stops_startup_naming_the_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let root_dir = dir.path().join("ca");
    std::fs::create_dir_all(&root_dir).unwrap();
    std::fs::write(root_dir.join("ca-cert.pem"), new_ca().root_pem()).unwrap();
    let (code, stderr) = run_failing(&root_dir, None);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("but not ca-key.pem, root-cert.pem"),
        "{stderr}"
    );
    // Nothing was generated over the partial material.
    assert!(!root_dir.join("ca-key.pem").exists());
}

#[test]
fn invalid_flags_are_reported_by_name() {
    let out = Command::new(BIN)
        .args(["--root-dir", "/tmp/x", "--trust-domain", "Bad.Domain"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--trust-domain") && stderr.contains("contains 'B'"),
        "{stderr}"
    );
}
