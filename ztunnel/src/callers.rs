//! Who is calling, for open inbound HBONE tunnels. An app behind ztunnel sees only the
//! client's address (ztunnel connects to it from the client's IP); the caller's
//! identity is known only to ztunnel, from the mutual-TLS handshake. This registry
//! keeps, for each open tunnel, the app connection's two addresses and the peer's
//! identity, so the admin endpoint can answer `GET /inbound_caller?client=..&app=..`
//! (what the local mesh's demo app asks to report who called it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ambit_core::SpiffeId;

/// The callers of the open inbound tunnels of one ztunnel.
#[derive(Debug, Default)]
pub struct InboundCallers {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Caller>>,
}

/// One open inbound tunnel, as the app sees its connection, and who opened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The app connection's client side: the caller's IP and the port ztunnel bound.
    pub client: SocketAddr,
    /// The app's address (the tunnel's target).
    pub app: SocketAddr,
    /// The peer identity of the HBONE connection.
    pub identity: SpiffeId,
}

/// Keeps a caller registered until dropped or [`Registration::finish`]ed. Kept by
/// every open tunnel, so it is two words.
#[derive(Debug)]
pub struct Registration {
    callers: Arc<InboundCallers>,
    id: u64,
}

impl InboundCallers {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Registers `caller` until the returned registration goes.
    pub fn register(self: &Arc<Self>, caller: Caller) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, caller);
        Registration {
            callers: self.clone(),
            id,
        }
    }

    /// The caller of the open tunnel whose app connection is `client` → `app`. IPv4
    /// addresses may be given IPv4-mapped, as a dual-stack listener reports them.
    pub fn lookup(&self, client: SocketAddr, app: SocketAddr) -> Option<Caller> {
        let (client, app) = (canonical(client), canonical(app));
        // A scan: lookups are rare (a debugging aid), registrations are per tunnel.
        self.lock()
            .values()
            .find(|c| canonical(c.client) == client && canonical(c.app) == app)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Caller>> {
        // Each update is a single insert or remove: consistent whatever panicked.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Registration {
    /// Unregisters now, returning what was registered.
    pub fn finish(self) -> Option<Caller> {
        self.callers.lock().remove(&self.id)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.callers.lock().remove(&self.id);
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(client: &str) -> Caller {
        Caller {
            client: client.parse().unwrap(),
            app: "10.2.0.2:8080".parse().unwrap(),
            identity: "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap(),
        }
    }

    #[test]
    fn a_caller_is_found_while_its_tunnel_is_open() {
        let callers = InboundCallers::new();
        let open = callers.register(caller("10.1.0.2:40000"));
        let _other = callers.register(caller("10.1.0.3:40000"));
        let found = callers
            .lookup(
                "[::ffff:10.1.0.2]:40000".parse().unwrap(),
                "10.2.0.2:8080".parse().unwrap(),
            )
            .unwrap();
        assert_eq!(found, caller("10.1.0.2:40000"));
        assert_eq!(open.finish(), Some(caller("10.1.0.2:40000")));
        assert_eq!(
            callers.lookup(
                "10.1.0.2:40000".parse().unwrap(),
                "10.2.0.2:8080".parse().unwrap()
            ),
            None
        );
        assert_eq!(callers.len(), 1);
    }

    #[test]
    fn a_dropped_registration_is_forgotten() {
        let callers = InboundCallers::new();
        drop(callers.register(caller("10.1.0.2:40000")));
        assert!(callers.is_empty());
    }

    #[test]
    fn the_registration_is_two_words() {
        assert_eq!(std::mem::size_of::<Registration>(), 16);
    }
}
