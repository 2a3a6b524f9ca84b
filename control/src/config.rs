//! `ambit-control`'s configuration: flags, each also settable through the environment.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Clone, Parser)]
#[group(id = "control")]
#[command(
    name = "ambit-control",
    version,
    about = "Ambit's control plane in local mode: a directory of Kubernetes YAML in, delta xDS to ztunnels and the CA out, on one port"
)]
pub struct Config {
    /// Directory of Kubernetes YAML (Namespaces, Pods with status.podIP and
    /// spec.nodeName, Services, EndpointSlices), re-read when it changes.
    #[arg(long, env = "AMBIT_LOCAL_DIR")]
    pub local_dir: PathBuf,

    /// How often the directory is read for changes.
    #[arg(long, env = "AMBIT_LOCAL_POLL", default_value = "200ms", value_parser = parse_poll)]
    pub poll: Duration,

    /// The CA, which serves on the same port (`--listen`, default 0.0.0.0:15012).
    #[command(flatten)]
    pub ca: ambit_ca::config::Config,
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
        assert_eq!(c.local_dir, PathBuf::from("/mesh"));
        assert_eq!(c.poll, Duration::from_millis(200));
        assert_eq!(c.ca.listen.port(), 15012);
        assert_eq!(parse_poll("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_poll("fast").is_err());
        let e = Config::try_parse_from(["ambit-control", "--root-dir", "/ca"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--local-dir"), "{e}");
    }
}
