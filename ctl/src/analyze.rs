//! `ambitctl analyze -f PATH...`: the findings of [`ambit_k8s::analyze`] on files, as a
//! table (or JSON, or YAML), with istioctl's exit status 79 when one reaches the
//! failure threshold.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ambit_k8s::analyze::{Finding, Input, Severity, CODES};
use anyhow::Context;

/// The exit status when findings reach the failure threshold (istioctl analyze's).
pub const FOUND_ISSUES: u8 = 79;

#[derive(Debug)]
pub struct Options {
    pub files: Vec<PathBuf>,
    pub cluster: crate::cluster::ClusterArgs,
    pub root_namespace: String,
    /// Only findings about objects in this namespace.
    pub namespace: Option<String>,
    pub output: String,
    pub failure_threshold: String,
    pub output_threshold: String,
    pub list_codes: bool,
}

pub fn run(o: Options) -> anyhow::Result<ExitCode> {
    let severity = |flag: &str, value: &str| {
        Severity::parse(value)
            .with_context(|| format!("{flag} {value:?}: expected error, warning or info"))
    };
    let failure = severity("--failure-threshold", &o.failure_threshold)?;
    let shown = severity("--output-threshold", &o.output_threshold)?;
    anyhow::ensure!(
        matches!(o.output.as_str(), "table" | "json" | "yaml"),
        "-o {:?}: expected table, json or yaml",
        o.output
    );
    if o.list_codes {
        crate::outln!("{:<8} {:<8} {:<32} MEANING", "CODE", "SEVERITY", "NAME")?;
        for (code, name, severity, meaning) in CODES {
            crate::outln!("{code:<8} {:<8} {name:<32} {meaning}", severity.as_str())?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut input = Input::default();
    let mut read = 0;
    let mut source = String::new();
    if o.files.is_empty() {
        source = read_cluster(&o.cluster, &mut input)?;
    }
    for path in &o.files {
        for file in files_of(path)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            input.add_file(&file, &text);
            read += 1;
        }
    }
    anyhow::ensure!(
        read > 0 || !source.is_empty(),
        "no .yaml, .yml or .json file in {}",
        o.files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let findings: Vec<Finding> = ambit_k8s::analyze::analyze(&input, &o.root_namespace)
        .into_iter()
        .filter(|f| f.severity <= shown)
        .filter(|f| o.namespace.as_deref().is_none_or(|ns| in_namespace(f, ns)))
        .collect();
    let what = if source.is_empty() {
        format!("{read} file(s)")
    } else {
        source
    };
    let what = match &o.namespace {
        Some(ns) => format!("namespace {ns} of {what}"),
        None => what,
    };
    match o.output.as_str() {
        "json" => crate::outln!("{}", serde_json::to_string_pretty(&findings)?)?,
        "yaml" => crate::out!("{}", serde_yaml_ng::to_string(&findings)?)?,
        _ => print_table(&findings, &what)?,
    }
    if findings.iter().any(|f| f.severity <= failure) {
        Ok(ExitCode::from(FOUND_ISSUES))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

/// Whether `f` is about an object in namespace `ns` (the Namespace object `ns`
/// itself included).
fn in_namespace(f: &Finding, ns: &str) -> bool {
    match f.object.split_once('/') {
        Some((namespace, _)) => namespace == ns,
        None => f.kind == "Namespace" && f.object == ns,
    }
}

fn print_table(findings: &[Finding], source: &str) -> std::io::Result<()> {
    if findings.is_empty() {
        return crate::outln!("✔ No findings in {source}.");
    }
    for f in findings {
        let object = if f.object.is_empty() {
            String::new()
        } else {
            format!(" {} {}", f.kind, f.object)
        };
        let place = f
            .place
            .as_deref()
            .map(|p| format!(" ({p})"))
            .unwrap_or_default();
        crate::outln!(
            "{} [{}] {}{object}{place}: {}",
            f.severity,
            f.code,
            f.name,
            f.message
        )?;
        crate::outln!("    fix: {}", f.fix)?;
    }
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    crate::outln!(
        "{} error(s), {} warning(s), {} info in {source}.",
        count(Severity::Error),
        count(Severity::Warning),
        count(Severity::Info)
    )
}

/// `path` itself, or every YAML/JSON file below it (sorted, so findings are stable).
pub(crate) fn files_of(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut out = Vec::new();
    let mut dirs = vec![path.to_owned()];
    while let Some(dir) = dirs.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
            let p = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(p);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The kinds the control plane reads: (kind, group, version, plural, namespaced).
const KINDS: &[(ambit_k8s::resources::Kind, &str, &str, &str, bool)] = {
    use ambit_k8s::resources::Kind as K;
    &[
        (K::Namespace, "", "v1", "namespaces", false),
        (K::Pod, "", "v1", "pods", true),
        (K::Service, "", "v1", "services", true),
        (
            K::EndpointSlice,
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            true,
        ),
        (
            K::ServiceEntry,
            "networking.istio.io",
            "v1",
            "serviceentries",
            true,
        ),
        (
            K::VirtualService,
            "networking.istio.io",
            "v1",
            "virtualservices",
            true,
        ),
        (
            K::DestinationRule,
            "networking.istio.io",
            "v1",
            "destinationrules",
            true,
        ),
        (
            K::AuthorizationPolicy,
            "security.istio.io",
            "v1",
            "authorizationpolicies",
            true,
        ),
        (
            K::PeerAuthentication,
            "security.istio.io",
            "v1",
            "peerauthentications",
            true,
        ),
        (
            K::RequestAuthentication,
            "security.istio.io",
            "v1",
            "requestauthentications",
            true,
        ),
        (
            K::Gateway,
            "gateway.networking.k8s.io",
            "v1",
            "gateways",
            true,
        ),
        (
            K::GatewayClass,
            "gateway.networking.k8s.io",
            "v1",
            "gatewayclasses",
            false,
        ),
        (
            K::HttpRoute,
            "gateway.networking.k8s.io",
            "v1",
            "httproutes",
            true,
        ),
        (
            K::GrpcRoute,
            "gateway.networking.k8s.io",
            "v1",
            "grpcroutes",
            true,
        ),
    ]
};

/// Workload controllers whose pod templates are workloads.
const CONTROLLERS: &[(&str, &str)] = &[
    ("Deployment", "deployments"),
    ("StatefulSet", "statefulsets"),
    ("DaemonSet", "daemonsets"),
];

/// Lists every kind the control plane reads from the kubeconfig's cluster into
/// `input`; a kind whose CRD is not installed has no objects. Returns what was read
/// (`cluster <context> (<server>)`).
fn read_cluster(args: &crate::cluster::ClusterArgs, input: &mut Input) -> anyhow::Result<String> {
    use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let cluster = crate::cluster::Cluster::connect(args).await?;
        let place = format!("cluster {}", cluster.context);
        let list = |group: &str, version: &str, kind: &str, plural: &str| {
            let gvk = GroupVersionKind::gvk(group, version, kind);
            let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
            let api: Api<DynamicObject> = Api::all_with(cluster.client.clone(), &resource);
            async move { api.list(&ListParams::default()).await }
        };
        for (kind, group, version, plural, _) in KINDS {
            let items = match list(group, version, kind.as_str(), plural).await {
                Ok(l) => l.items,
                // The kind's CRD is not installed: there is none of it.
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(e) => {
                    return Err(anyhow::Error::new(
                        cluster.error(format!("list {plural}"), e),
                    ))
                }
            };
            for item in items {
                let mut value = serde_json::to_value(&item)?;
                value["apiVersion"] = if group.is_empty() {
                    (*version).into()
                } else {
                    format!("{group}/{version}").into()
                };
                value["kind"] = kind.as_str().into();
                match ambit_k8s::read::from_api_server(*kind, &value) {
                    Ok(object) => input.add_object(object, &place),
                    Err(why) => input.add_unreadable(
                        &place,
                        format!(
                            "{kind} {}/{}: {why}",
                            value["metadata"]["namespace"].as_str().unwrap_or(""),
                            value["metadata"]["name"].as_str().unwrap_or("")
                        ),
                    ),
                }
            }
        }
        for (kind, plural) in CONTROLLERS {
            match list("apps", "v1", kind, plural).await {
                Ok(l) => {
                    for item in l.items {
                        let mut value = serde_json::to_value(&item)?;
                        value["kind"] = (*kind).into();
                        input.add_controller(&value);
                    }
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    return Err(anyhow::Error::new(
                        cluster.error(format!("list {plural}"), e),
                    ))
                }
            }
        }
        Ok(format!("{place} ({})", cluster.server))
    })
}
