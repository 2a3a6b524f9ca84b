//! `ambitctl verify-install`: is what `install` (with the same `--set`) applies there
//! and ready, does ztunnel run on every node, does the CA's Service have ready
//! endpoints, and has the control plane published the mesh root?
//!
//! The CA is not dialled: from outside the cluster it is reachable only through a
//! port-forward, which ambitctl does not open. Its Service's EndpointSlices say
//! whether a ready control plane pod backs port 15012; the finding says that this is
//! what was checked.

use std::collections::BTreeSet;

use kube::api::ListParams;
use serde_json::Value;

use super::chart::{self, ObjectName};
use super::{readiness, Cluster, ClusterError, Finding, Level};

/// The findings, one per object and one per mesh-wide check.
pub async fn verify(cluster: &Cluster, objects: &[Value]) -> Result<Vec<Finding>, ClusterError> {
    let version = cluster.version().await?;
    let mut findings = vec![Finding::new(
        "api-server",
        Level::Ok,
        format!(
            "{} answers, Kubernetes {}",
            cluster.server, version.git_version
        ),
    )];
    let mut ztunnel = None;
    for object in objects {
        let name = ObjectName::of(object);
        let found = match cluster.get(&name).await {
            Ok(found) => found,
            Err(e) => {
                findings.push(Finding::new("object", Level::Fail, format!("{name}: {e}")));
                continue;
            }
        };
        let Some(found) = found else {
            findings.push(
                Finding::new("object", Level::Fail, format!("{name}: missing"))
                    .action("run `ambitctl install` with the same --set"),
            );
            continue;
        };
        if name.kind == "DaemonSet" && name.name == "ztunnel" {
            ztunnel = Some(found.clone());
        }
        if let Some((path, here, there)) = difference(object, &found, String::new()) {
            findings.push(
                Finding::new(
                    "object",
                    Level::Fail,
                    format!(
                        "{name}: differs at {path}: {there} in the cluster, {here} in this install"
                    ),
                )
                .action("give verify-install the --set the install had, or install again"),
            );
            continue;
        }
        match readiness::ready(&found) {
            Ok(()) => findings.push(Finding::new(
                "object",
                Level::Ok,
                format!("{name}: present, ready"),
            )),
            Err(why) => findings.push(
                Finding::new("object", Level::Fail, format!("{name}: not ready: {why}")).action(
                    format!(
                        "kubectl describe {} -n {} {}",
                        name.kind.to_lowercase(),
                        name.namespace.as_deref().unwrap_or(""),
                        name.name
                    ),
                ),
            ),
        }
    }
    if let Some(ds) = &ztunnel {
        findings.push(ztunnel_everywhere(cluster, ds).await);
    }
    if objects.iter().any(|o| o["kind"] == "Deployment") {
        findings.push(ca_endpoints(cluster).await);
        findings.extend(root_published(cluster).await);
    }
    Ok(findings)
}

/// The first field of `applied` that `stored` does not have as applied: (path,
/// applied, stored). What the server adds (defaults, status) is not a difference;
/// scalars compare as text (the server writes quantities back as strings).
fn difference(applied: &Value, stored: &Value, path: String) -> Option<(String, String, String)> {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "nothing".to_owned(),
        other => other.to_string(),
    };
    match (applied, stored) {
        (Value::Object(a), Value::Object(s)) => a.iter().find_map(|(k, v)| {
            difference(v, s.get(k).unwrap_or(&Value::Null), format!("{path}.{k}"))
        }),
        (Value::Array(a), Value::Array(s)) if a.len() == s.len() => a
            .iter()
            .zip(s)
            .enumerate()
            .find_map(|(i, (a, s))| difference(a, s, format!("{path}[{i}]"))),
        (Value::Array(a), Value::Array(s)) => Some((
            path,
            format!("{} items", a.len()),
            format!("{} items", s.len()),
        )),
        (a, s) if text(a) == text(s) => None,
        (a, s) => Some((path.trim_start_matches('.').to_owned(), text(a), text(s))),
    }
}

/// ztunnel's DaemonSet: desired == ready == the cluster's nodes.
async fn ztunnel_everywhere(cluster: &Cluster, ds: &Value) -> Finding {
    let number = |p: &str| ds.pointer(p).and_then(Value::as_i64).unwrap_or(0);
    let desired = number("/status/desiredNumberScheduled");
    let ready = number("/status/numberReady");
    let nodes = match cluster
        .list("v1", "Node", None, &ListParams::default())
        .await
    {
        Ok(nodes) => nodes,
        Err(e) => {
            return Finding::new(
                "ztunnel-on-every-node",
                Level::Fail,
                format!("cannot list nodes: {e}"),
            )
        }
    };
    let count = i64::try_from(nodes.len()).unwrap_or(i64::MAX);
    let message = format!("{ready} ready of {desired} scheduled, {count} nodes");
    if desired == count && ready == count && count > 0 {
        Finding::new("ztunnel-on-every-node", Level::Ok, message)
    } else {
        Finding::new("ztunnel-on-every-node", Level::Fail, message).action(
            "a node without a ready ztunnel cannot run enrolled pods: kubectl -n ambit-system get pods -l app.kubernetes.io/name=ztunnel -o wide",
        )
    }
}

/// The CA's Service has ready endpoints on 15012.
async fn ca_endpoints(cluster: &Cluster) -> Finding {
    const CHECK: &str = "ca-endpoints";
    let params = ListParams::default().labels("kubernetes.io/service-name=ambit-control");
    let slices = match cluster
        .list(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            Some(chart::NAMESPACE),
            &params,
        )
        .await
    {
        Ok(s) => s,
        Err(e) => {
            return Finding::new(
                CHECK,
                Level::Fail,
                format!("cannot list the endpoints: {e}"),
            )
        }
    };
    let mut ready = Vec::new();
    for slice in &slices {
        let serves = slice["ports"]
            .as_array()
            .is_some_and(|ports| ports.iter().any(|p| p["port"] == 15012));
        if !serves {
            continue;
        }
        for endpoint in slice["endpoints"].as_array().into_iter().flatten() {
            // An absent `ready` means ready (discovery.k8s.io/v1).
            if endpoint["conditions"]["ready"] != false {
                for address in endpoint["addresses"].as_array().into_iter().flatten() {
                    ready.push(format!("{}:15012", address.as_str().unwrap_or("?")));
                }
            }
        }
    }
    if ready.is_empty() {
        Finding::new(CHECK, Level::Fail, "Service ambit-system/ambit-control has no ready endpoint on 15012")
            .action("kubectl -n ambit-system get pods -l app.kubernetes.io/name=ambit-control; kubectl -n ambit-system logs deploy/ambit-control")
    } else {
        Finding::new(
            CHECK,
            Level::Ok,
            format!(
                "Service ambit-system/ambit-control has {} ready endpoints ({}); not dialled (that needs a port-forward): the pods' readiness is the port accepting",
                ready.len(),
                ready.join(", ")
            ),
        )
    }
}

/// The root's ConfigMap in the control plane's namespace (parsed, in date) and in
/// every other active namespace.
async fn root_published(cluster: &Cluster) -> Vec<Finding> {
    const CHECK: &str = "mesh-root";
    let by_name = ListParams::default().fields(&format!("metadata.name={}", super::ROOT_CONFIGMAP));
    let (configmaps, namespaces) = match (
        cluster.list("v1", "ConfigMap", None, &by_name).await,
        cluster
            .list("v1", "Namespace", None, &ListParams::default())
            .await,
    ) {
        (Ok(c), Ok(n)) => (c, n),
        (Err(e), _) | (_, Err(e)) => return vec![Finding::new(CHECK, Level::Fail, e.to_string())],
    };
    let mut findings = Vec::new();
    let own = configmaps
        .iter()
        .find(|c| c["metadata"]["namespace"] == chart::NAMESPACE);
    match own.map(|c| c["data"][super::ROOT_CONFIGMAP_KEY].as_str().unwrap_or("")) {
        None => findings.push(
            Finding::new(CHECK, Level::Fail, format!("ConfigMap {}/{} is missing", chart::NAMESPACE, super::ROOT_CONFIGMAP))
                .action("ambit-control publishes it once it runs: kubectl -n ambit-system logs deploy/ambit-control"),
        ),
        Some(pem) => findings.push(match describe_roots(pem) {
            Ok(roots) => Finding::new(CHECK, Level::Ok, format!("ConfigMap {}/{}: {roots}", chart::NAMESPACE, super::ROOT_CONFIGMAP)),
            Err(why) => Finding::new(CHECK, Level::Fail, format!("ConfigMap {}/{} key {}: {why}", chart::NAMESPACE, super::ROOT_CONFIGMAP, super::ROOT_CONFIGMAP_KEY)),
        }),
    }
    let have: BTreeSet<&str> = configmaps
        .iter()
        .filter_map(|c| c["metadata"]["namespace"].as_str())
        .collect();
    let missing: Vec<&str> = namespaces
        .iter()
        .filter(|n| n["status"]["phase"] != "Terminating")
        .filter_map(|n| n["metadata"]["name"].as_str())
        .filter(|n| !have.contains(n))
        .collect();
    if missing.is_empty() {
        findings.push(Finding::new(
            CHECK,
            Level::Ok,
            format!("published in all {} namespaces", namespaces.len()),
        ));
    } else {
        findings.push(
            Finding::new(CHECK, Level::Fail, format!("not published in {} of {} namespaces: {}", missing.len(), namespaces.len(), missing.join(", ")))
                .action("ambit-control puts it in every namespace; its log says why not: kubectl -n ambit-system logs deploy/ambit-control"),
        );
    }
    findings
}

/// `2 roots: CN=... (until 2036-...)`, or why the bundle is not one.
fn describe_roots(pem: &str) -> Result<String, String> {
    let mut roots = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| format!("not PEM: {e}"))?;
        let cert = block
            .parse_x509()
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let validity = cert.validity();
        if !validity.is_valid() {
            return Err(format!(
                "root {} is not valid now (until {})",
                cert.subject(),
                validity.not_after
            ));
        }
        roots.push(format!("{} (until {})", cert.subject(), validity.not_after));
    }
    if roots.is_empty() {
        return Err("no certificate in it".to_owned());
    }
    Ok(format!("{} root(s): {}", roots.len(), roots.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn differences_are_fields_the_install_sets() {
        let applied = json!({"spec": {"replicas": 2, "template": {"containers": [{"name": "c", "resources": {"limits": {"cpu": 2}}}]}}});
        let mut stored = applied.clone();
        stored["spec"]["template"]["containers"][0]["terminationMessagePath"] =
            "/dev/termination-log".into();
        stored["spec"]["template"]["containers"][0]["resources"]["limits"]["cpu"] = "2".into();
        stored["status"] = json!({"replicas": 2});
        assert_eq!(difference(&applied, &stored, String::new()), None);
        stored["spec"]["replicas"] = 3.into();
        assert_eq!(
            difference(&applied, &stored, String::new()),
            Some(("spec.replicas".into(), "2".into(), "3".into()))
        );
    }

    #[test]
    fn a_root_bundle_is_described_or_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "cluster.local");
        let root = params.self_signed(&key).unwrap();
        let described = describe_roots(&root.pem()).unwrap();
        assert!(described.starts_with("1 root(s): "), "{described}");
        assert!(described.contains("O=cluster.local"), "{described}");
        assert_eq!(describe_roots("").unwrap_err(), "no certificate in it");
        assert!(
            describe_roots("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
                .is_err()
        );
    }
}
