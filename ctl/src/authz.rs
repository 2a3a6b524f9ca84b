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
