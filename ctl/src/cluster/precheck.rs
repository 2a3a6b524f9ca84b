//! `ambitctl precheck`: what would make an install fail or fight something already
//! there, each finding with what to do.
//!
//! - The server's Kubernetes version against the chart's `kubeVersion` (1.29+).
//! - Whether the kubeconfig's user may get, patch and delete each kind the install
//!   makes (SelfSubjectAccessReview).
//! - The CRDs the install would apply, already there and not Ambit's (Istio's base
//!   chart, the Gateway API's release): the apply would conflict with their manager.
//! - An Istio control plane (`app=istiod`) or Istio's ztunnel: two meshes would both
//!   publish `istio-ca-root-cert` and program the same pods.
//! - The CNI directories: the nodes' distribution (k3s, RKE2, GKE, MicroK8s) keeps
//!   them elsewhere than the chart's defaults.
//! - On a node (a kubelet's `/var/lib/kubelet`, or `--node`): the kernel's nftables,
//!   TPROXY, socket and mark support that capture needs (docs/decisions/0005), from the
//!   loaded modules, the module lists or the kernel configuration, and the
//!   CNI configuration directory.

use std::path::Path;

use kube::api::ListParams;
use serde_json::Value;

use super::chart::{self, Values, PART_OF};
use super::{Cluster, ClusterError, Finding, Level};

/// The oldest Kubernetes the chart takes (Chart.yaml `kubeVersion`).
const MIN_MINOR: u64 = 29;

/// What to check.
#[derive(Debug, Clone)]
pub struct Precheck {
    pub values: Values,
    /// Check this machine as a node; `None`: when it looks like one.
    pub node: Option<bool>,
}

pub async fn precheck(cluster: &Cluster, how: &Precheck) -> Result<Vec<Finding>, ClusterError> {
    let mut findings = Vec::new();
    let version = cluster.version().await?;
    findings.push(kubernetes_version(
        &version.major,
        &version.minor,
        &version.git_version,
    ));
    findings.extend(crds(cluster, &how.values).await?);
    findings.push(permissions(cluster, &how.values).await);
    findings.push(namespace(cluster, &how.values).await?);
    findings.extend(istio(cluster).await?);
    findings.push(cni_dirs(cluster, &how.values).await?);
    let on_node = how
        .node
        .unwrap_or_else(|| Path::new("/var/lib/kubelet").is_dir());
    if on_node {
        findings.extend(local_node(&how.values));
    } else {
        findings.push(
            Finding::new(
                "kernel",
                Level::Info,
                "not checked: this machine is not a node (no /var/lib/kubelet)",
            )
            .action(
                "run `ambitctl precheck --node` on a node to check its kernel and CNI directory",
            ),
        );
    }
    Ok(findings)
}

/// 1.29 or later.
pub fn kubernetes_version(major: &str, minor: &str, git: &str) -> Finding {
    const CHECK: &str = "kubernetes-version";
    // GKE and EKS say "29+".
    let digits = |s: &str| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u64>()
            .ok()
    };
    match (digits(major), digits(minor)) {
        (Some(1), Some(minor)) if minor >= MIN_MINOR => Finding::new(
            CHECK,
            Level::Ok,
            format!("{git} (1.{MIN_MINOR} or later is needed)"),
        ),
        (Some(_), Some(_)) => Finding::new(
            CHECK,
            Level::Fail,
            format!("{git}: Ambit needs Kubernetes 1.{MIN_MINOR} or later"),
        )
        .action("upgrade the cluster"),
        _ => Finding::new(
            CHECK,
            Level::Warning,
            format!("cannot read the version {major:?}.{minor:?} ({git})"),
        ),
    }
}

async fn crds(cluster: &Cluster, values: &Values) -> Result<Vec<Finding>, ClusterError> {
    const CHECK: &str = "crds";
    let existing = cluster
        .list(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            None,
            &ListParams::default(),
        )
        .await?;
    let ours: Vec<String> = chart::default_objects()
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    let mut findings = Vec::new();
    let mut foreign = Vec::new();
    let mut missing = Vec::new();
    for name in &ours {
        match existing
            .iter()
            .find(|c| c["metadata"]["name"] == name.as_str())
        {
            None => missing.push(name.clone()),
            Some(crd) if crd["metadata"]["labels"][PART_OF.0] == PART_OF.1 => {}
            Some(crd) => foreign.push(format!("{name} ({})", owner(crd))),
        }
    }
    if values.crds_enabled {
        if foreign.is_empty() {
            findings.push(Finding::new(
                CHECK,
                Level::Ok,
                format!(
                    "none of the {} CRDs Ambit installs is someone else's",
                    ours.len()
                ),
            ));
        } else {
            findings.push(Finding::new(CHECK, Level::Fail, format!("already installed by someone else: {}", foreign.join(", ")))
                .action("keep them: install with --set crds.enabled=false (Ambit reads Istio's and the Gateway API's own CRDs); or take them over with install --force-conflicts"));
        }
    } else if missing.is_empty() {
        findings.push(Finding::new(
            CHECK,
            Level::Ok,
            "crds.enabled=false and every CRD Ambit reads is installed",
        ));
    } else {
        findings.push(Finding::new(CHECK, Level::Warning, format!("crds.enabled=false but missing: {}", missing.join(", ")))
            .action("ambit-control serves without those kinds; install them (Istio's base chart, the Gateway API's standard release) or leave crds.enabled on"));
    }
    Ok(findings)
}

/// Whether the kubeconfig's user may get, patch (install) and delete (uninstall)
/// every kind of object the install makes, asked with SelfSubjectAccessReviews.
async fn permissions(cluster: &Cluster, values: &Values) -> Finding {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    const CHECK: &str = "permissions";
    let mut asks = std::collections::BTreeSet::new();
    for object in chart::render(values) {
        let name = chart::ObjectName::of(&object);
        let Some((resource, namespaced)) = super::resource_of(&name.api_version, &name.kind) else {
            continue;
        };
        let namespace = if namespaced {
            name.namespace.clone()
        } else {
            None
        };
        for verb in ["get", "patch", "delete"] {
            asks.insert((
                resource.group.clone(),
                resource.plural.clone(),
                namespace.clone(),
                verb,
            ));
        }
    }
    let api: kube::Api<SelfSubjectAccessReview> = kube::Api::all(cluster.client.clone());
    let mut denied = Vec::new();
    for (group, plural, namespace, verb) in &asks {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.clone()),
                    resource: Some(plural.clone()),
                    namespace: namespace.clone(),
                    verb: Some((*verb).to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        match api.create(&kube::api::PostParams::default(), &review).await {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => {
                let resource = if group.is_empty() {
                    plural.clone()
                } else {
                    format!("{plural}.{group}")
                };
                let scope = namespace
                    .as_deref()
                    .map(|ns| format!(" in {ns}"))
                    .unwrap_or_default();
                denied.push(format!("{verb} {resource}{scope}"));
            }
            Err(e) => {
                return Finding::new(
                    CHECK,
                    Level::Warning,
                    format!(
                        "cannot ask what the user may do: {}",
                        cluster.error("SelfSubjectAccessReview", e)
                    ),
                )
            }
        }
    }
    if denied.is_empty() {
        Finding::new(CHECK, Level::Ok, format!("the kubeconfig's user may get, patch and delete every kind the install makes ({} checks)", asks.len()))
    } else {
        Finding::new(CHECK, Level::Fail, format!("the kubeconfig's user may not: {}", denied.join(", ")))
            .action("an install makes CRDs, ClusterRoles and their bindings: use a cluster-admin context (--context), or grant these")
    }
}

/// The install's namespace: made by the install, or there already when it is not to be.
async fn namespace(cluster: &Cluster, values: &Values) -> Result<Finding, ClusterError> {
    const CHECK: &str = "namespace";
    let name = chart::ObjectName {
        api_version: "v1".into(),
        kind: "Namespace".into(),
        namespace: None,
        name: chart::NAMESPACE.into(),
    };
    let found = cluster.get(&name).await?;
    let ns = chart::NAMESPACE;
    Ok(match (found, values.namespace_create) {
        (None, true) => Finding::new(CHECK, Level::Ok, format!("{ns} does not exist yet; the install makes it")),
        (None, false) => Finding::new(CHECK, Level::Fail, format!("{ns} does not exist and namespace.create=false"))
            .action(format!("kubectl create namespace {ns}, or leave namespace.create on")),
        (Some(o), true) if o["metadata"]["labels"][PART_OF.0] != PART_OF.1 => {
            Finding::new(CHECK, Level::Warning, format!("{ns} exists and is not Ambit's: the install labels it as Ambit's, and uninstall then deletes it with everything in it"))
                .action("keep it yours with --set namespace.create=false")
        }
        (Some(_), true) => Finding::new(CHECK, Level::Ok, format!("{ns} is Ambit's (an earlier install)")),
        (Some(_), false) => Finding::new(CHECK, Level::Ok, format!("{ns} exists (namespace.create=false)")),
    })
}

/// Who made an object: its Helm release, else its managers.
fn owner(object: &Value) -> String {
    if let Some(release) = object["metadata"]["annotations"]["meta.helm.sh/release-name"].as_str() {
        let ns = object["metadata"]["annotations"]["meta.helm.sh/release-namespace"]
            .as_str()
            .unwrap_or("?");
        return format!("Helm release {ns}/{release}");
    }
    let managers: Vec<&str> = object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["manager"].as_str())
        .collect();
    if managers.is_empty() {
        "no Ambit label".to_owned()
    } else {
        format!("managed by {}", managers.join(", "))
    }
}

async fn istio(cluster: &Cluster) -> Result<Vec<Finding>, ClusterError> {
    const CHECK: &str = "istio";
    let mut findings = Vec::new();
    let istiod = cluster
        .list(
            "apps/v1",
            "Deployment",
            None,
            &ListParams::default().labels("app=istiod"),
        )
        .await?;
    let ztunnels: Vec<Value> = cluster
        .list(
            "apps/v1",
            "DaemonSet",
            None,
            &ListParams::default().labels("app=ztunnel"),
        )
        .await?
        .into_iter()
        .filter(|d| d["metadata"]["labels"][PART_OF.0] != PART_OF.1)
        .collect();
    let names = |objects: &[Value]| {
        objects
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["metadata"]["namespace"].as_str().unwrap_or(""),
                    o["metadata"]["name"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !istiod.is_empty() {
        findings.push(Finding::new(CHECK, Level::Fail, format!("Istio's control plane runs: Deployment {}", names(&istiod)))
            .action("two control planes would both publish istio-ca-root-cert and program the same pods: uninstall Istio first (istioctl uninstall --purge)"));
    }
    if !ztunnels.is_empty() {
        findings.push(Finding::new(CHECK, Level::Fail, format!("Istio's ztunnel runs: DaemonSet {}", names(&ztunnels)))
            .action("two ztunnels on a node would capture the same pods: remove Istio's ambient components first"));
    }
    if istiod.is_empty() && ztunnels.is_empty() {
        findings.push(Finding::new(
            CHECK,
            Level::Ok,
            "no Istio control plane (app=istiod) or Istio ztunnel",
        ));
    }
    Ok(findings)
}

/// Where the nodes' distribution keeps its CNI directories, if not at the defaults.
pub fn cni_dirs_of(node: &Value) -> Option<(&'static str, &'static str, &'static str)> {
    let kubelet = node["status"]["nodeInfo"]["kubeletVersion"]
        .as_str()
        .unwrap_or("");
    let labels = &node["metadata"]["labels"];
    if kubelet.contains("+k3s") {
        Some((
            "k3s",
            "/var/lib/rancher/k3s/data/current/bin",
            "/var/lib/rancher/k3s/agent/etc/cni/net.d",
        ))
    } else if kubelet.contains("+rke2") {
        Some((
            "RKE2",
            "/opt/cni/bin",
            "/var/lib/rancher/rke2/agent/etc/cni/net.d",
        ))
    } else if labels.get("cloud.google.com/gke-nodepool").is_some() {
        Some(("GKE", "/home/kubernetes/bin", "/etc/cni/net.d"))
    } else if labels.get("microk8s.io/cluster").is_some() {
        Some((
            "MicroK8s",
            "/var/snap/microk8s/current/opt/cni/bin",
            "/var/snap/microk8s/current/args/cni-network",
        ))
    } else {
        None
    }
}

async fn cni_dirs(cluster: &Cluster, values: &Values) -> Result<Finding, ClusterError> {
    const CHECK: &str = "cni-directories";
    let nodes = cluster
        .list("v1", "Node", None, &ListParams::default())
        .await?;
    let set = format!(
        "cni.binDir={} cni.confDir={}",
        values.cni_bin_dir, values.cni_conf_dir
    );
    for node in &nodes {
        if let Some((platform, bin, conf)) = cni_dirs_of(node) {
            if (bin, conf) != (values.cni_bin_dir.as_str(), values.cni_conf_dir.as_str()) {
                return Ok(Finding::new(CHECK, Level::Warning, format!(
                    "node {} runs {platform}, whose CNI directories are {bin} and {conf}, not {set}",
                    node["metadata"]["name"].as_str().unwrap_or("?")))
                    .action(format!("install with --set cni.binDir={bin} --set cni.confDir={conf}")));
            }
        }
    }
    Ok(Finding::new(CHECK, Level::Info, format!(
        "{set} on every node ({} nodes; no k3s, RKE2, GKE or MicroK8s seen)", nodes.len()))
        .action("if the nodes' runtime keeps its CNI configuration elsewhere, set cni.confDir and cni.binDir (run `ambitctl precheck --node` on a node to look)"))
}

/// Where a kernel feature is: loaded, built in, loadable, absent, or unknown (no
/// kernel configuration and no module lists to tell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Module {
    Loaded,
    BuiltIn,
    Loadable,
    Absent,
    Unknown,
}

/// What the node says of its kernel: `/proc/modules`, `modules.builtin`,
/// `modules.dep`, and its configuration (`/proc/config.gz` or `/boot/config-*`).
#[derive(Debug, Clone, Default)]
pub struct Kernel {
    pub release: String,
    pub loaded: String,
    pub builtin: String,
    pub dep: String,
    pub config: Option<String>,
}

impl Kernel {
    /// This machine's.
    pub fn read() -> Kernel {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let release = read("/proc/sys/kernel/osrelease").trim().to_owned();
        let config = std::fs::read_to_string(format!("/boot/config-{release}"))
            .ok()
            .or_else(|| {
                // gzip, not a new dependency, for the one compressed file.
                std::process::Command::new("gzip")
                    .args(["-dc", "/proc/config.gz"])
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            });
        Kernel {
            loaded: read("/proc/modules"),
            builtin: read(&format!("/lib/modules/{release}/modules.builtin")),
            dep: read(&format!("/lib/modules/{release}/modules.dep")),
            config,
            release,
        }
    }

    /// Where `module` (whose configuration symbol is `symbol`) is.
    pub fn state(&self, module: &str, symbol: &str) -> Module {
        let file = |line: &str| {
            let path = line.split(':').next().unwrap_or("");
            let name = path.rsplit('/').next().unwrap_or("");
            let name = name.split(".ko").next().unwrap_or("");
            name.replace('-', "_") == module
        };
        let configured = self.config.as_deref().and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix(symbol)
                    .and_then(|rest| rest.strip_prefix('='))
            })
        });
        if self
            .loaded
            .lines()
            .any(|l| l.split_whitespace().next() == Some(module))
        {
            Module::Loaded
        } else if configured == Some("y") || self.builtin.lines().any(file) {
            Module::BuiltIn
        } else if configured == Some("m") || self.dep.lines().any(file) {
            Module::Loadable
        } else if self.config.is_none() && self.builtin.is_empty() && self.dep.is_empty() {
            Module::Unknown
        } else {
            Module::Absent
        }
    }
}

/// What capture needs (docs/decisions/0005): nftables with tproxy and socket
/// matching (the outbound capture), and iptables' mark and connmark (the mangle
/// rules). (module, configuration symbol, what for).
const MODULES: [(&str, &str, &str); 6] = [
    ("nf_tables", "CONFIG_NF_TABLES", "nftables"),
    (
        "nft_tproxy",
        "CONFIG_NFT_TPROXY",
        "nftables tproxy (outbound capture)",
    ),
    (
        "nft_socket",
        "CONFIG_NFT_SOCKET",
        "nftables socket matching (refusing unhandled SYNs)",
    ),
    ("nf_tproxy_ipv4", "CONFIG_NF_TPROXY_IPV4", "TPROXY for IPv4"),
    ("xt_mark", "CONFIG_NETFILTER_XT_MARK", "iptables mark"),
    (
        "xt_connmark",
        "CONFIG_NETFILTER_XT_CONNMARK",
        "iptables connmark",
    ),
];

/// The kernel's findings.
pub fn kernel_findings(kernel: &Kernel) -> Vec<Finding> {
    let release = &kernel.release;
    MODULES
        .iter()
        .map(|(module, symbol, what)| match kernel.state(module, symbol) {
            Module::Loaded => Finding::new("kernel", Level::Ok, format!("{what}: {module} loaded")),
            Module::BuiltIn => Finding::new("kernel", Level::Ok, format!("{what}: {symbol}=y (built in)")),
            Module::Loadable => Finding::new("kernel", Level::Ok, format!("{what}: {module} loadable (loaded on first use)")),
            Module::Absent => Finding::new("kernel", Level::Fail, format!("{what}: neither {module} nor {symbol} in kernel {release}"))
                .action(format!("use a kernel built with {symbol} (y or m)")),
            Module::Unknown => Finding::new("kernel", Level::Warning, format!("{what}: cannot tell (kernel {release} has no /proc/config.gz, /boot/config-{release} or module lists)"))
                .action(format!("check that the kernel was built with {symbol}")),
        })
        .collect()
}

fn local_node(values: &Values) -> Vec<Finding> {
    let mut findings = kernel_findings(&Kernel::read());
    let conf = Path::new(&values.cni_conf_dir);
    let configs: Vec<String> = std::fs::read_dir(conf)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".conflist") || n.ends_with(".conf"))
                .collect()
        })
        .unwrap_or_default();
    findings.push(if configs.is_empty() {
        Finding::new("cni-directories", Level::Warning, format!("no CNI configuration in {} on this node", conf.display()))
            .action("find the runtime's CNI directory (containerd: plugins.\"io.containerd.grpc.v1.cri\".cni conf_dir) and set cni.confDir")
    } else {
        Finding::new("cni-directories", Level::Ok, format!("{}: {}", conf.display(), configs.join(", ")))
    });
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versions_from_1_29_pass() {
        assert_eq!(kubernetes_version("1", "32", "v1.32.0").level, Level::Ok);
        assert_eq!(
            kubernetes_version("1", "29+", "v1.29.3-gke").level,
            Level::Ok
        );
        assert_eq!(kubernetes_version("1", "28", "v1.28.0").level, Level::Fail);
        assert_eq!(kubernetes_version("", "", "?").level, Level::Warning);
    }

    #[test]
    fn modules_are_found_where_the_kernel_keeps_them() {
        let kernel = Kernel {
            release: "6.1.0".into(),
            loaded: "nf_tables 364544 3 nft_tproxy, Live 0x0\nxt_mark 12288 1 - Live 0x0\n".into(),
            builtin: "kernel/net/netfilter/xt_connmark.ko\n".into(),
            dep: "kernel/net/netfilter/nft_socket.ko.zst: kernel/net/netfilter/nf_tables.ko.zst\n"
                .into(),
            config: None,
        };
        assert_eq!(
            kernel.state("nf_tables", "CONFIG_NF_TABLES"),
            Module::Loaded
        );
        assert_eq!(
            kernel.state("xt_connmark", "CONFIG_NETFILTER_XT_CONNMARK"),
            Module::BuiltIn
        );
        assert_eq!(
            kernel.state("nft_socket", "CONFIG_NFT_SOCKET"),
            Module::Loadable
        );
        assert_eq!(
            kernel.state("nft_tproxy", "CONFIG_NFT_TPROXY"),
            Module::Absent
        );
    }

    #[test]
    fn a_kernel_without_modules_is_read_from_its_configuration() {
        // A monolithic kernel (as a Firecracker VM's): no module lists, only its config.
        let mut kernel = Kernel {
            release: "6.18.44".into(),
            config: Some("CONFIG_NF_TABLES=y\nCONFIG_NFT_TPROXY=y\nCONFIG_NFT_SOCKET=m\n# CONFIG_NETFILTER_XT_MARK is not set\n".into()),
            ..Kernel::default()
        };
        assert_eq!(
            kernel.state("nft_tproxy", "CONFIG_NFT_TPROXY"),
            Module::BuiltIn
        );
        assert_eq!(
            kernel.state("nft_socket", "CONFIG_NFT_SOCKET"),
            Module::Loadable
        );
        assert_eq!(
            kernel.state("xt_mark", "CONFIG_NETFILTER_XT_MARK"),
            Module::Absent
        );
        let findings = kernel_findings(&kernel);
        assert_eq!(
            findings[0].message,
            "nftables: CONFIG_NF_TABLES=y (built in)"
        );
        assert_eq!(findings[4].level, Level::Fail);
        kernel.config = None;
        assert_eq!(
            kernel.state("nft_tproxy", "CONFIG_NFT_TPROXY"),
            Module::Unknown
        );
        assert_eq!(kernel_findings(&kernel)[1].level, Level::Warning);
    }

    #[test]
    fn distributions_name_their_cni_directories() {
        let k3s =
            json!({"status": {"nodeInfo": {"kubeletVersion": "v1.31.4+k3s1"}}, "metadata": {}});
        assert_eq!(cni_dirs_of(&k3s).unwrap().0, "k3s");
        let gke = json!({"metadata": {"labels": {"cloud.google.com/gke-nodepool": "p"}}});
        assert_eq!(cni_dirs_of(&gke).unwrap().1, "/home/kubernetes/bin");
        let plain = json!({"status": {"nodeInfo": {"kubeletVersion": "v1.32.0"}}, "metadata": {}});
        assert_eq!(cni_dirs_of(&plain), None);
    }
}
