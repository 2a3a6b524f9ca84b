//! The certificate authority's decisions, free of any IO: which identity a caller may
//! obtain, and the validity window of the certificate it gets.

use std::time::{Duration, SystemTime};

use crate::identity::{SpiffeId, TrustDomain};

/// An authenticated caller of the CA, as an authenticator established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Who the caller is.
    pub identity: SpiffeId,
    /// A trusted node agent (ztunnel) may request certificates for other identities.
    pub node_agent: bool,
    /// The node the caller runs on, when known; node authorization uses it.
    pub node: Option<String>,
}

/// Why a caller may not have the identity it asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizationError {
    #[error("caller {caller} is not a trusted node agent and may not request a certificate for {requested}")]
    NotNodeAgent {
        caller: SpiffeId,
        requested: SpiffeId,
    },
    #[error(
        "caller {caller} requested {requested}, outside this CA's trust domain {trust_domain}"
    )]
    ForeignTrustDomain {
        caller: SpiffeId,
        requested: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("caller {caller} is authorized for {requested} but the CSR asks for {csr}")]
    CsrMismatch {
        caller: SpiffeId,
        requested: SpiffeId,
        csr: SpiffeId,
    },
    #[error(
        "node agent {caller} (node {}) may not request {requested}: no running pod with that \
         identity is scheduled on its node",
        node.as_deref().unwrap_or("unknown")
    )]
    NotOnCallersNode {
        caller: SpiffeId,
        requested: SpiffeId,
        node: Option<String>,
    },
}

/// Where workloads run, as far as the CA's node authorization needs to know: whether a
/// non-terminated pod running as `identity` is scheduled on `node`.
pub trait WorkloadPlacement: Send + Sync + std::fmt::Debug {
    fn runs_on(&self, node: &str, identity: &SpiffeId) -> bool;
}

/// Decides which identity `caller` gets. `impersonate` is the request's
/// `ImpersonatedIdentity`; `csr_identity` the single URI SAN of its CSR. With
/// `placement`, a node agent may impersonate only an identity that runs on its own node
/// (node authorization); without, any identity in the trust domain.
pub fn authorize(
    caller: &Caller,
    impersonate: Option<&SpiffeId>,
    csr_identity: &SpiffeId,
    trust_domain: &TrustDomain,
    placement: Option<&dyn WorkloadPlacement>,
) -> Result<SpiffeId, AuthorizationError> {
    let requested = impersonate.unwrap_or(&caller.identity);
    if requested != &caller.identity && !caller.node_agent {
        return Err(AuthorizationError::NotNodeAgent {
            caller: caller.identity.clone(),
            requested: requested.clone(),
        });
    }
    if requested != &caller.identity {
        if let Some(placement) = placement {
            let on_node = caller
                .node
                .as_deref()
                .is_some_and(|node| placement.runs_on(node, requested));
            if !on_node {
                return Err(AuthorizationError::NotOnCallersNode {
                    caller: caller.identity.clone(),
                    requested: requested.clone(),
                    node: caller.node.clone(),
                });
            }
        }
    }
    if !requested.in_trust_domain(trust_domain) {
        return Err(AuthorizationError::ForeignTrustDomain {
            caller: caller.identity.clone(),
            requested: requested.clone(),
            trust_domain: trust_domain.clone(),
        });
    }
    if csr_identity != requested {
        return Err(AuthorizationError::CsrMismatch {
            caller: caller.identity.clone(),
            requested: requested.clone(),
            csr: csr_identity.clone(),
        });
    }
    Ok(requested.clone())
}

/// Limits on leaf certificate lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValidityLimits {
    /// Used when the request asks for no particular duration (0).
    pub default_ttl: Duration,
    /// Longest lifetime a request may ask for.
    pub max_ttl: Duration,
    /// How far NotBefore is set in the past, to absorb clock skew between nodes.
    pub backdate: Duration,
}

impl Default for ValidityLimits {
    fn default() -> Self {
        ValidityLimits {
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(90 * 24 * 3600),
            backdate: Duration::from_secs(120),
        }
    }
}

/// A certificate's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidityError {
    #[error("validity_duration {0} is negative; give seconds > 0, or 0 for the default")]
    Negative(i64),
    #[error("validity_duration {requested}s exceeds the maximum of {max}s")]
    TooLong { requested: i64, max: u64 },
    #[error("the issuing certificate has expired; the CA cannot issue until its certificate is replaced")]
    IssuerExpired,
}

/// The validity of a leaf requested at `now` for `requested_secs` (0 = default), never
/// outliving the issuer.
pub fn leaf_validity(
    now: SystemTime,
    requested_secs: i64,
    limits: &ValidityLimits,
    issuer_not_after: SystemTime,
) -> Result<Validity, ValidityError> {
    let ttl = match requested_secs {
        s if s < 0 => return Err(ValidityError::Negative(s)),
        0 => limits.default_ttl,
        s if s as u64 > limits.max_ttl.as_secs() => {
            return Err(ValidityError::TooLong {
                requested: s,
                max: limits.max_ttl.as_secs(),
            })
        }
        s => Duration::from_secs(s as u64),
    };
    if issuer_not_after <= now {
        return Err(ValidityError::IssuerExpired);
    }
    let not_after = (now + ttl).min(issuer_not_after);
    let not_before = now.checked_sub(limits.backdate).unwrap_or(now);
    Ok(Validity {
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    const POD: &str = "spiffe://cluster.local/ns/shop/sa/cart";
    const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/pay";
    const ZTUNNEL: &str = "spiffe://cluster.local/ns/ambit-system/sa/ztunnel";
    const FOREIGN: &str = "spiffe://other.org/ns/shop/sa/cart";

    #[test]
    fn authorization_table() {
        let td = TrustDomain::default();
        let workload = Caller {
            identity: id(POD),
            node_agent: false,
            node: None,
        };
        let agent = Caller {
            identity: id(ZTUNNEL),
            node_agent: true,
            node: Some("node-a".into()),
        };
        let foreign_caller = Caller {
            identity: id(FOREIGN),
            node_agent: false,
            node: None,
        };
        // (caller, impersonated identity, CSR identity, Ok(granted) or Err(variant))
        type Case<'a> = (
            &'a Caller,
            Option<&'a str>,
            &'a str,
            Result<&'a str, &'a str>,
        );
        let cases: Vec<Case> = vec![
            (&workload, None, POD, Ok(POD)),
            (&workload, Some(POD), POD, Ok(POD)),
            (&workload, None, OTHER, Err("CsrMismatch")),
            (&workload, Some(OTHER), OTHER, Err("NotNodeAgent")),
            (&agent, Some(POD), POD, Ok(POD)),
            (&agent, None, ZTUNNEL, Ok(ZTUNNEL)),
            (&agent, Some(POD), OTHER, Err("CsrMismatch")),
            (&agent, Some(FOREIGN), FOREIGN, Err("ForeignTrustDomain")),
            (&foreign_caller, None, FOREIGN, Err("ForeignTrustDomain")),
        ];
        for (caller, imp, csr, want) in cases {
            let imp = imp.map(id);
            let got = authorize(caller, imp.as_ref(), &id(csr), &td, None);
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, id(want)),
                (Err(e), Err(want)) => assert!(
                    format!("{e:?}").starts_with(want),
                    "{caller:?} {imp:?} {csr}: got {e:?}, want {want}"
                ),
                (got, want) => panic!("{caller:?} {imp:?} {csr}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// Pods of `POD`'s identity run on node-a only.
    #[derive(Debug)]
    struct OnNodeA;

    impl WorkloadPlacement for OnNodeA {
        fn runs_on(&self, node: &str, identity: &SpiffeId) -> bool {
            node == "node-a" && identity.as_str() == POD
        }
    }

    #[test]
    fn with_placement_a_node_agent_gets_only_identities_running_on_its_node() {
        let td = TrustDomain::default();
        let agent = |node: Option<&str>| Caller {
            identity: id(ZTUNNEL),
            node_agent: true,
            node: node.map(str::to_owned),
        };
        let placement: Option<&dyn WorkloadPlacement> = Some(&OnNodeA);
        let a = agent(Some("node-a"));
        assert_eq!(
            authorize(&a, Some(&id(POD)), &id(POD), &td, placement),
            Ok(id(POD))
        );
        // Its own identity needs no pod.
        assert_eq!(
            authorize(&a, None, &id(ZTUNNEL), &td, placement),
            Ok(id(ZTUNNEL))
        );
        for (caller, requested) in [
            (agent(Some("node-a")), OTHER),
            (agent(Some("node-b")), POD),
            (agent(None), POD),
        ] {
            let e = authorize(
                &caller,
                Some(&id(requested)),
                &id(requested),
                &td,
                placement,
            )
            .unwrap_err();
            assert!(
                matches!(e, AuthorizationError::NotOnCallersNode { .. }),
                "{e:?}"
            );
            assert!(e.to_string().contains(requested), "{e}");
        }
    }

    #[test]
    fn authorization_errors_name_caller_and_identity() {
        let caller = Caller {
            identity: id(POD),
            node_agent: false,
            node: None,
        };
        let e = authorize(
            &caller,
            Some(&id(OTHER)),
            &id(OTHER),
            &TrustDomain::default(),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(POD) && e.contains(OTHER), "{e}");
    }

    #[test]
    fn validity_table() {
        let limits = ValidityLimits::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let far = now + Duration::from_secs(10 * 365 * 24 * 3600);
        let hour = Duration::from_secs(3600);
        let cases: Vec<(i64, SystemTime, Result<Duration, &str>)> = vec![
            (0, far, Ok(24 * hour)),
            (3600, far, Ok(hour)),
            (90 * 24 * 3600, far, Ok(90 * 24 * hour)),
            (90 * 24 * 3600 + 1, far, Err("exceeds the maximum")),
            (-1, far, Err("negative")),
            (0, now + hour, Ok(hour)),
            (0, now, Err("expired")),
        ];
        for (req, issuer_end, want) in cases {
            let got = leaf_validity(now, req, &limits, issuer_end);
            match (got, want) {
                (Ok(v), Ok(ttl)) => {
                    assert_eq!(v.not_after, now + ttl, "{req}");
                    assert_eq!(v.not_before, now - Duration::from_secs(120), "{req}");
                }
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{req}: {e}"),
                (got, want) => panic!("{req}: got {got:?} want {want:?}"),
            }
        }
    }
}
