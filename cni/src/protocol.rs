//! What the CNI plugin tells the node agent, over the agent's Unix socket: one JSON
//! object per line each way, one request per connection. The plugin is short-lived and
//! runs in the container runtime's context; everything stateful (the enrolment
//! decision, the redirect rules, the hand-off to ztunnel, the report) is the agent's.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the agent listens unless the plugin's configuration says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/ambit/cni.sock";

/// A pod, as the runtime names it in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`, when the runtime sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The runtime's command, as the agent handles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentCommand {
    /// The pod's network is up: enrol it if it should be, before the plugin returns.
    Add,
    /// The pod is going away: forget it.
    Del,
    /// Is the pod's redirection as it should be?
    Check,
}

/// One request from the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRequest {
    pub command: AgentCommand,
    pub container_id: String,
    /// The pod's network namespace (absent on a `DEL` after it is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub pod: PodRef,
    /// The pod's addresses, from the primary plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub enum AgentReply {
    /// Done: the pod is enrolled (its redirection is in place and ztunnel serves it),
    /// or it is not to be enrolled and was left alone.
    Done { enrolled: bool },
    /// It could not be done; `retry` when the runtime should try again later (the
    /// agent or ztunnel is not ready).
    Failed { reason: String, retry: bool },
}

/// How long the plugin waits for the agent: enrolment includes ztunnel's certificate
/// request, which a slow control plane can take seconds over.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `request` to the agent at `socket` and reads its reply.
pub fn call(socket: &Path, request: &AgentRequest) -> Result<AgentReply, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(AGENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(AGENT_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream.write_all(&line).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| format!("no answer: {e}"))?;
    if reply.trim().is_empty() {
        return Err("the agent closed the connection without answering".into());
    }
    serde_json::from_str(&reply).map_err(|e| format!("unreadable answer {reply:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_json_object_each() {
        let request = AgentRequest {
            command: AgentCommand::Add,
            container_id: "c1".into(),
            netns: Some("/var/run/netns/p".into()),
            ifname: "eth0".into(),
            pod: PodRef {
                namespace: "shop".into(),
                name: "web".into(),
                uid: None,
            },
            ips: vec!["10.1.0.2".parse().unwrap()],
        };
        let text = serde_json::to_string(&request).unwrap();
        assert!(!text.contains('\n'));
        assert!(text.contains(r#""command":"add""#), "{text}");
        assert_eq!(
            serde_json::from_str::<AgentRequest>(&text).unwrap(),
            request
        );
        let reply: AgentReply = serde_json::from_str(
            r#"{"outcome":"failed","reason":"ztunnel is not running","retry":true}"#,
        )
        .unwrap();
        assert_eq!(
            reply,
            AgentReply::Failed {
                reason: "ztunnel is not running".into(),
                retry: true
            }
        );
    }
}
