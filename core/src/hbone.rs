//! HBONE's request semantics, free of IO: the CONNECT target, the `forwarded`,
//! `baggage` and `traceparent` headers, and why a CONNECT is refused with which status.
//!
//! Wire format (compatible with Istio's ztunnel): an HTTP/2 `CONNECT` whose
//! `:authority` is the inner target `ip:port`, with `forwarded: for="<src ip:port>"`
//! (plus `;host=<service hostname>` when the client targeted a service), `baggage`
//! carrying the source workload's metadata for telemetry, and a W3C `traceparent`.
//! `200` opens the byte stream; `400` bad or non-local target (or not a CONNECT, as
//! Istio's ztunnel answers), `401` denied by policy, `503` the upstream connect failed.
//!
//! The `:authority` may also be `<service hostname>:<port>` ([`ConnectTarget::Host`]):
//! Istio's double HBONE through an east-west gateway sends its inner CONNECT that way,
//! since the client does not know the endpoint's address. The destination resolves it
//! through the model (`inbound::resolve_host`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// The port every HBONE endpoint (pod or waypoint) listens on.
pub const HBONE_PORT: u16 = 15008;
/// ztunnel's outbound capture listener inside a pod (on 127.0.0.1 and ::1,
/// transparent): the redirect rules TPROXY the pod's outbound TCP to it.
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's inbound plaintext listener inside a pod: the redirect rules TPROXY inbound
/// TCP (except HBONE) to it.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// The ports ztunnel listens on inside every pod it serves. Traffic addressed to one
/// of them is never proxied to the app: the app cannot listen there, and ztunnel would
/// be proxying to itself, again and again.
pub const ZTUNNEL_POD_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];

/// The inner target of a CONNECT: an IP address and port, never a host name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HboneTarget(SocketAddr);

impl HboneTarget {
    pub fn new(addr: SocketAddr) -> Self {
        HboneTarget(addr)
    }

    /// Parses a CONNECT `:authority`: `1.2.3.4:80` or `[2001:db8::1]:80`.
    pub fn parse_authority(authority: &str) -> Result<Self, ConnectRefusal> {
        let bad = |reason: &str| ConnectRefusal::BadTarget {
            authority: authority.chars().take(128).collect(),
            reason: reason.to_string(),
        };
        let addr: SocketAddr = authority.parse().map_err(|_| {
            bad("must be <ip>:<port> (IPv6 in brackets); host names are not accepted")
        })?;
        if addr.port() == 0 {
            return Err(bad("port 0 is not a valid target"));
        }
        let ip = addr.ip();
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(bad("address cannot be a connection target"));
        }
        Ok(HboneTarget(addr))
    }

    pub fn addr(&self) -> SocketAddr {
        self.0
    }

    pub fn ip(&self) -> IpAddr {
        self.0.ip()
    }

    pub fn port(&self) -> u16 {
        self.0.port()
    }
}

/// A CONNECT target named by a service host name and the service port, as Istio's
/// double HBONE sends it: lower-cased, a valid DNS name (never an IP address).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostTarget {
    hostname: String,
    port: u16,
}

impl HostTarget {
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for HostTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.hostname, self.port)
    }
}

/// What a CONNECT's `:authority` names: an address, or a service host name to resolve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConnectTarget {
    Addr(HboneTarget),
    Host(HostTarget),
}

impl ConnectTarget {
    /// Parses `ip:port`, `[ipv6]:port` or `hostname:port`. A host name must be a DNS
    /// name (labels of letters, digits and `-`, at most 253 bytes); anything else is
    /// a bad target.
    pub fn parse_authority(authority: &str) -> Result<Self, ConnectRefusal> {
        let bad = |reason: &str| ConnectRefusal::BadTarget {
            authority: authority.chars().take(128).collect(),
            reason: reason.to_string(),
        };
        if let Ok(addr) = HboneTarget::parse_authority(authority) {
            return Ok(ConnectTarget::Addr(addr));
        }
        let Some((host, port)) = authority.rsplit_once(':') else {
            return Err(bad(
                "must be <ip>:<port> (IPv6 in brackets) or <hostname>:<port>",
            ));
        };
        if host.starts_with('[') || host.parse::<IpAddr>().is_ok() {
            // An address that HboneTarget refused: say why it did.
            return HboneTarget::parse_authority(authority).map(ConnectTarget::Addr);
        }
        let port: u16 = match port.parse() {
            Ok(0) => return Err(bad("port 0 is not a valid target")),
            Ok(p) => p,
            Err(_) => return Err(bad("port is not a number from 1 to 65535")),
        };
        if !is_dns_name(host) {
            return Err(bad(
                "must be <ip>:<port> (IPv6 in brackets) or <hostname>:<port> with a DNS host name",
            ));
        }
        Ok(ConnectTarget::Host(HostTarget {
            hostname: host.to_ascii_lowercase(),
            port,
        }))
    }
}

impl fmt::Display for ConnectTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectTarget::Addr(a) => a.fmt(f),
            ConnectTarget::Host(h) => h.fmt(f),
        }
    }
}

/// RFC 1123 host name: dot-separated labels of 1–63 letters, digits and `-`, not
/// starting or ending with `-`; 253 bytes at most; not all digits (an IPv4 look-alike).
fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl fmt::Display for HboneTarget {
    /// The `:authority` form; `SocketAddr` already brackets IPv6.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a CONNECT is refused. Each has a stable reason label (metrics, logs) and the
/// HTTP status it produces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    #[error("bad CONNECT target {authority:?}: {reason}")]
    BadTarget { authority: String, reason: String },
    #[error("CONNECT target {0} is not a workload on this node")]
    NotLocal(HboneTarget),
    #[error("CONNECT target {0} is one of ztunnel's own ports in the pod, not the app's")]
    ZtunnelPort(HboneTarget),
    #[error("CONNECT method required, got {0}")]
    NotConnect(String),
    /// A host-name target the model has no service for, or whose port that service
    /// (or its endpoint here) does not have.
    #[error("CONNECT target {host}: {reason}")]
    UnknownHost { host: HostTarget, reason: String },
    /// A host-name target on a listener that accepts only addresses (the waypoint).
    #[error("CONNECT target {0}: host names are not accepted here")]
    HostNotAccepted(HostTarget),
    #[error("denied by policy {policy}")]
    Denied { policy: String },
    #[error("connecting to {target} failed: {reason}")]
    UpstreamConnect { target: HboneTarget, reason: String },
    /// The peer is a waypoint, but not one the target is bound to.
    #[error("peer {peer} is waypoint {waypoint}, which {target} is not bound to")]
    WrongWaypoint {
        peer: String,
        waypoint: String,
        target: HboneTarget,
    },
    /// The target takes traffic only through its waypoint (policy attached there),
    /// and the peer is not that waypoint.
    #[error("{target} is bound to waypoint {waypoint}, which enforces its policy; {peer} must connect through it")]
    BypassesWaypoint {
        peer: String,
        waypoint: String,
        target: HboneTarget,
    },
    /// The proxy has no file descriptor left for the upstream socket (EMFILE/ENFILE):
    /// refused at CONNECT, so the client knows, rather than accepted and then lost.
    #[error("no file descriptor left to connect to {target}: {reason}")]
    OutOfDescriptors { target: HboneTarget, reason: String },
}

impl ConnectRefusal {
    /// The HTTP status the refusal is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ConnectRefusal::BadTarget { .. }
            | ConnectRefusal::NotLocal(_)
            | ConnectRefusal::ZtunnelPort(_)
            | ConnectRefusal::HostNotAccepted(_)
            // Istio's ztunnel answers a non-CONNECT method with 400 too.
            | ConnectRefusal::NotConnect(_) => 400,
            // Istio's ztunnel answers 503 when a host name does not resolve to a
            // service port of the local workload.
            ConnectRefusal::UnknownHost { .. } => 503,
            ConnectRefusal::Denied { .. }
            | ConnectRefusal::WrongWaypoint { .. }
            | ConnectRefusal::BypassesWaypoint { .. } => 401,
            ConnectRefusal::UpstreamConnect { .. } | ConnectRefusal::OutOfDescriptors { .. } => 503,
        }
    }

    /// A stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectRefusal::BadTarget { .. } => "bad_target",
            ConnectRefusal::NotLocal(_) => "not_local",
            ConnectRefusal::ZtunnelPort(_) => "ztunnel_port",
            ConnectRefusal::NotConnect(_) => "not_connect",
            ConnectRefusal::UnknownHost { .. } => "unknown_host",
            ConnectRefusal::HostNotAccepted(_) => "host_not_accepted",
            ConnectRefusal::Denied { .. } => "denied",
            ConnectRefusal::UpstreamConnect { .. } => "upstream_connect_failed",
            ConnectRefusal::WrongWaypoint { .. } => "wrong_waypoint",
            ConnectRefusal::BypassesWaypoint { .. } => "bypasses_waypoint",
            ConnectRefusal::OutOfDescriptors { .. } => "descriptors_exhausted",
        }
    }
}

/// The `forwarded` header (RFC 7239 subset): the original client address, and the
/// service host name when the client addressed a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    pub for_addr: SocketAddr,
    pub host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("forwarded header {value:?}: {reason}")]
    Forwarded { value: String, reason: &'static str },
    #[error("traceparent {value:?}: {reason}")]
    TraceParent { value: String, reason: &'static str },
}

impl Forwarded {
    pub fn header_value(&self) -> String {
        // The address is quoted: it contains ':' (and '[' ']' for IPv6).
        match &self.host {
            Some(host) => format!("for=\"{}\";host={}", self.for_addr, host),
            None => format!("for=\"{}\"", self.for_addr),
        }
    }

    /// Parses the first element of a `forwarded` header, taking its `for` and `host`
    /// parameters; other parameters are ignored.
    pub fn parse(value: &str) -> Result<Self, HeaderError> {
        let err = |reason| HeaderError::Forwarded {
            value: value.chars().take(256).collect(),
            reason,
        };
        let first = value.split(',').next().unwrap_or("");
        let mut for_addr = None;
        let mut host = None;
        for pair in first.split(';') {
            let Some((k, v)) = pair.trim().split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            if k.trim().eq_ignore_ascii_case("for") {
                for_addr = Some(
                    v.parse::<SocketAddr>()
                        .map_err(|_| err("for= is not <ip>:<port>"))?,
                );
            } else if k.trim().eq_ignore_ascii_case("host") && !v.is_empty() {
                host = Some(v.to_string());
            }
        }
        Ok(Forwarded {
            for_addr: for_addr.ok_or(err("no for= parameter"))?,
            host,
        })
    }
}

/// Source workload metadata carried in the `baggage` header, with the keys Istio's
/// ztunnel uses, so the receiving side can label metrics with the source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    /// Workload kind in lower case (`deployment`, `statefulset`, ...) and its name.
    pub workload: Option<(String, String)>,
    /// Canonical service name (`app` label) and version.
    pub service: Option<String>,
    pub version: Option<String>,
}

const WORKLOAD_KINDS: &[&str] = &[
    "deployment",
    "statefulset",
    "daemonset",
    "job",
    "cronjob",
    "replicaset",
    "pod",
];

impl Baggage {
    pub fn header_value(&self) -> String {
        let mut items = Vec::new();
        let mut push = |k: String, v: &Option<String>| {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                items.push(format!("{k}={}", escape(v)));
            }
        };
        push("k8s.cluster.name".into(), &self.cluster);
        push("k8s.namespace.name".into(), &self.namespace);
        if let Some((kind, name)) = &self.workload {
            push(format!("k8s.{kind}.name"), &Some(name.clone()));
        }
        push("service.name".into(), &self.service);
        push("service.version".into(), &self.version);
        items.join(",")
    }

    /// Lenient: unknown keys and malformed members are ignored (telemetry only).
    pub fn parse(value: &str) -> Self {
        let mut b = Baggage::default();
        for member in value.split(',') {
            // Properties after ';' are not used.
            let kv = member.split(';').next().unwrap_or("");
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let (k, v) = (k.trim(), unescape(v.trim()));
            if v.is_empty() {
                continue;
            }
            match k {
                "k8s.cluster.name" => b.cluster = Some(v),
                "k8s.namespace.name" => b.namespace = Some(v),
                "service.name" => b.service = Some(v),
                "service.version" => b.version = Some(v),
                other => {
                    if let Some(kind) = other
                        .strip_prefix("k8s.")
                        .and_then(|r| r.strip_suffix(".name"))
                        .filter(|kind| WORKLOAD_KINDS.contains(kind))
                    {
                        b.workload = Some((kind.to_string(), v));
                    }
                }
            }
        }
        b
    }
}

/// Percent-encodes what W3C baggage values may not contain.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_graphic() && !matches!(b, b',' | b';' | b'=' | b'%' | b'"' | b'\\') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape(v: &str) -> String {
    let hexval = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hexval(bytes[i + 1]), hexval(bytes[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A W3C `traceparent`: version 00, trace id, parent span id, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// A new trace from random bytes (callers supply the randomness).
    pub fn from_random(trace_id: [u8; 16], span_id: [u8; 8]) -> Self {
        TraceParent {
            trace_id,
            span_id,
            sampled: false,
        }
    }

    /// The same trace with a new span (the hop this proxy adds).
    pub fn child(&self, span_id: [u8; 8]) -> Self {
        TraceParent { span_id, ..*self }
    }

    pub fn header_value(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

impl FromStr for TraceParent {
    type Err = HeaderError;
    fn from_str(value: &str) -> Result<Self, HeaderError> {
        let err = |reason| HeaderError::TraceParent {
            value: value.chars().take(64).collect(),
            reason,
        };
        let parts: Vec<&str> = value.trim().split('-').collect();
        let [version, trace, span, flags] = parts.as_slice() else {
            return Err(err("must be 00-<32 hex>-<16 hex>-<2 hex>"));
        };
        if *version != "00" {
            return Err(err("only version 00 is understood"));
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        unhex(trace, &mut trace_id).ok_or(err("trace id is not 32 hex digits"))?;
        unhex(span, &mut span_id).ok_or(err("span id is not 16 hex digits"))?;
        let mut f = [0u8; 1];
        unhex(flags, &mut f).ok_or(err("flags are not 2 hex digits"))?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return Err(err("all-zero ids are invalid"));
        }
        Ok(TraceParent {
            trace_id,
            span_id,
            sampled: f[0] & 1 == 1,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_table() {
        let ok = [
            ("10.0.0.1:8080", "10.0.0.1:8080"),
            ("[2001:db8::1]:443", "[2001:db8::1]:443"),
            ("127.0.0.1:1", "127.0.0.1:1"),
        ];
        for (input, shown) in ok {
            let t = HboneTarget::parse_authority(input).unwrap();
            assert_eq!(t.to_string(), shown);
        }
        let bad = [
            ("cart.shop.svc:80", "host names are not accepted"),
            ("10.0.0.1", "must be <ip>:<port>"),
            ("2001:db8::1:443", "must be <ip>:<port>"),
            ("10.0.0.1:0", "port 0"),
            ("10.0.0.1:70000", "must be"),
            ("0.0.0.0:80", "cannot be a connection target"),
            ("224.0.0.1:80", "cannot be a connection target"),
            ("", "must be"),
        ];
        for (input, want) in bad {
            let e = HboneTarget::parse_authority(input).unwrap_err();
            assert_eq!(e.status(), 400, "{input}");
            assert_eq!(e.reason(), "bad_target");
            assert!(e.to_string().contains(want), "{input}: {e}");
        }
    }

    #[test]
    fn connect_targets_are_addresses_or_dns_host_names() {
        let host = |h: &str, p: u16| {
            ConnectTarget::Host(HostTarget {
                hostname: h.into(),
                port: p,
            })
        };
        let ok = [
            (
                "10.0.0.1:8080",
                ConnectTarget::Addr(HboneTarget::new("10.0.0.1:8080".parse().unwrap())),
            ),
            (
                "[2001:db8::1]:443",
                ConnectTarget::Addr(HboneTarget::new("[2001:db8::1]:443".parse().unwrap())),
            ),
            ("cart.shop.svc:80", host("cart.shop.svc", 80)),
            (
                "Cart.Shop.svc.cluster.local:9000",
                host("cart.shop.svc.cluster.local", 9000),
            ),
            ("api-1.example.com.:443", host("api-1.example.com.", 443)),
            ("localhost:1", host("localhost", 1)),
        ];
        for (input, want) in ok {
            assert_eq!(
                ConnectTarget::parse_authority(input).unwrap(),
                want,
                "{input}"
            );
        }
        let bad = [
            ("cart.shop.svc", "must be"),
            ("cart.shop.svc:0", "port 0"),
            ("cart.shop.svc:http", "port is not a number"),
            ("cart.shop.svc:70000", "port is not a number"),
            ("-cart.shop:80", "DNS host name"),
            ("cart..shop:80", "DNS host name"),
            ("cart_shop:80", "DNS host name"),
            ("cart shop:80", "DNS host name"),
            ("1.2.3:80", "DNS host name"),
            (":80", "DNS host name"),
            ("0.0.0.0:80", "cannot be a connection target"),
            ("[::1]:0", "port 0"),
            ("", "must be"),
        ];
        for (input, want) in bad {
            let e = ConnectTarget::parse_authority(input).unwrap_err();
            assert_eq!((e.status(), e.reason()), (400, "bad_target"), "{input}");
            assert!(e.to_string().contains(want), "{input}: {e}");
        }
        let long = format!("{}.svc:80", "a".repeat(64));
        assert!(ConnectTarget::parse_authority(&long).is_err());
        assert_eq!(
            host("cart.shop.svc", 80).to_string(),
            "cart.shop.svc:80".to_string()
        );
    }

    #[test]
    fn refusal_statuses() {
        let t = HboneTarget::parse_authority("10.0.0.1:80").unwrap();
        let cases = [
            (ConnectRefusal::NotLocal(t), 400, "not_local"),
            (
                ConnectRefusal::Denied {
                    policy: "ns/p".into(),
                },
                401,
                "denied",
            ),
            (
                ConnectRefusal::UpstreamConnect {
                    target: t,
                    reason: "refused".into(),
                },
                503,
                "upstream_connect_failed",
            ),
            (
                ConnectRefusal::OutOfDescriptors {
                    target: t,
                    reason: "Too many open files".into(),
                },
                503,
                "descriptors_exhausted",
            ),
            (ConnectRefusal::NotConnect("GET".into()), 400, "not_connect"),
        ];
        for (r, status, reason) in cases {
            assert_eq!((r.status(), r.reason()), (status, reason), "{r}");
        }
    }

    #[test]
    fn forwarded_round_trip_and_parsing() {
        let cases = [
            Forwarded {
                for_addr: "10.0.0.5:43210".parse().unwrap(),
                host: None,
            },
            Forwarded {
                for_addr: "[fd00::5]:43210".parse().unwrap(),
                host: Some("cart.shop.svc.cluster.local".into()),
            },
        ];
        for f in cases {
            assert_eq!(Forwarded::parse(&f.header_value()).unwrap(), f);
        }
        assert_eq!(
            Forwarded::parse(r#"For="10.1.2.3:5";proto=https;host=a.b, for="9.9.9.9:1""#).unwrap(),
            Forwarded {
                for_addr: "10.1.2.3:5".parse().unwrap(),
                host: Some("a.b".into())
            }
        );
        for bad in ["", "host=a", "for=unknown", "for=\"10.0.0.1\""] {
            assert!(Forwarded::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn baggage_round_trip_and_leniency() {
        let b = Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("shop".into()),
            workload: Some(("deployment".into(), "cart-v1".into())),
            service: Some("cart".into()),
            version: Some("v1,beta=2".into()),
        };
        let v = b.header_value();
        assert_eq!(
            v,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=cart-v1,service.name=cart,service.version=v1%2Cbeta%3D2"
        );
        assert_eq!(Baggage::parse(&v), b);
        assert_eq!(Baggage::parse(""), Baggage::default());
        let lenient = Baggage::parse(
            "junk, k8s.namespace.name = shop ;prop=1,k8s.bogus.name=x,=,service.name=",
        );
        assert_eq!(
            lenient,
            Baggage {
                namespace: Some("shop".into()),
                ..Baggage::default()
            }
        );
        assert_eq!(Baggage::parse("a=%"), Baggage::default());
        assert_eq!(
            Baggage::parse("service.name=%4"),
            Baggage {
                service: Some("%4".into()),
                ..Baggage::default()
            }
        );
        assert_eq!(
            Baggage::parse("service.name=ä%é1"),
            Baggage {
                service: Some("ä%é1".into()),
                ..Baggage::default()
            }
        );
    }

    #[test]
    fn traceparent_round_trip_and_rejections() {
        let t = TraceParent::from_random([0xab; 16], [0x01; 8]);
        let v = t.header_value();
        assert_eq!(v, "00-abababababababababababababababab-0101010101010101-00");
        assert_eq!(v.parse::<TraceParent>().unwrap(), t);
        let child = t.child([2; 8]);
        assert_eq!(child.trace_id, t.trace_id);
        assert_ne!(child.span_id, t.span_id);
        assert!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse::<TraceParent>()
                .unwrap()
                .sampled
        );
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad}");
        }
    }
}
