//! Node agents' reports that a pod's traffic is captured (`ambit.nodeagent.v1.Redirection`
//! on the control plane's port). Only a node agent may report, only for a pod scheduled
//! on its own node (and, given its uid, for that very pod). The translation advertises a
//! workload as HBONE only while its report stands.
//!
//! Where a report lives depends on the source: in a cluster it is the pod annotation
//! `ambient.istio.io/redirection: enabled`, written through the API server (the watch
//! brings it back into the model); in local mode the control plane keeps it in
//! [`Reports`], written to a file (`--state-dir`) before the report is acknowledged and
//! read back at start, and merged into the directory's pods before each translation.
//!
//! Either way a report is as durable as the pod: a restart of the control plane, or a
//! node agent that is down, never turns a captured pod back into plaintext. Only an
//! explicit unenrolment does: the node agent withdrawing its report, the pod leaving
//! the source (after a read of the directory that had no errors) or coming back as
//! another pod (another uid), or its labels no longer asking for ambient mode (then the
//! translation says plaintext whatever the report).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
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
use serde::{Deserialize, Serialize};
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

/// The file [`Reports`] keeps in the state directory.
pub const REPORTS_FILE: &str = "redirections.json";

/// The reports file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ReportsError {
    #[error("redirection reports {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("redirection reports {path}: not a reports file ({source}); fix or remove it (the node agents then report their pods again)")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The file's content: the captured pods, with the uid reported (empty if unknown).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportsFile {
    captured: Vec<CapturedPod>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapturedPod {
    namespace: String,
    name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    uid: String,
}

/// The pods reported captured, in local mode, each with the uid it was reported for
/// (empty when neither the report nor the source had one), and the file they are kept
/// in.
#[derive(Debug, Default)]
pub struct Reports {
    captured: Mutex<BTreeMap<ObjectKey, String>>,
    file: Option<PathBuf>,
}

impl Reports {
    /// Reports kept in `dir`/[`REPORTS_FILE`], starting with those it holds: none if it
    /// does not exist yet; an unreadable or malformed file is an error naming it.
    pub fn load(dir: &Path) -> Result<Reports, ReportsError> {
        let path = dir.join(REPORTS_FILE);
        let captured = match fs::read(&path) {
            Ok(bytes) => {
                let file: ReportsFile =
                    serde_json::from_slice(&bytes).map_err(|source| ReportsError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                file.captured
                    .into_iter()
                    .map(|p| (ObjectKey::new(&p.namespace, &p.name), p.uid))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(ReportsError::Io { path, source }),
        };
        Ok(Reports {
            captured: Mutex::new(captured),
            file: Some(path),
        })
    }

    /// How many pods are reported captured.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no pod is reported captured.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ObjectKey, String>> {
        self.captured.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a report; it stands once written to the file (on failure nothing
    /// changes and the node agent is told to try again).
    fn set(&self, key: ObjectKey, uid: String, enabled: bool) -> Result<(), ReportsError> {
        let mut captured = self.lock();
        let mut next = captured.clone();
        if enabled {
            next.insert(key, uid);
        } else {
            next.remove(&key);
        }
        if next != *captured {
            self.save(&next)?;
            *captured = next;
        }
        Ok(())
    }

    /// Writes `captured` to the file: a temporary file, synced, renamed into place.
    fn save(&self, captured: &BTreeMap<ObjectKey, String>) -> Result<(), ReportsError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let file = ReportsFile {
            captured: captured
                .iter()
                .map(|(key, uid)| CapturedPod {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    uid: uid.clone(),
                })
                .collect(),
        };
        let io = |source| ReportsError::Io {
            path: path.clone(),
            source,
        };
        let mut text = serde_json::to_vec_pretty(&file)
            .map_err(std::io::Error::other)
            .map_err(io)?;
        text.push(b'\n');
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io)?;
        let tmp = dir.join(format!(".{REPORTS_FILE}.tmp"));
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        out.write_all(&text).map_err(io)?;
        out.sync_all().map_err(io)?;
        fs::rename(&tmp, path).map_err(io)?;
        // The rename itself made durable.
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }

    /// Marks the reported pods of `resources` captured (the annotation a cluster's node
    /// agent would set). Forgets the reports of pods that came back with another uid,
    /// and, when `complete` (the source was read without errors, so a missing pod is
    /// really gone), of pods no longer there.
    pub fn apply(&self, resources: &mut Resources, complete: bool) {
        let mut captured = self.lock();
        let stands = |key: &ObjectKey, uid: &String| match resources.pods.get(key) {
            None => !complete,
            Some(pod) => {
                let now = pod.metadata.uid.as_deref().unwrap_or_default();
                uid.is_empty() || now.is_empty() || now == uid
            }
        };
        // Called on every poll: the map is copied only when a report is to go.
        if !captured.iter().all(|(key, uid)| stands(key, uid)) {
            let mut next = captured.clone();
            next.retain(|key, uid| stands(key, uid));
            match self.save(&next) {
                Ok(()) => *captured = next,
                // Kept, and forgotten at a later read: a stale report can only keep a
                // pod HBONE, never open plaintext.
                Err(e) => {
                    tracing::warn!(error = %e, "forgetting redirection reports of pods that are gone")
                }
            }
        }
        for key in captured.keys() {
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
            ReportSink::Local(reports) => {
                let uid = match report.uid.is_empty() {
                    false => report.uid.clone(),
                    true => self
                        .pods
                        .scheduled(&key)
                        .map(|pod| pod.uid)
                        .unwrap_or_default(),
                };
                reports
                    .set(key.clone(), uid, report.enabled)
                    .map_err(|e| refuse(Status::unavailable(e.to_string())))?;
            }
            ReportSink::Kubernetes(client) => {
                // A JSON merge patch: only this annotation changes (null removes it).
                // Through the pods/status subresource, as Istio's CNI agent does, so
                // the control plane needs no right to patch pods themselves (their
                // spec): the API server keeps the spec of a status patch as it was.
                let value = report.enabled.then_some("enabled");
                let patch = serde_json::json!({
                    "metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}
                });
                Api::<Pod>::namespaced(client.clone(), &key.namespace)
                    .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
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
