//! The waypoint Deployment the control plane applies in a cluster
//! (`control/src/waypoint_deploy.rs`) against the flags the waypoint binary reads
//! (`waypoint/src/config.rs`): every variable the container sets is one a flag reads,
//! parsed by the waypoint's own parser into the values the pod needs, and the files
//! it names are where the pod's volumes put them. The two used to drift apart (the
//! Deployment set variables no flag read, and the pod could not start).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use ambit_control::gateway::Gateway;
use ambit_control::resources::Object;
use ambit_control::waypoint_deploy::{self, WaypointPods, PORTS, ROOT_PATH, TOKEN_PATH};
use ambit_control::Resources;
use ambit_waypoint::config::Config;
use clap::CommandFactory;
use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, PodSpec};

/// The fields of a running pod the downward API can give the container.
fn pod_field(path: &str) -> Option<&'static str> {
    Some(match path {
        "metadata.name" => "wp-7d9f-abcde",
        "metadata.namespace" => "shop",
        "spec.serviceAccountName" => "wp-sa",
        "spec.nodeName" => "node-a",
        "status.podIP" => "10.1.2.3",
        _ => return None,
    })
}

fn deployment() -> Deployment {
    let mut resources = Resources::default();
    let gateway: Gateway = serde_yaml_ng::from_str(
        "metadata: {name: waypoint, namespace: shop, uid: u-1, annotations: {gateway.istio.io/service-account: wp-sa}}\n\
         spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}",
    )
    .unwrap();
    resources.insert(Object::Gateway(Box::new(gateway)));
    let pods = WaypointPods {
        image: "ambit/waypoint:test".into(),
        control_plane: "ambit-control.ambit-system.svc:15012".into(),
        trust_domain: "example.org".into(),
    };
    let objects = waypoint_deploy::objects(&resources, &pods);
    let (_, _, body) = objects
        .into_iter()
        .find(|(kind, _, _)| *kind == "Deployment")
        .expect("a Deployment for the waypoint Gateway");
    // Typed as the API server reads it: a field of the wrong shape fails here.
    serde_json::from_value(body).expect("the Deployment reads as apps/v1 Deployment")
}

fn pod_spec(deployment: &Deployment) -> &PodSpec {
    deployment
        .spec
        .template
        .spec
        .as_ref()
        .expect("a pod template")
}

/// The container's environment as the kubelet resolves it, as the waypoint's flags:
/// each variable must be one a flag reads.
fn flags_from_env(container: &Container) -> Vec<String> {
    let command = Config::command();
    let by_env: BTreeMap<String, String> = command
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_owned(), a.get_long()?.to_owned())))
        .collect();
    let mut args = vec!["waypoint".to_owned()];
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => {
                let path = &from
                    .field_ref
                    .as_ref()
                    .unwrap_or_else(|| panic!("{}: only fieldRef is expected", var.name))
                    .field_path;
                pod_field(path)
                    .unwrap_or_else(|| panic!("{}: {path} is not a downward API field", var.name))
                    .to_owned()
            }
            other => panic!("{}: neither a value nor a fieldRef: {other:?}", var.name),
        };
        let long = by_env.get(&var.name).unwrap_or_else(|| {
            panic!(
                "the Deployment sets {} but no waypoint flag reads it (flags read {:?})",
                var.name,
                by_env.keys().collect::<Vec<_>>()
            )
        });
        args.push(format!("--{long}={value}"));
    }
    args
}

#[test]
fn the_waypoint_deployment_environment_parses_with_the_waypoint_flags() {
    let deployment = deployment();
    let spec = pod_spec(&deployment);
    assert_eq!(spec.containers.len(), 1);
    let container = &spec.containers[0];
    let args = flags_from_env(container);
    let config = Config::try_parse_from(&args).unwrap_or_else(|e| {
        panic!("the waypoint refuses the Deployment's environment {args:?}: {e}")
    });

    assert_eq!(config.gateway.to_string(), "shop/waypoint");
    assert_eq!(
        config.identity().unwrap().as_str(),
        "spiffe://example.org/ns/shop/sa/wp-sa"
    );
    assert_eq!(
        config.control_address,
        "ambit-control.ambit-system.svc:15012"
    );
    assert_eq!(config.instance_ip.unwrap().to_string(), "10.1.2.3");
    assert_eq!(config.ca_root, Path::new(ROOT_PATH));
    assert_eq!(config.token_file, Path::new(TOKEN_PATH));

    // The ports the pod declares and probes are the ones the waypoint listens on.
    let declared: BTreeMap<String, i32> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    let listening = [
        ("mesh", config.hbone_addr.port()),
        ("metrics", config.metrics_addr.port()),
        ("status-port", config.readiness_addr.port()),
    ];
    for (name, port) in listening {
        assert_eq!(declared.get(name), Some(&i32::from(port)), "port {name}");
        assert!(PORTS.contains(&(name, port)), "PORTS lacks {name} {port}");
    }
    let probe = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("an HTTP readiness probe");
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
            config.readiness_addr.port()
        ))
    );
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
}

#[test]
fn the_files_the_waypoint_reads_are_mounted_in_its_pod() {
    let deployment = deployment();
    let spec = pod_spec(&deployment);
    let config = Config::try_parse_from(flags_from_env(&spec.containers[0])).unwrap();
    let volumes = spec.volumes.as_ref().expect("volumes");
    let mounts = spec.containers[0].volume_mounts.as_ref().expect("mounts");
    // Which volume provides `file`, and the file's name inside that volume.
    let provider = |file: &Path| {
        let mount = mounts
            .iter()
            .find(|m| file.starts_with(&m.mount_path))
            .unwrap_or_else(|| panic!("nothing mounted at {}", file.display()));
        let inside = file.strip_prefix(&mount.mount_path).unwrap();
        let volume = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("mount {} names no volume", mount.name));
        (volume.clone(), inside.to_str().unwrap().to_owned())
    };

    // The token: projected for the audience the control plane's TokenReview asks for.
    let (volume, file) = provider(&config.token_file);
    let sources = volume
        .projected
        .expect("the token volume is projected")
        .sources;
    let token = sources
        .iter()
        .flatten()
        .find_map(|s| s.service_account_token.as_ref())
        .expect("a serviceAccountToken source");
    assert_eq!(token.path, file);
    assert_eq!(
        token.audience.as_deref(),
        Some(ambit_control::token_review::AUDIENCE)
    );

    // The root: the ConfigMap the control plane publishes in every namespace, whose
    // key is the file's name.
    let (volume, file) = provider(&config.ca_root);
    let configmap = volume.config_map.expect("the root volume is a ConfigMap");
    assert_eq!(configmap.name, ambit_control::cluster_ca::ROOT_CONFIGMAP);
    assert_eq!(file, "root-cert.pem", "the ConfigMap's key");
}
