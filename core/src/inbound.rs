//! Whether an inbound connection's target is one of this ztunnel's pods. ztunnel
//! accepts HBONE (and plaintext on 15006) only for a workload that is in the model, is
//! scheduled on this node, and has been handed to this ztunnel by the node agent;
//! anything else is answered 400 (HBONE) or closed (plaintext).
//!
//! A CONNECT naming a service host name (Istio's double HBONE) is first turned into
//! the local workload's address by [`resolve_host`].
//!
//! Then [`waypoint_peer`]: a peer that is a waypoint is accepted only for targets bound
//! to that waypoint (reference §3.3), and a target bound to a waypoint that enforces
//! policy takes traffic only from that waypoint, so no client can go around the L7
//! policy (decision record 0011; Istio lets them).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::hbone::{ConnectRefusal, Forwarded, HboneTarget, HostTarget, ZTUNNEL_POD_PORTS};
use crate::identity::SpiffeId;
use crate::model::{MeshState, Waypoint, Workload};

/// The local workload `target` addresses, or why it is not one. A target on one of
/// ztunnel's own pod ports is refused first: proxying it would reach ztunnel's
/// listener again, from where it would be proxied again, without end.
pub fn local_target<'a>(
    state: &'a MeshState,
    node: &str,
    is_served: impl Fn(&str) -> bool,
    target: HboneTarget,
) -> Result<&'a Arc<Workload>, ConnectRefusal> {
    if ZTUNNEL_POD_PORTS.contains(&target.addr().port()) {
        return Err(ConnectRefusal::ZtunnelPort(target));
    }
    match state.workload_by_ip(target.ip()) {
        Some(w) if w.spec.node == node && is_served(w.uid()) => Ok(w),
        _ => Err(ConnectRefusal::NotLocal(target)),
    }
}

/// The address a host-name CONNECT reaches on `workload`, the workload this
/// listener serves (Istio's double HBONE: the inner CONNECT names
/// `<service hostname>:<service port>` because its sender does not know which endpoint
/// the east-west gateway picks). As in Istio's ztunnel: the service of that host name,
/// the workload's own namespace first when several namespaces have one; the endpoint's
/// target port for that service port, else the service's. The address is the
/// workload's own, in the family of `like` (the connection's). Stricter than Istio: the
/// workload must be an endpoint of that service, so a host name never reaches a pod
/// that does not back it.
pub fn resolve_host(
    state: &MeshState,
    workload: &Workload,
    like: std::net::IpAddr,
    host: &HostTarget,
) -> Result<HboneTarget, ConnectRefusal> {
    let unknown = |reason: String| ConnectRefusal::UnknownHost {
        host: host.clone(),
        reason,
    };
    let wanted = host.hostname().trim_end_matches('.');
    let mut services: Vec<_> = state
        .services()
        .filter(|s| {
            s.hostname
                .trim_end_matches('.')
                .eq_ignore_ascii_case(wanted)
        })
        .collect();
    if services.is_empty() {
        return Err(unknown("no service has this host name".into()));
    }
    // Own namespace first, then by namespace name, so the choice is stable.
    services.sort_by_key(|s| (s.spec.namespace != workload.spec.namespace, s.key()));
    let service = services[0];
    let Some(endpoint) = service
        .spec
        .endpoints
        .iter()
        .find(|e| e.workload_uid == workload.spec.uid)
    else {
        return Err(unknown(format!(
            "{} is not an endpoint of service {}",
            workload.spec.uid,
            service.key()
        )));
    };
    let target_port = endpoint
        .ports
        .iter()
        .chain(&service.spec.ports)
        .find(|p| p.port == host.port())
        .map(|p| p.target_port)
        .filter(|&p| p != 0)
        .ok_or_else(|| {
            unknown(format!(
                "service {} has no port {}",
                service.key(),
                host.port()
            ))
        })?;
    let ip = workload
        .ip_like(like)
        .or_else(|| workload.spec.ips.first().copied())
        .ok_or_else(|| unknown(format!("{} has no address", workload.spec.uid)))?;
    Ok(HboneTarget::new(SocketAddr::new(ip, target_port)))
}

/// Who a connection to a local workload comes from, as far as waypoints go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRole {
    /// A waypoint the target is bound to: the target's L4 policy sees the waypoint's
    /// identity as the source (as in Istio; the original client was authorized by it).
    Waypoint(Arc<Waypoint>),
    /// Any other peer (or plaintext): the target is not bound to a waypoint that
    /// enforces policy.
    Direct,
}

/// The waypoints `workload`'s inbound traffic is bound to: its own binding (when the
/// waypoint serves workloads) and those of the services it is an endpoint of (when
/// the waypoint serves services). A binding to a waypoint the model lacks is returned
/// as `Err(key)`.
pub fn bound_waypoints<'a>(
    state: &'a MeshState,
    workload: &'a Workload,
) -> impl Iterator<Item = Result<&'a Arc<Waypoint>, String>> + 'a {
    let own = workload.spec.waypoint.iter().map(move |b| (b, true));
    let services = state
        .services_of(workload.uid())
        .iter()
        .filter_map(|s| s.spec.waypoint.as_ref())
        .map(|b| (b, false));
    own.chain(services)
        .filter_map(move |(binding, workload_traffic)| {
            let key = binding.key();
            match state.waypoint(&key) {
                None => Some(Err(key)),
                Some(w) => {
                    let serves = if workload_traffic {
                        w.spec.traffic_type.serves_workloads()
                    } else {
                        w.spec.traffic_type.serves_services()
                    };
                    serves.then_some(Ok(w))
                }
            }
        })
}

/// Whether `peer` (none: plaintext) may reach `workload` at `target`, as far as
/// waypoints go: a waypoint peer only for a target bound to it; any other peer only
/// when none of the target's waypoints enforces policy (a binding to a waypoint the
/// model lacks counts as one that does: unknown means closed).
pub fn waypoint_peer(
    state: &MeshState,
    workload: &Workload,
    peer: Option<&SpiffeId>,
    target: HboneTarget,
) -> Result<PeerRole, ConnectRefusal> {
    let bound: Vec<Result<&Arc<Waypoint>, String>> = bound_waypoints(state, workload).collect();
    if let Some(peer) = peer {
        let as_waypoint = state.waypoints().find(|w| &w.identity == peer);
        if let Some(waypoint) = as_waypoint {
            let ours = bound
                .iter()
                .flatten()
                .find(|w| w.identity == *peer)
                .copied();
            return match ours {
                Some(w) => Ok(PeerRole::Waypoint(w.clone())),
                None => Err(ConnectRefusal::WrongWaypoint {
                    peer: peer.to_string(),
                    waypoint: waypoint.key(),
                    target,
                }),
            };
        }
    }
    let enforcing = bound.iter().find_map(|b| match b {
        Ok(w) if w.enforces_policy() => Some(w.key()),
        Ok(_) => None,
        Err(key) => Some(key.clone()),
    });
    match enforcing {
        Some(waypoint) => Err(ConnectRefusal::BypassesWaypoint {
            peer: peer.map_or_else(|| "a plaintext client".to_owned(), ToString::to_string),
            waypoint,
            target,
        }),
        None => Ok(PeerRole::Direct),
    }
}

/// The client address ztunnel connects to the app from. The `forwarded` address a peer
/// claims is honoured only when it is the peer's own connection address, or belongs to
/// a workload running as the peer's certificate identity; otherwise the connection's
/// address is used and `false` says the claim was ignored. So no mesh identity can
/// make an app see another workload's address (decision record 0004).
pub fn client_source(
    state: &MeshState,
    peer: &SpiffeId,
    peer_addr: SocketAddr,
    forwarded: Option<&Forwarded>,
) -> (SocketAddr, bool) {
    match forwarded {
        None => (peer_addr, true),
        Some(f) if f.for_addr.ip() == peer_addr.ip() => (f.for_addr, true),
        Some(f)
            if state
                .workload_by_ip(f.for_addr.ip())
                .is_some_and(|w| &w.identity == peer) =>
        {
            (f.for_addr, true)
        }
        Some(_) => (peer_addr, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;
    use crate::model::MeshConfig;

    #[test]
    fn only_served_pods_on_this_node_are_local() {
        let config: MeshConfig = serde_yaml_ng::from_str(
            "workloads:\n\
             - {uid: a, name: a, namespace: n, node: node-a, ips: [10.1.0.5], protocol: HBONE}\n\
             - {uid: b, name: b, namespace: n, node: node-b, ips: [10.2.0.5], protocol: HBONE}\n\
             - {uid: c, name: c, namespace: n, node: node-a, ips: [10.1.0.6]}\n",
        )
        .unwrap();
        let state = MeshState::build(&config, &TrustDomain::default()).unwrap();
        let served = |uid: &str| uid == "a" || uid == "b";
        let t = |s: &str| HboneTarget::parse_authority(s).unwrap();
        let cases = [
            ("10.1.0.5:8080", Some("a")),
            ("10.2.0.5:8080", None), // another node's pod
            ("10.1.0.6:8080", None), // on this node, but not handed to us (not captured)
            ("10.9.9.9:8080", None), // unknown address
        ];
        for (target, want) in cases {
            let got = local_target(&state, "node-a", served, t(target));
            match (got, want) {
                (Ok(w), Some(uid)) => assert_eq!(w.uid(), uid),
                (Err(e), None) => {
                    assert_eq!(e.status(), 400);
                    assert_eq!(e.reason(), "not_local");
                }
                (got, want) => panic!("{target}: {got:?} vs {want:?}"),
            }
        }
    }

    #[test]
    fn host_names_resolve_to_the_local_endpoints_target_port() {
        let config: MeshConfig = serde_yaml_ng::from_str(
            "workloads:\n\
             - {uid: shop/cart, name: cart, namespace: shop, node: node-a, ips: [10.1.0.5, 'fd00::5'], protocol: HBONE}\n\
             - {uid: shop/pay, name: pay, namespace: shop, node: node-a, ips: [10.1.0.6], protocol: HBONE}\n\
             services:\n\
             - {name: cart, namespace: shop, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}, {port: 90, targetPort: 9090}],\n\
                endpoints: [{workloadUid: shop/cart, ports: [{port: 90, targetPort: 9999}]}]}\n\
             - {name: cart, namespace: other, vips: [10.96.0.11], ports: [{port: 80, targetPort: 7070}], endpoints: [{workloadUid: shop/pay}]}\n\
             - {name: ext, namespace: shop, hostname: api.example.com, vips: [], ports: [{port: 443, targetPort: 8443}], endpoints: [{workloadUid: shop/cart}]}\n",
        )
        .unwrap();
        let state = MeshState::build(&config, &TrustDomain::default()).unwrap();
        let host = |a: &str| match crate::hbone::ConnectTarget::parse_authority(a).unwrap() {
            crate::hbone::ConnectTarget::Host(h) => h,
            other => panic!("{other:?}"),
        };
        let v4: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let v6: std::net::IpAddr = "fd00::1".parse().unwrap();
        let cases = [
            (
                "shop/cart",
                v4,
                "cart.shop.svc.cluster.local:80",
                "10.1.0.5:8080",
            ),
            (
                "shop/cart",
                v6,
                "cart.shop.svc.cluster.local:80",
                "[fd00::5]:8080",
            ),
            // The endpoint's own port for the service port wins over the service's.
            (
                "shop/cart",
                v4,
                "CART.shop.svc.cluster.local.:90",
                "10.1.0.5:9999",
            ),
            ("shop/cart", v4, "api.example.com:443", "10.1.0.5:8443"),
            (
                "shop/pay",
                v6,
                "cart.other.svc.cluster.local:80",
                "10.1.0.6:7070",
            ),
            (
                "shop/cart",
                v4,
                "cart.shop.svc.cluster.local:81",
                "503 unknown_host",
            ),
            (
                "shop/cart",
                v4,
                "nothing.shop.svc.cluster.local:80",
                "503 unknown_host",
            ),
            // pay does not back shop/cart: refused, never sent to pay.
            (
                "shop/pay",
                v4,
                "cart.shop.svc.cluster.local:80",
                "503 unknown_host",
            ),
        ];
        for (uid, like, authority, want) in cases {
            let w = state.workload(uid).unwrap();
            let got = match resolve_host(&state, w, like, &host(authority)) {
                Ok(t) => t.to_string(),
                Err(e) => format!("{} {}", e.status(), e.reason()),
            };
            assert_eq!(got, want, "{uid} {authority}");
        }
        let e = resolve_host(
            &state,
            state.workload("shop/pay").unwrap(),
            v4,
            &host("cart.shop.svc.cluster.local:80"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "CONNECT target cart.shop.svc.cluster.local:80: shop/pay is not an endpoint of service shop/cart"
        );
    }

    #[test]
    fn a_host_name_served_in_two_namespaces_prefers_the_workloads_own() {
        let config: MeshConfig = serde_yaml_ng::from_str(
            "workloads:\n\
             - {uid: b/db, name: db, namespace: b, node: node-a, ips: [10.1.0.7], protocol: HBONE}\n\
             services:\n\
             - {name: db, namespace: a, hostname: db.example.com, vips: [], ports: [{port: 5432, targetPort: 1111}], endpoints: [{workloadUid: b/db}]}\n\
             - {name: db, namespace: b, hostname: db.example.com, vips: [], ports: [{port: 5432, targetPort: 2222}], endpoints: [{workloadUid: b/db}]}\n",
        )
        .unwrap();
        let state = MeshState::build(&config, &TrustDomain::default()).unwrap();
        let crate::hbone::ConnectTarget::Host(h) =
            crate::hbone::ConnectTarget::parse_authority("db.example.com:5432").unwrap()
        else {
            panic!()
        };
        let w = state.workload("b/db").unwrap();
        let t = resolve_host(&state, w, "10.0.0.1".parse().unwrap(), &h).unwrap();
        assert_eq!(t.to_string(), "10.1.0.7:2222");
    }

    #[test]
    fn ztunnels_own_pod_ports_are_never_a_target() {
        let config: MeshConfig = serde_yaml_ng::from_str(
            "workloads:\n\
             - {uid: a, name: a, namespace: n, node: node-a, ips: [10.1.0.5], protocol: HBONE}\n",
        )
        .unwrap();
        let state = MeshState::build(&config, &TrustDomain::default()).unwrap();
        for port in [15001, 15006, 15008] {
            let target = HboneTarget::new(SocketAddr::from(([10, 1, 0, 5], port)));
            let e = local_target(&state, "node-a", |_| true, target).unwrap_err();
            assert_eq!((e.status(), e.reason()), (400, "ztunnel_port"), "{port}");
        }
        let app = HboneTarget::new(SocketAddr::from(([10, 1, 0, 5], 15007)));
        assert!(local_target(&state, "node-a", |_| true, app).is_ok());
    }

    #[test]
    fn forwarded_address_is_honoured_only_for_the_peers_own_workloads() {
        let config: MeshConfig = serde_yaml_ng::from_str(
            "workloads:\n\
             - {uid: c, name: c, namespace: shop, serviceAccount: client, node: node-a, ips: [10.1.0.5], protocol: HBONE}\n\
             - {uid: s, name: s, namespace: shop, serviceAccount: server, node: node-b, ips: [10.2.0.2], protocol: HBONE}\n",
        )
        .unwrap();
        let state = MeshState::build(&config, &TrustDomain::default()).unwrap();
        let client = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/client").unwrap();
        let conn: SocketAddr = "172.30.0.1:40000".parse().unwrap();
        let fwd = |a: &str| Forwarded {
            for_addr: a.parse().unwrap(),
            host: None,
        };
        let cases = [
            (None, "172.30.0.1:40000", true),
            (Some(fwd("172.30.0.1:5555")), "172.30.0.1:5555", true), // the peer's own address
            (Some(fwd("10.1.0.5:5555")), "10.1.0.5:5555", true), // a workload running as the peer
            (Some(fwd("10.2.0.2:4444")), "172.30.0.1:40000", false), // another identity's workload
            (Some(fwd("10.9.9.9:1")), "172.30.0.1:40000", false), // unknown address
        ];
        for (forwarded, want, honoured) in cases {
            let got = client_source(&state, &client, conn, forwarded.as_ref());
            assert_eq!(got, (want.parse().unwrap(), honoured), "{forwarded:?}");
        }
    }

    #[test]
    fn waypoint_peer_table() {
        let state = crate::outbound::tests::waypoint_state();
        let id =
            |sa: &str| SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap();
        let t = |s: &str| HboneTarget::parse_authority(s).unwrap();
        let cases = [
            // cart-1: behind `wp` (no policy): its waypoint, other peers and plaintext.
            ("shop/cart-1", Some("wp"), "waypoint shop/wp"),
            ("shop/cart-1", Some("client"), "direct"),
            ("shop/cart-1", None, "direct"),
            ("shop/cart-1", Some("wp-all"), "401 wrong_waypoint"),
            // api-1: behind `wp-all`, which enforces policy: only through it.
            ("shop/api-1", Some("wp-all"), "waypoint shop/wp-all"),
            ("shop/api-1", Some("client"), "401 bypasses_waypoint"),
            ("shop/api-1", None, "401 bypasses_waypoint"),
            ("shop/api-1", Some("wp"), "401 wrong_waypoint"),
            // Bound to a waypoint the model lacks: closed.
            ("shop/ghost-1", Some("client"), "401 bypasses_waypoint"),
            // wl-pod: its service's binding to the workload-only `wl` does not count,
            // its own does.
            ("shop/wl-pod", Some("wl"), "waypoint shop/wl"),
            ("shop/wl-pod", Some("client"), "direct"),
            // Not bound at all: a waypoint peer is refused.
            ("shop/wp-1", Some("wp-all"), "401 wrong_waypoint"),
            ("shop/wp-1", Some("client"), "direct"),
        ];
        for (uid, peer, want) in cases {
            let w = state.workload(uid).unwrap();
            let peer = peer.map(id);
            let target = t(&format!("{}:8080", w.spec.ips[0]));
            let got = match waypoint_peer(&state, w, peer.as_ref(), target) {
                Ok(PeerRole::Waypoint(w)) => format!("waypoint {}", w.key()),
                Ok(PeerRole::Direct) => "direct".to_owned(),
                Err(e) => format!("{} {}", e.status(), e.reason()),
            };
            assert_eq!(got, want, "{uid} from {peer:?}");
        }
        // The refusal names the waypoint to go through.
        let api = state.workload("shop/api-1").unwrap();
        let e = waypoint_peer(&state, api, None, t("10.2.0.5:8080")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "10.2.0.5:8080 is bound to waypoint shop/wp-all, which enforces its policy; a plaintext client must connect through it"
        );
    }
}
