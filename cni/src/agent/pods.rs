//! The enrolled pods of this node and the three ways they change: the runtime's CNI
//! calls (through the plugin), the model (labels changed on running pods), and the
//! agent's own start (pods it enrolled before, found again).
//!
//! Enrolling is: the redirect rules in the pod's namespace, then the pod handed to
//! ztunnel (which acks once it listens in the pod), then the report to the control
//! plane. Unenrolling is the reverse. A step that fails undoes the earlier ones, so a
//! pod is either enrolled or left as it was. One operation at a time per node: the
//! rules of a namespace must not be written concurrently, and enrolments are short.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_core::model::{MeshConfig, Protocol, WorkloadSpec};
use ambit_net::redirect::{self, Ipv6Mode, RedirectConfig, RedirectError};
use ambit_proto::handoff::WorkloadInfo;
use futures::StreamExt as _;
use tokio::sync::Mutex;

use super::control::Control;
use super::ztunnel::{Served, ZtunnelHandle};
use crate::protocol::{AgentCommand, AgentReply, AgentRequest, PodRef};

/// How the rules are written in every pod.
#[derive(Debug, Clone)]
pub struct RuleSettings {
    /// Sources never captured besides the node's SNAT addresses for its own
    /// connections (`ambit_net::redirect::node`).
    pub extra_probe_sources: Vec<IpAddr>,
    pub ipv6: Ipv6Mode,
}

/// A pod enrolled on this node.
#[derive(Debug)]
struct Enrolled {
    pod: PodRef,
    /// Its network namespace, kept open for ztunnel's next snapshot and the rules'
    /// removal.
    netns: File,
    /// Where it was found, for logs.
    netns_path: PathBuf,
    /// The model has shown it (with its address) since it was enrolled; once that is
    /// so, its leaving the model means the pod is gone.
    seen_in_model: bool,
    /// When its report was last sent.
    reported: Option<Instant>,
}

/// How long a report may take to show in the model before it is sent again.
const REPORT_AGAIN_AFTER: Duration = Duration::from_secs(3);
/// How many running pods are enrolled at once (each runs the rule tools).
const ENROL_AT_ONCE: usize = 8;
/// How long a deleted pod is not enrolled again from a model that still shows it.
const DELETED_FOR: Duration = Duration::from_secs(60);
/// How long an ADD waits for the control plane to learn of a new pod before the
/// runtime is told to try again.
const UNKNOWN_POD_WAIT: Duration = Duration::from_secs(5);

/// The node's enrolled pods and what changes them.
#[derive(Debug)]
pub struct Pods {
    node: String,
    control: Control,
    ztunnel: ZtunnelHandle,
    rules: RuleSettings,
    enrolled: Mutex<BTreeMap<String, Enrolled>>,
    /// The addresses the node SNATs its own connections to, per pod.
    snat: std::sync::Mutex<BTreeMap<String, Vec<IpAddr>>>,
    /// Pods whose last attempt failed, with the reason (logged when it changes).
    failing: std::sync::Mutex<BTreeMap<String, String>>,
    /// Pods deleted by the runtime (CNI DEL) that the model may still show for a
    /// moment: not to be enrolled again from it.
    deleted: std::sync::Mutex<BTreeMap<String, Instant>>,
}

impl Pods {
    pub fn new(
        node: String,
        control: Control,
        ztunnel: ZtunnelHandle,
        rules: RuleSettings,
    ) -> Arc<Pods> {
        Arc::new(Pods {
            node,
            control,
            ztunnel,
            rules,
            enrolled: Mutex::new(BTreeMap::new()),
            snat: Default::default(),
            failing: Default::default(),
            deleted: Default::default(),
        })
    }

    /// Answers one request of the plugin.
    pub async fn handle(&self, request: AgentRequest) -> AgentReply {
        let pod = request.pod.clone();
        let outcome = match request.command {
            AgentCommand::Add => self.cni_add(&request).await,
            AgentCommand::Del => self.cni_del(&request).await.map(|()| false),
            AgentCommand::Check => self.cni_check(&request).await,
        };
        match outcome {
            Ok(enrolled) => AgentReply::Done { enrolled },
            Err((reason, retry)) => {
                tracing::warn!(pod = %pod, command = ?request.command, %reason, retry, "CNI request failed");
                AgentReply::Failed { reason, retry }
            }
        }
    }

    async fn cni_add(&self, request: &AgentRequest) -> Result<bool, (String, bool)> {
        let pod = &request.pod;
        let answer = self.ask(pod).await?;
        if !answer.ambient {
            tracing::debug!(%pod, "not enrolled: its labels do not ask for it");
            return Ok(false);
        }
        let Some(path) = &request.netns else {
            return Err(("CNI_NETNS is missing for an ambient pod".into(), false));
        };
        let netns = File::open(path)
            .map_err(|e| (format!("network namespace {}: {e}", path.display()), false))?;
        let key = uid(pod);
        let mut enrolled = self.enrolled.lock().await;
        self.deleted_lock().remove(&key);
        if let Some(old) = enrolled.remove(&key) {
            if same_file(&old.netns, &netns) {
                enrolled.insert(key, old);
                return Ok(true);
            }
            // A new sandbox for the same pod name: the old one is gone or going.
            self.undo(&key, old, false).await;
        }
        let entry = self
            .enrol(
                pod.clone(),
                &answer.service_account,
                netns,
                path.clone(),
                &request.ips,
            )
            .await
            .map_err(|e| (e, true))?;
        enrolled.insert(key, entry);
        Ok(true)
    }

    async fn cni_del(&self, request: &AgentRequest) -> Result<(), (String, bool)> {
        let key = uid(&request.pod);
        let mut enrolled = self.enrolled.lock().await;
        self.deleted_lock().insert(key.clone(), Instant::now());
        if let Some(entry) = enrolled.remove(&key) {
            tracing::info!(pod = %key, "pod deleted (CNI DEL): unenrolling");
            self.undo(&key, entry, true).await;
        }
        Ok(())
    }

    async fn cni_check(&self, request: &AgentRequest) -> Result<bool, (String, bool)> {
        let key = uid(&request.pod);
        if self.enrolled.lock().await.contains_key(&key) {
            return Ok(true);
        }
        let answer = self.ask(&request.pod).await?;
        if answer.ambient {
            return Err((
                format!("{key} is to be captured but is not enrolled on this node"),
                false,
            ));
        }
        Ok(false)
    }

    /// The control plane's enrolment answer for `pod`; waits a little for a pod it does
    /// not know yet (the API server has the pod before the runtime makes its sandbox,
    /// but the control plane's watch may lag), then says to retry.
    async fn ask(
        &self,
        pod: &PodRef,
    ) -> Result<ambit_proto::nodeagent::EnrolmentAnswer, (String, bool)> {
        let start = Instant::now();
        loop {
            match self.control.enrolment(pod).await {
                Ok(answer) if answer.known => return Ok(answer),
                Ok(_) if start.elapsed() < UNKNOWN_POD_WAIT => {}
                Ok(_) => {
                    return Err((
                        format!(
                            "the control plane does not know pod {pod} on node {} yet",
                            self.node
                        ),
                        true,
                    ))
                }
                Err(e) => return Err((format!("asking whether to capture {pod}: {e}"), true)),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Rules, hand-off, report. On failure nothing of it is left.
    async fn enrol(
        &self,
        pod: PodRef,
        service_account: &str,
        netns: File,
        netns_path: PathBuf,
        ips: &[IpAddr],
    ) -> Result<Enrolled, String> {
        let key = uid(&pod);
        // The node's own connections to the pod (probes) get the exempt source before
        // the pod's rules capture every other source.
        self.node_snat(&key, Some(ips))
            .await
            .map_err(|e| format!("SNAT of the node's own connections: {e}"))?;
        let enrolled = self
            .enrol_rules_and_hand_off(pod, service_account, netns, netns_path)
            .await;
        if enrolled.is_err() {
            if let Err(e) = self.node_snat(&key, None).await {
                tracing::warn!(pod = %key, error = %e, "removing the node's SNAT for the pod failed");
            }
        }
        enrolled
    }

    async fn enrol_rules_and_hand_off(
        &self,
        pod: PodRef,
        service_account: &str,
        netns: File,
        netns_path: PathBuf,
    ) -> Result<Enrolled, String> {
        let key = uid(&pod);
        let started = Instant::now();
        let config = self.redirect_config();
        let rules_at = fd_path(&netns);
        let installed = {
            let config = config.clone();
            let at = rules_at.clone();
            tokio::task::spawn_blocking(move || redirect::install(&at, &config))
                .await
                .map_err(|e| format!("installing the redirect rules: {e}"))?
        };
        installed.map_err(|e| {
            format!(
                "installing the redirect rules in {}: {e}",
                netns_path.display()
            )
        })?;
        let handed = match netns.try_clone() {
            Ok(copy) => {
                let served = Served {
                    info: WorkloadInfo {
                        name: pod.name.clone(),
                        namespace: pod.namespace.clone(),
                        service_account: service_account.to_owned(),
                    },
                    netns: OwnedFd::from(copy),
                };
                self.ztunnel.add(&key, served).await
            }
            Err(e) => Err(format!("duplicating the namespace descriptor: {e}")),
        };
        if let Err(e) = handed {
            // Not served: the rules would only refuse the pod's traffic. Take them out.
            if let Err(undo) = remove_rules(&rules_at).await {
                tracing::error!(pod = %key, error = %undo, "removing the rules after a failed hand-off failed; the pod's TCP is refused until it is enrolled");
            }
            return Err(format!("handing the pod to ztunnel: {e}"));
        }
        let reported = match self.control.report(&pod, true).await {
            Ok(()) => Some(Instant::now()),
            Err(e) => {
                // Its traffic is captured and served: only the advertisement waits.
                tracing::warn!(pod = %key, error = %e, "redirection report failed; sent again shortly");
                None
            }
        };
        tracing::info!(
            pod = %key,
            netns = %netns_path.display(),
            service_account,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "pod enrolled: traffic captured and served by ztunnel"
        );
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        Ok(Enrolled {
            pod,
            netns,
            netns_path,
            seen_in_model: false,
            reported,
        })
    }

    /// Removes the pod's rules, withdraws the report (unless the pod is gone) and
    /// takes the pod from ztunnel, in that order: once peers are told the pod speaks
    /// plaintext its traffic must already go around ztunnel, and ztunnel's listeners in
    /// the pod close last, so no new connection is ever redirected to a listener that
    /// is gone (the other order refused the pod's connections for as long as the rules
    /// outlived the listeners). Logs what fails and goes on: what is left is found
    /// again by the next reconciliation or goes with the namespace.
    async fn undo(&self, key: &str, entry: Enrolled, pod_gone: bool) {
        match remove_rules(&fd_path(&entry.netns)).await {
            Ok(()) => {}
            Err(RedirectError::NetnsUnavailable { .. }) => {}
            Err(e) => tracing::warn!(pod = %key, error = %e, "removing the redirect rules failed"),
        }
        if !pod_gone {
            if let Err(e) = self.control.report(&entry.pod, false).await {
                tracing::warn!(pod = %key, error = %e, "withdrawing the redirection report failed");
            }
        }
        if let Err(e) = self.ztunnel.remove(key).await {
            tracing::warn!(pod = %key, error = %e, "taking the pod from ztunnel failed");
        }
        if let Err(e) = self.node_snat(key, None).await {
            tracing::warn!(pod = %key, error = %e, "removing the node's SNAT for the pod failed");
        }
        tracing::info!(pod = %key, netns = %entry.netns_path.display(), "pod unenrolled");
    }

    /// Brings the enrolled pods in line with `model`: enrols this node's running pods
    /// whose labels ask for it, unenrols those whose labels no longer do or that left
    /// the model, and sends reports the model does not show.
    pub async fn reconcile(&self, model: &MeshConfig) {
        let mine: BTreeMap<&str, &WorkloadSpec> = model
            .workloads
            .iter()
            .filter(|w| w.node == self.node && !w.ips.is_empty())
            .map(|w| (w.uid.as_str(), w))
            .collect();
        let mut enrolled = self.enrolled.lock().await;
        // A deleted pod stays deleted until it leaves the model (or a new sandbox of
        // that name is added); a tombstone is kept a while at most.
        self.deleted_lock()
            .retain(|key, at| mine.contains_key(key.as_str()) && at.elapsed() < DELETED_FOR);
        let deleted: Vec<String> = self.deleted_lock().keys().cloned().collect();
        // Gone from the model, or no longer asked for.
        let leaving: Vec<String> = enrolled
            .iter()
            .filter(|(key, e)| match mine.get(key.as_str()) {
                Some(w) => !w.ambient,
                None => e.seen_in_model,
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in leaving {
            let Some(entry) = enrolled.remove(&key) else {
                continue;
            };
            let gone = !mine.contains_key(key.as_str());
            tracing::info!(pod = %key, reason = if gone { "left the model" } else { "labels no longer ask for it" }, "unenrolling");
            self.undo(&key, entry, gone).await;
        }
        let mut to_enrol: Vec<&WorkloadSpec> = Vec::new();
        for (key, workload) in &mine {
            if let Some(entry) = enrolled.get_mut(*key) {
                entry.seen_in_model = true;
                let stale = entry
                    .reported
                    .is_none_or(|at| at.elapsed() > REPORT_AGAIN_AFTER);
                if workload.protocol != Protocol::Hbone && stale {
                    match self.control.report(&entry.pod, true).await {
                        Ok(()) => entry.reported = Some(Instant::now()),
                        Err(e) => self.failed(key, format!("redirection report: {e}")),
                    }
                }
                continue;
            }
            if deleted.iter().any(|d| d == key) {
                continue;
            }
            if workload.ambient {
                to_enrol.push(*workload);
            } else if workload.protocol == Protocol::Hbone {
                // Reported but not enrolled (an agent stopped half-way through an
                // unenrolment): finish it.
                self.clean_up_stale(workload).await;
            }
        }
        for (key, outcome) in self.enrol_running(&to_enrol).await {
            match outcome {
                Ok(mut entry) => {
                    entry.seen_in_model = true;
                    enrolled.insert(key, entry);
                }
                Err(e) => self.failed(&key, e),
            }
        }
    }

    /// Enrols pods that are already running, several at a time: their namespaces are
    /// found in one scan (the one holding each pod's IP), then each is enrolled.
    async fn enrol_running(
        &self,
        workloads: &[&WorkloadSpec],
    ) -> Vec<(String, Result<Enrolled, String>)> {
        if workloads.is_empty() {
            return Vec::new();
        }
        let wanted: Vec<Vec<std::net::IpAddr>> = workloads.iter().map(|w| w.ips.clone()).collect();
        let found = tokio::task::spawn_blocking(move || ambit_net::netns_scan::find_each(&wanted))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| format!("scanning the node's network namespaces: {e}")));
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                return workloads
                    .iter()
                    .map(|w| (w.uid.clone(), Err(e.clone())))
                    .collect()
            }
        };
        type Enrolment<'a> = std::pin::Pin<
            Box<dyn std::future::Future<Output = (String, Result<Enrolled, String>)> + Send + 'a>,
        >;
        let enrolments: Vec<Enrolment<'_>> = workloads.iter().zip(found).map(|(workload, found)| -> Enrolment<'_> { Box::pin(async move {
            let Some(found) = found else {
                return (
                    workload.uid.clone(),
                    Err(format!("no network namespace on this node holds {:?}", workload.ips)),
                );
            };
            let pod = PodRef {
                namespace: workload.namespace.clone(),
                name: workload.name.clone(),
                uid: None,
            };
            tracing::info!(pod = %workload.uid, netns = %found.path.display(), "running pod to be captured (labels)");
            let outcome = self
                .enrol(pod, &workload.service_account, found.file, found.path, &workload.ips)
                .await;
            (workload.uid.clone(), outcome)
        })}).collect();
        futures::stream::iter(enrolments)
            .buffer_unordered(ENROL_AT_ONCE)
            .collect()
            .await
    }

    async fn clean_up_stale(&self, workload: &WorkloadSpec) {
        let ips = workload.ips.clone();
        let found = tokio::task::spawn_blocking(move || ambit_net::netns_scan::find_by_ip(&ips))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        if let Some(found) = found {
            if let Err(e) = remove_rules(&found.path).await {
                self.failed(&workload.uid, format!("removing stale rules: {e}"));
                return;
            }
        }
        let _ = self.ztunnel.remove(&workload.uid).await;
        let pod = PodRef {
            namespace: workload.namespace.clone(),
            name: workload.name.clone(),
            uid: None,
        };
        match self.control.report(&pod, false).await {
            Ok(()) => tracing::info!(pod = %workload.uid, "stale redirection report withdrawn"),
            Err(e) => self.failed(&workload.uid, format!("withdrawing a stale report: {e}")),
        }
    }

    fn deleted_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Instant>> {
        self.deleted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(&self, key: &str, reason: String) {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if failing.get(key) != Some(&reason) {
            tracing::warn!(pod = %key, %reason, "enrolment not done; retried");
            failing.insert(key.to_owned(), reason);
        }
    }

    /// Has the node SNAT its own connections to pod `key`'s addresses (`Some`), or no
    /// longer (`None`).
    async fn node_snat(&self, key: &str, ips: Option<&[IpAddr]>) -> Result<(), RedirectError> {
        let (add, remove): (BTreeSet<IpAddr>, BTreeSet<IpAddr>) = {
            let mut snat = self.snat.lock().unwrap_or_else(|p| p.into_inner());
            match ips {
                Some(ips) => {
                    snat.insert(key.to_owned(), ips.to_vec());
                    (ips.iter().copied().collect(), BTreeSet::new())
                }
                None => {
                    let gone = snat.remove(key).unwrap_or_default();
                    let still: BTreeSet<IpAddr> = snat.values().flatten().copied().collect();
                    let gone = gone.into_iter().filter(|ip| !still.contains(ip)).collect();
                    (BTreeSet::new(), gone)
                }
            }
        };
        let own = PathBuf::from(format!("/proc/{}/ns/net", std::process::id()));
        tokio::task::spawn_blocking(move || redirect::node_snat(&own, &add, &remove))
            .await
            .unwrap_or_else(|e| {
                Err(RedirectError::NetnsUnavailable {
                    netns: PathBuf::new(),
                    source: std::io::Error::other(e.to_string()),
                })
            })
    }

    /// The rules' settings.
    fn redirect_config(&self) -> RedirectConfig {
        let mut probe_sources = redirect::node::probe_sources();
        for ip in &self.rules.extra_probe_sources {
            if !probe_sources.contains(ip) {
                probe_sources.push(*ip);
            }
        }
        RedirectConfig {
            probe_sources,
            ipv6: self.rules.ipv6,
            ..RedirectConfig::default()
        }
    }

    /// The pods enrolled now, by uid.
    pub async fn enrolled(&self) -> Vec<String> {
        self.enrolled.lock().await.keys().cloned().collect()
    }
}

/// The pod's key in the model and in ztunnel: `namespace/name`.
fn uid(pod: &PodRef) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

fn same_file(a: &File, b: &File) -> bool {
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// A path to an open namespace for the tools the rules are written with, which enter
/// it by path: this process's descriptor, as any process sees it.
fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        file.as_raw_fd()
    ))
}

async fn remove_rules(netns: &Path) -> Result<(), RedirectError> {
    let netns = netns.to_owned();
    tokio::task::spawn_blocking(move || redirect::remove(&netns))
        .await
        .unwrap_or_else(|e| {
            Err(RedirectError::NetnsUnavailable {
                netns: PathBuf::new(),
                source: std::io::Error::other(e.to_string()),
            })
        })
}
