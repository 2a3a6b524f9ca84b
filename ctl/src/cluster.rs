//! `ambitctl` against a real cluster: `manifest generate`, `precheck`, `install`,
//! `uninstall` and `verify-install`, through kube-rs with the kubeconfig's current
//! context (or `--kubeconfig`, `--context`, as kubectl).
//!
//! The objects come from the Helm chart's default rendering changed by `--set`
//! ([`chart`]); they are server-side applied with field manager `ambitctl`
//! ([`install`]), checked by [`verify`] and [`precheck`]. What an object needs to be
//! ready ([`readiness`]) is a pure function of the object as the API server returns it.
//!
//! It must not reach into the components' crates: what it knows of them (the
//! ConfigMap the root is published in, the objects the control plane makes) is
//! named here, as the control plane's docs name it.

pub mod chart;
pub mod install;
pub mod precheck;
pub mod readiness;
pub mod verify;

use std::fmt;
use std::path::PathBuf;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde::Serialize;
use serde_json::Value;

use chart::ObjectName;

/// The field manager of every apply.
pub const FIELD_MANAGER: &str = "ambitctl";
/// What ambit-control writes as (server-side apply), for finding what it made.
pub const CONTROL_FIELD_MANAGER: &str = "ambit-control";
/// The ConfigMap ambit-control publishes the mesh root in, in every namespace
/// (control/src/cluster_ca.rs `ROOT_CONFIGMAP`), and its key.
pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
pub const ROOT_CONFIGMAP_KEY: &str = "root-cert.pem";
/// The Secret ambit-control keeps its self-signed root in, in its namespace.
pub const SELF_SIGNED_SECRET: &str = "istio-ca-secret";
/// The label of what ambit-control makes to run a waypoint Gateway.
pub const WAYPOINT_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The GatewayClass of waypoints, applied by ambit-control at start.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

/// Where the cluster is: the kubeconfig flags, as kubectl's.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterArgs {
    /// The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long)]
    pub context: Option<String>,
}

/// Why a cluster command could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("kubeconfig {source_name}: {source}")]
    Kubeconfig {
        source_name: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("kubeconfig {source_name}: no context {context:?} (it has: {})", contexts.join(", "))]
    NoContext {
        source_name: String,
        context: String,
        contexts: Vec<String>,
    },
    #[error("kubeconfig {source_name}, context {context}: {reason}")]
    Client {
        source_name: String,
        context: String,
        reason: String,
    },
    /// `at`: `<server> (context <context> of kubeconfig <file>)`.
    #[error("cannot reach the API server {at}: {reason}")]
    Unreachable { at: String, reason: String },
    #[error("{what}: the API server answered {code} {reason}: {message} ({at})")]
    Api {
        what: String,
        at: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("{0}: ambitctl has no API resource for this kind")]
    UnknownKind(String),
}

impl ClusterError {
    /// The HTTP status of an API answer (404, 403, ...), if it was one.
    pub fn code(&self) -> Option<u16> {
        match self {
            ClusterError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A connected cluster: the client and what names it in messages.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub server: String,
    pub context: String,
    pub source_name: String,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("server", &self.server)
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The client of the kubeconfig's context. Nothing is asked of the server yet.
    pub async fn connect(args: &ClusterArgs) -> Result<Cluster, ClusterError> {
        let source_name = match (&args.kubeconfig, std::env::var_os("KUBECONFIG")) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(env)) if !env.is_empty() => env.to_string_lossy().into_owned(),
            (None, _) => "~/.kube/config".to_owned(),
        };
        let read = match &args.kubeconfig {
            Some(path) => Kubeconfig::read_from(path),
            None => Kubeconfig::read(),
        };
        let kubeconfig = read.map_err(|source| ClusterError::Kubeconfig {
            source_name: source_name.clone(),
            source,
        })?;
        let context = match &args.context {
            Some(c) => c.clone(),
            None => kubeconfig.current_context.clone().unwrap_or_default(),
        };
        if !kubeconfig.contexts.iter().any(|c| c.name == context) {
            return Err(ClusterError::NoContext {
                source_name,
                context,
                contexts: kubeconfig.contexts.iter().map(|c| c.name.clone()).collect(),
            });
        }
        let options = KubeConfigOptions {
            context: Some(context.clone()),
            ..KubeConfigOptions::default()
        };
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|e| ClusterError::Client {
                source_name: source_name.clone(),
                context: context.clone(),
                reason: e.to_string(),
            })?;
        let server = config.cluster_url.to_string();
        let client = Client::try_from(config).map_err(|e| ClusterError::Client {
            source_name: source_name.clone(),
            context: context.clone(),
            reason: chain(&e),
        })?;
        Ok(Cluster {
            client,
            server,
            context,
            source_name,
        })
    }

    /// `e`, from asking for `what`, as a user reads it.
    pub fn error(&self, what: impl fmt::Display, e: kube::Error) -> ClusterError {
        let at = format!(
            "{} (context {} of kubeconfig {})",
            self.server, self.context, self.source_name
        );
        match e {
            kube::Error::Api(status) => ClusterError::Api {
                what: what.to_string(),
                at,
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            },
            other => ClusterError::Unreachable {
                at,
                reason: format!("{what}: {}", chain(&other)),
            },
        }
    }

    /// The server's version (`GET /version`), which also proves it answers.
    pub async fn version(
        &self,
    ) -> Result<k8s_openapi::apimachinery::pkg::version::Info, ClusterError> {
        self.client
            .apiserver_version()
            .await
            .map_err(|e| self.error("GET /version", e))
    }

    /// The API of `name`'s kind, in its namespace.
    pub fn api(&self, name: &ObjectName) -> Result<Api<DynamicObject>, ClusterError> {
        let (resource, namespaced) =
            resource_of(&name.api_version, &name.kind).ok_or_else(|| {
                ClusterError::UnknownKind(format!("{}/{}", name.api_version, name.kind))
            })?;
        Ok(match (&name.namespace, namespaced) {
            (Some(ns), true) => Api::namespaced_with(self.client.clone(), ns, &resource),
            (None, true) => Api::all_with(self.client.clone(), &resource),
            (_, false) => Api::all_with(self.client.clone(), &resource),
        })
    }

    /// The object, `None` when it does not exist.
    pub async fn get(&self, name: &ObjectName) -> Result<Option<Value>, ClusterError> {
        let api = self.api(name)?;
        match api.get_opt(&name.name).await {
            Ok(o) => Ok(o.map(|o| serde_json::to_value(o).unwrap_or_default())),
            Err(e) => Err(self.error(format_args!("reading {name}"), e)),
        }
    }

    /// Every object of a kind (in `namespace`, else all), with a label selector.
    pub async fn list(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        params: &kube::api::ListParams,
    ) -> Result<Vec<Value>, ClusterError> {
        let name = ObjectName {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: String::new(),
        };
        let api = self.api(&name)?;
        let what = match namespace {
            Some(ns) => format!("listing {kind} in {ns}"),
            None => format!("listing {kind}"),
        };
        api.list(params)
            .await
            .map(|l| {
                l.items
                    .into_iter()
                    .map(|o| {
                        let mut v = serde_json::to_value(o).unwrap_or_default();
                        v["apiVersion"] = api_version.into();
                        v["kind"] = kind.into();
                        v
                    })
                    .collect()
            })
            .map_err(|e| self.error(what, e))
    }
}

/// The API resource of a kind ambitctl reads or writes, and whether it is namespaced.
pub fn resource_of(api_version: &str, kind: &str) -> Option<(ApiResource, bool)> {
    let (plural, namespaced) = match (api_version, kind) {
        ("v1", "Namespace") => ("namespaces", false),
        ("v1", "Node") => ("nodes", false),
        ("v1", "ServiceAccount") => ("serviceaccounts", true),
        ("v1", "Service") => ("services", true),
        ("v1", "ConfigMap") => ("configmaps", true),
        ("v1", "Secret") => ("secrets", true),
        ("v1", "Pod") => ("pods", true),
        ("apps/v1", "Deployment") => ("deployments", true),
        ("apps/v1", "DaemonSet") => ("daemonsets", true),
        ("policy/v1", "PodDisruptionBudget") => ("poddisruptionbudgets", true),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => ("clusterroles", false),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => ("clusterrolebindings", false),
        ("rbac.authorization.k8s.io/v1", "Role") => ("roles", true),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => ("rolebindings", true),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            ("customresourcedefinitions", false)
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => ("endpointslices", true),
        ("gateway.networking.k8s.io/v1", "GatewayClass") => ("gatewayclasses", false),
        _ => return None,
    };
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Some((ApiResource::from_gvk_with_plural(&gvk, plural), namespaced))
}

/// An error and its causes, each once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut current = e.source();
    while let Some(cause) = current {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        current = cause.source();
    }
    message
}

/// How serious a finding of `precheck` or `verify-install` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Info,
    Warning,
    /// precheck: installing would fail or break the cluster; verify-install: not
    /// installed as it should be. The command exits non-zero.
    Fail,
}

/// One thing checked, what was found and what to do.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: String,
    pub level: Level,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

impl Finding {
    pub fn new(check: &str, level: Level, message: impl Into<String>) -> Finding {
        Finding {
            check: check.to_owned(),
            level,
            message: message.into(),
            action: None,
        }
    }

    pub fn action(mut self, action: impl Into<String>) -> Finding {
        self.action = Some(action.into());
        self
    }
}

/// Prints findings as lines (`ok   check: message`, then `  → action`) or as JSON
/// (`{"findings": [...], "ok": bool}`); true unless one is a failure.
pub fn print_findings(findings: &[Finding], json: bool) -> std::io::Result<bool> {
    let ok = findings.iter().all(|f| f.level != Level::Fail);
    if json {
        let doc = serde_json::json!({"ok": ok, "findings": findings});
        crate::outln!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default())?;
        return Ok(ok);
    }
    for f in findings {
        let tag = match f.level {
            Level::Ok => "ok",
            Level::Info => "info",
            Level::Warning => "WARN",
            Level::Fail => "FAIL",
        };
        crate::outln!("{tag:<5} {}: {}", f.check, f.message)?;
        if let Some(action) = &f.action {
            crate::outln!("      → {action}")?;
        }
    }
    Ok(ok)
}
