//! The CA's network face: gRPC over TLS 1.3 (port 15012 by default). The client
//! certificate is optional at the TLS layer — a first request carries only a token —
//! but when one is presented it must chain to the mesh root, and its identity is
//! handed to the service as [`PeerInfo`]. The serving certificate is issued by the
//! CA itself for the control plane identity and rotated at half-life.
//!
//! Unauthenticated clients cannot hold the port: a connection has
//! [`HANDSHAKE_TIMEOUT`] to complete TLS and then [`AUTHENTICATE_WITHIN`] to carry a
//! request that authenticates, or it is closed; at most [`MAX_PER_SOURCE`]
//! connections per source address and [`MAX_CONNECTIONS`] in all are open (more are
//! closed at accept); a failing `accept` (out of descriptors) backs off.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use ambit_core::renewal::RenewalPolicy;
use ambit_core::SpiffeId;
use ambit_net::tls::{self, CertSlot, ClientAuth, WorkloadCert};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::authority::{CertificateAuthority, IssueError};

/// How long a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection may stay open, after its handshake, without carrying a
/// request that authenticates.
pub const AUTHENTICATE_WITHIN: Duration = Duration::from_secs(5);

/// Connections open at once from one source address.
pub const MAX_PER_SOURCE: usize = 128;

/// Connections open at once in all.
pub const MAX_CONNECTIONS: usize = 4096;

/// Lifetime of the CA's own serving certificate.
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// What the service learns about the connection a request came on.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// Identity of a verified client certificate, if one was presented.
    pub identity: Option<SpiffeId>,
    /// Set once a request on the connection has authenticated; until then the
    /// connection is closed after [`AUTHENTICATE_WITHIN`].
    pub authenticated: Arc<AtomicBool>,
}

/// Open connections, per source address and in all.
#[derive(Debug, Default)]
struct Limits {
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One open connection's place in [`Limits`], given back when dropped.
#[derive(Debug)]
struct Admitted {
    limits: Arc<Limits>,
    ip: IpAddr,
}

impl Limits {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, &'static str> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.0 >= MAX_CONNECTIONS {
            return Err("too many connections");
        }
        let from = open.1.entry(ip).or_default();
        if *from >= MAX_PER_SOURCE {
            return Err("too many connections from this address");
        }
        *from += 1;
        open.0 += 1;
        Ok(Admitted {
            limits: self.clone(),
            ip,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self
            .limits
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.0 -= 1;
        if let Some(from) = open.1.get_mut(&self.ip) {
            *from -= 1;
            if *from == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot issue the CA's serving certificate: {0}")]
    ServingCert(#[from] IssueError),
    #[error("serving certificate unusable: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// The serving certificate for `identity` and `dns_names`, freshly issued.
pub fn serving_cert(
    ca: &CertificateAuthority,
    identity: &SpiffeId,
    dns_names: &[String],
    now: SystemTime,
) -> Result<WorkloadCert, ServeError> {
    let (chain, key) = ca.issue_own(identity, dns_names, SERVING_CERT_TTL, now)?;
    Ok(WorkloadCert::from_pem(
        &chain,
        &key,
        Some(ca.bundle().to_vec()),
    )?)
}

/// Serves `routes` (the CA's service and any served next to it) on `listener`, over
/// TLS with the CA's own serving certificate, until `shutdown` completes. When `ca` is
/// replaced (new material, a rotation step) the serving certificate is issued again by
/// the new one if it signs with other material, and clients are verified against its
/// trust bundle.
pub async fn serve(
    listener: TcpListener,
    ca: watch::Receiver<Arc<CertificateAuthority>>,
    routes: tonic::service::Routes,
    identity: SpiffeId,
    dns_names: Vec<String>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let first = ca.borrow().clone();
    let cert = serving_cert(&first, &identity, &dns_names, SystemTime::now())?;
    let slot = CertSlot::new(&cert);
    let config = tls::server_config(
        slot.clone(),
        cert.roots(),
        ClientAuth::Optional(first.trust_domain().clone()),
    )?;
    let rotation = tokio::spawn(rotate_serving_cert(
        ca,
        config.clone(),
        identity,
        dns_names,
        cert,
    ));
    let (tx, rx) = mpsc::channel(64);
    let accept = tokio::spawn(accept_loop(listener, config, tx));
    let incoming = ReceiverStream::new(rx);
    let result = tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    accept.abort();
    rotation.abort();
    Ok(result?)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tls::ServerTls,
    tx: mpsc::Sender<io::Result<TlsConn>>,
) {
    let limits = Arc::new(Limits::default());
    let mut backoff = Duration::from_millis(10);
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => {
                backoff = Duration::from_millis(10);
                c
            }
            Err(e) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let admitted = match limits.admit(remote.ip()) {
            Ok(a) => a,
            Err(why) => {
                tracing::debug!(%remote, why, "connection closed at accept");
                drop(tcp);
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        // Handshakes run on their own tasks so a slow client never holds up others.
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|leaf| tls::identity_of(leaf).ok());
                    let _ = tx
                        .send(Ok(TlsConn {
                            stream,
                            info: PeerInfo {
                                remote,
                                identity,
                                authenticated: Arc::default(),
                            },
                            unauthenticated_until: Some(Box::pin(tokio::time::sleep(
                                AUTHENTICATE_WITHIN,
                            ))),
                            _admitted: admitted,
                        }))
                        .await;
                }
                Ok(Err(e)) => tracing::info!(%remote, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(%remote, "TLS handshake timed out"),
            }
        });
    }
}

async fn rotate_serving_cert(
    mut ca: watch::Receiver<Arc<CertificateAuthority>>,
    server: tls::ServerTls,
    identity: SpiffeId,
    dns_names: Vec<String>,
    mut current: WorkloadCert,
) {
    let policy = RenewalPolicy::default();
    let mut failures = 0u32;
    let mut signer = ca.borrow_and_update().clone();
    loop {
        let at = policy.renew_at(current.not_before(), current.not_after(), rand::random());
        let wait = if failures == 0 {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        } else {
            policy.backoff(failures, rand::random())
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            changed = ca.changed() => {
                if changed.is_err() {
                    return;
                }
                let next = ca.borrow_and_update().clone();
                let same = next.same_signer(&signer);
                signer = next;
                if same {
                    // Only the bundle changed: trust it from the next handshake on.
                    if let Err(e) = server.trust(signer.bundle()) {
                        tracing::error!(error = %e, "cannot trust the new bundle");
                    }
                    continue;
                }
            }
        }
        match serving_cert(&signer, &identity, &dns_names, SystemTime::now()) {
            Ok(cert) => {
                if let Err(e) = server.rotate(&cert) {
                    tracing::error!(error = %e, "cannot trust the new bundle");
                }
                tracing::info!(not_after = ?cert.not_after(), "rotated serving certificate");
                current = cert;
                failures = 0;
            }
            Err(e) => {
                failures += 1;
                tracing::error!(error = %e, "cannot rotate serving certificate; keeping the current one");
            }
        }
    }
}

/// A TLS connection plus what the handshake established about the peer.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
    /// Until a request authenticates: when this fires, reads fail and the
    /// connection is closed.
    unauthenticated_until: Option<Pin<Box<tokio::time::Sleep>>>,
    _admitted: Admitted,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").field("info", &self.info).finish()
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(deadline) = this.unauthenticated_until.as_mut() {
            if this.info.authenticated.load(Ordering::Relaxed) {
                this.unauthenticated_until = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                tracing::info!(remote = %this.info.remote, "closing a connection that sent no authenticated request in time");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no authenticated request in time",
                )));
            }
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
