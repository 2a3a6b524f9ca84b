//! Which HTTPRoute rule a request takes at a waypoint, and which backend of it: the
//! Gateway API's semantics as Istio implements them for waypoints (reference §3.3,
//! item 5), as pure functions. Randomness is an input, so a weighted split is tested
//! exactly.
//!
//! **Matching.** A rule matches when any of its matches does (none written: the rule
//! matches everything, as the CRD's default `PathPrefix /`); a match needs every one of
//! its conditions: the path (`Exact`; `PathPrefix` by whole segments, so `/foo` takes
//! `/foo`, `/foo/` and `/foo/bar` but not `/foobar`, a trailing `/` in the prefix being
//! ignored; `RegularExpression` on the whole path), the method, every header (name
//! case-insensitive, `Exact` or `RegularExpression` on the value; the first value of a
//! repeated header) and every query parameter (`Exact` or `RegularExpression`, name
//! case-sensitive, the first occurrence).
//!
//! **Precedence** across every route bound to the same Service, as Istio orders them:
//! path kind (`Exact` > `PathPrefix` > `RegularExpression` > none), then the longer path
//! value, then a match with a method over one without, then more header matches, then
//! more query matches; ties go to the older route (creation time), then to the route
//! first by `namespace/name`, then to the rule and match written first.
//!
//! **VirtualServices** (Istio's `networking.istio.io`, read into the same rules with
//! `virtual_service` set) keep their own order instead: rules in the order written,
//! the first that matches taking the request, routes ordered by creation time then
//! `namespace/name`. A VirtualService's `uri.prefix` is a plain string prefix
//! ([`PathMatch::StartsWith`]), its string matches may be prefixes
//! ([`ValueMatch::Prefix`]) and it may match the authority. A Service that an
//! HTTPRoute applies to is routed by its HTTPRoutes alone (the model leaves its
//! VirtualServices out), as Istio's waypoints do.
//!
//! **Backends.** A rule's `backendRefs` split traffic by weight (default 1). A rule
//! without backends, or whose weights are all 0, answers 500; so does the share of a
//! backend that does not exist (the caller knows which exist).

mod fault;
mod filter;

use std::sync::Arc;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub use fault::{grpc_code, Abort, AbortWith, Delay, Fault, Injected, ALL_PPM};
pub use filter::{
    shadow_authority, split_host_port, Filters, HeaderModifier, Mirror, PathModifier, Redirect,
    RedirectFrom, Rewrite,
};

/// One HTTPRoute as the waypoint reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    pub namespace: String,
    pub name: String,
    /// Creation time, seconds since the epoch: the older route wins a tie.
    pub created: i64,
    pub rules: Vec<RouteRule>,
    /// A GRPCRoute (its method matches already paths); an HTTPRoute otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grpc: bool,
    /// An Istio VirtualService: its rules keep the order written (first match wins).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub virtual_service: bool,
}

impl HttpRoute {
    /// `HTTPRoute` or `GRPCRoute`, as in `kind:`.
    pub fn kind(&self) -> &'static str {
        if self.virtual_service {
            "VirtualService"
        } else if self.grpc {
            "GRPCRoute"
        } else {
            "HTTPRoute"
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    /// Any of them; none means every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Backend>,
    /// `timeouts.request`, milliseconds: the whole request, from when the waypoint has
    /// it until the upstream's response headers (504 `UT` after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout_ms: Option<u64>,
    /// `timeouts.backendRequest`, milliseconds: one try at the backend (a try that
    /// runs out may be retried, within `request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_timeout_ms: Option<u64>,
    /// `filters`: header modifiers, redirect, rewrite, mirrors.
    #[serde(default, skip_serializing_if = "Filters::is_empty")]
    pub filters: Filters,
    /// `retry`; `None`: the mesh's default retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RouteRetry>,
    /// A VirtualService's `fault`: delays and aborts injected before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
}

/// An HTTPRoute rule's `retry`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRetry {
    /// Retries after the first try.
    pub attempts: u32,
    /// HTTP statuses retried.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
    /// A VirtualService's `retries.retryOn`, as Istio writes it (`5xx`, `reset`,
    /// `503`, ...); `None`: an HTTPRoute's `retry` (connection failures and `codes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<String>>,
}

impl RouteRetry {
    pub fn policy(&self) -> crate::retry::RetryPolicy {
        let backoff = self.backoff_ms.map(std::time::Duration::from_millis);
        match &self.retry_on {
            None => {
                crate::retry::RetryPolicy::from_route(self.attempts, self.codes.clone(), backoff)
            }
            // Checked when the VirtualService was read; a value that is not valid
            // anyway (from the wire) retries nothing rather than guessing.
            Some(on) => crate::retry::RetryPolicy::from_retry_on(self.attempts, on)
                .unwrap_or_else(|_| crate::retry::RetryPolicy::from_route(0, Vec::new(), None)),
        }
    }
}

impl RouteRule {
    /// Every Service the rule refers to: its backends, then its mirrors'.
    pub fn referenced(&self) -> impl Iterator<Item = &Backend> {
        self.backends
            .iter()
            .chain(self.filters.mirrors.iter().map(|m| &m.backend))
    }

    /// How long the waypoint waits for the upstream's response headers; `None`: no
    /// limit of the route's own.
    pub fn timeout(&self) -> Option<std::time::Duration> {
        match (self.request_timeout_ms, self.backend_timeout_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(std::time::Duration::from_millis)
    }
}

/// One `matches[]` entry: all of its conditions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Upper case, as HTTP methods are written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<QueryMatch>,
    /// A VirtualService's `authority` match, against `:authority` (or `Host`) as
    /// received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<ValueMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum PathMatch {
    Exact(String),
    /// Without its trailing `/` (except the root itself).
    Prefix(String),
    /// Anchored: it must match the whole path.
    Regex(Anchored),
    /// A VirtualService's `uri.prefix`: any path that starts with it, segments or
    /// not (`/api` takes `/apiv2`).
    StartsWith(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// Lower case.
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueryMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type", content = "value")]
pub enum ValueMatch {
    Exact(String),
    Regex(Anchored),
    /// A VirtualService's `prefix`.
    Prefix(String),
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::Regex(r) => r.is_match(value),
            ValueMatch::Prefix(p) => value.starts_with(p.as_str()),
        }
    }
}

/// A regular expression that must match the whole input, as the Gateway API's
/// `RegularExpression` (and Envoy's `safe_regex`) means.
#[derive(Debug, Clone)]
pub struct Anchored {
    /// As written, for lengths, messages and configuration dumps.
    pub source: String,
    regex: Regex,
}

impl Anchored {
    /// Compiles `source`; the error says what is wrong with it. Sizes are bounded so a
    /// hostile pattern cannot take the proxy's memory.
    pub fn new(source: &str) -> Result<Anchored, String> {
        let build = |pattern: &str| {
            regex::RegexBuilder::new(pattern)
                .size_limit(1 << 20)
                .dfa_size_limit(1 << 20)
                .build()
                .map_err(|e| match e {
                    regex::Error::CompiledTooBig(_) => "too large once compiled".to_owned(),
                    other => other.to_string(),
                })
        };
        // As written first, so an error shows the user's own pattern.
        build(source)?;
        let regex = build(&format!("^(?:{source})$"))?;
        Ok(Anchored {
            source: source.to_owned(),
            regex,
        })
    }

    pub fn is_match(&self, s: &str) -> bool {
        self.regex.is_match(s)
    }
}

impl PartialEq for Anchored {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Anchored {}

/// Written as its source; read by compiling it again, so a pattern that arrives
/// (from YAML or the wire) is checked exactly as one written in a route.
impl Serialize for Anchored {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Anchored {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = String::deserialize(deserializer)?;
        Anchored::new(&source)
            .map_err(|e| serde::de::Error::custom(format!("regex {source:?}: {e}")))
    }
}

/// A `backendRefs[]` entry: a Service (or ServiceEntry) by name in a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    pub namespace: String,
    pub name: String,
    /// `None`: the port the request was addressed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub weight: u32,
    /// A DestinationRule subset of the Service (a VirtualService's
    /// `destination.subset`); `None`: all of its endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
}

/// What a request offers to matching. The path is the request target's path (before
/// `?`), the query the part after it, undecoded.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    /// `:authority` or `Host`, as received.
    pub authority: &'a str,
}

/// Every rule of every route bound to one Service, in precedence order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Arc<HttpRoute>>,
    /// `(route index, rule index, match index or None for "matches everything")`.
    order: Vec<(usize, usize, Option<usize>)>,
}

impl RouteTable {
    pub fn new(routes: Vec<HttpRoute>) -> RouteTable {
        let routes: Vec<Arc<HttpRoute>> = routes.into_iter().map(Arc::new).collect();
        let mut order = Vec::new();
        for (r, route) in routes.iter().enumerate() {
            for (i, rule) in route.rules.iter().enumerate() {
                if rule.matches.is_empty() {
                    order.push((r, i, None));
                }
                for m in 0..rule.matches.len() {
                    order.push((r, i, Some(m)));
                }
            }
        }
        let key = |&(r, i, m): &(usize, usize, Option<usize>)| {
            let route = &routes[r];
            let m = m.map(|m| &route.rules[i].matches[m]);
            // A VirtualService's rules have no precedence but their order.
            let rank = if route.virtual_service {
                MatchRank::WRITTEN
            } else {
                m.map_or(MatchRank::EVERYTHING, MatchRank::of)
            };
            (rank, route.created)
        };
        order.sort_by(|a, b| {
            let (rank_a, created_a) = key(a);
            let (rank_b, created_b) = key(b);
            rank_b
                .cmp(&rank_a)
                .then(created_a.cmp(&created_b))
                .then_with(|| {
                    let (ra, rb) = (&routes[a.0], &routes[b.0]);
                    (ra.namespace.as_str(), ra.name.as_str())
                        .cmp(&(rb.namespace.as_str(), rb.name.as_str()))
                })
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
        });
        RouteTable { routes, order }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The rule `request` takes, with its route; `None`: no rule matches (the caller
    /// answers 404, as Envoy does when a route table has no match).
    pub fn select(&self, request: &RequestView<'_>) -> Option<Selected<'_>> {
        self.order.iter().find_map(|&(r, i, m)| {
            let route = &self.routes[r];
            let rule = &route.rules[i];
            let hit = match m {
                None => true,
                Some(m) => rule.matches[m].matches(request),
            };
            hit.then(|| Selected {
                route: route.as_ref(),
                rule,
                matched_prefix: match m {
                    // No matches written: `PathPrefix /`.
                    None => Some("/"),
                    Some(m) => match &rule.matches[m].path {
                        Some(PathMatch::Prefix(p) | PathMatch::StartsWith(p)) => Some(p.as_str()),
                        // A VirtualService's `rewrite.uri` replaces what matched: the
                        // whole path, for an exact match.
                        Some(PathMatch::Exact(p)) if route.virtual_service => Some(p.as_str()),
                        _ => None,
                    },
                },
            })
        })
    }
}

/// The rule a request takes.
#[derive(Debug, Clone, Copy)]
pub struct Selected<'a> {
    pub route: &'a HttpRoute,
    pub rule: &'a RouteRule,
    /// The `PathPrefix` the request matched, for `ReplacePrefixMatch`.
    pub matched_prefix: Option<&'a str>,
}

/// The precedence of one match; greater goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct MatchRank {
    /// Exact 3, PathPrefix 2, RegularExpression 1, no path 0.
    kind: u8,
    length: usize,
    method: bool,
    headers: usize,
    query: usize,
}

impl MatchRank {
    /// A rule with no matches is `PathPrefix /` (the CRD's default).
    const EVERYTHING: MatchRank = MatchRank {
        kind: 2,
        length: 1,
        method: false,
        headers: 0,
        query: 0,
    };

    /// Every rule of a VirtualService: only the order written separates them.
    const WRITTEN: MatchRank = MatchRank {
        kind: 0,
        length: 0,
        method: false,
        headers: 0,
        query: 0,
    };

    fn of(m: &RouteMatch) -> MatchRank {
        let (kind, length) = match &m.path {
            Some(PathMatch::Exact(p)) => (3, p.len()),
            // Compared as written: `/` is one character, `/foo` four.
            Some(PathMatch::Prefix(p)) => (2, p.len().max(1)),
            Some(PathMatch::Regex(r)) => (1, r.source.len()),
            // Only in VirtualServices, which are not ranked.
            Some(PathMatch::StartsWith(p)) => (2, p.len()),
            None => (0, 0),
        };
        MatchRank {
            kind,
            length,
            method: m.method.is_some(),
            headers: m.headers.len(),
            query: m.query.len(),
        }
    }
}

impl RouteMatch {
    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        let path = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => request.path == p,
            Some(PathMatch::Prefix(p)) => prefix_matches(p, request.path),
            Some(PathMatch::Regex(r)) => r.is_match(request.path),
            Some(PathMatch::StartsWith(p)) => request.path.starts_with(p.as_str()),
        };
        path && self.method.as_deref().is_none_or(|m| m == request.method)
            && self.headers.iter().all(|h| {
                request
                    .headers
                    .get(h.name.as_str())
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| h.value.matches(v))
            })
            && self
                .query
                .iter()
                .all(|q| query_value(request.query, &q.name).is_some_and(|v| q.value.matches(v)))
            && self
                .authority
                .as_ref()
                .is_none_or(|a| a.matches(request.authority))
    }
}

/// `PathPrefix` by whole segments; `prefix` is without its trailing `/`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The first value of query parameter `name` (names compared as written).
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// The backend of `rule` a request goes to, by weight, given `random` uniform over
/// `u64`; `None` when it has none or every weight is 0 (the caller answers 500).
pub fn pick_backend(rule: &RouteRule, random: u64) -> Option<&Backend> {
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    // Multiply-shift: uniform over [0, total) without modulo bias worth the name.
    let mut point = ((u128::from(random) * u128::from(total)) >> 64) as u64;
    for backend in &rule.backends {
        let weight = u64::from(backend.weight);
        if point < weight {
            return Some(backend);
        }
        point -= weight;
    }
    None
}

#[cfg(test)]
mod tests;
