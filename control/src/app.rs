//! Wires `ambit-control` in local mode: the directory source, the translation and the
//! xDS server, on the CA's port.

use std::sync::Arc;

use ambit_core::model::MeshConfig;
use ambit_proto::xds::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::sync::watch;

use crate::config::Config;
use crate::directory::Directory;
use crate::placement::Placements;
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
    let placements = Arc::new(Placements::new(config.ca.trust_domain.clone()));
    let mut source = LocalSource {
        directory: Directory::new(&config.local_dir),
        placements: placements.clone(),
        snapshots,
        model: None,
        reported: Vec::new(),
        version: 0,
    };
    // The first read before serving: the CA authorizes node agents against its pods.
    source.step();
    let poll = config.poll;
    let watcher = tokio::spawn(async move {
        // Owns the snapshot sender: when it goes, every xDS stream ends, which lets the
        // server's graceful shutdown finish (a ztunnel's stream never ends by itself).
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            source.step();
        }
    });
    let result = ambit_ca::app::run_with(
        config.ca,
        Some(placements),
        |authenticators, routes| {
            routes.add_service(AggregatedDiscoveryServiceServer::new(XdsServer::new(
                snapshots_rx,
                authenticators.to_vec(),
            )));
        },
        on_listening,
        {
            let watcher = watcher.abort_handle();
            async move {
                shutdown.await;
                watcher.abort();
            }
        },
    )
    .await;
    watcher.abort();
    result
}

/// The directory source's state between reads.
struct LocalSource {
    directory: Directory,
    placements: Arc<Placements>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    model: Option<MeshConfig>,
    /// Problems already logged, so each is logged once, when it appears.
    reported: Vec<String>,
    version: u64,
}

impl LocalSource {
    /// Reads the directory, updates the placements, and publishes a snapshot if the
    /// model changed.
    fn step(&mut self) {
        let mut problems = Vec::new();
        match self.directory.reload() {
            Ok(errors) => problems.extend(
                errors
                    .iter()
                    .map(|e| format!("{e}; keeping the file's last good content")),
            ),
            Err(e) => problems.push(format!("{e}; keeping the last model")),
        }
        let resources = self.directory.resources();
        self.placements.update(&resources);
        let translation = translate(&resources);
        problems.extend(translation.skipped.iter().map(|s| format!("{s}; skipped")));
        for problem in problems.iter().filter(|p| !self.reported.contains(p)) {
            tracing::warn!(%problem, dir = %self.directory, "local source");
        }
        self.reported = problems;
        if self.model.as_ref() != Some(&translation.config) {
            self.version += 1;
            tracing::info!(
                version = self.version,
                workloads = translation.config.workloads.len(),
                services = translation.config.services.len(),
                "model changed"
            );
            self.snapshots
                .send_replace(Arc::new(Snapshot::new(self.version, &translation.config)));
            self.model = Some(translation.config);
        }
    }
}
