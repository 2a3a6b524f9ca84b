//! Opening HBONE tunnels: the HTTP/2 client side of one mutual-TLS connection, which
//! carries many tunnels (streams) at once. Pooling connections across tunnels is the
//! caller's concern; this type only knows one connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use ambit_core::hbone::{Baggage, Forwarded, HboneTarget, TraceParent};
use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{H2Settings, H2Stream};

/// What to ask the far side for.
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    pub target: HboneTarget,
    pub forwarded: Forwarded,
    pub baggage: Baggage,
    pub traceparent: Option<TraceParent>,
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The far side answered with a refusal; `reason` is its `x-ambit-reason`.
    #[error("HBONE CONNECT to {target} refused with {status}{}", reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Refused {
        target: HboneTarget,
        status: u16,
        reason: Option<String>,
    },
    #[error("HBONE connection failed: {0}")]
    H2(#[from] h2::Error),
    #[error("invalid CONNECT request: {0}")]
    Request(#[from] http::Error),
}

impl TunnelError {
    /// Stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            TunnelError::Refused { status: 401, .. } => "denied",
            // The far side's proxy, not its app: out of file descriptors.
            TunnelError::Refused {
                status: 503,
                reason: Some(r),
                ..
            } if r == "descriptors_exhausted" => "destination_descriptors_exhausted",
            TunnelError::Refused { status: 503, .. } => "upstream_connect_failed",
            TunnelError::Refused { .. } => "refused",
            TunnelError::H2(_) => "hbone_connection_failed",
            TunnelError::Request(_) => "bad_request",
        }
    }
}

/// One HBONE connection to a destination; cheap to clone.
#[derive(Debug, Clone)]
pub struct HboneConnection {
    send: SendRequest<Bytes>,
    /// Tunnels currently open on this connection.
    active: Arc<AtomicUsize>,
}

impl HboneConnection {
    /// Runs the HTTP/2 handshake on an established TLS stream; the connection is driven
    /// by a spawned task that ends when the connection closes.
    pub async fn handshake<IO>(io: IO, settings: H2Settings) -> Result<Self, TunnelError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_concurrent_streams(settings.max_streams)
            .max_frame_size(settings.max_frame_size)
            // No HPACK dynamic table: a CONNECT's headers are mostly unique per tunnel
            // (client port, trace ids), and the table cost 4 KiB per side per connection.
            .header_table_size(0)
            .handshake::<_, Bytes>(io)
            .await?;
        let ping_pong = connection.ping_pong();
        tokio::spawn(async move {
            tokio::select! {
                ended = &mut connection => {
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "HBONE connection ended");
                    }
                }
                // Dropping the connection closes it; its tunnels fail, the pool evicts it.
                waited = super::keepalive(ping_pong, settings) => {
                    tracing::info!(?waited, "HBONE peer did not answer a PING; connection closed");
                }
            }
        });
        Ok(HboneConnection {
            send,
            active: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Tunnels open or being opened right now (see [`HboneConnection::reserve`]).
    pub fn active_tunnels(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts one more tunnel on this connection from now on, before its CONNECT is
    /// even sent; [`HboneConnection::connect_in`] hands the count to the tunnel, and
    /// dropping it (the tunnel, or the slot of a failed CONNECT) takes it back. A pool
    /// choosing connections by load so never sees a tunnel twice or not at all.
    pub fn reserve(&self) -> OpenTunnel {
        self.active.fetch_add(1, Ordering::Relaxed);
        OpenTunnel(self.active.clone())
    }

    /// Whether no new tunnel can be opened here any more: the connection failed, the
    /// peer closed it, or it sent GOAWAY. Tunnels already open may still be running.
    /// A pool uses this to stop handing the connection out.
    pub fn is_closed(&self) -> bool {
        // A fresh handle has no stream waiting to open, so `poll_ready` only reports
        // the connection's error state; it never waits and never keeps the waker.
        let mut send = self.send.clone();
        let mut cx = Context::from_waker(Waker::noop());
        matches!(send.poll_ready(&mut cx), Poll::Ready(Err(_)))
    }

    /// Streams the far side lets this connection have open at once (its
    /// SETTINGS_MAX_CONCURRENT_STREAMS; unlimited until its SETTINGS arrive). Beyond it
    /// h2 queues new tunnels instead of failing them, so a pool must stay under it.
    pub fn peer_max_streams(&self) -> usize {
        self.send.current_max_send_streams()
    }

    /// Opens a tunnel; resolves once the far side answered 200.
    pub async fn connect(&self, req: &OutboundRequest) -> Result<Tunnel, TunnelError> {
        self.connect_in(self.reserve(), req).await
    }

    /// [`HboneConnection::connect`] in a slot taken with [`HboneConnection::reserve`].
    pub async fn connect_in(
        &self,
        slot: OpenTunnel,
        req: &OutboundRequest,
    ) -> Result<Tunnel, TunnelError> {
        let mut builder = Request::builder()
            .method(Method::CONNECT)
            .uri(req.target.to_string())
            .header("forwarded", req.forwarded.header_value());
        let baggage = req.baggage.header_value();
        if !baggage.is_empty() {
            builder = builder.header("baggage", baggage);
        }
        if let Some(tp) = &req.traceparent {
            builder = builder.header("traceparent", tp.header_value());
        }
        let request = builder.body(())?;
        let mut send = self.send.clone().ready().await?;
        let (response, stream) = send.send_request(request, false)?;
        let response = response.await?;
        if response.status() != StatusCode::OK {
            return Err(TunnelError::Refused {
                target: req.target,
                status: response.status().as_u16(),
                reason: response
                    .headers()
                    .get("x-ambit-reason")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from),
            });
        }
        Ok(Tunnel {
            stream: H2Stream::new(stream, response.into_body()),
            open: slot,
        })
    }
}

/// An open tunnel: its stream, and its place among its connection's open tunnels.
#[derive(Debug)]
pub struct Tunnel {
    pub stream: H2Stream,
    /// Keep this as long as the stream is in use, also when the stream is moved out.
    pub open: OpenTunnel,
}

/// Counts a tunnel among its connection's open tunnels until dropped.
#[derive(Debug)]
pub struct OpenTunnel(Arc<AtomicUsize>);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
