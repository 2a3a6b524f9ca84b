//! Whether an inbound connection's target is one of this ztunnel's pods. ztunnel
//! accepts HBONE (and plaintext on 15006) only for a workload that is in the model, is
//! scheduled on this node, and has been handed to this ztunnel by the node agent;
//! anything else is answered 400 (HBONE) or closed (plaintext).

use std::sync::Arc;

use crate::hbone::{ConnectRefusal, HboneTarget};
use crate::model::{MeshState, Workload};

/// The local workload `target` addresses, or why it is not one.
pub fn local_target<'a>(
    state: &'a MeshState,
    node: &str,
    is_served: impl Fn(&str) -> bool,
    target: HboneTarget,
) -> Result<&'a Arc<Workload>, ConnectRefusal> {
    match state.workload_by_ip(target.ip()) {
        Some(w) if w.spec.node == node && is_served(w.uid()) => Ok(w),
        _ => Err(ConnectRefusal::NotLocal(target)),
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
}
