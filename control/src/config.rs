//! `ambit-control`'s configuration: flags, each also settable through the environment.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[group(id = "control")]
#[command(
    name = "ambit-control",
    version,
    about = "Ambit's control plane: the cluster (or, in local mode, a directory of Kubernetes YAML) in, delta xDS to ztunnels and the CA out, on one port"
)]
pub struct Config {
    /// Local mode: a directory of Kubernetes YAML (Namespaces, Pods with status.podIP
    /// and spec.nodeName, Services, EndpointSlices), re-read when it changes, instead
    /// of a cluster. Without it, the control plane watches the Kubernetes API (in-cluster
    /// configuration, or $KUBECONFIG / ~/.kube/config) and keeps the CA's root in a
    /// Secret in --system-namespace.
    #[arg(long, env = "AMBIT_LOCAL_DIR")]
    pub local_dir: Option<PathBuf>,

    /// Service accounts (`namespace/name`) of the node agents trusted to request
    /// certificates for the pods on their own node, in a cluster. Default:
    /// `<system-namespace>/ztunnel`.
    #[arg(long = "node-agent", env = "AMBIT_NODE_AGENTS", value_delimiter = ',', value_parser = parse_account)]
    pub node_agents: Vec<(String, String)>,

    /// The namespace whose AuthorizationPolicies and PeerAuthentications apply
    /// mesh-wide (Istio's meshConfig.rootNamespace).
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = crate::translate::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,

    /// Local mode: the directory where the control plane keeps its own state across
    /// restarts (the node agents' redirection reports, `redirections.json`).
    /// Default: the CA's `--root-dir`.
    #[arg(long, env = "AMBIT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Local mode: the file where the status each object would carry in a cluster
    /// (route parents, conditions) is written, as a YAML list, whenever it changes.
    /// Default: `status.yaml` in the state directory.
    #[arg(long, env = "AMBIT_STATUS_FILE")]
    pub status_file: Option<PathBuf>,

    /// In a cluster, how often the CA's Secret (`cacerts`, or `istio-ca-secret`) is
    /// read again, so changed material is used without a restart.
    #[arg(long, env = "AMBIT_CA_RELOAD", default_value = "10s", value_parser = parse_poll)]
    pub ca_reload: Duration,

    /// How often the directory is read for changes.
    #[arg(long, env = "AMBIT_LOCAL_POLL", default_value = "200ms", value_parser = parse_poll)]
    pub poll: Duration,

    /// In a cluster: the image of the waypoint pods the control plane deploys for
    /// each waypoint Gateway.
    #[arg(
        long,
        env = "AMBIT_WAYPOINT_IMAGE",
        default_value = "ambit/waypoint:latest"
    )]
    pub waypoint_image: String,

    /// In a cluster: where waypoint pods reach the control plane (`host:port`).
    /// Default: `ambit-control.<system-namespace>.svc:15012`.
    #[arg(long, env = "AMBIT_WAYPOINT_CONTROL_PLANE")]
    pub waypoint_control_plane: Option<String>,

    /// Log lines as `text` or `json` (one JSON object per line). The filter is the
    /// CA's `--log`.
    #[arg(long, env = "AMBIT_LOG_FORMAT", default_value = "text")]
    pub log_format: ambit_net::process::LogFormat,

    /// In a cluster: this replica's name in the leader election (the pod's name).
    /// Default: the host's name and a random suffix.
    #[arg(long, env = "AMBIT_LEADER_IDENTITY")]
    pub leader_identity: Option<String>,

    /// In a cluster: the Lease (in the system namespace) whose holder alone writes to
    /// the cluster (status, root ConfigMaps, waypoint objects); every replica serves.
    #[arg(
        long,
        env = "AMBIT_LEADER_LEASE",
        default_value = "ambit-control-leader"
    )]
    pub leader_lease: String,

    /// How long a leader's claim lasts after its last renewal.
    #[arg(long, env = "AMBIT_LEADER_LEASE_DURATION", default_value = "15s", value_parser = parse_poll)]
    pub leader_lease_duration: Duration,

    /// How long a leader keeps leading while renewals fail (less than the lease).
    #[arg(long, env = "AMBIT_LEADER_RENEW_DEADLINE", default_value = "10s", value_parser = parse_poll)]
    pub leader_renew_deadline: Duration,

    /// How often a standby tries to take the lease and the leader renews it.
    #[arg(long, env = "AMBIT_LEADER_RETRY_PERIOD", default_value = "2s", value_parser = parse_poll)]
    pub leader_retry_period: Duration,

    /// The CA, which serves on the same port (`--listen`, default 0.0.0.0:15012).
    #[command(flatten)]
    pub ca: ambit_ca::config::Config,
}

impl Config {
    /// How waypoint pods are run in a cluster.
    pub fn waypoint_pods(&self) -> crate::waypoint_deploy::WaypointPods {
        crate::waypoint_deploy::WaypointPods {
            image: self.waypoint_image.clone(),
            control_plane: self
                .waypoint_control_plane
                .clone()
                .unwrap_or_else(|| format!("ambit-control.{}.svc:15012", self.ca.system_namespace)),
            trust_domain: self.ca.trust_domain.to_string(),
        }
    }

    /// Where local mode keeps its state: `--state-dir`, else `--root-dir`.
    pub fn local_state_dir(&self) -> Option<PathBuf> {
        self.state_dir.clone().or_else(|| self.ca.root_dir.clone())
    }

    /// Local mode: where the objects' status is written.
    pub fn local_status_file(&self) -> Option<PathBuf> {
        self.status_file
            .clone()
            .or_else(|| Some(self.local_state_dir()?.join("status.yaml")))
    }

    /// The leader election this replica runs in a cluster, checked: the renew
    /// deadline must be shorter than the lease and longer than the retry period, or a
    /// leader could still be writing when another takes over.
    pub fn election(&self) -> anyhow::Result<crate::leader::ElectionConfig> {
        anyhow::ensure!(
            self.leader_retry_period < self.leader_renew_deadline
                && self.leader_renew_deadline < self.leader_lease_duration,
            "--leader-retry-period ({:?}) < --leader-renew-deadline ({:?}) < --leader-lease-duration ({:?}) must hold",
            self.leader_retry_period,
            self.leader_renew_deadline,
            self.leader_lease_duration
        );
        Ok(crate::leader::ElectionConfig {
            namespace: self.ca.system_namespace.clone(),
            lease_name: self.leader_lease.clone(),
            identity: self
                .leader_identity
                .clone()
                .unwrap_or_else(crate::leader::default_identity),
            lease_duration: self.leader_lease_duration,
            renew_deadline: self.leader_renew_deadline,
            retry_period: self.leader_retry_period,
        })
    }

    /// The trusted node agents' `(namespace, service account)`.
    pub fn node_agent_accounts(&self) -> Vec<(String, String)> {
        if self.node_agents.is_empty() {
            vec![(self.ca.system_namespace.clone(), "ztunnel".to_owned())]
        } else {
            self.node_agents.clone()
        }
    }
}

/// `namespace/name`.
fn parse_account(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
            Ok((ns.to_owned(), sa.to_owned()))
        }
        _ => Err(format!(
            "{s:?}: expected a service account as namespace/name"
        )),
    }
}

/// A duration in milliseconds (`200ms`) or in the CA's units (`2s`, `1m`).
fn parse_poll(s: &str) -> Result<Duration, String> {
    match s.strip_suffix("ms") {
        Some(ms) => ms
            .parse()
            .map(Duration::from_millis)
            .map_err(|_| format!("{s:?}: not a number of milliseconds")),
        None => ambit_ca::config::parse_duration(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_election_whose_leader_could_outlive_its_lease_is_refused() {
        let parse =
            |args: &[&str]| Config::try_parse_from(["ambit-control"].iter().chain(args)).unwrap();
        let defaults = parse(&[]).election().unwrap();
        assert_eq!(defaults.lease_name, "ambit-control-leader");
        assert_eq!(defaults.lease_duration, Duration::from_secs(15));
        let named = parse(&["--leader-identity", "ambit-control-7f9c"]);
        assert_eq!(named.election().unwrap().identity, "ambit-control-7f9c");
        let e = parse(&["--leader-renew-deadline", "20s"])
            .election()
            .unwrap_err();
        assert!(
            e.to_string().contains("--leader-renew-deadline (20s)"),
            "{e}"
        );
        let e = parse(&["--leader-retry-period", "10s"])
            .election()
            .unwrap_err();
        assert!(e.to_string().contains("--leader-retry-period (10s)"), "{e}");
    }

    #[test]
    fn the_ca_flags_come_with_the_control_planes_own() {
        let c = Config::try_parse_from([
            "ambit-control",
            "--local-dir",
            "/mesh",
            "--root-dir",
            "/ca",
            "--tokens",
            "/tokens.yaml",
        ])
        .unwrap();
        assert_eq!(c.local_dir, Some(PathBuf::from("/mesh")));
        assert_eq!(
            c.node_agent_accounts(),
            vec![("ambit-system".to_owned(), "ztunnel".to_owned())]
        );
        assert_eq!(c.poll, Duration::from_millis(200));
        assert_eq!(c.local_state_dir(), Some(PathBuf::from("/ca")));
        assert_eq!(c.ca.listen.port(), 15012);
        assert_eq!(parse_poll("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_poll("fast").is_err());
        let c = Config::try_parse_from([
            "ambit-control",
            "--root-dir",
            "/ca",
            "--node-agent",
            "kube-system/ztunnel,ambit-system/ambit-cni",
        ])
        .unwrap();
        assert_eq!(c.local_dir, None);
        assert_eq!(c.node_agent_accounts().len(), 2);
        let e = Config::try_parse_from([
            "ambit-control",
            "--root-dir",
            "/ca",
            "--node-agent",
            "ztunnel",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("namespace/name"), "{e}");
    }
}
