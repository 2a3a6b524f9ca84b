//! Putting the plugin on the node: its binary into the runtime's CNI bin directory and
//! its entry into the primary conflist's chain; and taking both away.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Map, Value};

use super::Config;
use crate::conflist::{self, ConflistError, PLUGIN_TYPE};

/// The plugin's entry in the chain, as this agent is configured.
pub fn entry(config: &Config) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert(
        "agentSocket".into(),
        config.agent_socket.display().to_string().into(),
    );
    if let Some(excluded) = &config.exclude_namespaces {
        entry.insert("excludeNamespaces".into(), excluded.clone().into());
    }
    entry
}

/// Puts the entry back if the conflist lost it (the primary network plugin rewrote
/// its file). Quiet when nothing changed.
pub fn keep_in_chain(config: &Config) -> Result<(), ConflistError> {
    let path = conflist::primary(&config.conf_dir)?;
    let before = fs::read_to_string(&path).unwrap_or_default();
    let after_path = conflist::install(&config.conf_dir, &entry(config))?;
    let after = fs::read_to_string(&after_path).unwrap_or_default();
    if before != after || path != after_path {
        tracing::warn!(conflist = %after_path.display(), "ambit-cni was missing from the node's CNI chain (the file was rewritten); added again");
    }
    Ok(())
}

/// Copies this very binary to `<bin_dir>/ambit-cni` (through a temporary file and a
/// rename, so a runtime never runs a half-written plugin), unless it is already the
/// same.
pub fn install_binary(bin_dir: &Path) -> anyhow::Result<PathBuf> {
    let source = std::env::current_exe().context("finding this binary")?;
    fs::create_dir_all(bin_dir).with_context(|| format!("creating {}", bin_dir.display()))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    let bytes = fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
    if fs::read(&target).is_ok_and(|current| current == bytes) {
        return Ok(target);
    }
    let temporary = bin_dir.join(format!(".{PLUGIN_TYPE}.{}", std::process::id()));
    let written = fs::File::create(&temporary)
        .and_then(|mut f| {
            f.write_all(&bytes)?;
            f.set_permissions(fs::Permissions::from_mode(0o755))?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&temporary, &target));
    if let Err(e) = written {
        let _ = fs::remove_file(&temporary);
        return Err(e).with_context(|| format!("writing {}", target.display()));
    }
    Ok(target)
}

/// Takes ambit-cni out of the chain, then removes its binary: from then on pods start
/// without the plugin (and are not captured).
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> anyhow::Result<()> {
    match conflist::uninstall(conf_dir)? {
        Some(path) => eprintln!("ambit-cni: removed from {}", path.display()),
        None => eprintln!("ambit-cni: not in {}; nothing to do", conf_dir.display()),
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => eprintln!("ambit-cni: removed {}", binary.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", binary.display())),
    }
    Ok(())
}
