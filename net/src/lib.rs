//! Ambit's shared IO building blocks: mesh TLS (rustls configs and SPIFFE peer
//! verification), the client of the CA's certificate API, the certificate manager
//! that keeps each workload identity's certificate fresh, HBONE (server, client,
//! pool), the xDS client and the model it keeps current ([`model_source`]), and the
//! operations endpoints every proxy serves ([`admin`]).
//!
//! This crate holds no component logic: it must not decide where traffic goes or
//! whether it is allowed (that is `core`), and it must not depend on any component.

pub mod admin;
pub mod ca_client;
pub mod cert_manager;
pub mod handoff;
pub mod hbone;
pub mod model_source;
pub mod netns;
pub mod netns_scan;
pub mod process;
pub mod redirect;
pub mod relay;
pub mod tls;
pub mod token;
pub mod xds;
