//! Istio's security resources (`security.istio.io`) as the control plane keeps them:
//! metadata and the spec as JSON. The spec is read by the translation
//! ([`crate::authz`], [`crate::peer_authn`], [`crate::request_authn`]), which must see a malformed policy to fail
//! it closed: a typed spec would make a malformed object fail to load, and so be
//! skipped. A document of one of these kinds that cannot be read at all, but whose
//! namespace can, is kept as an object marked `unreadable` ([`crate::read`]).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const GROUP: &str = "security.istio.io";
/// The versions a security policy may be written in (one schema; v1 is stored).
pub const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
    /// Set when the document could not be read as this kind (its metadata, its
    /// version or its YAML), though its kind and namespace could: the translation
    /// then fails the policy closed in that scope, with this as the reason.
    #[serde(skip)]
    pub unreadable: Option<String>,
}

resource!(
    AuthorizationPolicy,
    GROUP,
    "AuthorizationPolicy",
    "authorizationpolicies"
);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerAuthentication {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
    /// Set when the document could not be read as this kind (its metadata, its
    /// version or its YAML), though its kind and namespace could: the translation
    /// then fails the policy closed in that scope, with this as the reason.
    #[serde(skip)]
    pub unreadable: Option<String>,
}

resource!(
    PeerAuthentication,
    GROUP,
    "PeerAuthentication",
    "peerauthentications"
);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestAuthentication {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
    /// Set when the document could not be read as this kind (its metadata, its
    /// version or its YAML), though its kind and namespace could: the translation
    /// then fails the policy closed in that scope, with this as the reason.
    #[serde(skip)]
    pub unreadable: Option<String>,
}

resource!(
    RequestAuthentication,
    GROUP,
    "RequestAuthentication",
    "requestauthentications"
);
