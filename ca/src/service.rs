//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: reads credentials and
//! metadata off the request, authenticates, and maps the authority's answer onto gRPC
//! statuses a client can act on (`Unauthenticated`, `PermissionDenied`,
//! `InvalidArgument`, `Unavailable`).

use std::sync::Arc;
use std::time::SystemTime;

use ambit_proto::ca::istio_certificate_service_server::IstioCertificateService;
use ambit_proto::ca::{IstioCertificateRequest, IstioCertificateResponse, IMPERSONATED_IDENTITY};
use prost_types::value::Kind;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::auth::{authenticate_request, Authenticator};
use crate::authority::{CertificateAuthority, IssueError};
use crate::server::PeerInfo;

#[derive(Debug, Clone)]
pub struct CaService {
    ca: watch::Receiver<Arc<CertificateAuthority>>,
    authenticators: Arc<[Arc<dyn Authenticator>]>,
}

impl CaService {
    /// Serves with the CA `ca` holds at each request (it may be replaced: a reload).
    pub fn new(
        ca: watch::Receiver<Arc<CertificateAuthority>>,
        authenticators: Vec<Arc<dyn Authenticator>>,
    ) -> Self {
        CaService {
            ca,
            authenticators: authenticators.into(),
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let remote = request
            .extensions()
            .get::<PeerInfo>()
            .map(|p| p.remote.to_string())
            .unwrap_or_default();
        let caller = authenticate_request(&self.authenticators, &request).await?;
        let req = request.into_inner();
        let impersonate = impersonated_identity(&req)?;
        let ca = self.ca.borrow().clone();
        let result = ca.create_certificate(
            &caller,
            &req.csr,
            req.validity_duration,
            impersonate.as_deref(),
            SystemTime::now(),
        );
        match result {
            Ok(cert_chain) => {
                tracing::info!(
                    caller = %caller.identity,
                    node = caller.node.as_deref().unwrap_or(""),
                    identity = impersonate.as_deref().unwrap_or(caller.identity.as_str()),
                    "issued certificate"
                );
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(e) => {
                tracing::warn!(caller = %caller.identity, %remote, error = %e, "certificate request refused");
                Err(status_of(&e))
            }
        }
    }
}

/// The gRPC status a refusal produces.
pub fn status_of(e: &IssueError) -> Status {
    let msg = e.to_string();
    match e {
        IssueError::Csr(_) | IssueError::Impersonation(_) | IssueError::Validity(_) => {
            Status::invalid_argument(msg)
        }
        IssueError::Denied(_) => Status::permission_denied(msg),
        IssueError::Unavailable(_) => Status::unavailable(msg),
        IssueError::Signing(_) => Status::internal(msg),
    }
}

fn impersonated_identity(req: &IstioCertificateRequest) -> Result<Option<String>, Status> {
    let Some(value) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) if s.is_empty() => Ok(None),
        Some(Kind::StringValue(s)) => Ok(Some(s.clone())),
        _ => Err(Status::invalid_argument(format!(
            "metadata {IMPERSONATED_IDENTITY} must be a string SPIFFE ID"
        ))),
    }
}
