//! Socket work inside a pod's network namespace. ztunnel runs in the node's namespace
//! but, in in-pod mode, listens (15001, 15006, 15008) and connects (to the app, after
//! HBONE termination) from inside each enrolled pod's namespace, which the node agent
//! hands it as a descriptor.
//!
//! A socket stays in the namespace it was created in, whichever thread uses it later.
//! So each [`NetnsHandle`] owns one dedicated OS thread that enters the namespace once
//! (`setns(CLONE_NEWNET)`) and runs the jobs sent to it ([`NetnsHandle::run`]); the
//! sockets it creates are handed back and used from the tokio runtime like any other.
//! The thread exits when the last clone of the handle is dropped.
//!
//! Connecting is on every proxied connection's path, so [`NetnsHandle::connect`] does
//! not wait for the worker: the worker keeps a small stock of fresh sockets made in the
//! namespace, a connect takes one and sets it up on the caller's thread (socket options
//! and `bind` work from any thread), and the worker refills the stock meanwhile.
//!
//! Every socket ztunnel creates in a pod's namespace must carry [`ZTUNNEL_MARK`], or the
//! pod's redirect rules would capture ztunnel's own traffic: [`ListenOpts`] and
//! [`ConnectOpts`] set it by default.
//!
//! Original destinations: the redirect rules hand connections to both the outbound
//! listener (15001) and the inbound plaintext one (15006) with iptables `TPROXY`, which
//! delivers without rewriting the destination, so an accepted socket's `local_addr()`
//! is where the app meant to go; [`original_dst`] reads it and rejects connections
//! made to the listener itself. Both listeners need [`ListenOpts::transparent`].
//!
//! This module must not: enter a namespace on any thread but a handle's own worker (a
//! tokio worker thread that entered one would carry it into every task it runs later);
//! decide what to listen on or where to connect (ztunnel does).

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::sync::oneshot;

use crate::redirect::ZTUNNEL_MARK;

/// A network namespace, with the worker thread that creates sockets in it. Cheap to
/// clone; the namespace (and its worker) stays alive while any clone does, even if its
/// `/run/netns` name is deleted.
#[derive(Clone)]
pub struct NetnsHandle {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    fd: OwnedFd,
    /// Dropping the last sender ends the worker's loop.
    jobs: mpsc::Sender<Job>,
    /// Fresh TCP sockets made in the namespace, for connects.
    stock: Arc<Mutex<Stock>>,
}

/// Sockets kept ready per family; a family gets a stock once it is first used.
#[derive(Default)]
struct Stock {
    v4: Vec<Socket>,
    v6: Vec<Socket>,
    /// A refill of that family is queued.
    refilling_v4: bool,
    refilling_v6: bool,
}

/// A refill makes this many sockets, and starts when fewer than `STOCK_LOW` are left.
const STOCK_SIZE: usize = 16;
const STOCK_LOW: usize = 4;

/// A job for the worker: given whether entering the namespace worked, it runs (or
/// reports the failure) and sends its own reply.
type Job = Box<dyn FnOnce(Result<(), Errno>) + Send>;

/// Jobs only create and configure sockets, which needs little stack.
const WORKER_STACK: usize = 256 * 1024;

impl NetnsHandle {
    /// The namespace at `path`: `/run/netns/NAME` or `/proc/PID/ns/net`. Errors if it
    /// cannot be opened; if it can be opened but not entered (not a network namespace,
    /// no privilege), every [`run`](Self::run) says so.
    pub fn from_path(path: &Path) -> io::Result<NetnsHandle> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|source| {
            io_error(
                source.kind(),
                NetnsError::Open {
                    netns: name.clone(),
                    source,
                },
            )
        })?;
        NetnsHandle::from_fd(OwnedFd::from(file), name)
    }

    /// ztunnel's own namespace (the node's): that of the process's main thread,
    /// `/proc/self/ns/net`.
    pub fn current() -> io::Result<NetnsHandle> {
        NetnsHandle::from_path(Path::new("/proc/self/ns/net"))
    }

    /// The namespace `fd` refers to (as received from the node agent), called `name`
    /// in errors and logs (the pod, say).
    pub fn from_fd(fd: OwnedFd, name: impl Into<String>) -> io::Result<NetnsHandle> {
        static WORKERS: AtomicU64 = AtomicU64::new(0);
        let name: Arc<str> = name.into().into();
        let spawn_error = |source: io::Error| {
            io_error(
                source.kind(),
                NetnsError::Spawn {
                    netns: name.to_string(),
                    source,
                },
            )
        };
        let worker_fd = fd.try_clone().map_err(spawn_error)?;
        let (jobs, queue) = mpsc::channel();
        let id = WORKERS.fetch_add(1, Ordering::Relaxed);
        std::thread::Builder::new()
            .name(format!("netns-{id}"))
            .stack_size(WORKER_STACK)
            .spawn({
                let name = name.clone();
                move || worker(&name, worker_fd, queue)
            })
            .map_err(spawn_error)?;
        Ok(NetnsHandle {
            inner: Arc::new(Inner {
                name,
                fd,
                jobs,
                stock: Arc::default(),
            }),
        })
    }

    /// The name errors and logs give this namespace.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Runs `f` on this namespace's worker thread, inside the namespace. The job is
    /// queued at once, even if the future is never polled; jobs run one at a time, in
    /// order, so `f` must not block for long. Errors from `f` are returned as they are;
    /// the others (the namespace could not be entered, `f` panicked) name the namespace.
    pub fn run<T, F>(&self, f: F) -> impl Future<Output = io::Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let reply = self.submit(f);
        let netns = self.inner.name.clone();
        async move {
            reply.await.map_err(|failure| match failure {
                Failure::Job(e) => e,
                Failure::Worker(cause) => {
                    let kind = cause.kind();
                    io_error(
                        kind,
                        NetnsError::Worker {
                            netns: netns.to_string(),
                            cause,
                        },
                    )
                }
            })
        }
    }

    /// A TCP listener on `addr` in this namespace, ready for the current tokio runtime
    /// (call it from within one). For dual stack, make one IPv4 and one IPv6 listener:
    /// IPv6 ones are `IPV6_V6ONLY`.
    pub async fn listen(
        &self,
        addr: SocketAddr,
        opts: ListenOpts,
    ) -> io::Result<tokio::net::TcpListener> {
        let error = |source: io::Error| {
            io_error(
                source.kind(),
                NetnsError::Listen {
                    netns: self.name().to_owned(),
                    addr,
                    source,
                },
            )
        };
        let listener = self
            .submit(move || bind_listener(addr, &opts))
            .await
            .map_err(|failure| error(failure.into_io()))?;
        tokio::net::TcpListener::from_std(listener).map_err(error)
    }

    /// A TCP connection to `dst` from a socket created (and bound, if
    /// [`ConnectOpts::bind_source`] says so) in this namespace; the handshake itself
    /// runs on the current tokio runtime, within [`ConnectOpts::timeout`].
    pub async fn connect(
        &self,
        dst: SocketAddr,
        opts: ConnectOpts,
    ) -> io::Result<tokio::net::TcpStream> {
        let error = |source: io::Error| {
            io_error(
                source.kind(),
                NetnsError::Connect {
                    netns: self.name().to_owned(),
                    dst,
                    from: opts.bind_source,
                    source,
                },
            )
        };
        if let Some(source) = opts.bind_source {
            if source.is_ipv4() != dst.is_ipv4() {
                return Err(error(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the source and destination address families differ",
                )));
            }
        }
        let fresh = match self.take_stocked(dst) {
            Some(socket) => socket,
            None => self
                .submit(move || new_stream_socket(dst))
                .await
                .map_err(|failure| error(failure.into_io()))?,
        };
        let unconnected = configure_stream(fresh, &opts).map_err(error)?;
        let socket = tokio::net::TcpSocket::from_std_stream(unconnected);
        match tokio::time::timeout(opts.timeout, socket.connect(dst)).await {
            Ok(connected) => connected.map_err(error),
            Err(_elapsed) => Err(error(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {:?}", opts.timeout),
            ))),
        }
    }

    /// A fresh socket for `dst`'s family from the stock, if there is one; queues a
    /// refill when the stock runs low.
    fn take_stocked(&self, dst: SocketAddr) -> Option<Socket> {
        let v4 = dst.is_ipv4();
        let (socket, refill) = {
            let mut stock = self
                .inner
                .stock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let (sockets, refilling) = stock.family(v4);
            let socket = sockets.pop();
            let refill = sockets.len() < STOCK_LOW && !*refilling;
            if refill {
                *refilling = true;
            }
            (socket, refill)
        };
        if refill {
            let stock = self.inner.stock.clone();
            // Nobody waits for it: a failed refill only means the next connects ask
            // the worker themselves (and report why that fails).
            drop(self.submit(move || {
                let mut made = Vec::with_capacity(STOCK_SIZE);
                let result = (0..STOCK_SIZE).try_for_each(|_| {
                    made.push(new_stream_socket(dst)?);
                    Ok(())
                });
                let mut stock = stock.lock().unwrap_or_else(PoisonError::into_inner);
                let (sockets, refilling) = stock.family(v4);
                sockets.append(&mut made);
                *refilling = false;
                result
            }));
        }
        socket
    }

    /// Queues `f` for the worker; the reply tells a failure of `f` from one of the
    /// namespace.
    fn submit<T, F>(&self, f: F) -> impl Future<Output = Result<T, Failure>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |entered| {
            let result = match entered {
                Ok(()) => f().map_err(Failure::Job),
                Err(errno) => Err(Failure::Worker(WorkerError::Enter(errno))),
            };
            // The caller may have given up; the result (a socket, say) is then dropped.
            let _ = reply.send(result);
        });
        // The worker only stops once every sender, ours included, is gone: a failed
        // send means it died, and the dropped reply says so below.
        let _ = self.inner.jobs.send(job);
        async move {
            answer
                .await
                .unwrap_or(Err(Failure::Worker(WorkerError::JobLost)))
        }
    }
}

impl AsFd for NetnsHandle {
    /// The namespace's descriptor (for `/proc/self/fd/N`, say); it stays open while the
    /// handle lives.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

impl fmt::Debug for NetnsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetnsHandle")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

/// The worker thread: enters the namespace once, then runs jobs until every handle is
/// gone.
fn worker(name: &str, fd: OwnedFd, queue: mpsc::Receiver<Job>) {
    let entered = setns(&fd, CloneFlags::CLONE_NEWNET);
    drop(fd);
    match entered {
        Ok(()) => tracing::debug!(netns = %name, "entered network namespace"),
        Err(errno) => tracing::warn!(netns = %name, %errno, "cannot enter network namespace"),
    }
    for job in queue {
        // A panicking job loses its own reply, not the namespace's worker.
        let _ = panic::catch_unwind(AssertUnwindSafe(|| job(entered)));
    }
    tracing::debug!(netns = %name, "network namespace worker done");
}

/// How a job failed.
enum Failure {
    Job(io::Error),
    Worker(WorkerError),
}

impl Failure {
    fn into_io(self) -> io::Error {
        match self {
            Failure::Job(e) => e,
            Failure::Worker(cause) => io_error(cause.kind(), cause),
        }
    }
}

/// Why a namespace's worker could not run a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot enter it: {0}")]
    Enter(Errno),
    #[error("its worker dropped the job (the job panicked)")]
    JobLost,
}

impl WorkerError {
    fn kind(self) -> io::ErrorKind {
        match self {
            WorkerError::Enter(errno) => io::Error::from(errno).kind(),
            WorkerError::JobLost => io::ErrorKind::Other,
        }
    }
}

/// What failed, as the `io::Error`s of this module carry it (`get_ref()` and
/// `downcast_ref`); their kind is that of the underlying error.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {netns}: {source}")]
    Open {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the worker thread of network namespace {netns}: {source}")]
    Spawn {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("network namespace {netns}: {cause}")]
    Worker {
        netns: String,
        #[source]
        cause: WorkerError,
    },
    #[error("cannot listen on {addr} in network namespace {netns}: {source}")]
    Listen {
        netns: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot connect to {dst}{} in network namespace {netns}: {source}",
        .from.map(|a| format!(" from {a}")).unwrap_or_default()
    )]
    Connect {
        netns: String,
        dst: SocketAddr,
        from: Option<SocketAddr>,
        #[source]
        source: io::Error,
    },
    #[error(
        "the connection {peer} -> {local} was made to the outbound listener itself, \
         not redirected to it: it has no original destination"
    )]
    NotRedirected { local: SocketAddr, peer: SocketAddr },
    #[error("cannot set mark {mark:#x} on the connection {peer} -> {local}: {source}")]
    SetMark {
        local: SocketAddr,
        peer: SocketAddr,
        mark: u32,
        #[source]
        source: io::Error,
    },
}

fn io_error(
    kind: io::ErrorKind,
    error: impl std::error::Error + Send + Sync + 'static,
) -> io::Error {
    io::Error::new(kind, error)
}

/// How [`NetnsHandle::listen`] sets up its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenOpts {
    /// `IP_TRANSPARENT` / `IPV6_TRANSPARENT`: needed to accept TPROXYed connections
    /// (the outbound listener, 15001, and the inbound plaintext one, 15006).
    pub transparent: bool,
    /// `SO_MARK`; accepted sockets inherit it. Default [`ZTUNNEL_MARK`], so the
    /// redirect rules leave ztunnel's side of the connection alone.
    pub mark: Option<u32>,
    /// `SO_REUSEADDR`, so a restarted ztunnel can listen while old connections linger.
    pub reuse_addr: bool,
    /// `SO_REUSEPORT`: another process of the same user may hold the same address at
    /// the same time (a new ztunnel beside the one it replaces). The kernel spreads new
    /// connections over the holders; when one closes its listener, the connections
    /// queued on it move to another holder if `net.ipv4.tcp_migrate_req` is set in the
    /// namespace (the redirect rules set it), instead of being reset.
    pub reuse_port: bool,
    /// With `reuse_port`: the kernel gives every new connection to the newest holder
    /// of the address (a classic BPF program on the group), so the one it replaces
    /// stops receiving any the moment the new one listens, and its queue is empty by
    /// the time it closes. See [`steer_to_newest`].
    pub steer_to_newest: bool,
    pub backlog: u32,
}

impl Default for ListenOpts {
    fn default() -> Self {
        ListenOpts {
            transparent: false,
            mark: Some(ZTUNNEL_MARK),
            reuse_addr: true,
            reuse_port: false,
            steer_to_newest: false,
            backlog: 1024,
        }
    }
}

/// How [`NetnsHandle::connect`] sets up its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOpts {
    /// `SO_MARK`. Default [`ZTUNNEL_MARK`]: ztunnel's own connections must not be
    /// captured, and its spoofed-source connections to the app are recognised by it.
    pub mark: Option<u32>,
    /// Connect from this address (port 0: any port). `IP_TRANSPARENT` is set with it, so
    /// it need not be local: ztunnel connects to the app from the original client's
    /// address. Same family as the destination.
    pub bind_source: Option<SocketAddr>,
    /// `TCP_NODELAY`.
    pub nodelay: bool,
    /// For the handshake.
    pub timeout: Duration,
}

impl Default for ConnectOpts {
    fn default() -> Self {
        ConnectOpts {
            mark: Some(ZTUNNEL_MARK),
            bind_source: None,
            nodelay: true,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The original destination of a connection accepted on the outbound listener (15001).
/// The redirect rules `TPROXY` it there without rewriting the destination, so it is the
/// connection's local address (the same holds on the inbound plaintext listener, 15006).
/// A loopback local address means the app connected to the listener itself, which
/// the rules never capture: that is an error naming the connection.
pub fn original_dst(stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    let local = stream.local_addr()?;
    if local.ip().is_loopback() || local.ip().is_unspecified() {
        let peer = stream
            .peer_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        return Err(io_error(
            io::ErrorKind::InvalidInput,
            NetnsError::NotRedirected { local, peer },
        ));
    }
    Ok(local)
}

/// Sets `SO_MARK` on an established connection (from now on its packets carry it).
pub fn set_mark(stream: &tokio::net::TcpStream, mark: u32) -> io::Result<()> {
    SockRef::from(stream).set_mark(mark).map_err(|source| {
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        io_error(
            source.kind(),
            NetnsError::SetMark {
                local: stream.local_addr().unwrap_or(unknown),
                peer: stream.peer_addr().unwrap_or(unknown),
                mark,
                source,
            },
        )
    })
}

/// On the worker: a non-blocking listener, set up as `opts` say.
fn bind_listener(addr: SocketAddr, opts: &ListenOpts) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(mark) = opts.mark {
        socket.set_mark(mark)?;
    }
    if opts.transparent {
        set_transparent(&socket, addr)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(opts.reuse_addr)?;
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    // The kernel caps it at net.core.somaxconn anyway.
    socket.listen(i32::try_from(opts.backlog).unwrap_or(i32::MAX))?;
    if opts.reuse_port && opts.steer_to_newest {
        steer_to_newest(&socket)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Attaches to `socket`'s `SO_REUSEPORT` group a classic BPF program that picks the
/// group's second socket for every new connection (`SO_ATTACH_REUSEPORT_CBPF`).
///
/// The kernel keeps a group's sockets in the order they joined and, when one leaves,
/// moves the last one into its place; an index past the end falls back to the hash.
/// So with one holder (a ztunnel alone) its connections are its own; when a second
/// one listens (the ztunnel replacing it) every new connection goes to the newcomer;
/// and once the old one has closed, the newcomer is alone at index 0 and the next
/// replacement takes index 1. The program belongs to the group: each holder attaches
/// the same one.
pub fn steer_to_newest(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // One instruction: BPF_RET | BPF_K, return 1.
    let mut program = [libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: 1,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: program.as_mut_ptr(),
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sock_fprog>())
        .map_err(|_| io::Error::other("sock_fprog size"))?;
    #[allow(unsafe_code)]
    // SAFETY: `fprog` points at `program`, one valid instruction that outlives the
    // call (the kernel copies it); `len` is the size of `fprog`, and the descriptor is
    // `socket`'s, open for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::addr_of!(fprog).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Stock {
    fn family(&mut self, v4: bool) -> (&mut Vec<Socket>, &mut bool) {
        if v4 {
            (&mut self.v4, &mut self.refilling_v4)
        } else {
            (&mut self.v6, &mut self.refilling_v6)
        }
    }
}

/// On the worker: a fresh stream socket of `dst`'s family, in the worker's namespace.
fn new_stream_socket(dst: SocketAddr) -> io::Result<Socket> {
    Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))
}

/// On any thread: sets up a fresh socket as `opts` say, not yet connected.
fn configure_stream(socket: Socket, opts: &ConnectOpts) -> io::Result<std::net::TcpStream> {
    if let Some(mark) = opts.mark {
        socket.set_mark(mark)?;
    }
    if let Some(source) = opts.bind_source {
        set_transparent(&socket, source)?;
        socket.bind(&source.into())?;
    }
    socket.set_tcp_nodelay(opts.nodelay)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn set_transparent(socket: &Socket, addr: SocketAddr) -> io::Result<()> {
    match addr {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true),
        SocketAddr::V6(_) => socket.set_ip_transparent_v6(true),
    }
}
