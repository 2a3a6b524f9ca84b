//! Node agents' reports that a pod's traffic is captured (`ambit.nodeagent.v1.Redirection`
//! on the control plane's port). Only a node agent may report, only for a pod scheduled
//! on its own node (and, given its uid, for that very pod). The translation advertises a
//! workload as HBONE only while its report stands.
//!
//! Where a report lives depends on the source: in a cluster it is the pod annotation
//! `ambient.istio.io/redirection: enabled`, written through the API server (the watch
//! brings it back into the model); in local mode the control plane keeps it in memory,
//! [`Reports`], merged into the directory's pods before each translation. A pod that
//! leaves the directory loses its report.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use ambit_ca::auth::{authenticate_request, Authenticator};
use ambit_core::certificate::Caller;
use ambit_proto::nodeagent::redirection_server::Redirection;
use ambit_proto::nodeagent::{
    EnrolmentAnswer, EnrolmentQuery, RedirectionReport, RedirectionReportAck,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::Api;
use tonic::{Request, Response, Status};

use crate::placement::Placements;
use crate::resources::{ObjectKey, Resources};
use crate::translate::REDIRECTION_ANNOTATION;

/// Where accepted reports go.
#[derive(Clone)]
pub enum ReportSink {
    /// Local mode: kept here.
    Local(Arc<Reports>),
    /// A cluster: the pod annotation, through this client.
    Kubernetes(kube::Client),
}

impl std::fmt::Debug for ReportSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReportSink::Local(r) => f.debug_tuple("Local").field(r).finish(),
            ReportSink::Kubernetes(_) => f.write_str("Kubernetes"),
        }
    }
}

/// The pods reported captured, in local mode.
#[derive(Debug, Default)]
pub struct Reports {
    captured: Mutex<BTreeSet<ObjectKey>>,
}

impl Reports {
    fn set(&self, key: ObjectKey, enabled: bool) {
        let mut captured = self.captured.lock().unwrap_or_else(PoisonError::into_inner);
        if enabled {
            captured.insert(key);
        } else {
            captured.remove(&key);
        }
    }

    /// Marks the reported pods of `resources` captured (the annotation a cluster's node
    /// agent would set), and forgets reports of pods no longer there.
    pub fn apply(&self, resources: &mut Resources) {
        let mut captured = self.captured.lock().unwrap_or_else(PoisonError::into_inner);
        captured.retain(|key| resources.pods.contains_key(key));
        for key in captured.iter() {
            if let Some(pod) = resources.pods.get_mut(key) {
                pod.metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(REDIRECTION_ANNOTATION.to_owned(), "enabled".to_owned());
            }
        }
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct RedirectionService {
    authenticators: Vec<Arc<dyn Authenticator>>,
    pods: Arc<Placements>,
    sink: ReportSink,
}

/// The node of a node agent; anyone else is refused.
fn agent_node(caller: &Caller) -> Result<String, Status> {
    match (&caller.node, caller.node_agent) {
        (Some(node), true) => Ok(node.clone()),
        _ => Err(Status::permission_denied(format!(
            "{} is not a node agent: only node agents report redirection or ask about enrolment",
            caller.identity
        ))),
    }
}

impl RedirectionService {
    pub fn new(
        authenticators: Vec<Arc<dyn Authenticator>>,
        pods: Arc<Placements>,
        sink: ReportSink,
    ) -> Self {
        RedirectionService {
            authenticators,
            pods,
            sink,
        }
    }
}

#[tonic::async_trait]
impl Redirection for RedirectionService {
    async fn report(
        &self,
        request: Request<RedirectionReport>,
    ) -> Result<Response<RedirectionReportAck>, Status> {
        let caller = authenticate_request(&self.authenticators, &request).await?;
        let report = request.into_inner();
        let key = ObjectKey::new(&report.namespace, &report.name);
        let refuse = |status: Status| {
            tracing::warn!(caller = %caller.identity, pod = %key, error = %status.message(), "redirection report refused");
            status
        };
        let node = agent_node(&caller).map_err(refuse)?;
        match self.pods.scheduled(&key) {
            None => {
                return Err(refuse(Status::not_found(format!(
                    "pod {key} is not known or not scheduled"
                ))))
            }
            Some(pod) if pod.node != node => {
                return Err(refuse(Status::permission_denied(format!(
                    "pod {key} runs on {}, not on the caller's node {node}",
                    pod.node
                ))))
            }
            Some(pod) if !report.uid.is_empty() && !pod.uid.is_empty() && pod.uid != report.uid => {
                return Err(refuse(Status::failed_precondition(format!(
                    "pod {key} is now uid {}; the report is for uid {}",
                    pod.uid, report.uid
                ))))
            }
            Some(_) => {}
        }
        match &self.sink {
            ReportSink::Local(reports) => reports.set(key.clone(), report.enabled),
            ReportSink::Kubernetes(client) => {
                // A JSON merge patch: only this annotation changes (null removes it).
                let value = report.enabled.then_some("enabled");
                let patch = serde_json::json!({
                    "metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}
                });
                Api::<Pod>::namespaced(client.clone(), &key.namespace)
                    .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|e| Status::unavailable(format!("annotating pod {key}: {e}")))?;
            }
        }
        tracing::info!(pod = %key, %node, enabled = report.enabled, "redirection reported");
        Ok(Response::new(RedirectionReportAck {}))
    }

    async fn enrolment(
        &self,
        request: Request<EnrolmentQuery>,
    ) -> Result<Response<EnrolmentAnswer>, Status> {
        let caller = authenticate_request(&self.authenticators, &request).await?;
        let node = agent_node(&caller)?;
        let query = request.into_inner();
        let key = ObjectKey::new(&query.namespace, &query.name);
        let unknown = EnrolmentAnswer::default();
        let answer = match self.pods.scheduled(&key) {
            None => unknown,
            Some(pod) if pod.node != node => {
                return Err(Status::permission_denied(format!(
                    "pod {key} runs on {}, not on the caller's node {node}",
                    pod.node
                )))
            }
            // An earlier pod of that name: the new one is not known yet.
            Some(pod) if !query.uid.is_empty() && !pod.uid.is_empty() && pod.uid != query.uid => {
                unknown
            }
            Some(pod) => EnrolmentAnswer {
                known: true,
                ambient: pod.ambient,
                service_account: pod
                    .identity
                    .as_ref()
                    .map(|id| id.service_account().to_owned())
                    .unwrap_or_default(),
            },
        };
        tracing::debug!(pod = %key, %node, known = answer.known, ambient = answer.ambient, "enrolment asked");
        Ok(Response::new(answer))
    }
}
