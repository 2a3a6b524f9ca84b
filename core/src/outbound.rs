//! Where a captured outbound connection goes, decided from the model alone.
//!
//! - original destination is a mesh (HBONE) workload → HBONE to `podIP:15008`,
//!   CONNECT `podIP:port`, expecting that workload's identity;
//! - a service VIP on one of its ports → pick a healthy endpoint (service port →
//!   target port), then as above, or plaintext if that endpoint is not in the mesh;
//! - a VIP with no healthy endpoint → refused (never sent to the VIP in plaintext,
//!   where nothing would answer for it);
//! - anything else (outside the mesh, or a VIP port the service does not declare) →
//!   plaintext passthrough to the original destination.
//!
//! Through a waypoint (reference §3.3), before any of the above:
//! - a VIP (on a declared port) whose service is bound to a waypoint serving services
//!   (`waypoint-for` service or all) → HBONE to one of the waypoint's workloads,
//!   `podIP:15008`, CONNECT the original `VIP:port`, expecting that workload's identity;
//! - a workload IP bound to a waypoint serving workloads (workload or all), or the
//!   endpoint picked for a service without a waypoint when that endpoint is so bound →
//!   likewise, CONNECT `podIP:port`;
//! - a waypoint's workloads are the healthy HBONE endpoints of its Service that run as
//!   its identity; with none (not ready), or a binding to a waypoint the model does not
//!   have, the connection is refused with an error naming the waypoint: never sent
//!   around it (decision record 0011).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::hbone::{HboneTarget, HBONE_PORT};
use crate::identity::SpiffeId;
use crate::model::{MeshState, Service, WaypointAddress, WaypointFor, Workload};

/// The address a captured connection was originally sent to (TPROXY leaves it as the
/// accepted socket's local address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddr);

/// The decided path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundRoute {
    Hbone(HbonePath),
    /// Plaintext to `dst`; `workload` is set when it is a known (non-mesh) workload.
    Passthrough {
        dst: SocketAddr,
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbonePath {
    /// Where to open the TLS connection: the destination's `ip:15008`.
    pub hbone_addr: SocketAddr,
    /// The CONNECT `:authority`.
    pub target: HboneTarget,
    /// The identity the destination must present.
    pub identity: SpiffeId,
    pub workload: Arc<Workload>,
    /// The service the client addressed, when it used a VIP.
    pub service: Option<Arc<Service>>,
    /// The waypoint (`namespace/name`) the connection goes through; `workload` is then
    /// the waypoint's workload, and `target` the original destination.
    pub waypoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoHealthyEndpoint { service: String, port: u16 },
    #[error("{bound} is bound to waypoint {waypoint}, which has no ready workload; refused rather than sent around it")]
    WaypointNotReady { waypoint: String, bound: String },
    #[error("{bound} is bound to waypoint {waypoint}, which the model does not have; refused rather than sent around it")]
    UnknownWaypoint { waypoint: String, bound: String },
}

impl RouteError {
    /// Stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            RouteError::NoHealthyEndpoint { .. } => "no_healthy_endpoint",
            RouteError::WaypointNotReady { .. } => "waypoint_not_ready",
            RouteError::UnknownWaypoint { .. } => "waypoint_unknown",
        }
    }

    /// The waypoint (`namespace/name`) the refusal is about, if any.
    pub fn waypoint(&self) -> Option<&str> {
        match self {
            RouteError::NoHealthyEndpoint { .. } => None,
            RouteError::WaypointNotReady { waypoint, .. }
            | RouteError::UnknownWaypoint { waypoint, .. } => Some(waypoint),
        }
    }
}

/// Decides the path for `dst`. `pick` chooses among a service's healthy endpoints
/// (the caller supplies randomness or a round-robin counter).
pub fn route(state: &MeshState, dst: OrigDst, pick: u64) -> Result<OutboundRoute, RouteError> {
    let addr = dst.0;
    if let Some(service) = state.service_by_vip(addr.ip()) {
        if let Some(port) = service.spec.ports.iter().find(|p| p.port == addr.port()) {
            if let Some(bound) = &service.spec.waypoint {
                let via = Via {
                    bound,
                    what: || format!("service {}", service.key()),
                    serves: WaypointFor::serves_services,
                };
                if let Some(path) = via.path(state, addr, Some(service), pick)? {
                    return Ok(OutboundRoute::Hbone(path));
                }
            }
            let candidates: Vec<(Arc<Workload>, IpAddr, u16)> = service
                .spec
                .endpoints
                .iter()
                .filter_map(|ep| {
                    let w = state.workload(&ep.workload_uid)?;
                    let ip = w.ip_like(addr.ip())?;
                    let target_port = ep
                        .ports
                        .iter()
                        .find(|p| p.port == port.port)
                        .map_or(port.target_port, |p| p.target_port);
                    w.spec.healthy.then(|| (w.clone(), ip, target_port))
                })
                .collect();
            if candidates.is_empty() {
                return Err(RouteError::NoHealthyEndpoint {
                    service: service.key(),
                    port: port.port,
                });
            }
            let (w, ip, target_port) = &candidates[(pick % candidates.len() as u64) as usize];
            let endpoint = SocketAddr::new(*ip, *target_port);
            if let Some(path) = workload_waypoint(state, w, endpoint, Some(service), pick)? {
                return Ok(OutboundRoute::Hbone(path));
            }
            return Ok(to_workload(w, endpoint, Some(service.clone())));
        }
        return Ok(OutboundRoute::Passthrough {
            dst: addr,
            workload: None,
            service: Some(service.clone()),
        });
    }
    if let Some(w) = state.workload_by_ip(addr.ip()) {
        if let Some(path) = workload_waypoint(state, w, addr, None, pick)? {
            return Ok(OutboundRoute::Hbone(path));
        }
        return Ok(to_workload(w, addr, None));
    }
    Ok(OutboundRoute::Passthrough {
        dst: addr,
        workload: None,
        service: None,
    })
}

/// The path through the waypoint `w` is bound to, if it serves workloads.
fn workload_waypoint(
    state: &MeshState,
    w: &Arc<Workload>,
    target: SocketAddr,
    service: Option<&Arc<Service>>,
    pick: u64,
) -> Result<Option<HbonePath>, RouteError> {
    let Some(bound) = &w.spec.waypoint else {
        return Ok(None);
    };
    let via = Via {
        bound,
        what: || format!("workload {}", w.uid()),
        serves: WaypointFor::serves_workloads,
    };
    via.path(state, target, service, pick)
}

/// A destination's binding to a waypoint, and the traffic type the connection is.
struct Via<'a, F> {
    bound: &'a WaypointAddress,
    /// What is bound, for errors: `service shop/cart`.
    what: F,
    serves: fn(WaypointFor) -> bool,
}

impl<F: Fn() -> String> Via<'_, F> {
    /// HBONE to one of the waypoint's workloads, CONNECT `target`; `None` when the
    /// waypoint does not serve this traffic type (the binding does not apply).
    fn path(
        &self,
        state: &MeshState,
        target: SocketAddr,
        service: Option<&Arc<Service>>,
        pick: u64,
    ) -> Result<Option<HbonePath>, RouteError> {
        let key = self.bound.key();
        let Some(waypoint) = state.waypoint(&key) else {
            return Err(RouteError::UnknownWaypoint {
                waypoint: key,
                bound: (self.what)(),
            });
        };
        if !(self.serves)(waypoint.spec.traffic_type) {
            return Ok(None);
        }
        // Its workloads: the healthy HBONE endpoints of its Service that run as its
        // identity (anything else its Service selects is not the waypoint).
        let candidates: Vec<(&Arc<Workload>, IpAddr)> = state
            .service_by_vip(self.bound.address)
            .into_iter()
            .flat_map(|s| &s.spec.endpoints)
            .filter_map(|ep| {
                let w = state.workload(&ep.workload_uid)?;
                let ip = w.ip_like(target.ip())?;
                (w.spec.healthy && w.is_hbone() && w.identity == waypoint.identity)
                    .then_some((w, ip))
            })
            .collect();
        if candidates.is_empty() {
            return Err(RouteError::WaypointNotReady {
                waypoint: key,
                bound: (self.what)(),
            });
        }
        let (w, ip) = candidates[(pick % candidates.len() as u64) as usize];
        Ok(Some(HbonePath {
            hbone_addr: SocketAddr::new(ip, self.bound.hbone_port),
            target: HboneTarget::new(target),
            identity: w.identity.clone(),
            workload: w.clone(),
            service: service.cloned(),
            waypoint: Some(key),
        }))
    }
}

fn to_workload(
    w: &Arc<Workload>,
    addr: SocketAddr,
    service: Option<Arc<Service>>,
) -> OutboundRoute {
    if w.is_hbone() {
        OutboundRoute::Hbone(HbonePath {
            hbone_addr: SocketAddr::new(addr.ip(), HBONE_PORT),
            target: HboneTarget::new(addr),
            identity: w.identity.clone(),
            workload: w.clone(),
            service,
            waypoint: None,
        })
    } else {
        OutboundRoute::Passthrough {
            dst: addr,
            workload: Some(w.clone()),
            service,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::identity::TrustDomain;
    use crate::model::{MeshConfig, ModelError};

    const CONFIG: &str = r#"
workloads:
- {uid: shop/cart-1, name: cart-1, namespace: shop, serviceAccount: cart, node: a, ips: [10.1.0.5, "fd00::5"], protocol: HBONE}
- {uid: shop/cart-2, name: cart-2, namespace: shop, serviceAccount: cart, node: b, ips: [10.2.0.7], protocol: HBONE}
- {uid: shop/cart-3, name: cart-3, namespace: shop, serviceAccount: cart, node: b, ips: [10.2.0.8], protocol: HBONE, healthy: false}
- {uid: legacy/db-0, name: db-0, namespace: legacy, node: a, ips: [10.1.0.9]}
services:
- name: cart
  namespace: shop
  vips: [10.96.0.10, "fd00:96::10"]
  ports: [{port: 80, targetPort: 8080}, {port: 81, targetPort: 8081}]
  endpoints:
  - {workloadUid: shop/cart-1, ports: [{port: 81, targetPort: 9091}]}
  - {workloadUid: shop/cart-2}
  - {workloadUid: shop/cart-3}
  - {workloadUid: shop/gone}
- name: db
  namespace: legacy
  vips: [10.96.0.20]
  ports: [{port: 5432, targetPort: 5432}]
  endpoints: [{workloadUid: legacy/db-0}]
- name: empty
  namespace: shop
  vips: [10.96.0.30]
  ports: [{port: 80, targetPort: 80}]
"#;

    fn state() -> MeshState {
        let config: MeshConfig = serde_yaml_ng::from_str(CONFIG).unwrap();
        MeshState::build(&config, &TrustDomain::default()).unwrap()
    }

    fn dst(s: &str) -> OrigDst {
        OrigDst(s.parse().unwrap())
    }

    /// A compact description of a route for table comparison.
    fn describe(r: &Result<OutboundRoute, RouteError>) -> String {
        match r {
            Ok(OutboundRoute::Hbone(h)) => format!(
                "hbone {} connect {} as {}{}{}",
                h.hbone_addr,
                h.target,
                h.identity,
                h.service
                    .as_ref()
                    .map(|s| format!(" via {}", s.key()))
                    .unwrap_or_default(),
                h.waypoint
                    .as_ref()
                    .map(|w| format!(" through {w}"))
                    .unwrap_or_default()
            ),
            Ok(OutboundRoute::Passthrough {
                dst,
                workload,
                service,
            }) => format!(
                "plain {dst}{}{}",
                workload
                    .as_ref()
                    .map(|w| format!(" to {}", w.uid()))
                    .unwrap_or_default(),
                service
                    .as_ref()
                    .map(|s| format!(" via {}", s.key()))
                    .unwrap_or_default()
            ),
            Err(e) => format!("error {}: {e}", e.reason()),
        }
    }

    #[test]
    fn route_table() {
        let s = state();
        let cart = "spiffe://cluster.local/ns/shop/sa/cart";
        let cases = [
            (
                "10.1.0.5:8080",
                0,
                format!("hbone 10.1.0.5:15008 connect 10.1.0.5:8080 as {cart}"),
            ),
            (
                "[fd00::5]:8080",
                0,
                format!("hbone [fd00::5]:15008 connect [fd00::5]:8080 as {cart}"),
            ),
            (
                "10.96.0.10:80",
                0,
                format!("hbone 10.1.0.5:15008 connect 10.1.0.5:8080 as {cart} via shop/cart"),
            ),
            (
                "10.96.0.10:80",
                1,
                format!("hbone 10.2.0.7:15008 connect 10.2.0.7:8080 as {cart} via shop/cart"),
            ),
            (
                "10.96.0.10:80",
                2,
                format!("hbone 10.1.0.5:15008 connect 10.1.0.5:8080 as {cart} via shop/cart"),
            ),
            // Per-endpoint target port for a named port.
            (
                "10.96.0.10:81",
                0,
                format!("hbone 10.1.0.5:15008 connect 10.1.0.5:9091 as {cart} via shop/cart"),
            ),
            (
                "10.96.0.10:81",
                1,
                format!("hbone 10.2.0.7:15008 connect 10.2.0.7:8081 as {cart} via shop/cart"),
            ),
            // IPv6 VIP picks the endpoint with an IPv6 address.
            (
                "[fd00:96::10]:80",
                7,
                format!("hbone [fd00::5]:15008 connect [fd00::5]:8080 as {cart} via shop/cart"),
            ),
            // Undeclared VIP port: passthrough.
            (
                "10.96.0.10:9999",
                0,
                "plain 10.96.0.10:9999 via shop/cart".to_string(),
            ),
            // Non-mesh workload, directly and through its service.
            (
                "10.1.0.9:5432",
                0,
                "plain 10.1.0.9:5432 to legacy/db-0".to_string(),
            ),
            (
                "10.96.0.20:5432",
                0,
                "plain 10.1.0.9:5432 to legacy/db-0 via legacy/db".to_string(),
            ),
            // Service without endpoints.
            (
                "10.96.0.30:80",
                0,
                "error no_healthy_endpoint: service shop/empty has no healthy endpoint for port 80"
                    .to_string(),
            ),
            // Outside the mesh.
            (
                "93.184.216.34:443",
                0,
                "plain 93.184.216.34:443".to_string(),
            ),
        ];
        for (d, pick, want) in cases {
            assert_eq!(describe(&route(&s, dst(d), pick)), want, "{d} pick {pick}");
        }
    }

    /// Waypoints: `wp` (service traffic, not enforcing), `wp-all` (all traffic, a
    /// policy attached), `down` (no ready workload), `wl` (workload traffic only);
    /// `cart` is bound to `wp`, `api` and the pod `api-1` to `wp-all`, `dead` to `down`,
    /// `ghost` to a waypoint that does not exist, `mixed` (service) and its pod `wl-pod`
    /// to `wl`.
    pub(crate) const WAYPOINTS: &str = r#"
waypoints:
- {name: wp, namespace: shop, serviceAccount: wp, address: 10.96.0.100}
- {name: wp-all, namespace: shop, trafficType: all, serviceAccount: wp-all, address: 10.96.0.101, policies: [shop/admin-only]}
- {name: down, namespace: shop, serviceAccount: down, address: 10.96.0.102}
- {name: wl, namespace: shop, trafficType: workload, serviceAccount: wl, address: 10.96.0.103}
workloads:
- {uid: shop/wp-1, name: wp-1, namespace: shop, serviceAccount: wp, node: a, ips: [10.1.0.100], protocol: HBONE}
- {uid: shop/wp-2, name: wp-2, namespace: shop, serviceAccount: wp, node: b, ips: [10.2.0.100], protocol: HBONE, healthy: false}
- {uid: shop/impostor, name: impostor, namespace: shop, serviceAccount: other, node: b, ips: [10.2.0.101], protocol: HBONE}
- {uid: shop/wp-all-1, name: wp-all-1, namespace: shop, serviceAccount: wp-all, node: b, ips: [10.2.0.102], protocol: HBONE}
- {uid: shop/wl-1, name: wl-1, namespace: shop, serviceAccount: wl, node: a, ips: [10.1.0.103], protocol: HBONE}
- {uid: shop/cart-1, name: cart-1, namespace: shop, serviceAccount: cart, node: a, ips: [10.1.0.5], protocol: HBONE}
- {uid: shop/api-1, name: api-1, namespace: shop, serviceAccount: api, node: b, ips: [10.2.0.5], protocol: HBONE,
   waypoint: {address: 10.96.0.101, name: wp-all, namespace: shop}}
- {uid: shop/dead-1, name: dead-1, namespace: shop, serviceAccount: dead, node: b, ips: [10.2.0.6], protocol: HBONE}
- {uid: shop/ghost-1, name: ghost-1, namespace: shop, serviceAccount: ghost, node: b, ips: [10.2.0.7], protocol: HBONE}
- {uid: shop/wl-pod, name: wl-pod, namespace: shop, serviceAccount: mixed, node: b, ips: [10.2.0.8], protocol: HBONE,
   waypoint: {address: 10.96.0.103, name: wl, namespace: shop}}
services:
- {name: wp, namespace: shop, vips: [10.96.0.100], ports: [{port: 15008, targetPort: 15008}],
   endpoints: [{workloadUid: shop/wp-1}, {workloadUid: shop/wp-2}, {workloadUid: shop/impostor}]}
- {name: wp-all, namespace: shop, vips: [10.96.0.101], ports: [{port: 15008, targetPort: 15008}],
   endpoints: [{workloadUid: shop/wp-all-1}]}
- {name: down, namespace: shop, vips: [10.96.0.102], ports: [{port: 15008, targetPort: 15008}]}
- {name: wl, namespace: shop, vips: [10.96.0.103], ports: [{port: 15008, targetPort: 15008}],
   endpoints: [{workloadUid: shop/wl-1}]}
- {name: cart, namespace: shop, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}],
   endpoints: [{workloadUid: shop/cart-1}], waypoint: {address: 10.96.0.100, name: wp, namespace: shop}}
- {name: api, namespace: shop, vips: [10.96.0.11], ports: [{port: 80, targetPort: 8080}],
   endpoints: [{workloadUid: shop/api-1}], waypoint: {address: 10.96.0.101, name: wp-all, namespace: shop}}
- {name: dead, namespace: shop, vips: [10.96.0.12], ports: [{port: 80, targetPort: 8080}],
   endpoints: [{workloadUid: shop/dead-1}], waypoint: {address: 10.96.0.102, name: down, namespace: shop}}
- {name: ghost, namespace: shop, vips: [10.96.0.13], ports: [{port: 80, targetPort: 8080}],
   endpoints: [{workloadUid: shop/ghost-1}], waypoint: {address: 10.96.0.199, name: nope, namespace: shop}}
- {name: mixed, namespace: shop, vips: [10.96.0.14], ports: [{port: 80, targetPort: 8080}],
   endpoints: [{workloadUid: shop/wl-pod}], waypoint: {address: 10.96.0.103, name: wl, namespace: shop}}
"#;

    pub(crate) fn waypoint_state() -> MeshState {
        let config: MeshConfig = serde_yaml_ng::from_str(WAYPOINTS).unwrap();
        MeshState::build(&config, &TrustDomain::default()).unwrap()
    }

    #[test]
    fn waypoint_route_table() {
        let s = waypoint_state();
        let id = |sa: &str| format!("spiffe://cluster.local/ns/shop/sa/{sa}");
        let cases = [
            // Service traffic to a service bound to a service waypoint: to the
            // waypoint's one ready workload running as it (never wp-2, unhealthy, nor
            // the impostor its Service also selects), CONNECT the VIP.
            (
                "10.96.0.10:80",
                0,
                format!(
                    "hbone 10.1.0.100:15008 connect 10.96.0.10:80 as {} via shop/cart through shop/wp",
                    id("wp")
                ),
            ),
            (
                "10.96.0.10:80",
                1,
                format!(
                    "hbone 10.1.0.100:15008 connect 10.96.0.10:80 as {} via shop/cart through shop/wp",
                    id("wp")
                ),
            ),
            // The same pod by its own IP: `wp` serves services only, cart-1 has no own
            // binding: direct.
            (
                "10.1.0.5:8080",
                0,
                format!("hbone 10.1.0.5:15008 connect 10.1.0.5:8080 as {}", id("cart")),
            ),
            // Bound with an all-traffic waypoint, by VIP and by pod IP.
            (
                "10.96.0.11:80",
                0,
                format!(
                    "hbone 10.2.0.102:15008 connect 10.96.0.11:80 as {} via shop/api through shop/wp-all",
                    id("wp-all")
                ),
            ),
            (
                "10.2.0.5:8080",
                0,
                format!(
                    "hbone 10.2.0.102:15008 connect 10.2.0.5:8080 as {} through shop/wp-all",
                    id("wp-all")
                ),
            ),
            // A waypoint with no ready workload, or one the model lacks: refused.
            (
                "10.96.0.12:80",
                0,
                "error waypoint_not_ready: service shop/dead is bound to waypoint shop/down, which has no ready workload; refused rather than sent around it".into(),
            ),
            (
                "10.96.0.13:80",
                0,
                "error waypoint_unknown: service shop/ghost is bound to waypoint shop/nope, which the model does not have; refused rather than sent around it".into(),
            ),
            // A service bound to a workload-only waypoint: the service binding does not
            // apply, but the endpoint's own one does, to the endpoint's address.
            (
                "10.96.0.14:80",
                0,
                format!(
                    "hbone 10.1.0.103:15008 connect 10.2.0.8:8080 as {} via shop/mixed through shop/wl",
                    id("wl")
                ),
            ),
            // A port the service does not declare: as without a waypoint.
            ("10.96.0.10:9999", 0, "plain 10.96.0.10:9999 via shop/cart".into()),
            // The waypoint's own workloads are reached directly.
            (
                "10.1.0.100:15008",
                0,
                format!("hbone 10.1.0.100:15008 connect 10.1.0.100:15008 as {}", id("wp")),
            ),
        ];
        for (d, pick, want) in cases {
            assert_eq!(describe(&route(&s, dst(d), pick)), want, "{d} pick {pick}");
        }
        let e = route(&s, dst("10.96.0.12:80"), 0).unwrap_err();
        assert_eq!(e.waypoint(), Some("shop/down"));
    }

    #[test]
    fn every_healthy_endpoint_is_reachable_and_unhealthy_never() {
        let s = state();
        let mut seen = std::collections::BTreeSet::new();
        for pick in 0..20 {
            if let Ok(OutboundRoute::Hbone(h)) = route(&s, dst("10.96.0.10:80"), pick) {
                seen.insert(h.workload.uid().to_string());
            }
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            ["shop/cart-1", "shop/cart-2"]
        );
    }

    #[test]
    fn model_errors_name_the_object() {
        let cases = [
            ("workloads: [{uid: a, name: a, namespace: n, node: x, ips: [10.0.0.1]}, {uid: a, name: b, namespace: n, node: x, ips: [10.0.0.2]}]", "workload uid a appears twice"),
            ("workloads: [{uid: a, name: a, namespace: n, node: x, ips: [10.0.0.1]}, {uid: b, name: b, namespace: n, node: x, ips: [10.0.0.1]}]", "IP 10.0.0.1 belongs to both workload a and b"),
            ("workloads: [{uid: a, name: a, namespace: n, node: x, ips: []}]", "workload a has no IP"),
            ("workloads: [{uid: a, name: a, namespace: 'N S', node: x, ips: [10.0.0.1]}]", "workload a: identity: namespace \"N S\" contains ' '"),
            ("workloads: [{uid: a, name: a, namespace: n, node: x, ips: [10.0.0.1]}]\nservices: [{name: s, namespace: n, vips: [10.0.0.1], ports: []}]", "service n/s: VIP 10.0.0.1 is also the IP of workload a"),
            ("services: [{name: s, namespace: n, vips: [10.9.0.1], ports: [{port: 80, targetPort: 0}]}]", "service n/s: port 80: port and targetPort must be non-zero"),
            ("services: [{name: s, namespace: n, vips: [10.9.0.1], ports: [{port: 80, targetPort: 1}, {port: 80, targetPort: 2}]}]", "port 80: listed twice"),
        ];
        for (yaml, want) in cases {
            let config: MeshConfig = serde_yaml_ng::from_str(yaml).unwrap();
            let e: ModelError = MeshState::build(&config, &TrustDomain::default()).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
        }
        // Unknown fields are errors, not silently ignored.
        let e = serde_yaml_ng::from_str::<MeshConfig>("workloads: [{uid: a, name: a, namespace: n, node: x, ips: [10.0.0.1], protcol: HBONE}]").unwrap_err();
        assert!(e.to_string().contains("unknown field `protcol`"), "{e}");
    }
}
