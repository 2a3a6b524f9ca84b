//! `ambit-ca`'s configuration: flags, each also settable through the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_core::{SpiffeId, TrustDomain};
use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "ambit-ca",
    version,
    about = "Ambit's certificate authority in local mode: issues SPIFFE certificates over Istio's CreateCertificate API"
)]
pub struct Config {
    /// Directory holding the CA material with Istio's file names (ca-cert.pem,
    /// ca-key.pem, cert-chain.pem, root-cert.pem). A self-signed root is generated
    /// there on first start; put a plug-in intermediate there to use it instead.
    /// Required by `ambit-ca` and by `ambit-control` in local mode; in a cluster the
    /// material lives in a Secret instead.
    #[arg(long, env = "AMBIT_CA_ROOT_DIR")]
    pub root_dir: Option<PathBuf>,

    /// Address to serve gRPC over TLS on.
    #[arg(long, env = "AMBIT_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,

    /// YAML list of static bearer tokens: `{token, identity, nodeAgent, node}`. Read
    /// again when it changes (a broken new version keeps the tokens read before).
    #[arg(long, env = "AMBIT_CA_TOKENS")]
    pub tokens: Option<PathBuf>,

    /// The mesh's trust domain.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,

    /// Namespace Ambit is installed in; the CA serves as
    /// spiffe://<trust-domain>/ns/<namespace>/sa/ambit-control.
    #[arg(long, env = "AMBIT_SYSTEM_NAMESPACE", default_value = "ambit-system")]
    pub system_namespace: String,

    /// Extra DNS names for the serving certificate, besides ambit-control.<namespace>.svc.
    #[arg(long = "dns-name", env = "AMBIT_CA_DNS_NAMES", value_delimiter = ',')]
    pub dns_names: Vec<String>,

    /// IP addresses for the serving certificate (IP SANs), so a client that reaches
    /// the CA and xDS by address (Istio's ztunnel with `CA_ADDRESS=https://<ip>:15012`)
    /// can verify it.
    #[arg(long = "ip-san", env = "AMBIT_CA_IP_SANS", value_delimiter = ',')]
    pub ip_sans: Vec<std::net::IpAddr>,

    /// Lifetime of a certificate whose request names none (e.g. 24h, 90m, 3600s).
    #[arg(long, env = "AMBIT_CA_DEFAULT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub default_ttl: Duration,

    /// Longest lifetime a request may ask for.
    #[arg(long, env = "AMBIT_CA_MAX_TTL", default_value = "90d", value_parser = parse_duration)]
    pub max_ttl: Duration,

    /// Log filter (tracing syntax), e.g. `info` or `ambit_ca=debug`.
    #[arg(long, env = "AMBIT_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// The identity the CA serves as.
    pub fn control_identity(&self) -> Result<SpiffeId, ambit_core::IdentityError> {
        SpiffeId::new(
            self.trust_domain.clone(),
            &self.system_namespace,
            "ambit-control",
        )
    }

    /// Names on the serving certificate besides its identity: DNS names, then the
    /// `--ip-san` addresses (a name that is an IP address becomes an IP SAN).
    pub fn serving_dns_names(&self) -> Vec<String> {
        let mut names = vec![format!("ambit-control.{}.svc", self.system_namespace)];
        let ips = self.ip_sans.iter().map(ToString::to_string);
        for n in self.dns_names.iter().cloned().chain(ips) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        names
    }
}

/// Parses `90d`, `24h`, `30m`, `15s` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 24h, 30m or 3600s"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => return Err(format!("{s:?}: unknown unit {other:?}; use s, m, h or d")),
    };
    if secs == 0 {
        return Err(format!("{s:?}: duration must be positive"));
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("3600"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn flags_parse() {
        let c = Config::try_parse_from([
            "ambit-ca",
            "--root-dir",
            "/tmp/x",
            "--listen",
            "127.0.0.1:0",
            "--dns-name",
            "ca.local,ca2.local",
            "--ip-san",
            "10.0.0.1,fd00::1",
        ])
        .unwrap();
        assert_eq!(
            c.control_identity().unwrap().as_str(),
            "spiffe://cluster.local/ns/ambit-system/sa/ambit-control"
        );
        assert_eq!(
            c.serving_dns_names(),
            [
                "ambit-control.ambit-system.svc",
                "ca.local",
                "ca2.local",
                "10.0.0.1",
                "fd00::1"
            ]
        );
        assert!(Config::try_parse_from(["ambit-ca", "--ip-san", "ca.local"]).is_err());
        assert!(
            Config::try_parse_from(["ambit-ca", "--root-dir", "x", "--trust-domain", "Bad"])
                .is_err()
        );
    }
}
