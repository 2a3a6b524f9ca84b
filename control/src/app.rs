//! Wires `ambit-control`: a source (the Kubernetes API, or a local directory), the
//! translation, and the xDS server on the CA's port.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use ambit_ca::auth::{Authenticator, PeerCertificateAuthenticator};
use ambit_proto::xds::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use anyhow::Context;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::watch;

use crate::config::Config;
use crate::directory::Directory;
use crate::kubernetes::KubernetesSource;
use crate::placement::Placements;
use crate::publish::Publisher;
use crate::redirection::{RedirectionService, ReportSink, Reports};
use crate::resources::Resources;
use crate::token_review::TokenReviewAuthenticator;
use crate::xds::{Snapshot, XdsServer};
use ambit_proto::nodeagent::redirection_server::RedirectionServer;

/// Runs until `shutdown` completes: in local mode with `--local-dir`, else against the
/// cluster `kube::Config::infer` finds. `on_listening` gets the bound address.
pub async fn run(
    config: Config,
    on_listening: impl FnOnce(std::net::SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    match config.local_dir.clone() {
        Some(dir) => run_local(config, &dir, on_listening, shutdown).await,
        None => {
            let kube_config = kube::Config::infer()
                .await
                .context("no Kubernetes configuration (in-cluster, $KUBECONFIG or ~/.kube/config); pass --local-dir for local mode")?;
            tracing::info!(api_server = %kube_config.cluster_url, "watching the cluster");
            let client =
                kube::Client::try_from(kube_config).context("cannot build a Kubernetes client")?;
            run_kubernetes(config, client, on_listening, shutdown).await
        }
    }
}

/// Runs against the cluster behind `client`: its objects in, the CA's root in a Secret,
/// callers authenticated with TokenReview.
pub async fn run_kubernetes(
    config: Config,
    client: kube::Client,
    on_listening: impl FnOnce(std::net::SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let election = config.election()?;
    let (snapshots, snapshots_rx) = watch::channel(Arc::new(Snapshot::default()));
    let placements = Arc::new(Placements::new(config.ca.trust_domain.clone()));
    let mut publisher =
        Publisher::new(placements.clone(), snapshots).with_root_namespace(&config.root_namespace);
    let source = KubernetesSource::start(client.clone());
    let store = source.store().clone();
    // Nothing is served before every kind is listed: an empty model would withdraw
    // every workload from the ztunnels, an empty placement refuse every node agent.
    tokio::select! {
        _ = store.wait_synced() => {}
        _ = async {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                tracing::warn!(waiting_for = ?store.unsynced(), "still listing the cluster's objects");
            }
        } => {}
    }
    let (namespaces, namespaces_rx) = watch::channel(BTreeSet::new());
    let resources = store.snapshot();
    namespaces.send_replace(resources.namespaces.keys().cloned().collect());
    // Status conditions are written by their own task, so a slow API server delays
    // them, never a push.
    let (skipped_tx, skipped_rx) =
        watch::channel(publisher.publish(&resources, Vec::new(), "cluster"));

    // What runs each waypoint, applied by its own task too.
    let waypoint_pods = config.waypoint_pods();
    let (deploy_tx, deploy_rx) =
        watch::channel(crate::waypoint_deploy::objects(&resources, &waypoint_pods));

    let (material, location) = crate::cluster_ca::load_or_create(
        client.clone(),
        &config.ca.system_namespace,
        &config.ca.trust_domain,
        SystemTime::now(),
    )
    .await?;
    let now = SystemTime::now();
    let report_pods = placements.clone();
    let report_sink = ReportSink::Kubernetes(client.clone());
    let ca = ambit_ca::app::authority(&material, &config.ca, &location, now)?
        .with_placement(placements.clone());
    let placement: Arc<dyn ambit_core::certificate::WorkloadPlacement> = placements;
    let live = ambit_ca::live::LiveAuthority::new(
        material.clone(),
        ca,
        ambit_ca::app::builder(&config.ca, location.clone(), Some(placement)),
    );
    let mut authenticators: Vec<Arc<dyn Authenticator>> = Vec::new();
    authenticators.push(Arc::new(TokenReviewAuthenticator::new(
        client.clone(),
        config.ca.trust_domain.clone(),
        config.node_agent_accounts(),
        report_pods.clone(),
    )));
    if let Some(tokens) = ambit_ca::app::token_authenticator(&config.ca)? {
        authenticators.insert(0, tokens);
    }
    authenticators.push(Arc::new(PeerCertificateAuthenticator));

    let mut tasks = tokio::task::JoinSet::new();
    // Every replica serves xDS and the CA; only the Lease's holder writes to the
    // cluster: status conditions, waypoint objects, the root ConfigMaps and the
    // waypoint GatewayClass, each writer started afresh at every term.
    let (leading_tx, leading) = watch::channel(false);
    let (stop_election, election_stopped) = tokio::sync::oneshot::channel::<()>();
    let elector = crate::leader::Elector::new(client.clone(), election);
    // In a JoinSet, so it ends with this future even when that is dropped, not
    // stopped: then it does not release the Lease, as a killed process would not.
    let mut election_task = tokio::task::JoinSet::new();
    election_task.spawn(elector.run(leading_tx, async move {
        if election_stopped.await.is_err() {
            std::future::pending::<()>().await;
        }
    }));
    let bundle = bundle_of(&live);
    let writer = client.clone();
    tasks.spawn(crate::leader::while_leading(leading, move || {
        let mut writers = tokio::task::JoinSet::new();
        let mut status = crate::status::StatusWriter::new(writer.clone());
        let mut adopted = false;
        writers.spawn(apply_on_change(skipped_rx.clone(), async move |skipped| {
            // What an earlier leader wrote is this term's to keep or withdraw.
            if !adopted {
                status.adopt_existing().await;
                adopted = true;
            }
            status.update(&skipped).await;
        }));
        let mut deployer = crate::waypoint_deploy::Deployer::new(writer.clone());
        writers.spawn(apply_on_change(deploy_rx.clone(), async move |wanted| {
            deployer.update(wanted).await;
        }));
        writers.spawn(crate::cluster_ca::publish_root(
            writer.clone(),
            bundle.clone(),
            namespaces_rx.clone(),
        ));
        writers.spawn(crate::kubernetes::ensure_waypoint_class(writer.clone()));
        writers
    }));
    // The CA's Secret is read again: a plug-in `cacerts` changed there is taken without
    // a restart (or refused, naming the key, while the current CA keeps signing).
    tasks.spawn(crate::cluster_ca::reload_secret(
        client.clone(),
        config.ca.system_namespace.clone(),
        location,
        live.clone(),
        config.ca_reload,
    ));
    // Owns the snapshot sender: when it goes, every xDS stream ends (see run_local).
    let publishing = tasks.spawn(async move {
        let _source = source;
        loop {
            store.next_change().await;
            let resources = store.snapshot();
            namespaces.send_if_modified(|current| {
                let next: BTreeSet<String> = resources.namespaces.keys().cloned().collect();
                let changed = *current != next;
                *current = next;
                changed
            });
            let skipped = publisher.publish(&resources, Vec::new(), "cluster");
            let objects = crate::waypoint_deploy::objects(&resources, &waypoint_pods);
            deploy_tx.send_if_modified(|current| {
                let changed = *current != objects;
                *current = objects;
                changed
            });
            skipped_tx.send_if_modified(|current| {
                let changed = *current != skipped;
                *current = skipped;
                changed
            });
        }
    });
    let trust_domain = config.ca.trust_domain.clone();
    let result = ambit_ca::app::serve(
        config.ca,
        live,
        authenticators,
        control_routes(snapshots_rx, report_pods, report_sink, trust_domain),
        on_listening,
        async move {
            shutdown.await;
            publishing.abort();
        },
    )
    .await;
    // Released before the writers stop, so a standby takes over at its next retry.
    let _ = stop_election.send(());
    let _ = election_task.join_next().await;
    tasks.abort_all();
    result
}

/// The trust bundle of the CA `live` holds, following every replacement.
fn bundle_of(live: &ambit_ca::live::LiveAuthority) -> watch::Receiver<String> {
    let mut cas = live.subscribe();
    let (tx, rx) = watch::channel(cas.borrow_and_update().bundle_pem().to_owned());
    tokio::spawn(async move {
        while cas.changed().await.is_ok() {
            let bundle = cas.borrow_and_update().bundle_pem().to_owned();
            tx.send_if_modified(|current| {
                let changed = *current != bundle;
                *current = bundle;
                changed
            });
        }
    });
    rx
}

/// The control plane's own services on the CA's port, its callers authenticated as
/// the CA's: delta xDS serving `snapshots`, and the node agents' redirection reports
/// checked against `pods`.
fn control_routes(
    snapshots: watch::Receiver<Arc<Snapshot>>,
    pods: Arc<Placements>,
    sink: ReportSink,
    trust_domain: ambit_core::TrustDomain,
) -> impl FnOnce(&[Arc<dyn Authenticator>], &mut tonic::service::RoutesBuilder) {
    move |authenticators, routes| {
        routes.add_service(AggregatedDiscoveryServiceServer::new(
            XdsServer::new(snapshots, authenticators.to_vec()).with_trust_domain(trust_domain),
        ));
        routes.add_service(RedirectionServer::new(RedirectionService::new(
            authenticators.to_vec(),
            pods,
            sink,
        )));
    }
}

/// Runs in local mode on the directory `dir`: the CA's material in `--root-dir`,
/// callers authenticated by the `--tokens` file.
pub async fn run_local(
    config: Config,
    dir: &Path,
    on_listening: impl FnOnce(std::net::SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        dir.is_dir(),
        "--local-dir {}: not a directory",
        dir.display()
    );
    let (snapshots, snapshots_rx) = watch::channel(Arc::new(Snapshot::default()));
    let placements = Arc::new(Placements::new(config.ca.trust_domain.clone()));
    let state_dir = config.local_state_dir().context(
        "local mode keeps the node agents' redirection reports in --state-dir (default: --root-dir); give one",
    )?;
    let reports = Arc::new(Reports::load(&state_dir)?);
    tracing::info!(file = %state_dir.join(crate::redirection::REPORTS_FILE).display(), captured = reports.len(), "redirection reports loaded");
    let report_pods = placements.clone();
    let report_sink = ReportSink::Local(reports.clone());
    let mut source = LocalSource {
        directory: Directory::new(dir),
        publisher: Publisher::new(placements.clone(), snapshots)
            .with_root_namespace(&config.root_namespace),
        reports,
        last: None,
        status_file: config
            .local_status_file()
            .unwrap_or_else(|| state_dir.join("status.yaml")),
        last_status: None,
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
    let trust_domain = config.ca.trust_domain.clone();
    let result = ambit_ca::app::run_with(
        config.ca,
        Some(placements),
        control_routes(snapshots_rx, report_pods, report_sink, trust_domain),
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
    publisher: Publisher,
    /// Node agents' redirection reports, which stand in for the pod annotation.
    reports: Arc<Reports>,
    /// What was last published, so an unchanged directory is not translated again.
    last: Option<(Resources, Vec<String>)>,
    /// Where the objects' status goes (`--status-file`), and what was last written.
    status_file: PathBuf,
    last_status: Option<Vec<crate::status::Wanted>>,
}

impl LocalSource {
    /// Reads the directory and publishes what changed.
    fn step(&mut self) {
        let problems: Vec<String> = match self.directory.reload() {
            Ok(errors) => errors
                .iter()
                .map(|e| match e.fails_closed {
                    true => e.to_string(),
                    false => format!("{e}; keeping the file's last good content"),
                })
                .collect(),
            Err(e) => vec![format!("{e}; keeping the last model")],
        };
        let mut resources = self.directory.resources();
        self.reports.apply(&mut resources, problems.is_empty());
        let current = (resources, problems);
        if self.last.as_ref() == Some(&current) {
            return;
        }
        let wanted =
            self.publisher
                .publish(&current.0, current.1.clone(), &self.directory.to_string());
        self.last = Some(current);
        if self.last_status.as_ref() != Some(&wanted) {
            let now = Time(k8s_openapi::jiff::Timestamp::now());
            match write_atomically(
                &self.status_file,
                &crate::status::status_document(&wanted, now),
            ) {
                Ok(()) => self.last_status = Some(wanted),
                Err(e) => {
                    tracing::warn!(file = %self.status_file.display(), error = %e, "cannot write the objects' status")
                }
            }
        }
    }
}

/// Writes `text` to `path` through a temporary file beside it, so a reader never
/// sees half of it.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Writes what `rx` holds to the cluster with `apply`: now, whenever it changes, and
/// again every 30 s, so a write that failed is tried again. Ends with the sender.
async fn apply_on_change<T: Clone>(mut rx: watch::Receiver<T>, mut apply: impl AsyncFnMut(T)) {
    loop {
        let value = rx.borrow_and_update().clone();
        apply(value).await;
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
        }
    }
}
