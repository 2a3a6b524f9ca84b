//! Status in a cluster:
//! - `ZtunnelAccepted`: a Service or ServiceEntry left out of the model gets it `False`
//!   with the reason, so `kubectl get svc -o yaml` says why ztunnel does not know it;
//!   withdrawn once the object is translated again. Every AuthorizationPolicy and
//!   PeerAuthentication gets it, `True` when ztunnel enforces it as written, else
//!   `False` with Istio's reason (`UnsupportedValue`, `InvalidValue`) and what is
//!   enforced instead.
//! - `istio.io/WaypointBound` on a Service or ServiceEntry that asks for a waypoint,
//!   `WaypointAccepted` on a `targetRefs` AuthorizationPolicy and on every
//!   RequestAuthentication, and a waypoint Gateway's
//!   whole status (`Accepted`, `Programmed`, its listeners, `addresses`)
//!   ([`crate::translate::waypoints`]).
//! - An HTTPRoute's `status.parents`: for each Service parent, `Accepted` and
//!   `ResolvedRefs` with the Gateway API's reasons ([`crate::translate::routes`]),
//!   controller `istio.io/mesh-controller`. The list is applied whole: entries another
//!   controller wrote for a Gateway parent of the same route are replaced.
//!
//! All of an object's conditions are written in one server-side apply on the status
//! subresource, so no other writer's conditions are touched. [`wanted`] is pure; the
//! writer only applies what it says. Pods are only logged: their status belongs to the
//! kubelet.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};

use crate::gateway::Gateway;
use crate::resources::ObjectKey;
use crate::security::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication};
use crate::service_entry::ServiceEntry;
use crate::translate::routes::{ParentStatus, RouteStatus};
use crate::translate::waypoints::{self, WaypointStatus};
use crate::translate::{PolicyStatus, Skipped};
use ambit_k8s::destination_rule::DestinationRule;
use ambit_k8s::http_route::{GrpcRoute, HttpRoute};
use ambit_k8s::virtual_service::VirtualService;

/// The status an object should carry: its conditions (ours), and for a waypoint
/// Gateway its listeners and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub kind: &'static str,
    pub key: ObjectKey,
    pub conditions: Vec<WantedCondition>,
    /// A Gateway's `status.listeners` and `status.addresses`.
    pub gateway: Option<WantedGateway>,
    /// An HTTPRoute's `status.parents` (its Service parents).
    pub route_parents: Option<Vec<ParentStatus>>,
}

/// One condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedCondition {
    pub type_: &'static str,
    pub accepted: bool,
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedGateway {
    /// Name, then its conditions.
    pub listeners: Vec<(String, Vec<WantedCondition>)>,
    pub hostname: Option<String>,
}

fn condition(type_: &'static str, c: &waypoints::Condition) -> WantedCondition {
    WantedCondition {
        type_,
        accepted: c.status,
        reason: c.reason.to_owned(),
        message: c.message.clone(),
    }
}

/// The status the objects of a translation should carry, one entry per object.
pub fn wanted(
    skipped: &[Skipped],
    policies: &PolicyStatus,
    waypoint_status: &WaypointStatus,
    route_status: &RouteStatus,
) -> Vec<Wanted> {
    fn add(
        objects: &mut BTreeMap<(&'static str, ObjectKey), Wanted>,
        kind: &'static str,
        key: &ObjectKey,
        c: WantedCondition,
    ) {
        objects
            .entry((kind, key.clone()))
            .or_insert_with(|| Wanted {
                kind,
                key: key.clone(),
                conditions: Vec::new(),
                gateway: None,
                route_parents: None,
            })
            .conditions
            .push(c);
    }
    let mut objects: BTreeMap<(&'static str, ObjectKey), Wanted> = BTreeMap::new();
    for s in skipped
        .iter()
        .filter(|s| matches!(s.kind, "Service" | "ServiceEntry"))
    {
        add(
            &mut objects,
            s.kind,
            &s.key,
            WantedCondition {
                type_: CONDITION,
                accepted: false,
                reason: "Skipped".into(),
                message: s.reason.clone(),
            },
        );
    }
    for (kind, key, a) in policies {
        add(
            &mut objects,
            kind,
            key,
            WantedCondition {
                type_: policy_condition(kind),
                accepted: a.accepted,
                reason: a.reason.to_owned(),
                message: a.message.clone(),
            },
        );
    }
    for (kind, key, c) in &waypoint_status.bound {
        add(
            &mut objects,
            kind,
            key,
            condition(waypoints::WAYPOINT_BOUND, c),
        );
    }
    for (key, c) in &waypoint_status.policies {
        add(
            &mut objects,
            "AuthorizationPolicy",
            key,
            condition(waypoints::WAYPOINT_ACCEPTED, c),
        );
    }
    for (key, g) in &waypoint_status.gateways {
        add(
            &mut objects,
            "Gateway",
            key,
            condition("Accepted", &g.accepted),
        );
        add(
            &mut objects,
            "Gateway",
            key,
            condition("Programmed", &g.programmed),
        );
        if let Some(w) = objects.get_mut(&("Gateway", key.clone())) {
            w.gateway = Some(WantedGateway {
                listeners: g
                    .listeners
                    .iter()
                    .map(|(name, accepted, programmed)| {
                        (
                            name.clone(),
                            vec![
                                condition("Accepted", accepted),
                                condition("Programmed", programmed),
                            ],
                        )
                    })
                    .collect(),
                hostname: g.hostname.clone(),
            });
        }
    }
    for (kind, key, c) in &route_status.conditions {
        add(&mut objects, kind, key, condition("Accepted", c));
    }
    for (kind, key, parents) in &route_status.parents {
        objects.insert(
            (kind, key.clone()),
            Wanted {
                kind,
                key: key.clone(),
                conditions: Vec::new(),
                gateway: None,
                route_parents: Some(parents.clone()),
            },
        );
    }
    objects.into_values().collect()
}

/// The body of the status apply for `wanted` (none: withdraw ours), at `now`.
pub fn status_body(wanted: Option<&Wanted>, now: Time) -> Value {
    let conditions = |list: &[WantedCondition]| -> Vec<Value> {
        list.iter()
            .map(|c| {
                json!({
                    "type": c.type_,
                    "status": if c.accepted { "True" } else { "False" },
                    "reason": c.reason,
                    "message": c.message,
                    "lastTransitionTime": now.clone(),
                })
            })
            .collect()
    };
    if let Some(parents) = wanted.and_then(|w| w.route_parents.as_ref()) {
        // A route's status is only its parents (Gateway API `RouteStatus`).
        let parents: Vec<Value> = parents
            .iter()
            .map(|p| {
                let mut parent_ref = json!({
                    "group": if p.kind == "Service" { "" } else { "networking.istio.io" },
                    "kind": p.kind,
                    "namespace": p.namespace,
                    "name": p.name,
                });
                if let Some(port) = p.port {
                    parent_ref["port"] = json!(port);
                }
                json!({
                    "parentRef": parent_ref,
                    "controllerName": crate::gateway::WAYPOINT_CONTROLLER,
                    "conditions": conditions(&[
                        condition("Accepted", &p.accepted),
                        condition("ResolvedRefs", &p.resolved_refs),
                    ]),
                })
            })
            .collect();
        return json!({ "parents": parents });
    }
    let mut status = json!({
        "conditions": wanted.map(|w| conditions(&w.conditions)).unwrap_or_default(),
    });
    if let Some(g) = wanted.and_then(|w| w.gateway.as_ref()) {
        status["listeners"] = g
            .listeners
            .iter()
            .map(|(name, c)| {
                json!({
                    "name": name,
                    "attachedRoutes": 0,
                    "supportedKinds": [
                        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"},
                        {"group": "gateway.networking.k8s.io", "kind": "GRPCRoute"},
                    ],
                    "conditions": conditions(c),
                })
            })
            .collect();
        status["addresses"] = g
            .hostname
            .iter()
            .map(|h| json!({"type": "Hostname", "value": h}))
            .collect();
    }
    status
}

/// The condition a policy of `kind` reports its acceptance in: `WaypointAccepted` for
/// what only waypoints apply (RequestAuthentication, DestinationRule), else
/// `ZtunnelAccepted`.
pub fn policy_condition(kind: &str) -> &'static str {
    if matches!(kind, "RequestAuthentication" | "DestinationRule") {
        waypoints::WAYPOINT_ACCEPTED
    } else {
        CONDITION
    }
}

/// The `apiVersion` status is written in for `kind`.
fn api_version(kind: &str) -> &'static str {
    match kind {
        "Service" => "v1",
        "AuthorizationPolicy" | "PeerAuthentication" | "RequestAuthentication" => {
            "security.istio.io/v1"
        }
        "Gateway" | "HTTPRoute" | "GRPCRoute" => "gateway.networking.k8s.io/v1",
        _ => "networking.istio.io/v1",
    }
}

/// Local mode's stand-in for the status subresources: every object's status as it
/// would be written to a cluster, as one YAML list (what `ambitctl local status`
/// reads), at `now`.
pub fn status_document(wanted: &[Wanted], now: Time) -> String {
    let objects: Vec<Value> = wanted
        .iter()
        .map(|w| {
            json!({
                "apiVersion": api_version(w.kind),
                "kind": w.kind,
                "metadata": {"name": w.key.name, "namespace": w.key.namespace},
                "status": status_body(Some(w), now.clone()),
            })
        })
        .collect();
    serde_yaml_ng::to_string(&objects).unwrap_or_default()
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

    /// Takes over what an earlier leader wrote: every object whose status carries one
    /// of our conditions (or, for a route, a parent of our controller) is counted as
    /// written, so the first [`StatusWriter::update`] of a term withdraws what no
    /// longer applies and writes the rest again. Without it a new leader would never
    /// clear a `False` its predecessor set on an object fixed meanwhile. A kind that
    /// cannot be listed (its CRD not installed, no right to) is skipped, logged.
    pub async fn adopt_existing(&mut self) {
        use kube::api::{ApiResource, DynamicObject, ListParams};
        let kinds: [(&'static str, ApiResource); 9] = [
            ("Service", ApiResource::erase::<Service>(&())),
            ("ServiceEntry", ApiResource::erase::<ServiceEntry>(&())),
            (
                "AuthorizationPolicy",
                ApiResource::erase::<AuthorizationPolicy>(&()),
            ),
            (
                "PeerAuthentication",
                ApiResource::erase::<PeerAuthentication>(&()),
            ),
            (
                "RequestAuthentication",
                ApiResource::erase::<RequestAuthentication>(&()),
            ),
            ("HTTPRoute", ApiResource::erase::<HttpRoute>(&())),
            ("GRPCRoute", ApiResource::erase::<GrpcRoute>(&())),
            ("VirtualService", ApiResource::erase::<VirtualService>(&())),
            (
                "DestinationRule",
                ApiResource::erase::<DestinationRule>(&()),
            ),
        ];
        let mut adopted = 0;
        for (kind, resource) in kinds {
            let api = Api::<DynamicObject>::all_with(self.client.clone(), &resource);
            let list = match api.list(&ListParams::default()).await {
                Ok(list) => list,
                Err(e) => {
                    tracing::info!(%kind, error = %e, "cannot list to take over status conditions; those of this kind are left as they are");
                    continue;
                }
            };
            for object in list {
                let (Some(namespace), Some(name)) = (
                    object.metadata.namespace.as_deref(),
                    object.metadata.name.as_deref(),
                ) else {
                    continue;
                };
                if !carries_ours(&object.data["status"]) {
                    continue;
                }
                let key = ObjectKey::new(namespace, name);
                self.written.entry((kind, key.clone())).or_insert(Wanted {
                    kind,
                    key,
                    conditions: Vec::new(),
                    gateway: None,
                    route_parents: None,
                });
                adopted += 1;
            }
        }
        if adopted > 0 {
            tracing::info!(
                objects = adopted,
                "status conditions written before this term taken over"
            );
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
        let status = match (kind, condition) {
            // Withdrawn from a route: no parents of ours.
            ("HTTPRoute" | "GRPCRoute", None) => json!({"parents": []}),
            _ => status_body(condition, Time(k8s_openapi::jiff::Timestamp::now())),
        };
        let api_version = api_version(kind);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let body = json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"name": key.name, "namespace": key.namespace},
            "status": status,
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
            "RequestAuthentication" => {
                Api::<RequestAuthentication>::namespaced(self.client.clone(), &key.namespace)
                    .patch_status(&key.name, &params, &Patch::Apply(body))
                    .await?;
            }
            "Gateway" => {
                Api::<Gateway>::namespaced(self.client.clone(), &key.namespace)
                    .patch_status(&key.name, &params, &Patch::Apply(body))
                    .await?;
            }
            "HTTPRoute" => {
                Api::<HttpRoute>::namespaced(self.client.clone(), &key.namespace)
                    .patch_status(&key.name, &params, &Patch::Apply(body))
                    .await?;
            }
            "GRPCRoute" => {
                Api::<GrpcRoute>::namespaced(self.client.clone(), &key.namespace)
                    .patch_status(&key.name, &params, &Patch::Apply(body))
                    .await?;
            }
            "VirtualService" => {
                Api::<VirtualService>::namespaced(self.client.clone(), &key.namespace)
                    .patch_status(&key.name, &params, &Patch::Apply(body))
                    .await?;
            }
            "DestinationRule" => {
                Api::<DestinationRule>::namespaced(self.client.clone(), &key.namespace)
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

/// Whether an object's `status` holds something this writer writes: one of our
/// condition types, or a route parent of our controller.
fn carries_ours(status: &Value) -> bool {
    let ours = [CONDITION, "istio.io/WaypointBound", "WaypointAccepted"];
    let condition = status["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"].as_str().is_some_and(|t| ours.contains(&t)))
    });
    let parent = status["parents"].as_array().is_some_and(|ps| {
        ps.iter()
            .any(|p| p["controllerName"] == crate::kubernetes::WAYPOINT_CONTROLLER)
    });
    condition || parent
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::waypoints::{Condition, GatewayStatus};

    fn c(status: bool, reason: &'static str, message: &str) -> Condition {
        Condition::new(status, reason, message)
    }

    #[test]
    fn an_objects_conditions_go_out_together_and_a_gateway_gets_its_listeners_and_address() {
        let key = ObjectKey::new("shop", "p");
        let policies: PolicyStatus = vec![(
            "AuthorizationPolicy",
            key.clone(),
            crate::translate::authz::Acceptance {
                accepted: false,
                reason: "UnsupportedValue",
                message: "attached with targetRefs".into(),
            },
        )];
        let gateway = ObjectKey::new("shop", "waypoint");
        let status = WaypointStatus {
            bound: vec![(
                "Service",
                ObjectKey::new("shop", "web"),
                c(true, "WaypointAccepted", "bound to waypoint shop/waypoint"),
            )],
            policies: vec![(key.clone(), c(true, "Accepted", "attached"))],
            gateways: vec![(
                gateway.clone(),
                GatewayStatus {
                    accepted: c(true, "Accepted", "a waypoint"),
                    programmed: c(true, "Programmed", "ready"),
                    listeners: vec![(
                        "mesh".into(),
                        c(true, "Accepted", "ok"),
                        c(true, "Programmed", "ready"),
                    )],
                    hostname: Some("waypoint.shop.svc.cluster.local".into()),
                },
            )],
        };
        let wanted = wanted(&[], &policies, &status, &RouteStatus::default());
        let policy = wanted.iter().find(|w| w.key == key).unwrap();
        let types: Vec<&str> = policy.conditions.iter().map(|c| c.type_).collect();
        assert_eq!(types, [CONDITION, "WaypointAccepted"]);
        let gw = wanted
            .iter()
            .find(|w| w.kind == "Gateway" && w.key == gateway)
            .unwrap();
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let body = status_body(Some(gw), now.clone());
        assert_eq!(body["conditions"][1]["type"], "Programmed");
        assert_eq!(body["conditions"][1]["status"], "True");
        assert_eq!(
            body["addresses"],
            json!([{"type": "Hostname", "value": "waypoint.shop.svc.cluster.local"}])
        );
        assert_eq!(body["listeners"][0]["name"], "mesh");
        assert_eq!(body["listeners"][0]["conditions"][0]["reason"], "Accepted");
        assert_eq!(
            body["listeners"][0]["supportedKinds"][0]["kind"],
            "HTTPRoute"
        );
        // Withdrawn: no conditions of ours.
        assert_eq!(status_body(None, now), json!({"conditions": []}));
        let service = wanted.iter().find(|w| w.kind == "Service").unwrap();
        assert_eq!(service.conditions[0].type_, "istio.io/WaypointBound");
    }
}
