//! Finding a running pod's network namespace from its IP, the way the node agent
//! enrols pods that started before it did: every distinct network namespace of the
//! node's processes (`/proc/*/ns/net`) is entered on a short-lived thread and its
//! interface addresses are read. The same works in a cluster and in the local mesh,
//! since both are processes in network namespaces.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use nix::ifaddrs::getifaddrs;
use nix::sched::{setns, CloneFlags};

/// A network namespace found holding an address.
#[derive(Debug)]
pub struct FoundNetns {
    /// Keeps the namespace open, to hand to ztunnel even if the process exits.
    pub file: File,
    /// `/proc/PID/ns/net` of a process in it, for logs.
    pub path: PathBuf,
}

/// The network namespace (other than this process's own) with an interface holding
/// one of `ips`, if any process on the node is in one. Needs `CAP_SYS_ADMIN` to enter
/// the namespaces.
pub fn find_by_ip(ips: &[IpAddr]) -> io::Result<Option<FoundNetns>> {
    let own = std::fs::metadata("/proc/self/ns/net")?;
    let mut seen: HashSet<(u64, u64)> = HashSet::from([(own.dev(), own.ino())]);
    let mut candidates = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        // A process may exit, or deny access, between the listing and the open.
        let Ok(file) = File::open(&path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        if seen.insert((meta.dev(), meta.ino())) {
            candidates.push((file, path));
        }
    }
    let ips = ips.to_vec();
    // setns changes the calling thread only; this thread is thrown away afterwards.
    std::thread::Builder::new()
        .name("netns-scan".into())
        .spawn(move || {
            for (file, path) in candidates {
                if holds_any(&file, &ips)? {
                    return Ok(Some(FoundNetns { file, path }));
                }
            }
            Ok(None)
        })?
        .join()
        .map_err(|_| io::Error::other("the namespace scan thread panicked"))?
}

/// Whether the namespace of `file` has an interface address among `ips`; enters it.
fn holds_any(file: &File, ips: &[IpAddr]) -> io::Result<bool> {
    if setns(file.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
        // Not enterable (gone, or not ours to enter): not the pod's.
        return Ok(false);
    }
    let addresses = getifaddrs().map_err(io::Error::from)?;
    Ok(addresses
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .any(|ip| ips.contains(&ip)))
}
