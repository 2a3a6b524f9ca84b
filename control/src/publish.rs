//! From the current objects to what the control plane serves: the placements the CA
//! authorizes node agents against, and the xDS snapshot. Shared by both sources; each
//! calls [`Publisher::publish`] with its objects whenever they may have changed.

use std::sync::Arc;

use ambit_core::model::MeshConfig;
use tokio::sync::watch;

use crate::placement::Placements;
use crate::resources::Resources;
use crate::translate::translate_with;
use crate::xds::Snapshot;

/// The published model and what has been reported about it.
#[derive(Debug)]
pub struct Publisher {
    placements: Arc<Placements>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    model: Option<MeshConfig>,
    /// Problems already logged, so each is logged once, when it appears.
    reported: Vec<String>,
    version: u64,
    /// Where mesh-wide policies live.
    root_namespace: String,
}

impl Publisher {
    pub fn new(placements: Arc<Placements>, snapshots: watch::Sender<Arc<Snapshot>>) -> Self {
        Publisher {
            placements,
            snapshots,
            model: None,
            reported: Vec::new(),
            version: 0,
            root_namespace: crate::translate::DEFAULT_ROOT_NAMESPACE.to_owned(),
        }
    }

    /// Policies in `namespace` apply mesh-wide.
    pub fn with_root_namespace(mut self, namespace: &str) -> Self {
        namespace.clone_into(&mut self.root_namespace);
        self
    }

    /// Updates the placements, translates `resources` and publishes a snapshot if the
    /// model changed. `problems` are the source's own (e.g. a file that does not
    /// parse); they and the objects the translation skipped are logged once each, when
    /// they appear, naming `source`. Returns the status conditions the objects should
    /// carry.
    pub fn publish(
        &mut self,
        resources: &Resources,
        mut problems: Vec<String>,
        source: &str,
    ) -> Vec<crate::status::Wanted> {
        self.placements.update(resources);
        let mut translation = translate_with(resources, &self.root_namespace);
        // An HTTPRoute whose new version cannot be enforced keeps routing by its last
        // good one, rather than falling back to its Services' own endpoints.
        let previous = self.model.as_ref().map_or(&[][..], |m| &m.http_routes[..]);
        // A DestinationRule likewise keeps its last good version.
        let previous_rules = self
            .model
            .as_ref()
            .map_or(&[][..], |m| &m.destination_rules[..]);
        for s in &translation.skipped {
            if s.kind == "DestinationRule" {
                let last_good = previous_rules
                    .iter()
                    .find(|r| r.namespace == s.key.namespace && r.name == s.key.name);
                match last_good {
                    Some(kept) => {
                        translation.config.destination_rules.push(kept.clone());
                        problems.push(format!("{s}; its last good version stays"));
                    }
                    None => problems.push(format!("{s}; skipped")),
                }
                continue;
            }
            let last_good = previous.iter().find(|r| {
                s.kind == r.route.kind()
                    && r.route.namespace == s.key.namespace
                    && r.route.name == s.key.name
            });
            match last_good {
                Some(kept) => {
                    translation.config.http_routes.push(kept.clone());
                    problems.push(format!("{s}; its last good version stays"));
                }
                None => problems.push(format!("{s}; skipped")),
            }
        }
        problems.extend(translation.warnings.iter().map(ToString::to_string));
        // A policy not enforced as written says why (its acceptance condition). A
        // DestinationRule's problems are among the skipped and the warnings already.
        problems.extend(
            translation
                .policy_status
                .iter()
                .filter(|(kind, _, a)| !a.accepted && *kind != "DestinationRule")
                .map(|(kind, key, a)| {
                    format!(
                        "{kind} {key}: {}=False ({}): {}",
                        crate::status::policy_condition(kind),
                        a.reason,
                        a.message
                    )
                }),
        );
        for problem in problems.iter().filter(|p| !self.reported.contains(p)) {
            tracing::warn!(%problem, %source, "not in the model as written");
        }
        self.reported = problems;
        if self.model.as_ref() != Some(&translation.config) {
            self.version += 1;
            tracing::info!(
                version = self.version,
                workloads = translation.config.workloads.len(),
                services = translation.config.services.len(),
                policies = translation.config.policies.len(),
                "model changed"
            );
            self.snapshots
                .send_replace(Arc::new(Snapshot::new(self.version, &translation.config)));
            self.model = Some(translation.config);
        }
        crate::status::wanted(
            &translation.skipped,
            &translation.policy_status,
            &translation.waypoint_status,
            &translation.route_status,
        )
    }

    /// Whether a model has been published.
    pub fn has_published(&self) -> bool {
        self.model.is_some()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ambit_core::identity::TrustDomain;
    use ambit_k8s::read::parse_file;

    const ROUTE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews}]
  rules: [{matches: [{path: {type: PathPrefix, value: /v2}}], backendRefs: [{name: reviews, port: 80}]}]
";

    fn resources(yaml: &str) -> Resources {
        let parsed = parse_file(std::path::Path::new("mesh.yaml"), yaml);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let mut r = Resources::default();
        for o in parsed.objects {
            r.insert(o);
        }
        r
    }

    fn routes(rx: &watch::Receiver<Arc<Snapshot>>) -> Vec<String> {
        rx.borrow()
            .resources
            .keys()
            .filter(|k| k.starts_with("httproute/"))
            .cloned()
            .collect()
    }

    const RULE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy: {outlierDetection: {interval: 1s}}
";

    #[test]
    fn every_destination_rule_says_in_its_status_whether_it_applies() {
        let yaml = format!(
            "{RULE}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: younger, namespace: shop, creationTimestamp: '2030-01-01T00:00:00Z'}}\n\
             spec: {{host: reviews}}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: bad, namespace: shop}}\n\
             spec: {{host: ratings, trafficPolicy: {{loadBalancer: {{simple: FASTEST}}}}}}\n\
             ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: early, namespace: shop}}\n\
             spec: {{host: details}}\n"
        );
        let t = crate::translate::translate(&resources(&yaml));
        let wanted = crate::status::wanted(
            &t.skipped,
            &t.policy_status,
            &t.waypoint_status,
            &t.route_status,
        );
        let of = |name: &str| {
            let w = wanted
                .iter()
                .find(|w| w.kind == "DestinationRule" && w.key.name == name)
                .unwrap_or_else(|| panic!("no status for {name}: {wanted:?}"));
            assert_eq!(w.conditions.len(), 1, "{w:?}");
            let c = &w.conditions[0];
            assert_eq!(c.type_, "WaypointAccepted");
            (c.accepted, c.reason.clone(), c.message.clone())
        };
        let (ok, reason, _) = of("reviews");
        assert!(ok && reason == "Accepted", "{reason}");
        let (ok, reason, message) = of("younger");
        assert!(!ok && reason == "Overridden", "{reason}");
        assert!(message.contains("shop/reviews is older"), "{message}");
        let (ok, reason, message) = of("bad");
        assert!(!ok && reason == "InvalidValue", "{reason}");
        assert!(message.contains("FASTEST"), "{message}");
        let (ok, reason, message) = of("early");
        assert!(ok && reason == "ServiceNotFound", "{reason}");
        assert!(message.contains("shop/details not found"), "{message}");
    }

    #[test]
    fn an_invalid_update_of_a_destination_rule_keeps_its_last_good_version_and_says_so() {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let mut publisher = Publisher::new(Arc::new(Placements::new(TrustDomain::default())), tx);
        publisher.publish(&resources(RULE), Vec::new(), "test");
        let name = "destinationrule/shop/reviews";
        let good = rx.borrow().resources[name].clone();
        publisher.publish(
            &resources(&RULE.replace("interval: 1s", "interval: soon")),
            Vec::new(),
            "test",
        );
        assert_eq!(rx.borrow().resources[name], good);
        assert!(
            publisher.reported.iter().any(|p| p.contains(
                "DestinationRule shop/reviews: spec.trafficPolicy.outlierDetection.interval"
            ) && p.ends_with("its last good version stays")),
            "{:?}",
            publisher.reported
        );
        publisher.publish(
            &resources(RULE.split("---").next().unwrap()),
            Vec::new(),
            "test",
        );
        assert!(!rx.borrow().resources.contains_key(name));
    }

    #[test]
    fn an_invalid_update_of_a_route_keeps_its_last_good_version_and_says_so() {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        let mut publisher = Publisher::new(Arc::new(Placements::new(TrustDomain::default())), tx);
        publisher.publish(&resources(ROUTE), Vec::new(), "test");
        assert_eq!(routes(&rx), ["httproute/shop/canary"]);
        let good = rx.borrow().resources["httproute/shop/canary"].clone();

        publisher.publish(
            &resources(&ROUTE.replace(
                "type: PathPrefix, value: /v2",
                "type: RegularExpression, value: '/(v2'",
            )),
            Vec::new(),
            "test",
        );
        assert_eq!(rx.borrow().resources["httproute/shop/canary"], good);
        assert!(
            publisher
                .reported
                .iter()
                .any(|p| p.contains("HTTPRoute shop/canary")
                    && p.ends_with("its last good version stays")),
            "{:?}",
            publisher.reported
        );

        // Deleted, it goes; invalid with no good version before, it is left out.
        publisher.publish(
            &resources(ROUTE.split("---").next().unwrap()),
            Vec::new(),
            "test",
        );
        assert!(routes(&rx).is_empty());
        publisher.publish(
            &resources(&ROUTE.replace(
                "type: PathPrefix, value: /v2",
                "type: RegularExpression, value: '/(v2'",
            )),
            Vec::new(),
            "test",
        );
        assert!(routes(&rx).is_empty());
    }
}
