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
//! - [`waypoints`]: which Gateways are waypoints and what binds to them;
//! - [`translate`]: all the objects → Ambit's mesh model (`ambit_core::model`), with
//!   what was skipped and why and each policy's acceptance: the control plane's
//!   translation, callable by `ambitctl` with the same answers (issue 17).
//!
//! It must not: do IO (callers read the files), or depend on a component.

/// `kube_core::Resource` for a kind Ambit keeps as metadata plus a spec (its group,
/// kind, plural and scope; version v1, the stored one): what kube-rs needs to list,
/// watch and patch it.
macro_rules! resource {
    ($type:ty, $group:expr, $kind:literal, $plural:literal) => {
        resource!(
            $type,
            $group,
            $kind,
            $plural,
            k8s_openapi::NamespaceResourceScope
        );
    };
    ($type:ty, $group:expr, $kind:literal, $plural:literal, $scope:ty) => {
        impl kube_core::Resource for $type {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                $kind.into()
            }

            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                $group.into()
            }

            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                "v1".into()
            }

            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                $plural.into()
            }

            fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.metadata
            }

            fn meta_mut(
                &mut self,
            ) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

pub mod analyze;
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
pub mod translate;
pub mod virtual_service;
pub mod waypoints;

pub use resources::{Kind, Object, ObjectKey, Resources};

/// Where mesh-wide policies live unless configured otherwise.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
