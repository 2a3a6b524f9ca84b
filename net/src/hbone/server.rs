//! Terminating HBONE: runs the HTTP/2 server side of one mutual-TLS connection and, for
//! each CONNECT, asks a handler whether to accept it. The answer is `200` only once the
//! handler has accepted (a relaying handler: once it has connected its upstream); a
//! refusal is answered with its status (400/401/503) and never affects the
//! connection's other tunnels.
//!
//! A CONNECT naming `<hostname>:<port>` (Istio's double HBONE) is resolved by the
//! handler ([`TunnelHandler::resolve_host`]) before it is accepted; handlers that do
//! not resolve host names refuse it with 400. A request that is not a CONNECT is
//! answered 400, as Istio's ztunnel does.
//!
//! After the `200` a tunnel either is relayed to the upstream the handler opened
//! ([`InboundHandler`], ztunnel), or is handed to the handler as a byte stream
//! ([`TunnelHandler::serve`], the waypoint, which serves HTTP inside it).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use ambit_core::hbone::{
    Baggage, ConnectRefusal, ConnectTarget, Forwarded, HboneTarget, HostTarget, TraceParent,
};
use ambit_core::SpiffeId;
use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{H2Settings, H2Stream};
use crate::relay::{relay_tunnel, TunnelRelay};

/// A CONNECT the server accepted for consideration, parsed and typed.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    /// The client's verified identity (from its certificate).
    pub peer: SpiffeId,
    /// Address of the TLS connection's remote end (the source node or pod).
    pub peer_addr: SocketAddr,
    /// The address the tunnel reaches: the `:authority`, or what its host name
    /// resolved to.
    pub target: HboneTarget,
    /// The `:authority` when it named a service host name (boxed: rare, and the
    /// request is kept small).
    pub host: Option<Box<HostTarget>>,
    pub forwarded: Option<Forwarded>,
    pub baggage: Baggage,
    pub traceparent: Option<TraceParent>,
}

/// What happened to one tunnel, for logs and metrics.
#[derive(Debug, Clone)]
pub struct TunnelOutcome {
    /// Bytes from the client to the upstream, and back.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: std::time::Duration,
    pub error: Option<String>,
}

/// A relaying handler: decides and opens the upstream for each CONNECT, and the server
/// relays the tunnel's bytes to it (ztunnel). Every `InboundHandler` is a
/// [`TunnelHandler`] whose tunnels are relayed.
pub trait InboundHandler: Clone + Send + Sync + Unpin + 'static {
    type Upstream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// What the handler keeps about one accepted tunnel while it is open (its log
    /// fields, its metric counters), handed back with the outcome. Held by every open
    /// tunnel, so keep it small.
    type Tunnel: Send + Unpin + 'static;
    fn connect(
        &self,
        request: &InboundRequest,
    ) -> impl Future<Output = Result<(Self::Upstream, Self::Tunnel), ConnectRefusal>> + Send;
    fn finished(&self, tunnel: Self::Tunnel, outcome: TunnelOutcome);
    fn refused(&self, request: Option<&InboundRequest>, refusal: &ConnectRefusal);
    /// The address a host-name CONNECT reaches (`peer_addr`: the connection's remote
    /// end, whose address family the answer should have). By default host names are
    /// refused.
    fn resolve_host(
        &self,
        host: &HostTarget,
        peer_addr: SocketAddr,
    ) -> Result<HboneTarget, ConnectRefusal> {
        let _ = peer_addr;
        Err(ConnectRefusal::HostNotAccepted(host.clone()))
    }
}

/// Any handler: decides each CONNECT ([`TunnelHandler::accept`]), then, once `200` is
/// sent, runs the accepted tunnel ([`TunnelHandler::serve`], which gets it as a byte
/// stream). A relaying handler implements [`InboundHandler`] instead; a terminating
/// one (the waypoint, which runs an HTTP server inside each tunnel) implements this.
pub trait TunnelHandler: Clone + Send + Sync + Unpin + 'static {
    /// What `accept` decided about a tunnel, handed to `serve`.
    type Accepted: Send + 'static;
    /// An accepted tunnel's life after the `200`; the tunnel's task holds it as long
    /// as the tunnel is open.
    type Serving: Future<Output = ()> + Send + Unpin + 'static;
    /// Accepts the CONNECT (`Ok`, answered `200`) or refuses it with its status.
    fn accept(
        &self,
        request: &InboundRequest,
    ) -> impl Future<Output = Result<Self::Accepted, ConnectRefusal>> + Send;
    /// Runs the accepted tunnel; `stream` is the terminated tunnel.
    fn serve(&self, accepted: Self::Accepted, stream: H2Stream) -> Self::Serving;
    /// Told of each refusal, after it is answered (`request` is `None` when the
    /// CONNECT itself could not be parsed).
    fn report_refusal(&self, request: Option<&InboundRequest>, refusal: &ConnectRefusal);
    /// As [`InboundHandler::resolve_host`]: by default host names are refused.
    fn resolve_host(
        &self,
        host: &HostTarget,
        peer_addr: SocketAddr,
    ) -> Result<HboneTarget, ConnectRefusal> {
        let _ = peer_addr;
        Err(ConnectRefusal::HostNotAccepted(host.clone()))
    }
}

impl<H: InboundHandler> TunnelHandler for H {
    type Accepted = (H::Upstream, H::Tunnel);
    type Serving = Relaying<H>;

    fn accept(
        &self,
        request: &InboundRequest,
    ) -> impl Future<Output = Result<Self::Accepted, ConnectRefusal>> + Send {
        self.connect(request)
    }

    fn serve(&self, (upstream, tunnel): Self::Accepted, stream: H2Stream) -> Relaying<H> {
        Relaying {
            relay: relay_tunnel(upstream, stream),
            tunnel: Some(tunnel),
            handler: self.clone(),
            started: Instant::now(),
        }
    }

    fn report_refusal(&self, request: Option<&InboundRequest>, refusal: &ConnectRefusal) {
        self.refused(request, refusal);
    }

    fn resolve_host(
        &self,
        host: &HostTarget,
        peer_addr: SocketAddr,
    ) -> Result<HboneTarget, ConnectRefusal> {
        InboundHandler::resolve_host(self, host, peer_addr)
    }
}

/// A relayed tunnel: the bytes moving, then the outcome reported to the handler.
/// Small, for the tunnel's (often long and idle) life.
#[derive(Debug)]
pub struct Relaying<H: InboundHandler> {
    relay: TunnelRelay<H::Upstream>,
    tunnel: Option<H::Tunnel>,
    handler: H,
    started: Instant,
}

impl<H: InboundHandler> Future for Relaying<H> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let relayed = ready!(Pin::new(&mut this.relay).poll(cx));
        if let Some(tunnel) = this.tunnel.take() {
            this.handler.finished(
                tunnel,
                TunnelOutcome {
                    bytes_in: relayed.backward,
                    bytes_out: relayed.forward,
                    duration: this.started.elapsed(),
                    error: relayed.error.map(|e| e.to_string()),
                },
            );
        }
        Poll::Ready(())
    }
}

/// Serves HBONE on one established TLS connection until the peer closes it, or until
/// [`H2Settings::handshake_timeout`] if it never sends the HTTP/2 preface. Each
/// tunnel runs on its own task. Once `drain` completes, the connection takes no new
/// tunnels (GOAWAY: the peer opens its next ones elsewhere) and ends when its open
/// tunnels have.
pub async fn serve_connection<IO, H>(
    io: IO,
    peer: SpiffeId,
    peer_addr: SocketAddr,
    settings: H2Settings,
    handler: H,
    drain: impl Future<Output = ()>,
) -> Result<Ended, h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: TunnelHandler,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_concurrent_streams(settings.max_streams)
        .max_frame_size(settings.max_frame_size)
        // No HPACK dynamic table: a CONNECT's headers are mostly unique per tunnel
        // (client port, trace ids), and the table cost 4 KiB per side per connection.
        .header_table_size(0)
        .handshake::<_, Bytes>(io);
    let Ok(conn) = tokio::time::timeout(settings.handshake_timeout, handshake).await else {
        // Dropping the handshake closes the connection.
        tracing::info!(%peer, %peer_addr, "HBONE client sent no HTTP/2 preface in time; connection closed");
        return Ok(Ended::NoPreface);
    };
    let mut conn = conn?;
    let mut drain = std::pin::pin!(drain);
    let mut draining = false;
    let mut keepalive = std::pin::pin!(super::keepalive(conn.ping_pong(), settings));
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            () = &mut drain, if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            waited = &mut keepalive => {
                // Returning drops the connection, which closes it and its tunnels.
                tracing::info!(%peer, ?waited, "HBONE peer did not answer a PING; connection closed");
                return Ok(Ended::PingUnanswered);
            }
        };
        let Some(next) = next else { break };
        let (request, respond) = next?;
        tokio::spawn(StreamTask::Accepting {
            accept: Box::pin(accept_stream(
                request,
                respond,
                peer.clone(),
                peer_addr,
                handler.clone(),
            )),
            handler: handler.clone(),
        });
    }
    Ok(Ended::Closed)
}

/// How an HBONE connection that [`serve_connection`] served ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The peer closed it, or it drained.
    Closed,
    /// The client sent no HTTP/2 preface within the handshake timeout: closed.
    NoPreface,
    /// The peer did not answer a keepalive PING in time: closed with its tunnels.
    PingUnanswered,
}

impl Ended {
    /// A stable metric label for an end that was ours, `None` for a normal close.
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Ended::Closed => None,
            Ended::NoPreface => Some("h2_preface_timeout"),
            Ended::PingUnanswered => Some("ping_unanswered"),
        }
    }
}

/// Why an accepted TCP connection did not become an HBONE connection.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("TLS handshake not done within {0:?}")]
    Timeout(std::time::Duration),
    /// The verifier already demands an identity; this is a second line.
    #[error("client presented no SPIFFE identity")]
    NoIdentity,
}

/// Runs the server side of mesh TLS on an accepted connection within `timeout`, and
/// returns the stream with the client's verified identity: what every HBONE listener
/// does before [`serve_connection`].
pub async fn accept_tls<IO>(
    tls: &crate::tls::ServerTls,
    io: IO,
    timeout: std::time::Duration,
) -> Result<(tokio_rustls::server::TlsStream<IO>, SpiffeId), AcceptError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let stream = tokio::time::timeout(timeout, tls.accept(io))
        .await
        .map_err(|_| AcceptError::Timeout(timeout))?
        .map_err(AcceptError::Handshake)?;
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::tls::identity_of(c).ok())
        .ok_or(AcceptError::NoIdentity)?;
    Ok((stream, identity))
}

/// What `accept_stream` yields for an accepted tunnel.
type Accepted<H> = (<H as TunnelHandler>::Accepted, H2Stream);

/// One tunnel's task: accepting, boxed because it holds the request and the handler's
/// accept, then serving, for the tunnel's life (small, when relaying). Written out
/// rather than an `async` block, whose state would keep room for both at once.
enum StreamTask<H: TunnelHandler> {
    Accepting {
        accept: Pin<Box<dyn Future<Output = Option<Accepted<H>>> + Send>>,
        handler: H,
    },
    Open(H::Serving),
    Done,
}

impl<H: TunnelHandler> Future for StreamTask<H> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let this = &mut *self;
            match this {
                StreamTask::Accepting { accept, handler } => {
                    *this = match ready!(accept.as_mut().poll(cx)) {
                        Some((accepted, stream)) => {
                            StreamTask::Open(handler.serve(accepted, stream))
                        }
                        None => StreamTask::Done,
                    };
                }
                StreamTask::Open(serving) => {
                    ready!(Pin::new(serving).poll(cx));
                    *this = StreamTask::Done;
                }
                StreamTask::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Parses a CONNECT, has the handler accept it and answers: 200 with the tunnel, or
/// the refusal.
async fn accept_stream<H: TunnelHandler>(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SpiffeId,
    peer_addr: SocketAddr,
    handler: H,
) -> Option<Accepted<H>> {
    let (parts, recv) = request.into_parts();
    let inbound = match parse(&parts, peer, peer_addr, &handler) {
        Ok(r) => r,
        Err(refusal) => {
            handler.report_refusal(None, &refusal);
            reply_refusal(&mut respond, &refusal);
            return None;
        }
    };
    let accepted = match handler.accept(&inbound).await {
        Ok(accepted) => accepted,
        Err(refusal) => {
            handler.report_refusal(Some(&inbound), &refusal);
            reply_refusal(&mut respond, &refusal);
            return None;
        }
    };
    // The peer may have gone away meanwhile.
    let send = respond.send_response(Response::new(()), false).ok()?;
    Some((accepted, H2Stream::new(send, recv)))
}

fn parse<H: TunnelHandler>(
    parts: &http::request::Parts,
    peer: SpiffeId,
    peer_addr: SocketAddr,
    handler: &H,
) -> Result<InboundRequest, ConnectRefusal> {
    if parts.method != Method::CONNECT {
        return Err(ConnectRefusal::NotConnect(parts.method.to_string()));
    }
    let authority = parts.uri.authority().map(|a| a.as_str()).unwrap_or("");
    let (target, host) = match ConnectTarget::parse_authority(authority)? {
        ConnectTarget::Addr(target) => (target, None),
        ConnectTarget::Host(host) => (
            handler.resolve_host(&host, peer_addr)?,
            Some(Box::new(host)),
        ),
    };
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    Ok(InboundRequest {
        peer,
        peer_addr,
        target,
        host,
        // Telemetry headers are advisory: a malformed one is dropped, not fatal.
        forwarded: header("forwarded").and_then(|v| Forwarded::parse(v).ok()),
        baggage: header("baggage").map(Baggage::parse).unwrap_or_default(),
        traceparent: header("traceparent").and_then(|v| v.parse().ok()),
    })
}

fn reply_refusal(respond: &mut SendResponse<Bytes>, refusal: &ConnectRefusal) {
    let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = Response::new(());
    *response.status_mut() = status;
    // The reason helps whoever debugs the client side; it names no secrets.
    if let Ok(v) = http::HeaderValue::from_str(refusal.reason()) {
        response.headers_mut().insert("x-ambit-reason", v);
    }
    let _ = respond.send_response(response, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    /// A handler keeping 80 bytes per tunnel, as ztunnel's does (counters, peer and
    /// target for the closing log).
    #[derive(Clone)]
    struct Eighty;

    impl InboundHandler for Eighty {
        type Upstream = TcpStream;
        type Tunnel = [u64; 10];
        async fn connect(
            &self,
            _request: &InboundRequest,
        ) -> Result<(TcpStream, [u64; 10]), ConnectRefusal> {
            Err(ConnectRefusal::Denied {
                policy: "test".into(),
            })
        }
        fn finished(&self, _tunnel: [u64; 10], _outcome: TunnelOutcome) {}
        fn refused(&self, _request: Option<&InboundRequest>, _refusal: &ConnectRefusal) {}
    }

    /// An open tunnel's task is what an idle tunnel costs, with h2's stream state and
    /// the upstream socket's registration. Tokio rounds a task to 128 bytes, 96 of them
    /// its own: up to 288 bytes of future keep it at 384.
    #[test]
    fn an_open_tunnel_stays_small() {
        let size = std::mem::size_of::<StreamTask<Eighty>>();
        assert!(size <= 288, "StreamTask grew to {size} bytes");
    }
}
