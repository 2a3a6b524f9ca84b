//! Ambit's certificate authority.
//!
//! Issues short-lived SPIFFE X.509 certificates over Istio's
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, so Ambit's and Istio's
//! ztunnels can both obtain identities from it. Pieces, in the order a request meets
//! them: [`server`] (TLS on 15012, client certificate optional), [`auth`] (who is the
//! caller: bearer token or mesh certificate), [`service`] (the gRPC method and its error
//! mapping), [`authority`] (CSR verification, the authorization decision from
//! `ambit_core::certificate`, signing) and [`store`] (where the root lives), [`live`] (the CA
//! replaced while it runs: reloaded material, a root rotation).
//!
//! The CA must not trust anything a CSR says beyond its public key and its one URI SAN,
//! and must not know about proxies or traffic.

pub mod app;
pub mod auth;
pub mod authority;
pub mod config;
pub mod csr;
pub mod live;
pub mod server;
pub mod service;
pub mod store;

pub use authority::{CertificateAuthority, IssueError};
