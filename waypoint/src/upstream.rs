//! Upstream HTTP connections: to each endpoint, HTTP/1.1 or HTTP/2 over an HBONE
//! tunnel from the shared `ambit_net` pool, as the waypoint's own identity and
//! expecting the endpoint workload's, CONNECT `:authority` = `podIP:targetPort`; to an
//! endpoint outside the mesh, in plaintext, as ztunnel reaches one.
//!
//! Connections are kept per (endpoint address, identity, HTTP version) and reused
//! (keep-alive): an HTTP/2 connection carries every concurrent request to its
//! endpoint; an HTTP/1.1 connection one at a time, going back to the idle list once
//! its response has been read. Idle connections are closed after [`IDLE_TIMEOUT`],
//! and at most [`MAX_IDLE_PER_ENDPOINT`] HTTP/1.1 ones are kept, so tunnels to
//! an endpoint that stopped receiving requests end, and with them the HBONE
//! connection once it has none.
//!
//! A DestinationRule's `maxRequestsPerConnection` ends a connection after that many
//! requests ([`Upstreams::send_limited`]).
//!
//! A request that never left (its connection turned out to be closed when it was
//! sent, as happens when an endpoint closes an idle keep-alive connection) is sent
//! again on a new connection; one that left is never retried.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_core::hbone::{Baggage, Forwarded, HboneTarget, HBONE_PORT};
use ambit_core::SpiffeId;
use ambit_net::cert_manager::CertificateManager;
use ambit_net::hbone::client::OpenTunnel;
use ambit_net::hbone::pool::{HbonePool, PoolError, PoolKey};
use ambit_net::hbone::H2Stream;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};

use crate::http::RequestBody;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// An idle HTTP/1.1 connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per endpoint.
pub const MAX_IDLE_PER_ENDPOINT: usize = 32;

/// The HTTP version spoken upstream (the client's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// Where one request goes: the endpoint's `podIP:targetPort` and its identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamKey {
    pub addr: SocketAddr,
    pub identity: SpiffeId,
    pub version: HttpVersion,
    /// Whether the endpoint is in the mesh (reached over HBONE); one outside it is
    /// reached in plaintext, as ztunnel reaches it.
    pub hbone: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the waypoint has no valid certificate for {0}")]
    NoCertificate(SpiffeId),
    #[error("{0}")]
    Tunnel(#[from] PoolError),
    #[error("cannot connect to {addr} (outside the mesh): {source}")]
    Plaintext { addr: SocketAddr, source: io::Error },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("request to {addr} failed: {source}")]
    Request {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Envoy's response flag for it: `UF` (upstream connection failure) or `UC`
    /// (upstream connection termination).
    pub fn response_flag(&self) -> &'static str {
        match self {
            UpstreamError::Request { .. } => "UC",
            _ => "UF",
        }
    }
}

/// The waypoint's upstream connections; cheap to clone.
#[derive(Clone)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

/// An idle HTTP/1.1 connection, since when it is idle, and the requests it carried.
type IdleH1 = (http1::SendRequest<RequestBody>, Instant, u32);
/// An HTTP/2 connection, when it was last used, and the requests it carried.
type PooledH2 = (http2::SendRequest<RequestBody>, Instant, u32);

struct Inner {
    hbone: HbonePool,
    certs: Arc<CertificateManager>,
    identity: SpiffeId,
    /// The `forwarded` address of the tunnels (this waypoint's pod).
    forwarded_for: SocketAddr,
    idle: Mutex<HashMap<UpstreamKey, Vec<IdleH1>>>,
    /// With when each was last used: one unused for [`IDLE_TIMEOUT`] is let go, and
    /// closes once its last request has ended.
    /// And the requests it carried.
    h2: Mutex<HashMap<UpstreamKey, PooledH2>>,
}

impl Upstreams {
    /// Needs a tokio runtime: it starts the idle sweeper.
    pub fn new(
        hbone: HbonePool,
        certs: Arc<CertificateManager>,
        identity: SpiffeId,
        forwarded_for: SocketAddr,
    ) -> Self {
        let inner = Arc::new(Inner {
            hbone,
            certs,
            identity,
            forwarded_for,
            idle: Mutex::default(),
            h2: Mutex::default(),
        });
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        Upstreams { inner }
    }

    /// The HBONE pool the tunnels come from (plain TCP relays share it).
    pub fn hbone(&self) -> &HbonePool {
        &self.inner.hbone
    }

    /// Opens an HBONE tunnel to `addr` (`podIP:port`) at its ztunnel, as the
    /// waypoint, expecting `identity`.
    pub async fn tunnel(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        forwarded: Forwarded,
        baggage: Baggage,
    ) -> Result<TunnelIo, UpstreamError> {
        let inner = &self.inner;
        let cert = inner
            .certs
            .cached(&inner.identity)
            .ok_or_else(|| UpstreamError::NoCertificate(inner.identity.clone()))?;
        let key = PoolKey {
            source: inner.identity.clone(),
            destination: [identity.clone()].into_iter().collect(),
            addr: SocketAddr::new(addr.ip(), HBONE_PORT),
        };
        let request = ambit_net::hbone::client::OutboundRequest {
            target: HboneTarget::new(addr),
            forwarded,
            baggage,
            traceparent: None,
        };
        let tunnel = inner.hbone.connect(&key, &cert, &request).await?;
        Ok(TunnelIo {
            stream: tunnel.stream,
            _open: tunnel.open,
        })
    }

    /// Sends `request` to the endpoint `key` names, on a pooled connection.
    pub async fn send(
        &self,
        key: &UpstreamKey,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.send_limited(key, request, None).await
    }

    /// [`Upstreams::send`], a connection carrying at most `per_connection` requests
    /// (a DestinationRule's `maxRequestsPerConnection`; `None`: no limit).
    pub async fn send_limited(
        &self,
        key: &UpstreamKey,
        request: Request<RequestBody>,
        per_connection: Option<u32>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let limit = per_connection.unwrap_or(u32::MAX);
        match key.version {
            HttpVersion::Http2 => self.send_h2(key, request, limit).await,
            HttpVersion::Http1 => self.send_h1(key, request, limit).await,
        }
    }

    async fn send_h2(
        &self,
        key: &UpstreamKey,
        request: Request<RequestBody>,
        limit: u32,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut request = request;
        let mut fresh = false;
        loop {
            let pooled = {
                let mut h2 = lock(&self.inner.h2);
                let pooled =
                    h2.get_mut(key)
                        .filter(|(s, _, _)| !s.is_closed())
                        .map(|(s, used, count)| {
                            *used = Instant::now();
                            *count += 1;
                            (s.clone(), *count)
                        });
                // Its last request: new ones take a new connection, and this one
                // closes when its streams end.
                if pooled.as_ref().is_some_and(|(_, n)| *n >= limit) {
                    h2.remove(key);
                }
                pooled.map(|(s, _)| s)
            };
            let mut sender = match pooled {
                Some(s) => s,
                None => {
                    fresh = true;
                    let io = self.connection_io(key).await?;
                    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .keep_alive_interval(Duration::from_secs(30))
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(|source| UpstreamError::Handshake {
                            addr: key.addr,
                            source,
                        })?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                        }
                    });
                    if limit > 1 {
                        lock(&self.inner.h2)
                            .insert(key.clone(), (sender.clone(), Instant::now(), 1));
                    }
                    sender
                }
            };
            if let Err(source) = sender.ready().await {
                lock(&self.inner.h2).remove(key);
                if fresh {
                    return Err(UpstreamError::Handshake {
                        addr: key.addr,
                        source,
                    });
                }
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => {
                        lock(&self.inner.h2).remove(key);
                        request = unsent;
                    }
                    _ => {
                        return Err(UpstreamError::Request {
                            addr: key.addr,
                            source: e.into_error(),
                        })
                    }
                },
            }
        }
    }

    async fn send_h1(
        &self,
        key: &UpstreamKey,
        request: Request<RequestBody>,
        limit: u32,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut request = request;
        loop {
            let (mut sender, fresh, carried) = match self.idle_h1(key) {
                Some((sender, carried)) => (sender, false, carried),
                None => {
                    let io = self.connection_io(key).await?;
                    let (sender, conn) = http1::Builder::new()
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(|source| UpstreamError::Handshake {
                            addr: key.addr,
                            source,
                        })?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.with_upgrades().await {
                            tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
                        }
                    });
                    (sender, true, 0)
                }
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    // Back to the idle list once the response has been read, unless
                    // it has carried as many requests as it may.
                    let carried = carried + 1;
                    if carried >= limit {
                        return Ok(response);
                    }
                    let pool = Arc::downgrade(&self.inner);
                    let key = key.clone();
                    tokio::spawn(async move {
                        if sender.ready().await.is_ok() {
                            if let Some(inner) = pool.upgrade() {
                                let mut idle = lock(&inner.idle);
                                let list = idle.entry(key).or_default();
                                if list.len() < MAX_IDLE_PER_ENDPOINT {
                                    list.push((sender, Instant::now(), carried));
                                }
                            }
                        }
                    });
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: the idle connection had closed. Again, on a new one.
                    Some(unsent) if !fresh => request = unsent,
                    _ => {
                        return Err(UpstreamError::Request {
                            addr: key.addr,
                            source: e.into_error(),
                        })
                    }
                },
            }
        }
    }

    /// An idle HTTP/1.1 connection to `key` that can take a request now.
    fn idle_h1(&self, key: &UpstreamKey) -> Option<(http1::SendRequest<RequestBody>, u32)> {
        let mut idle = lock(&self.inner.idle);
        let list = idle.get_mut(key)?;
        while let Some((sender, _, carried)) = list.pop() {
            if sender.is_ready() && !sender.is_closed() {
                return Some((sender, carried));
            }
        }
        None
    }

    async fn connection_io(&self, key: &UpstreamKey) -> Result<UpstreamIo, UpstreamError> {
        if !key.hbone {
            let tcp =
                TcpStream::connect(key.addr)
                    .await
                    .map_err(|source| UpstreamError::Plaintext {
                        addr: key.addr,
                        source,
                    })?;
            let _ = tcp.set_nodelay(true);
            return Ok(UpstreamIo::Plaintext(tcp));
        }
        let tunnel = self
            .tunnel(
                key.addr,
                &key.identity,
                Forwarded {
                    for_addr: self.inner.forwarded_for,
                    host: None,
                },
                Baggage::default(),
            )
            .await?;
        Ok(UpstreamIo::Hbone(tunnel))
    }

    /// Idle HTTP/1.1 connections held, for every endpoint.
    pub fn idle_connections(&self) -> usize {
        lock(&self.inner.idle).values().map(Vec::len).sum()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Closes idle connections past [`IDLE_TIMEOUT`] and forgets closed ones, until the
/// pool is dropped.
async fn sweep(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 4).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        lock(&inner.idle).retain(|_, list| {
            list.retain(|(s, since, _)| {
                !s.is_closed() && now.duration_since(*since) < IDLE_TIMEOUT
            });
            !list.is_empty()
        });
        lock(&inner.h2)
            .retain(|_, (s, used, _)| !s.is_closed() && now.duration_since(*used) < IDLE_TIMEOUT);
    }
}

/// An HBONE tunnel as an upstream connection's byte stream, counted among its HBONE
/// connection's open tunnels while it lives.
#[derive(Debug)]
pub struct TunnelIo {
    pub stream: H2Stream,
    pub _open: OpenTunnel,
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// An upstream connection's byte stream: a tunnel, or plaintext TCP to an endpoint
/// outside the mesh.
#[derive(Debug)]
pub enum UpstreamIo {
    Hbone(TunnelIo),
    Plaintext(TcpStream),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Hbone(t) => Pin::new(t).poll_read(cx, buf),
            UpstreamIo::Plaintext(t) => Pin::new(t).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Hbone(t) => Pin::new(t).poll_write(cx, data),
            UpstreamIo::Plaintext(t) => Pin::new(t).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Hbone(t) => Pin::new(t).poll_flush(cx),
            UpstreamIo::Plaintext(t) => Pin::new(t).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Hbone(t) => Pin::new(t).poll_shutdown(cx),
            UpstreamIo::Plaintext(t) => Pin::new(t).poll_shutdown(cx),
        }
    }
}
