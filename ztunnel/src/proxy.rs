//! The traffic paths of one pod: outbound (15001), inbound plaintext (15006) and
//! inbound HBONE (15008). Decisions come from `ambit_core` (`outbound::route`,
//! `inbound::local_target`); this module moves bytes and records metrics.
//!
//! Each accepted connection is one task ([`ConnectionTask`]): it first runs the opening
//! phase boxed (route, labels, pool checkout, CONNECT), then only the small relay future
//! [`Opened`], under 288 bytes so tokio's task cell is 384 bytes (tested). This is the
//! idle-memory budget.
//!
//! A connection is never accepted and then silently dropped: when its far end cannot
//! be opened (no route, a refusal, no file descriptor left) an HBONE CONNECT is
//! answered with its status and a plain TCP client gets a reset, never the clean end
//! of stream a finished exchange would give; both are counted in
//! `ambit_connections_refused_total` by reason, and, once its labels are known, in
//! Istio's `istio_tcp_connections_failed_total` with `response_flags` `DENY` or
//! `CONNECT`. Every connection's end is one access-log line (`crate::access_log`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use ambit_core::authz::{self, Denial};
use ambit_core::hbone::{Baggage, ConnectRefusal, Forwarded, HboneTarget, HostTarget, TraceParent};
use ambit_core::inbound::{client_source, local_target, resolve_host, waypoint_peer, PeerRole};
use ambit_core::model::{MeshState, Service, Workload};
use ambit_core::outbound::{route, OrigDst, OutboundRoute};
use ambit_core::SpiffeId;
use ambit_core::TrustDomain;
use ambit_net::cert_manager::CertificateManager;
use ambit_net::hbone::client::{OpenTunnel, OutboundRequest};
use ambit_net::hbone::pool::PoolKey;
use ambit_net::hbone::server::{serve_connection, InboundHandler, InboundRequest, TunnelOutcome};
use ambit_net::hbone::H2Settings;
use ambit_net::netns::{self, ConnectOpts};
use ambit_net::process::out_of_descriptors;
use ambit_net::relay::{relay_streams, relay_tunnel, StreamRelay, TunnelRelay};
use ambit_net::tls;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::access_log;
use crate::callers::{Caller, InboundCallers, Registration};
use crate::metrics::{
    ConnectionLabels, DenialLabels, Endpoints, Metrics, OpenConnection, PeerLabels, RefusalLabels,
    Reporter, ResponseFlags, SecurityPolicy,
};
use crate::model_file::ModelSnapshot;
use crate::open_inbound::{self, AppSocket, OpenInbounds};
use crate::pods::Pod;

/// What every pod's traffic paths share.
#[derive(Debug)]
pub struct Shared {
    pub node: String,
    pub cluster: String,
    pub trust_domain: TrustDomain,
    pub model: watch::Receiver<ModelSnapshot>,
    pub certs: Arc<CertificateManager>,
    pub metrics: Arc<Metrics>,
    pub settings: H2Settings,
    /// Round-robin counter for picking service endpoints.
    pub picks: AtomicU64,
    /// Connections being proxied now (for draining).
    pub active: AtomicU64,
    /// Notified each time `active` drops to zero.
    pub none_active: tokio::sync::Notify,
    /// Becomes true when ztunnel starts draining.
    pub draining: watch::Receiver<bool>,
    /// Who opened each open inbound tunnel, for the admin endpoint.
    pub callers: Arc<InboundCallers>,
    /// Open inbound connections, closed when a policy change denies them.
    pub open_inbound: Arc<OpenInbounds>,
}

/// Decides an inbound connection to `workload` (its app at `destination`) from
/// `peer` (none: plaintext) at `source`, against the policies that apply to it, and
/// logs what decided it. `Err` is the denial, counted.
pub fn authorize(
    shared: &Shared,
    state: &MeshState,
    workload: &Workload,
    peer: Option<&SpiffeId>,
    source: SocketAddr,
    destination: SocketAddr,
    when: &str,
) -> Result<(), Denial> {
    let connection = authz::Connection {
        peer,
        source_ip: source.ip(),
        destination_ip: destination.ip(),
        destination_port: destination.port(),
    };
    let verdict = authz::evaluate(state.policies_for(&workload.spec), &connection);
    let peer_text = || peer.map_or_else(|| "none (plaintext)".to_owned(), ToString::to_string);
    for (policy, action) in &verdict.dry_run_matches {
        tracing::info!(pod = %workload.spec.uid, peer = %peer_text(), src = %source, dst = %destination, %policy, ?action, "dry-run policy matched; not enforced");
    }
    for policy in &verdict.audited_by {
        tracing::info!(pod = %workload.spec.uid, peer = %peer_text(), src = %source, dst = %destination, %policy, "audited (AUDIT policy matched)");
    }
    match verdict.decision {
        Ok(()) => {
            if let Some(policy) = &verdict.allowed_by {
                tracing::debug!(pod = %workload.spec.uid, peer = %peer_text(), src = %source, dst = %destination, %policy, "allowed by policy");
            }
            Ok(())
        }
        Err(denial) => {
            let (policy, reason) = match &denial {
                Denial::Denied { policy } => (policy.clone(), "denied"),
                Denial::Custom { policy } => (policy.clone(), "custom"),
                Denial::NotAllowed => (String::new(), "not_allowed"),
            };
            if when == "connect" {
                tracing::info!(pod = %workload.spec.uid, peer = %peer_text(), src = %source, dst = %destination, %denial, "connection denied by authorization policy");
            }
            shared.metrics.denied(&DenialLabels {
                destination_workload_namespace: workload.spec.namespace.clone(),
                destination_workload: workload.spec.name.clone(),
                policy,
                reason: reason.to_owned(),
                when: when.to_owned(),
            });
            Err(denial)
        }
    }
}

/// Counts a connection refused because of its target's waypoint, with the waypoint as
/// the deciding `policy`: a metric that names the waypoint.
fn waypoint_refused(shared: &Shared, workload: &Workload, refusal: &ConnectRefusal) {
    let waypoint = match refusal {
        ConnectRefusal::WrongWaypoint { waypoint, .. }
        | ConnectRefusal::BypassesWaypoint { waypoint, .. } => waypoint.clone(),
        _ => String::new(),
    };
    shared.metrics.denied(&DenialLabels {
        destination_workload_namespace: workload.spec.namespace.clone(),
        destination_workload: workload.spec.name.clone(),
        policy: format!("waypoint/{waypoint}"),
        reason: refusal.reason().to_owned(),
        when: "connect".to_owned(),
    });
}

/// Closes the open inbound connections the current policies deny; run on every model
/// change.
pub fn close_denied(shared: &Shared, state: &MeshState) -> usize {
    shared.open_inbound.close_denied(|open| {
        let workload = state.workload(&open.pod)?;
        // A target newly bound to a waypoint that enforces policy keeps only the
        // waypoint's connections.
        let target = ambit_core::hbone::HboneTarget::new(open.destination);
        if let Err(refusal) = waypoint_peer(state, workload, open.peer.as_ref(), target) {
            return Some(refusal.to_string());
        }
        authorize(
            shared,
            state,
            workload,
            open.peer.as_ref(),
            open.source,
            open.destination,
            "late",
        )
        .err()
        .map(|d| d.to_string())
    })
}

impl Shared {
    /// Completes once no connection is being proxied.
    pub async fn all_closed(&self) {
        loop {
            // Registered before the check, so a drop to zero in between is not missed.
            let notified = self.none_active.notified();
            if self.active.load(Ordering::Relaxed) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Completes once ztunnel drains.
    pub fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut draining = self.draining.clone();
        async move {
            // An error means the sender is gone: ztunnel is stopping anyway.
            let _ = draining.wait_for(|d| *d).await;
        }
    }
}

/// Counts an accepted socket as active (for draining) and open
/// (`istio_tcp_sockets_open`) while alive.
#[derive(Debug)]
struct Active {
    shared: Arc<Shared>,
    sockets: prometheus_client::metrics::gauge::Gauge,
}

impl Active {
    fn new(shared: &Arc<Shared>, reporter: Reporter) -> Self {
        shared.active.fetch_add(1, Ordering::Relaxed);
        let sockets = shared.metrics.sockets(reporter);
        sockets.inc();
        Active {
            shared: shared.clone(),
            sockets,
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.sockets.dec();
        if self.shared.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.shared.none_active.notify_waiters();
        }
    }
}

/// A proxied connection whose far end is open: a future relaying until the connection
/// ends, then counting it closed. It is what an open connection's task holds for the
/// connection's whole (often mostly idle) life, so it is kept small; deciding and
/// opening hold far more (labels, requests, handshakes) and run before, boxed.
#[derive(Debug)]
pub struct Opened {
    relay: Relay,
    metrics: OpenConnection,
    _active: Active,
}

#[derive(Debug)]
enum Relay {
    Hbone {
        relay: TunnelRelay<TcpStream>,
        _open: OpenTunnel,
    },
    /// Outbound passthrough: plaintext to a destination outside the mesh.
    Passthrough {
        relay: StreamRelay<TcpStream, TcpStream>,
    },
    /// Inbound plaintext, with its registration for late rejection.
    Plain {
        relay: StreamRelay<TcpStream, AppSocket>,
        _open: open_inbound::Registration,
    },
}

/// An accepted connection's task: opening, boxed because it holds much but briefly,
/// then relaying, small, for the connection's life. Written out rather than an
/// `async` block, whose state would keep room for both phases at once.
#[expect(
    clippy::large_enum_variant,
    reason = "the task lives in `Open`; boxing it would add an allocation per connection"
)]
pub enum ConnectionTask {
    Opening(Pin<Box<dyn Future<Output = Option<Opened>> + Send>>),
    Open(Opened),
    Done,
}

impl std::fmt::Debug for ConnectionTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectionTask::Opening(_) => f.write_str("Opening"),
            ConnectionTask::Open(opened) => f.debug_tuple("Open").field(opened).finish(),
            ConnectionTask::Done => f.write_str("Done"),
        }
    }
}

impl ConnectionTask {
    pub fn new(open: impl Future<Output = Option<Opened>> + Send + 'static) -> Self {
        ConnectionTask::Opening(Box::pin(open))
    }
}

impl Future for ConnectionTask {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut *self {
                ConnectionTask::Opening(open) => match ready!(open.as_mut().poll(cx)) {
                    Some(opened) => *self = ConnectionTask::Open(opened),
                    None => *self = ConnectionTask::Done,
                },
                ConnectionTask::Open(opened) => {
                    ready!(Pin::new(opened).poll(cx));
                    *self = ConnectionTask::Done;
                }
                ConnectionTask::Done => return Poll::Ready(()),
            }
        }
    }
}

impl Future for Opened {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let relayed = match &mut this.relay {
            Relay::Hbone { relay, .. } => ready!(Pin::new(relay).poll(cx)),
            Relay::Passthrough { relay } => ready!(Pin::new(relay).poll(cx)),
            Relay::Plain { relay, .. } => ready!(Pin::new(relay).poll(cx)),
        };
        let error = relayed.error.as_ref().map(ToString::to_string);
        this.metrics
            .closed(relayed.forward, relayed.backward, error.as_deref());
        Poll::Ready(())
    }
}

fn workload_labels(shared: &Shared, w: Option<&Arc<Workload>>) -> PeerLabels {
    w.map(|w| PeerLabels::from_workload(w, &shared.cluster))
        .unwrap_or_else(PeerLabels::unknown)
}

/// The service an inbound connection to `workload` is reported under: the one the
/// client addressed (the HBONE `forwarded` header's `host`), when `workload` is one of
/// its endpoints, else the first service `workload` belongs to.
fn inbound_service<'a>(
    state: &'a MeshState,
    workload: &Workload,
    host: Option<&str>,
) -> Option<&'a Service> {
    let services = state.services_of(&workload.spec.uid);
    host.and_then(|h| services.iter().find(|s| s.hostname == h))
        .or_else(|| services.first())
        .map(|s| &**s)
}

/// Refuses an accepted TCP connection before it carried data: counted, and reset, so
/// the client sees a refusal (`ECONNRESET`), not the end of stream of a finished
/// exchange. Plain TCP has no other way to say no.
fn refuse(
    shared: &Shared,
    client: TcpStream,
    reporter: Reporter,
    destination: Option<&Workload>,
    reason: &str,
) -> Option<Opened> {
    shared
        .metrics
        .refused(&RefusalLabels::new(reporter, destination, reason));
    // Zero linger: the close sends RST at once and never blocks.
    let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
    drop(client);
    None
}

/// The reason label of a failure to open a connection's far end: running out of
/// descriptors is told apart, since it is ztunnel's own limit and not the far side.
fn open_failure(
    error: &(dyn std::error::Error + 'static),
    otherwise: &'static str,
) -> &'static str {
    if out_of_descriptors(error) {
        "descriptors_exhausted"
    } else {
        otherwise
    }
}

fn random_trace() -> TraceParent {
    TraceParent::from_random(rand::random(), rand::random())
}

/// Decides and opens the far end of an outbound connection captured on 15001.
pub async fn open_outbound(
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    client: TcpStream,
    peer: SocketAddr,
) -> Option<Opened> {
    let start = Instant::now();
    let active = Active::new(&shared, Reporter::source);
    let shared = &*shared;
    let orig = match netns::original_dst(&client) {
        Ok(addr) => addr,
        Err(e) => {
            let local = client.local_addr().unwrap_or(peer);
            access_log::early_failure(peer, local, Reporter::source, &format!("not captured: {e}"));
            return refuse(shared, client, Reporter::source, None, "not_captured");
        }
    };
    let state = shared.model.borrow().state.clone();
    let pick = shared.picks.fetch_add(1, Ordering::Relaxed);
    let decided = match route(&state, OrigDst(orig), pick) {
        Ok(r) => r,
        Err(e) => {
            // A waypoint's refusal names it: the destination is never reached around it.
            tracing::info!(pod = %pod.uid, dst = %orig, reason = e.reason(), waypoint = %e.waypoint().unwrap_or_default(), error = %e, "outbound connection refused");
            access_log::early_failure(peer, orig, Reporter::source, &e.to_string());
            return refuse(shared, client, Reporter::source, None, e.reason());
        }
    };
    let source_workload = state.workload(&pod.uid);
    let source = workload_labels(shared, source_workload);
    match decided {
        OutboundRoute::Hbone(path) => {
            // Both ends prove these identities in the mutual TLS handshake: the pod's
            // certificate, and the one the destination must present.
            let labels = ConnectionLabels::new(
                Reporter::source,
                &source.proven(&pod.identity),
                &workload_labels(shared, Some(&path.workload)).proven(&path.identity),
                path.service.as_deref(),
                SecurityPolicy::mutual_tls,
            );
            let endpoints = Endpoints {
                src: peer,
                dst: path.hbone_addr,
                hbone: Some(path.target.addr()),
                src_pod: source_workload.cloned(),
                dst_pod: Some(path.workload.clone()),
            };
            let Some(cert) = shared.certs.cached(&pod.identity) else {
                tracing::warn!(pod = %pod.uid, "no valid certificate; refusing outbound connection");
                shared.metrics.connection_failed(
                    &labels,
                    ResponseFlags::Connect,
                    &endpoints,
                    start,
                    "no valid certificate for the source pod",
                );
                return refuse(
                    shared,
                    client,
                    Reporter::source,
                    Some(&*path.workload),
                    "no_certificate",
                );
            };
            let key = PoolKey {
                source: pod.identity.clone(),
                destination: [path.identity.clone()].into_iter().collect(),
                addr: path.hbone_addr,
            };
            let baggage = Baggage {
                cluster: Some(shared.cluster.clone()),
                namespace: Some(pod.namespace.clone()),
                workload: source_workload.map(|w| {
                    (
                        w.spec
                            .workload_kind
                            .clone()
                            .unwrap_or_else(|| "pod".into())
                            .to_lowercase(),
                        w.spec
                            .workload_name
                            .clone()
                            .unwrap_or_else(|| w.spec.name.clone()),
                    )
                }),
                service: source_workload.and_then(|w| w.spec.canonical_name.clone()),
                version: source_workload.and_then(|w| w.spec.canonical_revision.clone()),
            };
            let request = OutboundRequest {
                target: path.target,
                forwarded: Forwarded {
                    for_addr: peer,
                    host: path.service.as_ref().map(|s| s.hostname.clone()),
                },
                baggage,
                traceparent: Some(random_trace()),
            };
            let tunnel = match pod.pool.connect(&key, &cert, &request).await {
                Ok(t) => t,
                Err(e) => {
                    let reason = open_failure(&e, e.reason());
                    tracing::warn!(pod = %pod.uid, dst = %orig, expected = %path.identity, waypoint = %path.waypoint.as_deref().unwrap_or_default(), reason, error = %e, "HBONE connection failed; connection reset");
                    // A refusal by the destination's policy is Istio's DENY.
                    let flags = if e.reason() == "denied" {
                        ResponseFlags::Deny
                    } else {
                        ResponseFlags::Connect
                    };
                    shared.metrics.connection_failed(
                        &labels,
                        flags,
                        &endpoints,
                        start,
                        &e.to_string(),
                    );
                    return refuse(
                        shared,
                        client,
                        Reporter::source,
                        Some(&*path.workload),
                        reason,
                    );
                }
            };
            Some(Opened {
                metrics: shared.metrics.connection_opened(&labels, endpoints),
                relay: Relay::Hbone {
                    relay: relay_tunnel(client, tunnel.stream),
                    _open: tunnel.open,
                },
                _active: active,
            })
        }
        OutboundRoute::Passthrough {
            dst,
            workload,
            service,
        } => {
            // Plaintext: neither end proved an identity.
            let destination = workload_labels(shared, workload.as_ref());
            let labels = ConnectionLabels::new(
                Reporter::source,
                &source,
                &destination,
                service.as_deref(),
                SecurityPolicy::unknown,
            );
            let endpoints = Endpoints {
                src: peer,
                dst,
                hbone: None,
                src_pod: source_workload.cloned(),
                dst_pod: workload.clone(),
            };
            let upstream = match pod.netns.connect(dst, ConnectOpts::default()).await {
                Ok(s) => s,
                Err(e) => {
                    let reason = open_failure(&e, "passthrough_connect_failed");
                    tracing::info!(pod = %pod.uid, %dst, reason, error = %e, "passthrough connect failed; connection reset");
                    shared.metrics.connection_failed(
                        &labels,
                        ResponseFlags::Connect,
                        &endpoints,
                        start,
                        &e.to_string(),
                    );
                    return refuse(
                        shared,
                        client,
                        Reporter::source,
                        workload.as_deref(),
                        reason,
                    );
                }
            };
            Some(Opened {
                metrics: shared.metrics.connection_opened(&labels, endpoints),
                relay: Relay::Passthrough {
                    relay: relay_streams(client, upstream),
                },
                _active: active,
            })
        }
    }
}

/// Connects to the app in `pod` from `source`'s address (IP_TRANSPARENT), so the app sees
/// the real client.
async fn connect_app(
    pod: &Pod,
    target: SocketAddr,
    source: SocketAddr,
) -> std::io::Result<TcpStream> {
    let opts = ConnectOpts {
        bind_source: Some(SocketAddr::new(source.ip(), 0)),
        ..ConnectOpts::default()
    };
    pod.netns.connect(target, opts).await
}

/// An inbound plaintext connection TPROXYed to 15006 (a client outside the mesh).
pub async fn open_inbound_plaintext(
    shared: Arc<Shared>,
    pod: Arc<Pod>,
    client: TcpStream,
    peer: SocketAddr,
) -> Option<Opened> {
    let start = Instant::now();
    let active = Active::new(&shared, Reporter::destination);
    let (shared, pod) = (&*shared, &pod);
    // With TPROXY the accepted socket's local address is the original destination.
    let Ok(dst) = client.local_addr() else {
        return refuse(
            shared,
            client,
            Reporter::destination,
            None,
            "no_local_address",
        );
    };
    let state = shared.model.borrow().state.clone();
    let target = ambit_core::hbone::HboneTarget::new(dst);
    let workload = match local_target(&state, &shared.node, |uid| uid == pod.uid, target) {
        Ok(w) => w.clone(),
        Err(e) => {
            tracing::info!(pod = %pod.uid, %peer, %dst, error = %e, "inbound plaintext connection refused");
            access_log::early_failure(peer, dst, Reporter::destination, &e.to_string());
            return refuse(shared, client, Reporter::destination, None, e.reason());
        }
    };
    if let Err(refusal) = waypoint_peer(&state, &workload, None, target) {
        waypoint_refused(shared, &workload, &refusal);
        tracing::info!(pod = %pod.uid, %peer, %dst, reason = refusal.reason(), error = %refusal, "inbound plaintext connection refused");
        access_log::early_failure(peer, dst, Reporter::destination, &refusal.to_string());
        return refuse(
            shared,
            client,
            Reporter::destination,
            Some(&*workload),
            refusal.reason(),
        );
    }
    // Plaintext: no principal on either side, whatever the model says the client
    // runs as; it proved nothing.
    let source_workload = state.workload_by_ip(peer.ip());
    let labels = ConnectionLabels::new(
        Reporter::destination,
        &workload_labels(shared, source_workload),
        &workload_labels(shared, Some(&workload)),
        inbound_service(&state, &workload, None),
        SecurityPolicy::unknown,
    );
    let endpoints = Endpoints {
        src: peer,
        dst,
        hbone: None,
        src_pod: source_workload.cloned(),
        dst_pod: Some(workload.clone()),
    };
    if let Err(denial) = authorize(shared, &state, &workload, None, peer, dst, "connect") {
        shared.metrics.connection_failed(
            &labels,
            ResponseFlags::Deny,
            &endpoints,
            start,
            &denial.to_string(),
        );
        // A reset is the answer: plaintext has no way to say why.
        return refuse(
            shared,
            client,
            Reporter::destination,
            Some(&*workload),
            "denied",
        );
    }
    let app = match connect_app(pod, dst, peer).await {
        Ok(s) => s,
        Err(e) => {
            let reason = open_failure(&e, "upstream_connect_failed");
            tracing::info!(pod = %pod.uid, %dst, reason, error = %e, "connect to app failed; connection reset");
            shared.metrics.connection_failed(
                &labels,
                ResponseFlags::Connect,
                &endpoints,
                start,
                &e.to_string(),
            );
            return refuse(
                shared,
                client,
                Reporter::destination,
                Some(&*workload),
                reason,
            );
        }
    };
    let (app, registration) = shared.open_inbound.register(&pod.uid, None, peer, dst, app);
    Some(Opened {
        metrics: shared.metrics.connection_opened(&labels, endpoints),
        relay: Relay::Plain {
            relay: relay_streams(client, app),
            _open: registration,
        },
        _active: active,
    })
}

/// An inbound HBONE connection on 15008: mutual TLS as the pod, then tunnels.
pub async fn inbound_hbone(
    shared: &Arc<Shared>,
    pod: &Arc<Pod>,
    stream: TcpStream,
    peer: SocketAddr,
    server_tls: Arc<ambit_net::tls::ServerTls>,
) {
    let _active = Active::new(shared, Reporter::destination);
    let handshake_refused = |reason: &str| {
        let state = shared.model.borrow().state.clone();
        shared.metrics.refused(&RefusalLabels::new(
            Reporter::destination,
            state.workload(&pod.uid).map(|w| &**w),
            reason,
        ));
    };
    let tls_stream = match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        server_tls.accept(stream),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(pod = %pod.uid, %peer, error = %e, "inbound HBONE handshake failed");
            handshake_refused("tls_handshake_failed");
            return;
        }
        Err(_) => {
            tracing::info!(pod = %pod.uid, %peer, "inbound HBONE handshake timed out");
            handshake_refused("tls_handshake_timeout");
            return;
        }
    };
    let Some(client_id) = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| tls::identity_of(c).ok())
    else {
        // The verifier already demands an identity; this is a second line.
        tracing::warn!(pod = %pod.uid, %peer, "inbound HBONE client presented no SPIFFE identity; closing");
        handshake_refused("no_peer_identity");
        return;
    };
    let handler = PodInbound {
        shared: shared.clone(),
        pod: pod.clone(),
    };
    // Draining sends GOAWAY: peers open their next tunnels elsewhere, and the
    // connection ends with its last open tunnel.
    let drained = shared.drained();
    match serve_connection(
        tls_stream,
        client_id,
        peer,
        shared.settings,
        handler,
        drained,
    )
    .await
    {
        // Before any CONNECT: a refusal like a failed handshake.
        Ok(ended @ ambit_net::hbone::server::Ended::NoPreface) => {
            handshake_refused(ended.reason().unwrap_or_default());
        }
        Ok(ended) => {
            if let Some(reason) = ended.reason() {
                shared.metrics.hbone_dropped(Reporter::destination, reason);
            }
        }
        Err(e) => {
            tracing::debug!(pod = %pod.uid, %peer, error = %e, "inbound HBONE connection ended");
        }
    }
}

/// Opens the app connection for each accepted CONNECT and records the outcome.
#[derive(Clone)]
struct PodInbound {
    shared: Arc<Shared>,
    pod: Arc<Pod>,
}

impl PodInbound {
    /// The tunnel's labels and access-log endpoints.
    fn labels(&self, request: &InboundRequest) -> (ConnectionLabels, Endpoints) {
        let state = self.shared.model.borrow().state.clone();
        // Labels follow the same rule as the app connection: a claimed address counts
        // only when it belongs to the peer's identity.
        let client = client_source(
            &state,
            &request.peer,
            request.peer_addr,
            request.forwarded.as_ref(),
        )
        .0;
        let source_workload = state.workload_by_ip(client.ip());
        let source = match source_workload {
            Some(w) => PeerLabels::from_workload(w, &self.shared.cluster),
            None => PeerLabels::from_baggage(&request.baggage),
        };
        let destination_workload = state.workload(&self.pod.uid);
        let service = destination_workload.and_then(|w| {
            // A host-name CONNECT names its service itself (double HBONE).
            let host = request
                .host
                .as_ref()
                .map(|h| h.hostname())
                .or(request.forwarded.as_ref().and_then(|f| f.host.as_deref()));
            inbound_service(&state, w, host)
        });
        // The principals are the identities of the handshake: the peer's certificate,
        // and the pod's own, which this ztunnel presented.
        let labels = ConnectionLabels::new(
            Reporter::destination,
            &source.proven(&request.peer),
            &workload_labels(&self.shared, destination_workload).proven(&self.pod.identity),
            service,
            SecurityPolicy::mutual_tls,
        );
        let endpoints = Endpoints {
            src: client,
            dst: request.target.addr(),
            hbone: Some(request.target.addr()),
            src_pod: source_workload.cloned(),
            dst_pod: destination_workload.cloned(),
        };
        (labels, endpoints)
    }
}

/// What an open inbound tunnel keeps: its counters, and its caller's registration,
/// which also holds what its closing log names.
struct InboundTunnel {
    metrics: OpenConnection,
    caller: Registration,
    _open: open_inbound::Registration,
}

impl InboundHandler for PodInbound {
    type Upstream = AppSocket;
    type Tunnel = InboundTunnel;

    async fn connect(
        &self,
        request: &InboundRequest,
    ) -> Result<(AppSocket, InboundTunnel), ConnectRefusal> {
        let state = self.shared.model.borrow().state.clone();
        let workload = local_target(
            &state,
            &self.shared.node,
            |uid| uid == self.pod.uid,
            request.target,
        )?
        .clone();
        let role = waypoint_peer(&state, &workload, Some(&request.peer), request.target)
            .inspect_err(|refusal| waypoint_refused(&self.shared, &workload, refusal))?;
        let (source, honoured) = client_source(
            &state,
            &request.peer,
            request.peer_addr,
            request.forwarded.as_ref(),
        );
        // A waypoint forwards another workload's address, which is not its own: the
        // app and the policy see the waypoint (decision record 0011), expectedly.
        if !honoured && role == PeerRole::Direct {
            tracing::warn!(
                pod = %self.pod.uid,
                peer = %request.peer,
                claimed = ?request.forwarded.as_ref().map(|f| f.for_addr),
                using = %source,
                "forwarded address does not belong to the peer's identity; connecting from the connection's address"
            );
        }
        authorize(
            &self.shared,
            &state,
            &workload,
            Some(&request.peer),
            source,
            request.target.addr(),
            "connect",
        )
        .map_err(|denial| ConnectRefusal::Denied {
            policy: denial.to_string(),
        })?;
        let app = connect_app(&self.pod, request.target.addr(), source)
            .await
            .map_err(|e| {
                if out_of_descriptors(&e) {
                    ConnectRefusal::OutOfDescriptors {
                        target: request.target,
                        reason: e.to_string(),
                    }
                } else {
                    ConnectRefusal::UpstreamConnect {
                        target: request.target,
                        reason: e.to_string(),
                    }
                }
            })?;
        let (app, open) = self.shared.open_inbound.register(
            &self.pod.uid,
            Some(request.peer.clone()),
            source,
            request.target.addr(),
            app,
        );
        let (labels, endpoints) = self.labels(request);
        let metrics = self.shared.metrics.connection_opened(&labels, endpoints);
        // Registered before the CONNECT is answered, so before the client's first byte
        // can reach the app: an app asking who called after reading finds the caller.
        let caller = self.shared.callers.register(Caller {
            client: app.local_addr().unwrap_or(source),
            app: request.target.addr(),
            identity: request.peer.clone(),
        });
        Ok((
            app,
            InboundTunnel {
                metrics,
                caller,
                _open: open,
            },
        ))
    }

    fn finished(&self, tunnel: InboundTunnel, outcome: TunnelOutcome) {
        tunnel.metrics.closed(
            outcome.bytes_in,
            outcome.bytes_out,
            outcome.error.as_deref(),
        );
        tunnel.caller.finish();
    }

    /// Istio's double HBONE: the service host name and port, resolved to this pod's
    /// port for it (`ambit_core::inbound::resolve_host`).
    fn resolve_host(
        &self,
        host: &HostTarget,
        peer_addr: SocketAddr,
    ) -> Result<HboneTarget, ConnectRefusal> {
        let state = self.shared.model.borrow().state.clone();
        let workload =
            state
                .workload(&self.pod.uid)
                .ok_or_else(|| ConnectRefusal::UnknownHost {
                    host: host.clone(),
                    reason: format!("pod {} is not in the model", self.pod.uid),
                })?;
        resolve_host(&state, workload, peer_addr.ip(), host)
    }

    fn refused(&self, request: Option<&InboundRequest>, refusal: &ConnectRefusal) {
        let peer = request.map(|r| r.peer.to_string()).unwrap_or_default();
        if matches!(refusal, ConnectRefusal::OutOfDescriptors { .. }) {
            tracing::warn!(pod = %self.pod.uid, %peer, status = refusal.status(), reason = refusal.reason(), error = %refusal, "inbound HBONE CONNECT refused: ztunnel is out of file descriptors");
        } else {
            tracing::info!(pod = %self.pod.uid, %peer, status = refusal.status(), reason = refusal.reason(), error = %refusal, "inbound HBONE CONNECT refused");
        }
        // Once the target is known to be this pod's, the refusal is a failed
        // connection with Istio's labels: DENY for policy, CONNECT for the app.
        let flags = match refusal {
            ConnectRefusal::Denied { .. } => Some(ResponseFlags::Deny),
            ConnectRefusal::UpstreamConnect { .. } | ConnectRefusal::OutOfDescriptors { .. } => {
                Some(ResponseFlags::Connect)
            }
            _ => None,
        };
        match (request, flags) {
            (Some(request), Some(flags)) => {
                let (labels, endpoints) = self.labels(request);
                self.shared.metrics.connection_failed(
                    &labels,
                    flags,
                    &endpoints,
                    Instant::now(),
                    &refusal.to_string(),
                );
            }
            (Some(request), None) => access_log::early_failure(
                request.peer_addr,
                request.target.addr(),
                Reporter::destination,
                &refusal.to_string(),
            ),
            (None, _) => {}
        }
        let state = self.shared.model.borrow().state.clone();
        self.shared.metrics.refused(&RefusalLabels::new(
            Reporter::destination,
            state.workload(&self.pod.uid).map(|w| &**w),
            refusal.reason(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An open connection's task is what an idle connection costs, with h2's stream
    /// state and the socket's registration. Tokio rounds a task to 128 bytes, 96 of
    /// them its own header and trailer: up to 288 bytes of future keep it at 384.
    #[test]
    fn an_open_connection_stays_small() {
        let size = std::mem::size_of::<ConnectionTask>();
        assert!(size <= 288, "ConnectionTask grew to {size} bytes");
    }

    /// Every open inbound tunnel holds one; `ambit_net`'s tunnel task is sized for 80.
    #[test]
    fn an_inbound_tunnel_keeps_at_most_80_bytes() {
        let size = std::mem::size_of::<InboundTunnel>();
        assert!(size <= 80, "InboundTunnel grew to {size} bytes");
    }
}
