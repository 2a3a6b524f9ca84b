//! The Kubernetes source: one kube-rs watcher per kind, all feeding one [`Resources`]
//! store, the same store the local directory fills. A watcher lists, then watches from
//! the list's resourceVersion; when the API server answers a watch with 410 Gone (the
//! version was compacted away) or the connection breaks, kube-rs relists after a
//! backoff, and the kind's objects are replaced by the new list as a whole, so an
//! object deleted while the watch was down does not linger.
//!
//! Changes are debounced before the model is rebuilt: a burst of events (a rollout,
//! a relist) costs one translation and one xDS push.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ambit_k8s::read::from_api_server;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::gateway::{Gateway, GatewayClass};
use crate::resources::{Kind, Object, ObjectKey, Resources};
use crate::security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};
use crate::service_entry::ServiceEntry;
use ambit_k8s::destination_rule::DestinationRule;
use ambit_k8s::http_route::{GrpcRoute, HttpRoute};
use ambit_k8s::virtual_service::VirtualService;

/// Every kind the source watches.
pub const KINDS: [Kind; 14] = [
    Kind::Namespace,
    Kind::Pod,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::ServiceEntry,
    Kind::AuthorizationPolicy,
    Kind::PeerAuthentication,
    Kind::RequestAuthentication,
    Kind::Gateway,
    Kind::GatewayClass,
    Kind::HttpRoute,
    Kind::GrpcRoute,
    Kind::VirtualService,
    Kind::DestinationRule,
];

/// A change waits this long for more before the model is rebuilt...
pub const DEBOUNCE_QUIET: Duration = Duration::from_millis(100);
/// ...but never longer than this after the first change of a burst.
pub const DEBOUNCE_MAX: Duration = Duration::from_secs(1);

/// The objects the watchers keep, and which kinds have been listed at least once.
#[derive(Debug)]
pub struct Store {
    resources: Mutex<Resources>,
    changed: Notify,
    synced: watch::Sender<BTreeSet<Kind>>,
}

impl Store {
    fn new() -> Arc<Store> {
        Arc::new(Store {
            resources: Mutex::new(Resources::default()),
            changed: Notify::new(),
            synced: watch::Sender::new(BTreeSet::new()),
        })
    }

    /// A copy of the current objects.
    pub fn snapshot(&self) -> Resources {
        self.resources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut Resources)) {
        f(&mut self
            .resources
            .lock()
            .unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_one();
    }

    /// Completes once every kind of [`KINDS`] has been listed.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we borrow it.
        let _ = rx.wait_for(|s| KINDS.iter().all(|k| s.contains(k))).await;
    }

    /// Kinds not listed yet, for logs while waiting.
    pub fn unsynced(&self) -> Vec<Kind> {
        let synced = self.synced.borrow();
        KINDS
            .iter()
            .copied()
            .filter(|k| !synced.contains(k))
            .collect()
    }

    /// Waits for the next change and then for the burst it starts to settle
    /// ([`DEBOUNCE_QUIET`], at most [`DEBOUNCE_MAX`]).
    pub async fn next_change(&self) {
        self.changed.notified().await;
        let first = Instant::now();
        while first.elapsed() < DEBOUNCE_MAX {
            let wait = DEBOUNCE_QUIET.min(DEBOUNCE_MAX.saturating_sub(first.elapsed()));
            if tokio::time::timeout(wait, self.changed.notified())
                .await
                .is_err()
            {
                break;
            }
        }
    }
}

/// The watchers: they run until dropped.
#[derive(Debug)]
pub struct KubernetesSource {
    store: Arc<Store>,
    _tasks: JoinSet<()>,
}

impl KubernetesSource {
    /// Starts watching every kind through `client`.
    pub fn start(client: Client) -> KubernetesSource {
        let store = Store::new();
        let mut tasks = JoinSet::new();
        tasks.spawn(watch_kind::<Namespace>(
            Api::all(client.clone()),
            Kind::Namespace,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<Pod>(
            Api::all(client.clone()),
            Kind::Pod,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<Service>(
            Api::all(client.clone()),
            Kind::Service,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<EndpointSlice>(
            Api::all(client.clone()),
            Kind::EndpointSlice,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<ServiceEntry>(
            Api::all(client.clone()),
            Kind::ServiceEntry,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<PeerAuthentication>(
            Api::all(client.clone()),
            Kind::PeerAuthentication,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<RequestAuthentication>(
            Api::all(client.clone()),
            Kind::RequestAuthentication,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<Gateway>(
            Api::all(client.clone()),
            Kind::Gateway,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<HttpRoute>(
            Api::all(client.clone()),
            Kind::HttpRoute,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<GrpcRoute>(
            Api::all(client.clone()),
            Kind::GrpcRoute,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<VirtualService>(
            Api::all(client.clone()),
            Kind::VirtualService,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<DestinationRule>(
            Api::all(client.clone()),
            Kind::DestinationRule,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<GatewayClass>(
            Api::all(client.clone()),
            Kind::GatewayClass,
            store.clone(),
        ));
        tasks.spawn(watch_kind::<AuthorizationPolicy>(
            Api::all(client),
            Kind::AuthorizationPolicy,
            store.clone(),
        ));
        KubernetesSource {
            store,
            _tasks: tasks,
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

/// Keeps `kind`'s objects in `store` in step with the API server. Each object is typed
/// here, one at a time ([`ambit_k8s::read::from_api_server`]): one that cannot be read
/// is logged by name and left out (a security policy is kept, marked unreadable, and
/// fails closed), while the rest of its kind is listed and watched as usual. Typed by
/// kube-rs, it would fail the whole list, or the watch, again on every retry, and the
/// kind would stay as it was, however much else changed.
/// The GatewayClass of waypoints, server-side applied by the control plane as istiod
/// makes its own: shipped in the manifests it would be a custom object beside its own
/// CRD, which neither `kubectl apply` nor Helm can map before the CRD is established.
/// Retried with a backoff while the Gateway API CRDs are missing or the API server
/// refuses.
pub async fn ensure_waypoint_class(client: Client) {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
    let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "GatewayClass");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "gatewayclasses");
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let class = serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GatewayClass",
        "metadata": {"name": ambit_k8s::gateway::WAYPOINT_CLASS},
        "spec": {
            "controllerName": WAYPOINT_CONTROLLER,
            "description": "The default Istio waypoint GatewayClass (Ambit)",
        },
    });
    let mut backoff = Duration::from_secs(1);
    loop {
        let params = PatchParams::apply(crate::cluster_ca::FIELD_MANAGER);
        match api
            .patch(
                ambit_k8s::gateway::WAYPOINT_CLASS,
                &params,
                &Patch::Apply(&class),
            )
            .await
        {
            Ok(_) => return,
            Err(e) => tracing::warn!(
                error = %e,
                retry_in = ?backoff,
                "GatewayClass istio-waypoint not applied (are the Gateway API CRDs installed?)"
            ),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// The `controllerName` of the waypoint GatewayClass (Istio's).
pub const WAYPOINT_CONTROLLER: &str = "istio.io/mesh-controller";

async fn watch_kind<K>(api: Api<Raw<K>>, kind: Kind, store: Arc<Store>)
where
    K: kube::Resource<DynamicType = ()> + Debug + Send + 'static,
{
    let mut events = watcher(api, watcher::Config::default())
        .modify(Raw::trim)
        .default_backoff()
        .boxed();
    let read = |raw: Raw<K>| match from_api_server(kind, &raw.value) {
        Ok(object) => Some(object),
        Err(e) => {
            tracing::error!(
                %kind,
                namespace = raw.metadata.namespace.as_deref().unwrap_or(""),
                name = raw.metadata.name.as_deref().unwrap_or(""),
                error = %e,
                "object cannot be read; left out until it is corrected"
            );
            None
        }
    };
    // Objects of a list in progress: they replace the kind's objects once it is done.
    let mut listing: Option<Vec<Object>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listing = Some(Vec::new()),
            Ok(Event::InitApply(o)) => {
                if let Some(object) = read(o) {
                    listing.get_or_insert_with(Vec::new).push(object);
                }
            }
            Ok(Event::InitDone) => {
                let objects = listing.take().unwrap_or_default();
                tracing::debug!(%kind, objects = objects.len(), "listed");
                store.update(|r| r.replace_kind(kind, objects));
                store.synced.send_if_modified(|s| s.insert(kind));
            }
            Ok(Event::Apply(o)) => {
                let key = o.key();
                match read(o) {
                    Some(object) => store.update(|r| r.insert(object)),
                    // The version that could be read no longer stands either.
                    None => store.update(|r| r.remove(kind, &key)),
                }
            }
            Ok(Event::Delete(o)) => store.update(|r| r.remove(kind, &o.key())),
            Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                if status.code == 404 =>
            {
                // The kind's CRD is not installed (e.g. no Istio CRDs): there are none
                // of it, and the list is retried in case it gets installed.
                if store.synced.send_if_modified(|s| s.insert(kind)) {
                    tracing::info!(%kind, "not served by the API server (CRD not installed); none assumed until it is");
                }
            }
            Err(e) => tracing::warn!(%kind, error = %e, "watch failed; retrying after a backoff"),
        }
    }
}

/// An object of kind `K` as the API server sent it, untyped: the whole object as JSON,
/// and of its metadata only what the watcher itself needs (name, namespace,
/// resourceVersion), read without failing. `K` names the kind's API path.
#[derive(Debug)]
pub struct Raw<K> {
    metadata: ObjectMeta,
    value: Value,
    kind: PhantomData<fn() -> K>,
}

impl<K> Clone for Raw<K> {
    fn clone(&self) -> Self {
        Raw {
            metadata: self.metadata.clone(),
            value: self.value.clone(),
            kind: PhantomData,
        }
    }
}

impl<K> Raw<K> {
    fn key(&self) -> ObjectKey {
        ObjectKey::new(
            self.metadata.namespace.as_deref().unwrap_or(""),
            self.metadata.name.as_deref().unwrap_or(""),
        )
    }

    /// Only the spec, status, labels and annotations matter here; the rest is memory
    /// for nothing in a large cluster.
    fn trim(&mut self) {
        let Some(meta) = self
            .value
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
        else {
            return;
        };
        meta.remove("managedFields");
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    }
}

impl<'de, K> Deserialize<'de> for Raw<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        let text = |field: &str| {
            value
                .get("metadata")
                .and_then(|m| m.get(field))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let metadata = ObjectMeta {
            name: text("name"),
            namespace: text("namespace"),
            resource_version: text("resourceVersion"),
            uid: text("uid"),
            ..ObjectMeta::default()
        };
        Ok(Raw {
            metadata,
            value,
            kind: PhantomData,
        })
    }
}

impl<K: kube::Resource<DynamicType = ()>> kube::Resource for Raw<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
