//! PeerAuthentication → the DENY policies ztunnel enforces for it
//! (`../shared/reference/istio-ambient-api.md` §2.1). Between mesh peers ztunnel always
//! speaks HBONE mutual TLS, so the mode only decides whether plaintext inbound (no peer
//! identity) is accepted:
//!
//! - precedence: workload (selector) > namespace > mesh (root namespace, no selector);
//!   at one level the oldest wins (then the name); `UNSET` inherits, and at the top is
//!   PERMISSIVE; a root-namespace policy with a selector is ignored;
//! - `DISABLE` accepts plaintext as `PERMISSIVE` does, at the top or for a port, as
//!   Istio's conversion does (decision record 0008); mesh peers still use mutual TLS
//!   (ambient cannot turn it off), which its status says;
//! - STRICT → a DENY of connections without a peer identity; `portLevelMtls` (which
//!   needs a selector) makes per-port exceptions, or per-port STRICT on a permissive
//!   workload.
//!
//! A PeerAuthentication that fails validation counts as STRICT for what it selects:
//! the mode it meant cannot be known, and STRICT is the closed side.

use std::collections::BTreeMap;

use ambit_core::authz::{Action, Clause, Match, Policy, Rule, StringMatch};
use serde::Deserialize;
use serde_json::Value;

use crate::authz::{Acceptance, Selector};
use crate::resources::ObjectKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl Mode {
    fn parse(text: Option<&str>) -> Result<Mode, String> {
        match text.unwrap_or("UNSET") {
            "UNSET" => Ok(Mode::Unset),
            "DISABLE" => Ok(Mode::Disable),
            "PERMISSIVE" => Ok(Mode::Permissive),
            "STRICT" => Ok(Mode::Strict),
            other => Err(format!(
                "{other:?} is not UNSET, DISABLE, PERMISSIVE or STRICT"
            )),
        }
    }

    /// Whether plaintext is refused (`Some(true)`), accepted, or inherited (`None`).
    /// DISABLE accepts it, as PERMISSIVE does (decision record 0008).
    fn effective(self) -> Option<bool> {
        match self {
            Mode::Unset => None,
            Mode::Permissive | Mode::Disable => Some(false),
            Mode::Strict => Some(true),
        }
    }
}

/// One PeerAuthentication, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuthn {
    pub key: ObjectKey,
    /// `metadata.creationTimestamp` as written (RFC 3339 sorts as text); empty first.
    pub created: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: Mode,
    pub ports: BTreeMap<u16, Mode>,
    pub acceptance: Acceptance,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    selector: Option<Selector>,
    mtls: Option<Mtls>,
    port_level_mtls: Option<BTreeMap<String, Mtls>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mtls {
    mode: Option<String>,
}

/// Reads one PeerAuthentication as the source kept it: one marked unreadable
/// (`PeerAuthentication::unreadable`) is STRICT for its scope.
pub fn read_object(key: &ObjectKey, pa: &crate::security::PeerAuthentication) -> PeerAuthn {
    let created = pa
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    read_spec(key, &created, &pa.spec, pa.unreadable.as_deref())
}

/// Reads one PeerAuthentication. Invalid → STRICT for its scope, with the reason.
pub fn read(key: &ObjectKey, created: &str, spec: &Value) -> PeerAuthn {
    read_spec(key, created, spec, None)
}

fn read_spec(key: &ObjectKey, created: &str, spec: &Value, unreadable: Option<&str>) -> PeerAuthn {
    let selector_of = |spec: &Value| {
        spec.get("selector")
            .and_then(|s| s.get("matchLabels"))
            .and_then(|l| serde_json::from_value::<BTreeMap<String, String>>(l.clone()).ok())
            .filter(|l| !l.is_empty())
    };
    let invalid = |message: String| PeerAuthn {
        key: key.clone(),
        created: created.to_owned(),
        selector: selector_of(spec),
        mode: Mode::Strict,
        ports: BTreeMap::new(),
        acceptance: Acceptance {
            accepted: false,
            reason: "InvalidValue",
            message: format!("{message}; enforced as STRICT"),
        },
    };
    if let Some(why) = unreadable {
        return invalid(format!("unreadable: {why}"));
    }
    let parsed: Spec = if spec.is_null() {
        Spec::default()
    } else {
        match serde_json::from_value(spec.clone()) {
            Ok(s) => s,
            Err(e) => return invalid(format!("spec: {e}")),
        }
    };
    let mode = match Mode::parse(parsed.mtls.as_ref().and_then(|m| m.mode.as_deref())) {
        Ok(m) => m,
        Err(e) => return invalid(format!("spec.mtls.mode: {e}")),
    };
    let selector = parsed
        .selector
        .map(|s| s.match_labels)
        .filter(|l| !l.is_empty());
    let mut ports = BTreeMap::new();
    for (port, mtls) in parsed.port_level_mtls.unwrap_or_default() {
        let number = match port.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                return invalid(format!(
                    "spec.portLevelMtls: {port:?} is not a port (1..65535)"
                ))
            }
        };
        match Mode::parse(mtls.mode.as_deref()) {
            Ok(m) => ports.insert(number, m),
            Err(e) => return invalid(format!("spec.portLevelMtls[{port}].mode: {e}")),
        };
    }
    if !ports.is_empty() && selector.is_none() {
        return invalid("spec.portLevelMtls: needs a selector".into());
    }
    let mut notes = Vec::new();
    if mode == Mode::Disable || ports.values().any(|m| *m == Mode::Disable) {
        notes.push(
            "DISABLE: plaintext is accepted as with PERMISSIVE, but mesh peers still use mutual TLS (ambient mode cannot turn it off)",
        );
    }
    PeerAuthn {
        key: key.clone(),
        created: created.to_owned(),
        selector,
        mode,
        ports,
        acceptance: if notes.is_empty() {
            Acceptance {
                accepted: true,
                reason: "Accepted",
                message: "enforced by ztunnel".into(),
            }
        } else {
            Acceptance {
                accepted: false,
                reason: "UnsupportedValue",
                message: notes.join("; "),
            }
        },
    }
}

/// The PeerAuthentications that decide a workload's mode, most specific first.
#[derive(Debug, Default)]
pub struct Index<'a> {
    mesh: Option<&'a PeerAuthn>,
    namespaces: BTreeMap<&'a str, &'a PeerAuthn>,
    selectors: BTreeMap<&'a str, Vec<&'a PeerAuthn>>,
}

impl<'a> Index<'a> {
    /// `all` sorted oldest first (then by key), so the first at each level wins.
    pub fn new(all: &'a [PeerAuthn], root_namespace: &str) -> Index<'a> {
        let mut sorted: Vec<&PeerAuthn> = all.iter().collect();
        sorted.sort_by(|a, b| (&a.created, &a.key).cmp(&(&b.created, &b.key)));
        let mut index = Index::default();
        for pa in sorted {
            let ns = pa.key.namespace.as_str();
            match (&pa.selector, ns == root_namespace) {
                (None, true) => {
                    index.mesh.get_or_insert(pa);
                }
                (None, false) => {
                    index.namespaces.entry(ns).or_insert(pa);
                }
                // A selector in the root namespace is ignored, as in Istio.
                (Some(_), true) => {}
                (Some(_), false) => index.selectors.entry(ns).or_default().push(pa),
            }
        }
        index
    }

    /// Whether any PeerAuthentication exists (without one, nothing is converted).
    pub fn is_empty(&self) -> bool {
        self.mesh.is_none() && self.namespaces.is_empty() && self.selectors.is_empty()
    }

    /// The DENY policy for a workload of `namespace` with `labels`, named for the
    /// PeerAuthentication that decides it, or none (plaintext accepted everywhere).
    pub fn policy_for(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Option<Policy> {
        let workload = self.selectors.get(namespace).and_then(|l| {
            l.iter().copied().find(|pa| {
                pa.selector.as_ref().is_some_and(|s| {
                    s.iter()
                        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
                })
            })
        });
        let levels = [workload, self.namespaces.get(namespace).copied(), self.mesh];
        // The workload's mode: the first level that sets one; PERMISSIVE at the top.
        let (strict, decider) = levels
            .iter()
            .flatten()
            .find_map(|pa| pa.mode.effective().map(|s| (s, *pa)))
            .unwrap_or((false, levels.iter().flatten().next().copied()?));
        // Port exceptions come from the workload-level policy only.
        let ports: BTreeMap<u16, bool> = workload
            .map(|pa| {
                pa.ports
                    .iter()
                    .filter_map(|(p, m)| m.effective().or(Some(strict)).map(|s| (*p, s)))
                    .collect()
            })
            .unwrap_or_default();
        let no_identity = || Match {
            not_principals: vec![StringMatch::Presence],
            ..Match::default()
        };
        // Named for what decides it, so equal policies share a key: the workload-level
        // policy when it has port exceptions, else the level that set the mode.
        let named = match workload.filter(|_| !ports.is_empty()) {
            Some(w) => w,
            None => decider,
        };
        let (name, matches) = if strict {
            let exempt: Vec<u16> = ports
                .iter()
                .filter(|(_, s)| !**s)
                .map(|(p, _)| *p)
                .collect();
            let mut m = no_identity();
            m.not_destination_ports = exempt;
            (format!("ambit-strict-mtls-{}", named.key.name), vec![m])
        } else {
            let strict_ports: Vec<u16> =
                ports.iter().filter(|(_, s)| **s).map(|(p, _)| *p).collect();
            if strict_ports.is_empty() {
                return None;
            }
            let mut m = no_identity();
            m.destination_ports = strict_ports;
            (format!("ambit-port-mtls-{}", named.key.name), vec![m])
        };
        Some(Policy {
            namespace: named.key.namespace.clone(),
            name,
            action: Action::Deny,
            dry_run: false,
            rules: vec![Rule {
                clauses: vec![Clause { matches }],
            }],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_core::authz::{evaluate, Connection};
    use ambit_core::SpiffeId;
    use serde_json::json;

    fn pa(ns: &str, name: &str, created: &str, spec: Value) -> PeerAuthn {
        read(&ObjectKey::new(ns, name), created, &spec)
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        [("app".to_owned(), app.to_owned())].into()
    }

    /// Whether a connection without (or with) a peer identity to `port` is allowed.
    fn allows(policy: &Option<Policy>, plaintext: bool, port: u16) -> bool {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/client").unwrap();
        let c = Connection {
            peer: (!plaintext).then_some(&id),
            source_ip: "10.1.0.2".parse().unwrap(),
            destination_ip: "10.2.0.2".parse().unwrap(),
            destination_port: port,
        };
        evaluate(policy.iter(), &c).allowed()
    }

    #[test]
    fn precedence_workload_over_namespace_over_mesh() {
        let all = vec![
            pa(
                "istio-system",
                "mesh",
                "2026-01-01T00:00:00Z",
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            pa(
                "legacy",
                "ns",
                "2026-01-01T00:00:00Z",
                json!({"mtls": {"mode": "PERMISSIVE"}}),
            ),
            pa(
                "shop",
                "db",
                "2026-01-01T00:00:00Z",
                json!({"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "PERMISSIVE"}}),
            ),
        ];
        let index = Index::new(&all, "istio-system");
        // Mesh STRICT: plaintext denied, mTLS allowed.
        let web = index.policy_for("shop", Some(&labels("web")));
        assert!(!allows(&web, true, 80));
        assert!(allows(&web, false, 80));
        // Namespace PERMISSIVE overrides the mesh.
        assert!(allows(&index.policy_for("legacy", None), true, 80));
        // Workload PERMISSIVE overrides the mesh.
        assert!(allows(
            &index.policy_for("shop", Some(&labels("db"))),
            true,
            80
        ));
    }

    #[test]
    fn unset_inherits_disable_accepts_plaintext_and_no_policy_means_permissive() {
        assert!(Index::new(&[], "istio-system")
            .policy_for("shop", None)
            .is_none());
        let all = vec![
            pa(
                "istio-system",
                "mesh",
                "",
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            pa("shop", "ns", "", json!({"mtls": {"mode": "DISABLE"}})),
            pa("legacy", "ns", "", json!({})),
        ];
        assert_eq!(all[1].acceptance.reason, "UnsupportedValue");
        assert!(all[1]
            .acceptance
            .message
            .contains("mesh peers still use mutual TLS"));
        let index = Index::new(&all, "istio-system");
        assert!(
            allows(&index.policy_for("shop", None), true, 80),
            "DISABLE overrides the mesh's STRICT, as in Istio"
        );
        assert!(
            !allows(&index.policy_for("legacy", None), true, 80),
            "UNSET inherits STRICT"
        );
    }

    #[test]
    fn the_oldest_wins_at_one_level_and_root_selectors_are_ignored() {
        let all = vec![
            pa(
                "shop",
                "newer",
                "2026-02-01T00:00:00Z",
                json!({"mtls": {"mode": "PERMISSIVE"}}),
            ),
            pa(
                "shop",
                "older",
                "2026-01-01T00:00:00Z",
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            pa(
                "istio-system",
                "sel",
                "",
                json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"}}),
            ),
        ];
        let index = Index::new(&all, "istio-system");
        assert!(!allows(&index.policy_for("shop", None), true, 80));
        assert!(allows(
            &index.policy_for("legacy", Some(&labels("web"))),
            true,
            80
        ));
    }

    #[test]
    fn port_level_mtls_makes_exceptions_both_ways() {
        let all = vec![
            pa("shop", "ns", "", json!({"mtls": {"mode": "STRICT"}})),
            pa(
                "shop",
                "web",
                "",
                json!({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}),
            ),
            pa(
                "shop",
                "db",
                "",
                json!({"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"5432": {"mode": "STRICT"}}}),
            ),
        ];
        let index = Index::new(&all, "istio-system");
        let web = index.policy_for("shop", Some(&labels("web")));
        assert!(allows(&web, true, 8080), "exempt port");
        assert!(!allows(&web, true, 9000), "inherited STRICT elsewhere");
        let db = index.policy_for("shop", Some(&labels("db")));
        assert!(!allows(&db, true, 5432));
        assert!(allows(&db, true, 80));
        assert!(allows(&db, false, 5432));
    }

    #[test]
    fn port_level_disable_lets_plaintext_in_on_its_port_as_in_istio() {
        let all = vec![
            pa("shop", "ns", "", json!({"mtls": {"mode": "STRICT"}})),
            // Under the namespace's STRICT, inherited.
            pa(
                "shop",
                "web",
                "",
                json!({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
            ),
            // Under its own STRICT.
            pa(
                "shop",
                "db",
                "",
                json!({"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "STRICT"}, "portLevelMtls": {"5432": {"mode": "DISABLE"}, "9000": {"mode": "UNSET"}}}),
            ),
        ];
        assert_eq!(all[1].acceptance.reason, "UnsupportedValue");
        let index = Index::new(&all, "istio-system");
        let web = index.policy_for("shop", Some(&labels("web")));
        assert!(allows(&web, true, 8080), "DISABLE port: plaintext in");
        assert!(!allows(&web, true, 9000), "other ports: STRICT");
        assert!(allows(&web, false, 9000));
        let db = index.policy_for("shop", Some(&labels("db")));
        assert!(allows(&db, true, 5432));
        assert!(!allows(&db, true, 9000), "UNSET port inherits STRICT");
        assert!(!allows(&db, true, 80));
    }

    #[test]
    fn invalid_peer_authentication_is_strict() {
        let cases = [
            (json!({"mtls": {"mode": "MAYBE"}}), "spec.mtls.mode"),
            (
                json!({"portLevelMtls": {"80": {"mode": "STRICT"}}}),
                "needs a selector",
            ),
            (
                json!({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"http": {"mode": "STRICT"}}}),
                "portLevelMtls",
            ),
            (
                json!({"mtls": {"mode": "PERMISSIVE"}, "typo": 1}),
                "unknown field",
            ),
        ];
        for (spec, field) in cases {
            let p = pa("shop", "bad", "", spec.clone());
            assert_eq!(p.acceptance.reason, "InvalidValue", "{spec}");
            assert!(
                p.acceptance.message.contains(field),
                "{spec}: {}",
                p.acceptance.message
            );
            let all = vec![p];
            let index = Index::new(&all, "istio-system");
            assert!(
                !allows(&index.policy_for("shop", Some(&labels("web"))), true, 80),
                "{spec}"
            );
        }
    }
}
