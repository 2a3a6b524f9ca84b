//! Istio's `DestinationRule` (`networking.istio.io`, v1; v1beta1 reads the same), read
//! into [`ambit_core::destination::DestinationRule`] for the waypoints.
//!
//! The spec is kept as JSON and read here field by field, so a rule that fails
//! validation is reported with the field at fault (`spec.trafficPolicy.
//! outlierDetection.interval: "ten" is not a duration ...`) and the caller keeps the
//! last good version; an unknown field is refused rather than ignored, so a rule is
//! never enforced as something it does not say.
//!
//! - `host`: a Service, by short name (in the rule's namespace), or
//!   `<name>.<namespace>.svc.cluster.local`. Wildcards and other hosts (ServiceEntry)
//!   are not served yet.
//! - `trafficPolicy` (and a subset's, and `portLevelSettings` with `port.number`):
//!   `loadBalancer` (`simple`: `ROUND_ROBIN`, `LEAST_REQUEST`, `RANDOM`,
//!   `UNSPECIFIED`; `consistentHash`: `httpHeaderName`, `httpCookie` {`name`, `ttl`,
//!   `path`}, `useSourceIp`), `connectionPool` (`tcp.maxConnections`,
//!   `http.http1MaxPendingRequests`, `http.http2MaxRequests`,
//!   `http.maxRequestsPerConnection`), `outlierDetection` (`consecutive5xxErrors`,
//!   `consecutiveGatewayErrors`, `interval`, `baseEjectionTime`,
//!   `maxEjectionPercent`), and `tls` with mode `ISTIO_MUTUAL` only (what every hop of
//!   the mesh is anyway).
//! - `subsets`: `name` (unique), `labels`, `trafficPolicy`.
//!
//! Durations are Istio's: a sequence of decimal numbers with units (`h`, `m`, `s`,
//! `ms`, `us`, `ns`), as `30s`, `1m30s`, `0.5s`; kept in milliseconds.

use std::collections::BTreeMap;

use ambit_core::destination::{
    ConnectionPool, DestinationRule as Rule, HashCookie, HashKey, LoadBalancer, OutlierDetection,
    PortTrafficPolicy, Subset, TrafficPolicy,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::resources::ObjectKey;
use crate::service_entry::GROUP;

/// The versions a DestinationRule may be written in (one schema; v1 is stored).
pub const API_VERSIONS: [&str; 2] = ["networking.istio.io/v1", "networking.istio.io/v1beta1"];

/// At most this many subsets and port settings (far above real use; bounds the work a
/// rule can cause).
const MAX_ITEMS: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationRule {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
}

resource!(
    DestinationRule,
    GROUP,
    "DestinationRule",
    "destinationrules"
);

/// Reads `rule` (its key, creation time and spec); `Err` names the field at fault.
pub fn read(key: &ObjectKey, rule: &DestinationRule) -> Result<Rule, String> {
    let created = rule
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second());
    read_spec(key, created, &rule.spec)
}

/// Reads a DestinationRule's spec.
pub fn read_spec(key: &ObjectKey, created: i64, spec: &Value) -> Result<Rule, String> {
    let spec = object(spec, "spec")?;
    only(spec, "spec", &["host", "trafficPolicy", "subsets"])?;
    let host = match spec.get("host") {
        Some(Value::String(h)) if !h.is_empty() => h,
        _ => return Err("spec.host: is required".into()),
    };
    let (service_namespace, service_name) = resolve_host(host, &key.namespace)?;
    let top = match spec.get("trafficPolicy") {
        None | Some(Value::Null) => TrafficPolicy::default(),
        Some(p) => traffic_policy(p, "spec.trafficPolicy")?,
    };
    let mut subsets: Vec<Subset> = Vec::new();
    for (i, s) in list(spec.get("subsets"), "spec.subsets")?
        .iter()
        .enumerate()
    {
        let at = format!("spec.subsets[{i}]");
        let s = object(s, &at)?;
        only(s, &at, &["name", "labels", "trafficPolicy"])?;
        let name = match s.get("name") {
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            _ => return Err(format!("{at}.name: is required")),
        };
        if subsets.iter().any(|s| s.name == name) {
            return Err(format!("{at}.name: subset {name:?} is defined twice"));
        }
        let mut labels = BTreeMap::new();
        if let Some(l) = s.get("labels").filter(|l| !l.is_null()) {
            for (k, v) in object(l, &format!("{at}.labels"))? {
                match v {
                    Value::String(v) => {
                        labels.insert(k.clone(), v.clone());
                    }
                    _ => return Err(format!("{at}.labels.{k}: must be a string")),
                }
            }
        }
        let traffic_policy = match s.get("trafficPolicy") {
            None | Some(Value::Null) => None,
            Some(p) => Some(traffic_policy(p, &format!("{at}.trafficPolicy"))?),
        };
        subsets.push(Subset {
            name,
            labels,
            traffic_policy,
        });
    }
    Ok(Rule {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        created,
        service_namespace,
        service_name,
        traffic_policy: top,
        subsets,
    })
}

/// The Service `host` names, from a rule in `namespace`.
fn resolve_host(host: &str, namespace: &str) -> Result<(String, String), String> {
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    let unsupported = || {
        Err(format!(
            "spec.host: {host:?} is not a Service Ambit serves: a short name (a Service in {namespace}) or <name>.<namespace>.svc.cluster.local"
        ))
    };
    if label(host) {
        return Ok((namespace.to_owned(), host.to_owned()));
    }
    match host
        .strip_suffix(".svc.cluster.local")
        .map(|s| s.split('.'))
    {
        Some(mut parts) => match (parts.next(), parts.next(), parts.next()) {
            (Some(name), Some(ns), None) if label(name) && label(ns) => {
                Ok((ns.to_owned(), name.to_owned()))
            }
            _ => unsupported(),
        },
        None => unsupported(),
    }
}

fn traffic_policy(p: &Value, at: &str) -> Result<TrafficPolicy, String> {
    let p = object(p, at)?;
    only(
        p,
        at,
        &[
            "loadBalancer",
            "connectionPool",
            "outlierDetection",
            "portLevelSettings",
            "tls",
        ],
    )?;
    tls(p.get("tls"), at)?;
    let (load_balancer, connection_pool, outlier_detection) = settings(p, at)?;
    let mut port_level_settings: Vec<PortTrafficPolicy> = Vec::new();
    for (i, s) in list(
        p.get("portLevelSettings"),
        &format!("{at}.portLevelSettings"),
    )?
    .iter()
    .enumerate()
    {
        let at = format!("{at}.portLevelSettings[{i}]");
        let s = object(s, &at)?;
        only(
            s,
            &at,
            &[
                "port",
                "loadBalancer",
                "connectionPool",
                "outlierDetection",
                "tls",
            ],
        )?;
        tls(s.get("tls"), &at)?;
        let port = match s.get("port") {
            Some(Value::Object(port)) => {
                only(port, &format!("{at}.port"), &["number"])?;
                match number(port, "number", &format!("{at}.port"), 65535)? {
                    Some(n) if n > 0 => n as u16,
                    _ => return Err(format!("{at}.port.number: is required (1 to 65535)")),
                }
            }
            _ => return Err(format!("{at}.port: is required ({{number: <port>}})")),
        };
        if port_level_settings.iter().any(|p| p.port == port) {
            return Err(format!("{at}.port.number: port {port} is set twice"));
        }
        let (load_balancer, connection_pool, outlier_detection) = settings(s, &at)?;
        port_level_settings.push(PortTrafficPolicy {
            port,
            load_balancer,
            connection_pool,
            outlier_detection,
        });
    }
    Ok(TrafficPolicy {
        load_balancer,
        connection_pool,
        outlier_detection,
        port_level_settings,
    })
}

type Settings = (
    Option<LoadBalancer>,
    Option<ConnectionPool>,
    Option<OutlierDetection>,
);

fn settings(p: &Map<String, Value>, at: &str) -> Result<Settings, String> {
    let present = |field: &str| p.get(field).filter(|v| !v.is_null());
    Ok((
        present("loadBalancer")
            .map(|v| load_balancer(v, &format!("{at}.loadBalancer")))
            .transpose()?,
        present("connectionPool")
            .map(|v| connection_pool(v, &format!("{at}.connectionPool")))
            .transpose()?,
        present("outlierDetection")
            .map(|v| outlier_detection(v, &format!("{at}.outlierDetection")))
            .transpose()?,
    ))
}

/// `tls`: only `ISTIO_MUTUAL`, which every hop of the mesh is.
fn tls(value: Option<&Value>, at: &str) -> Result<(), String> {
    let Some(t) = value.filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let at = format!("{at}.tls");
    let t = object(t, &at)?;
    only(t, &at, &["mode"])?;
    match t.get("mode") {
        Some(Value::String(m)) if m == "ISTIO_MUTUAL" => Ok(()),
        other => Err(format!(
            "{at}.mode: {} is not supported by Ambit: the waypoint reaches every endpoint over mutual TLS (ISTIO_MUTUAL)",
            other.map_or_else(|| "absent".to_owned(), Value::to_string)
        )),
    }
}

fn load_balancer(v: &Value, at: &str) -> Result<LoadBalancer, String> {
    let lb = object(v, at)?;
    only(lb, at, &["simple", "consistentHash"])?;
    match (lb.get("simple"), lb.get("consistentHash")) {
        (Some(_), Some(_)) => Err(format!("{at}: set simple or consistentHash, not both")),
        (Some(Value::String(s)), None) => match s.as_str() {
            "UNSPECIFIED" | "ROUND_ROBIN" => Ok(LoadBalancer::RoundRobin),
            "LEAST_REQUEST" | "LEAST_CONN" => Ok(LoadBalancer::LeastRequest),
            "RANDOM" => Ok(LoadBalancer::Random),
            other => Err(format!(
                "{at}.simple: {other:?} is not one of ROUND_ROBIN, LEAST_REQUEST, RANDOM"
            )),
        },
        (Some(_), None) => Err(format!("{at}.simple: must be a string")),
        (None, Some(h)) => {
            let at = format!("{at}.consistentHash");
            let h = object(h, &at)?;
            only(h, &at, &["httpHeaderName", "httpCookie", "useSourceIp"])?;
            let set: Vec<&str> = ["httpHeaderName", "httpCookie", "useSourceIp"]
                .into_iter()
                .filter(|k| h.get(*k).is_some_and(|v| !v.is_null()))
                .collect();
            if set.len() != 1 {
                return Err(format!(
                    "{at}: set exactly one of httpHeaderName, httpCookie, useSourceIp"
                ));
            }
            Ok(LoadBalancer::ConsistentHash(match set[0] {
                "httpHeaderName" => match &h["httpHeaderName"] {
                    Value::String(n)
                        if !n.is_empty() && http::HeaderName::from_bytes(n.as_bytes()).is_ok() =>
                    {
                        HashKey::Header {
                            name: n.to_ascii_lowercase(),
                        }
                    }
                    _ => return Err(format!("{at}.httpHeaderName: must be a header name")),
                },
                "httpCookie" => {
                    let at = format!("{at}.httpCookie");
                    let c = object(&h["httpCookie"], &at)?;
                    only(c, &at, &["name", "ttl", "path"])?;
                    let name = match c.get("name") {
                        Some(Value::String(n)) if !n.is_empty() => n.clone(),
                        _ => return Err(format!("{at}.name: is required")),
                    };
                    let ttl_ms = duration(c, "ttl", &at)?.filter(|t| *t > 0);
                    let path = match c.get("path") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(p)) if p.starts_with('/') => Some(p.clone()),
                        Some(_) => return Err(format!("{at}.path: must be a path (/...)")),
                    };
                    HashKey::Cookie(HashCookie { name, ttl_ms, path })
                }
                _ => match &h["useSourceIp"] {
                    Value::Bool(true) => HashKey::SourceIp,
                    _ => return Err(format!("{at}.useSourceIp: must be true when set")),
                },
            }))
        }
        (None, None) => Err(format!("{at}: set simple or consistentHash")),
    }
}

fn connection_pool(v: &Value, at: &str) -> Result<ConnectionPool, String> {
    let p = object(v, at)?;
    only(p, at, &["tcp", "http"])?;
    let max = u64::from(i32::MAX as u32);
    let mut pool = ConnectionPool::default();
    if let Some(tcp) = p.get("tcp").filter(|v| !v.is_null()) {
        let at = format!("{at}.tcp");
        let tcp = object(tcp, &at)?;
        only(tcp, &at, &["maxConnections"])?;
        pool.max_connections = number(tcp, "maxConnections", &at, max)?.map(|n| n as u32);
    }
    if let Some(http) = p.get("http").filter(|v| !v.is_null()) {
        let at = format!("{at}.http");
        let http = object(http, &at)?;
        only(
            http,
            &at,
            &[
                "http1MaxPendingRequests",
                "http2MaxRequests",
                "maxRequestsPerConnection",
            ],
        )?;
        pool.http1_max_pending_requests =
            number(http, "http1MaxPendingRequests", &at, max)?.map(|n| n as u32);
        pool.http2_max_requests = number(http, "http2MaxRequests", &at, max)?.map(|n| n as u32);
        pool.max_requests_per_connection =
            number(http, "maxRequestsPerConnection", &at, max)?.map(|n| n as u32);
    }
    Ok(pool)
}

fn outlier_detection(v: &Value, at: &str) -> Result<OutlierDetection, String> {
    let o = object(v, at)?;
    only(
        o,
        at,
        &[
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
        ],
    )?;
    let max = u64::from(u32::MAX);
    let positive = |field: &str| -> Result<Option<u64>, String> {
        match duration(o, field, at)? {
            Some(0) => Err(format!("{at}.{field}: must be at least 1ms")),
            d => Ok(d),
        }
    };
    Ok(OutlierDetection {
        consecutive_5xx_errors: number(o, "consecutive5xxErrors", at, max)?.map(|n| n as u32),
        consecutive_gateway_errors: number(o, "consecutiveGatewayErrors", at, max)?
            .map(|n| n as u32),
        interval_ms: positive("interval")?,
        base_ejection_time_ms: positive("baseEjectionTime")?,
        max_ejection_percent: number(o, "maxEjectionPercent", at, 100)?.map(|n| n as u32),
    })
}

fn object<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("{at}: must be an object"))
}

/// Refuses a field not in `known`.
fn only(o: &Map<String, Value>, at: &str, known: &[&str]) -> Result<(), String> {
    match o.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "{at}.{k}: unknown or not supported by Ambit (known here: {})",
            known.join(", ")
        )),
        None => Ok(()),
    }
}

fn list<'a>(v: Option<&'a Value>, at: &str) -> Result<&'a [Value], String> {
    match v {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) if items.len() <= MAX_ITEMS => Ok(items),
        Some(Value::Array(_)) => Err(format!("{at}: at most {MAX_ITEMS} entries")),
        Some(_) => Err(format!("{at}: must be a list")),
    }
}

fn number(o: &Map<String, Value>, field: &str, at: &str, max: u64) -> Result<Option<u64>, String> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= max => Ok(Some(v)),
            _ => Err(format!("{at}.{field}: {n} is not between 0 and {max}")),
        },
        Some(_) => Err(format!("{at}.{field}: must be a number")),
    }
}

fn duration(o: &Map<String, Value>, field: &str, at: &str) -> Result<Option<u64>, String> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(d)) => istio_duration(d)
            .map(Some)
            .map_err(|e| format!("{at}.{field}: {d:?} {e}")),
        Some(_) => Err(format!("{at}.{field}: must be a duration like 30s")),
    }
}

/// An Istio duration (`1h`, `1m30s`, `0.5s`, `100ms`) in milliseconds, rounded up
/// to whole milliseconds (so `1us` is not 0).
pub fn istio_duration(d: &str) -> Result<u64, &'static str> {
    let bad = "is not a duration like 30s, 500ms or 1m30s";
    let (mut nanos, mut rest) = (0u128, d);
    if rest.is_empty() {
        return Err(bad);
    }
    while !rest.is_empty() {
        let digits = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        if digits == 0 || digits > 20 {
            return Err(bad);
        }
        let number = &rest[..digits];
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit: u128 = match &rest[..unit_len] {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" => 1_000,
            "ns" => 1,
            _ => return Err(bad),
        };
        rest = &rest[unit_len..];
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return Err(bad);
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad)?
        };
        let mut part = whole * unit;
        let mut scale = unit;
        for digit in fraction.bytes() {
            scale /= 10;
            part += u128::from(digit - b'0') * scale;
        }
        nanos = nanos.saturating_add(part);
    }
    u64::try_from(nanos.div_ceil(1_000_000)).map_err(|_| "is too long")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn read_json(spec: Value) -> Result<Rule, String> {
        read_spec(&ObjectKey::new("shop", "reviews"), 5, &spec)
    }

    #[test]
    fn a_full_rule_reads_into_the_model() {
        let rule = read_json(json!({
            "host": "reviews",
            "trafficPolicy": {
                "loadBalancer": {"simple": "LEAST_REQUEST"},
                "connectionPool": {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1, "http2MaxRequests": 10, "maxRequestsPerConnection": 2}},
                "outlierDetection": {"consecutive5xxErrors": 3, "interval": "1s", "baseEjectionTime": "1m30s", "maxEjectionPercent": 100},
                "portLevelSettings": [{"port": {"number": 9080}, "loadBalancer": {"consistentHash": {"httpCookie": {"name": "user", "ttl": "0.5s", "path": "/"}}}}],
                "tls": {"mode": "ISTIO_MUTUAL"}
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}, "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "X-User"}}}}
            ]
        }))
        .unwrap();
        assert_eq!(
            (
                rule.service_namespace.as_str(),
                rule.service_name.as_str(),
                rule.created
            ),
            ("shop", "reviews", 5)
        );
        let p = &rule.traffic_policy;
        assert_eq!(p.load_balancer, Some(LoadBalancer::LeastRequest));
        assert_eq!(
            p.connection_pool,
            Some(ConnectionPool {
                max_connections: Some(1),
                http1_max_pending_requests: Some(1),
                http2_max_requests: Some(10),
                max_requests_per_connection: Some(2),
            })
        );
        assert_eq!(
            p.outlier_detection,
            Some(OutlierDetection {
                consecutive_5xx_errors: Some(3),
                consecutive_gateway_errors: None,
                interval_ms: Some(1000),
                base_ejection_time_ms: Some(90_000),
                max_ejection_percent: Some(100),
            })
        );
        assert_eq!(
            p.port_level_settings[0].load_balancer,
            Some(LoadBalancer::ConsistentHash(HashKey::Cookie(HashCookie {
                name: "user".into(),
                ttl_ms: Some(500),
                path: Some("/".into())
            })))
        );
        assert_eq!(rule.subsets[0].labels["version"], "v1");
        assert_eq!(
            rule.subsets[1]
                .traffic_policy
                .as_ref()
                .unwrap()
                .load_balancer,
            Some(LoadBalancer::ConsistentHash(HashKey::Header {
                name: "x-user".into()
            }))
        );
    }

    #[test]
    fn hosts_resolve_to_services() {
        for (host, want) in [
            ("reviews", Ok(("shop", "reviews"))),
            ("ratings.prod.svc.cluster.local", Ok(("prod", "ratings"))),
            ("reviews.prod", Err("not a Service Ambit serves")),
            (
                "*.shop.svc.cluster.local",
                Err("not a Service Ambit serves"),
            ),
            ("api.example.com", Err("not a Service Ambit serves")),
        ] {
            let got = read_json(json!({"host": host}));
            match (got, want) {
                (Ok(r), Ok((ns, name))) => {
                    assert_eq!(
                        (r.service_namespace.as_str(), r.service_name.as_str()),
                        (ns, name)
                    )
                }
                (Err(e), Err(says)) => assert!(e.contains(says), "{host}: {e}"),
                (got, want) => panic!("{host}: {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn bad_fields_are_named_with_their_path() {
        for (spec, says) in [
            (json!({}), "spec.host: is required"),
            (
                json!({"host": "r", "exportTo": ["."]}),
                "spec.exportTo: unknown or not supported",
            ),
            (
                json!({"host": "r", "trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}}),
                "spec.trafficPolicy.loadBalancer.simple: \"FASTEST\" is not one of",
            ),
            (
                json!({"host": "r", "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x", "useSourceIp": true}}}}),
                "consistentHash: set exactly one",
            ),
            (
                json!({"host": "r", "trafficPolicy": {"outlierDetection": {"interval": "ten"}}}),
                "spec.trafficPolicy.outlierDetection.interval: \"ten\" is not a duration",
            ),
            (
                json!({"host": "r", "trafficPolicy": {"outlierDetection": {"baseEjectionTime": "0s"}}}),
                "baseEjectionTime: must be at least 1ms",
            ),
            (
                json!({"host": "r", "trafficPolicy": {"outlierDetection": {"maxEjectionPercent": 101}}}),
                "maxEjectionPercent: 101 is not between 0 and 100",
            ),
            (
                json!({"host": "r", "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": -1}}}}),
                "spec.trafficPolicy.connectionPool.tcp.maxConnections: -1 is not between",
            ),
            (
                json!({"host": "r", "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "1s"}}}}),
                "connectionPool.tcp.connectTimeout: unknown or not supported",
            ),
            (
                json!({"host": "r", "trafficPolicy": {"tls": {"mode": "DISABLE"}}}),
                "spec.trafficPolicy.tls.mode: \"DISABLE\" is not supported",
            ),
            (
                json!({"host": "r", "trafficPolicy": {"portLevelSettings": [{"loadBalancer": {"simple": "RANDOM"}}]}}),
                "spec.trafficPolicy.portLevelSettings[0].port: is required",
            ),
            (
                json!({"host": "r", "subsets": [{"name": "v1"}, {"name": "v1"}]}),
                "spec.subsets[1].name: subset \"v1\" is defined twice",
            ),
            (
                json!({"host": "r", "subsets": [{"labels": {"version": "v1"}}]}),
                "spec.subsets[0].name: is required",
            ),
            (
                json!({"host": "r", "subsets": [{"name": "v1", "labels": {"version": 1}}]}),
                "spec.subsets[0].labels.version: must be a string",
            ),
        ] {
            let e = read_json(spec.clone()).unwrap_err();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }

    #[test]
    fn istio_durations() {
        for (d, ms) in [
            ("30s", Ok(30_000)),
            ("1m30s", Ok(90_000)),
            ("0.5s", Ok(500)),
            ("100ms", Ok(100)),
            ("1h", Ok(3_600_000)),
            ("1us", Ok(1)),
            ("", Err(())),
            ("10", Err(())),
            ("1d", Err(())),
            ("1..5s", Err(())),
            ("-1s", Err(())),
        ] {
            assert_eq!(istio_duration(d).map_err(|_| ()), ms, "{d:?}");
        }
    }
}
