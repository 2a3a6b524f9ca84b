//! Ambit's pure domain model.
//!
//! Everything here is a plain function over plain data: SPIFFE identities, the
//! certificate authority's decisions (who may obtain which identity, how long a
//! certificate lives), the certificate manager's renewal schedule, HBONE's request
//! semantics (CONNECT target, headers, refusal statuses), and authorization: per
//! connection at L4 (`authz`, ztunnel) and per request at L7 (`l7`, waypoints);
//! end-user JWTs (`jwt`, waypoints); routing (`route`, `retry`) and a
//! DestinationRule's traffic policy (`destination`, `balance`, `outlier`); CA root
//! rotation (`rotation`). The current
//! time and any randomness are always arguments.
//!
//! This crate must not open sockets, spawn tasks, read files or the environment, or
//! depend on tokio (the `http` crate is used for its types only): the IO crates
//! (`net`, `ca` and the components) call into it.

pub mod authz;
pub mod balance;
pub mod certificate;
pub mod destination;
pub mod explain;
pub mod hbone;
pub mod identity;
pub mod inbound;
pub mod jwt;
pub mod l7;
pub mod model;
pub mod outbound;
pub mod outlier;
pub mod renewal;
pub mod retry;
pub mod rotation;
pub mod route;
pub mod waypoint;

pub use identity::{IdentityError, SpiffeId, TrustDomain};

/// FNV-1a, 64 bits: a hash stable across builds and toolchains (unlike the standard
/// library's hasher), for versions and names that must not change between runs.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
