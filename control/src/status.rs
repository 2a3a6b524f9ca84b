//! Status conditions in a cluster (`ZtunnelAccepted`):
//! - a Service or ServiceEntry left out of the model gets it `False` with the reason,
//!   so `kubectl get svc -o yaml` says why ztunnel does not know it; withdrawn once the
//!   object is translated again;
//! - every AuthorizationPolicy and PeerAuthentication gets it, `True` when ztunnel
//!   enforces it as written, else `False` with Istio's reason (`UnsupportedValue`,
//!   `InvalidValue`) and what is enforced instead.
//!
//! Written with server-side apply on the status subresource, so no other writer's
//! conditions are touched. Pods are only logged: their status belongs to the kubelet.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};

use crate::resources::ObjectKey;
use crate::security::{AuthorizationPolicy, PeerAuthentication};
use crate::service_entry::ServiceEntry;
use crate::translate::{PolicyStatus, Skipped};

/// One condition an object should carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub kind: &'static str,
    pub key: ObjectKey,
    pub accepted: bool,
    pub reason: String,
    pub message: String,
}

/// The conditions the objects of a translation should carry.
pub fn wanted(skipped: &[Skipped], policies: &PolicyStatus) -> Vec<Wanted> {
    let skipped = skipped
        .iter()
        .filter(|s| matches!(s.kind, "Service" | "ServiceEntry"))
        .map(|s| Wanted {
            kind: s.kind,
            key: s.key.clone(),
            accepted: false,
            reason: "Skipped".into(),
            message: s.reason.clone(),
        });
    let policies = policies.iter().map(|(kind, key, a)| Wanted {
        kind,
        key: key.clone(),
        accepted: a.accepted,
        reason: a.reason.to_owned(),
        message: a.message.clone(),
    });
    skipped.chain(policies).collect()
}

/// The condition's type.
pub const CONDITION: &str = "ZtunnelAccepted";
const FIELD_MANAGER: &str = "ambit-control";

/// Which objects carry our condition, and with what message.
pub struct StatusWriter {
    client: Client,
    written: BTreeMap<(&'static str, ObjectKey), Wanted>,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("written", &self.written.len())
            .finish_non_exhaustive()
    }
}

impl StatusWriter {
    pub fn new(client: Client) -> Self {
        StatusWriter {
            client,
            written: BTreeMap::new(),
        }
    }

    /// Brings the conditions in line with `skipped`: set where an object is newly
    /// skipped (or for a new reason), withdrawn where it no longer is. A failed write
    /// is logged and retried on the next update.
    pub async fn update(&mut self, wanted: &[Wanted]) {
        let want: BTreeMap<(&'static str, ObjectKey), Wanted> = wanted
            .iter()
            .map(|w| ((w.kind, w.key.clone()), w.clone()))
            .collect();
        let stale: Vec<(&'static str, ObjectKey)> = self
            .written
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for (kind, key) in stale {
            match self.apply(kind, &key, None).await {
                Ok(()) => {
                    self.written.remove(&(kind, key));
                }
                // A deleted object has no status left to clear.
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    self.written.remove(&(kind, key));
                }
                Err(e) => {
                    tracing::warn!(%kind, object = %key, error = %e, "cannot clear the status condition")
                }
            }
        }
        for ((kind, key), condition) in want {
            if self.written.get(&(kind, key.clone())) == Some(&condition) {
                continue;
            }
            match self.apply(kind, &key, Some(&condition)).await {
                Ok(()) => {
                    self.written.insert((kind, key), condition);
                }
                Err(e) => {
                    tracing::warn!(%kind, object = %key, error = %e, "cannot write the status condition")
                }
            }
        }
    }

    /// Applies our condition (`Some(reason)`) or none (`None`) to the object's status.
    async fn apply(
        &self,
        kind: &'static str,
        key: &ObjectKey,
        condition: Option<&Wanted>,
    ) -> Result<(), kube::Error> {
        let conditions: Vec<Value> = condition
            .map(|c| {
                json!({
                    "type": CONDITION,
                    "status": if c.accepted { "True" } else { "False" },
                    "reason": c.reason,
                    "message": c.message,
                    "lastTransitionTime": Time(k8s_openapi::jiff::Timestamp::now()),
                })
            })
            .into_iter()
            .collect();
        let api_version = match kind {
            "Service" => "v1",
            "AuthorizationPolicy" | "PeerAuthentication" => "security.istio.io/v1",
            _ => "networking.istio.io/v1",
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let body = json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"name": key.name, "namespace": key.namespace},
            "status": {"conditions": conditions},
        });
        match kind {
            "Service" => {
                Api::<Service>::namespaced(self.client.clone(), &key.namespace)
                    .patch_status(&key.name, &params, &Patch::Apply(body))
                    .await?;
            }
            "AuthorizationPolicy" => {
                Api::<AuthorizationPolicy>::namespaced(self.client.clone(), &key.namespace)
                    .patch_status(&key.name, &params, &Patch::Apply(body))
                    .await?;
            }
            "PeerAuthentication" => {
                Api::<PeerAuthentication>::namespaced(self.client.clone(), &key.namespace)
                    .patch_status(&key.name, &params, &Patch::Apply(body))
                    .await?;
            }
            _ => {
                Api::<ServiceEntry>::namespaced(self.client.clone(), &key.namespace)
                    .patch_status(&key.name, &params, &Patch::Apply(body))
                    .await?;
            }
        }
        Ok(())
    }
}
