//! The process that owns a running local mesh (`ambitctl local supervise`, started by
//! `up`): it builds the mesh from the YAML, starts the control plane, the ztunnels and
//! the node agents, makes the pods through each node's CNI chain (where `ambit-cni`
//! enrols those the labels ask for), starts the demo apps, records the mesh for the
//! other commands,
//! and tears everything down on SIGTERM (`down`) or SIGINT. Its output is the
//! supervisor log, which `up` relays while it starts.
//!
//! `down` is SIGTERM to the supervisor followed by a sweep. The state directory
//! (`AMBITCTL_STATE_DIR`, default `<tmp>/ambit-localmesh/ctl`) holds `supervisor.pid`
//! (created exclusively: one mesh per directory), `supervisor.log`, `mesh.json`,
//! `hosts` and `requests/`, where `local apply` and `local delete` ask for what only
//! the supervisor can do ([`super::live`]: start or stop a waypoint, change a running
//! object's waypoint labels).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use ambit_localmesh::{
    Ambient, AmbientConfig, LocalMesh, Pod, PodSpec, Process, ServiceAccount, ServiceSpec,
};
use ambit_net::process::LogFormat;
use anyhow::Context;

use super::live::Live;
use super::requests::{self, Reply};
use super::state::{self, MeshState, NodeState, PodState, ServiceState};
use crate::manifest::{self, App, TargetPort};

/// How long each component may take to start.
const DEADLINE: Duration = Duration::from_secs(30);

pub fn run(
    state_dir: &Path,
    dir: &Path,
    bin_dir: &Path,
    log_format: LogFormat,
) -> anyhow::Result<ExitCode> {
    if let Err(e) = state::create_pid_file(state_dir) {
        anyhow::bail!(
            "{}: {e}: another local mesh is running (or starting) with this state directory",
            state_dir.join(state::PID_FILE).display()
        );
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(supervise(state_dir, dir, bin_dir, log_format)));
    state::clear(state_dir);
    result.map(|()| ExitCode::SUCCESS)
}

async fn supervise(
    state_dir: &Path,
    dir: &Path,
    bin_dir: &Path,
    log_format: LogFormat,
) -> anyhow::Result<()> {
    // The terminal `up` ran in may close: the mesh stays until `down`.
    let _ignore_hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let app = manifest::load_dir(dir)?;
    println!(
        "==> building nodes {} as network namespaces",
        app.nodes.join(", ")
    );
    let mesh = LocalMesh::builder()
        .nodes(app.nodes.iter().cloned())
        .build()
        .context("building the local mesh (it needs root, iproute2, iptables, nftables and containernetworking-plugins: scripts/system-packages.sh)")?;
    let mut notes = app.notes.clone();
    mesh.declare_kubernetes(app.objects.clone());

    println!("==> starting ambit-control (xDS and the CA), and on every node a ztunnel and the node agent (ambit-cni agent, which joins the node's CNI chain)");
    let mut ambient = Ambient::start(
        &mesh,
        AmbientConfig {
            control: bin_dir.join("ambit-control"),
            ztunnel: bin_dir.join("ztunnel"),
            // Info: the access log's line per connection, and no debug logging on the
            // hot path.
            ztunnel_log: "info".into(),
            ztunnel_flags: vec!["--log-format".into(), log_format.to_string()],
            deadline: DEADLINE,
            node_agent: Some(bin_dir.join("ambit-cni")),
            // Every pod's service account gets a CA token, as Kubernetes projects one
            // (audience istio-ca) into every pod: waypoints talk to the control plane
            // as themselves, and a foreign proxy serving a pod (Istio's ztunnel) gets
            // that workload's certificate with it (`<mesh dir>/sa-<ns>-<sa>.token`).
            accounts: app
                .pods
                .iter()
                .map(|p| ServiceAccount {
                    namespace: p.namespace.clone(),
                    name: p.service_account.clone(),
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        },
    )?;
    let pods = make_pods(&mesh, &app)?;
    let services = make_services(&mesh, &app, &pods, &mut notes)?;
    if !services.is_empty() {
        // The pods were announced as they were made; the services are news.
        ambient.update_model(&mesh).await?;
    }

    println!("==> starting the demo app (HTTP echo, TCP echo) in every pod");
    let exe = std::env::current_exe()?;
    let mut apps: Vec<Process> = Vec::new();
    for (spec, pod) in app.pods.iter().zip(&pods) {
        if let Some(gateway) = &spec.waypoint {
            println!(
                "==> waypoint {}/{gateway}: pod {} on {} as service account {} (HBONE 15008, ready 15021)",
                spec.namespace,
                spec.uid(),
                pod.node(),
                spec.service_account
            );
            let config = super::live::waypoint_config(
                bin_dir.join("waypoint"),
                &spec.namespace,
                gateway,
                ServiceAccount {
                    namespace: spec.namespace.clone(),
                    name: spec.service_account.clone(),
                },
                log_format,
            );
            apps.push(ambit_localmesh::ambient::start_waypoint(
                &mesh, pod, &config, DEADLINE,
            )?);
            continue;
        }
        let node = mesh.node(pod.node())?;
        let mut args: Vec<String> = [
            "app",
            "serve",
            "--pod",
            &spec.uid(),
            "--node",
            pod.node(),
            "--node-netns",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(node.netns().path().to_string_lossy().into_owned());
        for port in &spec.http_ports {
            args.extend(["--http".to_owned(), port.to_string()]);
        }
        for port in &spec.tcp_ports {
            args.extend(["--tcp".to_owned(), port.to_string()]);
        }
        let process = mesh.spawn_in(pod.netns(), &exe, &args, &[])?;
        process.wait_for_log("listening", DEADLINE)?;
        apps.push(process);
    }

    for (spec, pod) in app.pods.iter().zip(&pods).filter(|(s, _)| s.enrolled) {
        let took = ambient
            .wait_for_protocol(&mesh, pod, ambit_localmesh::Protocol::Hbone)
            .await?;
        println!(
            "==> {} is in ambient mode: captured at CNI ADD by the node agent of {}, reached over HBONE by every ztunnel ({} ms)",
            spec.uid(),
            pod.node(),
            took.as_millis()
        );
    }

    let mut pids: Vec<u32> = apps.iter().map(Process::pid).collect();
    pids.push(ambient.control().pid());
    pids.extend(ambient.ztunnels().map(|(_, z)| z.pid()));
    pids.extend(
        mesh.nodes()
            .iter()
            .filter_map(|n| ambient.node_agent(n.name()))
            .map(Process::pid),
    );
    let mut recorded = MeshState {
        supervisor: std::process::id(),
        id: mesh.id().to_string(),
        dir: mesh.dir().to_owned(),
        app: dir.to_owned(),
        control: ambit_localmesh::ambient::control_address(&mesh).to_string(),
        fabric_netns: mesh.fabric().path().to_owned(),
        nodes: mesh
            .nodes()
            .iter()
            .map(|n| NodeState {
                name: n.name().to_owned(),
                ip: n.ip(),
                netns: n.netns().path().to_owned(),
            })
            .collect(),
        pods: app
            .pods
            .iter()
            .zip(&pods)
            .map(|(spec, pod)| PodState {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                node: pod.node().to_owned(),
                ip: pod.ip(),
                ip6: pod.ip6(),
                service_account: pod.service_account().to_owned(),
                enrolled: spec.enrolled,
                netns: pod.netns().path().to_owned(),
                http_ports: spec.http_ports.clone(),
                tcp_ports: spec.tcp_ports.clone(),
                waypoint: spec.waypoint.clone(),
            })
            .collect(),
        services,
        pids,
        notes,
    };
    recorded.write(state_dir)?;
    println!("{}", state::READY_LINE);

    // Until `down`: what `local apply` and `local delete` ask of the mesh.
    let mut live = Live::new(
        app.objects.clone(),
        app.nodes
            .first()
            .cloned()
            .unwrap_or_else(|| manifest::DEFAULT_NODE.to_owned()),
        bin_dir.join("waypoint"),
        log_format,
        DEADLINE,
    );
    let shutdown = ambit_net::process::shutdown_signal();
    tokio::pin!(shutdown);
    let mut poll = tokio::time::interval(requests::POLL);
    // ztunnels an upgrade replaced, by node, until they have drained.
    let mut draining: Vec<(String, u32)> = Vec::new();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = poll.tick() => {}
        }
        // Replaced ztunnels that have drained are reaped.
        draining.retain(|(node, pid)| {
            let still = ambient.draining().iter().any(|p| p.pid() == *pid);
            if !still {
                println!("==> {node}: the replaced ztunnel (pid {pid}) has drained and exited");
                recorded.pids.retain(|p| p != pid);
            }
            still
        });
        for (reply_at, request) in requests::take(state_dir) {
            let reply = match request {
                Ok(request) if request.upgrade.is_some() => {
                    let upgrade = request.upgrade.as_ref().map_or(&[][..], |u| &u.nodes[..]);
                    let binary = request.upgrade.as_ref().and_then(|u| u.binary.as_deref());
                    let (reply, replaced) =
                        upgrade_ztunnels(&mesh, &mut ambient, &mut recorded, upgrade, binary);
                    for line in &reply.lines {
                        println!("==> upgrade: {line}");
                    }
                    draining.extend(replaced);
                    reply
                }
                Ok(request) => {
                    let reply = live
                        .handle(&mesh, &mut ambient, &mut recorded, &request)
                        .await;
                    for line in &reply.lines {
                        println!(
                            "==> {} {line}",
                            if request.delete { "delete:" } else { "apply:" }
                        );
                    }
                    reply
                }
                Err(why) => Reply {
                    ok: false,
                    lines: vec![why],
                    draining: Vec::new(),
                },
            };
            if let Err(e) = recorded.write(state_dir) {
                println!("==> cannot record the mesh: {e:#}");
            }
            if let Err(e) = requests::answer(&reply_at, &reply) {
                println!("==> cannot answer {}: {e:#}", reply_at.display());
            }
        }
    }
    println!("==> stopping: demo apps, ztunnels, control plane, pods (CNI DEL), namespaces");
    drop(live);
    drop(apps);
    drop(ambient);
    mesh.teardown()?;
    println!("==> stopped; nothing is left");
    Ok(())
}

/// Replaces the ztunnels of `nodes` (every node when empty), one node at a time, each
/// new one serving every pod before the old one is stopped. The reply says what each
/// node went through; with it, the replaced ztunnels, still draining.
fn upgrade_ztunnels(
    mesh: &LocalMesh,
    ambient: &mut Ambient,
    recorded: &mut MeshState,
    nodes: &[String],
    binary: Option<&Path>,
) -> (Reply, Vec<(String, u32)>) {
    let nodes: Vec<String> = if nodes.is_empty() {
        recorded.nodes.iter().map(|n| n.name.clone()).collect()
    } else {
        nodes.to_vec()
    };
    let mut lines = Vec::new();
    let mut replaced = Vec::new();
    for node in &nodes {
        match ambient.upgrade_ztunnel(mesh, node, binary) {
            Ok(u) => {
                lines.push(format!(
                    "{node}: ztunnel pid {} serves every pod (handed over in {} ms); pid {} stopped accepting and drains its open connections",
                    u.new_pid,
                    u.handover.as_millis(),
                    u.old_pid
                ));
                recorded.pids.push(u.new_pid);
                replaced.push((node.clone(), u.old_pid));
            }
            Err(e) => {
                lines.push(format!(
                    "{node}: {e:#}; its running ztunnel was left serving the node"
                ));
                let draining = replaced.iter().map(|(_, p)| *p).collect();
                return (
                    Reply {
                        ok: false,
                        lines,
                        draining,
                    },
                    replaced,
                );
            }
        }
    }
    let draining = replaced.iter().map(|(_, p)| *p).collect();
    (
        Reply {
            ok: true,
            lines,
            draining,
        },
        replaced,
    )
}

fn make_pods(mesh: &LocalMesh, app: &App) -> anyhow::Result<Vec<Pod>> {
    let mut pods = Vec::new();
    for spec in &app.pods {
        println!(
            "==> pod {} on {} (CNI ADD: ptp + host-local, then ambit-cni)",
            spec.uid(),
            spec.node
        );
        let mut pod_spec =
            PodSpec::new(&spec.namespace, &spec.name).service_account(&spec.service_account);
        for (k, v) in &spec.labels {
            pod_spec = pod_spec.label(k, v);
        }
        pods.push(
            mesh.add_pod(&spec.node, pod_spec)
                .with_context(|| format!("making pod {}", spec.uid()))?,
        );
    }
    Ok(pods)
}

fn make_services(
    mesh: &LocalMesh,
    app: &App,
    pods: &[Pod],
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<ServiceState>> {
    let by_uid: BTreeMap<String, (&manifest::AppPod, &Pod)> = app
        .pods
        .iter()
        .zip(pods)
        .map(|(spec, pod)| (spec.uid(), (spec, pod)))
        .collect();
    let mut made = Vec::new();
    for service in &app.services {
        let key = format!("{}/{}", service.namespace, service.name);
        let endpoints: Vec<&(&manifest::AppPod, &Pod)> = service
            .endpoints
            .iter()
            .filter_map(|uid| by_uid.get(uid))
            .collect();
        let mut spec = ServiceSpec::new(&service.namespace, &service.name);
        if let Some(vip) = service.vip {
            spec = spec.vip(vip);
        }
        let mut ports = Vec::new();
        for (port, target) in &service.ports {
            let target = match target {
                TargetPort::Number(n) => Some(*n),
                // The mesh's rules have one target per port: the first endpoint's.
                TargetPort::Name(name) => endpoints
                    .iter()
                    .find_map(|(spec, _)| spec.named_ports.get(name).copied()),
            };
            match target {
                Some(target) => {
                    spec = spec.port(*port, target);
                    ports.push((*port, target));
                }
                None => notes.push(format!(
                    "service {key}: port {port}'s target port names no container port of its endpoints; skipped"
                )),
            }
        }
        if ports.is_empty() {
            continue;
        }
        spec = spec.endpoints(endpoints.iter().map(|(_, pod)| *pod));
        // The mesh's errors name the service.
        let made_service = mesh.add_service(spec)?;
        println!(
            "==> service {key}: {} (ClusterIP, DNAT in every node like kube-proxy)",
            made_service.vip()
        );
        made.push(ServiceState {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            vip: made_service.vip(),
            ports,
            endpoints: service.endpoints.clone(),
        });
    }
    Ok(made)
}
