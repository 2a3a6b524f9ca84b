//! The open inbound connections (HBONE tunnels and plaintext) with what their
//! authorization was decided on, so that when the policies change, those now denied
//! are closed ("late rejection"). The app side of each is an [`AppSocket`]: the
//! registry holds only its close switch, never a second descriptor, so a tunnel costs
//! one descriptor on this side and running out of them refuses a CONNECT (503) rather
//! than losing an accepted connection. Closing shuts the socket down, which ends the
//! relay and closes the client side too.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use ambit_core::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// One open inbound connection.
#[derive(Debug)]
pub struct OpenInbound {
    /// The destination pod (its workload uid).
    pub pod: String,
    /// The peer identity (HBONE); `None` for plaintext.
    pub peer: Option<SpiffeId>,
    /// The source address authorization saw.
    pub source: SocketAddr,
    /// The app's address (the original destination).
    pub destination: SocketAddr,
    /// Closes the app side.
    switch: Arc<CloseSwitch>,
}

/// Every open inbound connection of this ztunnel.
#[derive(Debug, Default)]
pub struct OpenInbounds {
    next: AtomicU64,
    open: Mutex<HashMap<u64, OpenInbound>>,
}

/// Keeps a connection registered until dropped. Two words.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<OpenInbounds>,
    id: u64,
}

impl OpenInbounds {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Registers a connection whose app side is `app`; the returned socket is what
    /// the relay uses, and what [`OpenInbounds::close_denied`] closes.
    pub fn register(
        self: &Arc<Self>,
        pod: &str,
        peer: Option<SpiffeId>,
        source: SocketAddr,
        destination: SocketAddr,
        app: TcpStream,
    ) -> (AppSocket, Registration) {
        let switch = Arc::new(CloseSwitch::default());
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            OpenInbound {
                pod: pod.to_owned(),
                peer,
                source,
                destination,
                switch: switch.clone(),
            },
        );
        (
            AppSocket { io: app, switch },
            Registration {
                registry: self.clone(),
                id,
            },
        )
    }

    /// Closes every open connection `deny` returns a reason for, and says how many.
    pub fn close_denied(&self, mut deny: impl FnMut(&OpenInbound) -> Option<String>) -> usize {
        let mut closed = 0;
        let open = self.lock();
        for entry in open.values() {
            if let Some(reason) = deny(entry) {
                tracing::info!(
                    pod = %entry.pod,
                    peer = %entry.peer.as_ref().map(ToString::to_string).unwrap_or_else(|| "none (plaintext)".into()),
                    src = %entry.source,
                    dst = %entry.destination,
                    %reason,
                    "open connection now denied by policy: closed"
                );
                entry.switch.close();
                closed += 1;
            }
        }
        closed
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, OpenInbound>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// Set once to close a connection; wakes the task relaying it.
#[derive(Debug, Default)]
struct CloseSwitch {
    closed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl CloseSwitch {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Called when the socket would block: the relay's task is woken by a close.
    /// Says whether the switch was thrown meanwhile.
    fn wait(&self, cx: &Context<'_>) -> bool {
        let mut slot = self.waker.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *slot = Some(cx.waker().clone()),
        }
        drop(slot);
        self.is_closed()
    }
}

/// The app side of an open inbound connection: the socket, which a policy change can
/// close through the registry. Closed, it reads as the end of the stream and refuses
/// writes, as a socket shut down both ways does, and it is shut down for the app too.
#[derive(Debug)]
pub struct AppSocket {
    io: TcpStream,
    switch: Arc<CloseSwitch>,
}

impl AppSocket {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// Whether the connection was closed by a policy; shuts the socket down the
    /// first time it is seen (the app sees its end).
    fn closed(&self) -> bool {
        if !self.switch.is_closed() {
            return false;
        }
        let _ = socket2::SockRef::from(&self.io).shutdown(Shutdown::Both);
        true
    }
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "connection closed: now denied by policy",
    )
}

impl AsyncRead for AppSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed() {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending if this.switch.wait(cx) && this.closed() => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl AsyncWrite for AppSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed() {
            return Poll::Ready(Err(closed_error()));
        }
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Pending if this.switch.wait(cx) && this.closed() => {
                Poll::Ready(Err(closed_error()))
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn descriptors() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    async fn pair(listener: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    /// Issue 12 item 8: registering kept a `dup` of every app socket, so a tunnel cost
    /// two descriptors on the destination and the last connections before the limit
    /// were accepted and then lost.
    #[tokio::test]
    async fn registering_a_connection_costs_no_descriptor() {
        let registry = OpenInbounds::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut held = Vec::new();
        for _ in 0..50 {
            held.push(pair(&listener).await);
        }
        let before = descriptors();
        let mut registered = Vec::new();
        for (client, server) in held.drain(..) {
            registered.push((
                client,
                registry.register("pod", None, addr(), addr(), server),
            ));
        }
        assert_eq!(descriptors(), before, "registering opened descriptors");
        assert_eq!(registry.len(), 50);
        drop(registered);
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn a_closed_connection_ends_a_pending_read_and_the_app_sees_its_end() {
        let registry = OpenInbounds::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut app, accepted) = pair(&listener).await;
        let (mut socket, _registration) = registry.register("pod", None, addr(), addr(), accepted);
        socket.write_all(b"before").await.unwrap();
        let mut got = [0u8; 6];
        app.read_exact(&mut got).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = socket.read(&mut buf).await.unwrap();
            let write = socket.write(b"after").await;
            (n, write.is_err())
        });
        // Let the read go pending, then close it as a new DENY would.
        tokio::task::yield_now().await;
        let closed = registry.close_denied(|_| Some("test".into()));
        assert_eq!(closed, 1);
        let (n, write_failed) = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("the pending read was not woken by the close")
            .unwrap();
        assert_eq!(n, 0, "a closed connection reads as its end");
        assert!(write_failed, "a closed connection refuses writes");
        let mut rest = Vec::new();
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            app.read_to_end(&mut rest),
        )
        .await
        .expect("the app did not see the end")
        .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
