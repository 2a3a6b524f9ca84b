//! The node's half of probe exemption, as Istio's CNI node agent does it: in the node's
//! own network namespace, a connection that one of the node's sockets makes to an
//! enrolled pod (a kubelet probe) leaves with the source [`PROBE_SNAT_V4`] or
//! [`PROBE_SNAT_V6`], and only that source is exempt from capture inside the pod. A
//! connection the node merely forwards (a NodePort DNAT with MASQUERADE, as kube-proxy
//! does for `externalTrafficPolicy: Cluster`) has no local socket, keeps the node's
//! address as source and is captured like any other.
//!
//! One chain per family in the nat table, [`NODE_CHAIN`], jumped to first from
//! POSTROUTING (before any MASQUERADE), holding one SNAT rule per enrolled pod address.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::IpFamily;

/// The source the node gives its own connections to enrolled pods (IPv4), Istio's.
pub const PROBE_SNAT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// The same for IPv6, Istio's.
pub const PROBE_SNAT_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);
/// The node-side chain (nat table).
pub const NODE_CHAIN: &str = "AMBIT_PROBE_SNAT";

/// The sources exempt from capture inside a pod: the node's SNAT addresses.
pub fn probe_sources() -> Vec<IpAddr> {
    vec![IpAddr::V4(PROBE_SNAT_V4), IpAddr::V6(PROBE_SNAT_V6)]
}

/// `iptables-restore --noflush` input making [`NODE_CHAIN`] of `family` hold exactly
/// the SNAT rules for `pods` (declaring the chain empties it), and adding the jump
/// from POSTROUTING unless `current` (the nat table as `iptables-save` prints it)
/// already has it.
pub fn restore_input(family: IpFamily, pods: &BTreeSet<IpAddr>, current: &str) -> String {
    let (source, prefix) = match family {
        IpFamily::V4 => (IpAddr::V4(PROBE_SNAT_V4), 32),
        IpFamily::V6 => (IpAddr::V6(PROBE_SNAT_V6), 128),
    };
    let jump = format!("-A POSTROUTING -j {NODE_CHAIN}");
    let mut out = format!("*nat\n:{NODE_CHAIN} - [0:0]\n");
    if !current.lines().any(|l| l.trim() == jump) {
        out.push_str(&format!("-I POSTROUTING 1 -j {NODE_CHAIN}\n"));
    }
    for pod in pods.iter().filter(|ip| IpFamily::of(ip) == family) {
        out.push_str(&format!(
            "-A {NODE_CHAIN} -d {pod}/{prefix} -p tcp -m owner --socket-exists -j SNAT --to-source {source}\n"
        ));
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(ips: &[&str]) -> BTreeSet<IpAddr> {
        ips.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[test]
    fn ipv4_golden() {
        let got = restore_input(
            IpFamily::V4,
            &pods(&["10.2.0.3", "10.2.0.2", "fd10:2::2"]),
            "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -j AMBIT-POSTROUTING\nCOMMIT\n",
        );
        assert_eq!(
            got,
            "*nat\n\
             :AMBIT_PROBE_SNAT - [0:0]\n\
             -I POSTROUTING 1 -j AMBIT_PROBE_SNAT\n\
             -A AMBIT_PROBE_SNAT -d 10.2.0.2/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127\n\
             -A AMBIT_PROBE_SNAT -d 10.2.0.3/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127\n\
             COMMIT\n"
        );
    }

    #[test]
    fn ipv6_golden_with_the_jump_already_there() {
        let got = restore_input(
            IpFamily::V6,
            &pods(&["10.2.0.2", "fd10:2::2"]),
            "*nat\n-A POSTROUTING -j AMBIT_PROBE_SNAT\n-A AMBIT_PROBE_SNAT -d fd10:2::9/128 -j SNAT\nCOMMIT\n",
        );
        assert_eq!(
            got,
            "*nat\n\
             :AMBIT_PROBE_SNAT - [0:0]\n\
             -A AMBIT_PROBE_SNAT -d fd10:2::2/128 -p tcp -m owner --socket-exists -j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff\n\
             COMMIT\n"
        );
    }

    #[test]
    fn no_pods_leave_an_empty_chain() {
        let got = restore_input(
            IpFamily::V4,
            &BTreeSet::new(),
            "-A POSTROUTING -j AMBIT_PROBE_SNAT\n",
        );
        assert_eq!(got, "*nat\n:AMBIT_PROBE_SNAT - [0:0]\nCOMMIT\n");
    }
}
