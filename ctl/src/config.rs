//! `ambitctl`'s flags and environment, the one place that reads them.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ambitctl",
    version,
    about = "Ambit's command line: install Ambit on a cluster, or run a local mesh of network namespaces on this machine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// A mesh on this machine (as root): nodes and pods as network namespaces, the real
    /// control plane and a ztunnel per node.
    Local {
        /// Where the running mesh's state is kept (one mesh at a time per directory).
        #[arg(long, env = "AMBITCTL_STATE_DIR", default_value_os_t = default_state_dir())]
        state_dir: PathBuf,
        #[command(subcommand)]
        command: LocalCommand,
    },
    /// Finds what is wrong with Kubernetes YAML before it is applied: each finding
    /// once, with its object, a stable code (AMB0001...), its severity and the fix.
    /// It runs the control plane's own reader and translation. Exit status 79 when a
    /// finding reaches --failure-threshold (as istioctl analyze), 1 when the files
    /// cannot be read.
    Analyze {
        /// Files or directories (every .yaml, .yml and .json below it) to analyze;
        /// without any, every namespace of the kubeconfig's cluster.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        cluster: crate::cluster::ClusterArgs,
        /// Where mesh-wide policies live (Istio's meshConfig.rootNamespace).
        #[arg(long, default_value = ambit_k8s::DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
        /// Report only the findings about objects in this namespace (everything is
        /// still read: a policy elsewhere may be what is wrong with it).
        #[arg(short = 'n', long = "namespace", conflicts_with = "all_namespaces")]
        namespace: Option<String>,
        /// Report the findings of every namespace (the default).
        #[arg(short = 'A', long = "all-namespaces")]
        all_namespaces: bool,
        /// `table` (default), `json` or `yaml`.
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: String,
        /// The least severity that makes the exit status 79: error, warning or info.
        #[arg(long, default_value = "error")]
        failure_threshold: String,
        /// The least severity printed: error, warning or info.
        #[arg(long, default_value = "info")]
        output_threshold: String,
        /// Lists every code, its severity and what it means, and exits.
        #[arg(long)]
        list_codes: bool,
    },
    /// Waypoints, with istioctl waypoint's flags and columns: of the running local
    /// mesh, or of a cluster (`--kubeconfig`/`--context`, or when no local mesh runs).
    Waypoint {
        /// The namespace (default: `default`).
        #[arg(short = 'n', long, global = true)]
        namespace: Option<String>,
        /// The local mesh's state directory.
        #[arg(long, env = "AMBITCTL_STATE_DIR", default_value_os_t = default_state_dir(), global = true)]
        state_dir: PathBuf,
        /// A cluster instead of the local mesh: its kubeconfig (also used when no
        /// local mesh runs).
        #[arg(long, global = true)]
        kubeconfig: Option<PathBuf>,
        /// The kubeconfig context (a cluster instead of the local mesh).
        #[arg(long, global = true)]
        context: Option<String>,
        #[command(subcommand)]
        command: WaypointCommand,
    },
    /// What each ztunnel of the running local mesh holds, from its admin endpoint
    /// (`/config_dump`): workloads (with their waypoint), services, policies and
    /// its certificates (identity, serial, expiry).
    ZtunnelConfig {
        /// workloads, services, policies, certificates or all.
        #[arg(value_parser = ["workloads", "services", "policies", "certificates", "all"])]
        what: String,
        /// One node's ztunnel (default: every node's).
        #[arg(long)]
        node: Option<String>,
        /// `table` (default) or `json`.
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: String,
        /// The local mesh's state directory.
        #[arg(long, env = "AMBITCTL_STATE_DIR", default_value_os_t = default_state_dir())]
        state_dir: PathBuf,
    },
    /// Authorization: why traffic is allowed or denied.
    Authz {
        #[command(subcommand)]
        command: AuthzCommand,
    },
    /// The objects of an install (`manifest generate`).
    Manifest {
        #[command(subcommand)]
        command: ManifestCommand,
    },
    /// Checks a cluster before an install: the Kubernetes version, CRDs or an Istio
    /// install in the way, the CNI directories, and on a node its kernel's nftables
    /// and TPROXY. Exits 1 when an install would fail or fight what is there.
    Precheck {
        #[command(flatten)]
        cluster: crate::cluster::ClusterArgs,
        /// The chart values the install will have (see `manifest generate`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Check this machine as a node (kernel modules, the CNI configuration
        /// directory); default: when /var/lib/kubelet exists.
        #[arg(long)]
        node: bool,
        #[arg(short = 'o', long = "output", default_value = "human")]
        output: ReportFormat,
    },
    /// Server-side applies Ambit (field manager ambitctl) to the kubeconfig's cluster,
    /// one line per object; with --wait, waits until every workload is rolled out and
    /// every CRD established.
    Install {
        #[command(flatten)]
        cluster: crate::cluster::ClusterArgs,
        /// A chart value, `key=value`, as `manifest generate` takes it.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Wait until everything is ready.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
        /// Take over fields another manager owns (as kubectl's --force-conflicts),
        /// e.g. CRDs Istio's chart installed.
        #[arg(long)]
        force_conflicts: bool,
    },
    /// Deletes every object an install makes and what the control plane made (the
    /// root's ConfigMaps, its Secret, the waypoints' objects, the waypoint
    /// GatewayClass); the CRDs only with --purge.
    Uninstall {
        #[command(flatten)]
        cluster: crate::cluster::ClusterArgs,
        /// Delete the CRDs too, and with them every object of their kinds.
        #[arg(long)]
        purge: bool,
        /// Wait until every deleted object is gone.
        #[arg(long)]
        wait: bool,
        /// How long to wait for the workloads (always) and everything (--wait).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Checks an install: every object present and ready, ztunnel on every node, the
    /// CA's endpoints ready, the mesh root published. Exits 1 on a failure.
    VerifyInstall {
        #[command(flatten)]
        cluster: crate::cluster::ClusterArgs,
        /// The chart values the install had.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[arg(short = 'o', long = "output", default_value = "human")]
        output: ReportFormat,
    },
    /// Prints a shell completion script: `source <(ambitctl completion bash)`.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// The demo app that runs in every pod, and its clients (for `local exec`).
    App {
        /// A hosts file (`IP name...`) naming services and pods: the local mesh has no
        /// DNS. `local exec` sets it.
        #[arg(long, env = "AMBIT_LOCAL_HOSTS")]
        hosts: Option<PathBuf>,
        #[command(subcommand)]
        command: AppCommand,
    },
}

/// How `precheck` and `verify-install` print their findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ReportFormat {
    #[default]
    Human,
    Json,
}

/// How `manifest generate` prints the objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ManifestFormat {
    /// Multi-document YAML, as `kubectl apply -f` reads it.
    #[default]
    Yaml,
    /// A `v1` `List` of the objects.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Prints the objects `install` would apply with the same --set: the Helm chart
    /// (deploy/helm/ambit/) rendered with its values changed by --set.
    Generate {
        /// A chart value, `key=value` (several comma-separated, as Helm's --set);
        /// repeatable. Unknown keys are refused with the list of known ones.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[arg(short = 'o', long = "output", default_value = "yaml")]
        output: ManifestFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum WaypointCommand {
    /// Prints the Gateway of a waypoint (class istio-waypoint, one HBONE listener).
    Generate {
        #[command(flatten)]
        waypoint: WaypointArgs,
    },
    /// Applies that Gateway to the running mesh (its pod starts).
    Apply {
        #[command(flatten)]
        waypoint: WaypointArgs,
        /// Also label the namespace istio.io/use-waypoint=<name>.
        #[arg(long)]
        enroll_namespace: bool,
        /// Replace the namespace's istio.io/use-waypoint label if it names another.
        #[arg(long)]
        overwrite: bool,
        /// Wait until the waypoint is programmed (its pod ready).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// The waypoints: NAME, REVISION, TRAFFIC TYPE, PROGRAMMED.
    List {
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// `table` (default) or `json`.
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: String,
    },
    /// Each waypoint's Programmed condition and what it serves.
    Status {
        /// One waypoint (default: all in the namespace).
        #[arg(long)]
        name: Option<String>,
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: String,
    },
    /// Deletes waypoints by name (or every one in the namespace with --all).
    Delete {
        names: Vec<String>,
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct WaypointArgs {
    /// The waypoint's name.
    #[arg(long, default_value = "waypoint")]
    pub name: String,
    /// What it serves: service, workload, all or none.
    #[arg(long = "for", default_value = "service", value_parser = ["service", "workload", "all", "none"])]
    pub traffic_type: String,
}

#[derive(Debug, Subcommand)]
pub enum AuthzCommand {
    /// Decides one connection (or HTTP request) with the proxies' own path choice
    /// and policy evaluators on the model the control plane makes: each hop that
    /// enforces (the waypoint, the destination's ztunnel), the policies that applied
    /// there in order, and what decided. Exit status 0 when allowed, 3 when denied.
    Explain {
        /// The client: a pod (`namespace/name`), an IP address, or a service account
        /// (`namespace/account`) when no pod of that name exists.
        #[arg(long, required_unless_present = "all")]
        from: Option<String>,
        /// The destination: a Service or a pod (`namespace/name`; `svc/...` or
        /// `pod/...` when both exist).
        #[arg(long, required_unless_present = "all")]
        to: Option<String>,
        /// The destination port (the Service's port, or the pod's).
        #[arg(long, required_unless_present = "all")]
        port: Option<u16>,
        /// The whole matrix of a namespace (`-n`): every pod in it to every port of
        /// every Service in it.
        #[arg(long, conflicts_with_all = ["from", "to", "port"], requires = "namespace")]
        all: bool,
        /// The namespace of `--all`.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// An HTTP request's method; without it, plain TCP.
        #[arg(long)]
        method: Option<String>,
        /// The request's path.
        #[arg(long, default_value = "/")]
        path: String,
        /// A request header `name=value` (repeatable).
        #[arg(long = "header", value_parser = parse_header)]
        headers: Vec<(String, String)>,
        /// Files or directories of YAML to decide on, offline; without it, the
        /// running local mesh's objects.
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// The local mesh's state directory (without -f).
        #[arg(long, env = "AMBITCTL_STATE_DIR", default_value_os_t = default_state_dir())]
        state_dir: PathBuf,
        /// `table` (default) or `json`.
        #[arg(short = 'o', long = "output", default_value = "table")]
        output: String,
    },
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_ascii_lowercase(), v.to_owned())),
        _ => Err(format!("{s:?}: expected name=value")),
    }
}

#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Runs the Kubernetes YAML in DIR: its nodes and pods as network namespaces,
    /// ambit-control, a ztunnel per node, the demo app in every pod, and ambient
    /// enrolment as the labels say. Returns once it runs; it keeps running until
    /// `local down`.
    Up {
        dir: PathBuf,
        /// Where `ambit-control` and `ztunnel` are (default: beside ambitctl).
        #[arg(long, env = "AMBITCTL_BIN_DIR")]
        bin_dir: Option<PathBuf>,
        /// How long starting may take.
        #[arg(long, default_value = "180s", value_parser = parse_duration)]
        timeout: Duration,
        /// How ztunnels and waypoints write their logs (under the mesh's `logs/`):
        /// `text`, or `json` (one JSON object per line, for a log collector).
        #[arg(long, default_value = "text")]
        log_format: ambit_net::process::LogFormat,
    },
    /// Stops the local mesh and removes every namespace, rule and process it made.
    Down {
        /// How long to wait for it to stop before killing it.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Runs a command inside a pod's network namespace: `local exec shop/client --
    /// ambitctl app get http://web.shop:8080/`.
    Exec {
        /// `namespace/name`, or `name` when only one namespace has it.
        pod: String,
        /// The command and its arguments, after `--`. `ambitctl` is this ambitctl.
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
    /// The running mesh: nodes, pods, services, enrolment, and each waypoint with
    /// what it serves.
    Status,
    /// Applies a file to the running mesh, as `kubectl apply -f` would (applying the
    /// same file again replaces what it applied before): AuthorizationPolicy,
    /// PeerAuthentication, RequestAuthentication, ServiceEntry, HTTPRoute, GRPCRoute,
    /// VirtualService and DestinationRule objects; a Gateway of class istio-waypoint
    /// (its waypoint pod starts); a running Namespace, Service or Pod whose only change
    /// is a waypoint label (istio.io/use-waypoint, istio.io/use-waypoint-namespace,
    /// istio.io/waypoint-for).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Deletes what `local apply -f FILE` applied: a Gateway's waypoint stops, waypoint
    /// labels go back to what `local up` read.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Rotates the mesh's CA root with overlap (docs/operations.md): a new root joins
    /// the trust bundle, signing switches to it once every proxy trusts it (or after
    /// --overlap), workloads move to it as they renew, and the old root leaves the
    /// bundle once no certificate it signed is valid. Traffic keeps flowing.
    RotateRoot {
        /// Switch signing after this long instead of once every certificate issued
        /// before the rotation has expired (shorter is only safe when every proxy has
        /// renewed since: see docs/operations.md).
        #[arg(long, value_parser = parse_duration)]
        overlap: Option<Duration>,
        /// Follow the rotation until the old root has left the bundle.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "30m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Upgrades the nodes' ztunnels in place, one node at a time, as a DaemonSet
    /// rolling update with a surge does: a new ztunnel starts beside the running one,
    /// the node agent hands it every pod, then the old one stops accepting and drains
    /// its open connections. No connection is refused on the way.
    UpgradeZtunnel {
        /// Only this node (repeatable); default every node.
        #[arg(long)]
        node: Vec<String>,
        /// The new ztunnel binary; default the one the mesh runs (a restart in place).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Wait up to this long for the replaced ztunnels to drain and exit.
        #[arg(long, value_parser = parse_duration, num_args = 0..=1, default_missing_value = "60s")]
        wait: Option<Duration>,
    },
    /// Owns a running mesh (started by `up`, stopped by `down`).
    #[command(hide = true)]
    Supervise {
        dir: PathBuf,
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long, default_value = "text")]
        log_format: ambit_net::process::LogFormat,
    },
}

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Serves HTTP echo and TCP echo (what `local up` runs in every pod).
    Serve {
        /// `namespace/name`, for the replies.
        #[arg(long)]
        pod: String,
        #[arg(long)]
        node: String,
        #[arg(long = "http")]
        http_ports: Vec<u16>,
        #[arg(long = "tcp")]
        tcp_ports: Vec<u16>,
        /// The node's network namespace, to ask its ztunnel who called.
        #[arg(long)]
        node_netns: Option<PathBuf>,
    },
    /// HTTP request for a URL (`http://web.shop:8080/`), GET unless `-X` says
    /// otherwise, printing the answer; exits 1 unless every answer is 200.
    Get {
        url: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The method, as curl's `-X` (`POST`, `DELETE`).
        #[arg(short = 'X', long = "request", default_value = "GET")]
        method: String,
        /// A request header, as curl's `-H` (`x-canary: yes`); repeatable.
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
    },
    /// Sends a message to a TCP echo (`web.shop:9000`) and prints what comes back.
    Send { to: String, message: String },
}

/// `<temp dir>/ambit-localmesh/ctl`.
pub fn default_state_dir() -> PathBuf {
    ambit_localmesh::default_state_root().join("ctl")
}

/// `500ms`, `30s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: give a duration like 500ms, 30s or 2m");
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = number.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2d").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn exec_takes_the_command_after_the_double_dash() {
        let cli = Cli::try_parse_from([
            "ambitctl",
            "local",
            "exec",
            "shop/client",
            "--",
            "ambitctl",
            "app",
            "get",
            "--count",
            "2",
            "http://web.shop/",
        ])
        .unwrap();
        let Command::Local {
            command: LocalCommand::Exec { pod, command },
            ..
        } = cli.command
        else {
            panic!("not exec");
        };
        assert_eq!(pod, "shop/client");
        assert_eq!(command.len(), 6);
    }
}
