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
        let translation = translate_with(resources, &self.root_namespace);
        problems.extend(translation.skipped.iter().map(|s| format!("{s}; skipped")));
        problems.extend(translation.warnings.iter().map(ToString::to_string));
        // A policy not enforced as written says why (condition ZtunnelAccepted).
        problems.extend(
            translation
                .policy_status
                .iter()
                .filter(|(_, _, a)| !a.accepted)
                .map(|(kind, key, a)| {
                    format!(
                        "{kind} {key}: ZtunnelAccepted=False ({}): {}",
                        a.reason, a.message
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
        )
    }

    /// Whether a model has been published.
    pub fn has_published(&self) -> bool {
        self.model.is_some()
    }
}
