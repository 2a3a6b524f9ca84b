//! Finding a pod's network namespace by its IP among the node's processes (needs root):
//! a namespace wired to this one by a veth, with a process in it or pinned by name, is
//! found by each of its addresses; one without the address, or not wired to this
//! namespace (elsewhere on the machine) is not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};

use ambit_net::netns_scan::{find_by_ip, find_each};

/// A named network namespace holding `ips`, and a process in it
/// (or not). Removed when dropped.
struct Pod {
    name: String,
    process: Option<Child>,
}

impl Pod {
    fn new(tag: &str, ips: &[&str], with_process: bool, wired: bool) -> Pod {
        let name = format!("ambit-scan-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        let mut pod = Pod {
            name: name.clone(),
            process: None,
        };
        ip(&["netns", "add", &name]);
        // The addresses go on the loopback: any interface counts, and this one needs
        // no kernel module.
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        if wired {
            // The host end stays here; it goes with the namespace's end.
            let host = format!("as{}{tag}", std::process::id() % 100_000);
            ip(&[
                "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ]);
        }
        for addr in ips {
            let v6 = addr.contains(':');
            let cidr = format!("{addr}/{}", if v6 { 128 } else { 32 });
            let mut args = vec!["-n", &name, "addr", "add", &cidr, "dev", "lo"];
            if v6 {
                // No duplicate address detection: the address is usable at once.
                args.push("nodad");
            }
            ip(&args);
        }
        if with_process {
            // It says so once it runs inside the namespace.
            let mut process = Command::new("ip")
                .args(["netns", "exec", &name, "sh", "-c", "echo in; exec sleep 60"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(process.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "in");
            pod.process = Some(process);
        }
        pod
    }

    fn inode(&self) -> u64 {
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .unwrap()
            .ino()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn a_running_pods_namespace_is_found_by_any_of_its_addresses() {
    let pod = Pod::new("a", &["198.18.7.2", "fd99:7::2"], true, true);
    // No process in it, but pinned by name (`ip netns add`, as a runtime pins a
    // sandbox's namespace before its containers start): found.
    let idle = Pod::new("b", &["198.18.7.3"], false, true);
    // Not wired to this namespace: not found.
    let elsewhere = Pod::new("c", &["198.18.7.4"], true, false);
    for ip in ["198.18.7.2", "fd99:7::2"] {
        let found = find_by_ip(&[ip.parse().unwrap()])
            .unwrap()
            .unwrap_or_else(|| panic!("{ip}: namespace not found"));
        assert_eq!(found.file.metadata().unwrap().ino(), pod.inode(), "{ip}");
        assert!(found.path.ends_with("ns/net"), "{:?}", found.path);
    }
    let found = find_by_ip(&["198.18.7.3".parse().unwrap()])
        .unwrap()
        .expect("the pinned namespace");
    assert_eq!(found.file.metadata().unwrap().ino(), idle.inode());
    assert!(find_by_ip(&["198.18.7.4".parse().unwrap()])
        .unwrap()
        .is_none());
    assert!(find_by_ip(&["198.18.7.99".parse().unwrap()])
        .unwrap()
        .is_none());
    // Several at once, in one scan, in the order asked.
    let found = find_each(&[
        vec!["198.18.7.99".parse().unwrap()],
        vec!["198.18.7.3".parse().unwrap()],
        vec!["fd99:7::2".parse().unwrap()],
    ])
    .unwrap();
    let inodes: Vec<Option<u64>> = found
        .iter()
        .map(|f| f.as_ref().map(|f| f.file.metadata().unwrap().ino()))
        .collect();
    assert_eq!(inodes, [None, Some(idle.inode()), Some(pod.inode())]);
    drop(idle);
    drop(elsewhere);
}
