//! Ambit's waypoint: the per-namespace L7 proxy.
//!
//! A waypoint is a Gateway (`gatewayClassName: istio-waypoint`). Client ztunnels send
//! the traffic of the Services and workloads bound to it over HBONE to 15008, with
//! the original destination as the CONNECT `:authority`. The waypoint terminates the
//! tunnel ([`proxy`]), refuses targets not bound to it, and tells HTTP from TCP. It
//! serves HTTP/1.1 and HTTP/2 with hyper ([`http`]) and authorizes each request
//! ([`authz`]). It picks an endpoint (round robin, or as the Service's
//! DestinationRule says, with its connection pool and outlier detection:
//! [`balance`]) and forwards over pooled HBONE to the endpoint's ztunnel as its own
//! identity ([`upstream`]).
//! serves HTTP/1.1 and HTTP/2 with hyper ([`http`]), authenticates each request's JWT
//! ([`authn`], RequestAuthentication) and authorizes it ([`authz`]). It picks an endpoint round robin and forwards over pooled HBONE to
//! the endpoint's ztunnel as its own identity ([`upstream`]).
//!
//! Pieces: [`config`] (flags), [`app`] (wiring: certificate, model over xDS, listeners,
//! drain), [`proxy`], [`http`], [`h1_guard`] (request smuggling guard), [`io`]
//! (sniffing and idle wrappers), [`upstream`], [`authn`], [`authz`], [`metrics`], [`access_log`] and [`admin`].
//!
//! Decisions are `ambit_core::waypoint` functions. The waypoint reuses `ambit_net`
//! (HBONE server and pool, certificate manager, xDS model source, operations
//! endpoints) and must not depend on another component.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod authn;
pub mod authz;
pub mod balance;
pub mod config;
pub mod h1_guard;
pub mod http;
pub mod io;
pub mod metrics;
pub mod mirror;
pub mod proxy;
pub mod upstream;
