//! Invoking a CNI chain the way a container runtime does (libcni's semantics, CNI spec
//! 1.0): each plugin of a [`NetworkConfigList`] in order for `ADD`, each receiving the
//! previous plugin's result as `prevResult`; in reverse order for `DEL`, each receiving
//! the cached result of the whole `ADD`. Parameters travel in `CNI_*` environment
//! variables, the network configuration on standard input, the result (or error) on
//! standard output.
//!
//! A plugin runs in the node's network namespace (`nsenter --net`), as it would under a
//! node's container runtime: the primary plugin (`ptp`) creates the host side of the
//! pod's veth where it runs.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::cmd::Cmd;
use crate::MeshError;

/// The CNI spec version of every configuration the mesh writes.
pub const CNI_VERSION: &str = "1.0.0";

/// A network configuration list (a `.conflist`): the chain of plugins that makes a
/// pod's network. Each plugin config is the plugin's JSON object, with at least `type`
/// (the plugin binary's name, looked up in the CNI path). `name` and `cniVersion` are
/// the list's and are added to each plugin's config when it is invoked, and so is
/// `prevResult`: a plugin appended after the primary one (a chained plugin, like
/// `ambit-cni`) receives the primary's result on `ADD`, and the whole chain's result
/// on `DEL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkConfigList {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    pub plugins: Vec<Map<String, Value>>,
}

impl NetworkConfigList {
    /// A list with no plugins yet.
    pub fn new(name: &str) -> NetworkConfigList {
        NetworkConfigList {
            cni_version: CNI_VERSION.to_owned(),
            name: name.to_owned(),
            plugins: Vec::new(),
        }
    }

    /// The primary network of a node: `ptp` (a veth pair per pod, routed by the node)
    /// with `host-local` addresses, one from each of `subnets` (an IPv4 and an IPv6 one
    /// make a dual-stack pod), the state of which lives in `data_dir`, and a default
    /// route via the gateway of each family.
    pub fn ptp(name: &str, subnets: &[&str], data_dir: &Path) -> NetworkConfigList {
        let ranges: Vec<Value> = subnets
            .iter()
            .map(|s| serde_json::json!([{ "subnet": s }]))
            .collect();
        let routes: Vec<Value> = subnets
            .iter()
            .map(|s| serde_json::json!({ "dst": if s.contains(':') { "::/0" } else { "0.0.0.0/0" } }))
            .collect();
        let mut list = NetworkConfigList::new(name);
        list.push(serde_json::json!({
            "type": "ptp",
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": ranges,
                "routes": routes,
                "dataDir": data_dir,
            },
        }));
        list
    }

    /// The network a runtime sets up first in every pod: `lo` up.
    pub fn loopback() -> NetworkConfigList {
        let mut list = NetworkConfigList::new("cni-loopback");
        list.push(serde_json::json!({ "type": "loopback" }));
        list
    }

    /// Appends a plugin to the chain. A config that is not a JSON object is kept as an
    /// empty one, which the invocation then rejects for its missing `type`.
    pub fn push(&mut self, plugin: Value) -> &mut NetworkConfigList {
        self.plugins.push(match plugin {
            Value::Object(map) => map,
            _ => Map::new(),
        });
        self
    }

    /// The configuration plugin `index` reads on standard input.
    fn plugin_config(&self, index: usize, prev_result: Option<&Value>) -> Value {
        let mut config = self.plugins[index].clone();
        config.insert("cniVersion".into(), self.cni_version.clone().into());
        config.insert("name".into(), self.name.clone().into());
        match prev_result {
            Some(prev) => config.insert("prevResult".into(), prev.clone()),
            None => config.remove("prevResult"),
        };
        Value::Object(config)
    }
}

/// Where and for which pod a chain is invoked (the `CNI_*` parameters).
#[derive(Debug, Clone)]
pub struct Invocation {
    /// Directories searched for plugin binaries (`CNI_PATH`).
    pub cni_path: Vec<PathBuf>,
    /// The namespace plugins run in: the node's.
    pub runtime_netns: PathBuf,
    pub container_id: String,
    /// The pod's namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    pub ifname: String,
    /// `CNI_ARGS` pairs; runtimes send `IgnoreUnknown=1` first so plugins accept keys
    /// they do not know.
    pub args: Vec<(String, String)>,
}

impl Invocation {
    /// The parameters a Kubernetes runtime passes for a pod.
    pub fn for_pod(
        cni_path: Vec<PathBuf>,
        runtime_netns: PathBuf,
        container_id: String,
        netns: PathBuf,
        pod_namespace: &str,
        pod_name: &str,
    ) -> Invocation {
        let args = vec![
            ("IgnoreUnknown".to_owned(), "1".to_owned()),
            ("K8S_POD_NAMESPACE".to_owned(), pod_namespace.to_owned()),
            ("K8S_POD_NAME".to_owned(), pod_name.to_owned()),
            (
                "K8S_POD_INFRA_CONTAINER_ID".to_owned(),
                container_id.clone(),
            ),
        ];
        Invocation {
            cni_path,
            runtime_netns,
            container_id,
            netns,
            ifname: "eth0".to_owned(),
            args,
        }
    }
}

/// What a chain's `ADD` produced: the final result as the plugins wrote it (cached and
/// handed back on `DEL`), and the addresses it assigned.
#[derive(Debug, Clone, PartialEq)]
pub struct CniResult {
    pub raw: Value,
    pub ips: Vec<IpConfig>,
}

/// One assigned address (`ips[]` of a CNI result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpAddr,
    pub prefix_len: u8,
    pub gateway: Option<IpAddr>,
}

/// Why a CNI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("plugin `{plugin}` not found in CNI path {path:?}")]
    PluginNotFound { plugin: String, path: Vec<PathBuf> },
    #[error("plugin config #{index} of {list} has no string `type`")]
    NoType { list: String, index: usize },
    #[error("{plugin} {command}: {source}")]
    Run {
        plugin: String,
        command: &'static str,
        #[source]
        source: Box<MeshError>,
    },
    #[error(
        "{plugin} {command} failed ({status}): code {code}: {msg} {details}; stderr: {stderr}"
    )]
    Plugin {
        plugin: String,
        command: &'static str,
        status: std::process::ExitStatus,
        code: i64,
        msg: String,
        details: String,
        stderr: String,
    },
    #[error("{plugin} {command}: result is not valid: {reason}; output: {output}")]
    BadResult {
        plugin: String,
        command: &'static str,
        reason: String,
        output: String,
    },
}

/// Runs `ADD` of every plugin of `list` in order. Returns the last plugin's result.
/// On failure, nothing is undone here: like a runtime, the caller runs [`del`].
pub fn add(list: &NetworkConfigList, inv: &Invocation) -> Result<CniResult, CniError> {
    let mut prev: Option<Value> = None;
    for index in 0..list.plugins.len() {
        let config = list.plugin_config(index, prev.as_ref());
        let plugin = plugin_type(list, index)?;
        let out = invoke(plugin, "ADD", &config, inv)?;
        let result: Value = serde_json::from_str(&out).map_err(|e| CniError::BadResult {
            plugin: plugin.to_owned(),
            command: "ADD",
            reason: e.to_string(),
            output: out.clone(),
        })?;
        prev = Some(result);
    }
    let raw = prev.unwrap_or_else(|| serde_json::json!({ "cniVersion": list.cni_version }));
    let ips = parse_ips(&raw).map_err(|reason| CniError::BadResult {
        plugin: list.name.clone(),
        command: "ADD",
        reason,
        output: raw.to_string(),
    })?;
    Ok(CniResult { raw, ips })
}

/// Runs `CHECK` of every plugin of `list` in order, each given `cached` (the chain's
/// `ADD` result) as `prevResult`, as libcni does; stops at the first failure.
pub fn check(list: &NetworkConfigList, inv: &Invocation, cached: &Value) -> Result<(), CniError> {
    for index in 0..list.plugins.len() {
        let config = list.plugin_config(index, Some(cached));
        let plugin = plugin_type(list, index)?;
        invoke(plugin, "CHECK", &config, inv)?;
    }
    Ok(())
}

/// Runs `DEL` of every plugin of `list` in reverse order, each given `cached` (the
/// chain's `ADD` result, if there was one) as `prevResult`. Goes on past failures (a
/// DEL must release what it can) and returns the first.
pub fn del(
    list: &NetworkConfigList,
    inv: &Invocation,
    cached: Option<&Value>,
) -> Result<(), CniError> {
    let mut first_error = None;
    for index in (0..list.plugins.len()).rev() {
        let config = list.plugin_config(index, cached);
        let outcome =
            plugin_type(list, index).and_then(|plugin| invoke(plugin, "DEL", &config, inv));
        if let Err(e) = outcome {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn plugin_type(list: &NetworkConfigList, index: usize) -> Result<&str, CniError> {
    list.plugins[index]
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| CniError::NoType {
            list: list.name.clone(),
            index,
        })
}

/// Runs one plugin binary; its standard output on success.
fn invoke(
    plugin: &str,
    command: &'static str,
    config: &Value,
    inv: &Invocation,
) -> Result<String, CniError> {
    let binary = inv
        .cni_path
        .iter()
        .map(|dir| dir.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| CniError::PluginNotFound {
            plugin: plugin.to_owned(),
            path: inv.cni_path.clone(),
        })?;
    let cni_path = std::env::join_paths(&inv.cni_path).unwrap_or_default();
    let cni_args = inv
        .args
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";");
    let mut cmd = Cmd::in_netns(&inv.runtime_netns, &binary);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &inv.container_id)
        .env("CNI_NETNS", &inv.netns)
        .env("CNI_IFNAME", &inv.ifname)
        .env("CNI_PATH", cni_path)
        .env("CNI_ARGS", cni_args)
        .stdin(config.to_string());
    let out = cmd.output().map_err(|e| CniError::Run {
        plugin: plugin.to_owned(),
        command,
        source: Box::new(e),
    })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    // Errors are a JSON object on standard output: {code, msg, details}.
    let error: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
    let field = |k: &str| {
        error
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    Err(CniError::Plugin {
        plugin: plugin.to_owned(),
        command,
        status: out.status,
        code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
        msg: if error.is_null() {
            out.stdout.trim().to_owned()
        } else {
            field("msg")
        },
        details: field("details"),
        stderr: out.stderr.trim().to_owned(),
    })
}

/// The `ips` of a CNI 1.0 result.
fn parse_ips(result: &Value) -> Result<Vec<IpConfig>, String> {
    #[derive(Deserialize)]
    struct Ip {
        address: String,
        #[serde(default)]
        gateway: Option<IpAddr>,
    }
    #[derive(Deserialize)]
    struct Result {
        #[serde(default)]
        ips: Vec<Ip>,
    }
    let parsed: Result = serde_json::from_value(result.clone()).map_err(|e| e.to_string())?;
    parsed
        .ips
        .into_iter()
        .map(|ip| {
            let (addr, len) = ip
                .address
                .split_once('/')
                .ok_or_else(|| format!("address {} has no prefix length", ip.address))?;
            Ok(IpConfig {
                address: addr
                    .parse()
                    .map_err(|e| format!("address {}: {e}", ip.address))?,
                prefix_len: len
                    .parse()
                    .map_err(|e| format!("address {}: {e}", ip.address))?,
                gateway: ip.gateway,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chained_plugin_gets_list_name_version_and_prev_result() {
        let mut list = NetworkConfigList::ptp("pods", &["10.1.0.0/24"], Path::new("/m/ipam"));
        list.push(json!({"type": "ambit-cni", "socket": "/m/cni.sock"}));
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.2/24"}]});
        assert_eq!(
            list.plugin_config(1, Some(&prev)),
            json!({
                "type": "ambit-cni",
                "socket": "/m/cni.sock",
                "cniVersion": "1.0.0",
                "name": "pods",
                "prevResult": prev,
            })
        );
        assert_eq!(
            list.plugin_config(0, None),
            json!({
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.1.0.0/24"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": "/m/ipam",
                },
                "cniVersion": "1.0.0",
                "name": "pods",
            })
        );
    }

    #[test]
    fn conflist_serializes_in_the_runtime_file_format() {
        let list = NetworkConfigList::loopback();
        assert_eq!(
            serde_json::to_value(&list).unwrap(),
            json!({"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]})
        );
    }

    #[test]
    fn result_ips_are_parsed() {
        let result = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/p"}],
            "ips": [{"interface": 1, "address": "10.1.0.2/24", "gateway": "10.1.0.1"}],
        });
        assert_eq!(
            parse_ips(&result).unwrap(),
            vec![IpConfig {
                address: "10.1.0.2".parse().unwrap(),
                prefix_len: 24,
                gateway: Some("10.1.0.1".parse().unwrap()),
            }]
        );
        assert!(parse_ips(&json!({"ips": [{"address": "10.1.0.2"}]})).is_err());
        assert_eq!(parse_ips(&json!({"cniVersion": "1.0.0"})).unwrap(), vec![]);
    }

    #[test]
    fn cni_args_carry_the_pod_like_a_kubernetes_runtime() {
        let inv = Invocation::for_pod(
            vec![],
            PathBuf::from("/run/netns/node"),
            "c1".into(),
            PathBuf::from("/run/netns/pod"),
            "shop",
            "cart",
        );
        assert_eq!(inv.args[0], ("IgnoreUnknown".into(), "1".into()));
        assert!(inv.args.contains(&("K8S_POD_NAME".into(), "cart".into())));
        assert!(inv
            .args
            .contains(&("K8S_POD_INFRA_CONTAINER_ID".into(), "c1".into())));
    }
}
