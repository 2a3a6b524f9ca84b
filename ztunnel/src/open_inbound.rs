//! The open inbound connections (HBONE tunnels and plaintext) with what their
//! authorization was decided on, so that when the policies change, those now denied
//! are closed ("late rejection"). Each entry keeps a duplicate of the app-side socket:
//! shutting it down ends the relay, which closes the client side too.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ambit_core::SpiffeId;

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
    /// The app-side socket.
    socket: OwnedFd,
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

    /// Registers a connection whose app side is `app`. Without a duplicate of its
    /// socket (out of descriptors) it is not registered: the caller refuses it, since
    /// it could not be closed if a policy came to deny it.
    pub fn register(
        self: &Arc<Self>,
        pod: &str,
        peer: Option<SpiffeId>,
        source: SocketAddr,
        destination: SocketAddr,
        app: &impl AsFd,
    ) -> std::io::Result<Registration> {
        let socket = app.as_fd().try_clone_to_owned()?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            OpenInbound {
                pod: pod.to_owned(),
                peer,
                source,
                destination,
                socket,
            },
        );
        Ok(Registration {
            registry: self.clone(),
            id,
        })
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
                let _ = socket2::SockRef::from(&entry.socket).shutdown(Shutdown::Both);
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
