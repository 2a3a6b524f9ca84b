//! L4 authorization as ztunnel enforces it: AuthorizationPolicy reduced to what a
//! connection's attributes can decide (the peer's identity from mTLS, addresses,
//! destination port), and the decision for one connection.
//!
//! Evaluation (`../shared/reference/istio-ambient-api.md` §1.5, §1.9), over the
//! policies that apply to the destination workload:
//! 1. a CUSTOM policy whose rules match denies: there is no external authorizer at L4,
//!    and a policy that cannot be enforced fails closed;
//! 2. a DENY policy whose rules match denies;
//! 3. with no ALLOW policy, the connection is allowed;
//! 4. an ALLOW policy whose rules match allows;
//! 5. otherwise the connection is denied.
//!
//! AUDIT policies never change the outcome. Dry-run policies are evaluated and
//! reported, never enforced.
//!
//! Matching: a policy matches if any rule does; a rule if every clause does (`from`,
//! `to`, each `when`); a clause if any of its matches does; a match if every field it
//! sets does (values of one field ORed, a `not_*` field when none of its values match).
//! A policy with no rules never matches (`spec: {}` allows nothing); a rule with no
//! clauses matches everything (`rules: [{}]`); a clause with no matches, and a match
//! with no fields, match everything. A peer without an identity (plaintext) never
//! satisfies a positive identity field and always satisfies a negative one.
//!
//! What the Kubernetes fields become, how L7 fields are handled and how invalid
//! policies fail closed is the translation's business (`ambit-control`); this module
//! only evaluates.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::SpiffeId;

/// Istio's string match: `abc` exact, `abc*` prefix, `*abc` suffix, `*` presence (any
/// non-empty value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    /// Reads Istio's notation.
    pub fn parse(value: &str) -> StringMatch {
        if value == "*" {
            StringMatch::Presence
        } else if let Some(prefix) = value.strip_suffix('*') {
            StringMatch::Prefix(prefix.to_owned())
        } else if let Some(suffix) = value.strip_prefix('*') {
            StringMatch::Suffix(suffix.to_owned())
        } else {
            StringMatch::Exact(value.to_owned())
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

impl From<String> for StringMatch {
    fn from(s: String) -> Self {
        StringMatch::parse(&s)
    }
}

impl From<StringMatch> for String {
    fn from(m: StringMatch) -> Self {
        m.to_string()
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(s) => f.write_str(s),
            StringMatch::Prefix(p) => write!(f, "{p}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Presence => f.write_str("*"),
        }
    }
}

/// An address block: a single IP (full length) or a CIDR. Written `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Cidr {
    pub address: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// `10.0.0.1`, `10.0.0.0/8`, `fd00::/8`. What Istio accepts (Go's
    /// `netip.ParsePrefix`, Rust's `ipnet`): an address with host bits set past the
    /// prefix (`10.1.0.2/16`) is the network it lies in (`10.1.0.0/16`); the length is
    /// decimal digits without a sign or a leading zero.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (address, len) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let address: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR"))?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(l) => Some(l)
                .filter(|l| {
                    !l.is_empty()
                        && l.bytes().all(|b| b.is_ascii_digit())
                        && (l.len() == 1 || !l.starts_with('0'))
                })
                .and_then(|l| l.parse::<u8>().ok())
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0..={max}"))?,
        };
        let network = masked(address, prefix_len);
        let address = match address {
            IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(
                u32::try_from(network).map_err(|_| format!("{text:?}: not an IPv4 network"))?,
            )),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(network)),
        };
        Ok(Cidr {
            address,
            prefix_len,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 peer is the IPv4 address it maps.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.address.is_ipv4()
            && masked(ip, self.prefix_len) == masked(self.address, self.prefix_len)
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        Cidr::parse(&s)
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> Self {
        c.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn masked(ip: IpAddr, len: u8) -> u128 {
    let width = if ip.is_ipv4() { 32 } else { 128 };
    let host_bits = u32::from(width - len.min(width));
    if host_bits >= 128 {
        return 0;
    }
    (bits(ip) >> host_bits) << host_bits
}

/// A service account, as `serviceAccounts` names it: matched on namespace and name,
/// whatever the trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
}

/// One alternative of a clause: every field it sets must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Match {
    /// The peer identity without `spiffe://` (`td/ns/x/sa/y`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountRef>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountRef>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_trust_domains: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

/// What a connection offers to be matched.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The peer's identity (HBONE mTLS); `None` for plaintext.
    pub peer: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    /// The workload (container) port the connection is for.
    pub destination_port: u16,
}

/// Positive list: empty means no constraint, else some value matches. `None` (no
/// identity) never matches a non-empty positive list.
fn any_of<T>(list: &[T], value: Option<&str>, matches: impl Fn(&T, &str) -> bool) -> bool {
    list.is_empty() || value.is_some_and(|v| list.iter().any(|m| matches(m, v)))
}

/// Negative list: no value matches (so `None` always passes).
fn none_of<T>(list: &[T], value: Option<&str>, matches: impl Fn(&T, &str) -> bool) -> bool {
    value.is_none_or(|v| !list.iter().any(|m| matches(m, v)))
}

impl Match {
    pub fn matches(&self, c: &Connection<'_>) -> bool {
        let principal = c
            .peer
            .map(|p| p.as_str().strip_prefix("spiffe://").unwrap_or(p.as_str()));
        let namespace = c.peer.map(SpiffeId::namespace);
        let trust_domain = c.peer.map(SpiffeId::trust_domain);
        let string = |m: &StringMatch, v: &str| m.matches(v);
        let account = |sa: &ServiceAccountRef, _: &str| {
            c.peer
                .is_some_and(|p| p.namespace() == sa.namespace && p.service_account() == sa.name)
        };
        let has_peer = c.peer.map(|_| "");
        any_of(&self.principals, principal, string)
            && none_of(&self.not_principals, principal, string)
            && any_of(&self.namespaces, namespace, string)
            && none_of(&self.not_namespaces, namespace, string)
            && any_of(&self.service_accounts, has_peer, account)
            && none_of(&self.not_service_accounts, has_peer, account)
            && any_of(&self.trust_domains, trust_domain, string)
            && none_of(&self.not_trust_domains, trust_domain, string)
            && (self.source_ips.is_empty()
                || self.source_ips.iter().any(|b| b.contains(c.source_ip)))
            && !self.not_source_ips.iter().any(|b| b.contains(c.source_ip))
            && (self.destination_ips.is_empty()
                || self
                    .destination_ips
                    .iter()
                    .any(|b| b.contains(c.destination_ip)))
            && !self
                .not_destination_ips
                .iter()
                .any(|b| b.contains(c.destination_ip))
            && (self.destination_ports.is_empty()
                || self.destination_ports.contains(&c.destination_port))
            && !self.not_destination_ports.contains(&c.destination_port)
    }
}

/// Alternatives: any one matching is enough; none at all matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Clause {
    pub matches: Vec<Match>,
}

impl Clause {
    pub fn matches(&self, c: &Connection<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(c))
    }
}

/// Every clause must match; a rule with none matches every connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

impl Rule {
    pub fn matches(&self, c: &Connection<'_>) -> bool {
        self.clauses.iter().all(|clause| clause.matches(c))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

/// One policy as ztunnel evaluates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    /// `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
    #[serde(default)]
    pub dry_run: bool,
    /// Any one matching makes the policy match; none means it never does.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Policy {
    pub fn matches(&self, c: &Connection<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(c))
    }

    /// `namespace/name`, as decisions and metrics name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Why a connection was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// A CUSTOM policy matched: its external authorizer does not exist at L4.
    Custom { policy: String },
    /// A DENY policy matched.
    Denied { policy: String },
    /// ALLOW policies apply and none matched.
    NotAllowed,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Custom { policy } => write!(
                f,
                "denied by CUSTOM policy {policy}: no external authorizer is consulted at L4"
            ),
            Denial::Denied { policy } => write!(f, "explicitly denied by policy {policy}"),
            Denial::NotAllowed => f.write_str("not allowed: no ALLOW policy matched"),
        }
    }
}

/// The decision, and what the dry-run and AUDIT policies would have done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Result<(), Denial>,
    /// The policy that decided an allow, when one did (`None`: no ALLOW policy applies).
    pub allowed_by: Option<String>,
    /// Dry-run policies that matched, with their action.
    pub dry_run_matches: Vec<(String, Action)>,
    /// AUDIT policies that matched.
    pub audited_by: Vec<String>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.decision.is_ok()
    }
}

/// Decides one connection against the policies that apply to its destination.
pub fn evaluate<'p>(policies: impl IntoIterator<Item = &'p Policy>, c: &Connection<'_>) -> Verdict {
    let mut verdict = Verdict {
        decision: Ok(()),
        allowed_by: None,
        dry_run_matches: Vec::new(),
        audited_by: Vec::new(),
    };
    let mut custom = None;
    let mut deny = None;
    let mut any_allow = false;
    for p in policies {
        if p.dry_run {
            if p.matches(c) {
                verdict.dry_run_matches.push((p.key(), p.action));
            }
            continue;
        }
        match p.action {
            Action::Audit => {
                if p.matches(c) {
                    verdict.audited_by.push(p.key());
                }
            }
            Action::Custom => {
                if custom.is_none() && p.matches(c) {
                    custom = Some(p.key());
                }
            }
            Action::Deny => {
                if deny.is_none() && p.matches(c) {
                    deny = Some(p.key());
                }
            }
            Action::Allow => {
                any_allow = true;
                if verdict.allowed_by.is_none() && p.matches(c) {
                    verdict.allowed_by = Some(p.key());
                }
            }
        }
    }
    verdict.decision = if let Some(policy) = custom {
        Err(Denial::Custom { policy })
    } else if let Some(policy) = deny {
        Err(Denial::Denied { policy })
    } else if any_allow && verdict.allowed_by.is_none() {
        Err(Denial::NotAllowed)
    } else {
        Ok(())
    };
    if verdict.decision.is_err() {
        verdict.allowed_by = None;
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn conn<'a>(peer: Option<&'a SpiffeId>) -> Connection<'a> {
        Connection {
            peer,
            source_ip: "10.1.0.2".parse().unwrap(),
            destination_ip: "10.2.0.2".parse().unwrap(),
            destination_port: 8080,
        }
    }

    fn policy(name: &str, action: Action, matches: Vec<Match>) -> Policy {
        Policy {
            namespace: "shop".into(),
            name: name.into(),
            action,
            dry_run: false,
            rules: vec![Rule {
                clauses: vec![Clause { matches }],
            }],
        }
    }

    fn sm(v: &str) -> StringMatch {
        StringMatch::parse(v)
    }

    #[test]
    fn string_matches_follow_istio_notation() {
        let cases = [
            ("abc", "abc", true),
            ("abc", "abcd", false),
            ("abc*", "abc", true),
            ("abc*", "abcd", true),
            ("abc*", "xabc", false),
            ("*abc", "abc", true),
            ("*abc", "xabc", true),
            ("*abc", "abcx", false),
            ("*", "x", true),
            ("*", "", false),
            // A star in the middle is a literal character of an exact match.
            ("a*c", "a*c", true),
            ("a*c", "abc", false),
        ];
        for (pattern, value, want) in cases {
            let got = sm(pattern).matches(value);
            assert_eq!(got, want, "{pattern} against {value:?}");
        }
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let block = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(block.contains("10.1.255.1".parse().unwrap()));
        assert!(!block.contains("10.2.0.1".parse().unwrap()));
        assert!(block.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!block.contains("fd00::1".parse().unwrap()));
        assert!(Cidr::parse("10.1.0.2")
            .unwrap()
            .contains("10.1.0.2".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("fd10::/16")
            .unwrap()
            .contains("fd10:1::2".parse().unwrap()));
        // Host bits set: valid in Istio, the network the address lies in.
        for (text, network) in [
            ("10.1.0.2/16", "10.1.0.0/16"),
            ("10.1.255.255/17", "10.1.128.0/17"),
            ("192.168.7.9/0", "0.0.0.0/0"),
            ("10.1.0.2/32", "10.1.0.2/32"),
            ("fd10:1::2/16", "fd10::/16"),
            ("fd10:1::2/0", "::/0"),
        ] {
            let cidr = Cidr::parse(text).unwrap();
            assert_eq!(cidr.to_string(), network, "{text}");
            let address = text.split('/').next().unwrap();
            assert!(cidr.contains(address.parse().unwrap()), "{text}");
        }
        assert!(!Cidr::parse("10.1.0.2/16")
            .unwrap()
            .contains("10.2.0.2".parse().unwrap()));
        for bad in [
            "10.1.0.0/33",
            "fd10::/129",
            "10.1.0.0/",
            "10.1.0.0/+8",
            "10.1.0.0/08",
            "10.1.0.0/-1",
            "10.1.0.0/8/8",
            "nonsense",
            "nonsense/8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_field_matches_and_its_not_twin_inverts() {
        let client = id("spiffe://cluster.local/ns/shop/sa/client");
        let c = conn(Some(&client));
        let cases: Vec<(&str, Match, bool)> = vec![
            (
                "principal",
                Match {
                    principals: vec![sm("cluster.local/ns/shop/sa/client")],
                    ..Match::default()
                },
                true,
            ),
            (
                "principal other",
                Match {
                    principals: vec![sm("cluster.local/ns/shop/sa/web")],
                    ..Match::default()
                },
                false,
            ),
            (
                "principal prefix",
                Match {
                    principals: vec![sm("cluster.local/ns/shop/*")],
                    ..Match::default()
                },
                true,
            ),
            (
                "principal suffix",
                Match {
                    principals: vec![sm("*/sa/client")],
                    ..Match::default()
                },
                true,
            ),
            (
                "principal presence",
                Match {
                    principals: vec![sm("*")],
                    ..Match::default()
                },
                true,
            ),
            (
                "not principal",
                Match {
                    not_principals: vec![sm("cluster.local/ns/shop/sa/client")],
                    ..Match::default()
                },
                false,
            ),
            (
                "not principal other",
                Match {
                    not_principals: vec![sm("cluster.local/ns/x/sa/y")],
                    ..Match::default()
                },
                true,
            ),
            (
                "namespace",
                Match {
                    namespaces: vec![sm("shop")],
                    ..Match::default()
                },
                true,
            ),
            (
                "namespace other",
                Match {
                    namespaces: vec![sm("legacy")],
                    ..Match::default()
                },
                false,
            ),
            (
                "not namespace",
                Match {
                    not_namespaces: vec![sm("shop")],
                    ..Match::default()
                },
                false,
            ),
            (
                "service account",
                Match {
                    service_accounts: vec![ServiceAccountRef {
                        namespace: "shop".into(),
                        name: "client".into(),
                    }],
                    ..Match::default()
                },
                true,
            ),
            (
                "service account other",
                Match {
                    service_accounts: vec![ServiceAccountRef {
                        namespace: "shop".into(),
                        name: "web".into(),
                    }],
                    ..Match::default()
                },
                false,
            ),
            (
                "not service account",
                Match {
                    not_service_accounts: vec![ServiceAccountRef {
                        namespace: "shop".into(),
                        name: "client".into(),
                    }],
                    ..Match::default()
                },
                false,
            ),
            (
                "trust domain",
                Match {
                    trust_domains: vec![sm("cluster.local")],
                    ..Match::default()
                },
                true,
            ),
            (
                "trust domain suffix",
                Match {
                    trust_domains: vec![sm("*.local")],
                    ..Match::default()
                },
                true,
            ),
            (
                "trust domain other",
                Match {
                    trust_domains: vec![sm("other.org")],
                    ..Match::default()
                },
                false,
            ),
            (
                "not trust domain",
                Match {
                    not_trust_domains: vec![sm("cluster.local")],
                    ..Match::default()
                },
                false,
            ),
            (
                "source ip",
                Match {
                    source_ips: vec![Cidr::parse("10.1.0.0/24").unwrap()],
                    ..Match::default()
                },
                true,
            ),
            (
                "source ip other",
                Match {
                    source_ips: vec![Cidr::parse("10.9.0.0/24").unwrap()],
                    ..Match::default()
                },
                false,
            ),
            (
                "not source ip",
                Match {
                    not_source_ips: vec![Cidr::parse("10.1.0.2").unwrap()],
                    ..Match::default()
                },
                false,
            ),
            (
                "destination ip",
                Match {
                    destination_ips: vec![Cidr::parse("10.2.0.2").unwrap()],
                    ..Match::default()
                },
                true,
            ),
            (
                "not destination ip",
                Match {
                    not_destination_ips: vec![Cidr::parse("10.2.0.0/16").unwrap()],
                    ..Match::default()
                },
                false,
            ),
            (
                "port",
                Match {
                    destination_ports: vec![8080],
                    ..Match::default()
                },
                true,
            ),
            (
                "port other",
                Match {
                    destination_ports: vec![80],
                    ..Match::default()
                },
                false,
            ),
            (
                "not port",
                Match {
                    not_destination_ports: vec![8080],
                    ..Match::default()
                },
                false,
            ),
            (
                "not port other",
                Match {
                    not_destination_ports: vec![80],
                    ..Match::default()
                },
                true,
            ),
            (
                "fields are ANDed",
                Match {
                    namespaces: vec![sm("shop")],
                    destination_ports: vec![80],
                    ..Match::default()
                },
                false,
            ),
            (
                "values are ORed",
                Match {
                    destination_ports: vec![80, 8080],
                    ..Match::default()
                },
                true,
            ),
            (
                "positive and negative both hold",
                Match {
                    namespaces: vec![sm("*")],
                    not_namespaces: vec![sm("legacy")],
                    ..Match::default()
                },
                true,
            ),
            ("empty match matches", Match::default(), true),
        ];
        for (what, m, want) in cases {
            assert_eq!(m.matches(&c), want, "{what}");
        }
    }

    #[test]
    fn a_plaintext_peer_never_satisfies_identity_and_always_satisfies_not_identity() {
        let c = conn(None);
        let positive = [
            Match {
                principals: vec![sm("*")],
                ..Match::default()
            },
            Match {
                namespaces: vec![sm("shop")],
                ..Match::default()
            },
            Match {
                service_accounts: vec![ServiceAccountRef {
                    namespace: "shop".into(),
                    name: "client".into(),
                }],
                ..Match::default()
            },
            Match {
                trust_domains: vec![sm("*")],
                ..Match::default()
            },
        ];
        for m in positive {
            assert!(!m.matches(&c), "{m:?}");
        }
        let negative = [
            Match {
                not_principals: vec![sm("*")],
                ..Match::default()
            },
            Match {
                not_namespaces: vec![sm("shop")],
                ..Match::default()
            },
            Match {
                not_service_accounts: vec![ServiceAccountRef {
                    namespace: "shop".into(),
                    name: "client".into(),
                }],
                ..Match::default()
            },
            Match {
                not_trust_domains: vec![sm("*")],
                ..Match::default()
            },
        ];
        for m in negative {
            assert!(m.matches(&c), "{m:?}");
        }
    }

    #[test]
    fn empty_rules_allow_nothing_and_an_empty_rule_allows_everything() {
        let client = id("spiffe://cluster.local/ns/shop/sa/client");
        let c = conn(Some(&client));
        let allow_nothing = Policy {
            namespace: "shop".into(),
            name: "nothing".into(),
            action: Action::Allow,
            dry_run: false,
            rules: vec![],
        };
        assert_eq!(
            evaluate([&allow_nothing], &c).decision,
            Err(Denial::NotAllowed)
        );
        let allow_all = Policy {
            rules: vec![Rule::default()],
            name: "all".into(),
            ..allow_nothing.clone()
        };
        let v = evaluate([&allow_nothing, &allow_all], &c);
        assert!(v.allowed());
        assert_eq!(v.allowed_by.as_deref(), Some("shop/all"));
        assert!(evaluate([], &c).allowed(), "no policy: allowed");
    }

    #[test]
    fn custom_then_deny_then_allow_and_audit_never_decides() {
        let client = id("spiffe://cluster.local/ns/shop/sa/client");
        let c = conn(Some(&client));
        let everything = || vec![Match::default()];
        let allow = policy("allow", Action::Allow, everything());
        let deny = policy("deny", Action::Deny, everything());
        let custom = policy("ext", Action::Custom, everything());
        let audit = policy("audit", Action::Audit, everything());
        assert_eq!(
            evaluate([&allow, &deny], &c).decision,
            Err(Denial::Denied {
                policy: "shop/deny".into()
            })
        );
        assert_eq!(
            evaluate([&allow, &deny, &custom], &c).decision,
            Err(Denial::Custom {
                policy: "shop/ext".into()
            })
        );
        let v = evaluate([&audit], &c);
        assert!(v.allowed());
        assert_eq!(v.audited_by, vec!["shop/audit".to_owned()]);
        let other_port = policy(
            "p80",
            Action::Deny,
            vec![Match {
                destination_ports: vec![80],
                ..Match::default()
            }],
        );
        assert!(evaluate([&allow, &other_port], &c).allowed());
        let only_web = policy(
            "web",
            Action::Allow,
            vec![Match {
                principals: vec![sm("cluster.local/ns/shop/sa/web")],
                ..Match::default()
            }],
        );
        assert_eq!(evaluate([&only_web], &c).decision, Err(Denial::NotAllowed));
        assert!(evaluate([&only_web, &allow], &c).allowed());
    }

    #[test]
    fn dry_run_policies_are_reported_never_enforced() {
        let c = conn(None);
        let mut deny = policy("deny", Action::Deny, vec![Match::default()]);
        deny.dry_run = true;
        let mut allow_web = policy(
            "web",
            Action::Allow,
            vec![Match {
                principals: vec![sm("*")],
                ..Match::default()
            }],
        );
        allow_web.dry_run = true;
        let v = evaluate([&deny, &allow_web], &c);
        assert!(
            v.allowed(),
            "dry-run ALLOW does not make the workload allow-listed"
        );
        assert_eq!(
            v.dry_run_matches,
            vec![("shop/deny".to_owned(), Action::Deny)]
        );
    }

    #[test]
    fn a_rule_needs_every_clause_and_a_clause_any_match() {
        let client = id("spiffe://cluster.local/ns/shop/sa/client");
        let c = conn(Some(&client));
        let from_shop = Clause {
            matches: vec![
                Match {
                    namespaces: vec![sm("legacy")],
                    ..Match::default()
                },
                Match {
                    namespaces: vec![sm("shop")],
                    ..Match::default()
                },
            ],
        };
        let to_80 = Clause {
            matches: vec![Match {
                destination_ports: vec![80],
                ..Match::default()
            }],
        };
        let to_8080 = Clause {
            matches: vec![Match {
                destination_ports: vec![8080],
                ..Match::default()
            }],
        };
        assert!(Rule {
            clauses: vec![from_shop.clone(), to_8080]
        }
        .matches(&c));
        assert!(!Rule {
            clauses: vec![from_shop, to_80]
        }
        .matches(&c));
        assert!(Clause::default().matches(&c));
    }
}
