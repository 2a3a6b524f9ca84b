//! The pod hand-off protocol's transport and both of its ends (`proto/handoff.proto`):
//! a Unix `SOCK_SEQPACKET` socket (one protobuf message per packet) on which the node
//! agent hands ztunnel each enrolled pod's network namespace as a file descriptor
//! (`SCM_RIGHTS`), and ztunnel acknowledges every message.
//!
//! [`serve`] is ztunnel's side: it decodes messages, tracks the snapshot a (re)connected
//! node agent sends, and calls a [`HandoffHandler`]. [`HandoffClient`] is the node
//! agent's side (`ambit-cni agent`; tests use it directly too).
//! This module moves messages; what a pod's listeners are is ztunnel's business.
//!
//! A (re)connecting node agent sends `Hello`, its full snapshot (`Add`/`Keep`), then
//! `SnapshotSent`; ztunnel then drops the pods the snapshot did not name. A new
//! connection replaces the previous one. Every message is acked, with error text in the
//! `Ack`.

use std::collections::BTreeSet;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use ambit_proto::handoff::node_agent_message::Payload;
use ambit_proto::handoff::{
    ztunnel_message, Ack, AddWorkload, DelWorkload, Hello, KeepWorkload, NodeAgentMessage,
    SnapshotSent, WorkloadInfo, ZtunnelMessage, VERSION,
};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use prost::Message;
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Largest message accepted; real ones are a few hundred bytes.
const MAX_PACKET: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("hand-off socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("hand-off connection: {0}")]
    Io(#[from] io::Error),
    #[error("malformed hand-off message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("peer closed the hand-off connection")]
    Closed,
    #[error("unexpected hand-off message: {0}")]
    Unexpected(String),
    #[error("ztunnel refused {what}: {error}")]
    Refused { what: String, error: String },
}

/// One end of a SEQPACKET connection.
#[derive(Debug)]
pub struct PacketConn {
    fd: AsyncFd<OwnedFd>,
}

impl PacketConn {
    /// Connects to a listening hand-off socket.
    pub fn connect(path: &Path) -> Result<Self, HandoffError> {
        let err = |source| HandoffError::Socket {
            path: path.to_path_buf(),
            source,
        };
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(err)?;
        socket
            .connect(&SockAddr::unix(path).map_err(err)?)
            .map_err(err)?;
        PacketConn::from_socket(socket).map_err(err)
    }

    fn from_socket(socket: Socket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        Ok(PacketConn {
            fd: register(OwnedFd::from(socket))?,
        })
    }

    /// Sends one packet, with `fd` attached when given.
    pub async fn send(&self, data: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        self.fd
            .async_io(Interest::WRITABLE, |sock| {
                let cmsgs: &[ControlMessage] = if raw.is_empty() {
                    &[]
                } else {
                    &[ControlMessage::ScmRights(&raw)]
                };
                let n = sendmsg::<UnixAddr>(
                    sock.as_raw_fd(),
                    &[IoSlice::new(data)],
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)?;
                if n != data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "short SEQPACKET send",
                    ));
                }
                Ok(())
            })
            .await
    }

    /// Receives one packet and the descriptor attached to it, if any. `None` when the
    /// peer has closed the connection.
    pub async fn recv(&self) -> io::Result<Option<(Vec<u8>, Option<OwnedFd>)>> {
        self.fd
            .async_io(Interest::READABLE, |sock| {
                let mut buf = vec![0u8; MAX_PACKET];
                let mut cmsg = nix::cmsg_space!([RawFd; 4]);
                let (len, fds, truncated) = {
                    let mut iov = [IoSliceMut::new(&mut buf)];
                    let msg = recvmsg::<UnixAddr>(
                        sock.as_raw_fd(),
                        &mut iov,
                        Some(&mut cmsg),
                        MsgFlags::MSG_CMSG_CLOEXEC,
                    )
                    .map_err(io::Error::from)?;
                    let mut fds = Vec::new();
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            if let ControlMessageOwned::ScmRights(received) = c {
                                fds.extend(received.into_iter().map(adopt_fd));
                            }
                        }
                    }
                    (msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_TRUNC))
                };
                if truncated {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "hand-off message too large",
                    ));
                }
                buf.truncate(len);
                // Messages are never empty, so a zero-length read is the peer's close.
                if len == 0 && fds.is_empty() {
                    return Ok(None);
                }
                // At most one descriptor belongs to a message; extra ones are closed
                // when dropped here.
                Ok(Some((buf, fds.into_iter().next())))
            })
            .await
    }
}

/// Takes ownership of a descriptor the kernel just installed in this process.
#[allow(unsafe_code)]
fn adopt_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was created for this process by recvmsg's SCM_RIGHTS and nothing
    // else holds it; wrapping it makes it closed exactly once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Registers an owned descriptor with tokio's reactor.
#[allow(unsafe_code)]
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open until it is dropped (which is when
    // the AsyncFd is dropped) and always returns that same descriptor.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// ztunnel's listening hand-off socket.
#[derive(Debug)]
pub struct PacketListener {
    socket: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl PacketListener {
    /// Binds `path`, replacing a stale socket file left by a previous run.
    pub fn bind(path: &Path) -> Result<Self, HandoffError> {
        let err = |source| HandoffError::Socket {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let socket = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(err)?;
        socket
            .bind(&SockAddr::unix(path).map_err(err)?)
            .map_err(err)?;
        socket.listen(16).map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        Ok(PacketListener {
            socket: register(OwnedFd::from(socket)).map_err(err)?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn accept(&self) -> io::Result<PacketConn> {
        let (socket, _) = self
            .socket
            .async_io(Interest::READABLE, |s| socket2::SockRef::from(s).accept())
            .await?;
        PacketConn::from_socket(socket)
    }
}

/// What ztunnel does with hand-off messages. Errors are sent back in the Ack.
pub trait HandoffHandler: Send + Sync {
    /// Serve pod `uid` from inside the network namespace `netns`.
    fn add(
        &self,
        uid: &str,
        info: &WorkloadInfo,
        netns: OwnedFd,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
    /// Stop serving pod `uid`.
    fn remove(&self, uid: &str) -> impl std::future::Future<Output = Result<(), String>> + Send;
    /// The pods ztunnel currently serves.
    fn served(&self) -> BTreeSet<String>;
    /// A node agent's snapshot has been served: ztunnel serves exactly the pods it
    /// named, every one of them (a snapshot in which a pod was refused is not
    /// complete: a ztunnel replacing another must not turn ready without it).
    fn snapshot_complete(&self) {}
}

/// Serves node agents on `listener` forever. One node agent at a time: a new
/// connection (the agent restarted) replaces the previous one, which is dropped even
/// if it never closed (a hung agent must not lock its successor out), and replays its
/// snapshot.
pub async fn serve<H: HandoffHandler>(listener: PacketListener, handler: &H) -> io::Result<()> {
    let mut current = accept_retrying(&listener).await;
    loop {
        tracing::info!("node agent connected");
        tokio::select! {
            result = serve_conn(&current, handler) => {
                match result {
                    Ok(()) => tracing::info!("node agent disconnected"),
                    Err(e) => tracing::warn!(error = %e, "node agent connection failed"),
                }
                current = accept_retrying(&listener).await;
            }
            next = accept_retrying(&listener) => {
                tracing::info!("a new node agent connection replaces the previous one");
                current = next;
            }
        }
    }
}

/// The next node agent connection. A failed `accept` (EMFILE, when ztunnel is out of
/// file descriptors) is retried with a doubling backoff: the agent stays queued, and
/// the hand-off socket is never given up, which would leave every later pod unserved.
async fn accept_retrying(listener: &PacketListener) -> PacketConn {
    let mut backoff = std::time::Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "accept failed on the hand-off socket");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// Serves one node agent connection until it closes.
pub async fn serve_conn<H: HandoffHandler>(
    conn: &PacketConn,
    handler: &H,
) -> Result<(), HandoffError> {
    // Pods named since Hello; None once the snapshot is complete.
    let mut snapshot: Option<BTreeSet<String>> = None;
    // Pods of the current snapshot that could not be served.
    let mut refused: Vec<String> = Vec::new();
    while let Some((data, fd)) = conn.recv().await? {
        let msg = NodeAgentMessage::decode(data.as_slice());
        let result: Result<(), String> = match msg.map(|m| m.payload) {
            Err(e) => Err(format!("malformed message: {e}")),
            Ok(None) => Err("message has no payload".into()),
            Ok(Some(Payload::Hello(h))) if h.version != VERSION => Err(format!(
                "protocol version {} not supported; this ztunnel speaks {VERSION}",
                h.version
            )),
            Ok(Some(Payload::Hello(_))) => {
                snapshot = Some(BTreeSet::new());
                refused.clear();
                Ok(())
            }
            Ok(Some(Payload::Add(add))) => match fd {
                None => Err(format!(
                    "add {}: no network namespace descriptor attached",
                    add.uid
                )),
                Some(netns) => {
                    let info = add.workload_info.unwrap_or_default();
                    let r = handler.add(&add.uid, &info, netns).await;
                    match (&r, snapshot.as_mut()) {
                        (Ok(()), Some(s)) => {
                            s.insert(add.uid.clone());
                        }
                        (Err(_), Some(_)) => refused.push(add.uid.clone()),
                        (_, None) => {}
                    }
                    r
                }
            },
            Ok(Some(Payload::Keep(keep))) => match snapshot.as_mut() {
                Some(s) if handler.served().contains(&keep.uid) => {
                    s.insert(keep.uid);
                    Ok(())
                }
                Some(_) => Err(format!(
                    "keep {}: not served here; send add with its namespace",
                    keep.uid
                )),
                None => Err("keep is only valid during a snapshot".into()),
            },
            Ok(Some(Payload::Del(del))) => handler.remove(&del.uid).await,
            Ok(Some(Payload::SnapshotSent(_))) => match snapshot.take() {
                Some(named) => {
                    let mut failures = Vec::new();
                    for stale in handler.served().difference(&named) {
                        tracing::info!(uid = %stale, "pod not in the node agent's snapshot; removing");
                        if let Err(e) = handler.remove(stale).await {
                            failures.push(format!("{stale}: {e}"));
                        }
                    }
                    if !refused.is_empty() {
                        tracing::warn!(pods = ?refused, "the node agent's snapshot is not complete: these pods could not be served");
                    }
                    if failures.is_empty() && refused.is_empty() {
                        handler.snapshot_complete();
                        Ok(())
                    } else if failures.is_empty() {
                        Ok(())
                    } else {
                        Err(failures.join("; "))
                    }
                }
                None => Err("snapshot_sent without hello".into()),
            },
        };
        let ack = ZtunnelMessage {
            payload: Some(ztunnel_message::Payload::Ack(Ack {
                error: result.err().unwrap_or_default(),
            })),
        };
        conn.send(&ack.encode_to_vec(), None).await?;
    }
    Ok(())
}

/// The node agent's end: sends messages and waits for each acknowledgement.
#[derive(Debug)]
pub struct HandoffClient {
    conn: PacketConn,
}

impl HandoffClient {
    /// Connects and says hello; the snapshot follows.
    pub async fn connect(path: &Path) -> Result<Self, HandoffError> {
        let client = HandoffClient {
            conn: PacketConn::connect(path)?,
        };
        client
            .request("hello", Payload::Hello(Hello { version: VERSION }), None)
            .await?;
        Ok(client)
    }

    pub async fn add(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: BorrowedFd<'_>,
    ) -> Result<(), HandoffError> {
        let add = AddWorkload {
            uid: uid.to_string(),
            workload_info: Some(info),
        };
        self.request(&format!("add {uid}"), Payload::Add(add), Some(netns))
            .await
    }

    pub async fn keep(&self, uid: &str) -> Result<(), HandoffError> {
        let keep = KeepWorkload {
            uid: uid.to_string(),
        };
        self.request(&format!("keep {uid}"), Payload::Keep(keep), None)
            .await
    }

    pub async fn remove(&self, uid: &str) -> Result<(), HandoffError> {
        let del = DelWorkload {
            uid: uid.to_string(),
        };
        self.request(&format!("del {uid}"), Payload::Del(del), None)
            .await
    }

    pub async fn snapshot_sent(&self) -> Result<(), HandoffError> {
        self.request(
            "snapshot_sent",
            Payload::SnapshotSent(SnapshotSent {}),
            None,
        )
        .await
    }

    /// Waits until ztunnel closes the connection (it sends nothing unasked), and says
    /// why. Cancel-safe: dropped before it completes, nothing is lost.
    pub async fn closed(&self) -> String {
        loop {
            match self.conn.recv().await {
                Ok(None) => return "ztunnel closed the hand-off connection".into(),
                Err(e) => return format!("hand-off connection: {e}"),
                Ok(Some(_)) => tracing::warn!("unasked message from ztunnel ignored"),
            }
        }
    }

    async fn request(
        &self,
        what: &str,
        payload: Payload,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), HandoffError> {
        let msg = NodeAgentMessage {
            payload: Some(payload),
        };
        self.conn.send(&msg.encode_to_vec(), fd).await?;
        let (data, _) = self.conn.recv().await?.ok_or(HandoffError::Closed)?;
        match ZtunnelMessage::decode(data.as_slice())?.payload {
            Some(ztunnel_message::Payload::Ack(ack)) if ack.error.is_empty() => Ok(()),
            Some(ztunnel_message::Payload::Ack(ack)) => Err(HandoffError::Refused {
                what: what.to_string(),
                error: ack.error,
            }),
            None => Err(HandoffError::Unexpected("empty answer".into())),
        }
    }
}
