//! Requests a certificate from a running CA, as a workload or a node agent would, and
//! writes `cert-chain.pem` and `key.pem` to `--out`. A development tool and the demo's
//! client:
//!
//! ```text
//! cargo run -p ambit-ca --example request_cert -- --ca 127.0.0.1:15012 \
//!     --root /tmp/ambit-ca/root-cert.pem --token "$TOKEN" \
//!     --identity spiffe://cluster.local/ns/shop/sa/cart --out /tmp/cart
//! ```

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use ambit_core::SpiffeId;
use ambit_net::ca_client::{CaClientConfig, CertificateSource, FetchRequest, GrpcCaClient};
use ambit_net::cert_manager::new_key_and_csr;
use ambit_net::tls::WorkloadCert;
use anyhow::Context;
use clap::Parser;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

#[derive(Debug, Parser)]
struct Args {
    /// CA address, host:port.
    #[arg(long, default_value = "127.0.0.1:15012")]
    ca: String,
    /// The mesh root (root-cert.pem) the CA's certificate must chain to.
    #[arg(long)]
    root: PathBuf,
    /// Bearer token.
    #[arg(long)]
    token: String,
    /// Identity to request.
    #[arg(long)]
    identity: SpiffeId,
    /// Ask as a node agent for another identity (sends ImpersonatedIdentity).
    #[arg(long)]
    impersonate: bool,
    /// Lifetime to ask for, in seconds (0: the CA's default).
    #[arg(long, default_value_t = 0)]
    ttl_secs: u64,
    /// Identity the CA must present.
    #[arg(
        long,
        default_value = "spiffe://cluster.local/ns/ambit-system/sa/ambit-control"
    )]
    ca_identity: SpiffeId,
    /// Directory to write cert-chain.pem and key.pem to.
    #[arg(long)]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("request_cert: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let root_pem =
        std::fs::read_to_string(&args.root).with_context(|| format!("{}", args.root.display()))?;
    let root = CertificateDer::from_pem_slice(root_pem.as_bytes())
        .with_context(|| format!("{}: no PEM certificate", args.root.display()))?;
    let client = GrpcCaClient::new(CaClientConfig {
        address: args.ca.clone(),
        ca_identity: args.ca_identity.clone(),
        roots: vec![root].into(),
        token: Some(args.token.clone().into()),
        impersonate: args.impersonate,
        timeout: Duration::from_secs(10),
    })?;
    let (key_pem, csr_pem) = new_key_and_csr(&args.identity).map_err(anyhow::Error::msg)?;
    let chain = client
        .fetch(FetchRequest {
            identity: args.identity.clone(),
            csr_pem,
            validity: Duration::from_secs(args.ttl_secs),
            current: None,
        })
        .await?;
    let cert = WorkloadCert::from_pem(&chain, &key_pem, None)?;
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("cert-chain.pem"), chain.concat())?;
    std::fs::write(args.out.join("key.pem"), key_pem)?;
    let hours = cert
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_secs_f64()
        / 3600.0;
    println!(
        "issued {} (chain of {}, expires in {hours:.1} h) -> {}",
        cert.identity(),
        chain.len(),
        args.out.display()
    );
    Ok(())
}
