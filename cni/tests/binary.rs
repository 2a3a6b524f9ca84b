//! The `ambit-cni` binary as a container runtime runs it: `CNI_*` variables, the
//! network configuration on standard input, the result or a CNI error object on
//! standard output, the exit code; and its agent on a real Unix socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"ips":[{"address":"10.1.0.5/24","interface":0}],"routes":[],"dns":{}}"#;

fn conf(socket: &Path) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni","agentSocket":"{}","prevResult":{PREV}}}"#,
        socket.display()
    )
}

/// Runs the plugin; returns (exit code, stdout, stderr).
fn plugin(command: &str, stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ambit-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "c0ffee")
        .env("CNI_NETNS", "/var/run/netns/pod")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// An agent that answers one request with `reply` and returns the request it got.
fn agent_once(socket: &Path, reply: &'static str) -> std::thread::JoinHandle<Value> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        (&stream).write_all(reply.as_bytes()).unwrap();
        (&stream).write_all(b"\n").unwrap();
        serde_json::from_str(&line).unwrap()
    })
}

#[test]
fn add_waits_for_the_agent_then_prints_the_primary_result() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let agent = agent_once(&socket, r#"{"outcome":"done","enrolled":true}"#);
    let (code, stdout, stderr) = plugin("ADD", &conf(&socket));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap(),
        serde_json::from_str::<Value>(PREV).unwrap()
    );
    let request = agent.join().unwrap();
    assert_eq!(request["command"], "add");
    assert_eq!(request["pod"]["namespace"], "shop");
    assert_eq!(request["pod"]["name"], "web");
    assert_eq!(request["netns"], "/var/run/netns/pod");
    assert_eq!(request["ips"][0], "10.1.0.5");
    assert!(stderr.contains("shop/web enrolled"), "{stderr}");
}

#[test]
fn without_an_agent_add_says_try_again_later_and_del_still_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let (code, stdout, _) = plugin("ADD", &conf(&socket));
    assert_ne!(code, 0);
    let error: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(error["code"], 11, "{error}");
    assert!(error["details"].as_str().unwrap().contains("absent.sock"));
    let (code, stdout, stderr) = plugin("DEL", &conf(&socket));
    assert_eq!((code, stdout.as_str()), (0, ""), "{stderr}");
}

#[test]
fn malformed_input_gets_a_cni_error_not_a_crash() {
    for (stdin, want) in [
        ("", 6),
        ("{\"cniVersion\": 1}", 6),
        (
            r#"{"cniVersion":"0.1.0","name":"k8s","type":"ambit-cni"}"#,
            1,
        ),
    ] {
        let (code, stdout, stderr) = plugin("ADD", stdin);
        assert_eq!(code, 1, "{stdin}: {stdout}{stderr}");
        let error: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{stdin}: not a JSON error ({e}): {stdout}"));
        assert_eq!(error["code"], want, "{stdin}: {error}");
        assert!(error["msg"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (code, stdout, _) = plugin("VERSION", "");
    assert_eq!(code, 0);
    assert!(stdout.contains("supportedVersions"));
}

#[test]
fn the_conflist_is_edited_idempotently_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let original = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp","ipam":{"type":"host-local"}}]}"#;
    let file = dir.path().join("10-k8s.conflist");
    std::fs::write(&file, original).unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ambit-cni"))
            .env_remove("CNI_COMMAND")
            .args(args)
            .arg("--conf-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_str::<Value>(&std::fs::read_to_string(&file).unwrap()).unwrap()
    };
    let installed = cli(&["install-conflist", "--agent-socket", "/run/a.sock"]);
    assert_eq!(installed["plugins"][1]["type"], "ambit-cni");
    assert_eq!(installed["plugins"][1]["agentSocket"], "/run/a.sock");
    assert_eq!(
        cli(&["install-conflist", "--agent-socket", "/run/a.sock"]),
        installed
    );
    assert_eq!(
        cli(&["uninstall-conflist"]),
        serde_json::from_str::<Value>(original).unwrap()
    );
}
