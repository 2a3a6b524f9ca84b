//! `ambitctl authz explain`: one connection or request decided by
//! [`ambit_core::explain`] on the model the control plane's translation makes of the
//! objects (offline from files, or the running local mesh's).

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use ambit_core::explain::{explain, Explanation, HttpRequest, Source};
use ambit_core::identity::{SpiffeId, TrustDomain};
use ambit_core::model::MeshState;
use anyhow::Context;

use crate::config::AuthzCommand;

/// The exit status of a denial.
pub const DENIED: u8 = 3;

const TRUST_DOMAIN: &str = "cluster.local";

pub fn run(command: AuthzCommand) -> anyhow::Result<ExitCode> {
    let AuthzCommand::Explain {
        from,
        to,
        port,
        all,
        namespace,
        method,
        path,
        headers,
        files,
        state_dir,
        output,
    } = command;
    anyhow::ensure!(
        matches!(output.as_str(), "table" | "json"),
        "-o {output:?}: expected table or json"
    );
    let files = if files.is_empty() {
        let mesh = crate::local::running(&state_dir)
            .context("without -f, authz explain decides on the running local mesh")?;
        vec![mesh.dir.join("k8s")]
    } else {
        files
    };
    let mut input = ambit_k8s::analyze::Input::default();
    for path in &files {
        for file in crate::analyze::files_of(path)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            input.add_file(&file, &text);
        }
    }
    let config = ambit_k8s::analyze::model(&input, ambit_k8s::DEFAULT_ROOT_NAMESPACE);
    let trust_domain = TrustDomain::parse(TRUST_DOMAIN)
        .map_err(|e| anyhow::anyhow!("trust domain {TRUST_DOMAIN}: {e}"))?;
    let state = MeshState::build(&config, &trust_domain)
        .map_err(|e| anyhow::anyhow!("the model of these objects is not valid: {e}"))?;
    if all {
        let namespace = namespace.unwrap_or_default();
        return matrix(
            &state,
            &namespace,
            method.as_deref(),
            &path,
            &headers,
            &output,
        );
    }
    let (Some(from), Some(to), Some(port)) = (from, to, port) else {
        anyhow::bail!("--from, --to and --port, or --all -n NAMESPACE");
    };
    let source = source_of(&state, &from)?;
    let dst = destination_of(&state, &to, port)?;
    let request = method.map(|method| HttpRequest {
        method,
        path,
        host: format!("{to}:{port}"),
        headers,
    });
    let e = explain(&state, &source, dst, request.as_ref());
    if output == "json" {
        crate::outln!("{}", serde_json::to_string_pretty(&e)?)?;
    } else {
        print(&e, &from, &to, port, request.as_ref())?;
    }
    Ok(if e.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(DENIED)
    })
}

fn print(
    e: &Explanation,
    from: &str,
    to: &str,
    port: u16,
    request: Option<&HttpRequest>,
) -> std::io::Result<()> {
    let what = request.map_or_else(|| "TCP".to_owned(), |r| format!("{} {}", r.method, r.path));
    crate::outln!(
        "{} {from} → {to}:{port} ({what}){}",
        if e.allowed { "ALLOWED" } else { "DENIED" },
        e.destination
            .as_deref()
            .map(|d| format!(", reaching {d}"))
            .unwrap_or_default()
    )?;
    for (i, hop) in e.hops.iter().enumerate() {
        crate::outln!(
            "  {}. {} (peer {}): {} — {}",
            i + 1,
            hop.enforcer,
            hop.peer,
            if hop.allowed { "allow" } else { "deny" },
            hop.reason
        )?;
        if !hop.policies.is_empty() {
            crate::outln!("     policies, in order: {}", hop.policies.join(", "))?;
        }
    }
    Ok(())
}

/// Every pod of `namespace` to every port of every Service in it.
fn matrix(
    state: &MeshState,
    namespace: &str,
    method: Option<&str>,
    path: &str,
    headers: &[(String, String)],
    output: &str,
) -> anyhow::Result<ExitCode> {
    // Waypoints themselves are neither: they carry the traffic.
    let waypoint_ids: Vec<_> = state.waypoints().map(|w| w.identity.clone()).collect();
    let waypoint_keys: Vec<String> = state.waypoints().map(|w| w.key()).collect();
    let mut sources: Vec<_> = state
        .workloads()
        .filter(|w| w.spec.namespace == namespace && !waypoint_ids.contains(&w.identity))
        .collect();
    sources.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    let mut services: Vec<_> = state
        .services()
        .filter(|s| {
            s.spec.namespace == namespace
                && !waypoint_keys.contains(&format!("{}/{}", s.spec.namespace, s.spec.name))
        })
        .collect();
    services.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    anyhow::ensure!(
        !sources.is_empty() && !services.is_empty(),
        "-n {namespace}: no pods or no Services there"
    );
    let mut rows = Vec::new();
    for w in &sources {
        let Some(ip) = w.spec.ips.first().copied() else {
            continue;
        };
        let source = Source::of(w, ip);
        for s in &services {
            let Some(vip) = s.spec.vips.first().copied() else {
                continue;
            };
            for p in &s.spec.ports {
                let request = method.map(|m| HttpRequest {
                    method: m.to_owned(),
                    path: path.to_owned(),
                    host: format!("{}.{}:{}", s.spec.name, s.spec.namespace, p.port),
                    headers: headers.to_vec(),
                });
                let e = explain(
                    state,
                    &source,
                    SocketAddr::new(vip, p.port),
                    request.as_ref(),
                );
                let decided = e.hops.iter().find(|h| !h.allowed).or(e.hops.last());
                rows.push(serde_json::json!({
                    "from": w.spec.uid,
                    "to": format!("{}/{}:{}", s.spec.namespace, s.spec.name, p.port),
                    "allowed": e.allowed,
                    "enforcer": decided.map(|h| h.enforcer.clone()),
                    "reason": decided.map(|h| h.reason.clone()),
                }));
            }
        }
    }
    if output == "json" {
        crate::outln!("{}", serde_json::to_string_pretty(&rows)?)?;
    } else {
        crate::outln!("{:<28} {:<32} {:<7} ENFORCED BY: WHY", "FROM", "TO", "")?;
        for r in &rows {
            crate::outln!(
                "{:<28} {:<32} {:<7} {}: {}",
                r["from"].as_str().unwrap_or_default(),
                r["to"].as_str().unwrap_or_default(),
                if r["allowed"] == true {
                    "ALLOW"
                } else {
                    "DENY"
                },
                r["enforcer"].as_str().unwrap_or_default(),
                r["reason"].as_str().unwrap_or_default()
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A pod (`namespace/name`), an IP, or a service account (`namespace/account`).
fn source_of(state: &MeshState, from: &str) -> anyhow::Result<Source> {
    if let Ok(ip) = from.parse::<IpAddr>() {
        return Ok(match state.workload_by_ip(ip) {
            Some(w) => Source::of(w, ip),
            None => Source { identity: None, ip },
        });
    }
    let (namespace, name) = from.split_once('/').with_context(|| {
        format!("--from {from:?}: expected namespace/pod, namespace/service-account or an IP")
    })?;
    if let Some(w) = state
        .workloads()
        .find(|w| w.spec.namespace == namespace && w.spec.name == name)
    {
        let ip = w
            .spec
            .ips
            .first()
            .copied()
            .with_context(|| format!("--from {from}: the pod has no address"))?;
        return Ok(Source::of(w, ip));
    }
    let identity = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{name}"))
        .map_err(|e| anyhow::anyhow!("--from {from}: {e}"))?;
    let ip = state
        .workloads()
        .find(|w| w.identity == identity)
        .and_then(|w| w.spec.ips.first().copied())
        .with_context(|| format!("--from {from}: no pod of that name, and no pod runs as service account {name} in {namespace}"))?;
    Ok(Source {
        identity: Some(identity),
        ip,
    })
}

/// A Service's first VIP, or a pod's address, with the port.
fn destination_of(state: &MeshState, to: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let (kind, rest) = match to.split_once('/') {
        Some(("svc" | "service", rest)) => (Some("svc"), rest),
        Some(("pod", rest)) => (Some("pod"), rest),
        _ => (None, to),
    };
    let (namespace, name) = rest.split_once('/').with_context(|| {
        format!("--to {to:?}: expected namespace/name (svc/namespace/name or pod/namespace/name)")
    })?;
    if kind != Some("pod") {
        if let Some(service) = state.service(namespace, name) {
            anyhow::ensure!(
                service.spec.ports.iter().any(|p| p.port == port),
                "--port {port}: Service {namespace}/{name} has ports {}",
                service
                    .spec
                    .ports
                    .iter()
                    .map(|p| p.port.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let vip = service
                .spec
                .vips
                .first()
                .copied()
                .with_context(|| format!("--to {to}: the Service has no cluster IP"))?;
            return Ok(SocketAddr::new(vip, port));
        }
        anyhow::ensure!(kind.is_none(), "--to {to}: no Service {namespace}/{name}");
    }
    let w = state
        .workloads()
        .find(|w| w.spec.namespace == namespace && w.spec.name == name)
        .with_context(|| format!("--to {to}: no Service or pod {namespace}/{name}"))?;
    let ip = w
        .spec
        .ips
        .first()
        .copied()
        .with_context(|| format!("--to {to}: the pod has no address"))?;
    Ok(SocketAddr::new(ip, port))
}
