//! Pooling HBONE connections: one h2 connection carries many tunnels, so tunnels to the
//! same destination share connections instead of paying a TCP and TLS handshake each.
//!
//! A connection is shared only by tunnels with the same [`PoolKey`] — the source
//! identity it authenticates as, the identities it accepted for the far side, and the
//! far side's address — so a tunnel never rides on a connection authenticated for
//! someone else. Each connection carries at most `max_streams_per_connection` tunnels
//! (and never more than the far side allows); connections left without tunnels for
//! `idle_timeout` are dropped, which closes them.
//!
//! How a tunnel finds its connection ([`HbonePool::connect`]):
//! - Under the pool's lock, it takes the oldest live connection of its key with room
//!   and reserves a slot on it ([`HboneConnection::reserve`]). Load counts tunnels
//!   from their reservation to their end ([`HboneConnection::active_tunnels`]), so
//!   concurrent callers cannot overfill a connection while their CONNECTs are in
//!   flight, and a tunnel is never counted twice. Filling the oldest first lets the extra connections of a burst drain and
//!   idle out afterwards.
//! - With no room, it joins the key's connection attempt, starting one if none is
//!   running: at most one connection per key is being established at a time, and
//!   every caller waiting for it shares its outcome (a dead destination costs one
//!   connect timeout, not one per caller). The attempt runs on its own task, so a
//!   caller that gives up does not cancel it for the others.
//! - A connection is handed out only to callers presenting the certificate it was
//!   made with: after the source's certificate is renewed, new tunnels go over new
//!   connections and the old ones idle out.
//! - A connection that failed, was closed or sent GOAWAY is removed when seen. If
//!   opening the tunnel fails because the connection broke (or the stream was refused
//!   unprocessed), the tunnel is retried once; a status from the far side is an answer
//!   and is never retried.
//!
//! Idle close: a background task, started with the first connection and ended when the
//! pool is empty or dropped (it holds only a `Weak`), sweeps every `idle_timeout / 4`.
//! A connection is closed once it has been seen without tunnels for `idle_timeout`, so
//! it closes between `idle_timeout` and `idle_timeout` plus one sweep interval after
//! its last tunnel ended — never earlier.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use ambit_core::SpiffeId;
use futures::future::{BoxFuture, FutureExt, Shared};
use rustls::sign::CertifiedKey;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::client::{HboneConnection, OpenTunnel, OutboundRequest, Tunnel, TunnelError};
use super::H2Settings;
use crate::tls::{self, TlsError, WorkloadCert};

/// Which tunnels may share a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity the connection authenticates as (its client certificate).
    pub source: SpiffeId,
    /// The identities the far side may present (the workload's, or its waypoint's).
    pub destination: BTreeSet<SpiffeId>,
    /// The far side's HBONE address, `ip:15008`.
    pub addr: SocketAddr,
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (", self.addr)?;
        for (i, id) in self.destination.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        write!(f, ") as {}", self.source)
    }
}

/// How the pool opens, fills and closes connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    pub settings: H2Settings,
    /// Tunnels one connection carries at most (fewer if the far side allows fewer).
    pub max_streams_per_connection: usize,
    /// A connection without tunnels for this long is closed.
    pub idle_timeout: Duration,
    /// Bound on TCP connect, TLS handshake and HTTP/2 handshake together.
    pub connect_timeout: Duration,
    /// How long to wait for the far side's answer to a CONNECT. The far side answers
    /// only after connecting to its upstream, so this must exceed its upstream connect
    /// deadline; without it a silently dead peer would hang the client forever.
    pub response_timeout: Duration,
}

impl Default for PoolConfig {
    /// 100 tunnels per connection, as DESIGN says. Idle timeout 60 s: long enough that
    /// clients polling or reconnecting every few seconds to tens of seconds (health
    /// checks, scrapes, HTTP keep-alive pools) keep reusing one connection, short
    /// enough that connections to pods that went away or stopped talking are released
    /// within a minute; an idle connection costs a few kilobytes on each side. Connect
    /// timeout 10 s, the deadline the CA gives a TLS handshake: ample for a loaded node,
    /// and a black-holed destination fails the application's connection instead of
    /// hanging it.
    fn default() -> Self {
        PoolConfig {
            settings: H2Settings::default(),
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            // Above the 10 s upstream connect deadline on the far side.
            response_timeout: Duration::from_secs(15),
        }
    }
}

/// HBONE connections shared by tunnels with the same [`PoolKey`]; cheap to clone.
pub struct HbonePool<C = MeshConnector> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for HbonePool<C> {
    fn clone(&self) -> Self {
        HbonePool {
            inner: self.inner.clone(),
        }
    }
}

impl<C> fmt::Debug for HbonePool<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HbonePool")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl<C: Connector> HbonePool<C> {
    /// A pool that makes its connections with `connector`. Needs no runtime until the
    /// first `connect`.
    pub fn new(config: PoolConfig, connector: C) -> Self {
        let config = PoolConfig {
            // A connection that can carry nothing would make every caller open another.
            max_streams_per_connection: config.max_streams_per_connection.max(1),
            ..config
        };
        HbonePool {
            inner: Arc::new(Inner {
                config,
                connector,
                state: Mutex::new(State::default()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// Opens a tunnel for `request` on a connection of `key`, made with `cert` (whose
    /// identity must be `key.source`) if a new one is needed. Resolves once the far
    /// side answered 200.
    pub async fn connect(
        &self,
        key: &PoolKey,
        cert: &WorkloadCert,
        request: &OutboundRequest,
    ) -> Result<Tunnel, PoolError> {
        if cert.identity() != &key.source {
            return Err(PoolError::WrongCertificate {
                key: key.clone(),
                presented: cert.identity().clone(),
            });
        }
        let mut retried = false;
        loop {
            let (id, conn, slot) = self.inner.checkout(key, cert).await?;
            let answer = tokio::time::timeout(
                self.inner.config.response_timeout,
                conn.connect_in(slot, request),
            )
            .await;
            let error = match answer {
                Ok(Ok(tunnel)) => return Ok(tunnel),
                Ok(Err(e)) => e,
                Err(_) => {
                    // The connection may be dead without anyone having noticed: keep
                    // new tunnels off it. Not retried: the far side may have acted on
                    // the request.
                    self.inner.evict(key, id);
                    return Err(PoolError::NoAnswer {
                        key: key.clone(),
                        after: self.inner.config.response_timeout,
                    });
                }
            };
            let retry = match &error {
                TunnelError::H2(e) => {
                    // A reset concerns this stream only; anything else broke the
                    // connection, and no other tunnel should be sent there.
                    let broken = !e.is_reset() || conn.is_closed();
                    if broken {
                        self.inner.evict(key, id);
                    }
                    // No answer came: the request was lost with the connection, or
                    // refused unprocessed (REFUSED_STREAM, RFC 9113 §8.7). No byte has
                    // gone through the tunnel yet, so at worst the far side opened one
                    // upstream connection that sees nothing.
                    broken || e.reason() == Some(h2::Reason::REFUSED_STREAM)
                }
                // A status is the far side's answer; asking again would not change it.
                TunnelError::Refused { .. } | TunnelError::Request(_) => false,
            };
            if !retry || retried {
                return Err(PoolError::Tunnel {
                    key: key.clone(),
                    source: error,
                });
            }
            tracing::debug!(%key, %error, "HBONE connection failed under a new tunnel; retrying");
            retried = true;
        }
    }

    /// Connections held for `key` (in use or idle).
    pub fn connections(&self, key: &PoolKey) -> usize {
        self.inner
            .lock()
            .keys
            .get(key)
            .map_or(0, |entry| entry.conns.len())
    }

    /// Connections held for all keys.
    pub fn total_connections(&self) -> usize {
        self.inner
            .lock()
            .keys
            .values()
            .map(|entry| entry.conns.len())
            .sum()
    }
}

/// Why a tunnel could not be opened through the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection to the destination could be established; shared by every caller
    /// that waited for the same attempt.
    #[error("cannot open an HBONE connection to {key}: {source}")]
    Connect {
        key: PoolKey,
        source: Arc<ConnectError>,
    },
    /// The connection was there, but the tunnel was refused or failed.
    #[error("HBONE tunnel via {key}: {source}")]
    Tunnel { key: PoolKey, source: TunnelError },
    /// The caller passed a certificate for another identity than the key's source.
    #[error("certificate of {presented} cannot open connections to {key}")]
    WrongCertificate { key: PoolKey, presented: SpiffeId },
    /// The far side did not answer the CONNECT in time.
    #[error("HBONE CONNECT via {key} got no answer within {after:?}")]
    NoAnswer { key: PoolKey, after: Duration },
}

impl PoolError {
    /// Stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            PoolError::Connect { source, .. } => source.reason(),
            PoolError::Tunnel { source, .. } => source.reason(),
            PoolError::WrongCertificate { .. } => "wrong_certificate",
            PoolError::NoAnswer { .. } => "hbone_no_answer",
        }
    }

    /// The connection's key the failure concerns.
    pub fn key(&self) -> &PoolKey {
        match self {
            PoolError::Connect { key, .. }
            | PoolError::Tunnel { key, .. }
            | PoolError::WrongCertificate { key, .. }
            | PoolError::NoAnswer { key, .. } => key,
        }
    }
}

/// What failed while establishing one HBONE connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TCP connect failed: {0}")]
    Tcp(#[source] io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    #[error("cannot build the TLS client configuration: {0}")]
    TlsConfig(#[from] TlsError),
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(#[from] TunnelError),
    #[error("not established within {0:?}")]
    Timeout(Duration),
    /// Established, then closed by the far side before a tunnel could use it.
    #[error("closed by the far side as soon as it was established")]
    ClosedAtOnce,
    /// The task establishing it ended abnormally (panic, runtime shutting down).
    #[error("connection attempt interrupted")]
    Interrupted,
}

impl ConnectError {
    /// Stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Tcp(_) => "hbone_connect_failed",
            ConnectError::Tls(_) => "hbone_tls_failed",
            ConnectError::TlsConfig(_) => "hbone_tls_config",
            ConnectError::Timeout(_) => "hbone_connect_timeout",
            ConnectError::Handshake(_) | ConnectError::ClosedAtOnce | ConnectError::Interrupted => {
                "hbone_connection_failed"
            }
        }
    }
}

/// A byte stream an HBONE connection runs over (normally TLS over TCP).
pub trait HboneIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> HboneIo for T {}

/// An established, authenticated stream to a key's destination.
pub type BoxedIo = Box<dyn HboneIo>;

/// How the pool establishes a connection: TCP and mutual TLS as `cert`, accepting only
/// the identities in `key.destination`. Pluggable so ztunnel can make its sockets its
/// own way and tests can interpose.
pub trait Connector: Send + Sync + 'static {
    fn connect(
        &self,
        key: &PoolKey,
        cert: &WorkloadCert,
    ) -> impl Future<Output = Result<BoxedIo, ConnectError>> + Send;
}

type TcpConnectFn = dyn Fn(SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> + Send + Sync;

/// The mesh's connector: TCP (with `TCP_NODELAY`), then TLS 1.3 with ALPN `h2`
/// presenting the source's certificate and checking the far side's SPIFFE identity.
#[derive(Clone, Default)]
pub struct MeshConnector {
    tcp: Option<Arc<TcpConnectFn>>,
}

impl fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshConnector")
            .field("custom_tcp", &self.tcp.is_some())
            .finish()
    }
}

impl MeshConnector {
    /// Connects with `TcpStream::connect`.
    pub fn new() -> Self {
        MeshConnector::default()
    }

    /// Makes the TCP connection with `connect` instead, e.g. to set a socket mark or
    /// open the socket inside a pod's network namespace.
    pub fn with_tcp<F, Fut>(connect: F) -> Self
    where
        F: Fn(SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = io::Result<TcpStream>> + Send + 'static,
    {
        MeshConnector {
            tcp: Some(Arc::new(move |addr| connect(addr).boxed())),
        }
    }
}

impl Connector for MeshConnector {
    async fn connect(&self, key: &PoolKey, cert: &WorkloadCert) -> Result<BoxedIo, ConnectError> {
        let config = tls::client_config(Some(cert), cert.roots(), key.destination.iter().cloned())?;
        let tcp = match &self.tcp {
            Some(connect) => connect(key.addr).await,
            None => TcpStream::connect(key.addr).await,
        }
        .map_err(ConnectError::Tcp)?;
        // Tunnels carry interactive traffic; h2 already batches what it can.
        tcp.set_nodelay(true).map_err(ConnectError::Tcp)?;
        // Peers are authenticated by SPIFFE identity, not name; an IP server name
        // also keeps SNI out of the handshake.
        let server_name = ServerName::IpAddress(key.addr.ip().into());
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(ConnectError::Tls)?;
        Ok(Box::new(tls))
    }
}

// ----- internals -----

struct Inner<C> {
    config: PoolConfig,
    connector: C,
    state: Mutex<State>,
    /// Ids for connections and attempts (an attempt's id becomes its connection's).
    next_id: AtomicU64,
}

#[derive(Default)]
struct State {
    keys: HashMap<PoolKey, Entry>,
    /// The idle sweeper, running while the pool holds connections.
    sweeper: Option<AbortHandle>,
}

#[derive(Default)]
struct Entry {
    /// Oldest first.
    conns: Vec<Pooled>,
    /// The connection being established for this key, if any, and its id.
    connecting: Option<(u64, Attempt)>,
}

/// Resolves to the new connection's id once it is in the pool.
type Attempt = Shared<BoxFuture<'static, Result<u64, Arc<ConnectError>>>>;

struct Pooled {
    id: u64,
    conn: HboneConnection,
    /// The source certificate it authenticated with. Once the source's certificate is
    /// renewed, callers present the new one and this connection takes no new tunnels
    /// (its open ones carry on); it then closes when idle, long before that
    /// certificate expires.
    cert: Arc<CertifiedKey>,
    /// When the sweeper first saw it without tunnels since it was last handed out.
    idle_since: Option<Instant>,
}

impl Pooled {
    /// Tunnels opening or open.
    fn load(&self) -> usize {
        self.conn.active_tunnels()
    }

    fn has_room(&self, max: usize) -> bool {
        // A far side allowing zero streams still gets one, queued by h2, rather than
        // a new connection per caller.
        self.load() < max.min(self.conn.peer_max_streams().max(1))
    }
}

impl Entry {
    /// Reserves a slot on the oldest live connection with room, dropping the closed
    /// ones met on the way.
    fn checkout(
        &mut self,
        max: usize,
        cert: &Arc<CertifiedKey>,
    ) -> Option<(u64, HboneConnection, OpenTunnel)> {
        loop {
            let index = self
                .conns
                .iter()
                .position(|c| Arc::ptr_eq(&c.cert, cert) && c.has_room(max))?;
            let pooled = &mut self.conns[index];
            if pooled.conn.is_closed() {
                tracing::debug!(id = pooled.id, "HBONE connection closed; evicted");
                self.conns.remove(index);
                continue;
            }
            pooled.idle_since = None;
            return Some((pooled.id, pooled.conn.clone(), pooled.conn.reserve()));
        }
    }

    fn is_empty(&self) -> bool {
        self.conns.is_empty() && self.connecting.is_none()
    }
}

impl<C> Inner<C> {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Critical sections only move plain data; a panic elsewhere leaves it sound.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn evict(&self, key: &PoolKey, id: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.keys.get_mut(key) {
            entry.conns.retain(|c| c.id != id);
            if entry.is_empty() {
                state.keys.remove(key);
            }
        }
    }

    /// One pass of the idle sweeper at `now`; false once the pool is empty (the
    /// sweeper then ends, and the next connection starts a new one).
    fn sweep(&self, now: Instant) -> bool {
        let idle_timeout = self.config.idle_timeout;
        let mut state = self.lock();
        state.keys.retain(|key, entry| {
            entry.conns.retain_mut(|c| {
                if c.conn.is_closed() {
                    tracing::debug!(%key, id = c.id, "HBONE connection closed; evicted");
                    return false;
                }
                if c.load() > 0 {
                    c.idle_since = None;
                    return true;
                }
                let since = *c.idle_since.get_or_insert(now);
                let keep = now.duration_since(since) < idle_timeout;
                if !keep {
                    tracing::debug!(%key, id = c.id, "HBONE connection idle; closing");
                }
                keep
            });
            !entry.is_empty()
        });
        if state.keys.is_empty() {
            state.sweeper = None;
            return false;
        }
        true
    }
}

impl<C: Connector> Inner<C> {
    /// A slot on a connection of `key` with room, establishing one if needed.
    async fn checkout(
        self: &Arc<Self>,
        key: &PoolKey,
        cert: &WorkloadCert,
    ) -> Result<(u64, HboneConnection, OpenTunnel), PoolError> {
        let max = self.config.max_streams_per_connection;
        let presented = cert.certified_key();
        // The connection the last attempt we waited for produced.
        let mut awaited: Option<u64> = None;
        loop {
            let attempt = {
                let mut state = self.lock();
                // The common case, a connection with room, without cloning the key.
                if let Some(slot) = state
                    .keys
                    .get_mut(key)
                    .and_then(|e| e.checkout(max, &presented))
                {
                    return Ok(slot);
                }
                let entry = state.keys.entry(key.clone()).or_default();
                // The connection we waited for is already gone: closed by the far side
                // before we could use it (idle close cannot be that quick). Opening
                // another would only repeat that, for every caller, without end.
                if let Some(id) = awaited {
                    if !entry.conns.iter().any(|c| c.id == id) {
                        return Err(PoolError::Connect {
                            key: key.clone(),
                            source: Arc::new(ConnectError::ClosedAtOnce),
                        });
                    }
                }
                match &entry.connecting {
                    Some((_, attempt)) => attempt.clone(),
                    None => self.start_attempt(key, cert, entry),
                }
            };
            match attempt.await {
                Ok(id) => awaited = Some(id),
                Err(source) => {
                    return Err(PoolError::Connect {
                        key: key.clone(),
                        source,
                    })
                }
            }
        }
    }

    /// Starts establishing a connection for `key` on its own task and records it as
    /// the key's attempt.
    fn start_attempt(
        self: &Arc<Self>,
        key: &PoolKey,
        cert: &WorkloadCert,
        entry: &mut Entry,
    ) -> Attempt {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let inner = self.clone();
        let (key, cert) = (key.clone(), cert.clone());
        let task = tokio::spawn(async move { inner.establish(id, key, cert).await });
        let attempt = async move {
            task.await
                .unwrap_or_else(|_| Err(Arc::new(ConnectError::Interrupted)))
        }
        .boxed()
        .shared();
        entry.connecting = Some((id, attempt.clone()));
        attempt
    }

    async fn establish(
        self: Arc<Self>,
        id: u64,
        key: PoolKey,
        cert: WorkloadCert,
    ) -> Result<u64, Arc<ConnectError>> {
        // However this ends (even aborted or panicking), the key is free for a new
        // attempt afterwards.
        let _attempt = AttemptDone {
            inner: &self,
            key: &key,
            id,
        };
        let timeout = self.config.connect_timeout;
        let result = tokio::time::timeout(timeout, async {
            let io = self.connector.connect(&key, &cert).await?;
            Ok::<_, ConnectError>(HboneConnection::handshake(io, self.config.settings).await?)
        })
        .await
        .unwrap_or(Err(ConnectError::Timeout(timeout)));
        let conn = match result {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(%key, error = %e, "HBONE connection failed");
                return Err(Arc::new(e));
            }
        };
        tracing::debug!(%key, id, "HBONE connection established");
        let mut state = self.lock();
        state
            .keys
            .entry(key.clone())
            .or_default()
            .conns
            .push(Pooled {
                id,
                conn,
                cert: cert.certified_key(),
                idle_since: None,
            });
        if state.sweeper.is_none() {
            let every = (self.config.idle_timeout / 4)
                .clamp(Duration::from_millis(10), Duration::from_secs(15));
            let task = tokio::spawn(sweep_idle(Arc::downgrade(&self), every));
            state.sweeper = Some(task.abort_handle());
        }
        Ok(id)
    }
}

/// Clears a key's attempt when the task establishing it ends.
struct AttemptDone<'a, C> {
    inner: &'a Inner<C>,
    key: &'a PoolKey,
    id: u64,
}

impl<C> Drop for AttemptDone<'_, C> {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        if let Some(entry) = state.keys.get_mut(self.key) {
            if entry
                .connecting
                .as_ref()
                .is_some_and(|(id, _)| *id == self.id)
            {
                entry.connecting = None;
            }
            if entry.is_empty() {
                state.keys.remove(self.key);
            }
        }
    }
}

/// Closes idle connections until the pool is empty or gone.
async fn sweep_idle<C>(pool: Weak<Inner<C>>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        if !pool.sweep(Instant::now()) {
            return;
        }
    }
}

impl<C> Drop for Inner<C> {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(sweeper) = state.sweeper.take() {
            sweeper.abort();
        }
    }
}
