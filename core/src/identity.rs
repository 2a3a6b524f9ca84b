//! SPIFFE workload identities in the Kubernetes form Istio uses:
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Identities arrive from untrusted places (CSRs, peer certificates, token files), so
//! they are parsed once into [`SpiffeId`] and only the typed value travels inward.
//! Character rules follow the SPIFFE ID specification: a trust domain is lowercase
//! letters, digits, `.`, `-` and `_`; a path segment is letters, digits, `.`, `-`
//! and `_`. Length limits are Kubernetes' (namespace 63, service account 253) and
//! SPIFFE's (trust domain 255, whole ID 2048 bytes).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const MAX_NAMESPACE_LEN: usize = 63;
const MAX_SERVICE_ACCOUNT_LEN: usize = 253;
const MAX_ID_LEN: usize = 2048;

/// Which part of an identity an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    TrustDomain,
    Namespace,
    ServiceAccount,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::TrustDomain => "trust domain",
            Part::Namespace => "namespace",
            Part::ServiceAccount => "service account",
        })
    }
}

/// Why a string is not a valid identity. Each variant says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{input:?} is not a SPIFFE ID: it must start with \"spiffe://\"")]
    MissingScheme { input: String },
    #[error("{part} is empty")]
    Empty { part: Part },
    #[error("{part} {value:?} is {len} bytes long; at most {max} are allowed")]
    TooLong {
        part: Part,
        value: String,
        len: usize,
        max: usize,
    },
    #[error("SPIFFE ID is {len} bytes long; at most {MAX_ID_LEN} are allowed")]
    IdTooLong { len: usize },
    #[error("{part} {value:?} contains {ch:?} at byte {position}; allowed are {allowed}")]
    BadCharacter {
        part: Part,
        value: String,
        ch: char,
        position: usize,
        allowed: &'static str,
    },
    #[error("{part} may not be {value:?}")]
    DotSegment { part: Part, value: String },
    #[error("path {path:?} of {input:?} is not of the form /ns/<namespace>/sa/<service-account>")]
    WrongPath { input: String, path: String },
    #[error("{input:?} has a {what}, which a SPIFFE ID may not have")]
    Forbidden { input: String, what: &'static str },
}

/// A SPIFFE trust domain such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        if s.is_empty() {
            return Err(IdentityError::Empty {
                part: Part::TrustDomain,
            });
        }
        if s.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdentityError::TooLong {
                part: Part::TrustDomain,
                value: s.to_string(),
                len: s.len(),
                max: MAX_TRUST_DOMAIN_LEN,
            });
        }
        if let Some((position, ch)) = s
            .char_indices()
            .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(*c)))
        {
            return Err(IdentityError::BadCharacter {
                part: Part::TrustDomain,
                value: s.to_string(),
                ch,
                position,
                allowed: "lowercase letters, digits, '.', '-' and '_'",
            });
        }
        Ok(TrustDomain(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    /// Kubernetes' and Istio's default trust domain, `cluster.local`.
    fn default() -> Self {
        TrustDomain("cluster.local".into())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::parse(s)
    }
}

/// A workload identity, `spiffe://<td>/ns/<ns>/sa/<sa>`.
///
/// Held as one shared string with the offsets of its parts: identities are cloned
/// into every connection's state, so a clone is a reference count bump.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: Arc<str>,
    /// End of the trust domain, i.e. the index of "/ns/".
    td_end: u16,
    /// End of the namespace, i.e. the index of "/sa/".
    ns_end: u16,
}

impl SpiffeId {
    /// Builds an identity from its parts, checking each.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        check_segment(Part::Namespace, namespace, MAX_NAMESPACE_LEN)?;
        check_segment(
            Part::ServiceAccount,
            service_account,
            MAX_SERVICE_ACCOUNT_LEN,
        )?;
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        // Each part is length-checked above, so the offsets fit comfortably in u16.
        let td_end = (SCHEME.len() + trust_domain.as_str().len()) as u16;
        let ns_end = td_end + 4 + namespace.len() as u16;
        Ok(SpiffeId {
            uri: uri.into(),
            td_end,
            ns_end,
        })
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`, rejecting anything else.
    pub fn parse(input: &str) -> Result<Self, IdentityError> {
        if input.len() > MAX_ID_LEN {
            return Err(IdentityError::IdTooLong { len: input.len() });
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::MissingScheme {
                input: input.to_string(),
            })?;
        for (ch, what) in [('?', "query"), ('#', "fragment")] {
            if rest.contains(ch) {
                return Err(IdentityError::Forbidden {
                    input: input.to_string(),
                    what,
                });
            }
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(IdentityError::Forbidden {
                input: input.to_string(),
                what: "user info",
            });
        }
        if authority.contains(':') {
            return Err(IdentityError::Forbidden {
                input: input.to_string(),
                what: "port",
            });
        }
        let trust_domain = TrustDomain::parse(authority)?;
        let wrong_path = || IdentityError::WrongPath {
            input: input.to_string(),
            path: path.to_string(),
        };
        let segments: Vec<&str> = path.split('/').collect();
        // A leading "/" yields an empty first element.
        match segments.as_slice() {
            ["", "ns", ns, "sa", sa] => SpiffeId::new(trust_domain, ns, sa),
            _ => Err(wrong_path()),
        }
    }

    /// The trust domain part, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end as usize]
    }

    pub fn in_trust_domain(&self, td: &TrustDomain) -> bool {
        self.trust_domain() == td.as_str()
    }

    pub fn namespace(&self) -> &str {
        &self.uri[self.td_end as usize + 4..self.ns_end as usize]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[self.ns_end as usize + 4..]
    }

    /// The full URI, as it appears in a certificate's URI SAN.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

fn check_segment(part: Part, value: &str, max: usize) -> Result<(), IdentityError> {
    if value.is_empty() {
        return Err(IdentityError::Empty { part });
    }
    if value.len() > max {
        return Err(IdentityError::TooLong {
            part,
            value: value.to_string(),
            len: value.len(),
            max,
        });
    }
    if value == "." || value == ".." {
        return Err(IdentityError::DotSegment {
            part,
            value: value.to_string(),
        });
    }
    if let Some((position, ch)) = value
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return Err(IdentityError::BadCharacter {
            part,
            value: value.to_string(),
            ch,
            position,
            allowed: "letters, digits, '.', '-' and '_'",
        });
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TrustDomain::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_round_trip() {
        for input in [
            "spiffe://cluster.local/ns/default/sa/default",
            "spiffe://cluster.local/ns/ambit-system/sa/ztunnel",
            "spiffe://example.org/ns/a/sa/b",
            "spiffe://td_1-x.y/ns/shop.v2/sa/Frontend_SA",
        ] {
            let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.to_string(), input);
        }
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "cart");
    }

    #[test]
    fn invalid_ids_say_what_is_wrong() {
        let long_ns = "n".repeat(64);
        let long_td = "t".repeat(256);
        let long_id = format!("spiffe://td/ns/a/sa/{}", "s".repeat(2100));
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "must start with \"spiffe://\""),
            ("http://cluster.local/ns/a/sa/b".into(), "must start with"),
            ("SPIFFE://cluster.local/ns/a/sa/b".into(), "must start with"),
            ("spiffe:///ns/a/sa/b".into(), "trust domain is empty"),
            (
                "spiffe://Cluster.local/ns/a/sa/b".into(),
                "trust domain \"Cluster.local\" contains 'C' at byte 0",
            ),
            ("spiffe://cluster local/ns/a/sa/b".into(), "contains ' '"),
            (
                format!("spiffe://{long_td}/ns/a/sa/b"),
                "256 bytes long; at most 255",
            ),
            (
                "spiffe://cluster.local".into(),
                "is not of the form /ns/<namespace>/sa/<service-account>",
            ),
            ("spiffe://cluster.local/".into(), "not of the form"),
            ("spiffe://cluster.local/ns/a".into(), "not of the form"),
            ("spiffe://cluster.local/ns/a/sa".into(), "not of the form"),
            (
                "spiffe://cluster.local/ns/a/sa/b/".into(),
                "not of the form",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b/c".into(),
                "not of the form",
            ),
            (
                "spiffe://cluster.local/namespace/a/sa/b".into(),
                "not of the form",
            ),
            (
                "spiffe://cluster.local/ns/a/serviceaccount/b".into(),
                "not of the form",
            ),
            (
                "spiffe://cluster.local//ns/a/sa/b".into(),
                "not of the form",
            ),
            (
                "spiffe://cluster.local/ns//sa/b".into(),
                "namespace is empty",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/".into(),
                "service account is empty",
            ),
            (
                "spiffe://cluster.local/ns/../sa/b".into(),
                "namespace may not be \"..\"",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/.".into(),
                "service account may not be \".\"",
            ),
            (
                "spiffe://cluster.local/ns/a%20b/sa/b".into(),
                "namespace \"a%20b\" contains '%' at byte 1",
            ),
            (
                "spiffe://cluster.local/ns/a/sa/b*".into(),
                "service account \"b*\" contains '*'",
            ),
            ("spiffe://cluster.local/ns/ä/sa/b".into(), "contains 'ä'"),
            (
                format!("spiffe://cluster.local/ns/{long_ns}/sa/b"),
                "is 64 bytes long; at most 63",
            ),
            ("spiffe://cluster.local/ns/a/sa/b?x=1".into(), "has a query"),
            (
                "spiffe://cluster.local/ns/a/sa/b#frag".into(),
                "has a fragment",
            ),
            (
                "spiffe://user@cluster.local/ns/a/sa/b".into(),
                "has a user info",
            ),
            ("spiffe://cluster.local:8080/ns/a/sa/b".into(), "has a port"),
            (long_id, "at most 2048 are allowed"),
        ];
        for (input, want) in cases {
            match SpiffeId::parse(&input) {
                Ok(id) => panic!("{input:?} parsed as {id}, want error containing {want:?}"),
                Err(e) => assert!(
                    e.to_string().contains(want),
                    "{input:?}: error {e:?} ({e}) does not contain {want:?}"
                ),
            }
        }
    }

    #[test]
    fn trust_domain_rules() {
        assert_eq!(TrustDomain::default().as_str(), "cluster.local");
        for ok in ["cluster.local", "a", "my-mesh_1.example.com"] {
            assert!(TrustDomain::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Example.com", "a/b", "a:1", "a b"] {
            assert!(TrustDomain::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn new_checks_parts() {
        let td = TrustDomain::default();
        assert!(SpiffeId::new(td.clone(), "shop", "cart").is_ok());
        assert_eq!(
            SpiffeId::new(td.clone(), "", "cart"),
            Err(IdentityError::Empty {
                part: Part::Namespace
            })
        );
        assert!(SpiffeId::new(td, "shop", "ca/rt").is_err());
    }
}
