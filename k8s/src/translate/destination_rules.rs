//! DestinationRules into the model (`MeshConfig.destination_rules`), for the
//! waypoints that route to their Services. A rule is read by
//! `crate::destination_rule`; one that fails validation is left out and reported
//! with the field at fault (the publisher keeps its last good version, if it had one;
//! otherwise its Service is balanced as without a rule: round robin, no limits, and a
//! request for one of its subsets is answered 503 `NC`). Kept with a warning: a rule
//! whose Service does not exist (yet), and the younger of two rules for one Service,
//! which does not apply (the older one does, as Istio's oldest-first order).
//!
//! Each rule's status says which it is (condition `WaypointAccepted`, the waypoints
//! being what applies a rule): `Accepted`; `InvalidValue` with the field at fault;
//! `Overridden` by an older rule for the same Service; or accepted with reason
//! `ServiceNotFound` while its Service does not exist.

use ambit_core::destination::DestinationRule;
use ambit_core::model::ServiceSpec;

use super::Skipped;
use crate::authz::Acceptance;
use crate::resources::{ObjectKey, Resources};

/// What the translation makes of the DestinationRules.
#[derive(Debug, Default)]
pub struct DestinationRules {
    pub rules: Vec<DestinationRule>,
    pub skipped: Vec<Skipped>,
    pub warnings: Vec<Skipped>,
    /// Every rule's condition, for its status.
    pub status: Vec<(ObjectKey, Acceptance)>,
}

const KIND: &str = "DestinationRule";

/// The rules of `resources` for `services` (the model's).
pub fn translate(resources: &Resources, services: &[ServiceSpec]) -> DestinationRules {
    let mut out = DestinationRules::default();
    for (key, object) in &resources.destination_rules {
        match crate::destination_rule::read(key, object) {
            Ok(rule) => out.rules.push(rule),
            Err(reason) => {
                out.status.push((
                    key.clone(),
                    Acceptance {
                        accepted: false,
                        reason: "InvalidValue",
                        message: reason.clone(),
                    },
                ));
                out.skipped.push(Skipped {
                    kind: KIND,
                    key: key.clone(),
                    reason,
                });
            }
        }
    }
    for rule in &out.rules {
        let key = ObjectKey::new(&rule.namespace, &rule.name);
        let mut acceptance = Acceptance {
            accepted: true,
            reason: "Accepted",
            message: format!(
                "applies to Service {}/{}",
                rule.service_namespace, rule.service_name
            ),
        };
        let service = format!("{}/{}", rule.service_namespace, rule.service_name);
        if !services
            .iter()
            .any(|s| s.namespace == rule.service_namespace && s.name == rule.service_name)
        {
            let reason =
                format!("host: Service {service} not found; the rule applies once it exists");
            acceptance = Acceptance {
                accepted: true,
                reason: "ServiceNotFound",
                message: reason.clone(),
            };
            out.warnings.push(Skipped {
                kind: KIND,
                key: key.clone(),
                reason,
            });
        }
        let older = out.rules.iter().find(|r| {
            r.service_namespace == rule.service_namespace
                && r.service_name == rule.service_name
                && (r.created, r.key()) < (rule.created, rule.key())
        });
        if let Some(older) = older {
            let reason = format!(
                "DestinationRule {} for Service {service} is older and applies instead",
                older.key()
            );
            acceptance = Acceptance {
                accepted: false,
                reason: "Overridden",
                message: reason.clone(),
            };
            out.warnings.push(Skipped {
                kind: KIND,
                key: key.clone(),
                reason,
            });
        }
        out.status.push((key, acceptance));
    }
    out
}
