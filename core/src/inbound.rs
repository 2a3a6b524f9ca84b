//! Whether an inbound connection's target is one of this ztunnel's pods. ztunnel
//! accepts HBONE (and plaintext on 15006) only for a workload that is in the model, is
//! scheduled on this node, and has been handed to this ztunnel by the node agent;
//! anything else is answered 400 (HBONE) or closed (plaintext).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::hbone::{ConnectRefusal, Forwarded, HboneTarget, ZTUNNEL_POD_PORTS};
use crate::identity::SpiffeId;
use crate::model::{MeshState, Workload};

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
}
