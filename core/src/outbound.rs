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

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::hbone::{HboneTarget, HBONE_PORT};
use crate::identity::SpiffeId;
use crate::model::{MeshState, Service, Workload};

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
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoHealthyEndpoint { service: String, port: u16 },
}

impl RouteError {
    /// Stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            RouteError::NoHealthyEndpoint { .. } => "no_healthy_endpoint",
        }
    }
}

/// Decides the path for `dst`. `pick` chooses among a service's healthy endpoints
/// (the caller supplies randomness or a round-robin counter).
pub fn route(state: &MeshState, dst: OrigDst, pick: u64) -> Result<OutboundRoute, RouteError> {
    let addr = dst.0;
    if let Some(service) = state.service_by_vip(addr.ip()) {
        if let Some(port) = service.spec.ports.iter().find(|p| p.port == addr.port()) {
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
            return Ok(to_workload(
                w,
                SocketAddr::new(*ip, *target_port),
                Some(service.clone()),
            ));
        }
        return Ok(OutboundRoute::Passthrough {
            dst: addr,
            workload: None,
            service: Some(service.clone()),
        });
    }
    if let Some(w) = state.workload_by_ip(addr.ip()) {
        return Ok(to_workload(w, addr, None));
    }
    Ok(OutboundRoute::Passthrough {
        dst: addr,
        workload: None,
        service: None,
    })
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
mod tests {
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
                "hbone {} connect {} as {}{}",
                h.hbone_addr,
                h.target,
                h.identity,
                h.service
                    .as_ref()
                    .map(|s| format!(" via {}", s.key()))
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
