//! `ambitctl waypoint generate|apply|list|status|delete` on the running local mesh,
//! with istioctl waypoint's flags and columns. `apply` and `delete` go through `local
//! apply`/`local delete` (the same checks, the supervisor starts and stops the pod);
//! `list` and `status` read the Gateways the control plane reads and probe each
//! waypoint pod's readiness, as `local status` does.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ambit_k8s::gateway::{WAYPOINT_CLASS, WAYPOINT_FOR_LABEL};
use ambit_k8s::waypoints::USE_WAYPOINT_LABEL;
use anyhow::Context;

use crate::config::{WaypointArgs, WaypointCommand};
use crate::local::waypoints;

/// The Gateway of waypoint `name` in `namespace` serving `traffic_type`.
pub fn gateway_yaml(namespace: &str, w: &WaypointArgs) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\n\
         kind: Gateway\n\
         metadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    {WAYPOINT_FOR_LABEL}: {for_}\n\
         spec:\n  gatewayClassName: {WAYPOINT_CLASS}\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n",
        name = w.name,
        for_ = w.traffic_type,
    )
}

/// Where `apply` keeps the file it applies, so `delete` finds it again.
fn file_of(state_dir: &Path, namespace: &str, name: &str) -> anyhow::Result<PathBuf> {
    let mesh = crate::local::running(state_dir)?;
    let dir = mesh.dir.join("waypoints");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    Ok(dir.join(format!("waypoint-{namespace}-{name}.yaml")))
}

/// One waypoint as `list` and `status` show it.
#[derive(Debug, serde::Serialize)]
struct Row {
    namespace: String,
    name: String,
    revision: &'static str,
    traffic_type: String,
    programmed: bool,
    reason: String,
    serves: Vec<String>,
}

fn rows(state_dir: &Path, namespace: Option<&str>) -> anyhow::Result<Vec<Row>> {
    let mesh = crate::local::running(state_dir)?;
    let k8s = mesh.dir.join("k8s");
    let resources = waypoints::load(&k8s)?;
    let found = waypoints::read(&mesh, &k8s)?;
    let mut out = Vec::new();
    for view in found.waypoints {
        let (ns, name) = view.gateway.split_once('/').unwrap_or(("", &view.gateway));
        if namespace.is_some_and(|n| n != ns) {
            continue;
        }
        let traffic_type = resources
            .gateways
            .get(&ambit_k8s::ObjectKey::new(ns, name))
            .and_then(|g| g.metadata.labels.as_ref())
            .and_then(|l| l.get(WAYPOINT_FOR_LABEL))
            .cloned()
            .unwrap_or_else(|| "service".to_owned());
        let programmed = view.readiness == "ready";
        out.push(Row {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            revision: "default",
            traffic_type,
            programmed,
            reason: if programmed {
                "Programmed: a waypoint pod is ready".to_owned()
            } else {
                format!("Pending: {}", view.readiness)
            },
            serves: view.serves,
        });
    }
    Ok(out)
}

fn print_list(rows: &[Row], all_namespaces: bool, output: &str) -> anyhow::Result<()> {
    if output == "json" {
        crate::outln!("{}", serde_json::to_string_pretty(rows)?)?;
        return Ok(());
    }
    anyhow::ensure!(output == "table", "-o {output:?}: expected table or json");
    if rows.is_empty() {
        crate::outln!("No waypoints found.")?;
        return Ok(());
    }
    let ns = |n: &str| {
        if all_namespaces {
            format!("{n:<16} ")
        } else {
            String::new()
        }
    };
    crate::outln!(
        "{}{:<20} {:<10} {:<14} PROGRAMMED",
        ns("NAMESPACE"),
        "NAME",
        "REVISION",
        "TRAFFIC TYPE"
    )?;
    for r in rows {
        crate::outln!(
            "{}{:<20} {:<10} {:<14} {}",
            ns(&r.namespace),
            r.name,
            r.revision,
            r.traffic_type,
            if r.programmed { "True" } else { "False" }
        )?;
    }
    Ok(())
}

fn print_status(
    rows: &[Row],
    namespace: &str,
    name: Option<&str>,
    output: &str,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !rows.is_empty(),
        "no waypoint{} in namespace {namespace}",
        name.map(|n| format!(" {n}")).unwrap_or_default()
    );
    if output == "json" {
        crate::outln!("{}", serde_json::to_string_pretty(rows)?)?;
    } else {
        crate::outln!("{:<20} {:<12} {:<8} MESSAGE", "NAME", "CONDITION", "STATUS")?;
        for r in rows {
            crate::outln!(
                "{:<20} {:<12} {:<8} {}{}",
                r.name,
                "Programmed",
                if r.programmed { "True" } else { "False" },
                r.reason,
                if r.serves.is_empty() {
                    String::new()
                } else {
                    format!("; serves {}", r.serves.join(", "))
                }
            )?;
        }
    }
    Ok(if rows.iter().all(|r| r.programmed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn run(
    state_dir: &Path,
    namespace: &str,
    command: WaypointCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        WaypointCommand::Generate { waypoint } => {
            crate::out!("{}", gateway_yaml(namespace, &waypoint))?;
            Ok(ExitCode::SUCCESS)
        }
        WaypointCommand::Apply {
            waypoint,
            enroll_namespace,
            overwrite,
            wait,
            timeout,
        } => {
            let mut yaml = gateway_yaml(namespace, &waypoint);
            if enroll_namespace {
                let mesh = crate::local::running(state_dir)?;
                let resources = waypoints::load(&mesh.dir.join("k8s"))?;
                let mut labels = resources
                    .namespaces
                    .get(namespace)
                    .with_context(|| {
                        format!("--enroll-namespace: no namespace {namespace} in the running mesh")
                    })?
                    .metadata
                    .labels
                    .clone()
                    .unwrap_or_default();
                if let Some(other) = labels
                    .get(USE_WAYPOINT_LABEL)
                    .filter(|c| **c != waypoint.name)
                {
                    anyhow::ensure!(
                        overwrite,
                        "namespace {namespace} already uses waypoint {other} ({USE_WAYPOINT_LABEL}); pass --overwrite to replace it"
                    );
                }
                // The namespace as it runs, its other labels kept: only the waypoint
                // label changes.
                labels.insert(USE_WAYPOINT_LABEL.to_owned(), waypoint.name.clone());
                let document = serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": namespace, "labels": labels},
                });
                yaml.push_str("---\n");
                yaml.push_str(&serde_yaml_ng::to_string(&document)?);
            }
            let file = file_of(state_dir, namespace, &waypoint.name)?;
            std::fs::write(&file, &yaml).with_context(|| format!("{}", file.display()))?;
            let applied = crate::local::apply(state_dir, &file)?;
            if applied != ExitCode::SUCCESS || !wait {
                return Ok(applied);
            }
            let deadline = Instant::now() + timeout;
            loop {
                let programmed = rows(state_dir, Some(namespace))?
                    .iter()
                    .any(|r| r.name == waypoint.name && r.programmed);
                if programmed {
                    crate::outln!("waypoint {namespace}/{} programmed", waypoint.name)?;
                    return Ok(ExitCode::SUCCESS);
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "waypoint {namespace}/{} not programmed within {timeout:?} (see `ambitctl waypoint status -n {namespace}`)",
                    waypoint.name
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        WaypointCommand::List {
            all_namespaces,
            output,
        } => {
            let rows = rows(state_dir, (!all_namespaces).then_some(namespace))?;
            print_list(&rows, all_namespaces, &output)?;
            Ok(ExitCode::SUCCESS)
        }
        WaypointCommand::Status { name, output } => {
            let rows: Vec<Row> = rows(state_dir, Some(namespace))?
                .into_iter()
                .filter(|r| name.as_ref().is_none_or(|n| *n == r.name))
                .collect();
            print_status(&rows, namespace, name.as_deref(), &output)
        }
        WaypointCommand::Delete { names, all } => {
            let names: Vec<String> = if all {
                rows(state_dir, Some(namespace))?
                    .into_iter()
                    .map(|r| r.name)
                    .collect()
            } else {
                names
            };
            anyhow::ensure!(!names.is_empty(), "name the waypoints to delete, or --all");
            for name in names {
                let file = file_of(state_dir, namespace, &name)?;
                anyhow::ensure!(
                    file.exists(),
                    "waypoint {namespace}/{name} was not applied with `ambitctl waypoint apply`; delete the file that made it with `ambitctl local delete -f`"
                );
                crate::local::delete(state_dir, &file)?;
                let _ = std::fs::remove_file(&file);
                crate::outln!("waypoint {namespace}/{name} deleted")?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The same commands on a cluster: the Gateway server-side applied (field manager
/// ambitctl), the namespace label patched, `list` and `status` from the Gateways'
/// `status.conditions` (Programmed) as the control plane writes them.
pub fn run_cluster(
    args: &crate::cluster::ClusterArgs,
    namespace: &str,
    command: WaypointCommand,
) -> anyhow::Result<ExitCode> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{
        Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
        PatchParams,
    };
    if let WaypointCommand::Generate { waypoint } = &command {
        crate::out!("{}", gateway_yaml(namespace, waypoint))?;
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let cluster = crate::cluster::Cluster::connect(args).await?;
        let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway");
        let resource = ApiResource::from_gvk_with_plural(&gvk, "gateways");
        let gateways: Api<DynamicObject> =
            Api::namespaced_with(cluster.client.clone(), namespace, &resource);
        let rows = |all: bool| {
            let api: Api<DynamicObject> = if all {
                Api::all_with(cluster.client.clone(), &resource)
            } else {
                gateways.clone()
            };
            let cluster = cluster.clone();
            async move {
                let list = api
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| cluster.error("list gateways", e))?;
                let mut out = Vec::new();
                for g in list.items {
                    let v = serde_json::to_value(&g)?;
                    if v["spec"]["gatewayClassName"] != WAYPOINT_CLASS {
                        continue;
                    }
                    let programmed = v["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|c| c["type"] == "Programmed")
                        .cloned()
                        .unwrap_or_default();
                    out.push(Row {
                        namespace: v["metadata"]["namespace"].as_str().unwrap_or("").to_owned(),
                        name: v["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                        revision: "default",
                        traffic_type: v["metadata"]["labels"][WAYPOINT_FOR_LABEL]
                            .as_str()
                            .unwrap_or("service")
                            .to_owned(),
                        programmed: programmed["status"] == "True",
                        reason: if programmed.is_null() {
                            "no Programmed condition yet (is ambit-control running?)".to_owned()
                        } else {
                            format!(
                                "{}: {}",
                                programmed["reason"].as_str().unwrap_or(""),
                                programmed["message"].as_str().unwrap_or("")
                            )
                        },
                        serves: Vec::new(),
                    });
                }
                Ok::<_, anyhow::Error>(out)
            }
        };
        match command {
            WaypointCommand::Generate { .. } => Ok(ExitCode::SUCCESS),
            WaypointCommand::Apply {
                waypoint,
                enroll_namespace,
                overwrite,
                wait,
                timeout,
            } => {
                let gateway: serde_json::Value =
                    serde_yaml_ng::from_str(&gateway_yaml(namespace, &waypoint))?;
                gateways
                    .patch(
                        &waypoint.name,
                        &PatchParams::apply(crate::cluster::FIELD_MANAGER),
                        &Patch::Apply(&gateway),
                    )
                    .await
                    .map_err(|e| cluster.error(format!("apply Gateway {namespace}/{}", waypoint.name), e))?;
                crate::outln!("waypoint {namespace}/{} applied", waypoint.name)?;
                if enroll_namespace {
                    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
                    let ns = namespaces
                        .get(namespace)
                        .await
                        .map_err(|e| cluster.error(format!("get namespace {namespace}"), e))?;
                    let current = ns
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(USE_WAYPOINT_LABEL))
                        .cloned();
                    if let Some(other) = current.filter(|c| *c != waypoint.name) {
                        anyhow::ensure!(
                            overwrite,
                            "namespace {namespace} already uses waypoint {other} ({USE_WAYPOINT_LABEL}); pass --overwrite to replace it"
                        );
                    }
                    let patch = serde_json::json!({"metadata": {"labels": {USE_WAYPOINT_LABEL: waypoint.name}}});
                    namespaces
                        .patch(namespace, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(|e| cluster.error(format!("label namespace {namespace}"), e))?;
                    crate::outln!("namespace {namespace} labelled {USE_WAYPOINT_LABEL}={}", waypoint.name)?;
                }
                if !wait {
                    return Ok(ExitCode::SUCCESS);
                }
                let deadline = Instant::now() + timeout;
                loop {
                    let now = rows(false).await?;
                    if now.iter().any(|r| r.name == waypoint.name && r.programmed) {
                        crate::outln!("waypoint {namespace}/{} programmed", waypoint.name)?;
                        return Ok(ExitCode::SUCCESS);
                    }
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "waypoint {namespace}/{} not programmed within {timeout:?} (see `ambitctl waypoint status -n {namespace}`)",
                        waypoint.name
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            WaypointCommand::List {
                all_namespaces,
                output,
            } => {
                print_list(&rows(all_namespaces).await?, all_namespaces, &output)?;
                Ok(ExitCode::SUCCESS)
            }
            WaypointCommand::Status { name, output } => {
                let rows: Vec<Row> = rows(false)
                    .await?
                    .into_iter()
                    .filter(|r| name.as_ref().is_none_or(|n| *n == r.name))
                    .collect();
                print_status(&rows, namespace, name.as_deref(), &output)
            }
            WaypointCommand::Delete { names, all } => {
                let names: Vec<String> = if all {
                    rows(false).await?.into_iter().map(|r| r.name).collect()
                } else {
                    names
                };
                anyhow::ensure!(!names.is_empty(), "name the waypoints to delete, or --all");
                let known: Vec<String> = rows(false).await?.into_iter().map(|r| r.name).collect();
                for name in names {
                    anyhow::ensure!(
                        known.contains(&name),
                        "no waypoint {namespace}/{name} (a Gateway of class {WAYPOINT_CLASS})"
                    );
                    gateways
                        .delete(&name, &DeleteParams::default())
                        .await
                        .map_err(|e| cluster.error(format!("delete Gateway {namespace}/{name}"), e))?;
                    crate::outln!("waypoint {namespace}/{name} deleted")?;
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}
