//! The agent's calls to the control plane, all on its one port with the node agent's
//! token: the model over delta xDS (which pods the labels enrol), the enrolment
//! question at CNI ADD, and the redirection reports.

use std::sync::Arc;
use std::time::Duration;

use ambit_core::model::MeshConfig;
use ambit_core::SpiffeId;
use ambit_net::ca_client::tls_channel;
use ambit_net::tls::TrustSource;
use ambit_net::token::BearerToken;
use ambit_net::xds::client::{ClientConfig, XdsClient};
use ambit_proto::nodeagent::redirection_client::RedirectionClient;
use ambit_proto::nodeagent::{EnrolmentAnswer, EnrolmentQuery, RedirectionReport};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::protocol::PodRef;

/// How long one call to the control plane may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the control plane (made lazily, re-made after failures by tonic).
#[derive(Debug, Clone)]
pub struct Control {
    address: String,
    identity: SpiffeId,
    roots: TrustSource,
    token: BearerToken,
    channel: Channel,
}

impl Control {
    pub fn new(
        address: &str,
        identity: SpiffeId,
        roots: TrustSource,
        token: BearerToken,
    ) -> Result<Control, String> {
        let channel = tls_channel(address, &identity, &roots, None, CALL_TIMEOUT)
            .map_err(|e| format!("control plane {address}: {e}"))?;
        Ok(Control {
            address: address.to_owned(),
            identity,
            roots,
            token,
            channel,
        })
    }

    /// Whether the control plane says `pod` is to be captured, and as which service
    /// account. `known: false` when it does not know the pod (yet).
    pub async fn enrolment(&self, pod: &PodRef) -> Result<EnrolmentAnswer, String> {
        let query = EnrolmentQuery {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone().unwrap_or_default(),
        };
        let request = self.request(query)?;
        let mut client = RedirectionClient::new(self.channel.clone());
        let answer = tokio::time::timeout(CALL_TIMEOUT, client.enrolment(request))
            .await
            .map_err(|_| format!("control plane {}: no answer", self.address))?
            .map_err(|s| format!("control plane {}: {}", self.address, s.message()))?;
        Ok(answer.into_inner())
    }

    /// Reports `pod`'s redirection as in place (`enabled`) or withdrawn.
    pub async fn report(&self, pod: &PodRef, enabled: bool) -> Result<(), String> {
        let report = RedirectionReport {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            uid: pod.uid.clone().unwrap_or_default(),
            enabled,
        };
        let request = self.request(report)?;
        let mut client = RedirectionClient::new(self.channel.clone());
        tokio::time::timeout(CALL_TIMEOUT, client.report(request))
            .await
            .map_err(|_| format!("control plane {}: no answer", self.address))?
            .map_err(|s| format!("control plane {}: {}", self.address, s.message()))?;
        Ok(())
    }

    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, String> {
        let value = self
            .token
            .authorization()
            .map_err(|e| format!("node agent token: {e}"))?;
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }

    /// Subscribes to the model over delta xDS, as ztunnel does. The receiver holds an
    /// empty model until the first response has been applied; the client keeps the
    /// last model (and reconnects) while the control plane is unreachable.
    pub fn watch_model(&self, node: &str) -> watch::Receiver<Arc<MeshConfig>> {
        let (tx, rx) = watch::channel(Arc::new(MeshConfig::default()));
        let mut config = ClientConfig::new(&format!("ambit-cni~{node}"));
        config.token = Some(self.token.clone());
        let client = XdsClient::new(config, tx);
        let (address, identity, roots) = (
            self.address.clone(),
            self.identity.clone(),
            self.roots.clone(),
        );
        tokio::spawn(client.run(move || {
            let channel = tls_channel(&address, &identity, &roots, None, CALL_TIMEOUT);
            async move { channel }
        }));
        rx
    }
}
