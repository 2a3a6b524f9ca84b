//! An in-process Kubernetes API server for tests, speaking the real wire format over
//! HTTP/1.1: JSON lists with a resourceVersion, watches as a chunked stream of
//! `{"type": ..., "object": ...}` lines from a resourceVersion (with BOOKMARK events
//! when asked for), a 410 Gone ERROR event for a version older than the kept history,
//! get/create/server-side apply/delete, and TokenReview answered from a table.
//!
//! Closer to a real server where ambitctl's tests need it: `GET /version`; server-side
//! apply needs `fieldManager` (422 without, as kube-apiserver), records the manager in
//! `metadata.managedFields`, keeps the stored `status` (the status subresource's),
//! and changes nothing, not even the resourceVersion, when the applied object is the
//! stored one; `metadata.generation` starts at 1 and grows when the spec changes; a
//! created or applied CustomResourceDefinition is Established (as the apiextensions
//! controller makes it); deleting a Namespace deletes what is in it; lists take
//! equality label selectors (`a=b,c`). Server-side apply keeps field ownership in
//! `fieldsV1` (lists owned whole, as atomic lists): applying a field another manager
//! owns with another value is a 409 Conflict naming manager and field, unless
//! `force=true`, which moves the field to the applier. The applied fields are merged
//! over the stored object; a field the applier set before and no longer applies goes,
//! unless another manager owns it too.
//!
//! [`FakeApi::simulate_controllers`] makes it act as the Deployment and DaemonSet
//! controllers and kubelets would: each applied workload gets the status of a finished
//! rollout (a DaemonSet on every Node object), except those [`FakeApi::stall`] names,
//! whose last pod never becomes ready. [`FakeApi::forbid`] answers a verb on a resource
//! with 403 Forbidden, as RBAC would, and a SelfSubjectAccessReview of it with
//! `allowed: false`.
//!
//! Tests drive it: [`FakeApi::put`] and [`FakeApi::delete`] change objects (watchers
//! see the events), [`FakeApi::break_watches`] ends every open watch, and
//! [`FakeApi::compact`] forgets the history so a watch that resumes must relist.
//!
//! It is test support, shared by the control plane's and ambitctl's tests: misuse (YAML
//! that does not parse, a port that cannot be bound) panics the test that made it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

/// How long [`FakeApi::wait_until`] waits.
const WAIT: Duration = Duration::from_secs(10);

/// The header [`FakeApi::client_of`]'s clients send.
const CLIENT_HEADER: &str = "x-fake-client";

/// `(prefix, plural)`, e.g. `("api/v1", "pods")`.
type Collection = (String, String);

#[derive(Default)]
struct State {
    version: u64,
    /// collection → (namespace, name) → object.
    objects: BTreeMap<Collection, BTreeMap<(String, String), Value>>,
    /// Every change since the oldest kept version: (version, collection, type, object).
    history: Vec<(u64, Collection, &'static str, Value)>,
    /// Watches from a version below this get 410 Gone.
    oldest: u64,
    watches: Vec<Watch>,
    /// token → the TokenReview status it gets.
    tokens: HashMap<String, Value>,
    /// "METHOD path?query" of every request, in order, with its client's name.
    requests: Vec<(String, Option<String>)>,
    /// Plurals the server does not serve (a CRD not installed): 404.
    missing: Vec<String>,
    /// Bumped on every request and every change, for [`FakeApi::wait_until`].
    changes: watch::Sender<u64>,
    /// (verb, plural) answered 403.
    forbidden: Vec<(String, String)>,
    /// Whether workloads get a rolled-out status, and those that never finish.
    controllers: bool,
    stalled: Vec<(String, String, String)>,
    /// What `GET /version` answers: (major, minor).
    server_version: (String, String),
}

struct Watch {
    collection: Collection,
    namespace: Option<String>,
    name: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watch {
    fn wants(&self, collection: &Collection, object: &Value) -> bool {
        &self.collection == collection
            && self
                .namespace
                .as_deref()
                .is_none_or(|ns| object["metadata"]["namespace"] == ns)
            && self
                .name
                .as_deref()
                .is_none_or(|n| object["metadata"]["name"] == n)
    }
}

/// The server; it stops when dropped.
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApi")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where objects of `api_version`/`kind` live, and whether they are namespaced.
fn collection_of(api_version: &str, kind: &str) -> (Collection, bool) {
    let prefix = if api_version == "v1" {
        "api/v1".to_owned()
    } else {
        format!("apis/{api_version}")
    };
    let (plural, namespaced) = match kind {
        "Namespace" => ("namespaces", false),
        "Node" => ("nodes", false),
        "Pod" => ("pods", true),
        "Service" => ("services", true),
        "EndpointSlice" => ("endpointslices", true),
        "Secret" => ("secrets", true),
        "ConfigMap" => ("configmaps", true),
        "ServiceEntry" => ("serviceentries", true),
        "VirtualService" => ("virtualservices", true),
        "AuthorizationPolicy" => ("authorizationpolicies", true),
        "PeerAuthentication" => ("peerauthentications", true),
        "Gateway" => ("gateways", true),
        "GatewayClass" => ("gatewayclasses", false),
        "HTTPRoute" => ("httproutes", true),
        "GRPCRoute" => ("grpcroutes", true),
        "Deployment" => ("deployments", true),
        "DaemonSet" => ("daemonsets", true),
        "ServiceAccount" => ("serviceaccounts", true),
        "Lease" => ("leases", true),
        "PodDisruptionBudget" => ("poddisruptionbudgets", true),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "CustomResourceDefinition" => ("customresourcedefinitions", false),
        "DestinationRule" => ("destinationrules", true),
        "RequestAuthentication" => ("requestauthentications", true),
        other => panic!("fake API: no collection for kind {other}"),
    };
    ((prefix, plural.to_owned()), namespaced)
}

/// The kind stored in a collection, for objects created without one.
fn kind_of(plural: &str) -> &'static str {
    match plural {
        "namespaces" => "Namespace",
        "pods" => "Pod",
        "services" => "Service",
        "endpointslices" => "EndpointSlice",
        "secrets" => "Secret",
        "configmaps" => "ConfigMap",
        "serviceentries" => "ServiceEntry",
        "virtualservices" => "VirtualService",
        "authorizationpolicies" => "AuthorizationPolicy",
        "peerauthentications" => "PeerAuthentication",
        "gateways" => "Gateway",
        "gatewayclasses" => "GatewayClass",
        "httproutes" => "HTTPRoute",
        "grpcroutes" => "GRPCRoute",
        "deployments" => "Deployment",
        "daemonsets" => "DaemonSet",
        "serviceaccounts" => "ServiceAccount",
        "leases" => "Lease",
        "nodes" => "Node",
        "poddisruptionbudgets" => "PodDisruptionBudget",
        "clusterroles" => "ClusterRole",
        "clusterrolebindings" => "ClusterRoleBinding",
        "roles" => "Role",
        "rolebindings" => "RoleBinding",
        "customresourcedefinitions" => "CustomResourceDefinition",
        "destinationrules" => "DestinationRule",
        "requestauthentications" => "RequestAuthentication",
        _ => "Unknown",
    }
}

impl FakeApi {
    pub async fn start() -> FakeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            version: 100,
            oldest: 100,
            changes: watch::Sender::new(0),
            server_version: ("1".to_owned(), "32".to_owned()),
            ..State::default()
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeApi { state, addr, task }
    }

    /// A kube-rs client for this server, as a cluster's would be built.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// A client whose requests [`FakeApi::requests_of`] tells apart from others' (they
    /// carry a `x-fake-client: <who>` header), as for several replicas of one program.
    pub fn client_of(&self, who: &str) -> kube::Client {
        let mut config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        config.headers.push((
            http::HeaderName::from_static(CLIENT_HEADER),
            http::HeaderValue::from_str(who).unwrap(),
        ));
        kube::Client::try_from(config).unwrap()
    }

    /// Creates or replaces `object` (YAML with apiVersion, kind and metadata).
    pub fn put(&self, yaml: &str) {
        let mut object: Value = serde_yaml_ng::from_str(yaml).unwrap();
        let (collection, namespaced) = collection_of(
            object["apiVersion"].as_str().unwrap(),
            object["kind"].as_str().unwrap(),
        );
        if namespaced && object["metadata"]["namespace"].is_null() {
            object["metadata"]["namespace"] = "default".into();
        }
        self.state.lock().unwrap().store(collection, object);
    }

    /// Deletes the object, if it exists.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let (collection, _) = collection_of(api_version, kind);
        self.state
            .lock()
            .unwrap()
            .remove(&collection, namespace, name);
    }

    /// The object, if it exists.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let (collection, _) = collection_of(api_version, kind);
        let state = self.state.lock().unwrap();
        state
            .objects
            .get(&collection)?
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Ends every open watch (as an API server restart or a load balancer would).
    pub fn break_watches(&self) {
        self.state.lock().unwrap().watches.clear();
    }

    /// Forgets the history: a watch resuming from an earlier version gets 410 Gone.
    pub fn compact(&self) {
        let mut state = self.state.lock().unwrap();
        state.history.clear();
        state.oldest = state.version;
    }

    /// Sends every open watch a BOOKMARK at the current version.
    pub fn bookmark(&self) {
        let mut state = self.state.lock().unwrap();
        let version = state.version.to_string();
        state.watches.retain(|w| {
            let (prefix, plural) = &w.collection;
            let api_version = prefix.strip_prefix("api/").unwrap_or(prefix);
            let api_version = api_version.strip_prefix("apis/").unwrap_or(api_version);
            let event = json!({"type": "BOOKMARK", "object": {
                "apiVersion": api_version, "kind": kind_of(plural),
                "metadata": {"resourceVersion": version}}});
            w.tx.send(line(&event)).is_ok()
        });
    }

    /// Answers a TokenReview of `token` with `status` (authenticated, user, audiences).
    pub fn token(&self, token: &str, status: Value) {
        self.state
            .lock()
            .unwrap()
            .tokens
            .insert(token.to_owned(), status);
    }

    /// Serve no `plural` (e.g. `serviceentries`), as when its CRD is not installed.
    pub fn not_installed(&self, plural: &str) {
        self.state.lock().unwrap().missing.push(plural.to_owned());
    }

    /// Waits until `ok()`, checking again whenever the server gets a request or an
    /// object changes; reports the delay seen.
    pub async fn wait_until(&self, what: &str, ok: impl Fn() -> bool) {
        let mut changes = self.state.lock().unwrap().changes.subscribe();
        let start = Instant::now();
        while !ok() {
            let left = WAIT.saturating_sub(start.elapsed());
            let changed = tokio::time::timeout(left, changes.changed()).await;
            assert!(changed.is_ok(), "{what}: not seen in {WAIT:?}");
        }
        eprintln!("{what}: seen after {:?}", start.elapsed());
    }

    /// Answer `verb` (get, list, watch, create, patch, update, delete) on `plural`
    /// (e.g. `clusterroles`) with 403 Forbidden.
    pub fn forbid(&self, verb: &str, plural: &str) {
        self.state
            .lock()
            .unwrap()
            .forbidden
            .push((verb.to_owned(), plural.to_owned()));
    }

    /// From now on, applied and created Deployments and DaemonSets get the status of
    /// a finished rollout: every replica (for a DaemonSet, one per Node object) updated,
    /// ready and available, and the current generation observed.
    pub fn simulate_controllers(&self) {
        self.state.lock().unwrap().controllers = true;
    }

    /// The workload's rollout never finishes: its last pod is not ready.
    pub fn stall(&self, kind: &str, namespace: &str, name: &str) {
        self.state.lock().unwrap().stalled.push((
            kind.to_owned(),
            namespace.to_owned(),
            name.to_owned(),
        ));
    }

    /// What `GET /version` answers (1.32 unless told).
    pub fn set_version(&self, major: &str, minor: &str) {
        self.state.lock().unwrap().server_version = (major.to_owned(), minor.to_owned());
    }

    /// Every object of a kind, in every namespace.
    pub fn all(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let (collection, _) = collection_of(api_version, kind);
        let state = self.state.lock().unwrap();
        state
            .objects
            .get(&collection)
            .map(|o| o.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The address of the server (`http://` it).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The requests so far, as "METHOD path?query".
    pub fn requests(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state.requests.iter().map(|(r, _)| r.clone()).collect()
    }

    /// The requests of [`FakeApi::client_of`]`(who)`'s clients, in order.
    pub fn requests_of(&self, who: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .requests
            .iter()
            .filter(|(_, w)| w.as_deref() == Some(who))
            .map(|(r, _)| r.clone())
            .collect()
    }
}

impl State {
    fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.changes.send_modify(|n| *n += 1);
        self.version
    }

    fn store(&mut self, collection: Collection, mut object: Value) {
        let version = self.next_version();
        let key = (
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            object["metadata"]["name"].as_str().unwrap().to_owned(),
        );
        object["metadata"]["resourceVersion"] = version.to_string().into();
        let previous = self
            .objects
            .get(&collection)
            .and_then(|o| o.get(&key))
            .cloned();
        if object["metadata"]["generation"].is_null() {
            object["metadata"]["generation"] = match &previous {
                None => 1,
                Some(p) => {
                    let generation = p["metadata"]["generation"].as_u64().unwrap_or(1);
                    generation + u64::from(p["spec"] != object["spec"])
                }
            }
            .into();
        }
        if self.controllers {
            self.roll_out(&mut object);
        }
        let objects = self.objects.entry(collection.clone()).or_default();
        if object["metadata"]["uid"].is_null() {
            let uid = objects
                .get(&key)
                .map(|o| o["metadata"]["uid"].clone())
                .unwrap_or_else(|| format!("uid-{version}").into());
            object["metadata"]["uid"] = uid;
        }
        let kind = if objects.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.notify(version, collection, kind, object);
    }

    /// The status the workload controllers and kubelets would give `object`.
    fn roll_out(&self, object: &mut Value) {
        let kind = object["kind"].as_str().unwrap_or("").to_owned();
        let stalled = self.stalled.iter().any(|(k, ns, n)| {
            *k == kind
                && object["metadata"]["namespace"] == ns.as_str()
                && object["metadata"]["name"] == n.as_str()
        });
        let generation = object["metadata"]["generation"].clone();
        match kind.as_str() {
            "Deployment" => {
                let wanted = object["spec"]["replicas"].as_u64().unwrap_or(1);
                let ready = wanted - u64::from(stalled && wanted > 0);
                object["status"] = json!({"observedGeneration": generation, "replicas": wanted,
                    "updatedReplicas": wanted, "readyReplicas": ready, "availableReplicas": ready,
                    "unavailableReplicas": wanted - ready,
                    "conditions": [{"type": "Available", "status": if ready == wanted {"True"} else {"False"},
                                    "reason": "MinimumReplicasAvailable"}]});
            }
            "DaemonSet" => {
                let nodes = self
                    .objects
                    .get(&("api/v1".to_owned(), "nodes".to_owned()))
                    .map_or(0, BTreeMap::len) as u64;
                let ready = nodes - u64::from(stalled && nodes > 0);
                object["status"] = json!({"observedGeneration": generation,
                    "desiredNumberScheduled": nodes, "currentNumberScheduled": nodes,
                    "updatedNumberScheduled": nodes, "numberReady": ready,
                    "numberAvailable": ready, "numberUnavailable": nodes - ready,
                    "numberMisscheduled": 0});
            }
            _ => {}
        }
    }

    fn remove(&mut self, collection: &Collection, namespace: &str, name: &str) -> Option<Value> {
        let mut object = self
            .objects
            .get_mut(collection)?
            .remove(&(namespace.to_owned(), name.to_owned()))?;
        let version = self.next_version();
        object["metadata"]["resourceVersion"] = version.to_string().into();
        self.notify(version, collection.clone(), "DELETED", object.clone());
        if collection.1 == "namespaces" {
            // The namespace controller deletes what was in it.
            let inside: Vec<(Collection, String)> = self
                .objects
                .iter()
                .flat_map(|(c, objects)| {
                    objects
                        .keys()
                        .filter(|(ns, _)| ns == name)
                        .map(|(_, n)| (c.clone(), n.clone()))
                        .collect::<Vec<_>>()
                })
                .collect();
            for (c, n) in inside {
                self.remove(&c, name, &n);
            }
        }
        Some(object)
    }

    fn notify(&mut self, version: u64, collection: Collection, kind: &'static str, object: Value) {
        let event = line(&json!({"type": kind, "object": object}));
        self.watches
            .retain(|w| !w.wants(&collection, &object) || w.tx.send(event.clone()).is_ok());
        self.history.push((version, collection, kind, object));
    }
}

fn line(event: &Value) -> Bytes {
    let mut text = serde_json::to_vec(event).unwrap();
    text.push(b'\n');
    Bytes::from(text)
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "reason": reason, "message": message, "code": code.as_u16()}),
    )
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().trim_matches('/').to_owned();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            url_pairs(q)
                .into_iter()
                .collect::<HashMap<String, String>>()
        })
        .unwrap_or_default();
    {
        let mut recorded = state.lock().unwrap();
        let who = req
            .headers()
            .get(CLIENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        recorded.requests.push((
            format!(
                "{method} /{path}{}",
                req.uri()
                    .query()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default()
            ),
            who,
        ));
        recorded.changes.send_modify(|n| *n += 1);
    }
    let merge_patch = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/merge-patch+json"));
    let body = req.into_body().collect().await.unwrap().to_bytes();

    if path == "version" && method == Method::GET {
        let (major, minor) = state.lock().unwrap().server_version.clone();
        return full(
            StatusCode::OK,
            &json!({"major": major, "minor": minor,
                    "gitVersion": format!("v{major}.{minor}.0"), "gitCommit": "fake",
                    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64"}),
        );
    }

    // api/v1/... or apis/<group>/<version>/...
    let segments: Vec<&str> = path.split('/').collect();
    let (prefix, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("api/v1".to_owned(), rest.to_vec()),
        ["apis", group, version, rest @ ..] => (format!("apis/{group}/{version}"), rest.to_vec()),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route /{path}"),
            )
        }
    };
    if prefix == "apis/authorization.k8s.io/v1" && rest == ["selfsubjectaccessreviews"] {
        // RBAC's view of the caller: everything but what forbid() named.
        let mut review: Value = serde_json::from_slice(&body).unwrap();
        let attributes = &review["spec"]["resourceAttributes"];
        let verb = attributes["verb"].as_str().unwrap_or("").to_owned();
        let resource = attributes["resource"].as_str().unwrap_or("").to_owned();
        let denied = state
            .lock()
            .unwrap()
            .forbidden
            .iter()
            .any(|(v, p)| *v == verb && *p == resource);
        review["status"] = if denied {
            json!({"allowed": false, "reason": "no RBAC rule allows it"})
        } else {
            json!({"allowed": true, "reason": "RBAC: allowed"})
        };
        return full(StatusCode::CREATED, &review);
    }
    if prefix == "apis/authentication.k8s.io/v1" && rest == ["tokenreviews"] {
        return token_review(state, &body);
    }
    if let ["namespaces", ns, plural, name, "status"] = rest.as_slice() {
        return patch_status(
            state,
            (prefix, (*plural).to_owned()),
            ns,
            name,
            &body,
            merge_patch,
        );
    }
    // (namespace filter, plural, name)
    let (namespace, plural, name) = match rest.as_slice() {
        [plural] => (None, *plural, None),
        ["namespaces", name] => (None, "namespaces", Some(*name)),
        [plural, name] => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route /{path}"),
            )
        }
    };
    if state.lock().unwrap().missing.iter().any(|m| m == plural) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let verb = match (&method, name) {
        (&Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            "watch"
        }
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PATCH, _) => "patch",
        (&Method::PUT, _) => "update",
        (&Method::DELETE, _) => "delete",
        _ => "",
    };
    if state
        .lock()
        .unwrap()
        .forbidden
        .iter()
        .any(|(v, p)| v == verb && p == plural)
    {
        return forbidden(&prefix, plural, verb, namespace, name);
    }
    let collection = (prefix, plural.to_owned());
    let key = |name: &str| (namespace.unwrap_or("").to_owned(), name.to_owned());
    match (method, name) {
        (Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            watch(state, collection, namespace, &query)
        }
        (Method::GET, None) => list(state, &collection, namespace, &query),
        (Method::GET, Some(name)) => {
            let state = state.lock().unwrap();
            match state
                .objects
                .get(&collection)
                .and_then(|o| o.get(&key(name)))
            {
                Some(o) => full(StatusCode::OK, o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{plural} \"{name}\" not found"),
                ),
            }
        }
        (Method::POST, None) => {
            let mut object: Value = serde_json::from_slice(&body).unwrap();
            if let Some(ns) = namespace {
                object["metadata"]["namespace"] = ns.into();
            }
            let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
            if plural == "customresourcedefinitions" {
                establish(&mut object);
            }
            let mut state = state.lock().unwrap();
            if state
                .objects
                .get(&collection)
                .is_some_and(|o| o.contains_key(&key(&name)))
            {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{plural} \"{name}\" already exists"),
                );
            }
            state.store(collection.clone(), object);
            let stored = state.objects[&collection][&key(&name)].clone();
            full(StatusCode::CREATED, &stored)
        }
        (Method::PATCH, Some(name)) if merge_patch => {
            // JSON merge patch (RFC 7386) onto the stored object.
            let patch: Value = serde_json::from_slice(&body).unwrap();
            let mut state = state.lock().unwrap();
            let Some(mut object) = state
                .objects
                .get(&collection)
                .and_then(|o| o.get(&key(name)))
                .cloned()
            else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{plural} \"{name}\" not found"),
                );
            };
            merge(&mut object, &patch);
            state.store(collection.clone(), object);
            full(StatusCode::OK, &state.objects[&collection][&key(name)])
        }
        (Method::PATCH, Some(name)) => {
            // Server-side apply: the applied configuration becomes the object's spec
            // and metadata; its status stays (the status subresource's).
            let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) else {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                );
            };
            let mut object: Value = serde_json::from_slice(&body).unwrap();
            let applied_fields = owned_fields(&object);
            let force = query.get("force").is_some_and(|f| f == "true");
            if let Some(ns) = namespace {
                object["metadata"]["namespace"] = ns.into();
            }
            object["metadata"]["name"] = name.into();
            let mut state = state.lock().unwrap();
            let stored = state
                .objects
                .get(&collection)
                .and_then(|o| o.get(&key(name)))
                .cloned();
            let mut managers: Vec<Value> = Vec::new();
            if let Some(stored) = &stored {
                managers = stored["metadata"]["managedFields"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                // A field another manager owns, set here to another value, conflicts
                // unless forced; forced, it changes hands.
                let mut conflicts = Vec::new();
                for other in managers
                    .iter_mut()
                    .filter(|m| m["manager"] != manager.as_str())
                {
                    let mut theirs = leaves_of_fields(&other["fieldsV1"], &Vec::new());
                    for path in theirs.clone() {
                        if applied_fields.contains(&path) && at(stored, &path) != at(&object, &path)
                        {
                            conflicts.push((
                                other["manager"].as_str().unwrap_or("").to_owned(),
                                path.clone(),
                            ));
                            theirs.retain(|p| *p != path);
                        }
                    }
                    if force {
                        other["fieldsV1"] = fields_v1(&theirs);
                    }
                }
                if !force && !conflicts.is_empty() {
                    let api_version = object["apiVersion"].as_str().unwrap_or("").to_owned();
                    let causes: Vec<Value> = conflicts
                        .iter()
                        .map(|(m, p)| {
                            json!({
                        "reason": "FieldManagerConflict",
                        "message": format!("conflict with \"{m}\" using {api_version}"),
                        "field": shown(p)})
                        })
                        .collect();
                    let list: Vec<String> = conflicts
                        .iter()
                        .map(|(m, p)| {
                            format!("conflict with \"{m}\" using {api_version}: {}", shown(p))
                        })
                        .collect();
                    return full(
                        StatusCode::CONFLICT,
                        &json!({"kind": "Status", "apiVersion": "v1",
                        "metadata": {}, "status": "Failure", "reason": "Conflict", "code": 409,
                        "message": format!("Apply failed with {} conflict{}: {}", conflicts.len(),
                            if conflicts.len() == 1 { "" } else { "s" }, list.join("\n")),
                        "details": {"causes": causes}}),
                    );
                }
                managers.retain(|m| {
                    m["manager"] == manager.as_str()
                        || !leaves_of_fields(&m["fieldsV1"], &Vec::new()).is_empty()
                });
                // The applied fields over the stored object; a field this manager set
                // before, no longer applies, and nobody else owns, goes.
                let mine_before: Vec<FieldPath> = managers
                    .iter()
                    .filter(|m| m["manager"] == manager.as_str())
                    .flat_map(|m| leaves_of_fields(&m["fieldsV1"], &Vec::new()))
                    .collect();
                let others: Vec<FieldPath> = managers
                    .iter()
                    .filter(|m| m["manager"] != manager.as_str())
                    .flat_map(|m| leaves_of_fields(&m["fieldsV1"], &Vec::new()))
                    .collect();
                let mut merged = stored.clone();
                for path in &mine_before {
                    if !applied_fields.contains(path) && !others.contains(path) {
                        remove_at(&mut merged, path);
                    }
                }
                for path in &applied_fields {
                    set_at(&mut merged, path, at(&object, path).clone());
                }
                if merged["spec"] != stored["spec"] {
                    merged["metadata"]
                        .as_object_mut()
                        .unwrap()
                        .remove("generation");
                }
                object = merged;
            } else {
                object["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z".into();
            }
            managers.retain(|m| m["manager"] != manager.as_str());
            managers.push(json!({"manager": manager, "operation": "Apply",
                "apiVersion": object["apiVersion"], "time": "2026-01-01T00:00:00Z",
                "fieldsType": "FieldsV1", "fieldsV1": fields_v1(&applied_fields)}));
            object["metadata"]["managedFields"] = managers.into();
            if plural == "customresourcedefinitions" {
                establish(&mut object);
            }
            let unchanged = stored.as_ref().is_some_and(|stored| {
                let mut same = object.clone();
                same["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"].clone();
                if same["metadata"]["generation"].is_null() {
                    same["metadata"]["generation"] = stored["metadata"]["generation"].clone();
                }
                if state.controllers {
                    state.roll_out(&mut same);
                }
                &same == stored
            });
            if !unchanged {
                state.store(collection.clone(), object);
            }
            let stored = state.objects[&collection][&key(name)].clone();
            full(StatusCode::OK, &stored)
        }
        (Method::PUT, Some(name)) => {
            // A replace. With a resourceVersion in the body it is conditional, as the
            // API server makes it: 409 Conflict when the object has changed since.
            let mut object: Value = serde_json::from_slice(&body).unwrap();
            if let Some(ns) = namespace {
                object["metadata"]["namespace"] = ns.into();
            }
            let mut state = state.lock().unwrap();
            let Some(stored) = state
                .objects
                .get(&collection)
                .and_then(|o| o.get(&key(name)))
            else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{plural} \"{name}\" not found"),
                );
            };
            let expected = &object["metadata"]["resourceVersion"];
            if !expected.is_null() && *expected != stored["metadata"]["resourceVersion"] {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &format!("Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                );
            }
            object["metadata"]["uid"] = stored["metadata"]["uid"].clone();
            state.store(collection.clone(), object);
            full(StatusCode::OK, &state.objects[&collection][&key(name)])
        }
        (Method::DELETE, Some(name)) => {
            let removed = state
                .lock()
                .unwrap()
                .remove(&collection, namespace.unwrap_or(""), name);
            match removed {
                Some(o) => full(StatusCode::OK, &o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{plural} \"{name}\" not found"),
                ),
            }
        }
        (m, _) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("{m} /{path}"),
        ),
    }
}

/// A patch of the status subresource. Server-side apply: the applied status replaces
/// the object's. A JSON merge patch of a pod's status, as the API server's pod status
/// strategy does, changes everything but the spec (so metadata such as annotations can
/// be written through `pods/status`); of any other object, only its status.
fn patch_status(
    state: &Arc<Mutex<State>>,
    collection: Collection,
    namespace: &str,
    name: &str,
    body: &[u8],
    merge_patch: bool,
) -> Response<Body> {
    let applied: Value = serde_json::from_slice(body).unwrap();
    let mut state = state.lock().unwrap();
    let key = (namespace.to_owned(), name.to_owned());
    let Some(mut object) = state
        .objects
        .get(&collection)
        .and_then(|o| o.get(&key))
        .cloned()
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("\"{name}\" not found"),
        );
    };
    if merge_patch && collection.1 == "pods" {
        let spec = object["spec"].clone();
        merge(&mut object, &applied);
        object["spec"] = spec;
    } else if merge_patch {
        merge(&mut object["status"], &applied["status"]);
    } else {
        object["status"] = applied["status"].clone();
    }
    state.store(collection.clone(), object);
    full(StatusCode::OK, &state.objects[&collection][&key])
}

/// A field's path, key by key (a label key may hold dots).
type FieldPath = Vec<String>;

/// A path as kube-apiserver writes it in a conflict: `.spec.replicas`.
fn shown(path: &FieldPath) -> String {
    path.iter().map(|p| format!(".{p}")).collect()
}

/// The fields an applied object sets: every scalar and every list (lists are taken
/// whole, as atomic lists are), leaving out what names the object.
fn owned_fields(object: &Value) -> Vec<FieldPath> {
    fn walk(value: &Value, path: FieldPath, paths: &mut Vec<FieldPath>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    let mut next = path.clone();
                    next.push(k.clone());
                    walk(v, next, paths);
                }
            }
            _ => paths.push(path),
        }
    }
    let mut paths = Vec::new();
    for (k, v) in object.as_object().into_iter().flatten() {
        match k.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                for (m, v) in v.as_object().into_iter().flatten() {
                    if m == "labels" || m == "annotations" {
                        walk(v, vec!["metadata".to_owned(), m.clone()], &mut paths);
                    }
                }
            }
            _ => walk(v, vec![k.clone()], &mut paths),
        }
    }
    paths
}

/// Paths as `metadata.managedFields[].fieldsV1` writes them: `{"f:spec": {"f:replicas": {}}}`.
fn fields_v1(paths: &[FieldPath]) -> Value {
    let mut root = json!({});
    for path in paths {
        let mut node = &mut root;
        for part in path {
            node = node
                .as_object_mut()
                .unwrap()
                .entry(format!("f:{part}"))
                .or_insert_with(|| json!({}));
        }
    }
    root
}

/// The paths of a fieldsV1 tree.
fn leaves_of_fields(fields: &Value, prefix: &FieldPath) -> Vec<FieldPath> {
    match fields.as_object() {
        Some(map) if !map.is_empty() => map
            .iter()
            .flat_map(|(k, v)| {
                let mut next = prefix.clone();
                next.push(k.strip_prefix("f:").unwrap_or(k).to_owned());
                leaves_of_fields(v, &next)
            })
            .collect(),
        _ if prefix.is_empty() => Vec::new(),
        _ => vec![prefix.clone()],
    }
}

/// Sets the value at a path, making the maps above it.
fn set_at(object: &mut Value, path: &FieldPath, value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = object;
    for part in parents {
        if !node[part.as_str()].is_object() {
            node[part.as_str()] = json!({});
        }
        node = &mut node[part.as_str()];
    }
    node[last.as_str()] = value;
}

/// Removes the value at a path, and the maps it leaves empty.
fn remove_at(node: &mut Value, path: &[String]) {
    let Some(map) = node.as_object_mut() else {
        return;
    };
    match path {
        [] => {}
        [last] => {
            map.remove(last);
        }
        [first, rest @ ..] => {
            if let Some(child) = map.get_mut(first) {
                remove_at(child, rest);
                if child.as_object().is_some_and(|m| m.is_empty()) {
                    map.remove(first);
                }
            }
        }
    }
}

/// The value at a path.
fn at<'a>(object: &'a Value, path: &FieldPath) -> &'a Value {
    path.iter()
        .fold(object, |v, part| v.get(part).unwrap_or(&Value::Null))
}

/// What the apiextensions controller does to a new CustomResourceDefinition.
fn establish(crd: &mut Value) {
    crd["status"] = json!({
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
             "message": "no conflicts found", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
             "message": "the initial names have been accepted",
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
        ],
        "acceptedNames": crd["spec"]["names"].clone(),
        "storedVersions": crd["spec"]["versions"].as_array().map(|v| {
            v.iter().filter(|v| v["storage"] == true).map(|v| v["name"].clone()).collect::<Vec<_>>()
        }).unwrap_or_default(),
    });
}

/// RBAC's answer: 403 with the message kube-apiserver writes.
fn forbidden(
    prefix: &str,
    plural: &str,
    verb: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> Response<Body> {
    let group = prefix
        .strip_prefix("apis/")
        .and_then(|g| g.split('/').next())
        .unwrap_or("");
    let resource = if group.is_empty() {
        plural.to_owned()
    } else {
        format!("{plural}.{group}")
    };
    let subject = match name {
        Some(n) => format!("{resource} \"{n}\""),
        None => resource.clone(),
    };
    let scope = match namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    let message = format!(
        "{subject} is forbidden: User \"system:serviceaccount:default:installer\" cannot {verb} resource \"{plural}\" in API group \"{group}\" {scope}"
    );
    full(
        StatusCode::FORBIDDEN,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": "Forbidden",
                "details": {"name": name.unwrap_or(""), "group": group, "kind": plural},
                "code": 403}),
    )
}

/// `a=b,c!=d,e`: whether `labels` match (equality, inequality and existence terms).
fn labels_match(selector: &str, labels: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            labels[k.trim()] != v.trim()
        } else if let Some((k, v)) = term.split_once('=') {
            labels[k.trim().trim_end_matches('=')] == v.trim()
        } else if let Some(k) = term.strip_prefix('!') {
            labels.get(k.trim()).is_none()
        } else {
            labels.get(term.trim()).is_some()
        }
    })
}

/// RFC 7386: objects merge key by key, null removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// `metadata.name=x` style field selectors, the only kind the control plane uses.
fn field_selector(query: &HashMap<String, String>) -> Option<String> {
    query
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("metadata.name="))
        .map(str::to_owned)
}

fn list(
    state: &Arc<Mutex<State>>,
    collection: &Collection,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let state = state.lock().unwrap();
    let name = field_selector(query);
    let selector = query.get("labelSelector").cloned().unwrap_or_default();
    let items: Vec<Value> = state
        .objects
        .get(collection)
        .map(|objects| {
            objects
                .iter()
                .filter(|((ns, n), _)| {
                    namespace.is_none_or(|want| want == ns)
                        && name.as_deref().is_none_or(|want| want == n)
                })
                .filter(|(_, o)| labels_match(&selector, &o["metadata"]["labels"]))
                .map(|(_, o)| o.clone())
                .collect()
        })
        .unwrap_or_default();
    full(
        StatusCode::OK,
        &json!({"kind": format!("{}List", kind_of(&collection.1)), "apiVersion": "v1",
                "metadata": {"resourceVersion": state.version.to_string()}, "items": items}),
    )
}

fn watch(
    state: &Arc<Mutex<State>>,
    collection: Collection,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let mut state = state.lock().unwrap();
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(state.version);
    let watch = Watch {
        collection,
        namespace: namespace.map(str::to_owned),
        name: field_selector(query),
        tx,
    };
    if from < state.oldest {
        // What kube-apiserver does: 200, then an ERROR event with a 410 Status.
        let _ = watch.tx.send(line(&json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "reason": "Expired", "code": 410,
            "message": format!("too old resource version: {from} ({})", state.oldest)}})));
    } else {
        for (version, collection, kind, object) in &state.history {
            if *version > from && watch.wants(collection, object) {
                let _ = watch
                    .tx
                    .send(line(&json!({"type": kind, "object": object})));
            }
        }
        state.watches.push(watch);
    }
    let body = StreamBody::new(
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
            .map(|b| Ok::<_, Infallible>(Frame::data(b))),
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .unwrap()
}

fn token_review(state: &Arc<Mutex<State>>, body: &[u8]) -> Response<Body> {
    let review: Value = serde_json::from_slice(body).unwrap();
    let token = review["spec"]["token"].as_str().unwrap_or("");
    let asked: Vec<Value> = review["spec"]["audiences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let state = state.lock().unwrap();
    let mut status = state
        .tokens
        .get(token)
        .cloned()
        .unwrap_or_else(|| json!({"authenticated": false, "error": "invalid bearer token"}));
    // As the API server does: the token's audiences that were asked for.
    if let Some(audiences) = status["audiences"].as_array().cloned() {
        status["audiences"] = audiences
            .into_iter()
            .filter(|a| asked.contains(a))
            .collect();
    }
    full(
        StatusCode::CREATED,
        &json!({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {}, "spec": review["spec"], "status": status}),
    )
}

/// Query pairs, decoded.
fn url_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}
