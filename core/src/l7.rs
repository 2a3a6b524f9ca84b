//! L7 authorization as a waypoint enforces it: AuthorizationPolicy with every field
//! and `when` key (`../shared/reference/istio-ambient-api.md` §1), decided per HTTP
//! request, and its TCP projection for plain-TCP traffic through the waypoint (§1.7).
//!
//! Evaluation ([`evaluate`], §1.5), over the policies attached to what the request is
//! for:
//! 1. a CUSTOM policy that matches denies: Ambit has no external authorization
//!    provider, and a policy that cannot be enforced fails closed;
//! 2. a DENY policy that matches denies;
//! 3. with no ALLOW policy, the request is allowed;
//! 4. an ALLOW policy that matches allows;
//! 5. otherwise the request is denied.
//!
//! AUDIT policies never decide; dry-run policies are evaluated and reported, never
//! enforced. A denial names the policy and the rule that matched.
//!
//! Matching, as in Istio: a policy matches if any rule does (none: never); a rule if
//! any `from` entry, any `to` entry and every `when` condition match (a missing list:
//! any); an entry if every field it sets does, the values of one field ORed and a
//! `not*` field holding when none of its values match. Identity fields use the
//! sidecar/waypoint forms (§1.4): `namespaces` as `*/ns/<ns>/*` over the identity,
//! service accounts by namespace and name in any trust domain. A peer without an
//! identity, a request without a JWT identity, a missing header and Envoy filter
//! metadata (which nothing in Ambit produces) never satisfy a positive field and
//! always satisfy its negative twin.
//!
//! TCP ([`evaluate_tcp`], [`Policy::tcp_projection`]): on traffic that is not HTTP an
//! ALLOW rule that uses an HTTP-only attribute is dropped (the allow shrinks: fails
//! closed); a DENY, AUDIT or CUSTOM rule ignores its HTTP-only attributes (the deny
//! widens), exactly as Istio's sidecars and waypoints do.
//!
//! Paths are normalized once at the edge ([`normalize_path`]) and only a
//! [`NormalizedPath`] can be matched.
//!
//! Pure: no IO. Reading the Kubernetes fields (and validating them) is
//! `ambit-k8s`'s business; this module only evaluates.

mod condition;
mod path;
mod values;

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use crate::authz::{Action, Cidr, ServiceAccountRef, StringMatch};
use crate::SpiffeId;
pub use condition::{Condition, Values};
pub use path::{normalize_path, NormalizedPath, PathError, PathMatch, PathTemplate};
pub use values::{
    namespace_matches, parse_header_name, parse_service_account, parse_trust_domain, HostMatch,
    RequestPrincipalMatch,
};

/// What the connection carrying a request (or plain TCP) offers to be matched.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The peer's identity from mTLS; `None` for plaintext.
    pub peer: Option<&'a SpiffeId>,
    /// The client's address (`source.ip`, `ipBlocks`): at a waypoint, the client
    /// workload's, as the client's ztunnel reports it (HBONE `forwarded`), not the
    /// ztunnel's own.
    pub source_ip: IpAddr,
    /// The original destination (`destination.ip`).
    pub destination_ip: IpAddr,
    /// The original destination's port (`ports`, `destination.port`): for a waypoint,
    /// the port of the HBONE CONNECT's `:authority`.
    pub destination_port: u16,
    /// The TLS server name the client sent, when the proxy saw one (`connection.sni`).
    pub sni: Option<&'a str>,
}

/// An HTTP request's headers, as the policy reads them. Names are asked for in lower
/// case; an implementation gives every value of that name in order.
pub trait Headers {
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8]));
}

/// A request's headers as hyper holds them.
impl Headers for http::HeaderMap {
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8])) {
        for v in self.get_all(name) {
            f(v.as_bytes());
        }
    }
}

/// `(name, value)` pairs, names compared case-insensitively.
impl Headers for &[(&str, &str)] {
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8])) {
        for (n, v) in self.iter() {
            if n.eq_ignore_ascii_case(name) {
                f(v.as_bytes());
            }
        }
    }
}

/// The request's JWT identity (`requestPrincipals`, `request.auth.*`). Nothing fills
/// it until RequestAuthentication is supported: requests carry `None`, so a policy
/// requiring one never matches positively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestAuth {
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    pub claims: std::collections::BTreeMap<String, Claim>,
}

/// A JWT claim's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    String(String),
    List(Vec<String>),
    Object(std::collections::BTreeMap<String, Claim>),
}

/// What an HTTP request offers to be matched.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub connection: Connection<'a>,
    /// The original client address (`remoteIpBlocks`, `remote.ip`): from
    /// `X-Forwarded-For` when proxies in front are trusted (Istio's
    /// `numTrustedProxies`, 0 by default), else the source address.
    pub remote_ip: IpAddr,
    /// `:authority` or `Host`, as received (a port included).
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a NormalizedPath,
    pub headers: &'a dyn Headers,
    pub auth: Option<&'a RequestAuth>,
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("connection", &self.connection)
            .field("remote_ip", &self.remote_ip)
            .field("host", &self.host)
            .field("method", &self.method)
            .field("path", &self.path)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// One AuthorizationPolicy as a waypoint evaluates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub action: Action,
    /// `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dry_run: bool,
    /// Any one matching makes the policy match; none means it never does.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

fn is_false(b: &bool) -> bool {
    !b
}

/// `from`, `to` and `when`; an empty list places no constraint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rule {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// `from[].source`: every field set must hold. A source with no field set matches
/// everything (the translation refuses one; the TCP projection makes them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// The peer identity without `spiffe://`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<RequestPrincipalMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<RequestPrincipalMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountRef>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountRef>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<Cidr>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_trust_domains: Vec<StringMatch>,
}

/// `to[].operation`: every field set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<HostMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
    /// Case-sensitive.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<PathMatch>,
}

/// The attributes one evaluation reads: a request's, or (`http: None`) a plain TCP
/// connection's, where HTTP-only fields are ignored (only DENY, AUDIT and CUSTOM
/// rules get that far: ALLOW rules using them are dropped first).
#[derive(Clone, Copy)]
struct Attributes<'a> {
    connection: &'a Connection<'a>,
    http: Option<&'a Request<'a>>,
}

/// A positive list: empty places no constraint; else some value must match. `None`
/// (the attribute is missing) never matches a non-empty list.
fn any_of<T>(list: &[T], matches: Option<impl Fn(&T) -> bool>) -> bool {
    list.is_empty() || matches.is_some_and(|m| list.iter().any(m))
}

/// A negative list: no value may match; a missing attribute always passes.
fn none_of<T>(list: &[T], matches: Option<impl Fn(&T) -> bool>) -> bool {
    list.is_empty() || matches.is_none_or(|m| !list.iter().any(m))
}

/// Over an HTTP-only attribute: ignored (true) on TCP.
fn http_field(a: &Attributes<'_>, check: impl Fn(&Request<'_>) -> bool) -> bool {
    a.http.is_none_or(check)
}

fn principal_of(peer: &SpiffeId) -> &str {
    peer.as_str()
        .strip_prefix("spiffe://")
        .unwrap_or(peer.as_str())
}

fn principal_matcher<'p>(peer: Option<&'p SpiffeId>) -> Option<impl Fn(&StringMatch) -> bool + 'p> {
    peer.map(|p| move |m: &StringMatch| m.matches(principal_of(p)))
}

fn namespace_matcher<'p>(peer: Option<&'p SpiffeId>) -> Option<impl Fn(&StringMatch) -> bool + 'p> {
    peer.map(|p| move |m: &StringMatch| namespace_matches(m, p.as_str()))
}

fn account_matcher<'p>(
    peer: Option<&'p SpiffeId>,
) -> Option<impl Fn(&ServiceAccountRef) -> bool + 'p> {
    peer.map(|p| move |sa: &ServiceAccountRef| values::service_account_matches(sa, p))
}

fn trust_domain_matcher<'p>(
    peer: Option<&'p SpiffeId>,
) -> Option<impl Fn(&StringMatch) -> bool + 'p> {
    peer.map(|p| move |m: &StringMatch| m.matches(p.trust_domain()))
}

fn ip_matcher(ip: IpAddr) -> Option<impl Fn(&Cidr) -> bool> {
    Some(move |c: &Cidr| c.contains(ip))
}

fn string_matcher(value: Option<&str>) -> Option<impl Fn(&StringMatch) -> bool + '_> {
    value.map(|v| move |m: &StringMatch| m.matches(v))
}

fn request_principal_matcher<'r>(
    auth: Option<&'r RequestAuth>,
) -> Option<impl Fn(&RequestPrincipalMatch) -> bool + 'r> {
    auth.map(|a| move |m: &RequestPrincipalMatch| m.matches(&a.issuer, &a.subject))
}

impl Source {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        let peer = a.connection.peer;
        let source_ip = a.connection.source_ip;
        any_of(&self.principals, principal_matcher(peer))
            && none_of(&self.not_principals, principal_matcher(peer))
            && any_of(&self.namespaces, namespace_matcher(peer))
            && none_of(&self.not_namespaces, namespace_matcher(peer))
            && any_of(&self.service_accounts, account_matcher(peer))
            && none_of(&self.not_service_accounts, account_matcher(peer))
            && any_of(&self.trust_domains, trust_domain_matcher(peer))
            && none_of(&self.not_trust_domains, trust_domain_matcher(peer))
            && any_of(&self.ip_blocks, ip_matcher(source_ip))
            && none_of(&self.not_ip_blocks, ip_matcher(source_ip))
            && http_field(a, |r| {
                any_of(&self.request_principals, request_principal_matcher(r.auth))
                    && none_of(
                        &self.not_request_principals,
                        request_principal_matcher(r.auth),
                    )
                    && any_of(&self.remote_ip_blocks, ip_matcher(r.remote_ip))
                    && none_of(&self.not_remote_ip_blocks, ip_matcher(r.remote_ip))
            })
    }

    fn is_http(&self) -> bool {
        !(self.request_principals.is_empty()
            && self.not_request_principals.is_empty()
            && self.remote_ip_blocks.is_empty()
            && self.not_remote_ip_blocks.is_empty())
    }

    fn without_http(&self) -> Source {
        Source {
            request_principals: Vec::new(),
            not_request_principals: Vec::new(),
            remote_ip_blocks: Vec::new(),
            not_remote_ip_blocks: Vec::new(),
            ..self.clone()
        }
    }
}

impl Operation {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        let port = a.connection.destination_port;
        (self.ports.is_empty() || self.ports.contains(&port))
            && !self.not_ports.contains(&port)
            && http_field(a, |r| {
                let host = Some(|m: &HostMatch| m.matches(r.host));
                let method = Some(|m: &StringMatch| m.matches(r.method));
                let path = Some(|m: &PathMatch| m.matches(r.path.path()));
                any_of(&self.hosts, host)
                    && none_of(&self.not_hosts, host)
                    && any_of(&self.methods, method)
                    && none_of(&self.not_methods, method)
                    && any_of(&self.paths, path)
                    && none_of(&self.not_paths, path)
            })
    }

    fn is_http(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }

    fn without_http(&self) -> Operation {
        Operation {
            ports: self.ports.clone(),
            not_ports: self.not_ports.clone(),
            ..Operation::default()
        }
    }
}

impl Condition {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        let c = a.connection;
        match self {
            Condition::SourceIp(v) => v.holds(ip_matcher(c.source_ip)),
            Condition::DestinationIp(v) => v.holds(ip_matcher(c.destination_ip)),
            Condition::DestinationPort(v) => v.holds(Some(|p: &u16| *p == c.destination_port)),
            Condition::SourceNamespace(v) => v.holds(namespace_matcher(c.peer)),
            Condition::SourcePrincipal(v) => v.holds(principal_matcher(c.peer)),
            Condition::SourceServiceAccount(v) => v.holds(account_matcher(c.peer)),
            Condition::SourceTrustDomain(v) => v.holds(trust_domain_matcher(c.peer)),
            Condition::ConnectionSni(v) => v.holds(string_matcher(c.sni)),
            Condition::FilterMetadata { values, .. } => values.holds(None::<fn(&String) -> bool>),
            Condition::RemoteIp(v) => http_field(a, |r| v.holds(ip_matcher(r.remote_ip))),
            Condition::RequestHeader { name, values } => http_field(a, |r| {
                let joined = joined_header(r.headers, name);
                values.holds(joined.as_deref().map(|j| {
                    move |m: &StringMatch| match m {
                        // Envoy's presence match: the header is there, even if empty.
                        StringMatch::Presence => true,
                        m => m.matches(j),
                    }
                }))
            }),
            Condition::RequestPrincipal(v) => {
                http_field(a, |r| v.holds(request_principal_matcher(r.auth)))
            }
            Condition::RequestAudiences(v) => http_field(a, |r| {
                v.holds(r.auth.map(|auth| {
                    move |m: &StringMatch| auth.audiences.iter().any(|aud| m.matches(aud))
                }))
            }),
            Condition::RequestPresenter(v) => http_field(a, |r| {
                v.holds(string_matcher(
                    r.auth.and_then(|auth| auth.presenter.as_deref()),
                ))
            }),
            Condition::RequestClaim { path, values } => http_field(a, |r| {
                let claim = r.auth.and_then(|auth| claim_at(&auth.claims, path));
                values.holds(
                    claim.map(|(name, claim)| move |m: &StringMatch| claim_matches(name, claim, m)),
                )
            }),
        }
    }
}

/// Every value of a header, joined by `,` (Envoy's view of repeated headers); `None`
/// when the request has none. Bytes that are not UTF-8 are replaced, so they match
/// nothing a policy can write but `*`.
fn joined_header(headers: &dyn Headers, name: &str) -> Option<String> {
    let mut joined: Option<Vec<u8>> = None;
    headers.for_each_value(name, &mut |v| match &mut joined {
        Some(j) => {
            j.push(b',');
            j.extend_from_slice(v);
        }
        None => joined = Some(v.to_vec()),
    });
    joined.map(|j| String::from_utf8_lossy(&j).into_owned())
}

fn claim_at<'c>(
    claims: &'c std::collections::BTreeMap<String, Claim>,
    path: &'c [String],
) -> Option<(&'c str, &'c Claim)> {
    let (first, rest) = path.split_first()?;
    let mut claim = claims.get(first)?;
    let mut name = first.as_str();
    for part in rest {
        let Claim::Object(map) = claim else {
            return None;
        };
        claim = map.get(part)?;
        name = part;
    }
    Some((name, claim))
}

/// A list claim matches if any element does; `scope` and `permission` are
/// space-delimited lists.
fn claim_matches(name: &str, claim: &Claim, m: &StringMatch) -> bool {
    match claim {
        Claim::String(s) if matches!(name, "scope" | "permission") => {
            s.split(' ').any(|part| m.matches(part))
        }
        Claim::String(s) => m.matches(s),
        Claim::List(l) => l.iter().any(|s| m.matches(s)),
        Claim::Object(_) => false,
    }
}

impl Rule {
    fn matches(&self, a: &Attributes<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(a)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(a)))
            && self.when.iter().all(|c| c.matches(a))
    }

    /// Whether it uses an attribute only HTTP has (§1.7).
    pub fn is_http(&self) -> bool {
        self.from.iter().any(Source::is_http)
            || self.to.iter().any(Operation::is_http)
            || self.when.iter().any(Condition::is_http_only)
    }
}

impl Policy {
    /// `namespace/name`, as decisions, logs and metrics name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The index of the first rule the request matches.
    pub fn matching_rule(&self, request: &Request<'_>) -> Option<usize> {
        self.first_match(&Attributes {
            connection: &request.connection,
            http: Some(request),
        })
    }

    fn first_match(&self, a: &Attributes<'_>) -> Option<usize> {
        let tcp = a.http.is_none();
        self.rules.iter().position(|r| {
            // On TCP an ALLOW rule that needs HTTP can never match.
            !(tcp && self.action == Action::Allow && r.is_http()) && r.matches(a)
        })
    }

    /// What the policy enforces on plain TCP (§1.7): for ALLOW, the rules that use an
    /// HTTP-only attribute are gone; for the other actions, each rule keeps its other
    /// attributes (a source or operation made only of HTTP ones then matches all).
    /// Rule indices are not kept: [`evaluate_tcp`] reports those of the policy.
    pub fn tcp_projection(&self) -> Policy {
        let rules = if self.action == Action::Allow {
            self.rules
                .iter()
                .filter(|r| !r.is_http())
                .cloned()
                .collect()
        } else {
            self.rules
                .iter()
                .map(|r| Rule {
                    from: r.from.iter().map(Source::without_http).collect(),
                    to: r.to.iter().map(Operation::without_http).collect(),
                    when: r
                        .when
                        .iter()
                        .filter(|c| !c.is_http_only())
                        .cloned()
                        .collect(),
                })
                .collect()
        };
        Policy {
            rules,
            ..self.clone()
        }
    }
}

/// A policy and one of its rules, as a decision names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// `namespace/name`.
    pub policy: String,
    pub rule: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rule {}", self.policy, self.rule)
    }
}

/// Why a request (or a TCP connection) was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// A CUSTOM policy matched: no external authorization provider exists.
    Custom(RuleRef),
    /// A DENY policy matched.
    Denied(RuleRef),
    /// ALLOW policies apply and none matched.
    NotAllowed,
}

impl Denial {
    /// Envoy's `response_code_details` for an RBAC denial, for access logs:
    /// `rbac_access_denied_matched_policy[ns[shop]-policy[deny-admin]-rule[0]]`, or
    /// `...[none]` when no ALLOW policy matched.
    pub fn response_details(&self) -> String {
        match self {
            Denial::Custom(r) | Denial::Denied(r) => {
                let (ns, name) = r.policy.split_once('/').unwrap_or(("", &r.policy));
                format!(
                    "rbac_access_denied_matched_policy[ns[{ns}]-policy[{name}]-rule[{}]]",
                    r.rule
                )
            }
            Denial::NotAllowed => "rbac_access_denied_matched_policy[none]".into(),
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Custom(r) => write!(
                f,
                "denied by CUSTOM policy {r}: no external authorization provider exists"
            ),
            Denial::Denied(r) => write!(f, "explicitly denied by policy {r}"),
            Denial::NotAllowed => f.write_str("not allowed: no ALLOW policy matched"),
        }
    }
}

/// The decision, and what dry-run and AUDIT policies would have done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Result<(), Denial>,
    /// The ALLOW policy and rule that allowed, when one did (`None` on an allow:
    /// no ALLOW policy applies).
    pub allowed_by: Option<RuleRef>,
    /// Dry-run policies that matched: their action and the rule.
    pub dry_run_matches: Vec<(RuleRef, Action)>,
    /// AUDIT policies that matched.
    pub audited_by: Vec<RuleRef>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.decision.is_ok()
    }
}

/// Decides one HTTP request against the policies attached to its destination.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    request: &Request<'_>,
) -> Verdict {
    decide(
        policies,
        &Attributes {
            connection: &request.connection,
            http: Some(request),
        },
    )
}

/// Decides plain TCP through the waypoint against the same policies, by their TCP
/// projection (§1.7).
pub fn evaluate_tcp<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    connection: &Connection<'_>,
) -> Verdict {
    decide(
        policies,
        &Attributes {
            connection,
            http: None,
        },
    )
}

fn decide<'p>(policies: impl IntoIterator<Item = &'p Policy>, a: &Attributes<'_>) -> Verdict {
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
        let matched = |p: &Policy| {
            p.first_match(a).map(|rule| RuleRef {
                policy: p.key(),
                rule,
            })
        };
        if p.dry_run {
            if let Some(r) = matched(p) {
                verdict.dry_run_matches.push((r, p.action));
            }
            continue;
        }
        match p.action {
            Action::Audit => verdict.audited_by.extend(matched(p)),
            Action::Custom if custom.is_none() => custom = matched(p),
            Action::Deny if deny.is_none() => deny = matched(p),
            Action::Allow => {
                any_allow = true;
                if verdict.allowed_by.is_none() {
                    verdict.allowed_by = matched(p);
                }
            }
            Action::Custom | Action::Deny => {}
        }
    }
    verdict.decision = if let Some(r) = custom {
        Err(Denial::Custom(r))
    } else if let Some(r) = deny {
        Err(Denial::Denied(r))
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
mod tests;
