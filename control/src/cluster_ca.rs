//! The CA's material in a cluster, and the root it publishes.
//!
//! - A plug-in Secret `cacerts` in the control plane's namespace (Istio's name and
//!   keys: `ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`) takes
//!   precedence: the CA signs with that intermediate.
//! - Otherwise the self-signed root lives in Secret `istio-ca-secret` (same keys). It
//!   is generated and created once; while it exists it is never regenerated. Two
//!   replicas starting at once race on the create, and the loser uses the winner's.
//! - The root bundle is published as ConfigMap `istio-ca-root-cert` (key
//!   `root-cert.pem`) in every namespace, where workloads and ztunnels find it, and put
//!   back when someone edits or deletes it.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::SystemTime;

use ambit_ca::authority::CertificateAuthority;
use ambit_ca::store::{CaMaterial, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};
use ambit_core::TrustDomain;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client};
use tokio::sync::watch;

/// The plug-in CA Secret.
pub const PLUGIN_SECRET: &str = "cacerts";
/// The Secret holding the generated self-signed root.
pub const SELF_SIGNED_SECRET: &str = "istio-ca-secret";
/// The ConfigMap the root is published as, in every namespace.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
/// Who writes the ConfigMaps (server-side apply).
pub const FIELD_MANAGER: &str = "ambit-control";

#[derive(Debug, thiserror::Error)]
pub enum ClusterCaError {
    #[error("Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name}: {reason}")]
    Unusable {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("generating a self-signed root: {0}")]
    Generate(#[from] ambit_ca::authority::CaLoadError),
}

/// The CA's material and where it came from (`namespace/name`, for logs).
pub async fn load_or_create(
    client: Client,
    namespace: &str,
    trust_domain: &TrustDomain,
    now: SystemTime,
) -> Result<(CaMaterial, String), ClusterCaError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let api_error = |name: &str| {
        let namespace = namespace.to_owned();
        let name = name.to_owned();
        move |source| ClusterCaError::Api {
            namespace,
            name,
            source,
        }
    };
    let location = |name: &str| format!("Secret {namespace}/{name}");
    if let Some(plugin) = secrets
        .get_opt(PLUGIN_SECRET)
        .await
        .map_err(api_error(PLUGIN_SECRET))?
    {
        let material = material_of(&plugin, namespace, PLUGIN_SECRET)?;
        tracing::info!(secret = %location(PLUGIN_SECRET), "using the plug-in CA");
        return Ok((material, location(PLUGIN_SECRET)));
    }
    if let Some(existing) = secrets
        .get_opt(SELF_SIGNED_SECRET)
        .await
        .map_err(api_error(SELF_SIGNED_SECRET))?
    {
        let material = material_of(&existing, namespace, SELF_SIGNED_SECRET)?;
        tracing::info!(secret = %location(SELF_SIGNED_SECRET), "using the stored self-signed root");
        return Ok((material, location(SELF_SIGNED_SECRET)));
    }
    let material = CertificateAuthority::generate_root(trust_domain, now)?;
    match secrets
        .create(
            &PostParams::default(),
            &secret_of(&material, namespace, SELF_SIGNED_SECRET),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(secret = %location(SELF_SIGNED_SECRET), "generated and stored a new self-signed root");
            Ok((material, location(SELF_SIGNED_SECRET)))
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            // Another replica created it first: use that one, so all agree.
            let winner = secrets
                .get(SELF_SIGNED_SECRET)
                .await
                .map_err(api_error(SELF_SIGNED_SECRET))?;
            tracing::info!(secret = %location(SELF_SIGNED_SECRET), "another replica stored a root first; using it");
            Ok((
                material_of(&winner, namespace, SELF_SIGNED_SECRET)?,
                location(SELF_SIGNED_SECRET),
            ))
        }
        Err(e) => Err(api_error(SELF_SIGNED_SECRET)(e)),
    }
}

/// The material in a CA Secret; `cert-chain.pem` may be absent or empty.
fn material_of(secret: &Secret, namespace: &str, name: &str) -> Result<CaMaterial, ClusterCaError> {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &str| -> Result<Option<String>, ClusterCaError> {
        data.get(key)
            .map(|b| {
                String::from_utf8(b.0.clone()).map_err(|_| ClusterCaError::Unusable {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    reason: format!("{key} is not PEM text"),
                })
            })
            .transpose()
    };
    let missing: Vec<&str> = [CA_CERT, CA_KEY, ROOT_CERT]
        .into_iter()
        .filter(|k| !data.contains_key(*k))
        .collect();
    if !missing.is_empty() {
        return Err(ClusterCaError::Unusable {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            reason: format!(
                "missing {}; a CA Secret holds ca-cert.pem, ca-key.pem, root-cert.pem and optionally cert-chain.pem",
                missing.join(", ")
            ),
        });
    }
    Ok(CaMaterial {
        ca_cert_pem: text(CA_CERT)?.unwrap_or_default(),
        ca_key_pem: text(CA_KEY)?.unwrap_or_default(),
        cert_chain_pem: text(CERT_CHAIN)?.unwrap_or_default(),
        root_cert_pem: text(ROOT_CERT)?.unwrap_or_default(),
    })
}

fn secret_of(material: &CaMaterial, namespace: &str, name: &str) -> Secret {
    let data = [
        (CA_CERT, &material.ca_cert_pem),
        (CA_KEY, &material.ca_key_pem),
        (CERT_CHAIN, &material.cert_chain_pem),
        (ROOT_CERT, &material.root_cert_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                FIELD_MANAGER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("istio.io/ca-root".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// Reads the Secret the CA's material came from (`location`, `Secret ns/name`) every
/// `interval` (`--ca-reload`) and offers it to `live`: a changed plug-in `cacerts` is used
/// without a restart; an unusable one is refused, naming the key, and the current CA
/// keeps signing. Runs until dropped.
pub async fn reload_secret(
    client: Client,
    namespace: String,
    location: String,
    live: std::sync::Arc<ambit_ca::live::LiveAuthority>,
    interval: std::time::Duration,
) {
    let name = location
        .rsplit('/')
        .next()
        .unwrap_or(PLUGIN_SECRET)
        .to_owned();
    let secrets: Api<Secret> = Api::namespaced(client, &namespace);
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    let mut last_problem: Option<String> = None;
    loop {
        ticker.tick().await;
        let problem = match secrets.get_opt(&name).await {
            Ok(Some(secret)) => match material_of(&secret, &namespace, &name) {
                Ok(material) => live
                    .offer(material, &location, SystemTime::now())
                    .err()
                    .map(|e| format!("Secret {namespace}/{name}: {e}")),
                Err(e) => Some(e.to_string()),
            },
            // Gone: the CA keeps signing with what it has.
            Ok(None) => Some(format!(
                "Secret {namespace}/{name} is gone; the current CA keeps signing"
            )),
            Err(e) => Some(format!("Secret {namespace}/{name}: {e}")),
        };
        if problem.is_some() && problem != last_problem {
            if let Some(p) = &problem {
                tracing::error!(problem = %p, "CA Secret not reloaded; the current CA keeps signing");
            }
        }
        last_problem = problem;
    }
}

/// Keeps ConfigMap `istio-ca-root-cert` with the trust bundle `roots` holds in every
/// namespace of `namespaces`, putting it back when it is changed or deleted, and
/// publishing it again everywhere when the bundle changes (a rotation). Runs until
/// dropped.
pub async fn publish_root(
    client: Client,
    mut roots: watch::Receiver<String>,
    mut namespaces: watch::Receiver<BTreeSet<String>>,
) {
    let mut root_pem = roots.borrow_and_update().clone();
    let mut current: BTreeSet<String> = BTreeSet::new();
    let mut published: BTreeSet<String> = BTreeSet::new();
    // Namespaces whose ConfigMap holds the root, during a list of them.
    let mut listed: Option<BTreeSet<String>> = None;
    let all: Api<ConfigMap> = Api::all(client.clone());
    let mut configmaps = watcher(
        all,
        watcher::Config::default().fields(&format!("metadata.name={ROOT_CONFIGMAP}")),
    )
    .default_backoff()
    .boxed();
    // Namespaces whose ConfigMap could not be written are retried on this tick.
    let mut retry = tokio::time::interval(std::time::Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = retry.tick() => {}
            changed = roots.changed() => {
                if changed.is_err() {
                    return;
                }
                root_pem = roots.borrow_and_update().clone();
                published.clear();
            }
            changed = namespaces.changed() => {
                if changed.is_err() {
                    return;
                }
                current = namespaces.borrow_and_update().clone();
                published.retain(|ns| current.contains(ns));
            }
            event = configmaps.next() => {
                // A ConfigMap that does not hold our root (or is gone) is republished.
                let drifted = |cm: &ConfigMap| {
                    cm.data.as_ref().and_then(|d| d.get(ROOT_CERT)) != Some(&root_pem)
                };
                match event {
                    // A (re)list says which ConfigMaps exist: one missing from it (it
                    // went while the watch was down) is republished.
                    Some(Ok(Event::Init)) => listed = Some(BTreeSet::new()),
                    Some(Ok(Event::InitApply(cm))) => {
                        if let (Some(ns), false) = (cm.metadata.namespace.clone(), drifted(&cm)) {
                            listed.get_or_insert_with(BTreeSet::new).insert(ns);
                        }
                    }
                    Some(Ok(Event::InitDone)) => {
                        let listed = listed.take().unwrap_or_default();
                        published.retain(|ns| listed.contains(ns));
                    }
                    Some(Ok(Event::Apply(cm))) if drifted(&cm) => {
                        if let Some(ns) = cm.metadata.namespace.as_deref() {
                            published.remove(ns);
                        }
                    }
                    Some(Ok(Event::Delete(cm))) => {
                        if let Some(ns) = cm.metadata.namespace.as_deref() {
                            published.remove(ns);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!(error = %e, configmap = ROOT_CONFIGMAP, "watch failed; retrying after a backoff"),
                    None => return,
                }
            }
        }
        for ns in current.difference(&published.clone()) {
            match apply_root(&client, ns, &root_pem).await {
                Ok(()) => {
                    tracing::debug!(namespace = %ns, configmap = ROOT_CONFIGMAP, "root published");
                    published.insert(ns.clone());
                }
                // A terminating namespace refuses new objects; it is about to go.
                Err(e) => {
                    tracing::warn!(namespace = %ns, configmap = ROOT_CONFIGMAP, error = %e, "cannot publish the root")
                }
            }
        }
    }
}

async fn apply_root(client: &Client, namespace: &str, root_pem: &str) -> Result<(), kube::Error> {
    let configmap = ConfigMap {
        metadata: ObjectMeta {
            name: Some(ROOT_CONFIGMAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "istio.io/config".to_owned(),
                "true".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            ROOT_CERT.to_owned(),
            root_pem.to_owned(),
        )])),
        ..ConfigMap::default()
    };
    // Server-side apply needs apiVersion and kind in the body.
    let mut body = serde_json::to_value(&configmap).map_err(kube::Error::SerdeError)?;
    body["apiVersion"] = "v1".into();
    body["kind"] = "ConfigMap".into();
    Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .patch(
            ROOT_CONFIGMAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map(|_| ())
}
