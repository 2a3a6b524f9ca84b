//! The delta xDS server: every connected ztunnel gets the model as `Address`
//! resources, first what it lacks (a reconnecting client names, in
//! `initial_resource_versions`, what it still holds), then each change as a diff:
//! resources added or changed, names removed. Each response has a nonce; the client
//! ACKs or NACKs it, and a NACK is logged with the client's reason. A snapshot that
//! changes again before a stream has sent the previous one is sent once, as its latest
//! state (the streams read a `watch` channel).
//!
//! Only the `Address` type and the wildcard subscription are served. What a stream
//! gets depends on who subscribes (its view):
//! - trusted node agents (ztunnels and `ambit-cni` agents, which run as the node-agent
//!   accounts) get the whole model except L7 policies (`l7authz/...`),
//!   RequestAuthentications (`requestauthn/...`), HTTPRoutes (`httproute/...`) and
//!   DestinationRules (`destinationrule/...`), which only waypoints enforce;
//! - a waypoint (a caller whose identity is a waypoint's service account in the mesh's
//!   trust domain) gets only what it serves: the services and workloads bound to it,
//!   the workloads behind those services, its own Service and workloads, its
//!   `waypoint/...` entry, the L7 policies and RequestAuthentications attached to it
//!   (or to a Service bound to it), the HTTPRoutes of its services with the services
//!   they route to, and the DestinationRules of all of those services;
//! - any other caller, a workload's certificate or token included, gets
//!   `PERMISSION_DENIED`: the model names every workload, address and policy of the
//!   mesh.
//!
//! A view is recomputed with every snapshot, so a waypoint that loses a binding is
//! sent its removal like any other change.
//!
//! Istio's ztunnel is served too, on the same port (decision record 0017): a stream
//! whose first request asks for `istio.workload.Address` or
//! `istio.security.Authorization` gets both types on that one stream, as Istio's
//! aggregated client asks for them, translated from the same snapshot
//! ([`crate::istio`]); only node agents may subscribe.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;

use ambit_ca::auth::{authenticate_request, Authenticator};
use ambit_ca::server::PeerInfo;
use ambit_core::model::MeshConfig;
use ambit_core::{SpiffeId, TrustDomain};
use ambit_proto::istio_security::AUTHORIZATION_TYPE_URL as ISTIO_AUTHORIZATION_TYPE_URL;
use ambit_proto::istio_workload::ADDRESS_TYPE_URL as ISTIO_ADDRESS_TYPE_URL;
use ambit_proto::workload::{Address, ADDRESS_TYPE_URL};
use ambit_proto::xds::aggregated_discovery_service_server::AggregatedDiscoveryService;
use ambit_proto::xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use futures::{Stream, StreamExt};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

/// The model as versioned resources, as every stream serves it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Increases with every change, for logs (`system_version_info`).
    pub version: u64,
    /// name → (version, resource). A resource's version is a hash of its encoding, so
    /// an unchanged resource keeps its version across snapshots and restarts.
    pub resources: BTreeMap<String, (String, Address)>,
    /// Each waypoint identity's view, by (namespace, service account): the names of
    /// the resources it may see.
    pub waypoint_views: BTreeMap<(String, String), BTreeSet<String>>,
    /// The same model in Istio's types, made when an Istio ztunnel first asks.
    istio: std::sync::OnceLock<Arc<IstioSnapshot>>,
}

/// The snapshot in Istio's types: type URL → name → (version, encoded resource).
#[derive(Debug, Clone, Default)]
pub struct IstioSnapshot {
    pub types: BTreeMap<&'static str, BTreeMap<String, (String, Vec<u8>)>>,
}

impl Snapshot {
    /// The model in Istio's types (`trust_domain` fills implicit identities); made once
    /// per snapshot.
    pub fn istio(&self, trust_domain: &TrustDomain) -> Arc<IstioSnapshot> {
        self.istio
            .get_or_init(|| {
                let out = crate::istio::translate(
                    self.resources.iter().map(|(name, (_, a))| (name, a)),
                    trust_domain,
                );
                let versioned =
                    |bytes: Vec<u8>| (format!("{:016x}", ambit_core::fnv1a(&bytes)), bytes);
                let mut types = BTreeMap::new();
                types.insert(
                    ISTIO_ADDRESS_TYPE_URL,
                    out.addresses
                        .into_iter()
                        .map(|(n, a)| (n, versioned(a.encode_to_vec())))
                        .collect(),
                );
                types.insert(
                    ISTIO_AUTHORIZATION_TYPE_URL,
                    out.authorizations
                        .into_iter()
                        .map(|(n, a)| (n, versioned(a.encode_to_vec())))
                        .collect(),
                );
                Arc::new(IstioSnapshot { types })
            })
            .clone()
    }
}

/// Resource names of L7 policies start with this; only waypoints get them.
pub const L7_POLICY_PREFIX: &str = "l7authz/";
/// Resource names of HTTPRoutes, GRPCRoutes and VirtualServices start with these;
/// only waypoints get them.
pub const ROUTE_PREFIXES: [&str; 3] = ["httproute/", "grpcroute/", "virtualservice/"];
/// Resource names of DestinationRules start with this; only waypoints get them.
pub const DESTINATION_RULE_PREFIX: &str = "destinationrule/";
/// Resource names of RequestAuthentications start with this; only waypoints get them.
pub const REQUEST_AUTHN_PREFIX: &str = "requestauthn/";

impl Snapshot {
    pub fn new(version: u64, config: &MeshConfig) -> Snapshot {
        let resources = ambit_net::xds::to_resources(config)
            .into_iter()
            .map(|(name, address)| {
                let version = format!("{:016x}", ambit_core::fnv1a(&address.encode_to_vec()));
                (name, (version, address))
            })
            .collect();
        Snapshot {
            version,
            resources,
            waypoint_views: waypoint_views(config),
            istio: std::sync::OnceLock::new(),
        }
    }
}

/// Who a stream serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// A node agent: everything but L7 policies.
    NodeAgent,
    /// A waypoint running as (namespace, service account).
    Waypoint(String, String),
}

impl View {
    /// Whether the resource `name` of `snapshot` is in this view.
    pub fn sees(&self, snapshot: &Snapshot, name: &str) -> bool {
        match self {
            View::NodeAgent => {
                !name.starts_with(L7_POLICY_PREFIX)
                    && !name.starts_with(DESTINATION_RULE_PREFIX)
                    && !name.starts_with(REQUEST_AUTHN_PREFIX)
                    && !ROUTE_PREFIXES.iter().any(|p| name.starts_with(p))
            }
            View::Waypoint(ns, sa) => snapshot
                .waypoint_views
                .get(&(ns.clone(), sa.clone()))
                .is_some_and(|names| names.contains(name)),
        }
    }
}

/// The view of each waypoint identity (reference §3.3, "What a waypoint must do"):
/// what is bound to it (services, and workloads bound with workload traffic), the
/// workloads behind those services, its own Service and workloads, its entry, and the
/// L7 policies attached to it.
pub fn waypoint_views(config: &MeshConfig) -> BTreeMap<(String, String), BTreeSet<String>> {
    use ambit_net::xds::destination::destination_rule_name;
    use ambit_net::xds::route::route_name;
    use ambit_net::xds::{service_name, waypoint_name};
    let mut views: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for w in &config.waypoints {
        let key = w.key();
        let view = views
            .entry((w.namespace.clone(), w.service_account.clone()))
            .or_default();
        view.insert(waypoint_name(&w.namespace, &w.name));
        for p in &w.policies {
            view.insert(format!("{L7_POLICY_PREFIX}{p}"));
        }
        for s in &config.services {
            let own = w.address.is_some_and(|a| s.vips.contains(&a)) && s.namespace == w.namespace;
            let bound = s.waypoint.as_ref().is_some_and(|b| b.key() == key);
            if own || bound {
                view.insert(service_name(&s.namespace, &s.hostname()));
                view.extend(s.endpoints.iter().map(|e| e.workload_uid.clone()));
            }
        }
        for wl in &config.workloads {
            if wl.waypoint.as_ref().is_some_and(|b| b.key() == key) {
                view.insert(wl.uid.clone());
            }
        }
        // The RequestAuthentications attached to it, its class, or a Service bound to
        // it.
        let gateway = (w.namespace.as_str(), w.name.as_str());
        for a in &config.request_authns {
            let to_service = config.services.iter().any(|s| {
                s.waypoint.as_ref().is_some_and(|b| b.key() == key)
                    && a.applies_to(gateway, Some((&s.namespace, &s.name)))
            });
            if to_service || a.applies_to(gateway, None) {
                view.insert(ambit_net::xds::request_authn::request_authn_name(
                    &a.namespace,
                    &a.name,
                ));
            }
        }
        // The HTTPRoutes of the Services bound to it, and the Services they route to
        // (bound to it or not), with their workloads.
        let bound: BTreeSet<(&str, &str)> = config
            .services
            .iter()
            .filter(|s| s.waypoint.as_ref().is_some_and(|b| b.key() == key))
            .map(|s| (s.namespace.as_str(), s.name.as_str()))
            .collect();
        for r in &config.http_routes {
            if !r
                .parents
                .iter()
                .any(|p| bound.contains(&(p.namespace.as_str(), p.name.as_str())))
            {
                continue;
            }
            view.insert(route_name(&r.route));
            for backend in r.route.rules.iter().flat_map(|rule| rule.referenced()) {
                for s in config
                    .services
                    .iter()
                    .filter(|s| s.namespace == backend.namespace && s.name == backend.name)
                {
                    view.insert(service_name(&s.namespace, &s.hostname()));
                    view.extend(s.endpoints.iter().map(|e| e.workload_uid.clone()));
                }
            }
        }
        // The DestinationRules of the Services it sends requests to.
        for r in &config.destination_rules {
            let routes_to = config.services.iter().any(|s| {
                s.namespace == r.service_namespace
                    && s.name == r.service_name
                    && view.contains(&service_name(&s.namespace, &s.hostname()))
            });
            if routes_to {
                view.insert(destination_rule_name(&r.namespace, &r.name));
            }
        }
    }
    views
}

/// The gRPC service (`envoy.service.discovery.v3.AggregatedDiscoveryService`).
#[derive(Debug, Clone)]
pub struct XdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    authenticators: Vec<Arc<dyn Authenticator>>,
    /// The mesh's trust domain: a waypoint's identity must be in it.
    trust_domain: TrustDomain,
}

impl XdsServer {
    /// Serves the latest of `snapshots` to every caller one of `authenticators`
    /// recognises (the CA's: a node agent's bearer token or a mesh certificate).
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        authenticators: Vec<Arc<dyn Authenticator>>,
    ) -> XdsServer {
        XdsServer {
            snapshots,
            authenticators,
            trust_domain: TrustDomain::default(),
        }
    }

    /// Waypoints are recognised in `trust_domain` (default `cluster.local`).
    pub fn with_trust_domain(mut self, trust_domain: TrustDomain) -> Self {
        self.trust_domain = trust_domain;
        self
    }

    /// The view `identity` (not a node agent) may have: a waypoint's, or none.
    fn waypoint_view(&self, identity: &SpiffeId) -> Option<View> {
        if !identity.in_trust_domain(&self.trust_domain) {
            return None;
        }
        let key = (
            identity.namespace().to_owned(),
            identity.service_account().to_owned(),
        );
        self.snapshots
            .borrow()
            .waypoint_views
            .contains_key(&key)
            .then_some(View::Waypoint(key.0, key.1))
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let caller = authenticate_request(&self.authenticators, &request).await?;
        let view = if caller.node_agent {
            View::NodeAgent
        } else if let Some(view) = self.waypoint_view(&caller.identity) {
            view
        } else {
            tracing::warn!(caller = %caller.identity, "xDS subscription refused: neither a node agent nor a waypoint");
            return Err(Status::permission_denied(format!(
                "{} may not subscribe to the mesh model: only ztunnels and node agents (the trusted node-agent accounts), and waypoints (their service accounts) for what they serve, may",
                caller.identity
            )));
        };
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.remote)
            .or_else(|| request.remote_addr())
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let mut requests = request.into_inner();
        let first = match requests.next().await {
            Some(Ok(first)) => first,
            Some(Err(e)) => return Err(e),
            None => return Err(Status::cancelled("stream ended before its first request")),
        };
        if ISTIO_TYPE_URLS.contains(&first.type_url.as_str()) {
            if view != View::NodeAgent {
                return Err(Status::permission_denied(format!(
                    "{} may not subscribe to Istio's workload types: only ztunnels (the trusted node-agent accounts) may",
                    caller.identity
                )));
            }
            let node = first
                .node
                .as_ref()
                .map(|n| n.id.clone())
                .unwrap_or_default();
            tracing::info!(%node, %peer, caller = %caller.identity, "Istio xDS client connected");
            let (tx, rx) = mpsc::channel(4);
            let stream = IstioStream {
                node,
                peer,
                trust_domain: self.trust_domain.clone(),
                snapshots: self.snapshots.clone(),
                sent: BTreeMap::new(),
                nonce: 0,
            };
            tokio::spawn(stream.run(first, requests, tx));
            return Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )));
        }
        if first.type_url != ADDRESS_TYPE_URL {
            return Err(Status::invalid_argument(format!(
                "type {:?} is not served; only {ADDRESS_TYPE_URL}, {ISTIO_ADDRESS_TYPE_URL} and {ISTIO_AUTHORIZATION_TYPE_URL}",
                first.type_url
            )));
        }
        let node = first
            .node
            .as_ref()
            .map(|n| n.id.clone())
            .unwrap_or_default();
        tracing::debug!(%node, caller = %caller.identity, "xDS caller authenticated");
        let (tx, rx) = mpsc::channel(4);
        let stream = ClientStream {
            node,
            peer,
            view,
            snapshots: self.snapshots.clone(),
            sent: first.initial_resource_versions.into_iter().collect(),
            nonce: 0,
        };
        tokio::spawn(stream.run(requests, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// One client's stream: what it has been sent, by name and version.
struct ClientStream {
    node: String,
    peer: String,
    view: View,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    sent: BTreeMap<String, String>,
    /// Responses sent on this stream; the first is sent even when empty.
    nonce: u64,
}

impl ClientStream {
    async fn run(
        mut self,
        mut requests: Streaming<DeltaDiscoveryRequest>,
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) {
        tracing::info!(node = %self.node, peer = %self.peer, held = self.sent.len(), "xDS client connected");
        // The current snapshot first, then every change.
        self.snapshots.mark_changed();
        loop {
            tokio::select! {
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        break; // The server is shutting down.
                    }
                    let snapshot = self.snapshots.borrow_and_update().clone();
                    if let Some(response) = self.diff(&snapshot) {
                        if tx.send(Ok(response)).await.is_err() {
                            break;
                        }
                    }
                }
                request = requests.next() => match request {
                    Some(Ok(request)) => self.on_request(&request),
                    Some(Err(e)) => {
                        tracing::info!(node = %self.node, error = %e, "xDS stream failed");
                        break;
                    }
                    None => break,
                },
            }
        }
        tracing::info!(node = %self.node, peer = %self.peer, "xDS client disconnected");
    }

    /// The response that brings the client from what it was sent to `snapshot`, or
    /// nothing if it has it all.
    fn diff(&mut self, snapshot: &Snapshot) -> Option<DeltaDiscoveryResponse> {
        let resources: Vec<Resource> = snapshot
            .resources
            .iter()
            .filter(|(name, _)| self.view.sees(snapshot, name))
            .filter(|(name, (version, _))| self.sent.get(*name) != Some(version))
            .map(|(name, (version, address))| Resource {
                version: version.clone(),
                resource: Some(prost_types::Any {
                    type_url: ADDRESS_TYPE_URL.to_owned(),
                    value: address.encode_to_vec(),
                }),
                name: name.clone(),
                aliases: Vec::new(),
            })
            .collect();
        let removed: Vec<String> = self
            .sent
            .keys()
            .filter(|name| {
                !snapshot.resources.contains_key(*name) || !self.view.sees(snapshot, name)
            })
            .cloned()
            .collect();
        // The first response goes out even with nothing in it: it tells the client
        // it holds the current model (an empty mesh, or all it had before), which a
        // ztunnel waits for before it takes pods.
        if resources.is_empty() && removed.is_empty() && self.nonce > 0 {
            return None;
        }
        for r in &resources {
            self.sent.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            self.sent.remove(name);
        }
        self.nonce += 1;
        tracing::debug!(node = %self.node, nonce = self.nonce, changed = resources.len(), removed = removed.len(), "xDS push");
        Some(DeltaDiscoveryResponse {
            system_version_info: snapshot.version.to_string(),
            resources,
            type_url: ADDRESS_TYPE_URL.to_owned(),
            nonce: self.nonce.to_string(),
            removed_resources: removed,
        })
    }

    fn on_request(&mut self, request: &DeltaDiscoveryRequest) {
        match &request.error_detail {
            Some(error) => tracing::warn!(
                node = %self.node,
                nonce = %request.response_nonce,
                reason = %error.message,
                "xDS client rejected resources (NACK)"
            ),
            None if !request.response_nonce.is_empty() => {
                tracing::debug!(node = %self.node, nonce = %request.response_nonce, "xDS ACK");
            }
            None => {}
        }
    }
}

/// The types an Istio ztunnel subscribes to.
const ISTIO_TYPE_URLS: [&str; 2] = [ISTIO_ADDRESS_TYPE_URL, ISTIO_AUTHORIZATION_TYPE_URL];

/// One Istio ztunnel's aggregated stream: both of Istio's types, each subscribed by its
/// own request, each with what it has been sent.
struct IstioStream {
    node: String,
    peer: String,
    trust_domain: TrustDomain,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Type URL → name → version sent. A type is here once subscribed.
    sent: BTreeMap<&'static str, BTreeMap<String, String>>,
    nonce: u64,
}

impl IstioStream {
    async fn run(
        mut self,
        first: DeltaDiscoveryRequest,
        mut requests: Streaming<DeltaDiscoveryRequest>,
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) {
        let mut pending = vec![first];
        'stream: loop {
            // Subscriptions first: each new type gets the current snapshot at once.
            for request in pending.drain(..) {
                if let Some(type_url) = self.on_request(&request) {
                    let snapshot = self.snapshots.borrow().clone();
                    if let Some(response) = self.diff(type_url, &snapshot, true) {
                        if tx.send(Ok(response)).await.is_err() {
                            break 'stream;
                        }
                    }
                }
            }
            tokio::select! {
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = self.snapshots.borrow_and_update().clone();
                    let types: Vec<&'static str> = self.sent.keys().copied().collect();
                    for type_url in types {
                        if let Some(response) = self.diff(type_url, &snapshot, false) {
                            if tx.send(Ok(response)).await.is_err() {
                                break 'stream;
                            }
                        }
                    }
                }
                request = requests.next() => match request {
                    Some(Ok(request)) => pending.push(request),
                    Some(Err(e)) => {
                        tracing::info!(node = %self.node, error = %e, "Istio xDS stream failed");
                        break;
                    }
                    None => break,
                },
            }
        }
        tracing::info!(node = %self.node, peer = %self.peer, "Istio xDS client disconnected");
    }

    /// Logs ACKs and NACKs; returns the type a request newly subscribes to.
    fn on_request(&mut self, request: &DeltaDiscoveryRequest) -> Option<&'static str> {
        if let Some(error) = &request.error_detail {
            tracing::warn!(node = %self.node, type_url = %request.type_url, nonce = %request.response_nonce, reason = %error.message, "Istio xDS client rejected resources (NACK)");
        }
        let type_url = ISTIO_TYPE_URLS.into_iter().find(|t| *t == request.type_url);
        let Some(type_url) = type_url else {
            tracing::info!(node = %self.node, type_url = %request.type_url, "Istio xDS client asked for a type that is not served; ignored");
            return None;
        };
        if self.sent.contains_key(type_url) {
            return None;
        }
        // Every resource of the type is sent (a wildcard subscription, whatever
        // names it lists); what it still holds is not sent again.
        self.sent.insert(
            type_url,
            request
                .initial_resource_versions
                .clone()
                .into_iter()
                .collect(),
        );
        Some(type_url)
    }

    /// What brings the client's `type_url` resources to `snapshot`; the first response
    /// of a type goes out even when empty (the client waits for it to be ready).
    fn diff(
        &mut self,
        type_url: &'static str,
        snapshot: &Snapshot,
        first: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let istio = snapshot.istio(&self.trust_domain);
        let current = istio.types.get(type_url)?;
        let sent = self.sent.get_mut(type_url)?;
        let resources: Vec<Resource> = current
            .iter()
            .filter(|(name, (version, _))| sent.get(*name) != Some(version))
            .map(|(name, (version, bytes))| Resource {
                version: version.clone(),
                resource: Some(prost_types::Any {
                    type_url: type_url.to_owned(),
                    value: bytes.clone(),
                }),
                name: name.clone(),
                aliases: Vec::new(),
            })
            .collect();
        let removed: Vec<String> = sent
            .keys()
            .filter(|name| !current.contains_key(*name))
            .cloned()
            .collect();
        if resources.is_empty() && removed.is_empty() && !first {
            return None;
        }
        for r in &resources {
            sent.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            sent.remove(name);
        }
        self.nonce += 1;
        tracing::debug!(node = %self.node, type_url, nonce = self.nonce, changed = resources.len(), removed = removed.len(), "Istio xDS push");
        Some(DeltaDiscoveryResponse {
            system_version_info: snapshot.version.to_string(),
            resources,
            type_url: type_url.to_owned(),
            nonce: self.nonce.to_string(),
            removed_resources: removed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(yaml: &str) -> MeshConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn stream(sent: &[(&str, &str)]) -> ClientStream {
        let (_, snapshots) = watch::channel(Arc::new(Snapshot::default()));
        ClientStream {
            node: "ztunnel~test".into(),
            peer: "test".into(),
            view: View::NodeAgent,
            snapshots,
            sent: sent
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            nonce: 0,
        }
    }

    #[test]
    fn a_waypoint_sees_the_routes_of_its_services_and_their_backends_and_node_agents_no_routes() {
        let snapshot = Snapshot::new(
            1,
            &model(
                r#"
workloads:
- {uid: shop/v1-1, name: v1-1, namespace: shop, node: n, ips: [10.1.0.2]}
- {uid: shop/other-1, name: other-1, namespace: shop, node: n, ips: [10.1.0.3]}
services:
- {name: reviews, namespace: shop, vips: [10.96.0.10], ports: [{port: 80, targetPort: 80}], waypoint: {address: 10.96.0.99, name: wp, namespace: shop}}
- {name: reviews-v1, namespace: shop, vips: [10.96.0.11], ports: [{port: 80, targetPort: 80}], endpoints: [{workloadUid: shop/v1-1}]}
- {name: other, namespace: shop, vips: [10.96.0.12], ports: [{port: 80, targetPort: 80}], endpoints: [{workloadUid: shop/other-1}]}
waypoints:
- {name: wp, namespace: shop, serviceAccount: wp, address: 10.96.0.99}
httpRoutes:
- parents: [{namespace: shop, name: reviews}]
  route: {namespace: shop, name: canary, created: 0, rules: [{backends: [{namespace: shop, name: reviews-v1, port: 80, weight: 1}]}]}
- parents: [{namespace: shop, name: other}]
  route: {namespace: shop, name: elsewhere, created: 0, rules: [{backends: [{namespace: shop, name: other, port: 80, weight: 1}]}]}
destinationRules:
- {namespace: shop, name: v1, serviceNamespace: shop, serviceName: reviews-v1}
- {namespace: shop, name: other, serviceNamespace: shop, serviceName: other}
"#,
            ),
        );
        let waypoint = View::Waypoint("shop".into(), "wp".into());
        for name in [
            "httproute/shop/canary",
            "shop/reviews-v1.shop.svc.cluster.local",
            "shop/v1-1",
            "destinationrule/shop/v1",
        ] {
            assert!(waypoint.sees(&snapshot, name), "{name}");
        }
        for name in [
            "httproute/shop/elsewhere",
            "shop/other.shop.svc.cluster.local",
            "shop/other-1",
            "destinationrule/shop/other",
        ] {
            assert!(!waypoint.sees(&snapshot, name), "{name}");
        }
        assert!(!View::NodeAgent.sees(&snapshot, "httproute/shop/canary"));
        assert!(!View::NodeAgent.sees(&snapshot, "destinationrule/shop/v1"));
        assert!(View::NodeAgent.sees(&snapshot, "shop/other-1"));
    }

    #[test]
    fn request_authentications_go_to_the_waypoints_they_attach_to_and_never_to_node_agents() {
        let snapshot = Snapshot::new(
            1,
            &model(
                r#"
services:
- {name: web, namespace: shop, vips: [10.96.0.10], ports: [{port: 80, targetPort: 80}], waypoint: {address: 10.96.0.99, name: wp, namespace: shop}}
- {name: other, namespace: shop, vips: [10.96.0.12], ports: [{port: 80, targetPort: 80}]}
waypoints:
- {name: wp, namespace: shop, serviceAccount: wp, address: 10.96.0.99}
- {name: wp2, namespace: shop, serviceAccount: wp2, address: 10.96.0.98}
requestAuthns:
- {namespace: shop, name: on-web, targets: [{kind: Service, namespace: shop, name: web}], rules: []}
- {namespace: shop, name: on-wp, targets: [{kind: Gateway, namespace: shop, name: wp}], rules: []}
- {namespace: shop, name: on-other, targets: [{kind: Service, namespace: shop, name: other}], rules: []}
"#,
            ),
        );
        let wp = View::Waypoint("shop".into(), "wp".into());
        let wp2 = View::Waypoint("shop".into(), "wp2".into());
        for (name, sees) in [
            ("requestauthn/shop/on-web", true),
            ("requestauthn/shop/on-wp", true),
            ("requestauthn/shop/on-other", false),
        ] {
            assert_eq!(wp.sees(&snapshot, name), sees, "{name}");
            assert!(!wp2.sees(&snapshot, name), "{name}");
            assert!(!View::NodeAgent.sees(&snapshot, name), "{name}");
        }
    }

    #[test]
    fn a_client_gets_only_what_it_lacks_and_the_names_it_should_drop() {
        let snapshot = Snapshot::new(
            7,
            &model(
                "workloads:\n\
                 - {uid: shop/a, name: a, namespace: shop, node: n, ips: [10.1.0.2]}\n\
                 - {uid: shop/b, name: b, namespace: shop, node: n, ips: [10.1.0.3]}\n",
            ),
        );
        let a = snapshot.resources["shop/a"].0.as_str();
        // Holds a as it is, b in an older version, and c, which is gone.
        let mut s = stream(&[("shop/a", a), ("shop/b", "old"), ("shop/c", "x")]);
        let response = s.diff(&snapshot).unwrap();
        let names: Vec<&str> = response.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["shop/b"]);
        assert_eq!(response.removed_resources, ["shop/c"]);
        assert_eq!(
            (
                response.nonce.as_str(),
                response.system_version_info.as_str()
            ),
            ("1", "7")
        );
        // Up to date now: nothing more to send.
        assert!(s.diff(&snapshot).is_none());
        // Versions are content hashes: the same model gives the same versions.
        assert_eq!(Snapshot::new(8, &model("workloads:\n- {uid: shop/a, name: a, namespace: shop, node: n, ips: [10.1.0.2]}\n")).resources["shop/a"].0, a);
    }
}
