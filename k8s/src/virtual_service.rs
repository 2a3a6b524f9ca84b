//! Istio's `VirtualService` (`networking.istio.io`, v1; v1beta1 and v1alpha3 read the
//! same) for mesh traffic, read into the same routing as an HTTPRoute
//! ([`ambit_core::route::HttpRoute`] with `virtual_service` set: rules in the order
//! written, the first match winning).
//!
//! `hosts` name the Services it routes (`reviews`, `reviews.shop`,
//! `reviews.shop.svc`, `reviews.shop.svc.<domain>`); a VirtualService whose
//! `gateways` do not include `mesh` is for ingress gateways and is not read here. Its
//! `http` routes carry `match` (`uri`, `headers`, `queryParams` with `exact`, `prefix`
//! or `regex`; `method` exact; `authority`; `ignoreUriCase`), `route` (weighted
//! destinations with `subset` and `port`), `redirect`, `rewrite`, `timeout`,
//! `retries` (`attempts`, `perTryTimeout`, `retryOn`), `fault` (`delay`, `abort`),
//! `headers` (request and response `set`/`add`/`remove`), `mirror`,
//! `mirrorPercentage` and `mirrors`.
//!
//! As with an HTTPRoute, a field that cannot be enforced as written is refused with
//! its path (`spec.http[0].corsPolicy: not supported by Ambit yet`) rather than
//! ignored, and the caller keeps the last good routing: `tcp` and `tls` routes,
//! `delegate`, `directResponse`, `corsPolicy`, `uriRegexRewrite`, and the match
//! fields `withoutHeaders`, `sourceLabels`, `sourceNamespace`, `port`, `scheme`.

use ambit_core::route::{
    Abort, Anchored, Backend, Delay, Fault, Filters, HeaderMatch, HeaderModifier,
    HttpRoute as Route, Mirror, PathMatch, PathModifier, QueryMatch, Redirect, Rewrite, RouteMatch,
    RouteRetry, RouteRule, ValueMatch, ALL_PPM,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::http_route::filters::{header_name, hostname};
use crate::http_route::{check_path, list, number, text};
use crate::resources::ObjectKey;
use crate::service_entry::GROUP;

/// The versions a VirtualService may be written in (one schema; v1 is stored).
pub const API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

const MAX_HOSTS: usize = 64;
const MAX_ROUTES: usize = 128;
const MAX_MATCHES: usize = 64;
const MAX_DESTINATIONS: usize = 64;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VirtualService {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
}

resource!(VirtualService, GROUP, "VirtualService", "virtualservices");

/// A `hosts` entry: a Service of the cluster (by name in a namespace), or a host
/// that is not one (a ServiceEntry's, or outside the mesh).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VsHost {
    Service { namespace: String, name: String },
    Other(String),
}

/// A VirtualService read.
#[derive(Debug, Clone)]
pub struct ReadVirtualService {
    /// Its `hosts`.
    pub hosts: Vec<VsHost>,
    /// `false`: its `gateways` leave out `mesh`, so it is for ingress only.
    pub for_mesh: bool,
    /// `Err`: why it cannot be enforced, naming the field.
    pub route: Result<Route, String>,
}

/// Reads `vs` (its key, creation time and spec).
pub fn read(key: &ObjectKey, vs: &VirtualService) -> ReadVirtualService {
    let created = vs
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second());
    let spec = &vs.spec;
    let hosts = match hosts(spec, key) {
        Ok(h) => h,
        Err(e) => {
            return ReadVirtualService {
                hosts: Vec::new(),
                for_mesh: true,
                route: Err(e),
            }
        }
    };
    let for_mesh = match gateways(spec.get("gateways"), "spec.gateways") {
        Ok(g) => g,
        Err(e) => {
            return ReadVirtualService {
                hosts,
                for_mesh: true,
                route: Err(e),
            }
        }
    };
    let route = rules(spec, key).map(|rules| Route {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        created,
        rules,
        grpc: false,
        virtual_service: true,
    });
    ReadVirtualService {
        hosts,
        for_mesh,
        route,
    }
}

/// A host as the Service it names, relative to `namespace`: `name`, `name.ns`,
/// `name.ns.svc` or `name.ns.svc.<domain>`.
fn service_host(host: &str, namespace: &str) -> VsHost {
    let parts: Vec<&str> = host.split('.').collect();
    let dns_label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    match parts.as_slice() {
        [name] if dns_label(name) => VsHost::Service {
            namespace: namespace.to_owned(),
            name: (*name).to_owned(),
        },
        [name, ns] | [name, ns, "svc", ..] if dns_label(name) && dns_label(ns) => VsHost::Service {
            namespace: (*ns).to_owned(),
            name: (*name).to_owned(),
        },
        _ => VsHost::Other(host.to_owned()),
    }
}

fn hosts(spec: &Value, key: &ObjectKey) -> Result<Vec<VsHost>, String> {
    let items = list(spec.get("hosts"), "spec.hosts", MAX_HOSTS)?;
    if items.is_empty() {
        return Err("spec.hosts: at least one host is required".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let at = format!("spec.hosts[{i}]");
            let h = h
                .as_str()
                .ok_or_else(|| format!("{at}: must be a string"))?;
            if h.contains('*') {
                return Err(format!(
                    "{at}: wildcard host {h:?} is not supported by Ambit yet"
                ));
            }
            if h.is_empty() || h.len() > 253 {
                return Err(format!("{at}: {h:?} is not a hostname"));
            }
            Ok(service_host(h, &key.namespace))
        })
        .collect()
}

/// Whether `gateways` include `mesh` (none written: only `mesh`).
fn gateways(g: Option<&Value>, at: &str) -> Result<bool, String> {
    let items = list(g, at, MAX_HOSTS)?;
    if items.is_empty() {
        return Ok(true);
    }
    let mut mesh = false;
    for (i, g) in items.iter().enumerate() {
        let g = g
            .as_str()
            .ok_or_else(|| format!("{at}[{i}]: must be a string"))?;
        mesh |= g == "mesh";
    }
    Ok(mesh)
}

/// Refuses fields outside `known`, naming the first.
fn only(value: &Value, known: &[&str], at: &str) -> Result<(), String> {
    let Some(object) = value.as_object() else {
        return Err(format!("{at}: must be an object"));
    };
    for field in object.keys() {
        if !known.contains(&field.as_str()) {
            return Err(format!("{at}.{field}: not supported by Ambit yet"));
        }
    }
    Ok(())
}

fn rules(spec: &Value, key: &ObjectKey) -> Result<Vec<RouteRule>, String> {
    only(
        spec,
        &["hosts", "gateways", "http", "exportTo", "tcp", "tls"],
        "spec",
    )?;
    for kind in ["tcp", "tls"] {
        if !list(spec.get(kind), &format!("spec.{kind}"), MAX_ROUTES)?.is_empty() {
            return Err(format!(
                "spec.{kind}: {kind} routes are not supported by Ambit yet"
            ));
        }
    }
    let mut out = Vec::new();
    for (i, http) in list(spec.get("http"), "spec.http", MAX_ROUTES)?
        .iter()
        .enumerate()
    {
        let at = format!("spec.http[{i}]");
        if let Some(rule) = rule(http, &at, key)? {
            out.push(rule);
        }
    }
    Ok(out)
}

/// One `http` route; `None` when every one of its matches is for gateways only.
fn rule(http: &Value, at: &str, key: &ObjectKey) -> Result<Option<RouteRule>, String> {
    only(
        http,
        &[
            "name",
            "match",
            "route",
            "redirect",
            "rewrite",
            "timeout",
            "retries",
            "fault",
            "mirror",
            "mirrorPercentage",
            "mirror_percent",
            "mirrors",
            "headers",
        ],
        at,
    )?;
    let written = list(http.get("match"), &format!("{at}.match"), MAX_MATCHES)?;
    let mut matches = Vec::new();
    for (i, m) in written.iter().enumerate() {
        if let Some(m) = route_match(m, &format!("{at}.match[{i}]"))? {
            matches.push(m);
        }
    }
    if !written.is_empty() && matches.is_empty() {
        return Ok(None);
    }
    // A match without `uri` takes any path: written as the prefix `/`, so a
    // `rewrite.uri` replaces that, as Envoy's prefix rewrite does.
    if matches.is_empty() {
        matches.push(RouteMatch::default());
    }
    for m in &mut matches {
        m.path
            .get_or_insert_with(|| PathMatch::StartsWith("/".into()));
    }
    let destinations = list(http.get("route"), &format!("{at}.route"), MAX_DESTINATIONS)?;
    let redirect = http
        .get("redirect")
        .map(|r| redirect(r, &format!("{at}.redirect")))
        .transpose()?;
    if redirect.is_some() && !destinations.is_empty() {
        return Err(format!(
            "{at}: a route may have `route` or `redirect`, not both"
        ));
    }
    if redirect.is_none() && destinations.is_empty() {
        return Err(format!(
            "{at}.route: a route needs a destination (or a redirect)"
        ));
    }
    let mut backends = Vec::new();
    let single = destinations.len() == 1;
    for (i, d) in destinations.iter().enumerate() {
        let at = format!("{at}.route[{i}]");
        only(d, &["destination", "weight"], &at)?;
        let weight = match number(d, "weight", &at, 1_000_000)? {
            Some(w) => w,
            None if single => 100,
            None => 0,
        };
        let dest = d
            .get("destination")
            .ok_or_else(|| format!("{at}.destination: is required"))?;
        let mut backend = destination(dest, &format!("{at}.destination"), key)?;
        backend.weight = u32::try_from(weight).unwrap_or(u32::MAX);
        backends.push(backend);
    }
    if !destinations.is_empty() && backends.iter().all(|b| b.weight == 0) {
        return Err(format!("{at}.route: every weight is 0"));
    }
    let rewrite = http
        .get("rewrite")
        .map(|r| rewrite(r, &format!("{at}.rewrite"), &matches))
        .transpose()?;
    let (request_headers, response_headers) = match http.get("headers") {
        None | Some(Value::Null) => (None, None),
        Some(h) => {
            let at = format!("{at}.headers");
            only(h, &["request", "response"], &at)?;
            (
                h.get("request")
                    .map(|m| header_operations(m, &format!("{at}.request")))
                    .transpose()?,
                h.get("response")
                    .map(|m| header_operations(m, &format!("{at}.response")))
                    .transpose()?,
            )
        }
    };
    let mut mirrors = Vec::new();
    if let Some(m) = http.get("mirror") {
        let share = match (http.get("mirrorPercentage"), http.get("mirror_percent")) {
            (Some(p), _) => percentage(p, &format!("{at}.mirrorPercentage"))?,
            (None, Some(_)) => {
                return Err(format!(
                    "{at}.mirror_percent: deprecated; use mirrorPercentage"
                ))
            }
            (None, None) => ALL_PPM,
        };
        let mut backend = destination(m, &format!("{at}.mirror"), key)?;
        backend.weight = 1;
        mirrors.push(Mirror {
            backend,
            share_ppm: share,
        });
    }
    for (i, m) in list(
        http.get("mirrors"),
        &format!("{at}.mirrors"),
        MAX_DESTINATIONS,
    )?
    .iter()
    .enumerate()
    {
        let at = format!("{at}.mirrors[{i}]");
        only(m, &["destination", "percentage"], &at)?;
        let dest = m
            .get("destination")
            .ok_or_else(|| format!("{at}.destination: is required"))?;
        let mut backend = destination(dest, &format!("{at}.destination"), key)?;
        backend.weight = 1;
        let share = match m.get("percentage") {
            Some(p) => percentage(p, &format!("{at}.percentage"))?,
            None => ALL_PPM,
        };
        mirrors.push(Mirror {
            backend,
            share_ppm: share,
        });
    }
    let timeout = match text(http, "timeout", at)? {
        None => None,
        Some(t) => match duration_ms(t) {
            Ok(0) => None,
            Ok(ms) => Some(ms),
            Err(e) => return Err(format!("{at}.timeout: {t:?} {e}")),
        },
    };
    let (retry, per_try) = match http.get("retries") {
        None | Some(Value::Null) => (None, None),
        Some(r) => retries(r, &format!("{at}.retries"))?,
    };
    let fault = http
        .get("fault")
        .map(|f| fault(f, &format!("{at}.fault")))
        .transpose()?;
    Ok(Some(RouteRule {
        matches,
        backends,
        request_timeout_ms: timeout,
        backend_timeout_ms: per_try,
        filters: Filters {
            request_headers,
            response_headers,
            redirect,
            rewrite,
            mirrors,
        },
        retry,
        fault,
    }))
}

/// One `match` entry; `None` when its `gateways` leave out `mesh`.
fn route_match(m: &Value, at: &str) -> Result<Option<RouteMatch>, String> {
    only(
        m,
        &[
            "name",
            "uri",
            "method",
            "authority",
            "headers",
            "queryParams",
            "ignoreUriCase",
            "gateways",
        ],
        at,
    )?;
    if !gateways(m.get("gateways"), &format!("{at}.gateways"))? {
        return Ok(None);
    }
    let ignore_case = match m.get("ignoreUriCase") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(format!("{at}.ignoreUriCase: must be true or false")),
    };
    let path = match m.get("uri") {
        None | Some(Value::Null) => None,
        Some(u) => {
            let at = format!("{at}.uri");
            let path = match string_match(u, &at)? {
                ValueMatch::Exact(p) => {
                    check_path(&p).map_err(|e| format!("{at}.exact: {p:?} {e}"))?;
                    PathMatch::Exact(p)
                }
                ValueMatch::Prefix(p) => {
                    if !p.starts_with('/') {
                        return Err(format!("{at}.prefix: {p:?} must start with '/'"));
                    }
                    PathMatch::StartsWith(p)
                }
                ValueMatch::Regex(r) => PathMatch::Regex(r),
            };
            Some(if ignore_case {
                case_insensitive(path, &at)?
            } else {
                path
            })
        }
    };
    let method = match m.get("method") {
        None | Some(Value::Null) => None,
        Some(v) => match string_match(v, &format!("{at}.method"))? {
            ValueMatch::Exact(method) if !method.is_empty() => Some(method),
            _ => {
                return Err(format!(
                    "{at}.method: only `exact` is supported by Ambit yet"
                ))
            }
        },
    };
    let authority = m
        .get("authority")
        .filter(|v| !v.is_null())
        .map(|v| string_match(v, &format!("{at}.authority")))
        .transpose()?;
    let mut headers = Vec::new();
    if let Some(h) = m.get("headers").filter(|v| !v.is_null()) {
        let object = h
            .as_object()
            .ok_or_else(|| format!("{at}.headers: must be a map"))?;
        if object.len() > MAX_HEADERS {
            return Err(format!("{at}.headers: at most {MAX_HEADERS} entries"));
        }
        for (name, v) in object {
            let at = format!("{at}.headers.{name}");
            let lower = name.to_ascii_lowercase();
            if http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
                return Err(format!("{at}: {name:?} is not a valid header name"));
            }
            headers.push(HeaderMatch {
                name: lower,
                value: string_match(v, &at)?,
            });
        }
    }
    let mut query = Vec::new();
    if let Some(q) = m.get("queryParams").filter(|v| !v.is_null()) {
        let object = q
            .as_object()
            .ok_or_else(|| format!("{at}.queryParams: must be a map"))?;
        for (name, v) in object {
            query.push(QueryMatch {
                name: name.clone(),
                value: string_match(v, &format!("{at}.queryParams.{name}"))?,
            });
        }
    }
    Ok(Some(RouteMatch {
        path,
        method,
        headers,
        query,
        authority,
    }))
}

/// `ignoreUriCase`: the path match as a case-insensitive regular expression.
fn case_insensitive(path: PathMatch, at: &str) -> Result<PathMatch, String> {
    let source = match &path {
        PathMatch::Exact(p) => format!("(?i){}", regex_syntax_escape(p)),
        PathMatch::StartsWith(p) => format!("(?i){}.*", regex_syntax_escape(p)),
        PathMatch::Regex(r) => format!("(?i)(?:{})", r.source),
        PathMatch::Prefix(_) => return Ok(path),
    };
    Anchored::new(&source)
        .map(PathMatch::Regex)
        .map_err(|e| format!("{at}: {e}"))
}

fn regex_syntax_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// An Istio `StringMatch`: exactly one of `exact`, `prefix`, `regex` (RE2, the whole
/// value). `{}`: any value, as Istio reads an empty match (the header present).
fn string_match(v: &Value, at: &str) -> Result<ValueMatch, String> {
    only(v, &["exact", "prefix", "regex"], at)?;
    let exact = text(v, "exact", at)?;
    let prefix = text(v, "prefix", at)?;
    let regex = text(v, "regex", at)?;
    match (exact, prefix, regex) {
        (Some(e), None, None) => Ok(ValueMatch::Exact(e.to_owned())),
        (None, Some(p), None) => Ok(ValueMatch::Prefix(p.to_owned())),
        (None, None, Some(r)) => Anchored::new(r)
            .map(ValueMatch::Regex)
            .map_err(|e| format!("{at}.regex: {r:?} is not a valid regular expression: {e}")),
        (None, None, None) => Anchored::new(".*").map(ValueMatch::Regex),
        _ => Err(format!(
            "{at}: only one of exact, prefix and regex may be set"
        )),
    }
}

/// A `destination` (or `mirror`): `host`, `subset`, `port.number`.
fn destination(d: &Value, at: &str, key: &ObjectKey) -> Result<Backend, String> {
    only(d, &["host", "subset", "port"], at)?;
    let host = text(d, "host", at)?
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{at}.host: is required"))?;
    let (namespace, name) = match service_host(host, &key.namespace) {
        VsHost::Service { namespace, name } => (namespace, name),
        VsHost::Other(h) => {
            return Err(format!(
                "{at}.host: {h:?} is not a Service of this cluster; ServiceEntry destinations are not supported by Ambit yet"
            ))
        }
    };
    let subset = text(d, "subset", at)?
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let port = match d.get("port") {
        None | Some(Value::Null) => None,
        Some(p) => {
            let at = format!("{at}.port");
            only(p, &["number"], &at)?;
            match number(p, "number", &at, 65535)? {
                None => None,
                Some(0) => return Err(format!("{at}.number: 0 is not between 1 and 65535")),
                Some(n) => Some(u16::try_from(n).unwrap_or(u16::MAX)),
            }
        }
    };
    Ok(Backend {
        namespace,
        name,
        port,
        weight: 0,
        subset,
    })
}

/// A `Percent` (`{value: 12.5}`) in millionths.
fn percentage(p: &Value, at: &str) -> Result<u32, String> {
    only(p, &["value"], at)?;
    let value = match p.get("value") {
        None | Some(Value::Null) => 0.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(-1.0),
        Some(_) => return Err(format!("{at}.value: must be a number")),
    };
    if !(0.0..=100.0).contains(&value) {
        return Err(format!("{at}.value: {value} is not between 0 and 100"));
    }
    Ok((value * 10_000.0).round() as u32)
}

/// `headers.request` / `headers.response`: `set` and `add` maps, `remove` names.
fn header_operations(m: &Value, at: &str) -> Result<HeaderModifier, String> {
    only(m, &["set", "add", "remove"], at)?;
    let pairs = |field: &str| -> Result<Vec<(String, String)>, String> {
        let at = format!("{at}.{field}");
        let Some(map) = m.get(field).filter(|v| !v.is_null()) else {
            return Ok(Vec::new());
        };
        let map = map
            .as_object()
            .ok_or_else(|| format!("{at}: must be a map"))?;
        if map.len() > MAX_HEADERS {
            return Err(format!("{at}: at most {MAX_HEADERS} entries"));
        }
        map.iter()
            .map(|(name, value)| {
                let at = format!("{at}.{name}");
                let name = header_name(Some(name), &at)?;
                let value = value
                    .as_str()
                    .ok_or_else(|| format!("{at}: must be a string"))?;
                http::HeaderValue::from_str(value)
                    .map_err(|_| format!("{at}: {value:?} is not a valid header value"))?;
                Ok((name, value.to_owned()))
            })
            .collect()
    };
    let set = pairs("set")?;
    let add = pairs("add")?;
    let remove_at = format!("{at}.remove");
    let remove = list(m.get("remove"), &remove_at, MAX_HEADERS)?
        .iter()
        .enumerate()
        .map(|(i, n)| header_name(n.as_str(), &format!("{remove_at}[{i}]")))
        .collect::<Result<_, String>>()?;
    Ok(HeaderModifier { set, add, remove })
}

fn redirect(r: &Value, at: &str) -> Result<Redirect, String> {
    only(
        r,
        &[
            "uri",
            "authority",
            "port",
            "derivePort",
            "scheme",
            "redirectCode",
        ],
        at,
    )?;
    let path = match text(r, "uri", at)? {
        None => None,
        Some(u) => {
            check_path(u).map_err(|e| format!("{at}.uri: {u:?} {e}"))?;
            Some(PathModifier::Full(u.to_owned()))
        }
    };
    let scheme = match text(r, "scheme", at)? {
        None => None,
        Some(s @ ("http" | "https")) => Some(s.to_owned()),
        Some(s) => return Err(format!("{at}.scheme: {s:?} is not http or https")),
    };
    let port = match text(r, "derivePort", at)? {
        Some("FROM_REQUEST_PORT") | None => match number(r, "port", at, 65535)? {
            Some(0) => return Err(format!("{at}.port: 0 is not between 1 and 65535")),
            Some(p) => Some(u16::try_from(p).unwrap_or(u16::MAX)),
            None => None,
        },
        Some("FROM_PROTOCOL_DEFAULT") => Some(if scheme.as_deref() == Some("https") {
            443
        } else {
            80
        }),
        Some(other) => {
            return Err(format!(
                "{at}.derivePort: {other:?} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"
            ))
        }
    };
    let status = match number(r, "redirectCode", at, 999)? {
        None => 301,
        Some(s @ (301 | 302 | 303 | 307 | 308)) => s as u16,
        Some(s) => {
            return Err(format!(
                "{at}.redirectCode: {s} is not one of 301, 302, 303, 307, 308"
            ))
        }
    };
    Ok(Redirect {
        scheme,
        hostname: hostname(text(r, "authority", at)?, &format!("{at}.authority"))?,
        path,
        port,
        status,
    })
}

fn rewrite(r: &Value, at: &str, matches: &[RouteMatch]) -> Result<Rewrite, String> {
    only(r, &["uri", "authority"], at)?;
    let path = match text(r, "uri", at)? {
        None => None,
        Some(u) => {
            if matches
                .iter()
                .any(|m| matches!(m.path, Some(PathMatch::Regex(_))))
            {
                return Err(format!(
                    "{at}.uri: a rewrite of a route matched by a regular expression or with ignoreUriCase needs uriRegexRewrite, which is not supported by Ambit yet"
                ));
            }
            if !u.is_empty() {
                check_path(u).map_err(|e| format!("{at}.uri: {u:?} {e}"))?;
            }
            Some(PathModifier::Prefix(u.to_owned()))
        }
    };
    Ok(Rewrite {
        hostname: hostname(text(r, "authority", at)?, &format!("{at}.authority"))?,
        path,
    })
}

/// `retries`: the policy, and `perTryTimeout` in milliseconds.
fn retries(r: &Value, at: &str) -> Result<(Option<RouteRetry>, Option<u64>), String> {
    only(
        r,
        &[
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retryRemoteLocalities",
            "retryIgnorePreviousHosts",
        ],
        at,
    )?;
    let attempts = number(r, "attempts", at, 100)?.unwrap_or(0) as u32;
    let retry_on: Vec<String> = match text(r, "retryOn", at)? {
        None => Vec::new(),
        Some(s) => s
            .split(',')
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .collect(),
    };
    ambit_core::retry::RetryPolicy::from_retry_on(attempts, &retry_on)
        .map_err(|e| format!("{at}.retryOn: {e}"))?;
    let per_try = match text(r, "perTryTimeout", at)? {
        None => None,
        Some(t) => match duration_ms(t) {
            Ok(0) => None,
            Ok(ms) => Some(ms),
            Err(e) => return Err(format!("{at}.perTryTimeout: {t:?} {e}")),
        },
    };
    Ok((
        Some(RouteRetry {
            attempts,
            codes: Vec::new(),
            backoff_ms: None,
            retry_on: Some(retry_on),
        }),
        per_try,
    ))
}

fn fault(f: &Value, at: &str) -> Result<Fault, String> {
    only(f, &["delay", "abort"], at)?;
    let delay = match f.get("delay") {
        None | Some(Value::Null) => None,
        Some(d) => {
            let at = format!("{at}.delay");
            only(d, &["fixedDelay", "percentage", "percent"], &at)?;
            let fixed = text(d, "fixedDelay", &at)?
                .ok_or_else(|| format!("{at}.fixedDelay: is required"))?;
            let ms = duration_ms(fixed).map_err(|e| format!("{at}.fixedDelay: {fixed:?} {e}"))?;
            if ms == 0 {
                return Err(format!("{at}.fixedDelay: must be at least 1ms"));
            }
            Some(Delay {
                fixed_delay_ms: ms,
                share_ppm: share(d, &at)?,
            })
        }
    };
    let abort = match f.get("abort") {
        None | Some(Value::Null) => None,
        Some(a) => {
            let at = format!("{at}.abort");
            only(
                a,
                &["httpStatus", "grpcStatus", "percentage", "http2Error"],
                &at,
            )?;
            if a.get("http2Error").is_some() {
                return Err(format!("{at}.http2Error: not supported by Ambit yet"));
            }
            let http_status = match number(a, "httpStatus", &at, 999)? {
                None => None,
                Some(s) if (200..600).contains(&s) => Some(s as u16),
                Some(s) => return Err(format!("{at}.httpStatus: {s} is not between 200 and 599")),
            };
            let grpc_status = match text(a, "grpcStatus", &at)? {
                None => None,
                Some(g) => Some(ambit_core::route::grpc_code(g).ok_or_else(|| {
                    format!("{at}.grpcStatus: {g:?} is not a gRPC status name (UNAVAILABLE, ...)")
                })?),
            };
            if http_status.is_some() == grpc_status.is_some() {
                return Err(format!(
                    "{at}: exactly one of httpStatus and grpcStatus is required"
                ));
            }
            Some(Abort {
                http_status,
                grpc_status,
                share_ppm: share(a, &at)?,
            })
        }
    };
    if delay.is_none() && abort.is_none() {
        return Err(format!("{at}: needs a delay or an abort"));
    }
    Ok(Fault { delay, abort })
}

/// A fault's share: `percentage.value`, or the deprecated integer `percent`; neither:
/// no request, as Istio documents.
fn share(v: &Value, at: &str) -> Result<u32, String> {
    match (v.get("percentage"), number(v, "percent", at, 100)?) {
        (Some(p), _) => percentage(p, &format!("{at}.percentage")),
        (None, Some(p)) => Ok(p as u32 * 10_000),
        (None, None) => Ok(0),
    }
}

/// A duration as Istio writes them (`1s`, `0.5s`, `250ms`, `1m`, `1h30m`) in
/// milliseconds; the error says what is wrong.
pub fn duration_ms(s: &str) -> Result<u64, &'static str> {
    if s.is_empty() {
        return Err("is not a duration");
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or("needs a unit (h, m, s, ms, us, ns)")?;
        if digits == 0 {
            return Err("is not a duration");
        }
        let value: f64 = rest[..digits].parse().map_err(|_| "is not a duration")?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1_000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return Err("has a unit that is not h, m, s, ms, us or ns"),
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    if total > 315_576_000_000_000.0 {
        return Err("is too long");
    }
    Ok(total.ceil() as u64)
}

#[cfg(test)]
mod tests;
