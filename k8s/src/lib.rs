//! The Kubernetes objects Ambit reads, read as Kubernetes reads them. Shared by the
//! control plane (`ambit-control`) and the command line (`ambitctl local apply`), so
//! what `ambitctl` accepts is exactly what the control plane enforces:
//!
//! - [`read`]: YAML text → typed objects (multi-document, keys as the API server
//!   converts them, unreadable security policies kept to fail closed);
//! - [`resources`]: the objects, keyed by namespace and name;
//! - [`security`], [`service_entry`], [`destination_rule`]: Istio's kinds as Ambit
//!   keeps them (a DestinationRule read and validated into `ambit_core::destination`); [`gateway`]:
//!   Gateway API's Gateway and GatewayClass (what declares a waypoint);
//! - [`authz`], [`peer_authn`], [`request_authn`]: the pure validation and translation of
//!   AuthorizationPolicy and PeerAuthentication into `ambit_core::authz` policies, and
//!   of RequestAuthentication into the waypoints' JWT rules;
//! - [`waypoints`]: which Gateways are waypoints and what binds to them.
//!
//! It must not: do IO (callers read the files), or depend on a component.

pub mod authz;
pub mod destination_rule;
pub mod gateway;
pub mod http_route;
pub mod peer_authn;
pub mod read;
pub mod request_authn;
pub mod resources;
pub mod security;
pub mod service_entry;
pub mod virtual_service;
pub mod waypoints;

pub use resources::{Kind, Object, ObjectKey, Resources};

/// Where mesh-wide policies live unless configured otherwise.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
