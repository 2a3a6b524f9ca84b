//! Gateway API's `HTTPRoute` (`gateway.networking.k8s.io`, v1; v1beta1 reads the same)
//! and `GRPCRoute` (v1) attached to a Service for mesh traffic (GAMMA: `parentRefs` of
//! kind `Service`), read into [`ambit_core::route::HttpRoute`] with the CRDs' defaults
//! and validation.
//!
//! The spec is kept as JSON and read here field by field, so a route that fails
//! validation is not dropped by the reader: it gets `Accepted=False` (reason
//! `UnsupportedValue`) with the field at fault, and the caller keeps the last routing
//! that was good. Defaults as the API server applies them: a match without a path is
//! `PathPrefix /`, a header or query match without a type is `Exact`, a weight is 1.
//!
//! Not read yet (refused with `UnsupportedValue` rather than ignored, so a route is
//! never enforced as something it does not say): `sessionPersistence`,
//! filters on a backend (`backendRefs[].filters`), `ExtensionRef` filters, and
//! backends other than Services. Rule filters: `filters.rs`.

use ambit_core::route::{
    Anchored, Backend, HeaderMatch, HttpRoute as Route, PathMatch, QueryMatch, RouteMatch,
    RouteRule, ValueMatch,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::gateway::GROUP;
use crate::resources::ObjectKey;

/// The versions an HTTPRoute may be written in (one schema; v1 is stored).
pub const API_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];

/// The CRD's bounds.
const MAX_PARENTS: usize = 32;
const MAX_RULES: usize = 16;
const MAX_MATCHES: usize = 64;
const MAX_BACKENDS: usize = 16;
const MAX_CONDITIONS: usize = 16;
const MAX_WEIGHT: u64 = 1_000_000;
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
}

resource!(HttpRoute, GROUP, "HTTPRoute", "httproutes");

/// Gateway API's `GRPCRoute` (v1), read into the same routing as an HTTPRoute: a
/// gRPC request is `POST /<service>/<method>`, so a method match becomes a path match
/// (service and method `Exact`: the exact path; service alone: the prefix
/// `/<service>`; otherwise an anchored regular expression, a missing part matching any
/// one segment).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpcRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
}

resource!(GrpcRoute, GROUP, "GRPCRoute", "grpcroutes");

/// The versions a GRPCRoute may be written in.
pub const GRPC_API_VERSIONS: [&str; 1] = ["gateway.networking.k8s.io/v1"];

/// Reads a GRPCRoute (its key, creation time and spec).
pub fn read_grpc(key: &ObjectKey, route: &GrpcRoute) -> ReadRoute {
    read_spec(key, &route.metadata, &route.spec, Flavour::Grpc)
}

/// A Service (or ServiceEntry) a route is attached to, for mesh traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteParent {
    pub kind: ParentKind,
    pub namespace: String,
    pub name: String,
    /// `None`: every port of the Service.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentKind {
    Service,
    ServiceEntry,
}

/// An HTTPRoute read: where it is attached (its parents that are Services; a Gateway
/// parent is for ingress, which Ambit does not serve, and is left to its own
/// controller), and its rules or why they cannot be enforced.
#[derive(Debug, Clone)]
pub struct ReadRoute {
    pub parents: Vec<RouteParent>,
    /// `Err`: the message of `Accepted=False`, reason `UnsupportedValue`, naming the
    /// field.
    pub route: Result<Route, String>,
}

/// Reads `route` (its key, creation time and spec).
pub fn read(key: &ObjectKey, route: &HttpRoute) -> ReadRoute {
    read_spec(key, &route.metadata, &route.spec, Flavour::Http)
}

/// Which kind of route a spec is: their matches differ, the rest is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Http,
    Grpc,
}

fn read_spec(key: &ObjectKey, metadata: &ObjectMeta, spec: &Value, flavour: Flavour) -> ReadRoute {
    let created = metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second());
    let (parents, parent_error) = match parents(spec, key) {
        Ok(p) => (p, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let route = match parent_error {
        Some(e) => Err(e),
        None => rules(spec, key, flavour).map(|rules| Route {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            created,
            rules,
            grpc: flavour == Flavour::Grpc,
            virtual_service: false,
        }),
    };
    ReadRoute { parents, route }
}

pub(crate) fn list<'a>(
    value: Option<&'a Value>,
    path: &str,
    max: usize,
) -> Result<&'a [Value], String> {
    match value {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) if items.len() <= max => Ok(items),
        Some(Value::Array(items)) => Err(format!(
            "{path}: at most {max} entries, not {}",
            items.len()
        )),
        Some(_) => Err(format!("{path}: must be a list")),
    }
}

pub(crate) fn text<'a>(
    value: &'a Value,
    field: &str,
    path: &str,
) -> Result<Option<&'a str>, String> {
    match value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{path}.{field}: must be a string")),
    }
}

pub(crate) fn number(
    value: &Value,
    field: &str,
    path: &str,
    max: u64,
) -> Result<Option<u64>, String> {
    match value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= max => Ok(Some(v)),
            _ => Err(format!("{path}.{field}: {n} is not between 0 and {max}")),
        },
        Some(_) => Err(format!("{path}.{field}: must be a number")),
    }
}

fn port(value: &Value, path: &str) -> Result<Option<u16>, String> {
    match number(value, "port", path, 65535)? {
        Some(0) => Err(format!("{path}.port: 0 is not between 1 and 65535")),
        Some(p) => Ok(Some(u16::try_from(p).unwrap_or(u16::MAX))),
        None => Ok(None),
    }
}

/// `spec.parentRefs` that are Services or ServiceEntries.
fn parents(spec: &Value, key: &ObjectKey) -> Result<Vec<RouteParent>, String> {
    let mut parents = Vec::new();
    for (i, p) in list(spec.get("parentRefs"), "spec.parentRefs", MAX_PARENTS)?
        .iter()
        .enumerate()
    {
        let path = format!("spec.parentRefs[{i}]");
        let group = text(p, "group", &path)?.unwrap_or(GROUP);
        let kind = text(p, "kind", &path)?.unwrap_or("Gateway");
        let kind = match (group, kind) {
            ("" | "core", "Service") => ParentKind::Service,
            ("networking.istio.io", "ServiceEntry") => ParentKind::ServiceEntry,
            (GROUP, "Gateway") => continue,
            _ => {
                return Err(format!(
                    "{path}: {group}/{kind} is not a parent Ambit serves"
                ))
            }
        };
        let name = match text(p, "name", &path)? {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => return Err(format!("{path}.name: is required")),
        };
        let namespace = text(p, "namespace", &path)?
            .filter(|n| !n.is_empty())
            .unwrap_or(&key.namespace)
            .to_owned();
        parents.push(RouteParent {
            kind,
            namespace,
            name,
            port: port(p, &path)?,
        });
    }
    Ok(parents)
}

fn rules(spec: &Value, key: &ObjectKey, flavour: Flavour) -> Result<Vec<RouteRule>, String> {
    let mut rules = Vec::new();
    for (i, r) in list(spec.get("rules"), "spec.rules", MAX_RULES)?
        .iter()
        .enumerate()
    {
        let path = format!("spec.rules[{i}]");
        if !r.is_object() {
            return Err(format!("{path}: must be an object"));
        }
        for field in ["sessionPersistence"] {
            if r.get(field).is_some_and(|v| !v.is_null()) {
                return Err(format!("{path}.{field}: not supported by Ambit yet"));
            }
        }
        let mut matches = Vec::new();
        for (j, m) in list(r.get("matches"), &format!("{path}.matches"), MAX_MATCHES)?
            .iter()
            .enumerate()
        {
            let at = format!("{path}.matches[{j}]");
            matches.push(match flavour {
                Flavour::Http => route_match(m, &at)?,
                Flavour::Grpc => grpc_match(m, &at)?,
            });
        }
        let mut backends = Vec::new();
        for (j, b) in list(
            r.get("backendRefs"),
            &format!("{path}.backendRefs"),
            MAX_BACKENDS,
        )?
        .iter()
        .enumerate()
        {
            backends.push(backend(b, &format!("{path}.backendRefs[{j}]"), key)?);
        }
        let (request_timeout_ms, backend_timeout_ms) = timeouts(r, &path)?;
        let filters = filters::filters(r, &path, flavour, &matches, key)?;
        let retry = match flavour {
            Flavour::Http => retry(r, &path)?,
            Flavour::Grpc if r.get("retry").is_some_and(|v| !v.is_null()) => {
                return Err(format!("{path}.retry: GRPCRoute has no retry field"))
            }
            Flavour::Grpc => None,
        };
        rules.push(RouteRule {
            matches,
            backends,
            request_timeout_ms,
            backend_timeout_ms,
            filters,
            retry,
            fault: None,
        });
    }
    Ok(rules)
}

/// `timeouts.request` and `timeouts.backendRequest` in milliseconds; `0s` (or absent):
/// none. A backend request may not be longer than the request.
fn timeouts(rule: &Value, path: &str) -> Result<(Option<u64>, Option<u64>), String> {
    let Some(t) = rule.get("timeouts").filter(|t| !t.is_null()) else {
        return Ok((None, None));
    };
    let at = format!("{path}.timeouts");
    let read = |field: &str| -> Result<Option<u64>, String> {
        match text(t, field, &at)? {
            None => Ok(None),
            Some(d) => gateway_duration(d)
                .map(|ms| (ms > 0).then_some(ms))
                .map_err(|e| format!("{at}.{field}: {d:?} {e}")),
        }
    };
    let (request, backend) = (read("request")?, read("backendRequest")?);
    if let (Some(r), Some(b)) = (request, backend) {
        if b > r {
            return Err(format!(
                "{at}.backendRequest: may not be longer than timeouts.request"
            ));
        }
    }
    Ok((request, backend))
}

/// `retry`: `attempts` (retries), `codes` (400 to 599), `backoff` (a duration).
fn retry(rule: &Value, path: &str) -> Result<Option<ambit_core::route::RouteRetry>, String> {
    let Some(r) = rule.get("retry").filter(|r| !r.is_null()) else {
        return Ok(None);
    };
    let at = format!("{path}.retry");
    if !r.is_object() {
        return Err(format!("{at}: must be an object"));
    }
    let attempts = number(r, "attempts", &at, 100)?.unwrap_or(0);
    let mut codes = Vec::new();
    for (i, c) in list(r.get("codes"), &format!("{at}.codes"), 64)?
        .iter()
        .enumerate()
    {
        match c.as_u64() {
            Some(c @ 400..=599) => codes.push(c as u16),
            _ => return Err(format!("{at}.codes[{i}]: {c} is not between 400 and 599")),
        }
    }
    let backoff_ms = match text(r, "backoff", &at)? {
        None => None,
        Some(d) => Some(gateway_duration(d).map_err(|e| format!("{at}.backoff: {d:?} {e}"))?),
    };
    Ok(Some(ambit_core::route::RouteRetry {
        attempts: attempts as u32,
        codes,
        backoff_ms,
        retry_on: None,
    }))
}

/// A Gateway API duration (GEP-2257: `1h`, `30m`, `10s`, `500ms`, combined as
/// `1m30s`; up to 4 parts of up to 5 digits), in milliseconds.
fn gateway_duration(d: &str) -> Result<u64, &'static str> {
    let bad = "is not a duration like 10s, 500ms or 1m30s";
    let (mut total, mut parts, mut rest) = (0u64, 0, d);
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad);
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad)?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1000, 1)
        } else {
            return Err(bad);
        };
        rest = &rest[len..];
        total += n * unit;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad);
    }
    Ok(total)
}

fn route_match(m: &Value, path: &str) -> Result<RouteMatch, String> {
    let path_match = match m.get("path").filter(|p| !p.is_null()) {
        None => PathMatch::Prefix("/".into()),
        Some(p) => {
            let at = format!("{path}.path");
            let kind = text(p, "type", &at)?.unwrap_or("PathPrefix");
            let value = text(p, "value", &at)?.unwrap_or("/");
            match kind {
                "Exact" | "PathPrefix" => {
                    check_path(value).map_err(|e| format!("{at}.value: {value:?} {e}"))?;
                    if kind == "Exact" {
                        PathMatch::Exact(value.to_owned())
                    } else {
                        let trimmed = value.trim_end_matches('/');
                        PathMatch::Prefix(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
                    }
                }
                "RegularExpression" => PathMatch::Regex(
                    Anchored::new(value).map_err(|e| format!("{at}.value: {value:?}: {e}"))?,
                ),
                other => {
                    return Err(format!(
                        "{at}.type: {other:?} is not Exact, PathPrefix or RegularExpression"
                    ))
                }
            }
        }
    };
    let method = match text(m, "method", path)? {
        None => None,
        Some(method) if METHODS.contains(&method) => Some(method.to_owned()),
        Some(other) => {
            return Err(format!(
                "{path}.method: {other:?} is not one of {METHODS:?}"
            ))
        }
    };
    let mut headers = Vec::new();
    for (k, h) in list(m.get("headers"), &format!("{path}.headers"), MAX_CONDITIONS)?
        .iter()
        .enumerate()
    {
        headers.push(header_match(h, &format!("{path}.headers[{k}]"), &headers)?);
    }
    let mut query = Vec::new();
    for (k, q) in list(
        m.get("queryParams"),
        &format!("{path}.queryParams"),
        MAX_CONDITIONS,
    )?
    .iter()
    .enumerate()
    {
        let at = format!("{path}.queryParams[{k}]");
        let (name, value) = condition(q, &at)?;
        if query.iter().any(|q: &QueryMatch| q.name == name) {
            return Err(format!("{at}.name: {name:?} is matched twice"));
        }
        query.push(QueryMatch { name, value });
    }
    Ok(RouteMatch {
        path: Some(path_match),
        method,
        headers,
        query,
        authority: None,
    })
}

/// A GRPCRoute `matches[]` entry: its `method` as a path match, its headers.
fn grpc_match(m: &Value, path: &str) -> Result<RouteMatch, String> {
    let path_match = match m.get("method").filter(|v| !v.is_null()) {
        None => PathMatch::Prefix("/".into()),
        Some(method) => {
            let at = format!("{path}.method");
            let service = text(method, "service", &at)?.filter(|s| !s.is_empty());
            let name = text(method, "method", &at)?.filter(|s| !s.is_empty());
            match text(method, "type", &at)?.unwrap_or("Exact") {
                "Exact" => {
                    for (field, value) in [("service", service), ("method", name)] {
                        if let Some(v) = value {
                            if !v
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"._".contains(&b))
                            {
                                return Err(format!("{at}.{field}: {v:?} is not a gRPC name"));
                            }
                        }
                    }
                    match (service, name) {
                        (Some(s), Some(n)) => PathMatch::Exact(format!("/{s}/{n}")),
                        (Some(s), None) => PathMatch::Prefix(format!("/{s}")),
                        (None, Some(n)) => PathMatch::Regex(
                            Anchored::new(&format!("/[^/]+/{}", regex::escape(n)))
                                .map_err(|e| format!("{at}.method: {e}"))?,
                        ),
                        (None, None) => {
                            return Err(format!("{at}: one of service and method is required"))
                        }
                    }
                }
                "RegularExpression" => {
                    if service.is_none() && name.is_none() {
                        return Err(format!("{at}: one of service and method is required"));
                    }
                    let part = |p: Option<&str>, field: &str| -> Result<String, String> {
                        match p {
                            None => Ok("[^/]+".to_owned()),
                            Some(p) => Anchored::new(p)
                                .map(|_| format!("(?:{p})"))
                                .map_err(|e| format!("{at}.{field}: {p:?}: {e}")),
                        }
                    };
                    let pattern =
                        format!("/{}/{}", part(service, "service")?, part(name, "method")?);
                    PathMatch::Regex(Anchored::new(&pattern).map_err(|e| format!("{at}: {e}"))?)
                }
                other => {
                    return Err(format!(
                        "{at}.type: {other:?} is not Exact or RegularExpression"
                    ))
                }
            }
        }
    };
    let mut headers = Vec::new();
    for (k, h) in list(m.get("headers"), &format!("{path}.headers"), MAX_CONDITIONS)?
        .iter()
        .enumerate()
    {
        headers.push(header_match(h, &format!("{path}.headers[{k}]"), &headers)?);
    }
    Ok(RouteMatch {
        path: Some(path_match),
        method: None,
        headers,
        query: Vec::new(),
        authority: None,
    })
}

/// A header match; `seen` are the match's earlier ones (a name may appear once).
fn header_match(h: &Value, at: &str, seen: &[HeaderMatch]) -> Result<HeaderMatch, String> {
    let (name, value) = condition(h, at)?;
    http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{at}.name: {name:?} is not a valid header name"))?;
    let name = name.to_ascii_lowercase();
    if seen.iter().any(|h| h.name == name) {
        return Err(format!("{at}.name: {name:?} is matched twice"));
    }
    Ok(HeaderMatch { name, value })
}

/// A header or query parameter match: its name and how its value is matched.
fn condition(c: &Value, path: &str) -> Result<(String, ValueMatch), String> {
    let name = match text(c, "name", path)? {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => return Err(format!("{path}.name: is required")),
    };
    let value = text(c, "value", path)?.ok_or_else(|| format!("{path}.value: is required"))?;
    let value = match text(c, "type", path)?.unwrap_or("Exact") {
        "Exact" => ValueMatch::Exact(value.to_owned()),
        "RegularExpression" => ValueMatch::Regex(
            Anchored::new(value).map_err(|e| format!("{path}.value: {value:?}: {e}"))?,
        ),
        other => {
            return Err(format!(
                "{path}.type: {other:?} is not Exact or RegularExpression"
            ))
        }
    };
    Ok((name, value))
}

/// The CRD's rules for `Exact` and `PathPrefix` values.
pub(crate) fn check_path(value: &str) -> Result<(), &'static str> {
    if !value.starts_with('/') {
        return Err("must be an absolute path");
    }
    if value.contains("//") {
        return Err("must not contain '//'");
    }
    if value.ends_with("/..")
        || value.ends_with("/.")
        || value.contains("/../")
        || value.contains("/./")
    {
        return Err("must not contain '/./' or '/../'");
    }
    if value.to_ascii_lowercase().contains("%2f") {
        return Err("must not contain an encoded '/'");
    }
    if value.contains(['?', '#']) {
        return Err("must not contain '?' or '#'");
    }
    Ok(())
}

fn backend(b: &Value, path: &str, key: &ObjectKey) -> Result<Backend, String> {
    let group = text(b, "group", path)?.unwrap_or("");
    let kind = text(b, "kind", path)?.unwrap_or("Service");
    if !matches!((group, kind), ("" | "core", "Service")) {
        return Err(format!(
            "{path}: {group}/{kind} backends are not supported by Ambit yet"
        ));
    }
    if b.get("filters").is_some_and(|v| !v.is_null()) {
        return Err(format!("{path}.filters: not supported by Ambit yet"));
    }
    let name = match text(b, "name", path)? {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => return Err(format!("{path}.name: is required")),
    };
    let namespace = text(b, "namespace", path)?
        .filter(|n| !n.is_empty())
        .unwrap_or(&key.namespace)
        .to_owned();
    let port = port(b, path)?.ok_or_else(|| format!("{path}.port: is required for a Service"))?;
    let weight = number(b, "weight", path, MAX_WEIGHT)?.unwrap_or(1);
    Ok(Backend {
        namespace,
        name,
        port: Some(port),
        weight: u32::try_from(weight).unwrap_or(u32::MAX),
        subset: None,
    })
}

pub(crate) mod filters;

#[cfg(test)]
mod tests;
