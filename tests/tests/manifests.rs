//! The install manifests (`deploy/ambit.yaml`, the Helm chart rendered with its
//! defaults) against the binaries they run: every container's command line and
//! environment is parsed by that binary's own flag parser (clap with `env`, each
//! binary's `config.rs`), so a manifest cannot set a variable no flag reads or a value
//! a flag refuses; and what the parsed configuration names (the hand-off socket, the
//! token, the root, the control plane's address, the node agents' accounts) is what
//! the pods mount and the objects are called.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, PodSpec, Volume};
use serde_json::Value;

const NAMESPACE: &str = "ambit-system";

fn manifests() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/ambit.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn object<'a>(all: &'a [Value], kind: &str, name: &str) -> &'a Value {
    all.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/ambit.yaml"))
}

/// A workload's pod spec, typed as the API server reads it.
fn pod_spec(all: &[Value], kind: &str, name: &str) -> PodSpec {
    let o = object(all, kind, name).clone();
    let template = match kind {
        "Deployment" => {
            serde_json::from_value::<Deployment>(o)
                .unwrap()
                .spec
                .template
        }
        "DaemonSet" => {
            serde_json::from_value::<DaemonSet>(o)
                .unwrap()
                .spec
                .template
        }
        other => panic!("{other}"),
    };
    template.spec.expect("a pod template")
}

/// The downward API fields the containers may read, as a running pod would have them.
fn pod_field(path: &str) -> &'static str {
    match path {
        "spec.nodeName" => "node-a",
        "metadata.name" => "pod-abcde",
        "metadata.namespace" => NAMESPACE,
        "status.podIP" => "10.1.2.3",
        other => panic!("{other} is not a downward API field a container here may read"),
    }
}

/// The container's command line, with each environment variable turned into the flag
/// that reads it (after the subcommand, if the command has one). A variable no flag
/// of `parser` reads fails here.
fn command_line(container: &Container, parser: clap::Command) -> Vec<String> {
    let mut args: Vec<String> = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .cloned()
        .collect();
    assert!(!args.is_empty(), "{}: no command", container.name);
    let reading = match args.get(1).and_then(|s| parser.find_subcommand(s)) {
        Some(sub) => sub.clone(),
        None => parser,
    };
    let by_env: BTreeMap<String, String> = reading
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_owned(), a.get_long()?.to_owned())))
        .collect();
    let mut seen = Vec::new();
    for var in container.env.iter().flatten() {
        assert!(!seen.contains(&var.name), "{} set twice", var.name);
        seen.push(var.name.clone());
        let value = match (&var.value, &var.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => {
                let field = from.field_ref.as_ref().expect("only fieldRef is used");
                pod_field(&field.field_path).to_owned()
            }
            other => panic!("{}: neither a value nor a fieldRef: {other:?}", var.name),
        };
        let long = by_env.get(&var.name).unwrap_or_else(|| {
            panic!(
                "container {} sets {} but no flag of `{}` reads it (they read {:?})",
                container.name,
                var.name,
                args.join(" "),
                by_env.keys().collect::<Vec<_>>()
            )
        });
        args.push(format!("--{long}={value}"));
    }
    args
}

fn parse<P: Parser>(container: &Container) -> P {
    let args = command_line(container, P::command());
    P::try_parse_from(&args)
        .unwrap_or_else(|e| panic!("container {} refuses {args:?}: {e}", container.name))
}

/// Which volume holds `file` in the container, and the file's path inside it.
fn provider(spec: &PodSpec, container: &Container, file: &Path) -> (Volume, PathBuf) {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| file.starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("{}: nothing mounted at {}", container.name, file.display()));
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("mount {} names no volume", mount.name))
        .clone();
    (
        volume,
        file.strip_prefix(&mount.mount_path).unwrap().to_owned(),
    )
}

/// The token is a projected service-account token for the CA's audience, and the
/// root is the ConfigMap the control plane publishes.
fn assert_token_and_root(spec: &PodSpec, container: &Container, token: &Path, root: &Path) {
    let (volume, file) = provider(spec, container, token);
    let projected = volume.projected.expect("the token volume is projected");
    let source = projected
        .sources
        .iter()
        .flatten()
        .find_map(|s| s.service_account_token.as_ref())
        .expect("a serviceAccountToken source");
    assert_eq!(Path::new(&source.path), file);
    assert_eq!(
        source.audience.as_deref(),
        Some(ambit_control::token_review::AUDIENCE)
    );
    let (volume, file) = provider(spec, container, root);
    let configmap = volume.config_map.expect("the root volume is a ConfigMap");
    assert_eq!(configmap.name, ambit_control::cluster_ca::ROOT_CONFIGMAP);
    assert_eq!(file, Path::new("root-cert.pem"), "the ConfigMap's key");
}

/// The host directory a file is in, by a hostPath volume.
fn host_dir(spec: &PodSpec, container: &Container, file: &Path) -> PathBuf {
    let (volume, inside) = provider(spec, container, file);
    let host = volume
        .host_path
        .unwrap_or_else(|| panic!("{} is not on a hostPath", file.display()));
    Path::new(&host.path).join(inside)
}

fn control_address() -> String {
    format!("ambit-control.{NAMESPACE}.svc:15012")
}

#[test]
fn every_container_in_the_manifests_parses_with_its_binarys_flags() {
    let all = manifests();
    let mut parsed = Vec::new();
    for o in &all {
        let kind = o["kind"].as_str().unwrap();
        if kind != "Deployment" && kind != "DaemonSet" {
            continue;
        }
        let name = o["metadata"]["name"].as_str().unwrap();
        let spec = pod_spec(&all, kind, name);
        for container in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            let binary = container.command.as_ref().and_then(|c| c.first()).cloned();
            match binary.as_deref() {
                Some("ztunnel") => drop(parse::<ambit_ztunnel::config::Config>(container)),
                Some("ambit-control") => drop(parse::<ambit_control::config::Config>(container)),
                Some("ambit-cni") => drop(parse::<ambit_cni::cli::Cli>(container)),
                other => panic!(
                    "{kind} {name}: container {} runs {other:?}, a binary this test does not know",
                    container.name
                ),
            }
            parsed.push(format!("{kind}/{name}/{}", container.name));
        }
    }
    assert_eq!(
        parsed,
        [
            "DaemonSet/ambit-cni/agent",
            "DaemonSet/ztunnel/ztunnel",
            "Deployment/ambit-control/control"
        ]
    );
}

#[test]
fn ztunnel_and_the_node_agent_meet_on_the_nodes_hand_off_socket_and_reach_the_control_plane() {
    let all = manifests();
    let zspec = pod_spec(&all, "DaemonSet", "ztunnel");
    let zc = &zspec.containers[0];
    let ztunnel: ambit_ztunnel::config::Config = parse(zc);
    let aspec = pod_spec(&all, "DaemonSet", "ambit-cni");
    let ac = &aspec.containers[0];
    let ambit_cni::cli::Command::Agent { config: agent, .. } =
        parse::<ambit_cni::cli::Cli>(ac).command
    else {
        panic!("the node agent's container does not run `ambit-cni agent`");
    };

    // Both on the node's directory, at the path the plugin (run by the runtime on the
    // node) is told: the agent's socket is written into the conflist as it is.
    let socket = host_dir(&zspec, zc, &ztunnel.handoff_socket);
    assert_eq!(socket, host_dir(&aspec, ac, &agent.handoff_socket));
    assert_eq!(
        host_dir(&aspec, ac, &agent.agent_socket),
        agent.agent_socket
    );
    assert_eq!(socket, ztunnel.handoff_socket);

    // The CNI directories are the node's.
    assert_eq!(
        host_dir(&aspec, ac, &agent.conf_dir.join("x")),
        Path::new("/etc/cni/net.d/x")
    );
    assert_eq!(
        host_dir(&aspec, ac, &agent.bin_dir.join("x")),
        Path::new("/opt/cni/bin/x")
    );
    assert_eq!(aspec.host_network, Some(true));
    assert_eq!(aspec.host_pid, Some(true));

    assert_token_and_root(&zspec, zc, &ztunnel.ca_token_file, &ztunnel.ca_root);
    assert_token_and_root(&aspec, ac, &agent.token_file, &agent.ca_root);

    // The control plane, by its Service, with the identity it is issued.
    let service = object(&all, "Service", "ambit-control");
    assert_eq!(service["metadata"]["namespace"], NAMESPACE);
    assert_eq!(service["spec"]["ports"][0]["port"], 15012);
    assert_eq!(
        ztunnel.xds_address.as_deref(),
        Some(control_address().as_str())
    );
    assert_eq!(ztunnel.ca_address, control_address());
    assert_eq!(agent.control_address, control_address());
    let control_identity = format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/ambit-control");
    assert_eq!(ztunnel.ca_identity().unwrap().as_str(), control_identity);
    assert_eq!(agent.control_identity.unwrap().as_str(), control_identity);
    assert_eq!(ztunnel.node, "node-a");
    assert_eq!(agent.node, "node-a");

    // The ports ztunnel declares, probes and has scraped are the ones it listens on.
    let probe = zc
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .unwrap();
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
            ztunnel.readiness_addr.port()
        ))
    );
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    let template = &object(&all, "DaemonSet", "ztunnel")["spec"]["template"]["metadata"];
    assert_eq!(
        template["annotations"]["prometheus.io/port"],
        ztunnel.metrics_addr.port().to_string()
    );
}

#[test]
fn the_control_plane_trusts_the_node_agents_service_accounts_and_runs_in_its_namespace() {
    let all = manifests();
    let spec = pod_spec(&all, "Deployment", "ambit-control");
    let control: ambit_control::config::Config = parse(&spec.containers[0]);
    assert_eq!(control.local_dir, None, "a cluster, not a directory");
    assert_eq!(control.ca.system_namespace, NAMESPACE);
    assert_eq!(spec.service_account_name.as_deref(), Some("ambit-control"));
    assert_eq!(
        control.ca.control_identity().unwrap().as_str(),
        format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/ambit-control")
    );
    // Every node agent (ztunnel and ambit-cni, which both impersonate or report for
    // their node's pods) runs as an account the control plane trusts as one.
    let accounts = control.node_agent_accounts();
    for daemonset in ["ztunnel", "ambit-cni"] {
        let sa = pod_spec(&all, "DaemonSet", daemonset)
            .service_account_name
            .unwrap();
        assert!(
            accounts.contains(&(NAMESPACE.to_owned(), sa.clone())),
            "{daemonset} runs as {sa}, not a node agent account of {accounts:?}"
        );
        object(&all, "ServiceAccount", &sa);
    }
    // Waypoints get the waypoint image of the same release, and reach the Service.
    let pods = control.waypoint_pods();
    assert!(
        pods.image
            .ends_with(&format!("/waypoint:{}", env!("CARGO_PKG_VERSION"))),
        "{}",
        pods.image
    );
    assert_eq!(pods.control_plane, control_address());
    assert_eq!(control.ca.listen.port(), 15012);
}
