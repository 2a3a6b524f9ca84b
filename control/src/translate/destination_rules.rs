//! DestinationRules into the model (`MeshConfig.destination_rules`), for the
//! waypoints that route to their Services. A rule is read by
//! `ambit_k8s::destination_rule`; one that fails validation is left out and reported
//! with the field at fault (the publisher keeps its last good version, if it had one;
//! otherwise its Service is balanced as without a rule: round robin, no limits, and a
//! request for one of its subsets is answered 503 `NC`). Kept with a warning: a rule
//! whose Service does not exist (yet), and the younger of two rules for one Service,
//! which does not apply (the older one does, as Istio's oldest-first order).

use ambit_core::destination::DestinationRule;
use ambit_core::model::ServiceSpec;

use super::Skipped;
use crate::resources::Resources;

/// What the translation makes of the DestinationRules.
#[derive(Debug, Default)]
pub struct DestinationRules {
    pub rules: Vec<DestinationRule>,
    pub skipped: Vec<Skipped>,
    pub warnings: Vec<Skipped>,
}

const KIND: &str = "DestinationRule";

/// The rules of `resources` for `services` (the model's).
pub fn translate(resources: &Resources, services: &[ServiceSpec]) -> DestinationRules {
    let mut out = DestinationRules::default();
    for (key, object) in &resources.destination_rules {
        match ambit_k8s::destination_rule::read(key, object) {
            Ok(rule) => out.rules.push(rule),
            Err(reason) => out.skipped.push(Skipped {
                kind: KIND,
                key: key.clone(),
                reason,
            }),
        }
    }
    for rule in &out.rules {
        let key = crate::resources::ObjectKey::new(&rule.namespace, &rule.name);
        let service = format!("{}/{}", rule.service_namespace, rule.service_name);
        if !services
            .iter()
            .any(|s| s.namespace == rule.service_namespace && s.name == rule.service_name)
        {
            out.warnings.push(Skipped {
                kind: KIND,
                key: key.clone(),
                reason: format!(
                    "host: Service {service} not found; the rule applies once it exists"
                ),
            });
        }
        let older = out.rules.iter().find(|r| {
            r.service_namespace == rule.service_namespace
                && r.service_name == rule.service_name
                && (r.created, r.key()) < (rule.created, rule.key())
        });
        if let Some(older) = older {
            out.warnings.push(Skipped {
                kind: KIND,
                key,
                reason: format!(
                    "DestinationRule {} for Service {service} is older and applies instead",
                    older.key()
                ),
            });
        }
    }
    out
}
