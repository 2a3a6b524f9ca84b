//! Client of the CA's `CreateCertificate` over TLS: the CA's serving certificate must
//! chain to the mesh root and carry the control plane's identity. The caller proves
//! who it is with a bearer token (a node agent also names the identity it wants in
//! `ImpersonatedIdentity`) or, for renewal, with the certificate being renewed.

use crate::token::BearerToken;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::SpiffeId;
use ambit_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use ambit_proto::ca::{IstioCertificateRequest, IMPERSONATED_IDENTITY};
use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::tls::{self, TrustSource, WorkloadCert};

/// The identity the control plane (CA and xDS on 15012) presents unless told
/// otherwise: `spiffe://<trust domain>/ns/ambit-system/sa/ambit-control`.
pub fn default_control_identity(
    trust_domain: &ambit_core::TrustDomain,
) -> Result<SpiffeId, ambit_core::IdentityError> {
    SpiffeId::new(trust_domain.clone(), "ambit-system", "ambit-control")
}

/// One certificate request, as the certificate manager hands it to a source.
#[derive(Debug, Clone)]
pub struct FetchRequest {
    pub identity: SpiffeId,
    pub csr_pem: String,
    pub validity: Duration,
    /// The certificate being renewed, usable as the client certificate.
    pub current: Option<WorkloadCert>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach the CA at {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("CA refused ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("cannot read the bearer token: {0}")]
    Token(String),
    #[error("no credentials to request {0}: configure a token or hold a current certificate")]
    NoCredentials(SpiffeId),
    #[error("CA answer unusable: {0}")]
    BadResponse(String),
    #[error("cannot build a TLS client: {0}")]
    Tls(String),
}

/// Where certificates come from. The gRPC client is the real one; tests may supply
/// their own.
pub trait CertificateSource: Send + Sync + std::fmt::Debug {
    /// Returns the PEM chain, leaf first and root last.
    fn fetch(&self, request: FetchRequest) -> BoxFuture<'_, Result<Vec<String>, FetchError>>;
}

/// How to reach and authenticate to the CA.
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// `host:port` of the CA.
    pub address: String,
    /// Identity the CA's serving certificate must carry.
    pub ca_identity: SpiffeId,
    /// Mesh roots the CA's certificate must chain to (read again for each new
    /// connection when they come from a file).
    pub roots: TrustSource,
    /// Bearer token, when the caller has one (read again for every request).
    pub token: Option<BearerToken>,
    /// Whether to name the requested identity in `ImpersonatedIdentity` (node agents).
    pub impersonate: bool,
    /// Deadline for one request, connection included.
    pub timeout: Duration,
}

/// The CA's gRPC client.
#[derive(Debug, Clone)]
pub struct GrpcCaClient {
    config: Arc<CaClientConfig>,
    /// Reused for token-authenticated requests; mTLS requests need a connection that
    /// presents the specific certificate being renewed.
    token_channel: Option<Channel>,
}

impl GrpcCaClient {
    pub fn new(config: CaClientConfig) -> Result<Self, FetchError> {
        let config = Arc::new(config);
        let token_channel = match config.token {
            Some(_) => Some(channel(&config, None)?),
            None => None,
        };
        Ok(GrpcCaClient {
            config,
            token_channel,
        })
    }

    async fn request(&self, req: FetchRequest) -> Result<Vec<String>, FetchError> {
        let cfg = &self.config;
        let (channel, token) = match (&self.token_channel, &cfg.token, &req.current) {
            (Some(ch), Some(token), _) => (
                ch.clone(),
                Some(
                    token
                        .current()
                        .map_err(|e| FetchError::Token(e.to_string()))?,
                ),
            ),
            (_, _, Some(current)) => (channel(cfg, Some(current))?, None),
            _ => return Err(FetchError::NoCredentials(req.identity.clone())),
        };
        let mut fields = BTreeMap::new();
        if cfg.impersonate && token.is_some() {
            fields.insert(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(
                        req.identity.to_string(),
                    )),
                },
            );
        }
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr: req.csr_pem,
            validity_duration: req.validity.as_secs() as i64,
            metadata: Some(prost_types::Struct { fields }),
        });
        request.set_timeout(cfg.timeout);
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| FetchError::BadResponse("token is not valid ASCII metadata".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut client = IstioCertificateServiceClient::new(channel);
        let response = tokio::time::timeout(cfg.timeout, client.create_certificate(request))
            .await
            .map_err(|_| FetchError::Connect {
                address: cfg.address.clone(),
                reason: format!("no answer within {:?}", cfg.timeout),
            })?
            .map_err(|status| {
                // Transport failures surface as Unavailable with the IO error as
                // source; anything else is the CA's own answer.
                if status.code() == tonic::Code::Unavailable
                    && std::error::Error::source(&status).is_some()
                {
                    FetchError::Connect {
                        address: cfg.address.clone(),
                        reason: status.message().to_string(),
                    }
                } else {
                    FetchError::Refused {
                        code: status.code(),
                        message: status.message().to_string(),
                    }
                }
            })?;
        Ok(response.into_inner().cert_chain)
    }
}

impl CertificateSource for GrpcCaClient {
    fn fetch(&self, request: FetchRequest) -> BoxFuture<'_, Result<Vec<String>, FetchError>> {
        Box::pin(self.request(request))
    }
}

/// A lazily connecting channel whose connections are TLS to the CA, presenting
/// `client_cert` when given.
fn channel(
    cfg: &Arc<CaClientConfig>,
    client_cert: Option<&WorkloadCert>,
) -> Result<Channel, FetchError> {
    tls_channel(
        &cfg.address,
        &cfg.ca_identity,
        &cfg.roots,
        client_cert,
        cfg.timeout,
    )
}

/// A lazily connecting gRPC channel to the control plane's port at `address` (the CA
/// and xDS): TLS, the server's certificate chaining to `roots` (as they are when each
/// connection is made) and carrying `identity`, presenting `client_cert` when given.
pub fn tls_channel(
    address: &str,
    identity: &SpiffeId,
    roots: &TrustSource,
    client_cert: Option<&WorkloadCert>,
    connect_timeout: Duration,
) -> Result<Channel, FetchError> {
    let tls_config = move |roots: &[rustls_pki_types::CertificateDer<'static>]| {
        tls::client_config(client_cert, roots, [identity.clone()])
            .map_err(|e| FetchError::Tls(e.to_string()))
    };
    // Built once now, so unusable roots or certificate fail here, with their reason.
    let first = Arc::new(tls_config(&roots.current())?);
    let client_cert = client_cert.cloned();
    let identity = identity.clone();
    let roots = roots.clone();
    // TLS is done by the connector below, so the URI scheme is plain http to tonic.
    let endpoint =
        Endpoint::from_shared(format!("http://{address}")).map_err(|e| FetchError::Connect {
            address: address.to_owned(),
            reason: e.to_string(),
        })?;
    let endpoint = endpoint.connect_timeout(connect_timeout);
    let address = address.to_owned();
    let connect = tower::service_fn(move |_: Uri| {
        let address = address.clone();
        // The roots as they are now: a bundle published since is trusted.
        let config = tls::client_config(client_cert.as_ref(), &roots.current(), [identity.clone()])
            .map(Arc::new)
            .unwrap_or_else(|_| first.clone());
        async move {
            let tcp = TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            // The server name is unused: the verifier checks the SPIFFE identity.
            let name = ServerName::try_from("ambit-ca.invalid")
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connect))
}
