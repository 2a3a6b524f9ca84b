//! ClusterIP services the way kube-proxy's iptables mode does them, in every node's
//! namespace: nat `PREROUTING` and `OUTPUT` jump to [`SERVICES_CHAIN`], which sends
//! each `vip:port` to a per-port chain picking an endpoint at random
//! (`-m statistic --mode random --probability 1/n`, then `1/(n-1)`, ...), whose
//! endpoint chain DNATs to `podIP:targetPort`. A pod reaching itself through its own
//! service is masqueraded (hairpin), as kube-proxy does, or its reply would bypass the
//! node's conntrack.
//!
//! The rules are a pure function of the services ([`render`]); the whole set is
//! rewritten with one `iptables-restore --noflush` per node, so an endpoint change is
//! atomic and leaves every chain not ours alone.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// The chain `PREROUTING` and `OUTPUT` jump to.
pub const SERVICES_CHAIN: &str = "AMBIT-SVC";
/// The chain `POSTROUTING` jumps to, masquerading hairpin connections.
pub const POSTROUTING_CHAIN: &str = "AMBIT-POSTROUTING";
/// Packet mark of hairpin connections (kube-proxy's).
const MASQ_MARK: &str = "0x4000/0x4000";

/// One service as the rules need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRules {
    /// Stable within the mesh; names the service's chains.
    pub id: u32,
    /// `namespace/name`, for rule comments.
    pub key: String,
    pub vip: Ipv4Addr,
    /// (port, target port)
    pub ports: Vec<(u16, u16)>,
    /// Endpoint pod addresses, in a stable order.
    pub endpoints: Vec<Ipv4Addr>,
}

/// The rules installed once when a node is made: the jumps to our chains and the
/// hairpin masquerade.
pub fn node_base() -> String {
    format!(
        "*nat\n\
         :{SERVICES_CHAIN} - [0:0]\n\
         :{POSTROUTING_CHAIN} - [0:0]\n\
         -A PREROUTING -j {SERVICES_CHAIN}\n\
         -A OUTPUT -j {SERVICES_CHAIN}\n\
         -A POSTROUTING -j {POSTROUTING_CHAIN}\n\
         -A {POSTROUTING_CHAIN} -m mark ! --mark {MASQ_MARK} -j RETURN\n\
         -A {POSTROUTING_CHAIN} -j MARK --xor-mark 0x4000\n\
         -A {POSTROUTING_CHAIN} -j MASQUERADE\n\
         COMMIT\n"
    )
}

/// The `iptables-restore --noflush` input that makes the nat table hold exactly
/// `services`, given the per-service chains written last time (`previous`), which are
/// flushed and deleted if no longer needed. Returns the input and the chains it leaves.
pub fn render(
    services: &[ServiceRules],
    previous: &BTreeSet<String>,
) -> (String, BTreeSet<String>) {
    let mut chains = BTreeSet::new();
    let mut rules = String::new();
    for svc in services {
        for &(port, target_port) in &svc.ports {
            let svc_chain = format!("AMBIT-S{}-{port}", svc.id);
            let _ = writeln!(
                rules,
                "-A {SERVICES_CHAIN} -d {}/32 -p tcp -m tcp --dport {port} \
                 -m comment --comment \"{}:{port}\" -j {svc_chain}",
                svc.vip, svc.key
            );
            let n = svc.endpoints.len();
            for (i, ep) in svc.endpoints.iter().enumerate() {
                let ep_chain = format!("AMBIT-E{}-{port}-{i}", svc.id);
                if i + 1 < n {
                    let _ = writeln!(
                        rules,
                        "-A {svc_chain} -m statistic --mode random --probability {:.10} -j {ep_chain}",
                        1.0 / (n - i) as f64
                    );
                } else {
                    let _ = writeln!(rules, "-A {svc_chain} -j {ep_chain}");
                }
                let _ = writeln!(
                    rules,
                    "-A {ep_chain} -s {ep}/32 -j MARK --set-xmark {MASQ_MARK}\n\
                     -A {ep_chain} -p tcp -m tcp -j DNAT --to-destination {ep}:{target_port}"
                );
                chains.insert(ep_chain);
            }
            chains.insert(svc_chain);
        }
    }
    let stale: Vec<&String> = previous.difference(&chains).collect();
    let mut out = String::from("*nat\n");
    // Declaring a chain in a --noflush restore creates or flushes it: every chain we
    // write, and every stale one so that nothing references it when it is deleted.
    let _ = writeln!(out, ":{SERVICES_CHAIN} - [0:0]");
    for chain in chains.iter().chain(stale.iter().copied()) {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    out.push_str(&rules);
    for chain in stale {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    (out, chains)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(endpoints: &[&str]) -> ServiceRules {
        ServiceRules {
            id: 1,
            key: "shop/web".into(),
            vip: Ipv4Addr::new(10, 96, 0, 10),
            ports: vec![(80, 8080)],
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn endpoints_are_picked_with_kube_proxy_probabilities() {
        let (rules, chains) = render(
            &[web(&["10.1.0.2", "10.2.0.2", "10.2.0.3"])],
            &BTreeSet::new(),
        );
        assert_eq!(
            rules,
            "*nat\n\
             :AMBIT-SVC - [0:0]\n\
             :AMBIT-E1-80-0 - [0:0]\n\
             :AMBIT-E1-80-1 - [0:0]\n\
             :AMBIT-E1-80-2 - [0:0]\n\
             :AMBIT-S1-80 - [0:0]\n\
             -A AMBIT-SVC -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"shop/web:80\" -j AMBIT-S1-80\n\
             -A AMBIT-S1-80 -m statistic --mode random --probability 0.3333333333 -j AMBIT-E1-80-0\n\
             -A AMBIT-E1-80-0 -s 10.1.0.2/32 -j MARK --set-xmark 0x4000/0x4000\n\
             -A AMBIT-E1-80-0 -p tcp -m tcp -j DNAT --to-destination 10.1.0.2:8080\n\
             -A AMBIT-S1-80 -m statistic --mode random --probability 0.5000000000 -j AMBIT-E1-80-1\n\
             -A AMBIT-E1-80-1 -s 10.2.0.2/32 -j MARK --set-xmark 0x4000/0x4000\n\
             -A AMBIT-E1-80-1 -p tcp -m tcp -j DNAT --to-destination 10.2.0.2:8080\n\
             -A AMBIT-S1-80 -j AMBIT-E1-80-2\n\
             -A AMBIT-E1-80-2 -s 10.2.0.3/32 -j MARK --set-xmark 0x4000/0x4000\n\
             -A AMBIT-E1-80-2 -p tcp -m tcp -j DNAT --to-destination 10.2.0.3:8080\n\
             COMMIT\n"
        );
        assert_eq!(chains.len(), 4);
    }

    #[test]
    fn chains_no_longer_needed_are_flushed_then_deleted() {
        let (_, before) = render(&[web(&["10.1.0.2", "10.2.0.2"])], &BTreeSet::new());
        let (rules, after) = render(&[web(&["10.1.0.2"])], &before);
        assert_eq!(
            rules,
            "*nat\n\
             :AMBIT-SVC - [0:0]\n\
             :AMBIT-E1-80-0 - [0:0]\n\
             :AMBIT-S1-80 - [0:0]\n\
             :AMBIT-E1-80-1 - [0:0]\n\
             -A AMBIT-SVC -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"shop/web:80\" -j AMBIT-S1-80\n\
             -A AMBIT-S1-80 -j AMBIT-E1-80-0\n\
             -A AMBIT-E1-80-0 -s 10.1.0.2/32 -j MARK --set-xmark 0x4000/0x4000\n\
             -A AMBIT-E1-80-0 -p tcp -m tcp -j DNAT --to-destination 10.1.0.2:8080\n\
             -X AMBIT-E1-80-1\n\
             COMMIT\n"
        );
        let (rules, none) = render(&[], &after);
        assert!(
            rules.ends_with("-X AMBIT-E1-80-0\n-X AMBIT-S1-80\nCOMMIT\n"),
            "{rules}"
        );
        assert!(none.is_empty());
    }

    #[test]
    fn service_without_endpoints_keeps_its_chain_empty() {
        let (rules, chains) = render(&[web(&[])], &BTreeSet::new());
        assert!(rules.contains("-j AMBIT-S1-80\n"), "{rules}");
        assert_eq!(chains, BTreeSet::from(["AMBIT-S1-80".to_owned()]));
    }
}
