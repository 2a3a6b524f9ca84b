//! What a cluster runs, as the local mesh runs it: each component's container in the
//! install manifests (`deploy/ambit.yaml`, the Helm chart's default rendering), its
//! command's arguments and its environment, with the downward API's `fieldRef`s
//! resolved for the node and pod the local mesh runs it as.
//!
//! The local mesh starts `ambit-control`, every ztunnel and every node agent with
//! that environment, and gives on the command line (which beats the environment in
//! every binary's configuration) only what differs on this machine: the addresses of
//! the fabric, the files in the mesh's directory, local mode's sources and the log
//! level. So a setting the manifests give a component (its trust domain, its
//! control-plane identity, its node agents' accounts, its log format) is exercised by
//! the demo and by every local-mesh test, and a variable one binary no longer
//! understands fails them.

use serde_yaml_ng::Value;

use crate::MeshError;

/// The manifests the local mesh runs from, built in.
const MANIFESTS: &str = include_str!("../../deploy/ambit.yaml");

/// A component of the install, by its workload in the manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Control,
    Ztunnel,
    NodeAgent,
}

impl Component {
    /// `(kind, name)` of its workload object.
    fn workload(self) -> (&'static str, &'static str) {
        match self {
            Component::Control => ("Deployment", "ambit-control"),
            Component::Ztunnel => ("DaemonSet", "ztunnel"),
            Component::NodeAgent => ("DaemonSet", "ambit-cni"),
        }
    }
}

/// Who the local mesh runs a component as, for the downward API.
#[derive(Debug, Clone)]
pub struct PodFacts<'a> {
    pub pod_name: &'a str,
    pub namespace: &'a str,
    pub node_name: &'a str,
}

/// A component's container as the manifests write it: the arguments after the
/// program (its `command` beyond the first word, then its `args`), and its
/// environment with every `fieldRef` resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Container {
    /// The environment as [`crate::LocalMesh::spawn_in`] takes it.
    pub fn env_refs(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }
}

/// `component`'s container in the built-in manifests, run as `facts`.
pub fn container(component: Component, facts: &PodFacts<'_>) -> Result<Container, MeshError> {
    container_in(MANIFESTS, component, facts)
}

fn container_in(
    manifests: &str,
    component: Component,
    facts: &PodFacts<'_>,
) -> Result<Container, MeshError> {
    let (kind, name) = component.workload();
    let bad = |what: String| {
        MeshError::BadTopology(format!(
            "deploy/ambit.yaml, {kind} {name}: {what} (the local mesh runs components as the manifests do)"
        ))
    };
    let mut workload = None;
    for doc in serde_yaml_ng::Deserializer::from_str(manifests) {
        let value: Value =
            serde::Deserialize::deserialize(doc).map_err(|e| bad(format!("not YAML: {e}")))?;
        if value["kind"].as_str() == Some(kind) && value["metadata"]["name"].as_str() == Some(name)
        {
            workload = Some(value);
            break;
        }
    }
    let workload = workload.ok_or_else(|| bad("not found".into()))?;
    let containers = workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .ok_or_else(|| bad("no containers".into()))?;
    let [c] = containers.as_slice() else {
        return Err(bad(format!(
            "{} containers, expected one",
            containers.len()
        )));
    };
    let words = |field: &str| -> Result<Vec<String>, MeshError> {
        match &c[field] {
            Value::Null => Ok(Vec::new()),
            Value::Sequence(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad(format!("{field}: {i:?} is not a string")))
                })
                .collect(),
            other => Err(bad(format!("{field}: {other:?} is not a list"))),
        }
    };
    let command = words("command")?;
    let mut args: Vec<String> = command.into_iter().skip(1).collect();
    args.extend(words("args")?);
    let mut env = Vec::new();
    for var in c["env"]
        .as_sequence()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let key = var["name"]
            .as_str()
            .ok_or_else(|| bad(format!("env entry without a name: {var:?}")))?;
        let value = if let Some(v) = var["value"].as_str() {
            v.to_owned()
        } else if let Some(path) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match path {
                "spec.nodeName" => facts.node_name.to_owned(),
                "metadata.name" => facts.pod_name.to_owned(),
                "metadata.namespace" => facts.namespace.to_owned(),
                other => {
                    return Err(bad(format!(
                        "env {key}: fieldRef {other} is not known here"
                    )))
                }
            }
        } else {
            return Err(bad(format!("env {key}: neither a value nor a fieldRef")));
        };
        env.push((key.to_owned(), value));
    }
    Ok(Container { args, env })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FACTS: PodFacts<'static> = PodFacts {
        pod_name: "ztunnel-node-a",
        namespace: "ambit-system",
        node_name: "node-a",
    };

    #[test]
    fn every_component_is_in_the_built_in_manifests() {
        for component in [Component::Control, Component::Ztunnel, Component::NodeAgent] {
            let c = container(component, &FACTS).unwrap();
            assert!(
                c.env.iter().any(|(k, _)| k == "AMBIT_TRUST_DOMAIN"),
                "{component:?}: {c:?}"
            );
        }
        let agent = container(Component::NodeAgent, &FACTS).unwrap();
        assert_eq!(agent.args, ["agent"]);
        let ztunnel = container(Component::Ztunnel, &FACTS).unwrap();
        assert!(ztunnel.env.contains(&("NODE_NAME".into(), "node-a".into())));
    }

    #[test]
    fn a_container_the_local_mesh_cannot_run_is_an_error_naming_it() {
        let doc = |env: &str| {
            format!(
                "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: ztunnel}}\n\
                 spec: {{template: {{spec: {{containers: [{{name: z, command: [ztunnel], env: [{env}]}}]}}}}}}\n"
            )
        };
        let e = container_in(
            &doc("{name: X, valueFrom: {fieldRef: {fieldPath: status.hostIP}}}"),
            Component::Ztunnel,
            &FACTS,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("DaemonSet ztunnel") && e.contains("status.hostIP"),
            "{e}"
        );
        let e = container_in(
            &doc("{name: X, valueFrom: {secretKeyRef: {name: s, key: k}}}"),
            Component::Ztunnel,
            &FACTS,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("env X: neither a value nor a fieldRef"), "{e}");
        let e = container_in(&doc(""), Component::Control, &FACTS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Deployment ambit-control: not found"), "{e}");
    }
}
