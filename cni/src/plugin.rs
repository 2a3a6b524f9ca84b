//! The CNI plugin, as the container runtime invokes it (CNI specification 1.0, with
//! 1.1's `STATUS` and `GC`): the command and the pod in `CNI_*` environment variables,
//! the network configuration on standard input, the result or an error object on
//! standard output, and the exit code saying which.
//!
//! `ambit-cni` is a chained plugin: it runs after the cluster's own network plugin and
//! passes that plugin's result (`prevResult`) through unchanged. For a Kubernetes pod
//! (`K8S_POD_NAMESPACE`/`K8S_POD_NAME` in `CNI_ARGS`) outside the excluded namespaces,
//! it asks the node agent to enrol it and returns only once the agent has answered, so
//! an enrolled pod's first packet is already captured. Whether the pod is to be
//! enrolled is the agent's decision; the plugin never changes the pod's network itself.
//!
//! [`run`] is the whole plugin over plain values; `main` only supplies the process's
//! environment, standard input and a Unix-socket transport to the agent.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::protocol::{AgentCommand, AgentReply, AgentRequest, PodRef, DEFAULT_AGENT_SOCKET};

/// The specification versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Namespaces whose pods are passed through without asking the agent, unless the
/// configuration lists its own (`excludeNamespaces`): the cluster's and Ambit's own.
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 2] = ["kube-system", "ambit-system"];

/// The specification's error codes, and ours from 100.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The node agent answered, and could not do what was asked.
    pub const AGENT_FAILED: u32 = 100;
}

/// A CNI error result: printed as JSON on standard output, with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.to_owned(),
            details: details.into(),
        }
    }
}

/// What the plugin prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
    /// A line for standard error (the runtime logs it), when there is something to say
    /// beyond the result.
    pub stderr: Option<String>,
}

/// The runtime's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

/// The `CNI_*` parameters of a command about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Container {
    id: String,
    netns: Option<PathBuf>,
    ifname: String,
    pod: Option<PodRef>,
}

/// The plugin's network configuration (its entry of the conflist, with the list's
/// `name` and `cniVersion` and, when chained, `prevResult`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(rename = "type", default)]
    plugin_type: String,
    #[serde(default)]
    prev_result: Option<Map<String, Value>>,
    /// The node agent's socket.
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    /// Namespaces passed through without asking the agent.
    #[serde(default)]
    exclude_namespaces: Option<Vec<String>>,
}

/// Runs one invocation. `env` reads the process environment; `stdin` is the network
/// configuration; `agent` sends a request to the agent listening on the given socket.
pub fn run(
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    agent: &mut dyn FnMut(&Path, &AgentRequest) -> Result<AgentReply, String>,
) -> Outcome {
    // Errors are reported in the configuration's version when it can be read.
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".to_owned());
    match invoke(env, stdin, agent) {
        Ok((stdout, stderr)) => Outcome {
            stdout,
            exit_code: 0,
            stderr,
        },
        Err(e) => Outcome {
            stdout: json!({
                "cniVersion": version,
                "code": e.code,
                "msg": e.msg,
                "details": e.details,
            })
            .to_string(),
            exit_code: 1,
            stderr: Some(format!("ambit-cni: {e}")),
        },
    }
}

/// Standard output and an optional line for standard error, or the error result.
fn invoke(
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    agent: &mut dyn FnMut(&Path, &AgentRequest) -> Result<AgentReply, String>,
) -> Result<(String, Option<String>), CniError> {
    let command = command(env)?;
    if command == Command::Version {
        let asked = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "1.0.0".to_owned());
        return Ok((
            json!({"cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
            None,
        ));
    }
    let conf = net_conf(stdin)?;
    let agent_command = match command {
        // Ready whenever it can be run: the agent's readiness shows on ADD (try again
        // later), and the agent collects what is left of gone pods itself.
        Command::Version | Command::Status | Command::Gc => return Ok((String::new(), None)),
        Command::Add => AgentCommand::Add,
        Command::Del => AgentCommand::Del,
        Command::Check => AgentCommand::Check,
    };
    let container = container(env, agent_command)?;
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
    let excluded = |pod: &PodRef| match &conf.exclude_namespaces {
        Some(list) => list.contains(&pod.namespace),
        None => DEFAULT_EXCLUDED_NAMESPACES.contains(&pod.namespace.as_str()),
    };
    // Not a Kubernetes pod, or one of an excluded namespace: nothing to ask.
    let pod = container.pod.clone().filter(|p| !excluded(p));
    match agent_command {
        AgentCommand::Add => {
            let prev = chained_result(&conf)?;
            let Some(pod) = pod else {
                return Ok((passed_through(&conf, prev), None));
            };
            let request = request(AgentCommand::Add, &container, pod, addresses(prev));
            match agent(&socket, &request) {
                Ok(AgentReply::Done { enrolled }) => Ok((
                    passed_through(&conf, prev),
                    enrolled.then(|| format!("ambit-cni: {} enrolled", request.pod)),
                )),
                Ok(AgentReply::Failed { reason, retry }) => {
                    Err(agent_failed(&request.pod, reason, retry))
                }
                Err(e) => Err(unreachable_agent(&socket, e)),
            }
        }
        AgentCommand::Del => {
            let Some(pod) = pod else {
                return Ok((String::new(), None));
            };
            let ips = conf.prev_result.as_ref().map(addresses).unwrap_or_default();
            let request = request(AgentCommand::Del, &container, pod, ips);
            match agent(&socket, &request) {
                Ok(AgentReply::Done { .. }) => Ok((String::new(), None)),
                Ok(AgentReply::Failed { reason, retry }) => {
                    Err(agent_failed(&request.pod, reason, retry))
                }
                // The pod's rules go with its namespace; an agent that was down
                // re-discovers the pods that are left when it starts.
                Err(e) => Ok((
                    String::new(),
                    Some(format!(
                        "ambit-cni: DEL of {}: node agent at {} not reached ({e}); it reconciles when it starts",
                        request.pod,
                        socket.display()
                    )),
                )),
            }
        }
        AgentCommand::Check => {
            let prev = chained_result(&conf)?;
            let Some(pod) = pod else {
                return Ok((String::new(), None));
            };
            let request = request(AgentCommand::Check, &container, pod, addresses(prev));
            match agent(&socket, &request) {
                Ok(AgentReply::Done { .. }) => Ok((String::new(), None)),
                Ok(AgentReply::Failed { reason, retry }) => {
                    Err(agent_failed(&request.pod, reason, retry))
                }
                Err(e) => Err(unreachable_agent(&socket, e)),
            }
        }
    }
}

fn command(env: &dyn Fn(&str) -> Option<String>) -> Result<Command, CniError> {
    let value = env("CNI_COMMAND").unwrap_or_default();
    Ok(match value.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "VERSION" => Command::Version,
        "STATUS" => Command::Status,
        "GC" => Command::Gc,
        "" => {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                "CNI_COMMAND is not set",
                "a container runtime sets CNI_COMMAND to ADD, DEL, CHECK, VERSION, STATUS or GC",
            ))
        }
        other => {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                "unknown CNI_COMMAND",
                format!("{other:?} is not one of ADD, DEL, CHECK, VERSION, STATUS, GC"),
            ))
        }
    })
}

fn net_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            "the network configuration on standard input is not valid",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!(
                "cniVersion {:?} of network {:?}; supported: {}",
                conf.cni_version,
                conf.name,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    if !conf.plugin_type.is_empty() && conf.plugin_type != "ambit-cni" {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "network configuration for another plugin",
            format!("type {:?}, expected \"ambit-cni\"", conf.plugin_type),
        ));
    }
    Ok(conf)
}

fn container(
    env: &dyn Fn(&str) -> Option<String>,
    command: AgentCommand,
) -> Result<Container, CniError> {
    let required = |name: &str| {
        env(name).filter(|v| !v.is_empty()).ok_or_else(|| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                "a required CNI variable is missing",
                format!("{name} is not set"),
            )
        })
    };
    let id = required("CNI_CONTAINERID")?;
    let ifname = required("CNI_IFNAME")?;
    let netns = match command {
        // On DEL the namespace may already be gone.
        AgentCommand::Del => env("CNI_NETNS").filter(|v| !v.is_empty()),
        _ => Some(required("CNI_NETNS")?),
    }
    .map(PathBuf::from);
    let args = cni_args(&env("CNI_ARGS").unwrap_or_default())?;
    let arg = |key: &str| {
        args.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let pod = match (arg("K8S_POD_NAMESPACE"), arg("K8S_POD_NAME")) {
        (Some(namespace), Some(name)) => Some(PodRef {
            namespace,
            name,
            uid: arg("K8S_POD_UID"),
        }),
        _ => None,
    };
    Ok(Container {
        id,
        netns,
        ifname,
        pod,
    })
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
fn cni_args(text: &str) -> Result<Vec<(String, String)>, CniError> {
    text.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                "CNI_ARGS is malformed",
                format!("{pair:?} is not KEY=VALUE"),
            )),
        })
        .collect()
}

/// The primary plugin's result, which a chained plugin must have.
fn chained_result(conf: &NetConf) -> Result<&Map<String, Value>, CniError> {
    conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "no prevResult",
            "ambit-cni is a chained plugin: list it after the cluster's network plugin in the conflist",
        )
    })
}

/// The previous result, unchanged but for the version it is written in.
fn passed_through(conf: &NetConf, prev: &Map<String, Value>) -> String {
    let mut result = prev.clone();
    result.insert("cniVersion".into(), conf.cni_version.clone().into());
    Value::Object(result).to_string()
}

/// The pod's addresses in a result (`ips[].address`, in CIDR form).
fn addresses(result: &Map<String, Value>) -> Vec<IpAddr> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address").and_then(Value::as_str))
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}

fn request(command: AgentCommand, c: &Container, pod: PodRef, ips: Vec<IpAddr>) -> AgentRequest {
    AgentRequest {
        command,
        container_id: c.id.clone(),
        netns: c.netns.clone(),
        ifname: c.ifname.clone(),
        pod,
        ips,
    }
}

fn agent_failed(pod: &PodRef, reason: String, retry: bool) -> CniError {
    if retry {
        CniError::new(
            code::TRY_AGAIN_LATER,
            "the node agent is not ready for this pod",
            format!("{pod}: {reason}"),
        )
    } else {
        CniError::new(
            code::AGENT_FAILED,
            "the node agent could not enrol the pod",
            format!("{pod}: {reason}"),
        )
    }
}

fn unreachable_agent(socket: &Path, error: String) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        "the node agent is not reachable",
        format!(
            "{}: {error}; ambit-cni agent must run on this node before its pods start",
            socket.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/p"}],"ips":[{"address":"10.1.0.5/24","gateway":"10.1.0.1","interface":0},{"address":"fd10:1::5/64","interface":0}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;

    fn conf(extra: &str) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni","agentSocket":"/run/agent.sock"{extra},"prevResult":{PREV}}}"#
        )
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn pod_env(command: &str) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", command.to_owned()),
            ("CNI_CONTAINERID", "c0ffee".to_owned()),
            ("CNI_NETNS", "/var/run/netns/p".to_owned()),
            ("CNI_IFNAME", "eth0".to_owned()),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=u1".to_owned(),
            ),
        ]
    }

    /// Runs the plugin with `pairs`, `stdin` and an agent answering `reply`; returns
    /// the outcome and the requests the agent got.
    fn invoke_with(
        pairs: &[(&str, String)],
        stdin: &str,
        reply: Result<AgentReply, String>,
    ) -> (Outcome, Vec<(PathBuf, AgentRequest)>) {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut seen = Vec::new();
        let outcome = run(&env(&pairs), stdin.as_bytes(), &mut |socket, request| {
            seen.push((socket.to_owned(), request.clone()));
            reply.clone()
        });
        (outcome, seen)
    }

    fn json_of(outcome: &Outcome) -> Value {
        serde_json::from_str(&outcome.stdout).unwrap_or_else(|e| panic!("{e}: {outcome:?}"))
    }

    #[test]
    fn add_asks_the_agent_and_passes_the_primary_result_through_unchanged() {
        let (out, seen) = invoke_with(
            &pod_env("ADD"),
            &conf(""),
            Ok(AgentReply::Done { enrolled: true }),
        );
        assert_eq!(out.exit_code, 0, "{out:?}");
        assert_eq!(json_of(&out), serde_json::from_str::<Value>(PREV).unwrap());
        let (socket, request) = &seen[0];
        assert_eq!(socket, Path::new("/run/agent.sock"));
        assert_eq!(request.command, AgentCommand::Add);
        assert_eq!(request.pod.to_string(), "shop/web");
        assert_eq!(request.pod.uid.as_deref(), Some("u1"));
        assert_eq!(
            request.netns.as_deref(),
            Some(Path::new("/var/run/netns/p"))
        );
        assert_eq!(
            request.ips,
            vec![
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd10:1::5".parse().unwrap()
            ]
        );
        assert!(out.stderr.unwrap().contains("shop/web enrolled"));
    }

    #[test]
    fn pods_the_agent_need_not_see_pass_through_without_it() {
        // Not a Kubernetes pod.
        let mut bare = pod_env("ADD");
        bare.retain(|(k, _)| *k != "CNI_ARGS");
        // A default-excluded namespace, and one excluded by the configuration.
        let system = pod_env("ADD")
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    v.replace("K8S_POD_NAMESPACE=shop", "K8S_POD_NAMESPACE=kube-system"),
                )
            })
            .collect::<Vec<_>>();
        for (pairs, stdin) in [
            (bare, conf("")),
            (system, conf("")),
            (pod_env("ADD"), conf(r#","excludeNamespaces":["shop"]"#)),
        ] {
            let (out, seen) = invoke_with(&pairs, &stdin, Err("no agent".into()));
            assert_eq!(out.exit_code, 0, "{out:?}");
            assert_eq!(json_of(&out), serde_json::from_str::<Value>(PREV).unwrap());
            assert!(seen.is_empty());
        }
    }

    #[test]
    fn an_unreachable_or_unready_agent_makes_the_runtime_try_again_later() {
        let (out, _) = invoke_with(&pod_env("ADD"), &conf(""), Err("connection refused".into()));
        assert_eq!(out.exit_code, 1);
        let e = json_of(&out);
        assert_eq!(e["code"], code::TRY_AGAIN_LATER);
        assert!(
            e["details"]
                .as_str()
                .unwrap()
                .contains("/run/agent.sock: connection refused"),
            "{e}"
        );

        let (out, _) = invoke_with(
            &pod_env("ADD"),
            &conf(""),
            Ok(AgentReply::Failed {
                reason: "ztunnel is not running".into(),
                retry: true,
            }),
        );
        assert_eq!(json_of(&out)["code"], code::TRY_AGAIN_LATER);
        let (out, _) = invoke_with(
            &pod_env("ADD"),
            &conf(""),
            Ok(AgentReply::Failed {
                reason: "rules could not be installed".into(),
                retry: false,
            }),
        );
        let e = json_of(&out);
        assert_eq!(e["code"], code::AGENT_FAILED);
        assert_eq!(e["details"], "shop/web: rules could not be installed");
    }

    #[test]
    fn del_succeeds_without_a_namespace_or_an_agent() {
        let mut pairs = pod_env("DEL");
        pairs.retain(|(k, _)| *k != "CNI_NETNS");
        let (out, seen) = invoke_with(&pairs, &conf(""), Ok(AgentReply::Done { enrolled: false }));
        assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""));
        assert_eq!(seen[0].1.command, AgentCommand::Del);
        assert_eq!(seen[0].1.netns, None);
        let (out, _) = invoke_with(&pairs, &conf(""), Err("connection refused".into()));
        assert_eq!(out.exit_code, 0, "{out:?}");
        assert!(out.stderr.unwrap().contains("reconciles"));
    }

    #[test]
    fn check_reports_what_the_agent_finds_wrong() {
        let (out, seen) = invoke_with(
            &pod_env("CHECK"),
            &conf(""),
            Ok(AgentReply::Done { enrolled: true }),
        );
        assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""));
        assert_eq!(seen[0].1.command, AgentCommand::Check);
        let (out, _) = invoke_with(
            &pod_env("CHECK"),
            &conf(""),
            Ok(AgentReply::Failed {
                reason: "redirect rules are missing".into(),
                retry: false,
            }),
        );
        assert_eq!(json_of(&out)["code"], code::AGENT_FAILED);
    }

    #[test]
    fn version_lists_what_is_supported() {
        let (out, _) = invoke_with(
            &[("CNI_COMMAND", "VERSION".into())],
            r#"{"cniVersion":"0.4.0"}"#,
            Err(String::new()),
        );
        assert_eq!(out.exit_code, 0);
        let v = json_of(&out);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED_VERSIONS.len()
        );
    }

    #[test]
    fn bad_input_gets_an_error_result_naming_what_is_wrong() {
        // (environment, standard input, error code, a word the error must say)
        type Case = (Vec<(&'static str, String)>, String, u32, &'static str);
        let cases: Vec<Case> = vec![
            (
                vec![],
                conf(""),
                code::INVALID_ENVIRONMENT,
                "CNI_COMMAND is not set",
            ),
            (
                vec![("CNI_COMMAND", "FROB".into())],
                conf(""),
                code::INVALID_ENVIRONMENT,
                "FROB",
            ),
            (
                pod_env("ADD"),
                "{not json".into(),
                code::DECODE_FAILURE,
                "not valid",
            ),
            (
                pod_env("ADD"),
                conf("").replace(
                    r#""cniVersion":"1.0.0","name""#,
                    r#""cniVersion":"9.9.9","name""#,
                ),
                code::INCOMPATIBLE_VERSION,
                "9.9.9",
            ),
            (
                pod_env("ADD"),
                r#"{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni"}"#.into(),
                code::INVALID_CONFIG,
                "chained plugin",
            ),
            (
                pod_env("ADD"),
                conf("").replace(r#""type":"ambit-cni""#, r#""type":"bridge""#),
                code::INVALID_CONFIG,
                "bridge",
            ),
            (
                pod_env("ADD")
                    .into_iter()
                    .filter(|(k, _)| *k != "CNI_CONTAINERID")
                    .collect(),
                conf(""),
                code::INVALID_ENVIRONMENT,
                "CNI_CONTAINERID",
            ),
            (
                pod_env("ADD")
                    .into_iter()
                    .filter(|(k, _)| *k != "CNI_NETNS")
                    .collect(),
                conf(""),
                code::INVALID_ENVIRONMENT,
                "CNI_NETNS",
            ),
            (
                pod_env("ADD")
                    .into_iter()
                    .map(|(k, v)| {
                        if k == "CNI_ARGS" {
                            (k, "K8S_POD_NAME".to_owned())
                        } else {
                            (k, v)
                        }
                    })
                    .collect(),
                conf(""),
                code::INVALID_ENVIRONMENT,
                "KEY=VALUE",
            ),
        ];
        for (pairs, stdin, want, says) in cases {
            let (out, seen) = invoke_with(&pairs, &stdin, Ok(AgentReply::Done { enrolled: true }));
            assert_eq!(out.exit_code, 1, "{pairs:?}: {out:?}");
            let e = json_of(&out);
            assert_eq!(e["code"], want, "{pairs:?}: {e}");
            assert!(
                e.to_string().contains(says),
                "{pairs:?}: {e} lacks {says:?}"
            );
            assert!(e["msg"].is_string() && e["cniVersion"].is_string(), "{e}");
            assert!(seen.is_empty());
        }
    }
}
