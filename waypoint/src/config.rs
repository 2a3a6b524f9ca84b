//! The waypoint's configuration: flags, each also settable through the environment.
//! The only place the waypoint reads its environment.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ambit_core::waypoint::GatewayRef;
use ambit_core::{IdentityError, SpiffeId, TrustDomain};
use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "waypoint",
    version,
    about = "Ambit's waypoint: terminates HBONE for the services and workloads bound to its Gateway and serves their HTTP"
)]
pub struct Config {
    /// The Gateway this waypoint is, <namespace>/<name>. It serves the Services and
    /// workloads bound to it (istio.io/use-waypoint).
    #[arg(long, env = "AMBIT_GATEWAY")]
    pub gateway: GatewayRef,

    /// The service account the waypoint runs as, in the Gateway's namespace; its
    /// identity is spiffe://<trust-domain>/ns/<gateway namespace>/sa/<this>. Defaults
    /// to the Gateway's name, as the control plane names it.
    #[arg(long, env = "AMBIT_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,

    /// The mesh's trust domain.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,

    /// The control plane, host:port: the CA and delta xDS (TLS).
    #[arg(
        long,
        env = "AMBIT_CONTROL_ADDRESS",
        default_value = "ambit-control.ambit-system.svc:15012"
    )]
    pub control_address: String,

    /// The mesh root certificate(s) (PEM) the control plane's certificate must chain
    /// to: the trust bundle, read again for every new connection to it.
    #[arg(long, env = "AMBIT_CA_ROOT")]
    pub ca_root: PathBuf,

    /// Lifetime of the certificate the waypoint requests (Istio's SECRET_TTL), e.g.
    /// 24h or 90s; renewed at half-life.
    #[arg(long, env = "SECRET_TTL", default_value = "24h", value_parser = ambit_net::process::parse_ttl)]
    pub cert_ttl: std::time::Duration,

    /// Identity the control plane must present; defaults to
    /// spiffe://<trust-domain>/ns/ambit-system/sa/ambit-control.
    #[arg(long, env = "AMBIT_CONTROL_IDENTITY")]
    pub control_identity: Option<SpiffeId>,

    /// File holding the waypoint's bearer token (its service account's) for the CA and
    /// xDS. Read again for every request, so a rotated token is picked up.
    #[arg(long, env = "AMBIT_TOKEN_FILE")]
    pub token_file: PathBuf,

    /// This pod's IP (Kubernetes: status.podIP), sent as the `forwarded` address of
    /// the HBONE tunnels the waypoint opens for HTTP (each carries many clients'
    /// requests; the client of each is in its x-forwarded-for).
    #[arg(long, env = "INSTANCE_IP")]
    pub instance_ip: Option<IpAddr>,

    /// HBONE listener (mTLS, client certificate required).
    #[arg(long, env = "AMBIT_HBONE_ADDR", default_value = "0.0.0.0:15008")]
    pub hbone_addr: SocketAddr,

    /// Admin endpoint (keep it on localhost).
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus metrics endpoint.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Readiness endpoint.
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// Threads serving traffic (the async runtime's workers); default: one per CPU
    /// the process may run on (Envoy's `--concurrency`).
    #[arg(long, env = "AMBIT_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,

    /// Largest request header section, KiB (Envoy's max_request_headers_kb); larger
    /// gets 431.
    #[arg(long, env = "AMBIT_MAX_REQUEST_HEADERS_KB", default_value_t = 60, value_parser = clap::value_parser!(u32).range(8..=1024))]
    pub max_request_headers_kb: u32,

    /// How long a client may take to send a request's headers.
    #[arg(long, env = "AMBIT_HEADER_TIMEOUT", default_value = "10s", value_parser = ambit_net::process::parse_millis)]
    pub header_timeout: Duration,

    /// A downstream connection that moves no byte for this long is closed.
    #[arg(long, env = "AMBIT_IDLE_TIMEOUT", default_value = "300s", value_parser = ambit_net::process::parse_millis)]
    pub idle_timeout: Duration,

    /// How long to wait for a client's first bytes to tell HTTP from TCP; a client
    /// that sends nothing first (a server-speaks-first protocol) is TCP after it.
    #[arg(long, env = "AMBIT_PROTOCOL_DETECTION_TIMEOUT", default_value = "1000ms", value_parser = ambit_net::process::parse_millis)]
    pub protocol_detection_timeout: Duration,

    /// How long open connections may take to finish after SIGTERM.
    #[arg(long, env = "AMBIT_DRAIN_DEADLINE", default_value = "5000ms", value_parser = ambit_net::process::parse_millis)]
    pub drain_deadline: Duration,

    /// PEM certificates trusted for the HTTPS servers of RequestAuthentication
    /// `jwksUri`s, besides the system's roots.
    #[arg(long, env = "AMBIT_JWKS_CA_BUNDLE")]
    pub jwks_ca_bundle: Option<PathBuf>,

    /// A `jwksUri` is fetched again this often (a failed fetch keeps the last keys).
    #[arg(long, env = "AMBIT_JWKS_REFRESH_INTERVAL", default_value = "600s", value_parser = ambit_net::process::parse_millis)]
    pub jwks_refresh_interval: Duration,

    /// A token whose key id the JWKS lacks fetches it again, at most this often.
    #[arg(long, env = "AMBIT_JWKS_REFETCH_MIN_INTERVAL", default_value = "10s", value_parser = ambit_net::process::parse_millis)]
    pub jwks_refetch_min_interval: Duration,

    /// How long one JWKS fetch may take.
    #[arg(long, env = "AMBIT_JWKS_FETCH_TIMEOUT", default_value = "5s", value_parser = ambit_net::process::parse_millis)]
    pub jwks_fetch_timeout: Duration,

    /// Log filter (tracing syntax); changeable at run time via the admin endpoint.
    #[arg(long, env = "AMBIT_LOG", default_value = "info")]
    pub log: String,

    /// Log lines as `text` or `json` (one JSON object per line).
    #[arg(long, env = "AMBIT_LOG_FORMAT", default_value = "text")]
    pub log_format: ambit_net::process::LogFormat,
}

impl Config {
    /// spiffe://<trust-domain>/ns/<gateway namespace>/sa/<service account>.
    pub fn identity(&self) -> Result<SpiffeId, IdentityError> {
        let sa = self
            .service_account
            .as_deref()
            .unwrap_or(&self.gateway.name);
        SpiffeId::new(self.trust_domain.clone(), &self.gateway.namespace, sa)
    }

    pub fn control_identity(&self) -> Result<SpiffeId, IdentityError> {
        match &self.control_identity {
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
            "waypoint",
            "--gateway",
            "shop/waypoint",
            "--ca-root",
            "/r.pem",
            "--token-file",
            "/t",
        ];
        args.extend_from_slice(extra);
        Config::try_parse_from(args)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.identity().unwrap().as_str(),
            "spiffe://cluster.local/ns/shop/sa/waypoint"
        );
        assert_eq!(
            c.control_identity().unwrap().as_str(),
            "spiffe://cluster.local/ns/ambit-system/sa/ambit-control"
        );
        assert_eq!(c.hbone_addr.port(), 15008);
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:15000");
        assert_eq!(c.metrics_addr.port(), 15020);
        assert_eq!(c.readiness_addr.port(), 15021);
        assert_eq!(c.max_request_headers_kb, 60);
        assert_eq!(c.protocol_detection_timeout, Duration::from_secs(1));
        assert_eq!(c.jwks_refresh_interval, Duration::from_secs(600));
        assert_eq!(c.jwks_refetch_min_interval, Duration::from_secs(10));
        assert_eq!(c.jwks_fetch_timeout, Duration::from_secs(5));
        assert!(c.jwks_ca_bundle.is_none());
        let c = parse(&[
            "--service-account",
            "wp",
            "--trust-domain",
            "example.org",
            "--idle-timeout",
            "2s",
        ])
        .unwrap();
        assert_eq!(
            c.identity().unwrap().as_str(),
            "spiffe://example.org/ns/shop/sa/wp"
        );
        assert_eq!(c.idle_timeout, Duration::from_secs(2));
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (vec!["--gateway", "waypoint"], "--gateway"),
            (vec!["--trust-domain", "Bad"], "--trust-domain"),
            (vec!["--header-timeout", "soon"], "--header-timeout"),
            (
                vec!["--max-request-headers-kb", "1"],
                "--max-request-headers-kb",
            ),
            (vec!["--hbone-addr", "localhost"], "--hbone-addr"),
            (
                vec!["--jwks-refresh-interval", "often"],
                "--jwks-refresh-interval",
            ),
        ] {
            let e = parse(&args).unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
        }
        let e = Config::try_parse_from(["waypoint"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--gateway"), "{e}");
    }
}
