//! Removing what killed runs left behind. A mesh torn down normally removes its own
//! namespaces and files; one whose process was killed (SIGKILL, a CI timeout) cannot.
//! Its children died with it (`PR_SET_PDEATHSIG`), but its namespaces and state
//! directory stay. Their names carry the owner's pid ([`MeshId`]), so any later run can
//! tell they are stale and remove them.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cmd::Cmd;
use crate::naming::{is_stale, MeshId};
use crate::MeshError;

/// Where `ip netns add` puts named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// What a sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub namespaces: Vec<String>,
    pub dirs: Vec<PathBuf>,
    /// Processes that were still running inside stale namespaces.
    pub killed: Vec<u32>,
    /// Stale namespaces that could not be removed.
    pub remaining: Vec<String>,
}

/// Removes the namespaces and state directories (under the default state root) of
/// meshes whose owner is gone. Called at the start of every `build()`.
pub fn sweep_stale() -> Result<SweepReport, MeshError> {
    sweep_stale_in(&crate::default_state_root())
}

/// [`sweep_stale`] with state directories under `state_root`.
pub fn sweep_stale_in(state_root: &Path) -> Result<SweepReport, MeshError> {
    sweep_stale_with_prefix(state_root, crate::naming::PREFIX)
}

/// [`sweep_stale_in`] for names of the form `<prefix><pid>x<seq>` rather than
/// `am<pid>x<seq>`. Meshes always use `am`; another prefix lets a test plant stale
/// names that the sweepers of meshes built concurrently by other tests never touch.
pub fn sweep_stale_with_prefix(state_root: &Path, prefix: &str) -> Result<SweepReport, MeshError> {
    let parse = |name: &str| MeshId::parse_prefix_with(name, prefix);
    let mut report = SweepReport::default();
    let stale: Vec<String> = list_dir(Path::new(NETNS_DIR))?
        .into_iter()
        .filter(|name| parse(name).is_some_and(|id| is_stale(id, pid_alive)))
        .collect();
    if !stale.is_empty() {
        let paths: Vec<PathBuf> = stale.iter().map(|n| Path::new(NETNS_DIR).join(n)).collect();
        report.killed = kill_processes_in(&paths);
        delete_netns(&stale);
        for name in stale {
            if Path::new(NETNS_DIR).join(&name).exists() {
                report.remaining.push(name);
            } else {
                report.namespaces.push(name);
            }
        }
    }
    for name in list_dir(state_root)? {
        // A state directory is named by the mesh id alone.
        let Some(id) = parse(&name) else {
            continue;
        };
        if format!("{prefix}{}x{}", id.pid, id.seq) != name || !is_stale(id, pid_alive) {
            continue;
        }
        let dir = state_root.join(&name);
        match fs::remove_dir_all(&dir) {
            Ok(()) => report.dirs.push(dir),
            // Another run's sweeper got there first.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(MeshError::Io { path: dir, source }),
        }
    }
    Ok(report)
}

/// Deletes the named namespaces with one `ip -force -batch`; those already gone (a
/// concurrent sweeper) are no error. Callers check what remains.
pub(crate) fn delete_netns(names: &[String]) {
    if names.is_empty() {
        return;
    }
    let script: String = names.iter().map(|n| format!("netns del {n}\n")).collect();
    let _ = Cmd::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(script)
        .output();
}

/// SIGKILLs every process whose network namespace is one of `netns` (paths); returns
/// their pids.
pub(crate) fn kill_processes_in(netns: &[PathBuf]) -> Vec<u32> {
    let wanted: BTreeSet<(u64, u64)> = netns
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let mut killed = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return killed;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(meta) = fs::metadata(entry.path().join("ns/net")) else {
            continue;
        };
        if !wanted.contains(&(meta.dev(), meta.ino())) {
            continue;
        }
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        if kill(Pid::from_raw(raw), Signal::SIGKILL).is_ok() {
            killed.push(pid);
        }
    }
    killed
}

/// Whether a process with `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S ...`: the state follows the last `)`, comm may hold anything.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

/// The names in `dir`, none if it does not exist.
fn list_dir(dir: &Path) -> Result<Vec<String>, MeshError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(MeshError::Io {
                path: dir.to_owned(),
                source,
            })
        }
    };
    Ok(entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(pid_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!pid_alive(pid));
    }
}
