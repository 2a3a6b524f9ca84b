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

/// `iptables-restore --noflush` input that adds the SNAT rules for `add` and deletes
/// those for `remove` in [`NODE_CHAIN`] of `family`, leaving every other rule as it is
/// (a restarted agent does not yet know every enrolled pod: their rules stay), and
/// creates the chain and the jump from POSTROUTING unless `current` (the nat table as
/// `iptables-save` prints it) has them. Empty when nothing is to change.
pub fn restore_input(
    family: IpFamily,
    add: &BTreeSet<IpAddr>,
    remove: &BTreeSet<IpAddr>,
    current: &str,
) -> String {
    let (source, prefix) = match family {
        IpFamily::V4 => (IpAddr::V4(PROBE_SNAT_V4), 32),
        IpFamily::V6 => (IpAddr::V6(PROBE_SNAT_V6), 128),
    };
    let has = |line: &str| current.lines().any(|l| l.trim() == line);
    let rule = |pod: &IpAddr| {
        format!(
            "-A {NODE_CHAIN} -d {pod}/{prefix} -p tcp -m owner --socket-exists -j SNAT --to-source {source}"
        )
    };
    let mut lines = Vec::new();
    if !current
        .lines()
        .any(|l| l.starts_with(&format!(":{NODE_CHAIN} ")))
    {
        lines.push(format!(":{NODE_CHAIN} - [0:0]"));
    }
    if !has(&format!("-A POSTROUTING -j {NODE_CHAIN}")) {
        lines.push(format!("-I POSTROUTING 1 -j {NODE_CHAIN}"));
    }
    let of_family = |ips: &BTreeSet<IpAddr>| -> Vec<IpAddr> {
        ips.iter()
            .filter(|ip| IpFamily::of(ip) == family)
            .copied()
            .collect()
    };
    for pod in of_family(remove) {
        let line = rule(&pod);
        if has(&line) && !add.contains(&pod) {
            lines.push(line.replacen("-A ", "-D ", 1));
        }
    }
    for pod in of_family(add) {
        let line = rule(&pod);
        if !has(&line) {
            lines.push(line);
        }
    }
    if lines.is_empty() {
        return String::new();
    }
    format!("*nat\n{}\nCOMMIT\n", lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(ips: &[&str]) -> BTreeSet<IpAddr> {
        ips.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    const V4_RULE: &str = "-A AMBIT_PROBE_SNAT -d 10.2.0.2/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127";

    #[test]
    fn ipv4_golden_on_a_fresh_node() {
        let got = restore_input(
            IpFamily::V4,
            &ips(&["10.2.0.3", "10.2.0.2", "fd10:2::2"]),
            &BTreeSet::new(),
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
    fn ipv6_golden_with_the_chain_there_keeps_other_pods_rules() {
        let current = "*nat\n:AMBIT_PROBE_SNAT - [0:0]\n-A POSTROUTING -j AMBIT_PROBE_SNAT\n\
             -A AMBIT_PROBE_SNAT -d fd10:2::9/128 -p tcp -m owner --socket-exists -j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff\nCOMMIT\n";
        let got = restore_input(
            IpFamily::V6,
            &ips(&["10.2.0.2", "fd10:2::2"]),
            &BTreeSet::new(),
            current,
        );
        assert_eq!(
            got,
            "*nat\n\
             -A AMBIT_PROBE_SNAT -d fd10:2::2/128 -p tcp -m owner --socket-exists -j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff\n\
             COMMIT\n"
        );
    }

    #[test]
    fn removal_deletes_only_rules_that_are_there_and_a_second_add_changes_nothing() {
        let current =
            format!(":AMBIT_PROBE_SNAT - [0:0]\n-A POSTROUTING -j AMBIT_PROBE_SNAT\n{V4_RULE}\n");
        let got = restore_input(
            IpFamily::V4,
            &BTreeSet::new(),
            &ips(&["10.2.0.2", "10.2.0.7"]),
            &current,
        );
        assert_eq!(
            got,
            format!("*nat\n{}\nCOMMIT\n", V4_RULE.replacen("-A ", "-D ", 1))
        );
        assert_eq!(
            restore_input(
                IpFamily::V4,
                &ips(&["10.2.0.2"]),
                &BTreeSet::new(),
                &current
            ),
            ""
        );
    }
}
