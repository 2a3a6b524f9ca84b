//! ztunnel's configuration: flags, each also settable through the environment. The
//! only place ztunnel reads its environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_core::{SpiffeId, TrustDomain};
use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "Ambit's node proxy: carries enrolled pods' traffic over HBONE"
)]
pub struct Config {
    /// Name of the node this ztunnel serves (Kubernetes: spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,

    /// Cluster name reported in metrics and baggage.
    #[arg(long, env = "AMBIT_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// The mesh's trust domain.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,

    /// Local model file (Ambit's model YAML), re-read when it changes: the development
    /// source, instead of `--xds-address`.
    #[arg(
        long,
        env = "AMBIT_MODEL_FILE",
        required_unless_present = "xds_address",
        conflicts_with = "xds_address"
    )]
    pub model_file: Option<PathBuf>,

    /// The control plane's delta xDS, host:port (TLS, authenticated with the CA token):
    /// the normal source of the model. Usually the CA's address.
    #[arg(long, env = "AMBIT_XDS_ADDRESS")]
    pub xds_address: Option<String>,

    /// How often the model file is checked for changes.
    #[arg(long, env = "AMBIT_MODEL_POLL", default_value = "500ms", value_parser = ambit_net::process::parse_millis)]
    pub model_poll: Duration,

    /// The CA, host:port.
    #[arg(
        long,
        env = "AMBIT_CA_ADDRESS",
        default_value = "ambit-control.ambit-system.svc:15012"
    )]
    pub ca_address: String,

    /// The mesh root certificate(s) (PEM) the CA's certificate must chain to: the
    /// trust bundle, read again for every new connection to the control plane.
    #[arg(long, env = "AMBIT_CA_ROOT")]
    pub ca_root: PathBuf,

    /// Lifetime of the workload certificates ztunnel requests (Istio's SECRET_TTL),
    /// e.g. 24h or 90s; renewed at half-life.
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = ambit_net::process::parse_ttl)]
    pub cert_ttl: std::time::Duration,

    /// Identity the CA must present; defaults to
    /// spiffe://<trust-domain>/ns/ambit-system/sa/ambit-control.
    #[arg(long, env = "AMBIT_CA_IDENTITY")]
    pub ca_identity: Option<SpiffeId>,

    /// File holding this node agent's bearer token for the CA and xDS (in a cluster, a
    /// projected service account token with audience istio-ca). Read again for every
    /// request, so a rotated token is picked up.
    #[arg(long, env = "AMBIT_CA_TOKEN_FILE")]
    pub ca_token_file: PathBuf,

    /// Unix socket on which the node agent hands over pods.
    #[arg(
        long,
        env = "AMBIT_HANDOFF_SOCKET",
        default_value = "/var/run/ambit/ztunnel.sock"
    )]
    pub handoff_socket: PathBuf,

    /// Admin endpoint (keep it on localhost).
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics endpoint.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness endpoint.
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// HBONE connections carry at most this many tunnels each.
    #[arg(long, env = "AMBIT_HBONE_MAX_STREAMS", default_value_t = 100)]
    pub hbone_max_streams: u32,

    /// HBONE per-stream flow-control window, bytes.
    #[arg(long, env = "AMBIT_HBONE_STREAM_WINDOW", default_value_t = 4 << 20)]
    pub hbone_stream_window: u32,

    /// HBONE per-connection flow-control window, bytes.
    #[arg(long, env = "AMBIT_HBONE_CONNECTION_WINDOW", default_value_t = 16 << 20)]
    pub hbone_connection_window: u32,

    /// How long open connections may take to finish after SIGTERM.
    #[arg(long, env = "AMBIT_DRAIN_DEADLINE", default_value = "5000ms", value_parser = ambit_net::process::parse_millis)]
    pub drain_deadline: Duration,

    /// Log filter (tracing syntax); changeable at run time via the admin endpoint.
    #[arg(long, env = "AMBIT_LOG", default_value = "info")]
    pub log: String,

    /// Log lines as `text` or `json` (one JSON object per line).
    #[arg(long, env = "AMBIT_LOG_FORMAT", default_value = "text")]
    pub log_format: ambit_net::process::LogFormat,
}

impl Config {
    pub fn ca_identity(&self) -> Result<SpiffeId, ambit_core::IdentityError> {
        match &self.ca_identity {
            Some(id) => Ok(id.clone()),
            None => ambit_net::ca_client::default_control_identity(&self.trust_domain),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, clap::Error> {
        let mut args = vec![
            "ztunnel",
            "--node",
            "node-a",
            "--model-file",
            "/m.yaml",
            "--ca-root",
            "/r.pem",
            "--ca-token-file",
            "/t",
        ];
        args.extend_from_slice(extra);
        Config::try_parse_from(args)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:15000");
        assert_eq!(c.metrics_addr.port(), 15020);
        assert_eq!(c.readiness_addr.port(), 15021);
        assert_eq!(c.hbone_max_streams, 100);
        assert_eq!(c.hbone_stream_window, 4 << 20);
        assert_eq!(c.hbone_connection_window, 16 << 20);
        assert_eq!(c.model_poll, Duration::from_millis(500));
        assert_eq!(
            c.ca_identity().unwrap().as_str(),
            "spiffe://cluster.local/ns/ambit-system/sa/ambit-control"
        );
        let c = parse(&["--drain-deadline", "2s", "--trust-domain", "example.org"]).unwrap();
        assert_eq!(c.drain_deadline, Duration::from_secs(2));
        assert_eq!(
            c.ca_identity().unwrap().as_str(),
            "spiffe://example.org/ns/ambit-system/sa/ambit-control"
        );
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (vec!["--model-poll", "soon"], "--model-poll"),
            (vec!["--trust-domain", "Bad"], "--trust-domain"),
            (vec!["--ca-identity", "cart"], "--ca-identity"),
            (vec!["--admin-addr", "localhost"], "--admin-addr"),
            (vec!["--xds-address", "x:15012"], "--xds-address"),
        ] {
            let e = parse(&args).unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
        assert!(Config::try_parse_from(["ztunnel"])
            .unwrap_err()
            .to_string()
            .contains("--node"));
    }
}
