//! How `local apply`, `local delete` and `local upgrade-ztunnel` ask the supervisor,
//! which owns the running mesh, for what only it can do (start or stop a waypoint,
//! change a running object's waypoint labels, replace a node's ztunnel): a request file in the state directory's `requests/`, answered by
//! a reply file next to it. Each is written under a temporary name and renamed, so
//! neither side reads half a file.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The directory of requests, in the state directory.
pub const REQUESTS_DIR: &str = "requests";
/// How often each side looks.
pub const POLL: Duration = Duration::from_millis(50);

/// What `apply` or `delete` asks of the running mesh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub delete: bool,
    /// Each object with where it was written (`file:line`), for messages.
    pub objects: Vec<(String, Value)>,
    /// `local upgrade-ztunnel` instead: no objects.
    #[serde(default)]
    pub upgrade: Option<UpgradeRequest>,
}

/// Upgrade these nodes' ztunnels in place, one node at a time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeRequest {
    /// The nodes, in order; empty: every node.
    pub nodes: Vec<String>,
    /// The new ztunnel binary; none: the one the mesh runs.
    pub binary: Option<PathBuf>,
}

/// The supervisor's answer: done (each line says what it did) or refused (each line
/// says why; then it changed nothing).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub lines: Vec<String>,
    /// After an upgrade: the replaced ztunnels, still draining.
    #[serde(default)]
    pub draining: Vec<u32>,
}

/// Sends `request` to the supervisor `pid` and waits for its reply.
pub fn send(
    state_dir: &Path,
    pid: u32,
    request: &Request,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    let dir = state_dir.join(REQUESTS_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!("{}-{nanos}", std::process::id());
    let path = dir.join(format!("{name}.json"));
    let reply_path = dir.join(format!("{name}.reply"));
    write_replacing(&path, &serde_json::to_string(request)?)?;
    let start = Instant::now();
    loop {
        if let Ok(text) = fs::read_to_string(&reply_path) {
            let _ = fs::remove_file(&reply_path);
            return serde_json::from_str(&text)
                .with_context(|| format!("{}", reply_path.display()));
        }
        if !super::state::pid_alive(pid) {
            let _ = fs::remove_file(&path);
            anyhow::bail!("the local mesh's supervisor (pid {pid}) exited before it answered");
        }
        if start.elapsed() > timeout {
            // Taken back, unless the supervisor is on it already.
            let _ = fs::remove_file(&path);
            anyhow::bail!(
                "the local mesh's supervisor (pid {pid}) did not answer within {timeout:?}; its log is {}",
                state_dir.join(super::state::LOG_FILE).display()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// The requests waiting, oldest first, each taken (its file removed): the path to
/// answer at, and the request or why it cannot be read.
pub fn take(state_dir: &Path) -> Vec<(PathBuf, Result<Request, String>)> {
    let dir = state_dir.join(REQUESTS_DIR);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let text = fs::read_to_string(&path).ok()?;
            // Gone meanwhile: its sender gave up.
            fs::remove_file(&path).ok()?;
            let request =
                serde_json::from_str(&text).map_err(|e| format!("unreadable request: {e}"));
            Some((path.with_extension("reply"), request))
        })
        .collect()
}

/// Writes `reply` where its sender waits for it.
pub fn answer(path: &Path, reply: &Reply) -> anyhow::Result<()> {
    write_replacing(path, &serde_json::to_string(reply)?)
}

fn write_replacing(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).with_context(|| format!("{}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("{}", path.display()))
}
