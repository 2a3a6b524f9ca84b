//! The model from a local YAML file (Ambit's model format, see `ambit_core::model`):
//! the development source until xDS, and kept for development after. The file is
//! re-read when its content changes; a change that does not parse or validate is
//! reported (file, line where YAML gives one, reason) and the last good model stays in
//! force, so a typo never takes traffic down.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambit_core::model::{MeshConfig, MeshState};
use ambit_core::TrustDomain;
use tokio::sync::watch;

pub use ambit_net::model_source::{reject, ModelSnapshot};

#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid model: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Invalid {
        path: PathBuf,
        source: ambit_core::model::ModelError,
    },
}

/// Reads and validates the model file.
pub fn load(
    path: &Path,
    trust_domain: &TrustDomain,
) -> Result<(MeshConfig, MeshState), ModelFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path, trust_domain)
}

fn parse(
    text: &str,
    path: &Path,
    trust_domain: &TrustDomain,
) -> Result<(MeshConfig, MeshState), ModelFileError> {
    // An empty file is an empty model, not an error.
    let config: MeshConfig = if text.trim().is_empty() {
        MeshConfig::default()
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| ModelFileError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
    };
    let state =
        MeshState::build(&config, trust_domain).map_err(|source| ModelFileError::Invalid {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((config, state))
}

/// Loads the file (failing if the first load fails) and keeps the returned receiver
/// up to date by re-reading it every `interval` while the sender lives.
pub fn watch_file(
    path: PathBuf,
    trust_domain: TrustDomain,
    interval: Duration,
) -> Result<(watch::Receiver<ModelSnapshot>, tokio::task::JoinHandle<()>), ModelFileError> {
    let text = std::fs::read_to_string(&path).map_err(|source| ModelFileError::Read {
        path: path.clone(),
        source,
    })?;
    let (config, state) = parse(&text, &path, &trust_domain)?;
    tracing::info!(path = %path.display(), workloads = config.workloads.len(), services = config.services.len(), "model loaded");
    let (tx, rx) = watch::channel(ModelSnapshot {
        state: Arc::new(state),
        config: Arc::new(config),
        version: 1,
        loaded_at: SystemTime::now(),
        rejected: None,
    });
    let task = tokio::spawn(async move {
        let mut last_text = text;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if tx.is_closed() {
                return;
            }
            // Content comparison rather than mtime: editors replace files by rename,
            // and mtime granularity can hide quick successive writes.
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    reject(&tx, format!("{}: {e}", path.display()));
                    continue;
                }
            };
            if text == last_text {
                continue;
            }
            last_text = text;
            match parse(&last_text, &path, &trust_domain) {
                Ok((config, state)) => {
                    tracing::info!(path = %path.display(), workloads = config.workloads.len(), services = config.services.len(), "model reloaded");
                    tx.send_modify(|s| {
                        s.state = Arc::new(state);
                        s.config = Arc::new(config);
                        s.version += 1;
                        s.loaded_at = SystemTime::now();
                        s.rejected = None;
                    });
                }
                Err(e) => reject(&tx, e.to_string()),
            }
        }
    });
    Ok((rx, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "workloads:\n- {uid: shop/a, name: a, namespace: shop, node: n1, ips: [10.1.0.5], protocol: HBONE}\n";
    const BETTER: &str = "workloads:\n- {uid: shop/a, name: a, namespace: shop, node: n1, ips: [10.1.0.5], protocol: HBONE}\n- {uid: shop/b, name: b, namespace: shop, node: n1, ips: [10.1.0.6]}\n";

    async fn wait_for(
        rx: &mut watch::Receiver<ModelSnapshot>,
        what: &str,
        cond: impl Fn(&ModelSnapshot) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if cond(&rx.borrow_and_update()) {
                return;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                tokio::time::timeout(left, rx.changed()).await.is_ok(),
                "timed out waiting for {what}; last: {:?}",
                rx.borrow().rejected
            );
        }
    }

    #[tokio::test]
    async fn reloads_on_change_and_keeps_last_good_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let (mut rx, _task) = watch_file(
            path.clone(),
            TrustDomain::default(),
            Duration::from_millis(20),
        )
        .unwrap();
        assert_eq!(rx.borrow().state.workloads().count(), 1);

        std::fs::write(&path, BETTER).unwrap();
        wait_for(&mut rx, "reload", |s| s.version == 2).await;
        assert_eq!(rx.borrow().state.workloads().count(), 2);

        // A YAML error names the file and the line, and the model stays.
        std::fs::write(&path, "workloads:\n- {uid: x, name: [\n").unwrap();
        wait_for(&mut rx, "rejection", |s| s.rejected.is_some()).await;
        let snap = rx.borrow().clone();
        let reason = snap.rejected.unwrap();
        assert!(
            reason.contains("model.yaml") && reason.contains("line"),
            "{reason}"
        );
        assert_eq!(snap.version, 2);
        assert_eq!(snap.state.workloads().count(), 2);

        // A semantic error too.
        std::fs::write(
            &path,
            "workloads:\n- {uid: a, name: a, namespace: n, node: x, ips: []}\n",
        )
        .unwrap();
        wait_for(&mut rx, "semantic rejection", |s| {
            s.rejected
                .as_deref()
                .is_some_and(|r| r.contains("has no IP"))
        })
        .await;
        assert_eq!(rx.borrow().version, 2);

        // A fix clears the rejection.
        std::fs::write(&path, GOOD).unwrap();
        wait_for(&mut rx, "recovery", |s| {
            s.version == 3 && s.rejected.is_none()
        })
        .await;
    }

    #[tokio::test]
    async fn a_bad_file_at_start_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.yaml");
        let e =
            watch_file(path.clone(), TrustDomain::default(), Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("model.yaml"), "{e}");
        std::fs::write(&path, "workloads: {not: a list}").unwrap();
        let e = watch_file(path, TrustDomain::default(), Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("not a valid model"), "{e}");
    }

    #[test]
    fn empty_file_is_an_empty_model() {
        let (config, state) = parse("\n", Path::new("m.yaml"), &TrustDomain::default()).unwrap();
        assert_eq!(config, MeshConfig::default());
        assert_eq!(state.workloads().count(), 0);
    }
}
