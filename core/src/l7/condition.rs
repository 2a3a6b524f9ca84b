//! `when` conditions: every key of the reference's §1.3, read once from Istio's
//! `{key, values, notValues}` into a typed condition, and written back the same way
//! (the model's YAML and the wire carry that form).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::authz::{Cidr, ServiceAccountRef, StringMatch};

use super::values::{
    parse_header_name, parse_service_account, parse_trust_domain, RequestPrincipalMatch,
};

/// The `values` and `notValues` of a condition: it holds when some value matches (if
/// any are given) and no not-value does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values<T> {
    pub values: Vec<T>,
    pub not_values: Vec<T>,
}

impl<T> Values<T> {
    /// Over an attribute that may be missing: a missing one never matches `values`
    /// and always satisfies `notValues` (as Istio treats absent metadata).
    pub fn holds(&self, present: Option<impl Fn(&T) -> bool>) -> bool {
        match present {
            Some(m) => {
                (self.values.is_empty() || self.values.iter().any(&m))
                    && !self.not_values.iter().any(&m)
            }
            None => self.values.is_empty(),
        }
    }

    fn map<U>(&self, f: impl Fn(&T) -> U) -> Values<U> {
        Values {
            values: self.values.iter().map(&f).collect(),
            not_values: self.not_values.iter().map(&f).collect(),
        }
    }
}

/// One `when` condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ConditionSpec", into = "ConditionSpec")]
pub enum Condition {
    /// `source.ip`: the connection's source address.
    SourceIp(Values<Cidr>),
    /// `remote.ip`: the original client address (HTTP only).
    RemoteIp(Values<Cidr>),
    DestinationIp(Values<Cidr>),
    DestinationPort(Values<u16>),
    /// `source.namespace`, matched as `namespaces` is at a waypoint.
    SourceNamespace(Values<StringMatch>),
    /// `source.principal`: the peer identity without `spiffe://`.
    SourcePrincipal(Values<StringMatch>),
    SourceServiceAccount(Values<ServiceAccountRef>),
    SourceTrustDomain(Values<StringMatch>),
    /// `connection.sni`: the TLS server name the client sent, when known.
    ConnectionSni(Values<StringMatch>),
    /// `request.headers[<name>]`, the name lower-case; repeated headers joined by `,`.
    RequestHeader {
        name: String,
        values: Values<StringMatch>,
    },
    /// `request.auth.principal`.
    RequestPrincipal(Values<RequestPrincipalMatch>),
    /// `request.auth.audiences`: any of the token's audiences.
    RequestAudiences(Values<StringMatch>),
    /// `request.auth.presenter`: the token's `azp`.
    RequestPresenter(Values<StringMatch>),
    /// `request.auth.claims[<a>]...[<z>]`: a (nested) claim.
    RequestClaim {
        path: Vec<String>,
        values: Values<StringMatch>,
    },
    /// `experimental.envoy.filters.<filter>[<key>]`: metadata an Envoy filter would
    /// have set. No such filter runs in Ambit, so the metadata is always missing and
    /// is treated as Istio treats missing metadata: `values` never match, `notValues`
    /// always hold.
    FilterMetadata {
        filter: String,
        key: String,
        values: Values<String>,
    },
}

impl Condition {
    /// Reads a condition. `namespace` (the policy's) completes a bare service account.
    /// Errors name the part at fault relative to the condition: `key`, `values[2]`.
    pub fn parse(
        key: &str,
        values: &[String],
        not_values: &[String],
        namespace: &str,
    ) -> Result<Condition, String> {
        if key.is_empty() {
            return Err("key: is required".into());
        }
        if values.is_empty() && not_values.is_empty() {
            return Err("one of values and notValues must be set".into());
        }
        let each = |parse: &dyn Fn(&str) -> Result<(), String>| -> Result<(), String> {
            for (field, list) in [("values", values), ("notValues", not_values)] {
                for (i, v) in list.iter().enumerate() {
                    if v.is_empty() {
                        return Err(format!("{field}[{i}]: may not be empty"));
                    }
                    parse(v).map_err(|e| format!("{field}[{i}]: {e}"))?;
                }
            }
            Ok(())
        };
        fn read<T>(
            values: &[String],
            not_values: &[String],
            f: impl Fn(&str) -> Result<T, String>,
        ) -> Values<T> {
            // Only called once `each` has checked every value with the same parser.
            let keep = |l: &[String]| l.iter().filter_map(|v| f(v).ok()).collect();
            Values {
                values: keep(values),
                not_values: keep(not_values),
            }
        }
        macro_rules! typed {
            ($variant:ident, $parse:expr) => {{
                each(&|v| $parse(v).map(|_| ()))?;
                Ok(Condition::$variant(read(values, not_values, $parse)))
            }};
        }
        let cidr = |v: &str| Cidr::parse(v);
        let port = |v: &str| {
            v.parse::<u16>()
                .map_err(|_| format!("{v:?} is not a port (0..65535)"))
        };
        let string = |v: &str| Ok::<_, String>(StringMatch::parse(v));
        let principal =
            |v: &str| Ok::<_, String>(StringMatch::parse(v.strip_prefix("spiffe://").unwrap_or(v)));
        let account = |v: &str| parse_service_account(v, namespace);
        let request_principal = |v: &str| Ok::<_, String>(RequestPrincipalMatch::parse(v));
        match key {
            "source.ip" => typed!(SourceIp, cidr),
            "remote.ip" => typed!(RemoteIp, cidr),
            "destination.ip" => typed!(DestinationIp, cidr),
            "destination.port" => typed!(DestinationPort, port),
            "source.namespace" => typed!(SourceNamespace, string),
            "source.principal" => typed!(SourcePrincipal, principal),
            "source.serviceAccount" => typed!(SourceServiceAccount, account),
            "source.trustDomain" => typed!(SourceTrustDomain, parse_trust_domain),
            "connection.sni" => typed!(ConnectionSni, string),
            "request.auth.principal" => typed!(RequestPrincipal, request_principal),
            "request.auth.audiences" => typed!(RequestAudiences, string),
            "request.auth.presenter" => typed!(RequestPresenter, string),
            "destination.namespace" | "destination.name" | "destination.user" => Err(format!(
                "key: {key} is not supported (use the policy's namespace or selector)"
            )),
            k if k.starts_with("destination.labels[") => {
                Err(format!("key: {k} is not supported (use the selector)"))
            }
            k => {
                if let Some(rest) = k.strip_prefix("request.headers") {
                    let [name] = brackets(rest).map_err(|e| format!("key: {k:?}: {e}"))?[..] else {
                        return Err(format!(
                            "key: {k:?} must have the form request.headers[<name>]"
                        ));
                    };
                    let name = parse_header_name(name).map_err(|e| format!("key: {e}"))?;
                    each(&|_| Ok(()))?;
                    Ok(Condition::RequestHeader {
                        name,
                        values: read(values, not_values, string),
                    })
                } else if let Some(rest) = k.strip_prefix("request.auth.claims") {
                    let path = brackets(rest).map_err(|e| format!("key: {k:?}: {e}"))?;
                    if path.is_empty() {
                        return Err(format!(
                            "key: {k:?} must have the form request.auth.claims[<claim>]"
                        ));
                    }
                    each(&|_| Ok(()))?;
                    Ok(Condition::RequestClaim {
                        path: path.iter().map(|s| (*s).to_owned()).collect(),
                        values: read(values, not_values, string),
                    })
                } else if let Some(rest) = k.strip_prefix("experimental.envoy.filters.") {
                    let open = rest.find('[').unwrap_or(rest.len());
                    let filter = &rest[..open];
                    let keys = brackets(&rest[open..]).map_err(|e| format!("key: {k:?}: {e}"))?;
                    let (false, [key]) = (filter.is_empty(), &keys[..]) else {
                        return Err(format!(
                            "key: {k:?} must have the form experimental.envoy.filters.<filter>[<key>]"
                        ));
                    };
                    each(&|_| Ok(()))?;
                    Ok(Condition::FilterMetadata {
                        filter: filter.to_owned(),
                        key: (*key).to_owned(),
                        values: read(values, not_values, |v| Ok::<_, String>(v.to_owned())),
                    })
                } else {
                    Err(format!("key: unknown attribute {k:?}"))
                }
            }
        }
    }

    /// The key as Istio writes it.
    pub fn key(&self) -> String {
        match self {
            Condition::SourceIp(_) => "source.ip".into(),
            Condition::RemoteIp(_) => "remote.ip".into(),
            Condition::DestinationIp(_) => "destination.ip".into(),
            Condition::DestinationPort(_) => "destination.port".into(),
            Condition::SourceNamespace(_) => "source.namespace".into(),
            Condition::SourcePrincipal(_) => "source.principal".into(),
            Condition::SourceServiceAccount(_) => "source.serviceAccount".into(),
            Condition::SourceTrustDomain(_) => "source.trustDomain".into(),
            Condition::ConnectionSni(_) => "connection.sni".into(),
            Condition::RequestHeader { name, .. } => format!("request.headers[{name}]"),
            Condition::RequestPrincipal(_) => "request.auth.principal".into(),
            Condition::RequestAudiences(_) => "request.auth.audiences".into(),
            Condition::RequestPresenter(_) => "request.auth.presenter".into(),
            Condition::RequestClaim { path, .. } => {
                let mut key = "request.auth.claims".to_owned();
                for p in path {
                    key.push_str(&format!("[{p}]"));
                }
                key
            }
            Condition::FilterMetadata { filter, key, .. } => {
                format!("experimental.envoy.filters.{filter}[{key}]")
            }
        }
    }

    /// Whether it needs an HTTP request (§1.3): `remote.ip` and `request.*`.
    pub fn is_http_only(&self) -> bool {
        matches!(
            self,
            Condition::RemoteIp(_)
                | Condition::RequestHeader { .. }
                | Condition::RequestPrincipal(_)
                | Condition::RequestAudiences(_)
                | Condition::RequestPresenter(_)
                | Condition::RequestClaim { .. }
        )
    }

    /// Whether it reads the peer's or the request's identity (not allowed in CUSTOM).
    pub fn is_identity(&self) -> bool {
        matches!(
            self,
            Condition::SourceNamespace(_)
                | Condition::SourcePrincipal(_)
                | Condition::SourceServiceAccount(_)
                | Condition::SourceTrustDomain(_)
                | Condition::RequestPrincipal(_)
                | Condition::RequestAudiences(_)
                | Condition::RequestPresenter(_)
                | Condition::RequestClaim { .. }
        )
    }

    /// `values` and `notValues` as Istio writes them.
    fn texts(&self) -> Values<String> {
        let s = |v: &dyn fmt::Display| v.to_string();
        match self {
            Condition::SourceIp(v) | Condition::RemoteIp(v) | Condition::DestinationIp(v) => {
                v.map(|c| s(c))
            }
            Condition::DestinationPort(v) => v.map(|p| s(p)),
            Condition::SourceNamespace(v)
            | Condition::SourcePrincipal(v)
            | Condition::SourceTrustDomain(v)
            | Condition::ConnectionSni(v)
            | Condition::RequestAudiences(v)
            | Condition::RequestPresenter(v)
            | Condition::RequestHeader { values: v, .. }
            | Condition::RequestClaim { values: v, .. } => v.map(|m| s(m)),
            Condition::SourceServiceAccount(v) => v.map(|a| format!("{}/{}", a.namespace, a.name)),
            Condition::RequestPrincipal(v) => v.map(|m| s(m)),
            Condition::FilterMetadata { values, .. } => values.map(Clone::clone),
        }
    }
}

/// `[a][b]...` → `["a", "b"]`; each part non-empty and without brackets.
fn brackets(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let inner = rest
            .strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .filter(|(inner, _)| !inner.is_empty() && !inner.contains('['))
            .ok_or_else(|| "a map key must have the form a[b]".to_owned())?;
        parts.push(inner.0);
        rest = inner.1;
    }
    Ok(parts)
}

/// A condition as Istio writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConditionSpec {
    key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    not_values: Vec<String>,
}

impl TryFrom<ConditionSpec> for Condition {
    type Error = String;

    fn try_from(c: ConditionSpec) -> Result<Condition, String> {
        // Written by `From<Condition>`: service accounts always as `ns/sa`.
        Condition::parse(&c.key, &c.values, &c.not_values, "")
            .map_err(|e| format!("when {}: {e}", c.key))
    }
}

impl From<Condition> for ConditionSpec {
    fn from(c: Condition) -> ConditionSpec {
        let Values { values, not_values } = c.texts();
        ConditionSpec {
            key: c.key(),
            values,
            not_values,
        }
    }
}

/// Conversions for the wire: the same `{key, values, notValues}` form.
impl Condition {
    /// The key, values and not-values as Istio writes them.
    pub fn to_parts(&self) -> (String, Vec<String>, Vec<String>) {
        let Values { values, not_values } = self.texts();
        (self.key(), values, not_values)
    }
}
