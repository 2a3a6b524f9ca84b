//! The waypoint's HBONE side: the listener on 15008 (mutual TLS 1.3, a client
//! certificate from the trust domain required), and for each CONNECT the decision
//! whether this waypoint serves its target (`ambit_core::waypoint::bound_target`:
//! refused with 400 otherwise), then, after the 200, what the client speaks: the
//! port's declared protocol, else the first bytes ([`detect`]). HTTP is served by
//! [`crate::http`]; anything else is relayed to an endpoint as TCP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_core::hbone::{Baggage, ConnectRefusal};
use ambit_core::waypoint::{
    bound_target, declared_protocol, sniff, BoundTarget, Declared, GatewayRef, Sniffed, Waypoint,
    SNIFF_LIMIT,
};
use ambit_core::SpiffeId;
use ambit_net::cert_manager::CertificateManager;
use ambit_net::hbone::server::{accept_tls, serve_connection, InboundRequest, TunnelHandler};
use ambit_net::hbone::{H2Settings, H2Stream};
use ambit_net::model_source::ModelSnapshot;
use ambit_net::tls::ServerTls;
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::{Limits, TunnelContext};
use crate::io::Rewind;
use crate::metrics::Metrics;
use crate::upstream::{HttpVersion, Upstreams};

/// What every tunnel of the waypoint shares.
#[derive(Debug)]
pub struct Shared {
    pub gateway: GatewayRef,
    pub identity: SpiffeId,
    pub model: watch::Receiver<ModelSnapshot>,
    pub certs: Arc<CertificateManager>,
    pub upstreams: Upstreams,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub settings: H2Settings,
    /// How long to wait for a client's first bytes.
    pub detection_timeout: Duration,
    /// End-user authentication (JWT) and its keys.
    pub authn: Arc<crate::authn::Authenticator>,
    /// Round-robin turns, per Service port.
    turns: Mutex<HashMap<(String, u16), u64>>,
    /// Tunnels open now (for draining).
    pub open: AtomicU64,
    /// HTTP requests being forwarded now, and how many of them are retrying: the
    /// retry budget (`ambit_core::retry::budget_allows`).
    pub requests_in_flight: AtomicU64,
    pub retries_in_flight: AtomicU64,
    /// DestinationRule state: load balancing, connection pools, outlier detection.
    pub balancer: crate::balance::Balancer,
    draining: watch::Receiver<bool>,
}

/// How the waypoint is set up; see [`Shared::new`].
#[derive(Debug)]
pub struct Settings {
    pub gateway: GatewayRef,
    pub identity: SpiffeId,
    pub limits: Limits,
    pub settings: H2Settings,
    pub detection_timeout: Duration,
    pub authn: Arc<crate::authn::Authenticator>,
}

impl Shared {
    pub fn new(
        settings: Settings,
        model: watch::Receiver<ModelSnapshot>,
        certs: Arc<CertificateManager>,
        upstreams: Upstreams,
        metrics: Arc<Metrics>,
        draining: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            gateway: settings.gateway,
            identity: settings.identity,
            model,
            certs,
            upstreams,
            metrics,
            limits: settings.limits,
            settings: settings.settings,
            detection_timeout: settings.detection_timeout,
            authn: settings.authn,
            turns: Mutex::default(),
            open: AtomicU64::new(0),
            requests_in_flight: AtomicU64::new(0),
            retries_in_flight: AtomicU64::new(0),
            balancer: crate::balance::Balancer::default(),
            draining,
        })
    }

    /// The next round-robin turn for `service`'s `port`.
    pub fn next_turn(&self, service: &str, port: u16) -> u64 {
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        let turn = turns.entry((service.to_owned(), port)).or_insert(0);
        let this = *turn;
        *turn = turn.wrapping_add(1);
        this
    }

    /// Completes once the waypoint drains.
    pub fn drained(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut draining = self.draining.clone();
        async move {
            let _ = draining.wait_for(|d| *d).await;
        }
    }
}

/// Accepts HBONE connections on `listener` until the waypoint drains.
pub async fn serve_hbone(listener: TcpListener, shared: Arc<Shared>, tls: Arc<ServerTls>) {
    let mut drained = std::pin::pin!(shared.drained());
    loop {
        let (tcp, peer_addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed on the HBONE port");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut drained => return,
        };
        let _ = tcp.set_nodelay(true);
        let (shared, tls) = (shared.clone(), tls.clone());
        tokio::spawn(async move {
            let (stream, peer) = match accept_tls(&tls, tcp, Duration::from_secs(10)).await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::info!(%peer_addr, error = %e, "HBONE connection refused");
                    return;
                }
            };
            let drained = shared.drained();
            let handler = Tunnels { shared };
            if let Err(e) = serve_connection(
                stream,
                peer,
                peer_addr,
                handler.shared.settings,
                handler.clone(),
                drained,
            )
            .await
            {
                tracing::debug!(%peer_addr, error = %e, "HBONE connection ended");
            }
        });
    }
}

/// The waypoint's HBONE handler: accepts the CONNECTs to bound targets and serves
/// each tunnel itself.
#[derive(Debug, Clone)]
pub struct Tunnels {
    pub shared: Arc<Shared>,
}

/// What `accept` decided about a tunnel.
#[derive(Debug)]
pub struct Accepted {
    context: Arc<TunnelContext>,
    baggage: Baggage,
    declared: Declared,
}

impl TunnelHandler for Tunnels {
    type Accepted = Accepted;
    type Serving = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

    async fn accept(&self, request: &InboundRequest) -> Result<Accepted, ConnectRefusal> {
        let state = self.shared.model.borrow().state.clone();
        let waypoint = Waypoint::in_model(&self.shared.gateway, &state);
        let target = bound_target(&state, &waypoint, request.target)?;
        // The Service port's declared protocol (`appProtocol`, else its name's
        // prefix); a workload target, or a port declaring nothing, is sniffed.
        let declared = match &target {
            BoundTarget::Service { port, .. } => declared_protocol(port.app_protocol.as_deref()),
            BoundTarget::Workload { .. } => declared_protocol(None),
        };
        let client = request
            .forwarded
            .as_ref()
            .map_or(request.peer_addr, |f| f.for_addr);
        Ok(Accepted {
            context: Arc::new(TunnelContext {
                shared: self.shared.clone(),
                target,
                destination: request.target.addr(),
                peer: request.peer.clone(),
                client,
                baggage: request.baggage.clone(),
                declared,
            }),
            baggage: request.baggage.clone(),
            declared,
        })
    }

    fn serve(&self, accepted: Accepted, stream: H2Stream) -> Self::Serving {
        let shared = self.shared.clone();
        Box::pin(async move {
            shared.open.fetch_add(1, Ordering::Relaxed);
            let _open = Open(shared.clone());
            let mut stream = stream;
            let (protocol, prefix) =
                detect(&mut stream, accepted.declared, shared.detection_timeout).await;
            let io = Rewind::new(prefix, stream);
            tracing::debug!(dst = %accepted.context.destination, peer = %accepted.context.peer, ?protocol, "tunnel accepted");
            match protocol {
                Protocol::Http(version) => crate::http::serve(accepted.context, io, version).await,
                Protocol::Tcp => {
                    crate::http::relay_tcp(accepted.context, io, accepted.baggage).await
                }
            }
        })
    }

    fn report_refusal(&self, request: Option<&InboundRequest>, refusal: &ConnectRefusal) {
        tracing::info!(
            peer = %request.map(|r| r.peer.to_string()).unwrap_or_default(),
            target = %request.map(|r| r.target.to_string()).unwrap_or_default(),
            status = refusal.status(),
            reason = refusal.reason(),
            error = %refusal,
            "HBONE CONNECT refused"
        );
    }
}

/// Counts a tunnel as open while alive.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a tunnel carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http(HttpVersion),
    Tcp,
}

/// Decides what the client speaks: as declared, or by its first bytes, read for at
/// most `timeout` (a client that sends nothing by then is TCP). Returns the bytes
/// read, which belong to the protocol's first message.
pub async fn detect(
    stream: &mut H2Stream,
    declared: Declared,
    timeout: Duration,
) -> (Protocol, Bytes) {
    match declared {
        Declared::Http2 => return (Protocol::Http(HttpVersion::Http2), Bytes::new()),
        Declared::Tcp => return (Protocol::Tcp, Bytes::new()),
        Declared::Http | Declared::Sniff => {}
    }
    let mut seen = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    let sniffed = loop {
        let verdict = sniff(&seen);
        if verdict != Sniffed::NeedMore {
            break verdict;
        }
        if seen.len() >= SNIFF_LIMIT {
            break Sniffed::Tcp;
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut seen)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break Sniffed::Tcp,
            Ok(Ok(_)) => {}
        }
    };
    let protocol = match (sniffed, declared) {
        (Sniffed::Http2, _) => Protocol::Http(HttpVersion::Http2),
        (Sniffed::Http1, _) => Protocol::Http(HttpVersion::Http1),
        // Declared HTTP stays HTTP: the server answers what does not parse.
        (_, Declared::Http) => Protocol::Http(HttpVersion::Http1),
        _ => Protocol::Tcp,
    };
    (protocol, seen.freeze())
}

/// The address the waypoint's own tunnels claim in `forwarded`.
pub fn forwarded_for(instance_ip: Option<std::net::IpAddr>) -> SocketAddr {
    SocketAddr::new(
        instance_ip.unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        0,
    )
}
