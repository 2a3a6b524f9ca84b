//! HBONE transport: HTTP/2 `CONNECT` tunnels inside mutual TLS (see `ambit_core::hbone`
//! for the request semantics). [`server`] terminates tunnels and hands each accepted
//! CONNECT to a handler that opens the upstream; [`client`] opens tunnels over an
//! established TLS connection. [`H2Stream`] makes a tunnel an ordinary byte stream.
//!
//! Flow-control windows are large (stream 4 MiB, connection 16 MiB by default) so one
//! connection carries bulk transfers at full speed, and configurable.

pub mod client;
pub mod pool;
pub mod server;

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// HTTP/2 settings for HBONE connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Settings {
    pub stream_window: u32,
    pub connection_window: u32,
    /// Streams (tunnels) one connection carries at most.
    pub max_streams: u32,
    pub max_frame_size: u32,
    /// Every this often each side PINGs the other, and closes the connection when the
    /// answer takes longer than `keepalive_timeout`: a peer that vanished (node gone,
    /// link cut) would otherwise hold the connection and its tunnels forever. `None`
    /// sends no PINGs.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// A server closes a connection whose client has not sent the HTTP/2 preface and
    /// SETTINGS within this long after TLS: an idle connection would otherwise be held
    /// for ever.
    pub handshake_timeout: Duration,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_streams: 100,
            max_frame_size: 1 << 20,
            keepalive_interval: Some(Duration::from_secs(10)),
            keepalive_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Completes when the peer fails to answer a PING in time (see
/// [`H2Settings::keepalive_interval`]); never, if keepalive is off or the connection
/// offers no PINGs. A PING the connection cannot send means it has ended, which its
/// own future reports, so that never completes either.
pub(crate) async fn keepalive(ping_pong: Option<h2::PingPong>, settings: H2Settings) -> Duration {
    let (Some(mut ping_pong), Some(every)) = (ping_pong, settings.keepalive_interval) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every).await;
        let answer = tokio::time::timeout(
            settings.keepalive_timeout,
            ping_pong.ping(h2::Ping::opaque()),
        )
        .await;
        match answer {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_elapsed) => return settings.keepalive_timeout,
        }
    }
}

/// One HBONE tunnel as a byte stream: reads come from the peer's DATA frames, writes
/// become DATA frames, shutdown sends END_STREAM (a TCP half-close carried through).
#[derive(Debug)]
pub struct H2Stream {
    pub(crate) send: SendStream<Bytes>,
    pub(crate) recv: RecvStream,
    /// Received data not yet read.
    pub(crate) pending: Bytes,
    pub(crate) shut_down: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            shut_down: false,
        }
    }
}

pub(crate) fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = match e.reason() {
        Some(h2::Reason::CANCEL) | Some(h2::Reason::NO_ERROR) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())), // END_STREAM: EOF
                Some(Ok(data)) => {
                    // Return the window at once: the bytes are ours now, and the
                    // peer may send more while they wait to be read.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
            }
        }
        let n = buf.remaining().min(self.pending.len());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.shut_down {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.send.reserve_capacity(data.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                Some(Ok(0)) => continue,
                Some(Ok(cap)) => {
                    let n = cap.min(data.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&data[..n]), false)
                        .map_err(h2_io_error)?;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 writes frames as the connection task polls; nothing is held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut_down {
            self.shut_down = true;
            self.send
                .send_data(Bytes::new(), true)
                .map_err(h2_io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}
