//! Terminating HBONE: runs the HTTP/2 server side of one mutual-TLS connection and, for
//! each CONNECT, asks a handler for the upstream. The answer is `200` only once the
//! handler has connected; a refusal is answered with its status (400/401/503) and
//! never affects the connection's other tunnels.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Instant;

use ambit_core::hbone::{Baggage, ConnectRefusal, Forwarded, HboneTarget, TraceParent};
use ambit_core::SpiffeId;
use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{H2Settings, H2Stream};
use crate::relay::relay_tunnel;

/// A CONNECT the server accepted for consideration, parsed and typed.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    /// The client's verified identity (from its certificate).
    pub peer: SpiffeId,
    /// Address of the TLS connection's remote end (the source node or pod).
    pub peer_addr: SocketAddr,
    pub target: HboneTarget,
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

/// Decides and opens the upstream for each CONNECT; told how each tunnel ended.
pub trait InboundHandler: Clone + Send + Sync + 'static {
    type Upstream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// What the handler keeps about one accepted tunnel while it is open (its log
    /// fields, its metric counters), handed back with the outcome. Held by every open
    /// tunnel, so keep it small.
    type Tunnel: Send + 'static;
    fn connect(
        &self,
        request: &InboundRequest,
    ) -> impl Future<Output = Result<(Self::Upstream, Self::Tunnel), ConnectRefusal>> + Send;
    fn finished(&self, tunnel: Self::Tunnel, outcome: TunnelOutcome);
    fn refused(&self, request: Option<&InboundRequest>, refusal: &ConnectRefusal);
}

/// Serves HBONE on one established TLS connection until the peer closes it. Each
/// tunnel runs on its own task.
pub async fn serve_connection<IO, H>(
    io: IO,
    peer: SpiffeId,
    peer_addr: SocketAddr,
    settings: H2Settings,
    handler: H,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: InboundHandler,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(settings.stream_window)
        .initial_connection_window_size(settings.connection_window)
        .max_concurrent_streams(settings.max_streams)
        .max_frame_size(settings.max_frame_size)
        .handshake::<_, Bytes>(io)
        .await?;
    while let Some(next) = conn.accept().await {
        let (request, respond) = next?;
        // Accepting a tunnel holds the request and the handler's connect; boxed, that
        // state is freed once the tunnel is open, so the task of an open (often idle)
        // tunnel holds only its relay and the handler's small per-tunnel value.
        let accept = Box::pin(accept_stream(
            request,
            respond,
            peer.clone(),
            peer_addr,
            handler.clone(),
        ));
        let handler = handler.clone();
        tokio::spawn(async move {
            let Some((upstream, tunnel, stream)) = accept.await else {
                return;
            };
            let started = Instant::now();
            let relayed = relay_tunnel(upstream, stream).await;
            handler.finished(
                tunnel,
                TunnelOutcome {
                    bytes_in: relayed.backward,
                    bytes_out: relayed.forward,
                    duration: started.elapsed(),
                    error: relayed.error.map(|e| e.to_string()),
                },
            );
        });
    }
    Ok(())
}

/// Parses a CONNECT, has the handler open the upstream and answers: 200 with the
/// tunnel, or the refusal.
async fn accept_stream<H: InboundHandler>(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SpiffeId,
    peer_addr: SocketAddr,
    handler: H,
) -> Option<(H::Upstream, H::Tunnel, H2Stream)> {
    let (parts, recv) = request.into_parts();
    let inbound = match parse(&parts, peer, peer_addr) {
        Ok(r) => r,
        Err(refusal) => {
            handler.refused(None, &refusal);
            reply_refusal(&mut respond, &refusal);
            return None;
        }
    };
    let (upstream, tunnel) = match handler.connect(&inbound).await {
        Ok(accepted) => accepted,
        Err(refusal) => {
            handler.refused(Some(&inbound), &refusal);
            reply_refusal(&mut respond, &refusal);
            return None;
        }
    };
    // The peer may have gone away meanwhile.
    let send = respond.send_response(Response::new(()), false).ok()?;
    Some((upstream, tunnel, H2Stream::new(send, recv)))
}

fn parse(
    parts: &http::request::Parts,
    peer: SpiffeId,
    peer_addr: SocketAddr,
) -> Result<InboundRequest, ConnectRefusal> {
    if parts.method != Method::CONNECT {
        return Err(ConnectRefusal::NotConnect(parts.method.to_string()));
    }
    let authority = parts.uri.authority().map(|a| a.as_str()).unwrap_or("");
    let target = HboneTarget::parse_authority(authority)?;
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    Ok(InboundRequest {
        peer,
        peer_addr,
        target,
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
