//! The netfilter half of the pod rule set: `iptables-restore --noflush` input that
//! moves a network namespace's `AMBIT_` chains, and the jumps into them, from what
//! `iptables-save` shows to what the config asks for.
//!
//! iptables-restore cannot test whether a rule exists, so exactly-one-jump needs the
//! current state: [`NetfilterState::parse`] reads it from `iptables-save`, and
//! [`restore_input`] adds a missing jump and deletes duplicates and stale ones. Our own
//! chains need no state: declaring a chain creates it or flushes it.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::{
    IpFamily, Ipv6Mode, RedirectConfig, CAPTURED_MARK, INBOUND_PLAINTEXT_PORT, MARK_MASK,
    OUTBOUND_PORT, ZTUNNEL_MARK,
};
use ambit_core::hbone::HBONE_PORT;

/// Every chain this module creates starts with this; the rest of the namespace's
/// rules are never touched.
pub const CHAIN_PREFIX: &str = "AMBIT_";

/// What one family's netfilter tables should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleSet {
    /// TCP is captured: outbound to 15001, inbound to 15006 (both TPROXY).
    Capture,
    /// TCP is never captured and never leaves or enters except over loopback and from
    /// the probe sources (IPv6 where capture is not possible).
    DropTcp,
}

impl RuleSet {
    /// The rule set `config` asks for in `family`.
    pub fn for_family(family: IpFamily, config: &RedirectConfig) -> RuleSet {
        match (family, config.ipv6) {
            (IpFamily::V4, _) | (IpFamily::V6, Ipv6Mode::Capture) => RuleSet::Capture,
            (IpFamily::V6, Ipv6Mode::Drop) => RuleSet::DropTcp,
        }
    }
}

/// `iptables-restore --noflush` input that leaves exactly `desired` (or, with `None`,
/// nothing of ours) in `family`'s tables, given what they hold now. Empty when there is
/// nothing to change.
pub fn restore_input(
    family: IpFamily,
    desired: Option<RuleSet>,
    config: &RedirectConfig,
    current: &NetfilterState,
) -> String {
    let wanted = desired.map_or_else(Vec::new, |set| chains(set, family, config));
    let mut input = String::new();
    for table in TABLES {
        let wanted: Vec<&OwnedChain> = wanted.iter().filter(|c| c.table == table).collect();
        let lines = table_lines(table, &wanted, current);
        if !lines.is_empty() {
            let _ = writeln!(input, "*{table}");
            for line in lines {
                let _ = writeln!(input, "{line}");
            }
            input.push_str("COMMIT\n");
        }
    }
    input
}

/// What `iptables-save` shows of ours: the `AMBIT_` chains and every rule elsewhere that
/// jumps to one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetfilterState {
    /// `(table, chain)` of each `AMBIT_` chain.
    pub chains: Vec<(String, String)>,
    pub jumps: Vec<Jump>,
}

/// A rule in a chain that is not ours whose target is one of our chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub table: String,
    /// The chain holding the rule (`PREROUTING`, `OUTPUT`, ...).
    pub chain: String,
    /// The rule as `iptables-save` prints it after `-A <chain> `, so `-D <chain> <spec>`
    /// deletes it.
    pub spec: String,
}

impl NetfilterState {
    /// Reads `iptables-save` (or `ip6tables-save`) output.
    pub fn parse(save: &str) -> NetfilterState {
        let mut state = NetfilterState::default();
        let mut table = "";
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                table = name;
            } else if let Some(declaration) = line.strip_prefix(':') {
                let chain = declaration.split_whitespace().next().unwrap_or_default();
                if chain.starts_with(CHAIN_PREFIX) {
                    state.chains.push((table.to_owned(), chain.to_owned()));
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let Some((chain, spec)) = rule.split_once(' ') else {
                    continue;
                };
                if !chain.starts_with(CHAIN_PREFIX) && targets_our_chain(spec) {
                    state.jumps.push(Jump {
                        table: table.to_owned(),
                        chain: chain.to_owned(),
                        spec: spec.to_owned(),
                    });
                }
            }
        }
        state
    }

    /// Whether anything of ours is in the tables.
    pub fn is_clean(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

fn targets_our_chain(spec: &str) -> bool {
    let mut words = spec.split_whitespace();
    while let Some(word) = words.next() {
        if matches!(word, "-j" | "--jump" | "-g" | "--goto") {
            return words.next().is_some_and(|t| t.starts_with(CHAIN_PREFIX));
        }
    }
    false
}

/// The tables we write to, in the order the input handles them.
const TABLES: [&str; 3] = ["mangle", "nat", "filter"];

/// One chain of ours: where it lives, which built-in chain jumps to it, what it holds.
#[derive(Debug)]
struct OwnedChain {
    table: &'static str,
    hook: &'static str,
    name: &'static str,
    rules: Vec<String>,
}

impl OwnedChain {
    fn jump_spec(&self) -> String {
        format!("-j {}", self.name)
    }
}

/// The lines for one table: delete unwanted jumps, declare (create or flush) our
/// chains, delete the chains no longer wanted, add missing jumps, fill the chains.
fn table_lines(table: &str, wanted: &[&OwnedChain], current: &NetfilterState) -> Vec<String> {
    let mut lines = Vec::new();

    let mut kept: Vec<&str> = Vec::new();
    for jump in current.jumps.iter().filter(|j| j.table == table) {
        let canonical = wanted
            .iter()
            .find(|c| c.hook == jump.chain && c.jump_spec() == jump.spec);
        match canonical {
            Some(chain) if !kept.contains(&chain.name) => kept.push(chain.name),
            _ => lines.push(format!("-D {} {}", jump.chain, jump.spec)),
        }
    }

    let stale: Vec<&str> = current
        .chains
        .iter()
        .filter(|(t, name)| t == table && !wanted.iter().any(|c| c.name == name))
        .map(|(_, name)| name.as_str())
        .collect();
    for name in wanted.iter().map(|c| c.name).chain(stale.iter().copied()) {
        lines.push(format!(":{name} - [0:0]"));
    }
    for name in &stale {
        lines.push(format!("-X {name}"));
    }

    for chain in wanted.iter().filter(|c| !kept.contains(&c.name)) {
        lines.push(format!("-A {} {}", chain.hook, chain.jump_spec()));
    }
    for chain in wanted {
        for rule in &chain.rules {
            lines.push(format!("-A {} {rule}", chain.name));
        }
    }
    lines
}

/// The nftables table holding the outbound TPROXY rule, in family `ip` and `ip6`.
pub const NFT_TABLE: &str = "ambit";

/// `nft -f` input that leaves exactly the outbound TPROXY rules in `family` (with
/// `capture`) or nothing of ours (without). Declaring the table, deleting it and
/// declaring it again is one transaction, whatever the namespace held.
///
/// `outbound` takes the first packet of an outbound connection, which the OUTPUT rules
/// marked and the fwmark rule routed to `lo`, and hands it to ztunnel's outbound
/// listener on loopback, leaving its destination as the app sent it: the accepted
/// socket's local address is the original destination, and ztunnel's side of the
/// connection has the app's own 4-tuple.
///
/// `refuse` is why these rules are nftables: when no listener is there (ztunnel
/// stopped, restarting, or not serving the pod), the `tproxy` statement lets the packet
/// go on to local delivery, where it is answered with a reset, so the app's connect is
/// refused at once. (iptables' `TPROXY` target drops it, leaving the app waiting, and
/// the kernel's own reset cannot be routed from the remote address it would carry.)
pub fn nft_input(family: IpFamily, capture: bool) -> String {
    let (table_family, listener) = match family {
        IpFamily::V4 => ("ip", "127.0.0.1"),
        IpFamily::V6 => ("ip6", "[::1]"),
    };
    let mut input =
        format!("table {table_family} {NFT_TABLE}\ndelete table {table_family} {NFT_TABLE}\n");
    if capture {
        let first = format!(
            "iifname \"lo\" meta l4proto tcp meta mark & {MARK_MASK:#x} == {CAPTURED_MARK:#x} \
             ct state new"
        );
        let _ = write!(
            input,
            "table {table_family} {NFT_TABLE} {{\n\
             \tchain outbound {{\n\
             \t\ttype filter hook prerouting priority {NFT_PRIORITY}; policy accept;\n\
             \t\t{first} tproxy to {listener}:{OUTBOUND_PORT}\n\
             \t}}\n\
             \tchain refuse {{\n\
             \t\ttype filter hook input priority 0; policy accept;\n\
             \t\t{first} socket transparent 1 accept\n\
             \t\t{first} reject with tcp reset\n\
             \t}}\n\
             }}\n"
        );
    }
    input
}

/// Just after iptables' mangle PREROUTING (-150), where `AMBIT_PRERT` runs.
const NFT_PRIORITY: i32 = -149;

/// The chains of one rule set, with their rules. The shape follows Istio's in-pod
/// rules (ISTIO_PRERT / ISTIO_OUTPUT), so the same packets take the same paths.
fn chains(set: RuleSet, family: IpFamily, config: &RedirectConfig) -> Vec<OwnedChain> {
    let probes: Vec<String> = config
        .probe_sources
        .iter()
        .filter(|ip| IpFamily::of(ip) == family)
        .map(host_prefix)
        .collect();
    match set {
        RuleSet::Capture => capture_chains(family, &probes),
        RuleSet::DropTcp => drop_chains(&probes),
    }
}

fn capture_chains(family: IpFamily, probes: &[String]) -> Vec<OwnedChain> {
    let ztunnel = format!("{ZTUNNEL_MARK:#x}/{MARK_MASK:#x}");
    let captured = format!("{CAPTURED_MARK:#x}/{MARK_MASK:#x}");
    let loopback = match family {
        IpFamily::V4 => "127.0.0.0/8",
        IpFamily::V6 => "::1/128",
    };

    let mut prerouting = vec![
        // ztunnel's connection to the app (from the original source, over lo): remember
        // it on the connection, so the app's replies can be steered back to ztunnel.
        format!("-m mark --mark {ztunnel} -j CONNMARK --set-xmark {captured}"),
    ];
    // Kubelet health probes come from the node: never captured.
    prerouting.extend(probes.iter().map(|p| format!("-s {p} -p tcp -j ACCEPT")));
    prerouting.extend([
        // Everything arriving on lo is local: app to itself, ztunnel to the app, and a
        // captured connection's packets, routed back by the fwmark rule to ztunnel's
        // socket (the first one of an outbound connection is handed to ztunnel's
        // listener by the nftables rule, see [`nft_input`]).
        "-i lo -p tcp -j ACCEPT".to_owned(),
        // HBONE is for ztunnel's own 15008 listener in this namespace.
        format!("-p tcp --dport {HBONE_PORT} -j ACCEPT"),
        // Connections already set up (before enrolment, or already handed to ztunnel).
        "-p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
        // Only a SYN opens a connection to capture. conntrack may see a connection
        // that was open before enrolment for the first time now (it was not tracking
        // in this namespace yet), as NEW: its packets go on to the app's socket.
        format!(
            "! -d {loopback} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m mark ! --mark {ztunnel} \
             -j TPROXY --on-port {INBOUND_PLAINTEXT_PORT} --tproxy-mark {captured}"
        ),
    ]);

    let mut mangle_output = vec![
        // ztunnel's own sockets are never captured, whatever their connection's mark:
        // first, before the captured mark is restored. ztunnel's connection to the app
        // carries the captured connmark (set above, for the app's replies) from its
        // first SYN on; should that SYN be dropped (the app's accept queue full under
        // load), the retransmission, still a NEW connection, would otherwise have the
        // mark restored and be handed to 15001 as if the app had opened it.
        format!("-p tcp -m mark --mark {ztunnel} -j RETURN"),
        // Every later packet of a captured connection (the app's side of one ztunnel
        // opened inbound, or of one it accepted outbound) gets the captured mark, which
        // the fwmark rule routes to lo: the destination is a remote address, and the
        // packet must reach ztunnel's socket for it, not the network.
        format!(
            "-m connmark --mark {captured} \
             -j CONNMARK --restore-mark --nfmask {MARK_MASK:#x} --ctmask {MARK_MASK:#x}"
        ),
        // Only new connections are captured; those set up before enrolment are left alone.
        "-p tcp -m conntrack ! --ctstate NEW -j RETURN".to_owned(),
    ];
    // To the node: the pod calling its node is never captured.
    mangle_output.extend(probes.iter().map(|p| format!("-d {p} -p tcp -j RETURN")));
    mangle_output.extend([
        // To the pod's own addresses and loopback: never through ztunnel.
        "-o lo -j RETURN".to_owned(),
        // A new outbound connection: captured. Not NAT (REDIRECT): ztunnel's accepted
        // socket then has the app's own 4-tuple, so when ztunnel closes first its
        // TIME_WAIT is keyed like the app's connection and a reused client port towards
        // another destination is a different connection. Behind REDIRECT every captured
        // connection shared the local address 127.0.0.1:15001, and such a reuse met the
        // old TIME_WAIT and stalled for a SYN retransmission (1 s).
        // Only a SYN: a connection open before enrolment that conntrack sees for the
        // first time now (as NEW, mid-stream) is left alone, not handed to ztunnel,
        // which would reset it.
        format!("-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j CONNMARK --set-xmark {captured}"),
        format!("-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j MARK --set-xmark {captured}"),
    ]);

    vec![
        OwnedChain {
            table: "mangle",
            hook: "PREROUTING",
            name: "AMBIT_PRERT",
            rules: prerouting,
        },
        OwnedChain {
            table: "mangle",
            hook: "OUTPUT",
            name: "AMBIT_OUTPUT",
            rules: mangle_output,
        },
    ]
}

fn drop_chains(probes: &[String]) -> Vec<OwnedChain> {
    let mut input = vec!["-i lo -j ACCEPT".to_owned()];
    input.extend(probes.iter().map(|p| format!("-s {p} -p tcp -j ACCEPT")));
    input.push("-p tcp -j DROP".to_owned());

    let mut output = vec!["-o lo -j ACCEPT".to_owned()];
    output.extend(probes.iter().map(|p| format!("-d {p} -p tcp -j ACCEPT")));
    // A reset, not a silent drop: the app's connect fails at once (and happy eyeballs
    // moves on to IPv4) instead of hanging until its SYN retries run out.
    output.push("-p tcp -j REJECT --reject-with tcp-reset".to_owned());

    vec![
        OwnedChain {
            table: "filter",
            hook: "INPUT",
            name: "AMBIT_INPUT",
            rules: input,
        },
        OwnedChain {
            table: "filter",
            hook: "OUTPUT",
            name: "AMBIT_OUTPUT",
            rules: output,
        },
    ]
}

fn host_prefix(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(probes: &[&str], ipv6: Ipv6Mode) -> RedirectConfig {
        RedirectConfig {
            probe_sources: probes.iter().map(|p| p.parse().unwrap()).collect(),
            ipv6,
            ..RedirectConfig::default()
        }
    }

    fn install(family: IpFamily, config: &RedirectConfig, current: &NetfilterState) -> String {
        restore_input(
            family,
            Some(RuleSet::for_family(family, config)),
            config,
            current,
        )
    }

    /// `input` less the jumps into our chains (already there when reinstalling).
    fn without_jumps(input: &str) -> String {
        input
            .lines()
            .filter(|l| {
                !matches!(
                    *l,
                    "-A PREROUTING -j AMBIT_PRERT" | "-A OUTPUT -j AMBIT_OUTPUT"
                )
            })
            .map(|l| format!("{l}\n"))
            .collect()
    }

    const IPV4_CAPTURE: &str = "\
*mangle
:AMBIT_PRERT - [0:0]
:AMBIT_OUTPUT - [0:0]
-A PREROUTING -j AMBIT_PRERT
-A OUTPUT -j AMBIT_OUTPUT
-A AMBIT_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A AMBIT_PRERT -s 192.0.2.1/32 -p tcp -j ACCEPT
-A AMBIT_PRERT -i lo -p tcp -j ACCEPT
-A AMBIT_PRERT -p tcp --dport 15008 -j ACCEPT
-A AMBIT_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A AMBIT_PRERT ! -d 127.0.0.0/8 -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15006 --tproxy-mark 0x111/0xfff
-A AMBIT_OUTPUT -p tcp -m mark --mark 0x539/0xfff -j RETURN
-A AMBIT_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xfff --ctmask 0xfff
-A AMBIT_OUTPUT -p tcp -m conntrack ! --ctstate NEW -j RETURN
-A AMBIT_OUTPUT -d 192.0.2.1/32 -p tcp -j RETURN
-A AMBIT_OUTPUT -o lo -j RETURN
-A AMBIT_OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j CONNMARK --set-xmark 0x111/0xfff
-A AMBIT_OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j MARK --set-xmark 0x111/0xfff
COMMIT
";

    const IPV6_CAPTURE: &str = "\
*mangle
:AMBIT_PRERT - [0:0]
:AMBIT_OUTPUT - [0:0]
-A PREROUTING -j AMBIT_PRERT
-A OUTPUT -j AMBIT_OUTPUT
-A AMBIT_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A AMBIT_PRERT -s fd00::1/128 -p tcp -j ACCEPT
-A AMBIT_PRERT -i lo -p tcp -j ACCEPT
-A AMBIT_PRERT -p tcp --dport 15008 -j ACCEPT
-A AMBIT_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A AMBIT_PRERT ! -d ::1/128 -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m mark ! --mark 0x539/0xfff -j TPROXY --on-port 15006 --tproxy-mark 0x111/0xfff
-A AMBIT_OUTPUT -p tcp -m mark --mark 0x539/0xfff -j RETURN
-A AMBIT_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xfff --ctmask 0xfff
-A AMBIT_OUTPUT -p tcp -m conntrack ! --ctstate NEW -j RETURN
-A AMBIT_OUTPUT -d fd00::1/128 -p tcp -j RETURN
-A AMBIT_OUTPUT -o lo -j RETURN
-A AMBIT_OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j CONNMARK --set-xmark 0x111/0xfff
-A AMBIT_OUTPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j MARK --set-xmark 0x111/0xfff
COMMIT
";

    const IPV6_DROP: &str = "\
*filter
:AMBIT_INPUT - [0:0]
:AMBIT_OUTPUT - [0:0]
-A INPUT -j AMBIT_INPUT
-A OUTPUT -j AMBIT_OUTPUT
-A AMBIT_INPUT -i lo -j ACCEPT
-A AMBIT_INPUT -s fd00::1/128 -p tcp -j ACCEPT
-A AMBIT_INPUT -p tcp -j DROP
-A AMBIT_OUTPUT -o lo -j ACCEPT
-A AMBIT_OUTPUT -d fd00::1/128 -p tcp -j ACCEPT
-A AMBIT_OUTPUT -p tcp -j REJECT --reject-with tcp-reset
COMMIT
";

    /// `iptables-save` of a namespace holding exactly [`IPV4_CAPTURE`] (the nf_tables
    /// backend's spelling).
    const SAVED_IPV4_CAPTURE: &str = "\
# Generated by iptables-save v1.8.9 (nf_tables) on Sun Nov 22 06:09:10 2026
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:AMBIT_OUTPUT - [0:0]
:AMBIT_PRERT - [0:0]
-A PREROUTING -j AMBIT_PRERT
-A OUTPUT -j AMBIT_OUTPUT
-A AMBIT_OUTPUT -p tcp -m mark --mark 0x539/0xfff -j RETURN
-A AMBIT_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xfff --ctmask 0xfff
-A AMBIT_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A AMBIT_PRERT -s 192.0.2.1/32 -p tcp -j ACCEPT
COMMIT
# Completed on Sun Nov 22 06:09:10 2026
";

    /// `iptables-save` of a namespace set up by the rule set before outbound capture
    /// moved from nat `REDIRECT` to `TPROXY`: it also has a nat chain.
    const SAVED_REDIRECT_ERA: &str = "\
*mangle
:AMBIT_OUTPUT - [0:0]
:AMBIT_PRERT - [0:0]
-A PREROUTING -j AMBIT_PRERT
-A OUTPUT -j AMBIT_OUTPUT
COMMIT
*nat
:OUTPUT ACCEPT [0:0]
:AMBIT_OUTPUT - [0:0]
-A OUTPUT -j AMBIT_OUTPUT
-A AMBIT_OUTPUT ! -d 127.0.0.0/8 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
";

    #[test]
    fn ipv4_capture_into_a_clean_namespace_creates_chains_jumps_and_rules() {
        let config = config(&["192.0.2.1", "fd00::1"], Ipv6Mode::Capture);
        let input = install(IpFamily::V4, &config, &NetfilterState::default());
        assert_eq!(input, IPV4_CAPTURE);
    }

    #[test]
    fn ipv6_capture_uses_ipv6_loopback_and_only_ipv6_probe_sources() {
        let config = config(&["192.0.2.1", "fd00::1"], Ipv6Mode::Capture);
        let input = install(IpFamily::V6, &config, &NetfilterState::default());
        assert_eq!(input, IPV6_CAPTURE);
    }

    #[test]
    fn ipv6_drop_mode_drops_tcp_in_the_filter_table_and_captures_nothing() {
        let config = config(&["192.0.2.1", "fd00::1"], Ipv6Mode::Drop);
        let input = install(IpFamily::V6, &config, &NetfilterState::default());
        assert_eq!(input, IPV6_DROP);
    }

    #[test]
    fn ipv4_ignores_ipv6_mode() {
        let capture = config(&["192.0.2.1"], Ipv6Mode::Capture);
        let drop = config(&["192.0.2.1"], Ipv6Mode::Drop);
        let clean = NetfilterState::default();
        assert_eq!(
            install(IpFamily::V4, &capture, &clean),
            install(IpFamily::V4, &drop, &clean)
        );
    }

    #[test]
    fn no_probe_sources_means_no_probe_rules() {
        let input = install(
            IpFamily::V4,
            &config(&[], Ipv6Mode::Capture),
            &Default::default(),
        );
        let expected: String = IPV4_CAPTURE
            .lines()
            .filter(|l| !l.contains("192.0.2.1"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(input, expected);
    }

    #[test]
    fn parse_finds_our_chains_and_the_jumps_into_them_only() {
        let save = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-X - [0:0]\n:AMBIT_PRERT - [0:0]\n\
                    -A PREROUTING -j KUBE-X\n-A PREROUTING -j AMBIT_PRERT\n\
                    -A PREROUTING -p tcp -m comment --comment \"x y\" --jump AMBIT_PRERT\n\
                    -A KUBE-X -g AMBIT_PRERT\n-A AMBIT_PRERT -j AMBIT_OTHER\nCOMMIT\n";
        let state = NetfilterState::parse(save);
        assert_eq!(state.chains, [("mangle".into(), "AMBIT_PRERT".into())]);
        let jumps: Vec<(&str, &str)> = state
            .jumps
            .iter()
            .map(|j| (j.chain.as_str(), j.spec.as_str()))
            .collect();
        assert_eq!(
            jumps,
            [
                ("PREROUTING", "-j AMBIT_PRERT"),
                (
                    "PREROUTING",
                    "-p tcp -m comment --comment \"x y\" --jump AMBIT_PRERT"
                ),
                ("KUBE-X", "-g AMBIT_PRERT"),
            ]
        );
    }

    #[test]
    fn installing_over_an_installed_set_refills_chains_without_adding_jumps() {
        let config = config(&["192.0.2.1"], Ipv6Mode::Capture);
        let current = NetfilterState::parse(SAVED_IPV4_CAPTURE);
        let input = install(IpFamily::V4, &config, &current);
        assert_eq!(input, without_jumps(IPV4_CAPTURE));
    }

    #[test]
    fn duplicate_and_foreign_jumps_are_deleted_keeping_one() {
        let config = config(&[], Ipv6Mode::Capture);
        let save = "*mangle\n:OUTPUT ACCEPT [0:0]\n:AMBIT_OUTPUT - [0:0]\n\
                    -A OUTPUT -j AMBIT_OUTPUT\n-A OUTPUT -p tcp -j AMBIT_OUTPUT\n\
                    -A OUTPUT -j AMBIT_OUTPUT\n-A PREROUTING -j AMBIT_OUTPUT\nCOMMIT\n";
        let input = install(IpFamily::V4, &config, &NetfilterState::parse(save));
        let mangle: Vec<&str> = input
            .split("*mangle\n")
            .nth(1)
            .unwrap()
            .lines()
            .take_while(|l| !l.starts_with("-A AMBIT_"))
            .collect();
        assert_eq!(
            mangle,
            [
                "-D OUTPUT -p tcp -j AMBIT_OUTPUT",
                "-D OUTPUT -j AMBIT_OUTPUT",
                "-D PREROUTING -j AMBIT_OUTPUT",
                ":AMBIT_PRERT - [0:0]",
                ":AMBIT_OUTPUT - [0:0]",
                "-A PREROUTING -j AMBIT_PRERT",
            ]
        );
    }

    #[test]
    fn installing_over_the_redirect_era_rule_set_removes_its_nat_chain() {
        let config = config(&["192.0.2.1"], Ipv6Mode::Capture);
        let current = NetfilterState::parse(SAVED_REDIRECT_ERA);
        let input = install(IpFamily::V4, &config, &current);
        let mangle = without_jumps(IPV4_CAPTURE);
        let nat =
            "*nat\n-D OUTPUT -j AMBIT_OUTPUT\n:AMBIT_OUTPUT - [0:0]\n-X AMBIT_OUTPUT\nCOMMIT\n";
        assert_eq!(input, format!("{mangle}{nat}"));
    }

    #[test]
    fn switching_ipv6_from_capture_to_drop_removes_the_capture_chains() {
        let capture = config(&[], Ipv6Mode::Capture);
        let save = "*mangle\n:AMBIT_PRERT - [0:0]\n:AMBIT_OUTPUT - [0:0]\n\
                    -A PREROUTING -j AMBIT_PRERT\n-A OUTPUT -j AMBIT_OUTPUT\nCOMMIT\n\
                    *nat\n:AMBIT_OUTPUT - [0:0]\n-A OUTPUT -j AMBIT_OUTPUT\nCOMMIT\n";
        let current = NetfilterState::parse(save);
        let drop = RedirectConfig {
            ipv6: Ipv6Mode::Drop,
            ..capture
        };
        let input = install(IpFamily::V6, &drop, &current);
        let mangle_and_nat = "\
*mangle
-D PREROUTING -j AMBIT_PRERT
-D OUTPUT -j AMBIT_OUTPUT
:AMBIT_PRERT - [0:0]
:AMBIT_OUTPUT - [0:0]
-X AMBIT_PRERT
-X AMBIT_OUTPUT
COMMIT
*nat
-D OUTPUT -j AMBIT_OUTPUT
:AMBIT_OUTPUT - [0:0]
-X AMBIT_OUTPUT
COMMIT
*filter
";
        assert!(input.starts_with(mangle_and_nat), "{input}");
    }

    #[test]
    fn removal_deletes_jumps_then_flushes_and_deletes_chains() {
        let current = NetfilterState::parse(SAVED_IPV4_CAPTURE);
        let input = restore_input(IpFamily::V4, None, &RedirectConfig::default(), &current);
        assert_eq!(
            input,
            "\
*mangle
-D PREROUTING -j AMBIT_PRERT
-D OUTPUT -j AMBIT_OUTPUT
:AMBIT_OUTPUT - [0:0]
:AMBIT_PRERT - [0:0]
-X AMBIT_OUTPUT
-X AMBIT_PRERT
COMMIT
"
        );
    }

    #[test]
    fn nft_input_replaces_the_table_with_the_outbound_rules_or_removes_it() {
        let first = "iifname \"lo\" meta l4proto tcp meta mark & 0xfff == 0x111 ct state new";
        assert_eq!(
            nft_input(IpFamily::V4, true),
            format!(
                "table ip ambit\ndelete table ip ambit\ntable ip ambit {{\n\
                 \tchain outbound {{\n\
                 \t\ttype filter hook prerouting priority -149; policy accept;\n\
                 \t\t{first} tproxy to 127.0.0.1:15001\n\
                 \t}}\n\
                 \tchain refuse {{\n\
                 \t\ttype filter hook input priority 0; policy accept;\n\
                 \t\t{first} socket transparent 1 accept\n\
                 \t\t{first} reject with tcp reset\n\
                 \t}}\n}}\n"
            )
        );
        assert!(nft_input(IpFamily::V6, true).contains("tproxy to [::1]:15001"));
        assert!(nft_input(IpFamily::V6, true).starts_with("table ip6 ambit\n"));
        assert_eq!(
            nft_input(IpFamily::V6, false),
            "table ip6 ambit\ndelete table ip6 ambit\n"
        );
    }

    #[test]
    fn removal_from_a_clean_namespace_is_empty() {
        let save = "*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
        let current = NetfilterState::parse(save);
        assert!(current.is_clean());
        let input = restore_input(IpFamily::V6, None, &RedirectConfig::default(), &current);
        assert_eq!(input, "");
    }
}
