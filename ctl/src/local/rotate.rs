//! `ambitctl local rotate-root`: asks the running mesh's CA to rotate its root with
//! overlap (decision 0014), the way an operator would ask a cluster's: a request file
//! in the CA's directory (`ca/rotate-root.request` in the mesh's directory), which the
//! CA reads within a second and answers in `ca/rotate-root.reply`. The CA then runs
//! the rotation itself; `--wait` follows it through `ca/rotation.json` until the old
//! root has left the trust bundle. The wire names are the CA's (`ambit_ca::live`);
//! ambitctl does not link the CA, so they are repeated here.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Deserialize;

use super::state::MeshState;

const REQUEST: &str = "rotate-root.request";
const REPLY: &str = "rotate-root.reply";
const ROTATION: &str = "rotation.json";
/// How long the CA may take to answer (it looks every second).
const ANSWER_WITHIN: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
struct Reply {
    ok: bool,
    lines: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Progress {
    phase: String,
    next_step_at: u64,
}

/// Asks for the rotation; with `wait`, follows it until the old root is gone or
/// `timeout` has passed.
pub fn rotate_root(
    mesh: &MeshState,
    overlap: Option<Duration>,
    wait: bool,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let ca = mesh.dir.join("ca");
    let reply_path = ca.join(REPLY);
    let _ = fs::remove_file(&reply_path);
    let request = serde_json::json!({ "overlap_secs": overlap.map(|d| d.as_secs()) });
    write_replacing(&ca.join(REQUEST), &request.to_string())?;
    let start = Instant::now();
    let reply: Reply = loop {
        if let Ok(text) = fs::read_to_string(&reply_path) {
            let _ = fs::remove_file(&reply_path);
            break serde_json::from_str(&text)
                .with_context(|| format!("{}", reply_path.display()))?;
        }
        if start.elapsed() > ANSWER_WITHIN {
            let _ = fs::remove_file(ca.join(REQUEST));
            anyhow::bail!(
                "the CA (ambit-control) did not answer within {ANSWER_WITHIN:?}; its log is under {}",
                mesh.dir.join("logs").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for line in &reply.lines {
        crate::outln!("{line}")?;
    }
    if !reply.ok || !wait {
        return Ok(reply.ok);
    }
    let mut last_phase = String::from("overlap");
    loop {
        let progress = fs::read_to_string(ca.join(ROTATION))
            .ok()
            .and_then(|t| serde_json::from_str::<Progress>(&t).ok());
        match progress {
            None if roots_in(&ca.join("root-cert.pem")) == 1 => {
                crate::outln!("done: the old root has left the trust bundle; every certificate now chains to the new root")?;
                return Ok(true);
            }
            None => {}
            Some(p) if p.phase != last_phase => {
                match p.phase.as_str() {
                    "switched" => crate::outln!(
                        "signing switched to the new root; workloads move to it as they renew; the old root stays trusted until {} (unix time)",
                        p.next_step_at
                    )?,
                    other => crate::outln!("phase {other}")?,
                }
                last_phase = p.phase;
            }
            Some(_) => {}
        }
        if start.elapsed() > timeout {
            anyhow::bail!("the rotation is still in phase {last_phase} after {timeout:?}; it goes on in the CA (see {})", ca.join(ROTATION).display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn roots_in(path: &Path) -> usize {
    fs::read_to_string(path)
        .map(|t| t.matches("-----BEGIN CERTIFICATE-----").count())
        .unwrap_or(0)
}

fn write_replacing(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).with_context(|| format!("{}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("{}", path.display()))
}
