//! `ambitctl install` and `uninstall`.
//!
//! Install server-side applies each object with field manager `ambitctl`, in the
//! order Helm installs them, one progress line each (`created`, `configured`,
//! `unchanged`); it stops at the first object the API server refuses and says which
//! objects were applied before it and which were not. With `--wait` it then waits
//! until every object is ready ([`super::readiness`]) or the timeout passes, naming
//! what is not ready.
//!
//! Uninstall deletes every object an install can make, whatever `--set` it had
//! (CustomResourceDefinitions only with `--purge`), and what ambit-control made: the
//! root's ConfigMap in every namespace, its self-signed root's Secret, each waypoint's
//! ServiceAccount, Service and Deployment (the users' Gateways stay) and the
//! istio-waypoint GatewayClass. An object without Ambit's label (or, for what
//! ambit-control made, not written by it) is left alone and named. The workloads go
//! first, and are waited for, so the control plane cannot publish again what is
//! being removed.

use std::time::{Duration, Instant};

use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::Value;

use super::chart::{self, ObjectName, PART_OF};
use super::{readiness, Cluster, ClusterError};

/// How often readiness and deletion are polled.
const POLL: Duration = Duration::from_millis(500);

/// Why an install did not finish.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("install stopped at {failed}: {source}{}\n  applied before it (in the cluster now): {}\n  not applied: {}\n  fix the cause and run `ambitctl install` again (applying is idempotent), or `ambitctl uninstall` to remove what was made", hint(source), list(applied), list(not_applied))]
    Apply {
        failed: ObjectName,
        #[source]
        source: ClusterError,
        applied: Vec<ObjectName>,
        not_applied: Vec<ObjectName>,
    },
    #[error("timed out after {timeout:?} waiting for {}", waiting.iter().map(|(o, why)| format!("{o} ({why})")).collect::<Vec<_>>().join(", "))]
    Timeout {
        timeout: Duration,
        waiting: Vec<(ObjectName, String)>,
    },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Why an uninstall left something behind.
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("uninstall could not delete {}", failed.iter().map(|(o, e)| format!("{o}: {e}")).collect::<Vec<_>>().join("; "))]
    Failed { failed: Vec<(ObjectName, String)> },
    #[error("timed out after {timeout:?} waiting for {} to go", list(left))]
    Timeout {
        timeout: Duration,
        left: Vec<ObjectName>,
    },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// What to do about a refusal the API server explains by its code.
fn hint(e: &ClusterError) -> &'static str {
    match e.code() {
        Some(401) => "\n  the kubeconfig's credentials were not accepted: log in again",
        Some(403) => "\n  the kubeconfig's user may not do this: an install makes CRDs, ClusterRoles and bindings, which needs cluster-admin (`ambitctl precheck` lists what is missing)",
        Some(409) => "\n  another field manager owns fields of this object: `ambitctl precheck` names it; keep its object (e.g. --set crds.enabled=false) or take the fields over with --force-conflicts",
        _ => "",
    }
}

fn list(names: &[ObjectName]) -> String {
    if names.is_empty() {
        return "none".to_owned();
    }
    names
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What an install does.
#[derive(Debug, Clone)]
pub struct Install {
    pub objects: Vec<Value>,
    /// Take over fields another manager owns (kubectl's `--force-conflicts`).
    pub force_conflicts: bool,
    /// Wait for readiness this long; `None`: do not wait.
    pub wait: Option<Duration>,
}

/// Applies the objects, printing a line for each, then waits if asked.
pub async fn install(cluster: &Cluster, install: &Install) -> Result<(), InstallError> {
    cluster.version().await?;
    let names: Vec<ObjectName> = install.objects.iter().map(ObjectName::of).collect();
    let mut params = PatchParams::apply(super::FIELD_MANAGER);
    params.force = install.force_conflicts;
    for (i, (object, name)) in install.objects.iter().zip(&names).enumerate() {
        let stop = |source: ClusterError| InstallError::Apply {
            failed: name.clone(),
            source,
            applied: names[..i].to_vec(),
            not_applied: names[i + 1..].to_vec(),
        };
        let before = cluster.get(name).await.map_err(stop)?;
        let api = cluster.api(name).map_err(stop)?;
        let after = api
            .patch(&name.name, &params, &Patch::Apply(object))
            .await
            .map_err(|e| stop(cluster.error(format_args!("applying {name}"), e)))?;
        let what = match before {
            None => "created",
            Some(b)
                if b["metadata"]["resourceVersion"].as_str()
                    == after.metadata.resource_version.as_deref() =>
            {
                "unchanged"
            }
            Some(_) => "configured",
        };
        outln!("{what:<10} {name}").map_err(io_error)?;
    }
    if let Some(timeout) = install.wait {
        wait_ready(cluster, &names, timeout).await?;
    }
    Ok(())
}

fn io_error(e: std::io::Error) -> ClusterError {
    ClusterError::Client {
        source_name: "-".into(),
        context: "-".into(),
        reason: format!("writing to stdout: {e}"),
    }
}

/// Polls until every object is ready, printing each as it becomes so.
pub async fn wait_ready(
    cluster: &Cluster,
    names: &[ObjectName],
    timeout: Duration,
) -> Result<(), InstallError> {
    let start = Instant::now();
    let mut waiting: Vec<(ObjectName, String)> = names
        .iter()
        .filter(|n| {
            matches!(
                n.kind.as_str(),
                "CustomResourceDefinition" | "Deployment" | "DaemonSet"
            )
        })
        .map(|n| (n.clone(), "not read yet".to_owned()))
        .collect();
    loop {
        let mut still = Vec::new();
        for (name, _) in waiting {
            let why = match cluster.get(&name).await? {
                None => Err("it is gone".to_owned()),
                Some(o) => readiness::ready(&o),
            };
            match why {
                Ok(()) => outln!("{:<10} {name}", "ready").map_err(io_error)?,
                Err(why) => still.push((name, why)),
            }
        }
        if still.is_empty() {
            outln!("ready      everything, after {:.1?}", start.elapsed()).map_err(io_error)?;
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(InstallError::Timeout {
                timeout,
                waiting: still,
            });
        }
        waiting = still;
        tokio::time::sleep(POLL.min(timeout.saturating_sub(start.elapsed()))).await;
    }
}

/// What an uninstall removes.
#[derive(Debug, Clone, Copy)]
pub struct Uninstall {
    /// The CustomResourceDefinitions too (and with them every object of their kinds).
    pub purge: bool,
    /// How long to wait for the workloads, and with `wait` for everything, to go.
    pub timeout: Duration,
    /// Wait until every deleted object is gone (a namespace terminates for a while).
    pub wait: bool,
}

/// Deletes what an install made, one line per object.
pub async fn uninstall(cluster: &Cluster, how: Uninstall) -> Result<(), UninstallError> {
    cluster.version().await?;
    // Everything any --set could have installed: the default rendering.
    let everything = chart::default_objects();
    let mut workloads = Vec::new();
    let mut rest = Vec::new();
    for object in everything.iter().rev() {
        let name = ObjectName::of(object);
        match name.kind.as_str() {
            "Deployment" | "DaemonSet" => workloads.push(name),
            "CustomResourceDefinition" if !how.purge => {}
            _ => rest.push(name),
        }
    }
    let mut failed = Vec::new();
    let mut deleted = Vec::new();
    let mut kept_crds = 0;
    for name in &workloads {
        delete_ambits(cluster, name, &mut deleted, &mut failed).await;
    }
    // The control plane must be gone before what it publishes is removed.
    wait_gone(cluster, &deleted, how.timeout).await?;
    for name in made_by_control(cluster).await? {
        match delete(cluster, &name).await {
            Ok(true) => {
                outln!("{:<10} {name}", "deleted").ok();
                deleted.push(name);
            }
            Ok(false) => {}
            Err(e) => failed.push((name, e.to_string())),
        }
    }
    for name in &rest {
        delete_ambits(cluster, name, &mut deleted, &mut failed).await;
    }
    if !how.purge {
        kept_crds = everything
            .iter()
            .filter(|o| o["kind"] == "CustomResourceDefinition")
            .count();
    }
    if how.wait {
        wait_gone(cluster, &deleted, how.timeout).await?;
    }
    outln!(
        "removed {} objects{}",
        deleted.len(),
        if kept_crds > 0 {
            format!("; kept the {kept_crds} CustomResourceDefinitions (--purge removes them, and every object of their kinds)")
        } else {
            String::new()
        }
    )
    .ok();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(UninstallError::Failed { failed })
    }
}

/// Deletes `name` if it carries Ambit's label; says so either way.
async fn delete_ambits(
    cluster: &Cluster,
    name: &ObjectName,
    deleted: &mut Vec<ObjectName>,
    failed: &mut Vec<(ObjectName, String)>,
) {
    let object = match cluster.get(name).await {
        Ok(Some(o)) => o,
        Ok(None) => return,
        Err(e) => {
            failed.push((name.clone(), e.to_string()));
            return;
        }
    };
    if object["metadata"]["labels"][PART_OF.0] != PART_OF.1 {
        outln!(
            "{:<10} {name}: not Ambit's (no label {}={}), left alone",
            "kept",
            PART_OF.0,
            PART_OF.1
        )
        .ok();
        return;
    }
    match delete(cluster, name).await {
        Ok(true) => {
            outln!("{:<10} {name}", "deleted").ok();
            deleted.push(name.clone());
        }
        Ok(false) => {}
        Err(e) => failed.push((name.clone(), e.to_string())),
    }
}

/// Deletes `name` (its dependents first, for a workload); false if it was not there.
async fn delete(cluster: &Cluster, name: &ObjectName) -> Result<bool, ClusterError> {
    let api = cluster.api(name)?;
    let params = if matches!(name.kind.as_str(), "Deployment" | "DaemonSet") {
        DeleteParams::foreground()
    } else {
        DeleteParams::background()
    };
    match api.delete(&name.name, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(cluster.error(format_args!("deleting {name}"), e)),
    }
}

/// Whether the object's managed fields name `manager`.
fn managed_by(object: &Value, manager: &str) -> bool {
    object["metadata"]["managedFields"]
        .as_array()
        .is_some_and(|fields| fields.iter().any(|f| f["manager"] == manager))
}

/// What ambit-control made: the root's ConfigMap in each namespace, the self-signed
/// root's Secret, the waypoints' objects, the waypoint GatewayClass, each only if
/// ambit-control wrote it.
async fn made_by_control(cluster: &Cluster) -> Result<Vec<ObjectName>, ClusterError> {
    let mut made = Vec::new();
    let by_name = ListParams::default().fields(&format!("metadata.name={}", super::ROOT_CONFIGMAP));
    for cm in cluster.list("v1", "ConfigMap", None, &by_name).await? {
        if managed_by(&cm, super::CONTROL_FIELD_MANAGER) {
            made.push(ObjectName::of(&cm));
        }
    }
    let secret = ObjectName {
        api_version: "v1".into(),
        kind: "Secret".into(),
        namespace: Some(chart::NAMESPACE.into()),
        name: super::SELF_SIGNED_SECRET.into(),
    };
    if let Some(s) = cluster.get(&secret).await? {
        if s["metadata"]["labels"]["app.kubernetes.io/managed-by"] == super::CONTROL_FIELD_MANAGER {
            made.push(secret);
        }
    }
    // Each waypoint Gateway's ServiceAccount, Service and Deployment (the Gateways
    // are the user's and stay; a new install makes their waypoints again).
    let waypoints = ListParams::default().labels(super::WAYPOINT_LABEL);
    for (api_version, kind) in [
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("v1", "ServiceAccount"),
    ] {
        for o in cluster.list(api_version, kind, None, &waypoints).await? {
            if managed_by(&o, super::CONTROL_FIELD_MANAGER) {
                made.push(ObjectName::of(&o));
            }
        }
    }
    let class = ObjectName {
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "GatewayClass".into(),
        namespace: None,
        name: super::WAYPOINT_CLASS.into(),
    };
    match cluster.get(&class).await {
        Ok(Some(c)) if managed_by(&c, super::CONTROL_FIELD_MANAGER) => made.push(class),
        Ok(_) => {}
        // No Gateway API CRDs: no GatewayClass.
        Err(e) if e.code() == Some(404) => {}
        Err(e) => return Err(e),
    }
    Ok(made)
}

/// Polls until none of `names` exists.
async fn wait_gone(
    cluster: &Cluster,
    names: &[ObjectName],
    timeout: Duration,
) -> Result<(), UninstallError> {
    let start = Instant::now();
    let mut left: Vec<ObjectName> = names.to_vec();
    loop {
        let mut still = Vec::new();
        for name in left {
            match cluster.get(&name).await {
                Ok(None) => {}
                Err(e) if e.code() == Some(404) => {}
                Ok(Some(_)) => still.push(name),
                Err(e) => return Err(e.into()),
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(UninstallError::Timeout {
                timeout,
                left: still,
            });
        }
        left = still;
        tokio::time::sleep(POLL).await;
    }
}
