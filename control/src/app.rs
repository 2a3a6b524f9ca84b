//! Wires `ambit-control` in local mode: the directory source, the translation and the
//! xDS server, on the CA's port.

use std::sync::Arc;

use ambit_core::model::MeshConfig;
use ambit_proto::xds::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::sync::watch;

use crate::config::Config;
use crate::directory::Directory;
use crate::translate::translate;
use crate::xds::{Snapshot, XdsServer};

/// Runs until `shutdown` completes. `on_listening` gets the bound address.
pub async fn run(
    config: Config,
    on_listening: impl FnOnce(std::net::SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.local_dir.is_dir(),
        "--local-dir {}: not a directory",
        config.local_dir.display()
    );
    let (snapshots, snapshots_rx) = watch::channel(Arc::new(Snapshot::default()));
    let watcher = tokio::spawn(watch_directory(
        Directory::new(&config.local_dir),
        config.poll,
        snapshots,
    ));
    let result = ambit_ca::app::run_with(
        config.ca,
        |authenticators, routes| {
            routes.add_service(AggregatedDiscoveryServiceServer::new(XdsServer::new(
                snapshots_rx,
                authenticators.to_vec(),
            )));
        },
        on_listening,
        shutdown,
    )
    .await;
    watcher.abort();
    result
}

/// Reads the directory every `poll`, and publishes a snapshot whenever the model
/// changes. Problems are logged once each, when they appear.
async fn watch_directory(
    mut directory: Directory,
    poll: std::time::Duration,
    snapshots: watch::Sender<Arc<Snapshot>>,
) {
    let mut model: Option<MeshConfig> = None;
    let mut reported: Vec<String> = Vec::new();
    let mut version = 0;
    let mut ticker = tokio::time::interval(poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let mut problems = Vec::new();
        match directory.reload() {
            Ok(errors) => problems.extend(
                errors
                    .iter()
                    .map(|e| format!("{e}; keeping the file's last good content")),
            ),
            Err(e) => problems.push(format!("{e}; keeping the last model")),
        }
        let translation = translate(&directory.resources());
        problems.extend(translation.skipped.iter().map(|s| format!("{s}; skipped")));
        for problem in problems.iter().filter(|p| !reported.contains(p)) {
            tracing::warn!(%problem, dir = %directory, "local source");
        }
        reported = problems;
        if model.as_ref() != Some(&translation.config) {
            version += 1;
            tracing::info!(
                version,
                workloads = translation.config.workloads.len(),
                services = translation.config.services.len(),
                "model changed"
            );
            snapshots.send_replace(Arc::new(Snapshot::new(version, &translation.config)));
            model = Some(translation.config);
        }
    }
}
