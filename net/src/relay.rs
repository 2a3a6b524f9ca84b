//! Moving a proxied connection's bytes both ways, sized to the traffic.
//!
//! `tokio::io::copy_bidirectional` keeps a fixed 8 KiB buffer per direction for the
//! connection's whole life, and copying into an HBONE tunnel costs one more copy into
//! a fresh `Bytes` per write. Here a buffer exists only while bytes are moving: each
//! read gets a fresh allocation that is handed on as it is (to h2 without a copy) and
//! freed once written, so an idle connection holds no buffer at all. The read size
//! adapts to the traffic: it doubles while reads fill it (bulk transfers get large
//! DATA frames and few system calls) and halves while they use little of it.
//!
//! Semantics are those of `copy_bidirectional`: an end of stream in one direction is
//! passed on as a half-close (TCP FIN, h2 END_STREAM), the relay ends when both
//! directions have ended, and an error in either direction ends it at once (the caller
//! then drops both ends, which resets them). Byte counts are kept even then.
//!
//! The read size starts at 16 KiB, doubles while reads fill it (up to 256 KiB) and
//! halves while they use less than an eighth of it (down to 2 KiB).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::hbone::{h2_io_error, H2Stream};

/// Smallest and largest read size.
const MIN_CHUNK: u32 = 2 << 10;
const MAX_CHUNK: u32 = 256 << 10;
/// Read size of a new connection.
const FIRST_CHUNK: u32 = 16 << 10;

/// What a relay carried, and how it ended.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes read from the first end and written to the second.
    pub forward: u64,
    /// Bytes read from the second end and written to the first.
    pub backward: u64,
    /// Why the relay stopped early, if it did.
    pub error: Option<io::Error>,
}

/// Relays between a byte stream (a TCP connection, usually) and an HBONE tunnel until
/// both directions have ended. `forward` counts bytes from `io` into the tunnel.
///
/// The future owns both ends and is small (a few hundred bytes), because a proxy holds
/// one per open connection: pass `&mut stream` to keep using a stream afterwards.
pub fn relay_tunnel<A>(io: A, tunnel: H2Stream) -> TunnelRelay<A>
where
    A: AsyncRead + AsyncWrite + Unpin,
{
    let H2Stream {
        send,
        recv,
        pending,
        shut_down,
    } = tunnel;
    let mut forward = Half::new();
    // Whoever used the tunnel as a stream before may have ended it or left bytes.
    forward.eof = shut_down;
    forward.done = shut_down;
    let mut backward = Half::new();
    backward.pending = pending;
    TunnelRelay {
        io,
        send,
        recv,
        forward,
        backward,
    }
}

/// The future of [`relay_tunnel`].
#[derive(Debug)]
#[must_use = "a relay does nothing unless awaited"]
pub struct TunnelRelay<A> {
    io: A,
    send: SendStream<Bytes>,
    recv: RecvStream,
    forward: Half,
    backward: Half,
}

impl<A: AsyncRead + AsyncWrite + Unpin> Future for TunnelRelay<A> {
    type Output = Relayed;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Relayed> {
        let this = &mut *self;
        let step = (|| {
            let f = this
                .forward
                .poll(cx, &mut Io(&mut this.io), &mut H2Send(&mut this.send))?;
            let b = this
                .backward
                .poll(cx, &mut H2Recv(&mut this.recv), &mut Io(&mut this.io))?;
            Ok(both(f, b))
        })();
        finish(step, &this.forward, &this.backward)
    }
}

/// Relays between two byte streams until both directions have ended. `forward`
/// counts bytes from `a` to `b`. Small, like [`relay_tunnel`].
pub fn relay_streams<A, B>(a: A, b: B) -> StreamRelay<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    StreamRelay {
        a,
        b,
        forward: Half::new(),
        backward: Half::new(),
    }
}

/// The future of [`relay_streams`].
#[derive(Debug)]
#[must_use = "a relay does nothing unless awaited"]
pub struct StreamRelay<A, B> {
    a: A,
    b: B,
    forward: Half,
    backward: Half,
}

impl<A, B> Future for StreamRelay<A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Relayed;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Relayed> {
        let this = &mut *self;
        let step = (|| {
            let f = this
                .forward
                .poll(cx, &mut Io(&mut this.a), &mut Io(&mut this.b))?;
            let b = this
                .backward
                .poll(cx, &mut Io(&mut this.b), &mut Io(&mut this.a))?;
            Ok(both(f, b))
        })();
        finish(step, &this.forward, &this.backward)
    }
}

/// The relay's result once it is over: both directions ended, or one failed.
fn finish(step: io::Result<Poll<()>>, forward: &Half, backward: &Half) -> Poll<Relayed> {
    let error = match step {
        Ok(Poll::Pending) => return Poll::Pending,
        Ok(Poll::Ready(())) => None,
        Err(e) => Some(e),
    };
    Poll::Ready(Relayed {
        forward: forward.bytes,
        backward: backward.bytes,
        error,
    })
}

fn both(a: Poll<()>, b: Poll<()>) -> Poll<()> {
    match (a, b) {
        (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(()),
        _ => Poll::Pending,
    }
}

/// One direction: bytes read and not yet written, and where it stands.
#[derive(Debug)]
struct Half {
    pending: Bytes,
    chunk: u32,
    bytes: u64,
    /// The source has ended; once `pending` is written the sink is finished.
    eof: bool,
    /// The sink has been finished: this direction is over.
    done: bool,
}

impl Half {
    fn new() -> Self {
        Half {
            pending: Bytes::new(),
            chunk: FIRST_CHUNK,
            bytes: 0,
            eof: false,
            done: false,
        }
    }

    /// Moves bytes until the direction ends (Ready) or cannot go on now (Pending).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut impl Source,
        sink: &mut impl Sink,
    ) -> Result<Poll<()>, io::Error> {
        loop {
            if self.done {
                return Ok(Poll::Ready(()));
            }
            let step = if !self.pending.is_empty() {
                sink.poll_drain(self, cx)
            } else if self.eof {
                let finished = sink.poll_finish(cx);
                if let Poll::Ready(Ok(())) = finished {
                    self.done = true;
                }
                finished
            } else {
                source.poll_fill(self, cx)
            };
            match step {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(Poll::Pending),
            }
        }
    }

    /// Reads once from `io` into a fresh buffer of the current read size. A pending
    /// read frees the buffer again, so an idle connection holds none.
    fn poll_read_io<R: AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let mut buf = BytesMut::with_capacity(self.chunk as usize);
        let n = ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut buf))?;
        if n == 0 {
            self.eof = true;
        } else {
            self.bytes += n as u64;
            self.adapt(n);
            self.pending = buf.freeze();
        }
        Poll::Ready(Ok(()))
    }

    /// Grows the read size while reads fill it, shrinks it while they use little.
    fn adapt(&mut self, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if n >= self.chunk {
            self.chunk = (self.chunk * 2).min(MAX_CHUNK);
        } else if n < self.chunk / 8 {
            self.chunk = (self.chunk / 2).max(MIN_CHUNK);
        }
    }

    fn poll_write_io<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(io).poll_write(cx, &self.pending))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        let _ = self.pending.split_to(n);
        Poll::Ready(Ok(()))
    }

    /// Takes the next DATA frame of a tunnel as it is, returning its flow-control
    /// window at once: the bytes are ours now, and the peer may send more meanwhile.
    fn poll_recv_h2(
        &mut self,
        recv: &mut RecvStream,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        match ready!(recv.poll_data(cx)) {
            None => self.eof = true,
            Some(Ok(data)) => {
                let _ = recv.flow_control().release_capacity(data.len());
                self.bytes += data.len() as u64;
                self.pending = data;
            }
            Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
        }
        Poll::Ready(Ok(()))
    }

    /// Hands as much of the pending bytes to h2 as the flow-control window allows,
    /// without copying them.
    fn poll_send_h2(
        &mut self,
        send: &mut SendStream<Bytes>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        send.reserve_capacity(self.pending.len());
        // Capacity already assigned is not announced again by `poll_capacity`.
        let mut capacity = send.capacity();
        if capacity == 0 {
            capacity = match ready!(send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                Some(Ok(n)) => n,
            };
        }
        let n = capacity.min(self.pending.len());
        if n > 0 {
            let data = self.pending.split_to(n);
            send.send_data(data, false).map_err(h2_io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Ends the tunnel's sending side with an empty END_STREAM frame.
fn poll_finish_h2(send: &mut SendStream<Bytes>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    send.reserve_capacity(0);
    Poll::Ready(send.send_data(Bytes::new(), true).map_err(h2_io_error))
}

/// Where a direction's bytes come from.
trait Source {
    /// Fills `half.pending`, or sets `half.eof` at the end of the stream.
    fn poll_fill(&mut self, half: &mut Half, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// Where a direction's bytes go.
trait Sink {
    /// Takes some of `half.pending`.
    fn poll_drain(&mut self, half: &mut Half, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Passes the end of the stream on.
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// A byte stream, either end of a direction.
struct Io<'a, T>(&'a mut T);

impl<T: AsyncRead + Unpin> Source for Io<'_, T> {
    fn poll_fill(&mut self, half: &mut Half, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        half.poll_read_io(self.0, cx)
    }
}

impl<T: AsyncWrite + Unpin> Sink for Io<'_, T> {
    fn poll_drain(&mut self, half: &mut Half, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        half.poll_write_io(self.0, cx)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// A tunnel's receiving half.
struct H2Recv<'a>(&'a mut RecvStream);

impl Source for H2Recv<'_> {
    fn poll_fill(&mut self, half: &mut Half, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        half.poll_recv_h2(self.0, cx)
    }
}

/// A tunnel's sending half.
struct H2Send<'a>(&'a mut SendStream<Bytes>);

impl Sink for H2Send<'_> {
    fn poll_drain(&mut self, half: &mut Half, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        half.poll_send_h2(self.0, cx)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_finish_h2(self.0, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_size_follows_the_traffic_within_bounds() {
        let mut half = Half::new();
        for _ in 0..20 {
            let chunk = half.chunk as usize;
            half.adapt(chunk);
        }
        assert_eq!(half.chunk, MAX_CHUNK);
        // A read using most of the buffer keeps the size.
        half.adapt(MAX_CHUNK as usize / 2);
        assert_eq!(half.chunk, MAX_CHUNK);
        for _ in 0..20 {
            half.adapt(10);
        }
        assert_eq!(half.chunk, MIN_CHUNK);
    }
}
