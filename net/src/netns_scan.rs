//! Finding a running pod's network namespace from its IP, the way the node agent
//! enrols pods that started before it did: every distinct network namespace of the
//! node's processes (`/proc/*/ns/net`) is entered on a short-lived thread and its
//! interface addresses are read. The same works in a cluster and in the local mesh,
//! since both are processes in network namespaces.
//!
//! Namespaces pinned in `/run/netns` are scanned too. A namespace is kept only if it is
//! wired to the node: its netlink nsid is the `link-netnsid` of one of the node's
//! interfaces, as a pod's veth peer is.

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
/// one of `ips`, among those the node's processes are in and those pinned by name, if
/// the namespace is wired to
/// this one (the node's): one of this namespace's interfaces links into it, as the
/// host end of a pod's veth does. A namespace merely holding the address elsewhere on
/// the machine (another local mesh's pod) is not this node's pod. Needs
/// `CAP_SYS_ADMIN` to enter the namespaces.
pub fn find_by_ip(ips: &[IpAddr]) -> io::Result<Option<FoundNetns>> {
    Ok(find_each(&[ips.to_vec()])?.pop().flatten())
}

/// [`find_by_ip`] for several pods at once, with one scan: for each set of addresses,
/// the namespace holding one of them, in the same order.
pub fn find_each(wanted: &[Vec<IpAddr>]) -> io::Result<Vec<Option<FoundNetns>>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let linked = netlink::linked_nsids()?;
    let own = std::fs::metadata("/proc/self/ns/net")?;
    let mut seen: HashSet<(u64, u64)> = HashSet::from([(own.dev(), own.ino())]);
    let mut candidates = Vec::new();
    // Every process's namespace, then the namespaces runtimes pin by name (containerd
    // and CRI-O keep a sandbox's there, as `ip netns` does), which hold no process
    // until a container starts.
    let processes = std::fs::read_dir("/proc")?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    let pinned = PINNED_DIRS
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path());
    for path in processes.chain(pinned) {
        // A process may exit, or deny access, between the listing and the open.
        let Ok(file) = File::open(&path) else {
            continue;
        };
        let Ok(meta) = file.metadata() else { continue };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        if netlink::nsid_of(&file)
            .ok()
            .flatten()
            .is_some_and(|id| linked.contains(&id))
        {
            candidates.push((file, path));
        }
    }
    let wanted = wanted.to_vec();
    // setns changes the calling thread only; this thread is thrown away afterwards.
    std::thread::Builder::new()
        .name("netns-scan".into())
        .spawn(move || {
            let mut found: Vec<Option<FoundNetns>> = wanted.iter().map(|_| None).collect();
            for (file, path) in candidates {
                if found.iter().all(Option::is_some) {
                    break;
                }
                let held = addresses(&file)?;
                for (i, ips) in wanted.iter().enumerate() {
                    if found[i].is_none() && ips.iter().any(|ip| held.contains(ip)) {
                        found[i] = Some(FoundNetns {
                            file: file.try_clone()?,
                            path: path.clone(),
                        });
                    }
                }
            }
            Ok(found)
        })?
        .join()
        .map_err(|_| io::Error::other("the namespace scan thread panicked"))?
}

/// The interface addresses of the namespace of `file`; enters it. None if it cannot
/// be entered (gone, or not ours to enter).
fn addresses(file: &File) -> io::Result<Vec<IpAddr>> {
    if setns(file.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
        return Ok(Vec::new());
    }
    let addresses = getifaddrs().map_err(io::Error::from)?;
    Ok(addresses
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect())
}

/// Where runtimes pin network namespaces by name.
const PINNED_DIRS: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// Route netlink, for the two questions that tell a pod of this node from a namespace
/// elsewhere that happens to hold the same address (another local mesh on the same
/// machine, or any namespace not wired to this node): which namespaces this one has
/// links into, and which id this one gives a namespace.
mod netlink {
    use std::collections::HashSet;
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::sys::socket::{
        recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    };

    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const RTM_NEWLINK: u16 = 16;
    const RTM_GETLINK: u16 = 18;
    const RTM_NEWNSID: u16 = 88;
    const RTM_GETNSID: u16 = 90;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_DUMP: u16 = 0x300;
    const IFLA_LINK_NETNSID: u16 = 37;
    const NETNSA_NSID: u16 = 1;
    const NETNSA_FD: u16 = 3;
    const HEADER: usize = 16;

    fn open() -> io::Result<OwnedFd> {
        socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(io::Error::from)
    }

    fn request(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(HEADER + payload.len());
        msg.extend_from_slice(&((HEADER + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        msg
    }

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }

    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }

    /// The attributes from `at` to the end of `msg`: (type, value).
    fn attributes(msg: &[u8], mut at: usize) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        while let (Some(len), Some(kind)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
            let len = len as usize;
            if len < 4 || at + len > msg.len() {
                break;
            }
            out.push((kind & 0x3fff, &msg[at + 4..at + len]));
            at += (len + 3) & !3;
        }
        out
    }

    /// Sends `req`, then hands each answer message (type, whole message) to `each`
    /// until the kernel says done (a dump) or after the first (a single answer).
    fn exchange(req: &[u8], dump: bool, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let fd = open()?;
        sendto(
            fd.as_raw_fd(),
            req,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(io::Error::from)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(io::Error::from)?;
            let mut at = 0;
            while at + HEADER <= n {
                let len = u32_at(&buf, at).unwrap_or(0) as usize;
                let kind = u16_at(&buf, at + 4).unwrap_or(0);
                if len < HEADER || at + len > n {
                    return Err(io::Error::other("malformed netlink answer"));
                }
                let msg = &buf[at..at + len];
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        let code = u32_at(msg, HEADER).unwrap_or(0) as i32;
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code));
                        }
                        if !dump {
                            return Ok(());
                        }
                    }
                    _ => {
                        each(kind, msg);
                        if !dump {
                            return Ok(());
                        }
                    }
                }
                at += (len + 3) & !3;
            }
        }
    }

    /// The ids (in the calling thread's namespace) of the namespaces its interfaces
    /// link into: the other ends of its veths.
    pub fn linked_nsids() -> io::Result<HashSet<i32>> {
        let mut ids = HashSet::new();
        exchange(
            &request(RTM_GETLINK, NLM_F_DUMP, &[0u8; 16]),
            true,
            |kind, msg| {
                if kind == RTM_NEWLINK {
                    for (attr, value) in attributes(msg, HEADER + 16) {
                        if attr == IFLA_LINK_NETNSID && value.len() >= 4 {
                            ids.insert(i32::from_ne_bytes([
                                value[0], value[1], value[2], value[3],
                            ]));
                        }
                    }
                }
            },
        )?;
        ids.remove(&-1);
        Ok(ids)
    }

    /// The id the calling thread's namespace gives the namespace `netns`, if it gave
    /// it one (it does for every namespace it has a link into).
    pub fn nsid_of(netns: &File) -> io::Result<Option<i32>> {
        let mut payload = vec![0u8; 4];
        payload.extend_from_slice(&8u16.to_ne_bytes());
        payload.extend_from_slice(&NETNSA_FD.to_ne_bytes());
        payload.extend_from_slice(&(netns.as_raw_fd() as u32).to_ne_bytes());
        let mut id = None;
        exchange(&request(RTM_GETNSID, 0, &payload), false, |kind, msg| {
            if kind == RTM_NEWNSID {
                for (attr, value) in attributes(msg, HEADER + 4) {
                    if attr == NETNSA_NSID && value.len() >= 4 {
                        id = Some(i32::from_ne_bytes([value[0], value[1], value[2], value[3]]));
                    }
                }
            }
        })?;
        Ok(id.filter(|id| *id >= 0))
    }
}
