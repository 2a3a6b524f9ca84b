//! The Kubernetes objects the control plane works from, keyed by namespace and name.
//! Both sources (the Kubernetes API and the local directory) fill the same store; the
//! translation reads only this.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::destination_rule::DestinationRule;
use crate::gateway::{Gateway, GatewayClass};
use crate::http_route::{GrpcRoute, HttpRoute};
use crate::security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};
use crate::service_entry::ServiceEntry;
use crate::virtual_service::VirtualService;

/// `namespace/name` (namespace empty for cluster-scoped objects).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// Every object the translation reads, in a stable order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub services: BTreeMap<ObjectKey, Service>,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    pub service_entries: BTreeMap<ObjectKey, ServiceEntry>,
    pub authorization_policies: BTreeMap<ObjectKey, AuthorizationPolicy>,
    pub peer_authentications: BTreeMap<ObjectKey, PeerAuthentication>,
    pub request_authentications: BTreeMap<ObjectKey, RequestAuthentication>,
    pub gateways: BTreeMap<ObjectKey, Gateway>,
    /// Cluster-scoped: by name.
    pub gateway_classes: BTreeMap<String, GatewayClass>,
    pub http_routes: BTreeMap<ObjectKey, HttpRoute>,
    pub grpc_routes: BTreeMap<ObjectKey, GrpcRoute>,
    pub virtual_services: BTreeMap<ObjectKey, VirtualService>,
    pub destination_rules: BTreeMap<ObjectKey, DestinationRule>,
}

/// The kinds the control plane keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    ServiceEntry,
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
    Gateway,
    GatewayClass,
    HttpRoute,
    GrpcRoute,
    VirtualService,
    DestinationRule,
}

impl Kind {
    /// As in `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::RequestAuthentication => "RequestAuthentication",
            Kind::Gateway => "Gateway",
            Kind::GatewayClass => "GatewayClass",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One object of a kind the control plane keeps.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Box<Namespace>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    ServiceEntry(Box<ServiceEntry>),
    AuthorizationPolicy(Box<AuthorizationPolicy>),
    PeerAuthentication(Box<PeerAuthentication>),
    RequestAuthentication(Box<RequestAuthentication>),
    Gateway(Box<Gateway>),
    GatewayClass(Box<GatewayClass>),
    HttpRoute(Box<HttpRoute>),
    GrpcRoute(Box<GrpcRoute>),
    VirtualService(Box<VirtualService>),
    DestinationRule(Box<DestinationRule>),
}

impl Object {
    /// Its kind, as in `kind:`.
    pub fn kind(&self) -> &'static str {
        self.kind_of().as_str()
    }

    pub fn kind_of(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::ServiceEntry(_) => Kind::ServiceEntry,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::RequestAuthentication(_) => Kind::RequestAuthentication,
            Object::Gateway(_) => Kind::Gateway,
            Object::GatewayClass(_) => Kind::GatewayClass,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::GrpcRoute(_) => Kind::GrpcRoute,
            Object::VirtualService(_) => Kind::VirtualService,
            Object::DestinationRule(_) => Kind::DestinationRule,
        }
    }

    /// Its key; a namespaced object without `metadata.namespace` is in `default`, as
    /// `kubectl apply` would put it.
    pub fn key(&self) -> ObjectKey {
        let meta = match self {
            Object::Namespace(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::ServiceEntry(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
            Object::RequestAuthentication(o) => &o.metadata,
            Object::Gateway(o) => &o.metadata,
            Object::GatewayClass(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
            Object::GrpcRoute(o) => &o.metadata,
            Object::VirtualService(o) => &o.metadata,
            Object::DestinationRule(o) => &o.metadata,
        };
        let name = meta.name.clone().unwrap_or_default();
        match self {
            Object::Namespace(_) | Object::GatewayClass(_) => ObjectKey::new("", &name),
            _ => ObjectKey::new(meta.namespace.as_deref().unwrap_or("default"), &name),
        }
    }
}

impl Resources {
    /// Adds or replaces `object`.
    pub fn insert(&mut self, object: Object) {
        let key = object.key();
        match object {
            Object::Namespace(o) => {
                self.namespaces.insert(key.name, *o);
            }
            Object::Pod(o) => {
                self.pods.insert(key, *o);
            }
            Object::Service(o) => {
                self.services.insert(key, *o);
            }
            Object::EndpointSlice(o) => {
                self.endpoint_slices.insert(key, *o);
            }
            Object::ServiceEntry(o) => {
                self.service_entries.insert(key, *o);
            }
            Object::AuthorizationPolicy(o) => {
                self.authorization_policies.insert(key, *o);
            }
            Object::PeerAuthentication(o) => {
                self.peer_authentications.insert(key, *o);
            }
            Object::RequestAuthentication(o) => {
                self.request_authentications.insert(key, *o);
            }
            Object::Gateway(o) => {
                self.gateways.insert(key, *o);
            }
            Object::GatewayClass(o) => {
                self.gateway_classes.insert(key.name, *o);
            }
            Object::HttpRoute(o) => {
                self.http_routes.insert(key, *o);
            }
            Object::VirtualService(o) => {
                self.virtual_services.insert(key, *o);
            }
            Object::GrpcRoute(o) => {
                self.grpc_routes.insert(key, *o);
            }
            Object::DestinationRule(o) => {
                self.destination_rules.insert(key, *o);
            }
        }
    }

    /// Removes the `kind` object at `key`, if there is one.
    pub fn remove(&mut self, kind: Kind, key: &ObjectKey) {
        match kind {
            Kind::Namespace => {
                self.namespaces.remove(&key.name);
            }
            Kind::Pod => {
                self.pods.remove(key);
            }
            Kind::Service => {
                self.services.remove(key);
            }
            Kind::EndpointSlice => {
                self.endpoint_slices.remove(key);
            }
            Kind::ServiceEntry => {
                self.service_entries.remove(key);
            }
            Kind::AuthorizationPolicy => {
                self.authorization_policies.remove(key);
            }
            Kind::PeerAuthentication => {
                self.peer_authentications.remove(key);
            }
            Kind::RequestAuthentication => {
                self.request_authentications.remove(key);
            }
            Kind::Gateway => {
                self.gateways.remove(key);
            }
            Kind::GatewayClass => {
                self.gateway_classes.remove(&key.name);
            }
            Kind::HttpRoute => {
                self.http_routes.remove(key);
            }
            Kind::VirtualService => {
                self.virtual_services.remove(key);
            }
            Kind::GrpcRoute => {
                self.grpc_routes.remove(key);
            }
            Kind::DestinationRule => {
                self.destination_rules.remove(key);
            }
        }
    }

    /// Replaces every object of `kind` with `objects` (all of that kind), as after a
    /// full list.
    pub fn replace_kind(&mut self, kind: Kind, objects: Vec<Object>) {
        match kind {
            Kind::Namespace => self.namespaces.clear(),
            Kind::Pod => self.pods.clear(),
            Kind::Service => self.services.clear(),
            Kind::EndpointSlice => self.endpoint_slices.clear(),
            Kind::ServiceEntry => self.service_entries.clear(),
            Kind::AuthorizationPolicy => self.authorization_policies.clear(),
            Kind::PeerAuthentication => self.peer_authentications.clear(),
            Kind::RequestAuthentication => self.request_authentications.clear(),
            Kind::Gateway => self.gateways.clear(),
            Kind::GatewayClass => self.gateway_classes.clear(),
            Kind::HttpRoute => self.http_routes.clear(),
            Kind::GrpcRoute => self.grpc_routes.clear(),
            Kind::VirtualService => self.virtual_services.clear(),
            Kind::DestinationRule => self.destination_rules.clear(),
        }
        for object in objects {
            debug_assert_eq!(object.kind_of(), kind);
            self.insert(object);
        }
    }
}

/// The entries of `map` (keyed by namespace, then name) in `namespace`: a range, not a
/// scan, so a service's endpoints cost its namespace's pods, not the cluster's.
pub fn in_namespace<'a, K, V>(
    map: &'a BTreeMap<K, V>,
    namespace: &str,
) -> impl Iterator<Item = (&'a K, &'a V)> + 'a
where
    K: std::borrow::Borrow<ObjectKey> + Ord,
{
    let start = ObjectKey::new(namespace, "");
    let namespace = namespace.to_owned();
    map.range::<ObjectKey, _>((
        std::ops::Bound::Included(&start),
        std::ops::Bound::Unbounded,
    ))
    .take_while(move |(k, _)| (*k).borrow().namespace == namespace)
}
