//! The pods this ztunnel serves, each from inside its own network namespace.
//!
//! When the node agent hands a pod over (`ambit_net::handoff`), ztunnel fetches the
//! pod's certificate (node-agent impersonation), then opens three listeners in the
//! pod's namespace: 15001 (outbound capture), 15006 (inbound plaintext, TPROXY) and
//! 15008 (inbound HBONE). Removing the pod closes them. The traffic paths themselves
//! are in [`crate::proxy`].
//!
//! # Upgrade
//! A new ztunnel takes a node over while the old one runs: the node agent sees the
//! new hand-off socket and hands every pod to it (`ambit-cni`'s `agent::ztunnel`), and
//! the new process opens the pods' listeners beside the old ones (`SO_REUSEPORT`),
//! and from then on the kernel gives it every new connection
//! (`ambit_net::netns::steer_to_newest`). Only once the agent's snapshot is served is
//! the new ztunnel ready. Then the old one, on SIGTERM, closes its listeners — by then
//! their queues are empty; a connection still queued moves to the new ones
//! (`net.ipv4.tcp_migrate_req`, set by the redirect rules where the kernel lets it) —
//! sends GOAWAY on its HBONE connections, and lets its open connections run to their
//! end or to `--drain-deadline`. No connection is refused or reset on the way.

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use ambit_core::hbone::HBONE_PORT;
use ambit_core::SpiffeId;
use ambit_net::handoff::HandoffHandler;
use ambit_net::hbone::pool::{HbonePool, MeshConnector, PoolConfig};
use ambit_net::netns::{ConnectOpts, ListenOpts, NetnsHandle};
use ambit_net::process::out_of_descriptors;
use ambit_net::redirect::{INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use ambit_net::tls::{self, CertSlot, ClientAuth};
use ambit_proto::handoff::WorkloadInfo;
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinHandle};

use crate::metrics::{RefusalLabels, Reporter};
use crate::proxy::{self, Shared};

/// One served pod.
#[derive(Debug)]
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub identity: SpiffeId,
    pub netns: NetnsHandle,
    pub pool: HbonePool<MeshConnector>,
    /// Accept loops and certificate rotation; aborted when the pod is removed.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The tasks of its open connections, aborted when it is removed.
    connections: ConnectionTasks,
}

/// A pod's open connections: each one's task, by a number of its own. Registered once
/// when the connection starts and removed when it ends, so that a connection's
/// per-wake-up work has nothing to do with its pod: an earlier version had every
/// connection's task also wait on one pod-wide `watch`, whose waiter list it locked at
/// every wake-up (per relayed message), all of the pod's connections contending for
/// that one lock across the worker threads.
#[derive(Debug, Clone)]
struct ConnectionTasks(Arc<Mutex<Connections>>);

#[derive(Debug)]
struct Connections {
    /// `None` once closed: connections starting then are closed at once.
    open: Option<HashMap<u64, AbortHandle>>,
    next: u64,
}

/// Takes a connection's task out of its [`ConnectionTasks`] when it ends.
struct Registered {
    tasks: ConnectionTasks,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut connections = self.tasks.lock();
        if let Some(open) = connections.open.as_mut() {
            open.remove(&self.id);
            // Give back what a burst of connections grew it to, once they are gone.
            if open.capacity() > 64 && open.len() * 4 < open.capacity() {
                open.shrink_to(open.len() * 2);
            }
        }
    }
}

impl ConnectionTasks {
    fn new() -> Self {
        ConnectionTasks(Arc::new(Mutex::new(Connections {
            open: Some(HashMap::new()),
            next: 0,
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `connection`, to be aborted by [`ConnectionTasks::close`]; after that,
    /// drops it unstarted (its sockets close).
    fn spawn(&self, connection: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut connections = self.lock();
        let id = connections.next;
        connections.next += 1;
        let Some(open) = connections.open.as_mut() else {
            return;
        };
        let registered = Registered {
            tasks: self.clone(),
            id,
        };
        // Registered while the lock is held: a task ending at once on another thread
        // waits for it, and then finds its entry to remove.
        let task = tokio::spawn(async move {
            let _registered = registered;
            connection.await;
        });
        open.insert(id, task.abort_handle());
    }

    /// Aborts every connection's task, and any spawned from now on.
    fn close(&self) {
        let open = self.lock().open.take();
        for task in open.into_iter().flat_map(HashMap::into_values) {
            task.abort();
        }
    }

    /// Connections running now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().open.as_ref().map_or(0, HashMap::len)
    }
}

impl Pod {
    /// Runs `connection` in a task of its own until it ends, or until the pod is
    /// removed: then its sockets are closed (the task is aborted), so the app sees its
    /// connection end cleanly while the pod's rules still steer its packets here (a
    /// connection left open would hang once the rules are gone: its packets would
    /// reach a peer that never had it). A pod already removed closes it at once.
    pub fn spawn_connection(
        &self,
        connection: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.connections.spawn(connection);
    }

    /// Closes the pod's open connections (it is removed; its listeners are stopped
    /// with [`Pod::stop`]).
    pub fn close_connections(&self) {
        self.connections.close();
    }

    /// Closes the pod's listeners; connections already open run to their end. The
    /// listeners close once their aborted tasks are dropped, soon after;
    /// [`Pod::stop_and_wait`] waits for that.
    pub fn stop(&self) {
        for t in self.lock_tasks().iter() {
            t.abort();
        }
    }

    /// [`Pod::stop`], returning once the listeners are closed, so that the pod's ports
    /// are free again (a pod handed over again right after its removal listens anew).
    pub async fn stop_and_wait(&self) {
        let tasks: Vec<_> = self.lock_tasks().drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.stop();
        // As when it is removed: none of its connections outlives it.
        self.close_connections();
    }
}

/// The registry of served pods; the hand-off protocol's handler.
#[derive(Debug, Clone)]
pub struct Pods {
    shared: Arc<Shared>,
    pods: Arc<Mutex<HashMap<String, Arc<Pod>>>>,
    /// True once a node agent's snapshot has been served.
    snapshot_served: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Pods {
    pub fn new(shared: Arc<Shared>) -> Self {
        Pods {
            shared,
            pods: Arc::default(),
            snapshot_served: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Becomes true once a node agent's snapshot has been served: this ztunnel serves
    /// every enrolled pod of the node (a new ztunnel is ready from then on).
    pub fn snapshot_served(&self) -> tokio::sync::watch::Receiver<bool> {
        self.snapshot_served.subscribe()
    }

    pub fn get(&self, uid: &str) -> Option<Arc<Pod>> {
        self.lock().get(uid).cloned()
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Pod>>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches the pod's certificate and opens its listeners; [`Pods::spawn_tasks`]
    /// serves them once the pod is in the map.
    async fn start(
        &self,
        uid: &str,
        info: &WorkloadInfo,
        netns: OwnedFd,
    ) -> Result<(Pod, Listening), String> {
        let shared = &self.shared;
        let name = format!("pod {}/{}", info.namespace, info.name);
        let netns =
            NetnsHandle::from_fd(netns, name.clone()).map_err(|e| format!("{name}: {e}"))?;
        let sa = if info.service_account.is_empty() {
            "default"
        } else {
            &info.service_account
        };
        let identity = SpiffeId::new(shared.trust_domain.clone(), &info.namespace, sa)
            .map_err(|e| format!("{name}: identity: {e}"))?;
        let cert = shared
            .certs
            .fetch(&identity)
            .await
            .map_err(|e| format!("{name}: {e}"))?;

        let listen = |addr: SocketAddr, transparent: bool| {
            let netns = netns.clone();
            async move {
                let opts = ListenOpts {
                    transparent,
                    // A new ztunnel listens beside the one it replaces, which then
                    // closes its listeners: no connection is refused in between
                    // (`upgrade` in the module docs).
                    reuse_port: true,
                    steer_to_newest: true,
                    ..ListenOpts::default()
                };
                netns.listen(addr, opts).await
            }
        };
        let mut listeners: Vec<(TcpListener, Role)> = Vec::new();
        // Outbound on loopback: the redirect rules TPROXY captured connections to it
        // whatever their destination, and a connection to the pod's own address on
        // 15001 must not reach it (ztunnel would take the pod's address for a
        // destination and send the connection back to itself).
        for (v4, v6, port, role, transparent) in [
            (
                Ipv4Addr::LOCALHOST,
                Ipv6Addr::LOCALHOST,
                OUTBOUND_PORT,
                Role::Outbound,
                true,
            ),
            (
                Ipv4Addr::UNSPECIFIED,
                Ipv6Addr::UNSPECIFIED,
                INBOUND_PLAINTEXT_PORT,
                Role::InboundPlaintext,
                true,
            ),
            (
                Ipv4Addr::UNSPECIFIED,
                Ipv6Addr::UNSPECIFIED,
                HBONE_PORT,
                Role::InboundHbone,
                false,
            ),
        ] {
            let listener = listen(SocketAddr::from((v4, port)), transparent)
                .await
                .map_err(|e| format!("{name}: {e}"))?;
            listeners.push((listener, role));
            // IPv6 where the pod has it; without it, the redirect rules drop IPv6.
            if let Ok(listener) = listen(SocketAddr::from((v6, port)), transparent).await {
                listeners.push((listener, role));
            }
        }

        let connect_ns = netns.clone();
        let pool = HbonePool::new(
            PoolConfig {
                settings: shared.settings,
                max_streams_per_connection: shared.settings.max_streams as usize,
                ..PoolConfig::default()
            },
            MeshConnector::with_tcp(move |addr| {
                let netns = connect_ns.clone();
                async move { netns.connect(addr, ConnectOpts::default()).await }
            }),
        );
        let slot = CertSlot::new(&cert);
        let server_tls = Arc::new(
            tls::server_config(
                slot.clone(),
                cert.roots(),
                ClientAuth::Required(shared.trust_domain.clone()),
            )
            .map_err(|e| format!("{name}: {e}"))?,
        );
        let pod = Pod {
            uid: uid.to_string(),
            name: info.name.clone(),
            namespace: info.namespace.clone(),
            identity: identity.clone(),
            netns,
            pool,
            tasks: Mutex::new(Vec::new()),
            connections: ConnectionTasks::new(),
        };
        Ok((
            pod,
            Listening {
                listeners,
                server_tls,
                slot,
            },
        ))
    }

    /// Serves the pod's listeners and rotates its certificate. Each accept loop holds
    /// the pod itself (weakly: the pod owns the loops), never a lookup by uid, so a
    /// connection already queued when the loop starts is served like any other.
    fn spawn_tasks(&self, pod: &Arc<Pod>, listening: Listening) -> Vec<JoinHandle<()>> {
        let Listening {
            listeners,
            server_tls,
            slot,
        } = listening;
        let mut tasks = Vec::new();
        for (listener, role) in listeners {
            let shared = self.shared.clone();
            let weak = Arc::downgrade(pod);
            let uid = pod.uid.clone();
            let server_tls = server_tls.clone();
            tasks.push(tokio::spawn(async move {
                let mut backoff = ACCEPT_BACKOFF_MIN;
                loop {
                    let (stream, peer) = match listener.accept().await {
                        Ok(c) => {
                            backoff = ACCEPT_BACKOFF_MIN;
                            c
                        }
                        Err(e) => {
                            // Out of file descriptors, typically: the connection stays
                            // queued in the backlog (not lost) until one is free. Back
                            // off rather than spin on the ready listener.
                            tracing::warn!(pod = %uid, ?role, error = %e, retry_in = ?backoff, "accept failed");
                            let reporter = match role {
                                Role::Outbound => Reporter::source,
                                Role::InboundPlaintext | Role::InboundHbone => {
                                    Reporter::destination
                                }
                            };
                            let reason = if out_of_descriptors(&e) {
                                "descriptors_exhausted"
                            } else {
                                "accept_failed"
                            };
                            let state = shared.model.borrow().state.clone();
                            shared.metrics.refused(&RefusalLabels::new(
                                reporter,
                                state.workload(&uid).map(|w| &**w),
                                reason,
                            ));
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                            continue;
                        }
                    };
                    let Some(pod) = weak.upgrade() else {
                        // Only while the pod is being dropped, which aborts this loop.
                        tracing::debug!(pod = %uid, ?role, "pod gone, listener closed");
                        return;
                    };
                    // No Nagle on any socket ztunnel relays through, as on the ones
                    // it opens (Envoy and Istio's ztunnel do the same): relayed bytes
                    // go out as they come, and on HBONE connections h2 already batches
                    // frames. With Nagle, a tunnel's small 200 waited for the peer's
                    // delayed ACK before its first data could follow: new connections/s
                    // through the mesh went from 0.29x to 0.41-0.45x of direct.
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let server_tls = server_tls.clone();
                    // The opening phase is boxed, and freed once the connection is
                    // open: an open connection's task holds only its small relay.
                    match role {
                        Role::Outbound => {
                            let task = proxy::ConnectionTask::new(proxy::open_outbound(
                                shared,
                                pod.clone(),
                                stream,
                                peer,
                            ));
                            pod.spawn_connection(task);
                        }
                        Role::InboundPlaintext => {
                            let task = proxy::ConnectionTask::new(proxy::open_inbound_plaintext(
                                shared,
                                pod.clone(),
                                stream,
                                peer,
                            ));
                            pod.spawn_connection(task);
                        }
                        Role::InboundHbone => {
                            let until = pod.clone();
                            until.spawn_connection(async move {
                                proxy::inbound_hbone(&shared, &pod, stream, peer, server_tls).await
                            });
                        }
                    }
                }
            }));
        }
        // Present the renewed certificate on new inbound handshakes, and verify peers
        // against the trust bundle that came with it (a root rotation adds or drops a
        // root there).
        let mut watch = self.shared.certs.watch(&pod.identity);
        let identity = pod.identity.clone();
        tasks.push(tokio::spawn(async move {
            let _slot = slot;
            while watch.changed().await.is_ok() {
                if let Some(cert) = watch.borrow_and_update().cert.clone() {
                    match server_tls.rotate(&cert) {
                        Ok(true) => tracing::info!(%identity, roots = cert.roots().len(), "trust bundle changed"),
                        Ok(false) => {}
                        Err(e) => tracing::error!(%identity, error = %e, "cannot trust the new bundle; keeping the current one"),
                    }
                }
            }
        }));
        tasks
    }
}

/// How long an accept loop waits after a failed `accept` (EMFILE), doubling up to
/// the most while it keeps failing.
const ACCEPT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// A started pod's listeners and TLS, until [`Pods::spawn_tasks`] serves them.
struct Listening {
    listeners: Vec<(TcpListener, Role)>,
    server_tls: Arc<tls::ServerTls>,
    slot: Arc<CertSlot>,
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Outbound,
    InboundPlaintext,
    InboundHbone,
}

impl HandoffHandler for Pods {
    async fn add(&self, uid: &str, info: &WorkloadInfo, netns: OwnedFd) -> Result<(), String> {
        if self.lock().contains_key(uid) {
            // Re-added (node agent restart without keep): the namespace is the same pod's.
            return Ok(());
        }
        let (pod, listening) = self.start(uid, info, netns).await?;
        let pod = Arc::new(pod);
        // In the map before its listeners are served: a connection queued in a
        // backlog is accepted at once, and everything it does finds the pod.
        self.lock().insert(uid.to_string(), pod.clone());
        let tasks = self.spawn_tasks(&pod, listening);
        *pod.lock_tasks() = tasks;
        self.shared.metrics.active_proxies.inc();
        self.shared.metrics.proxies_started.inc();
        tracing::info!(pod = %uid, identity = %pod.identity, "serving pod");
        Ok(())
    }

    async fn remove(&self, uid: &str) -> Result<(), String> {
        let removed = self.lock().remove(uid);
        if let Some(pod) = removed {
            pod.stop_and_wait().await;
            pod.close_connections();
            self.shared.metrics.active_proxies.dec();
            self.shared.metrics.proxies_stopped.inc();
            tracing::info!(pod = %uid, "no longer serving pod");
            // Other pods may share the identity; only forget the certificate when none do.
            let still_used = self.lock().values().any(|p| p.identity == pod.identity);
            if !still_used {
                self.shared.certs.forget(&pod.identity);
            }
        }
        Ok(())
    }

    fn served(&self) -> BTreeSet<String> {
        self.lock().keys().cloned().collect()
    }

    fn snapshot_complete(&self) {
        self.snapshot_served.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (bounded) until `done` holds, yielding to the runtime meanwhile.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "not within 10 s: {what}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ended_connections_are_forgotten_and_closing_ends_the_rest_and_later_ones() {
        let tasks = ConnectionTasks::new();
        // Ten that end at once, and three that would run for ever, each holding a
        // channel's sender: dropping the task drops it.
        for _ in 0..10 {
            tasks.spawn(async {});
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        for _ in 0..3 {
            let tx = tx.clone();
            tasks.spawn(async move {
                let _tx = tx;
                std::future::pending::<()>().await;
            });
        }
        drop(tx);
        until("the ten ended connections forgotten", || tasks.len() == 3).await;
        tasks.close();
        // Every sender is gone once the three tasks are dropped.
        tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("the open connections were not aborted");
        assert_eq!(tasks.len(), 0);
        // Closed: a connection starting now is dropped without running.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        tasks.spawn(async move {
            let _ = tx.send(()).await;
        });
        assert_eq!(rx.recv().await, None, "a connection ran after close");
    }
}
