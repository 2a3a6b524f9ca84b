//! Ambit's wire types: the `.proto` files under `proto/` and the prost/tonic code
//! generated from them, checked in under `src/gen/` so that building Ambit needs no
//! `protoc` (a test fails when the two drift apart).
//!
//! No logic lives here: conversions into domain types belong to the crates that use
//! them.

/// Istio's certificate signing API (`istio.v1.auth.IstioCertificateService`).
pub mod ca {
    #![allow(missing_debug_implementations, clippy::all)]
    include!("gen/istio.v1.auth.rs");

    /// The request metadata key through which a node agent names the identity it asks
    /// a certificate for.
    pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
}

/// The pod hand-off protocol between a node agent and ztunnel (`handoff.proto`).
pub mod handoff {
    #![allow(missing_debug_implementations, clippy::all)]
    include!("gen/ambit.handoff.v1.rs");

    /// The protocol version this build speaks.
    pub const VERSION: u32 = 1;
}

/// A node agent's reports to the control plane (`nodeagent.proto`): which pods' traffic
/// is captured.
pub mod nodeagent {
    #![allow(missing_debug_implementations, clippy::all)]
    include!("gen/ambit.nodeagent.v1.rs");
}

/// Ambit's mesh model as xDS resources (`workload.proto`): workloads and services.
pub mod workload {
    #![allow(missing_debug_implementations, clippy::all)]
    include!("gen/ambit.workload.v1.rs");

    /// The type URL of [`Address`] resources in delta xDS.
    pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/ambit.workload.v1.Address";
}

/// Istio's workload xDS API (`istio_workload.proto`): workloads and services as Istio's
/// ztunnel takes them (decision record 0017).
pub mod istio_workload {
    #![allow(missing_debug_implementations, clippy::all)]
    include!("gen/istio.workload.rs");

    /// The type URL of [`Address`] resources in delta xDS.
    pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
}

/// Istio's L4 authorization policies (`istio_authorization.proto`), as Istio's ztunnel
/// takes them (decision record 0017).
pub mod istio_security {
    #![allow(missing_debug_implementations, clippy::all)]
    include!("gen/istio.security.rs");

    /// The type URL of [`Authorization`] resources in delta xDS.
    pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
}

/// Envoy's delta xDS transport (`xds.proto`): the aggregated discovery service's
/// `DeltaAggregatedResources` stream, with the fields Ambit uses.
pub mod xds {
    #![allow(missing_debug_implementations, clippy::all)]
    include!("gen/envoy.service.discovery.v3.rs");
}
