//! Names of everything a mesh creates outside its own namespaces: network namespace
//! names and the state directory. Each starts with the mesh's id, `am<pid>x<seq>`, so
//! meshes never collide (another process has another pid, another mesh in this process
//! another sequence number) and the sweeper can tell from a name alone whose it is.
//!
//! Interfaces need no global names: every link a mesh makes lives inside its own
//! namespaces (the fabric bridge, the nodes' uplinks, the pods' veths), so the host's
//! namespace is never touched.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The prefix of every mesh id.
pub(crate) const PREFIX: &str = "am";

/// Longest namespace name we make (a file name in `/run/netns`, at most 255 bytes).
const MAX_NETNS_NAME: usize = 120;

/// The identity of one mesh: the pid of the process that owns it and a sequence
/// number unique within that process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MeshId {
    pub pid: u32,
    pub seq: u32,
}

impl fmt::Display for MeshId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}x{}", self.pid, self.seq)
    }
}

impl MeshId {
    /// The id at the start of `name` (a namespace or directory name), if it has one:
    /// `am<pid>x<seq>` alone or followed by `-`.
    pub fn parse_prefix(name: &str) -> Option<MeshId> {
        Self::parse_prefix_with(name, PREFIX)
    }

    /// [`MeshId::parse_prefix`] for ids written with another prefix than `am`.
    pub fn parse_prefix_with(name: &str, prefix: &str) -> Option<MeshId> {
        let rest = name.strip_prefix(prefix)?;
        let id = rest.split_once('-').map_or(rest, |(id, _)| id);
        let (pid, seq) = id.split_once('x')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(pid) || !digits(seq) {
            return None;
        }
        Some(MeshId {
            pid: pid.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// The name of a mesh namespace: `<id>-<role>`, the role cut to what Linux and
    /// humans handle well and limited to `[a-z0-9.-]`.
    pub fn netns_name(&self, role: &str) -> String {
        let mut name = format!("{self}-");
        for c in role.chars() {
            if name.len() >= MAX_NETNS_NAME {
                break;
            }
            name.push(match c {
                'a'..='z' | '0'..='9' | '.' | '-' => c,
                'A'..='Z' => c.to_ascii_lowercase(),
                _ => '-',
            });
        }
        name
    }
}

static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);
/// Sequence numbers of this process's meshes that exist (or are being built or torn
/// down). The sweeper leaves those alone and treats any other name carrying this
/// process's pid as stale: a killed run whose pid was reused by us.
static LIVE: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn live() -> MutexGuard<'static, BTreeSet<u32>> {
    // The set stays consistent whatever panicked while holding it: insert and remove
    // are single operations.
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A mesh id reserved for this process until dropped.
#[derive(Debug)]
pub struct LiveId {
    id: MeshId,
}

impl LiveId {
    pub fn allocate() -> LiveId {
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        live().insert(seq);
        LiveId {
            id: MeshId {
                pid: std::process::id(),
                seq,
            },
        }
    }

    pub fn id(&self) -> MeshId {
        self.id
    }
}

impl Drop for LiveId {
    fn drop(&mut self) {
        live().remove(&self.id.seq);
    }
}

/// Whether whatever carries `id` belongs to no living mesh: its owner process is gone,
/// or it is this process but no mesh of ours has that sequence number.
pub fn is_stale(id: MeshId, pid_alive: impl Fn(u32) -> bool) -> bool {
    if id.pid == std::process::id() {
        return !live().contains(&id.seq);
    }
    !pid_alive(id.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_id_round_trips_through_names() {
        let id = MeshId {
            pid: 4194303,
            seq: 12,
        };
        assert_eq!(id.to_string(), "am4194303x12");
        assert_eq!(MeshId::parse_prefix("am4194303x12"), Some(id));
        assert_eq!(MeshId::parse_prefix(&id.netns_name("node-a")), Some(id));
        assert_eq!(MeshId::parse_prefix("am4194303x12-p3-shop-cart"), Some(id));
    }

    #[test]
    fn another_prefix_is_neither_read_as_nor_confused_with_ours() {
        let id = MeshId { pid: 42, seq: 3 };
        assert_eq!(
            MeshId::parse_prefix_with("amtest42x3-fabric", "amtest"),
            Some(id)
        );
        assert_eq!(MeshId::parse_prefix("amtest42x3-fabric"), None);
        assert_eq!(MeshId::parse_prefix_with("am42x3-fabric", "amtest"), None);
    }

    #[test]
    fn names_of_others_are_not_mesh_ids() {
        for name in [
            "ambit-rd-1",
            "am",
            "amx1-a",
            "am12x-a",
            "am12y3-a",
            "am1a2x3",
            "cni-1234",
            "am99999999999x1-a",
        ] {
            assert_eq!(MeshId::parse_prefix(name), None, "{name}");
        }
    }

    #[test]
    fn netns_names_are_sanitized_and_bounded() {
        let id = MeshId { pid: 7, seq: 0 };
        assert_eq!(id.netns_name("p1-Shop_x/y"), "am7x0-p1-shop-x-y");
        assert!(id.netns_name(&"a".repeat(1000)).len() <= MAX_NETNS_NAME);
    }

    #[test]
    fn names_of_our_own_pid_are_stale_unless_a_live_mesh_holds_them() {
        let live = LiveId::allocate();
        let ours = live.id();
        assert!(!is_stale(ours, |_| false));
        let unknown = MeshId {
            pid: ours.pid,
            seq: u32::MAX,
        };
        assert!(is_stale(unknown, |_| true));
        drop(live);
        assert!(is_stale(ours, |_| true));
    }

    #[test]
    fn names_of_other_pids_are_stale_when_the_pid_is_dead() {
        let other = MeshId {
            pid: std::process::id().wrapping_add(1),
            seq: 0,
        };
        assert!(is_stale(other, |_| false));
        assert!(!is_stale(other, |_| true));
    }
}
