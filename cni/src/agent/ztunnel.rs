//! The agent's connection to the node's ztunnel (the hand-off socket): one task owns
//! it, reconnects when ztunnel restarts, and then replays every pod it was told to
//! serve, as a snapshot, so ztunnel serves exactly those pods again.
//!
//! A new ztunnel (an upgrade) binds the hand-off socket's path anew while the old one
//! still runs: the agent notices the path now names another socket, connects to it and
//! hands it every pod, so both serve them until the old one stops. The old connection
//! is dropped; the old ztunnel keeps serving its pods until it is stopped.
//!
//! The snapshot's end (`SnapshotSent`, after which ztunnel drops pods not named) is
//! held back until the agent has rebuilt its own state after starting
//! ([`ZtunnelHandle::state_complete`]): an agent that just started knows no pods yet,
//! and must not make ztunnel drop the ones it serves.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use ambit_net::handoff::HandoffClient;
use ambit_proto::handoff::WorkloadInfo;
use tokio::sync::{mpsc, oneshot, watch};

/// A pod ztunnel is to serve.
#[derive(Debug)]
pub struct Served {
    pub info: WorkloadInfo,
    /// The pod's network namespace.
    pub netns: OwnedFd,
}

enum Op {
    Add {
        uid: String,
        served: Served,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Remove {
        uid: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Talks to the ztunnel task.
#[derive(Debug, Clone)]
pub struct ZtunnelHandle {
    ops: mpsc::Sender<Op>,
    complete: watch::Sender<bool>,
    connected: watch::Receiver<u64>,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Add { uid, .. } => write!(f, "add {uid}"),
            Op::Remove { uid, .. } => write!(f, "remove {uid}"),
        }
    }
}

impl ZtunnelHandle {
    /// Hands `uid` to ztunnel and waits for its acknowledgement (it then serves the
    /// pod). Fails at once while ztunnel is not connected.
    pub async fn add(&self, uid: &str, served: Served) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Add {
            uid: uid.to_owned(),
            served,
            reply,
        })
        .await?;
        answer
            .await
            .map_err(|_| "the ztunnel connection task stopped".to_owned())?
    }

    /// Tells ztunnel to stop serving `uid`, and forgets it for later snapshots. While
    /// ztunnel is not connected it is only forgotten (the next snapshot leaves it out).
    pub async fn remove(&self, uid: &str) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.send(Op::Remove {
            uid: uid.to_owned(),
            reply,
        })
        .await?;
        answer
            .await
            .map_err(|_| "the ztunnel connection task stopped".to_owned())?
    }

    /// The agent's state is rebuilt: snapshots may be closed from now on.
    pub fn state_complete(&self) {
        self.complete.send_replace(true);
    }

    /// Counts connections made so far; changes whenever ztunnel (re)connects.
    pub fn connections(&self) -> watch::Receiver<u64> {
        self.connected.clone()
    }

    async fn send(&self, op: Op) -> Result<(), String> {
        self.ops
            .send(op)
            .await
            .map_err(|_| "the ztunnel connection task stopped".to_owned())
    }
}

/// Starts the task that keeps the connection to ztunnel's hand-off socket `socket`.
pub fn start(socket: PathBuf) -> ZtunnelHandle {
    let (ops_tx, ops) = mpsc::channel(64);
    let (complete_tx, complete) = watch::channel(false);
    let (connected_tx, connected) = watch::channel(0);
    tokio::spawn(run(socket, ops, complete, connected_tx));
    ZtunnelHandle {
        ops: ops_tx,
        complete: complete_tx,
        connected,
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

async fn run(
    socket: PathBuf,
    mut ops: mpsc::Receiver<Op>,
    mut complete: watch::Receiver<bool>,
    connected: watch::Sender<u64>,
) {
    // What ztunnel is to serve: replayed on every connection.
    let mut served: BTreeMap<String, Served> = BTreeMap::new();
    let mut backoff = MIN_BACKOFF;
    let mut last_error = String::new();
    // A connection to a new ztunnel, made while connected to the old one.
    let mut successor: Option<(HandoffClient, Option<SocketFile>)> = None;
    loop {
        let attempt = match successor.take() {
            Some(next) => Ok(next),
            None => {
                // Before connecting: a socket replaced in between is noticed later.
                let file = SocketFile::of(&socket);
                HandoffClient::connect(&socket).await.map(|c| (c, file))
            }
        };
        let (client, file) = match attempt {
            Ok(client) => client,
            Err(e) => {
                let error = e.to_string();
                if error != last_error {
                    tracing::warn!(socket = %socket.display(), error = %error, "ztunnel is not reachable; enrolled pods' traffic is refused until it is");
                    last_error = error;
                }
                // Until it is back, additions fail and removals are only remembered.
                let deadline = tokio::time::sleep(backoff);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        () = &mut deadline => break,
                        op = ops.recv() => match op {
                            None => return,
                            Some(op) => disconnected(op, &mut served, &last_error),
                        },
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        last_error.clear();
        let watch = Successor {
            path: &socket,
            file,
        };
        match session(
            &client,
            &watch,
            &mut served,
            &mut ops,
            &mut complete,
            &connected,
        )
        .await
        {
            Ok(()) => return,
            Err(SessionEnd::Replaced(next, file)) => {
                tracing::info!(socket = %socket.display(), "a new ztunnel listens on the hand-off socket; handing every pod to it");
                successor = Some((next, file));
            }
            Err(SessionEnd::Lost(e)) => {
                tracing::warn!(error = %e, "connection to ztunnel lost; reconnecting");
            }
        }
    }
}

/// Which socket a hand-off path names (device and inode): a new ztunnel binding the
/// path makes a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketFile {
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn of(path: &std::path::Path) -> Option<SocketFile> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| SocketFile {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// How often the agent looks whether a new ztunnel has bound the hand-off path.
const SUCCESSOR_POLL: Duration = Duration::from_millis(100);

/// The hand-off path and the socket the current connection went to.
struct Successor<'a> {
    path: &'a std::path::Path,
    file: Option<SocketFile>,
}

impl Successor<'_> {
    /// Completes with a connection to a new ztunnel once one listens on the path.
    async fn appeared(&self) -> (HandoffClient, Option<SocketFile>) {
        let mut tick = tokio::time::interval(SUCCESSOR_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = SocketFile::of(self.path);
            if now.is_none() || now == self.file {
                continue;
            }
            // A path bound but not listening yet is tried again at the next tick.
            match HandoffClient::connect(self.path).await {
                Ok(client) => return (client, now),
                Err(e) => {
                    tracing::debug!(error = %e, "a new hand-off socket, not answering yet");
                }
            }
        }
    }
}

/// Why a session with ztunnel ended.
enum SessionEnd {
    /// The connection broke or ztunnel went away.
    Lost(String),
    /// A new ztunnel took the hand-off path: the connection to it.
    Replaced(HandoffClient, Option<SocketFile>),
}

impl From<String> for SessionEnd {
    fn from(e: String) -> Self {
        SessionEnd::Lost(e)
    }
}

fn disconnected(op: Op, served: &mut BTreeMap<String, Served>, error: &str) {
    match op {
        Op::Add { uid, reply, .. } => {
            let _ = reply.send(Err(format!("ztunnel is not running ({error})")));
            tracing::debug!(pod = %uid, "not handed to ztunnel: not connected");
        }
        Op::Remove { uid, reply } => {
            served.remove(&uid);
            let _ = reply.send(Ok(()));
        }
    }
}

/// One connection: the snapshot, then operations until ztunnel goes away (an error)
/// or the agent stops (`Ok`).
async fn session(
    client: &HandoffClient,
    successor: &Successor<'_>,
    served: &mut BTreeMap<String, Served>,
    ops: &mut mpsc::Receiver<Op>,
    complete: &mut watch::Receiver<bool>,
    connected: &watch::Sender<u64>,
) -> Result<(), SessionEnd> {
    let started = std::time::Instant::now();
    let mut refused = Vec::new();
    for (uid, pod) in served.iter() {
        if let Err(e) = client.add(uid, pod.info.clone(), pod.netns.as_fd()).await {
            match e {
                ambit_net::handoff::HandoffError::Refused { .. } => {
                    tracing::warn!(pod = %uid, error = %e, "ztunnel refused a pod of the snapshot");
                    refused.push(uid.clone());
                }
                other => return Err(other.to_string().into()),
            }
        }
    }
    let replayed = served.len();
    let mut snapshot_open = true;
    if *complete.borrow() {
        client.snapshot_sent().await.map_err(|e| e.to_string())?;
        snapshot_open = false;
    }
    tracing::info!(
        pods = replayed,
        refused = refused.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        snapshot_complete = !snapshot_open,
        "connected to ztunnel; pods handed over"
    );
    connected.send_modify(|n| *n += 1);
    loop {
        tokio::select! {
            changed = complete.changed(), if snapshot_open => {
                if changed.is_ok() && *complete.borrow() {
                    client.snapshot_sent().await.map_err(|e| e.to_string())?;
                    snapshot_open = false;
                    tracing::info!("snapshot complete: ztunnel now serves exactly the enrolled pods");
                }
            }
            op = ops.recv() => {
                let Some(op) = op else { return Ok(()) };
                match op {
                    Op::Add { uid, served: pod, reply } => {
                        match client.add(&uid, pod.info.clone(), pod.netns.as_fd()).await {
                            Ok(()) => {
                                served.insert(uid, pod);
                                let _ = reply.send(Ok(()));
                            }
                            Err(ambit_net::handoff::HandoffError::Refused { error, .. }) => {
                                let _ = reply.send(Err(format!("ztunnel refused the pod: {error}")));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(format!("ztunnel connection lost: {e}")));
                                return Err(e.to_string().into());
                            }
                        }
                    }
                    Op::Remove { uid, reply } => {
                        served.remove(&uid);
                        match client.remove(&uid).await {
                            Ok(()) => {
                                let _ = reply.send(Ok(()));
                            }
                            Err(ambit_net::handoff::HandoffError::Refused { error, .. }) => {
                                let _ = reply.send(Err(format!("ztunnel refused to drop the pod: {error}")));
                            }
                            Err(e) => {
                                // Gone with the connection: not in the next snapshot.
                                let _ = reply.send(Ok(()));
                                return Err(e.to_string().into());
                            }
                        }
                    }
                }
            }
            closed = client.closed() => {
                return Err(closed.into());
            }
            (next, file) = successor.appeared() => {
                return Err(SessionEnd::Replaced(next, file));
            }
        }
    }
}
