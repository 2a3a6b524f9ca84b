//! A waypoint's decisions, free of IO: which CONNECT targets it serves
//! ([`bound_target`]), how it tells HTTP from TCP ([`declared_protocol`], [`sniff`]),
//! and which endpoints of a Service a request may go to ([`endpoints`], [`in_subset`];
//! the pick among them is [`crate::balance`]'s, or round robin, [`pick_endpoint`]).
//!
//! A waypoint serves exactly the Services and workloads bound to its Gateway: those
//! whose `waypoint` names it. Every other target is refused (400), so a waypoint is
//! never an open relay into the mesh.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use crate::hbone::{ConnectRefusal, HboneTarget};
use crate::model::{MeshState, Service, ServicePort, WaypointAddress, WaypointFor, Workload};

/// The Gateway a waypoint is (`<namespace>/<name>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayRef {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gateway {value:?}: {reason}")]
pub struct GatewayRefError {
    value: String,
    reason: &'static str,
}

impl FromStr for GatewayRef {
    type Err = GatewayRefError;

    /// `<namespace>/<name>`, both DNS labels as Kubernetes names them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| GatewayRefError {
            value: s.chars().take(256).collect(),
            reason,
        };
        let (namespace, name) = s.split_once('/').ok_or(err("must be <namespace>/<name>"))?;
        for part in [namespace, name] {
            let valid = !part.is_empty()
                && part.len() <= 253
                && part.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                })
                && !part.starts_with(['-', '.'])
                && !part.ends_with(['-', '.']);
            if !valid {
                return Err(err(
                    "namespace and name must be lower-case DNS names (a-z, 0-9, '-', '.')",
                ));
            }
        }
        Ok(GatewayRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for GatewayRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// This waypoint as the model knows it: its Gateway, the addresses of its own Service
/// (named like the Gateway, in its namespace) and the traffic it serves (its
/// `MeshConfig.waypoints` entry). A Service or workload is bound to it when its
/// `waypoint` names the Gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waypoint {
    pub gateway: GatewayRef,
    pub addresses: Vec<IpAddr>,
    /// `None` when the model has no entry for the Gateway (not a waypoint, or not yet
    /// known): then nothing is bound to it.
    pub traffic_type: Option<WaypointFor>,
}

impl Waypoint {
    /// The waypoint `gateway` in `state`.
    pub fn in_model(gateway: &GatewayRef, state: &MeshState) -> Waypoint {
        let addresses = state
            .service(&gateway.namespace, &gateway.name)
            .map(|s| s.spec.vips.clone())
            .unwrap_or_default();
        Waypoint {
            gateway: gateway.clone(),
            addresses,
            traffic_type: state
                .waypoint(&gateway.to_string())
                .map(|w| w.spec.traffic_type),
        }
    }

    /// Whether a Service's or workload's `waypoint` names this waypoint's Gateway.
    pub fn binds(&self, waypoint: Option<&WaypointAddress>) -> bool {
        self.traffic_type.is_some()
            && waypoint.is_some_and(|w| {
                w.namespace == self.gateway.namespace && w.name == self.gateway.name
            })
    }

    fn serves_services(&self) -> bool {
        self.traffic_type.is_some_and(WaypointFor::serves_services)
    }

    fn serves_workloads(&self) -> bool {
        self.traffic_type.is_some_and(WaypointFor::serves_workloads)
    }
}

/// A target this waypoint serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundTarget {
    /// Traffic addressed to a Service VIP on one of its ports: routed and balanced
    /// over the Service's endpoints.
    Service {
        service: Arc<Service>,
        port: ServicePort,
        /// The VIP the client used (its family picks the endpoint's address).
        vip: IpAddr,
    },
    /// Traffic addressed to a workload's own IP: forwarded to that workload.
    Workload {
        workload: Arc<Workload>,
        addr: SocketAddr,
    },
}

/// Decides a CONNECT to `target` arriving at `waypoint`: the Service or workload it
/// serves, or the refusal (400) naming why.
pub fn bound_target(
    state: &MeshState,
    waypoint: &Waypoint,
    target: HboneTarget,
) -> Result<BoundTarget, ConnectRefusal> {
    let refuse = |reason: String| ConnectRefusal::BadTarget {
        authority: target.to_string(),
        reason,
    };
    if let Some(service) = state.service_by_vip(target.ip()) {
        if !waypoint.binds(service.spec.waypoint.as_ref()) {
            return Err(refuse(format!(
                "service {} is not bound to waypoint {}",
                service.key(),
                waypoint.gateway
            )));
        }
        if !waypoint.serves_services() {
            return Err(refuse(format!(
                "waypoint {} does not serve service traffic (istio.io/waypoint-for)",
                waypoint.gateway
            )));
        }
        let port = service
            .spec
            .ports
            .iter()
            .find(|p| p.port == target.port())
            .ok_or_else(|| {
                refuse(format!(
                    "service {} has no port {}",
                    service.key(),
                    target.port()
                ))
            })?;
        return Ok(BoundTarget::Service {
            service: service.clone(),
            port: port.clone(),
            vip: target.ip(),
        });
    }
    if let Some(workload) = state.workload_by_ip(target.ip()) {
        if !waypoint.binds(workload.spec.waypoint.as_ref()) {
            return Err(refuse(format!(
                "workload {} is not bound to waypoint {}",
                workload.uid(),
                waypoint.gateway
            )));
        }
        if !waypoint.serves_workloads() {
            return Err(refuse(format!(
                "waypoint {} does not serve workload traffic (istio.io/waypoint-for)",
                waypoint.gateway
            )));
        }
        return Ok(BoundTarget::Workload {
            workload: workload.clone(),
            addr: target.addr(),
        });
    }
    Err(refuse(format!(
        "neither a service nor a workload of the mesh (waypoint {})",
        waypoint.gateway
    )))
}

/// The protocol a port declares (its `appProtocol`, or its name's prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// HTTP: HTTP/1.1, or HTTP/2 when the client starts with the preface.
    Http,
    /// HTTP/2 with prior knowledge (`http2`, `grpc`, `grpc-web`).
    Http2,
    /// Opaque bytes.
    Tcp,
    /// Nothing usable declared: sniff the client's first bytes.
    Sniff,
}

/// What a port's lower-case protocol name (`appProtocol` or name prefix) declares.
/// TLS and the protocols Envoy has no HTTP codec for are passed through as TCP;
/// names that mean nothing to a mesh fall back to sniffing, as Istio's do.
pub fn declared_protocol(app_protocol: Option<&str>) -> Declared {
    match app_protocol {
        Some("http") => Declared::Http,
        Some("http2" | "grpc" | "grpc-web" | "h2c") => Declared::Http2,
        Some(
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kafka" | "zookeeper"
            | "cassandra",
        ) => Declared::Tcp,
        _ => Declared::Sniff,
    }
}

/// What the client's first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface (prior knowledge).
    Http2,
    /// Anything else.
    Tcp,
    /// Too few bytes to tell yet.
    NeedMore,
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest request line sniffing waits for; a longer line that began like a request
/// is HTTP (the HTTP server then answers 414 or 400 itself).
pub const SNIFF_LIMIT: usize = 8 << 10;

/// Tells HTTP from TCP by the first bytes the client sent (`data`, all of them so
/// far): the h2 preface, or a request line `<method> <target> HTTP/1.<digit>\r\n`.
pub fn sniff(data: &[u8]) -> Sniffed {
    if data.is_empty() {
        return Sniffed::NeedMore;
    }
    let n = data.len().min(H2_PREFACE.len());
    if data[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Sniffed::Http2
        } else {
            Sniffed::NeedMore
        };
    }
    // The method: a token (RFC 9110 tchar), then one space.
    let method_len = data.iter().take_while(|b| is_tchar(**b)).count();
    if method_len == data.len() {
        return if method_len <= 32 {
            Sniffed::NeedMore
        } else {
            Sniffed::Tcp
        };
    }
    if method_len == 0 || method_len > 32 || data[method_len] != b' ' {
        return Sniffed::Tcp;
    }
    let rest = &data[method_len + 1..];
    let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
        // No end of line yet: the target must still look like one.
        return if rest.iter().any(|b| b.is_ascii_control() && *b != b'\r') {
            Sniffed::Tcp
        } else if data.len() >= SNIFF_LIMIT {
            Sniffed::Http1
        } else {
            Sniffed::NeedMore
        };
    };
    let line = &rest[..line_end];
    let Some(space) = line.iter().rposition(|b| *b == b' ') else {
        return Sniffed::Tcp;
    };
    let (target, version) = (&line[..space], &line[space + 1..]);
    let version_ok =
        version.len() == 8 && version.starts_with(b"HTTP/1.") && version[7].is_ascii_digit();
    if version_ok && !target.is_empty() && !target.iter().any(|b| b.is_ascii_control()) {
        Sniffed::Http1
    } else {
        Sniffed::Tcp
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The endpoint a request or connection goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    /// `podIP:targetPort`: the CONNECT `:authority` at the endpoint's ztunnel.
    pub addr: SocketAddr,
    /// The Service port (and subset) it was picked from, when a DestinationRule
    /// applies there: whose connection pool and outlier detection its requests count
    /// in. `None`: no rule (or a workload target).
    pub cluster: Option<Arc<crate::destination::ClusterKey>>,
}

/// Picks one of `service`'s healthy endpoints for `port` in `vip`'s address family,
/// the `turn`-th in round robin (the caller keeps one counter per Service port).
/// `None` when there is no healthy endpoint.
pub fn pick_endpoint(
    state: &MeshState,
    service: &Service,
    port: &ServicePort,
    vip: IpAddr,
    turn: u64,
) -> Option<Endpoint> {
    let candidates = endpoints(state, service, port, vip);
    if candidates.is_empty() {
        return None;
    }
    let index = (turn % candidates.len() as u64) as usize;
    candidates.into_iter().nth(index)
}

/// Why a Service (subset) has no endpoint for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoEndpoint {
    /// None is healthy, or every one is ejected: 503 `UH`.
    NoHealthy,
    /// The subset is not defined by the Service's DestinationRule (or it has none):
    /// 503 `NC`.
    NoSubset,
}

/// `candidates` (a Service's endpoints) in `subset` of `rule`, the Service's
/// DestinationRule: those whose workload has the subset's labels. No subset: all.
pub fn in_subset(
    rule: Option<&crate::destination::DestinationRule>,
    subset: Option<&str>,
    candidates: Vec<Endpoint>,
) -> Result<Vec<Endpoint>, NoEndpoint> {
    let Some(name) = subset else {
        return Ok(candidates);
    };
    let subset = rule
        .and_then(|r| r.subset(name))
        .ok_or(NoEndpoint::NoSubset)?;
    Ok(candidates
        .into_iter()
        .filter(|e| subset.selects(&e.workload.spec.labels))
        .collect())
}

/// `service`'s healthy endpoints for `port` in `vip`'s address family, in the
/// model's order.
pub fn endpoints(
    state: &MeshState,
    service: &Service,
    port: &ServicePort,
    vip: IpAddr,
) -> Vec<Endpoint> {
    service
        .spec
        .endpoints
        .iter()
        .filter_map(|ep| {
            let workload = state.workload(&ep.workload_uid)?;
            if !workload.spec.healthy {
                return None;
            }
            let ip = workload.ip_like(vip)?;
            let target_port = ep
                .ports
                .iter()
                .find(|p| p.port == port.port)
                .map_or(port.target_port, |p| p.target_port);
            Some(Endpoint {
                workload: workload.clone(),
                addr: SocketAddr::new(ip, target_port),
                cluster: None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;
    use crate::model::MeshConfig;

    const CONFIG: &str = r#"
workloads:
- {uid: shop/cart-1, name: cart-1, namespace: shop, serviceAccount: cart, node: a, ips: [10.1.0.5, "fd00::5"], protocol: HBONE}
- {uid: shop/cart-2, name: cart-2, namespace: shop, serviceAccount: cart, node: b, ips: [10.2.0.7], protocol: HBONE}
- {uid: shop/cart-3, name: cart-3, namespace: shop, serviceAccount: cart, node: b, ips: [10.2.0.8], protocol: HBONE, healthy: false}
- {uid: shop/db-0, name: db-0, namespace: shop, node: a, ips: [10.1.0.9], protocol: HBONE, waypoint: {address: 10.96.0.99, name: waypoint, namespace: shop}}
- {uid: shop/free-0, name: free-0, namespace: shop, node: a, ips: [10.1.0.10], protocol: HBONE}
- {uid: shop/other-0, name: other-0, namespace: shop, node: a, ips: [10.1.0.11], protocol: HBONE, waypoint: {address: 10.96.0.98, name: other, namespace: shop}}
- {uid: shop/waypoint-0, name: waypoint-0, namespace: shop, serviceAccount: waypoint, node: a, ips: [10.1.0.2], protocol: HBONE}
services:
- name: cart
  namespace: shop
  vips: [10.96.0.10, "fd00:96::10"]
  ports: [{port: 80, targetPort: 8080}, {port: 81, targetPort: 8081}]
  waypoint: {address: 10.96.0.99, name: waypoint, namespace: shop}
  endpoints:
  - {workloadUid: shop/cart-1, ports: [{port: 81, targetPort: 9091}]}
  - {workloadUid: shop/cart-2}
  - {workloadUid: shop/cart-3}
  - {workloadUid: shop/gone}
- name: free
  namespace: shop
  vips: [10.96.0.20]
  ports: [{port: 80, targetPort: 80}]
  endpoints: [{workloadUid: shop/free-0}]
- name: sick
  namespace: shop
  vips: [10.96.0.30]
  ports: [{port: 80, targetPort: 80}]
  waypoint: {address: 10.96.0.99, name: waypoint, namespace: shop}
  endpoints: [{workloadUid: shop/cart-3}]
- name: waypoint
  namespace: shop
  vips: [10.96.0.99]
  ports: [{port: 15008, targetPort: 15008}]
  endpoints: [{workloadUid: shop/waypoint-0}]
waypoints:
- {name: waypoint, namespace: shop, serviceAccount: waypoint, address: 10.96.0.99, trafficType: all}
"#;

    fn state() -> MeshState {
        let config: MeshConfig = serde_yaml_ng::from_str(CONFIG).unwrap();
        MeshState::build(&config, &TrustDomain::default()).unwrap()
    }

    fn me(state: &MeshState) -> Waypoint {
        Waypoint::in_model(&"shop/waypoint".parse().unwrap(), state)
    }

    #[test]
    fn a_subset_keeps_the_endpoints_with_its_labels_and_an_unknown_one_is_refused() {
        let config: MeshConfig = serde_yaml_ng::from_str(
            "workloads:\n\
             - {uid: shop/r-1, name: r-1, namespace: shop, node: a, ips: [10.1.0.1], labels: {version: v1}}\n\
             - {uid: shop/r-2, name: r-2, namespace: shop, node: a, ips: [10.1.0.2], labels: {version: v2, track: canary}}\n\
             - {uid: shop/r-3, name: r-3, namespace: shop, node: a, ips: [10.1.0.3]}\n\
             services:\n\
             - {name: r, namespace: shop, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}],\n\
                endpoints: [{workloadUid: shop/r-1}, {workloadUid: shop/r-2}, {workloadUid: shop/r-3}]}\n\
             destinationRules:\n\
             - {namespace: shop, name: r, serviceNamespace: shop, serviceName: r,\n\
                subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}, {name: v9, labels: {version: v9}}]}\n",
        )
        .unwrap();
        let s = MeshState::build(&config, &TrustDomain::default()).unwrap();
        let r = s.service("shop", "r").unwrap();
        let rule = s.destination_rule("shop", "r").map(|r| &**r);
        let all = endpoints(&s, r, &r.spec.ports[0], "10.96.0.1".parse().unwrap());
        let uids = |subset| {
            in_subset(rule, subset, all.clone()).map(|e| {
                e.iter()
                    .map(|e| e.workload.uid().to_owned())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(uids(None).unwrap(), ["shop/r-1", "shop/r-2", "shop/r-3"]);
        assert_eq!(uids(Some("v1")).unwrap(), ["shop/r-1"]);
        assert_eq!(uids(Some("v2")).unwrap(), ["shop/r-2"]);
        assert_eq!(uids(Some("v9")).unwrap(), Vec::<String>::new());
        assert_eq!(uids(Some("v3")), Err(NoEndpoint::NoSubset));
        assert_eq!(
            in_subset(None, Some("v1"), all.clone()).unwrap_err(),
            NoEndpoint::NoSubset
        );
    }

    #[test]
    fn gateway_refs_parse_and_bad_ones_say_why() {
        let g: GatewayRef = "shop/waypoint".parse().unwrap();
        assert_eq!(
            (g.namespace.as_str(), g.name.as_str()),
            ("shop", "waypoint")
        );
        assert_eq!(g.to_string(), "shop/waypoint");
        for bad in [
            "waypoint",
            "/waypoint",
            "shop/",
            "Shop/w",
            "shop/w/x",
            "shop/-w",
        ] {
            let e = bad.parse::<GatewayRef>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn the_waypoint_knows_its_address_and_traffic_type_from_the_model() {
        let s = state();
        assert_eq!(me(&s).addresses, ["10.96.0.99".parse::<IpAddr>().unwrap()]);
        assert_eq!(me(&s).traffic_type, Some(WaypointFor::All));
        let absent = Waypoint::in_model(&"shop/none".parse().unwrap(), &s);
        assert!(absent.addresses.is_empty());
        assert_eq!(absent.traffic_type, None);
        assert!(!absent.binds(
            s.service_by_vip("10.96.0.10".parse().unwrap())
                .unwrap()
                .spec
                .waypoint
                .as_ref()
        ));
    }

    fn describe(r: Result<BoundTarget, ConnectRefusal>) -> String {
        match r {
            Ok(BoundTarget::Service { service, port, vip }) => {
                format!(
                    "service {} port {}->{} via {vip}",
                    service.key(),
                    port.port,
                    port.target_port
                )
            }
            Ok(BoundTarget::Workload { workload, addr }) => {
                format!("workload {} at {addr}", workload.uid())
            }
            Err(e) => format!("{} {}", e.status(), e),
        }
    }

    #[test]
    fn bound_target_table() {
        let s = state();
        let w = me(&s);
        let cases = [
            ("10.96.0.10:80", "service shop/cart port 80->8080 via 10.96.0.10"),
            ("[fd00:96::10]:81", "service shop/cart port 81->8081 via fd00:96::10"),
            ("10.96.0.10:9", "400 bad CONNECT target \"10.96.0.10:9\": service shop/cart has no port 9"),
            ("10.96.0.20:80", "400 bad CONNECT target \"10.96.0.20:80\": service shop/free is not bound to waypoint shop/waypoint"),
            ("10.1.0.9:5432", "workload shop/db-0 at 10.1.0.9:5432"),
            ("10.1.0.10:80", "400 bad CONNECT target \"10.1.0.10:80\": workload shop/free-0 is not bound to waypoint shop/waypoint"),
            ("10.1.0.11:80", "400 bad CONNECT target \"10.1.0.11:80\": workload shop/other-0 is not bound to waypoint shop/waypoint"),
            ("10.1.0.5:8080", "400 bad CONNECT target \"10.1.0.5:8080\": workload shop/cart-1 is not bound to waypoint shop/waypoint"),
            ("192.0.2.1:80", "400 bad CONNECT target \"192.0.2.1:80\": neither a service nor a workload of the mesh (waypoint shop/waypoint)"),
        ];
        for (target, want) in cases {
            let target = HboneTarget::parse_authority(target).unwrap();
            assert_eq!(describe(bound_target(&s, &w, target)), want, "{target}");
        }
    }

    #[test]
    fn a_waypoint_serves_only_the_traffic_its_waypoint_for_names() {
        for (traffic, service, workload) in [
            ("service", true, false),
            ("workload", false, true),
            ("all", true, true),
            ("none", false, false),
        ] {
            let config = CONFIG.replace("trafficType: all", &format!("trafficType: {traffic}"));
            let config: MeshConfig = serde_yaml_ng::from_str(&config).unwrap();
            let s = MeshState::build(&config, &TrustDomain::default()).unwrap();
            let w = me(&s);
            let to =
                |t: &str| bound_target(&s, &w, HboneTarget::parse_authority(t).unwrap()).is_ok();
            assert_eq!(to("10.96.0.10:80"), service, "{traffic}: service traffic");
            assert_eq!(to("10.1.0.9:5432"), workload, "{traffic}: workload traffic");
        }
    }

    #[test]
    fn declared_protocol_table() {
        for (name, want) in [
            (Some("http"), Declared::Http),
            (Some("http2"), Declared::Http2),
            (Some("grpc"), Declared::Http2),
            (Some("grpc-web"), Declared::Http2),
            (Some("tcp"), Declared::Tcp),
            (Some("https"), Declared::Tcp),
            (Some("tls"), Declared::Tcp),
            (Some("mysql"), Declared::Tcp),
            (Some("something"), Declared::Sniff),
            (None, Declared::Sniff),
        ] {
            assert_eq!(declared_protocol(name), want, "{name:?}");
        }
    }

    #[test]
    fn sniff_table() {
        let long_target = format!("GET /{} HTTP/1.1\r\n", "a".repeat(SNIFF_LIMIT));
        let long_unfinished = format!("GET /{}", "a".repeat(SNIFF_LIMIT));
        let cases: &[(&[u8], Sniffed)] = &[
            (b"", Sniffed::NeedMore),
            (b"G", Sniffed::NeedMore),
            (b"GET", Sniffed::NeedMore),
            (b"GET /", Sniffed::NeedMore),
            (b"GET / HTTP/1.1", Sniffed::NeedMore),
            (b"GET / HTTP/1.1\r", Sniffed::NeedMore),
            (b"GET / HTTP/1.1\r\n", Sniffed::Http1),
            (b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", Sniffed::Http1),
            (b"POST /upload?x=1 HTTP/1.1\r\n", Sniffed::Http1),
            (b"OPTIONS * HTTP/1.1\r\n", Sniffed::Http1),
            (b"PURGE /cache HTTP/1.1\r\n", Sniffed::Http1),
            (b"GET / HTTP/2.0\r\n", Sniffed::Tcp),
            (b"GET /\r\n", Sniffed::Tcp),
            (b"GET  HTTP/1.1\r\n", Sniffed::Tcp),
            (b"GET /\x01 HTTP/1.1\r\n", Sniffed::Tcp),
            (b"GET /\x00", Sniffed::Tcp),
            (b" GET / HTTP/1.1\r\n", Sniffed::Tcp),
            (b"\x16\x03\x01\x02\x00", Sniffed::Tcp),
            (b"SSH-2.0-OpenSSH_9.6\r\n", Sniffed::Tcp),
            (b"PRI", Sniffed::NeedMore),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n", Sniffed::NeedMore),
            (H2_PREFACE, Sniffed::Http2),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
                Sniffed::Http2,
            ),
            (b"PRI * HTTP/1.1\r\n", Sniffed::Http1),
            (long_target.as_bytes(), Sniffed::Http1),
            (long_unfinished.as_bytes(), Sniffed::Http1),
        ];
        for (data, want) in cases {
            assert_eq!(sniff(data), *want, "{:?}", String::from_utf8_lossy(data));
        }
        assert_eq!(sniff(&[b'A'; 40]), Sniffed::Tcp);
    }

    #[test]
    fn endpoints_are_picked_round_robin_over_the_healthy_ones() {
        let s = state();
        let cart = s.service_by_vip("10.96.0.10".parse().unwrap()).unwrap();
        let port = |p: u16| {
            cart.spec
                .ports
                .iter()
                .find(|x| x.port == p)
                .unwrap()
                .clone()
        };
        let v4: IpAddr = "10.96.0.10".parse().unwrap();
        let v6: IpAddr = "fd00:96::10".parse().unwrap();
        let picks = |port: &ServicePort, vip: IpAddr| -> Vec<String> {
            (0..4)
                .map(|turn| {
                    pick_endpoint(&s, cart, port, vip, turn)
                        .map(|e| format!("{} {}", e.workload.uid(), e.addr))
                        .unwrap_or_else(|| "none".into())
                })
                .collect()
        };
        // cart-3 is unhealthy, shop/gone is not in the model.
        assert_eq!(
            picks(&port(80), v4),
            [
                "shop/cart-1 10.1.0.5:8080",
                "shop/cart-2 10.2.0.7:8080",
                "shop/cart-1 10.1.0.5:8080",
                "shop/cart-2 10.2.0.7:8080"
            ]
        );
        // A per-endpoint target port wins over the service's.
        assert_eq!(
            picks(&port(81), v4)[..2],
            ["shop/cart-1 10.1.0.5:9091", "shop/cart-2 10.2.0.7:8081"]
        );
        // Only endpoints with an address in the client's family.
        assert_eq!(picks(&port(80), v6), ["shop/cart-1 [fd00::5]:8080"; 4]);
        let sick = s.service_by_vip("10.96.0.30".parse().unwrap()).unwrap();
        assert_eq!(
            pick_endpoint(
                &s,
                sick,
                &sick.spec.ports[0],
                "10.96.0.30".parse().unwrap(),
                0
            ),
            None
        );
    }
}
