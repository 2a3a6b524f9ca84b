//! Request mirroring (`RequestMirror`): a copy of a request goes to another backend,
//! fire and forget. The copy never slows the original: its body is fed from the
//! original's as the original is read (a [`Tee`]), through a bounded queue; when the
//! copy's upstream falls that far behind, or fails, the copy is abandoned (its body
//! ends in an error, so its upstream sees a reset, not a short request) and the
//! original goes on alone. The copy's response is read and dropped.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::mpsc;

/// Errors of an upstream request body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Data frames a copy may lag behind its original before it is abandoned.
const QUEUE_FRAMES: usize = 64;

/// What a request sends upstream: the client's body, the client's body feeding a
/// copy, or a copy's body.
#[derive(Debug)]
pub enum Outbound {
    Plain(Incoming),
    Teed(Tee),
    Copy(CopyBody),
    /// A body read whole before the first try, so a retry can send it again.
    Full(Option<Bytes>),
    Empty,
}

impl Outbound {
    /// The client's `body`, feeding `copies` copies; their bodies.
    pub fn tee(body: Incoming, copies: usize) -> (Outbound, Vec<Outbound>) {
        if copies == 0 {
            return (Outbound::Plain(body), Vec::new());
        }
        // Nothing to hand over (a GET): hyper may never read such a body at all.
        if body.is_end_stream() {
            let copies = (0..copies).map(|_| Outbound::Empty).collect();
            return (Outbound::Plain(body), copies);
        }
        let mut senders = Vec::with_capacity(copies);
        let mut bodies = Vec::with_capacity(copies);
        for _ in 0..copies {
            let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
            let abandoned = Arc::new(AtomicBool::new(false));
            senders.push(Some((tx, abandoned.clone())));
            bodies.push(Outbound::Copy(CopyBody { rx, abandoned }));
        }
        (
            Outbound::Teed(Tee {
                inner: body,
                copies: senders,
            }),
            bodies,
        )
    }
}

impl Body for Outbound {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Outbound::Plain(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Outbound::Teed(t) => Pin::new(t).poll_frame(cx),
            Outbound::Copy(c) => Pin::new(c).poll_frame(cx),
            Outbound::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Outbound::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Outbound::Plain(b) => b.is_end_stream(),
            Outbound::Teed(t) => t.inner.is_end_stream(),
            Outbound::Copy(_) => false,
            Outbound::Full(b) => b.is_none(),
            Outbound::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Outbound::Plain(b) => b.size_hint(),
            Outbound::Teed(t) => t.inner.size_hint(),
            Outbound::Copy(_) => SizeHint::default(),
            Outbound::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Outbound::Empty => SizeHint::with_exact(0),
        }
    }
}

type Copy = Option<(mpsc::Sender<Bytes>, Arc<AtomicBool>)>;

/// The client's body, handing each data frame to its copies as it passes.
#[derive(Debug)]
pub struct Tee {
    inner: Incoming,
    copies: Vec<Copy>,
}

impl Tee {
    fn abandon_all(&mut self) {
        for copy in &mut self.copies {
            if let Some((_, abandoned)) = copy.take() {
                abandoned.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    for copy in &mut this.copies {
                        let Some((tx, abandoned)) = copy else {
                            continue;
                        };
                        if tx.try_send(data.clone()).is_err() {
                            // Full (the copy's upstream is too slow) or closed (it
                            // failed): the copy is abandoned, never waited for.
                            abandoned.store(true, Ordering::Relaxed);
                            *copy = None;
                        }
                    }
                }
                if this.inner.is_end_stream() {
                    // Dropping the senders ends the copies' bodies cleanly.
                    this.copies.clear();
                }
            }
            None => this.copies.clear(),
            Some(Err(_)) => this.abandon_all(),
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

impl Drop for Tee {
    /// An original that is dropped before its end (its client went away) leaves its
    /// copies incomplete: they are abandoned, not ended as if whole.
    fn drop(&mut self) {
        self.abandon_all();
    }
}

/// A copy's body: what its original's [`Tee`] handed over.
#[derive(Debug)]
pub struct CopyBody {
    rx: mpsc::Receiver<Bytes>,
    abandoned: Arc<AtomicBool>,
}

impl Body for CopyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match std::task::ready!(self.rx.poll_recv(cx)) {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None if self.abandoned.load(Ordering::Relaxed) => {
                Poll::Ready(Some(Err("mirrored request abandoned: its upstream fell behind the original, or the original ended early".into())))
            }
            None => Poll::Ready(None),
        }
    }
}

/// Reads a copy's response to its end and drops it.
pub async fn drain(response: hyper::Response<Incoming>) {
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
}
