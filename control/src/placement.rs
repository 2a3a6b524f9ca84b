//! Where workloads run, for the CA's node authorization: a node agent may request a
//! certificate for an identity only while a non-terminated pod running as that
//! identity is scheduled on the agent's own node. Filled from the same objects as the
//! model, so in local mode it is the directory's pods, in a cluster the API's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::RwLock;

use ambit_core::certificate::WorkloadPlacement;
use ambit_core::{SpiffeId, TrustDomain};

use crate::resources::{ObjectKey, Resources};

/// A pod scheduled on a node and not terminated, as the CA and the node agents' calls
/// need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledPod {
    /// `metadata.uid` (empty when the source has none, as YAML files may not).
    pub uid: String,
    pub node: String,
    /// The identity it runs as (none when its names make no valid SPIFFE ID).
    pub identity: Option<SpiffeId>,
    /// Its labels ask for it to be captured ([`crate::translate::wants_ambient`]).
    pub ambient: bool,
}

/// The non-terminated pods of `resources` that are scheduled on a node.
pub fn scheduled_pods(
    resources: &Resources,
    trust_domain: &TrustDomain,
) -> BTreeMap<ObjectKey, ScheduledPod> {
    let mut out = BTreeMap::new();
    for (key, pod) in &resources.pods {
        let Some(spec) = &pod.spec else { continue };
        let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            continue;
        }
        let sa = spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        out.insert(
            key.clone(),
            ScheduledPod {
                uid: pod.metadata.uid.clone().unwrap_or_default(),
                node: node.to_owned(),
                identity: SpiffeId::new(trust_domain.clone(), &key.namespace, sa).ok(),
                ambient: crate::translate::wants_ambient(resources, key, pod),
            },
        );
    }
    out
}

/// The current placements, shared with the CA (identities per node) and the node
/// agents' calls (pods).
#[derive(Debug)]
pub struct Placements {
    trust_domain: TrustDomain,
    current: RwLock<Current>,
}

#[derive(Debug, Default)]
struct Current {
    pods: BTreeMap<ObjectKey, ScheduledPod>,
    /// node → identities of its pods, for the CA's lookups.
    identities: BTreeMap<String, BTreeSet<SpiffeId>>,
}

impl Placements {
    pub fn new(trust_domain: TrustDomain) -> Placements {
        Placements {
            trust_domain,
            current: RwLock::new(Current::default()),
        }
    }

    pub fn update(&self, resources: &Resources) {
        let pods = scheduled_pods(resources, &self.trust_domain);
        let mut identities: BTreeMap<String, BTreeSet<SpiffeId>> = BTreeMap::new();
        for pod in pods.values() {
            if let Some(identity) = &pod.identity {
                identities
                    .entry(pod.node.clone())
                    .or_default()
                    .insert(identity.clone());
            }
        }
        if let Ok(mut current) = self.current.write() {
            *current = Current { pods, identities };
        }
    }

    /// Pod `key`, if it is scheduled and not terminated.
    pub fn scheduled(&self, key: &ObjectKey) -> Option<ScheduledPod> {
        self.current.read().ok()?.pods.get(key).cloned()
    }
}

impl crate::token_review::PodNodes for Placements {
    fn pod_node(&self, key: &ObjectKey) -> Option<(String, String)> {
        self.scheduled(key).map(|p| (p.uid, p.node))
    }
}

impl WorkloadPlacement for Placements {
    fn runs_on(&self, node: &str, identity: &SpiffeId) -> bool {
        self.current.read().is_ok_and(|c| {
            c.identities
                .get(node)
                .is_some_and(|ids| ids.contains(identity))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::parse_file;

    #[test]
    fn only_non_terminated_scheduled_pods_place_their_identity_on_their_node() {
        let text = "\
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: cart, containers: [{name: c, image: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec: {nodeName: node-b, containers: [{name: c, image: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: pay-1, namespace: shop}
spec: {nodeName: node-a, serviceAccountName: pay, containers: [{name: c, image: c}]}
status: {phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: shop}
spec: {serviceAccountName: ghost, containers: [{name: c, image: c}]}
";
        let mut resources = Resources::default();
        for object in parse_file(std::path::Path::new("pods.yaml"), text).objects {
            resources.insert(object);
        }
        let placements = Placements::new(TrustDomain::default());
        placements.update(&resources);
        let id = |s: &str| SpiffeId::parse(s).unwrap();
        assert!(placements.runs_on("node-a", &id("spiffe://cluster.local/ns/shop/sa/cart")));
        assert!(placements.runs_on("node-b", &id("spiffe://cluster.local/ns/shop/sa/default")));
        assert!(!placements.runs_on("node-b", &id("spiffe://cluster.local/ns/shop/sa/cart")));
        assert!(!placements.runs_on("node-a", &id("spiffe://cluster.local/ns/shop/sa/pay")));
        assert!(!placements.runs_on("node-a", &id("spiffe://cluster.local/ns/shop/sa/ghost")));
    }
}
