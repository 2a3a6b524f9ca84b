//! The Kubernetes source: one kube-rs watcher per kind, all feeding one [`Resources`]
//! store, the same store the local directory fills. A watcher lists, then watches from
//! the list's resourceVersion; when the API server answers a watch with 410 Gone (the
//! version was compacted away) or the connection breaks, kube-rs relists after a
//! backoff, and the kind's objects are replaced by the new list as a whole, so an
//! object deleted while the watch was down does not linger.
//!
//! Changes are debounced before the model is rebuilt: a burst of events (a rollout,
//! a relist) costs one translation and one xDS push.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::gateway::{Gateway, GatewayClass};
use crate::resources::{Kind, Object, Resources};
use crate::security::{AuthorizationPolicy, PeerAuthentication};
use crate::service_entry::ServiceEntry;

/// Every kind the source watches.
pub const KINDS: [Kind; 9] = [
    Kind::Namespace,
    Kind::Pod,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::ServiceEntry,
    Kind::AuthorizationPolicy,
    Kind::PeerAuthentication,
    Kind::Gateway,
    Kind::GatewayClass,
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
            |o| Object::Namespace(Box::new(o)),
            store.clone(),
        ));
        tasks.spawn(watch_kind::<Pod>(
            Api::all(client.clone()),
            Kind::Pod,
            |o| Object::Pod(Box::new(o)),
            store.clone(),
        ));
        tasks.spawn(watch_kind::<Service>(
            Api::all(client.clone()),
            Kind::Service,
            |o| Object::Service(Box::new(o)),
            store.clone(),
        ));
        tasks.spawn(watch_kind::<EndpointSlice>(
            Api::all(client.clone()),
            Kind::EndpointSlice,
            |o| Object::EndpointSlice(Box::new(o)),
            store.clone(),
        ));
        tasks.spawn(watch_kind::<ServiceEntry>(
            Api::all(client.clone()),
            Kind::ServiceEntry,
            |o| Object::ServiceEntry(Box::new(o)),
            store.clone(),
        ));
        tasks.spawn(watch_kind::<PeerAuthentication>(
            Api::all(client.clone()),
            Kind::PeerAuthentication,
            |o| Object::PeerAuthentication(Box::new(o)),
            store.clone(),
        ));
        tasks.spawn(watch_kind::<Gateway>(
            Api::all(client.clone()),
            Kind::Gateway,
            |o| Object::Gateway(Box::new(o)),
            store.clone(),
        ));
        tasks.spawn(watch_kind::<GatewayClass>(
            Api::all(client.clone()),
            Kind::GatewayClass,
            |o| Object::GatewayClass(Box::new(o)),
            store.clone(),
        ));
        tasks.spawn(watch_kind::<AuthorizationPolicy>(
            Api::all(client),
            Kind::AuthorizationPolicy,
            |o| Object::AuthorizationPolicy(Box::new(o)),
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

/// Keeps `kind`'s objects in `store` in step with the API server.
async fn watch_kind<K>(api: Api<K>, kind: Kind, wrap: fn(K) -> Object, store: Arc<Store>)
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut events = watcher(api, watcher::Config::default())
        .modify(|o: &mut K| {
            // Only the spec, status, labels and annotations matter here; the rest is
            // memory for nothing in a large cluster.
            let meta = o.meta_mut();
            meta.managed_fields = None;
            if let Some(a) = meta.annotations.as_mut() {
                a.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
        })
        .default_backoff()
        .boxed();
    // Objects of a list in progress: they replace the kind's objects once it is done.
    let mut listing: Option<Vec<Object>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listing = Some(Vec::new()),
            Ok(Event::InitApply(o)) => listing.get_or_insert_with(Vec::new).push(wrap(o)),
            Ok(Event::InitDone) => {
                let objects = listing.take().unwrap_or_default();
                tracing::debug!(%kind, objects = objects.len(), "listed");
                store.update(|r| r.replace_kind(kind, objects));
                store.synced.send_if_modified(|s| s.insert(kind));
            }
            Ok(Event::Apply(o)) => store.update(|r| r.insert(wrap(o))),
            Ok(Event::Delete(o)) => {
                let object = wrap(o);
                store.update(|r| r.remove(kind, &object.key()));
            }
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
