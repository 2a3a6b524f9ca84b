//! ztunnel's delta xDS client: subscribes to every `Address` resource, applies each
//! response to the resources it holds, publishes the resulting model, and ACKs it, or
//! NACKs the resources it cannot use, keeping their previous version (or their
//! absence) and everything else.
//!
//! It never forgets: while disconnected the last good model stays published, and a
//! reconnecting stream tells the server, in `initial_resource_versions`, what is held,
//! so only differences are sent again. Reconnects back off exponentially (with jitter)
//! from [`ClientConfig::min_backoff`] to [`ClientConfig::max_backoff`], starting over
//! once a stream has delivered a response.
//!
//! Counted as Istio's ztunnel counts its xDS client ([`XdsMetrics`]):
//! `istio_xds_connection_terminations_total{reason}` (`ConnectionError`: the server
//! could not be reached; `Error`: the stream failed; `Complete`: the server ended it),
//! `istio_xds_message_total{url}` and `istio_xds_message_bytes_total{url}` (responses
//! received, by resource type URL).

use crate::token::BearerToken;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ambit_core::model::MeshConfig;
use ambit_proto::workload::{Address, ADDRESS_TYPE_URL};
use ambit_proto::xds::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use ambit_proto::xds::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use super::resources::{from_resources, ResourceError};

/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `Node.id` the server logs the client by.
    pub node_id: String,
    /// Sent as `authorization: Bearer <token>` (the node agent's CA token), read again
    /// for every stream.
    pub token: Option<BearerToken>,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub metrics: XdsMetrics,
}

/// The xDS client's counters, with the names and labels of Istio's ztunnel; register
/// them in the proxy's registry with [`XdsMetrics::register`].
#[derive(Debug, Clone, Default)]
pub struct XdsMetrics {
    terminations: Family<TerminationLabels, Counter>,
    messages: Family<UrlLabels, Counter>,
    message_bytes: Family<UrlLabels, Counter>,
    rejected: Family<UrlLabels, Counter>,
}

/// Why a stream to the xDS server ended (Istio's reasons).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum TerminationReason {
    ConnectionError,
    Error,
    Complete,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TerminationLabels {
    reason: TerminationReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UrlLabels {
    url: String,
}

impl XdsMetrics {
    /// Adds the counters to `registry` (prometheus-client appends `_total`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istio_xds_connection_terminations",
            "The total number of completed connections to xds server",
            self.terminations.clone(),
        );
        registry.register(
            "istio_xds_message",
            "Total number of messages received",
            self.messages.clone(),
        );
        registry.register(
            "istio_xds_message_bytes",
            "Total number of bytes received",
            self.message_bytes.clone(),
        );
        registry.register(
            "ambit_xds_resources_rejected",
            "Resources received over xDS and refused (NACKed; the previous state of each is kept)",
            self.rejected.clone(),
        );
    }

    /// Counts `n` resources of `type_url` rejected.
    pub fn rejected(&self, type_url: &str, n: usize) {
        self.rejected
            .get_or_create(&UrlLabels {
                url: type_url.to_owned(),
            })
            .inc_by(n as u64);
    }

    /// Resources of `type_url` rejected so far.
    pub fn rejected_count(&self, type_url: &str) -> u64 {
        self.rejected
            .get_or_create(&UrlLabels {
                url: type_url.to_owned(),
            })
            .get()
    }

    /// Counts one stream ended.
    pub fn terminated(&self, reason: TerminationReason) {
        self.terminations
            .get_or_create(&TerminationLabels { reason })
            .inc();
    }

    /// Counts one response received.
    pub fn received(&self, response: &DeltaDiscoveryResponse) {
        let labels = UrlLabels {
            url: response.type_url.clone(),
        };
        self.messages.get_or_create(&labels).inc();
        self.message_bytes
            .get_or_create(&labels)
            .inc_by(response.encoded_len() as u64);
    }
}

impl ClientConfig {
    pub fn new(node_id: &str) -> ClientConfig {
        ClientConfig {
            node_id: node_id.to_owned(),
            token: None,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            metrics: XdsMetrics::default(),
        }
    }
}

/// The client's state: the resources it holds, by name, with their versions.
#[derive(Debug)]
pub struct XdsClient {
    config: ClientConfig,
    held: BTreeMap<String, (String, Address)>,
    model: watch::Sender<Arc<MeshConfig>>,
    /// A model has been published: the first response is, even when it changes
    /// nothing (an empty mesh), so that watchers learn the client is in sync.
    published: bool,
}

/// What one response did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub changed: usize,
    pub removed: usize,
    /// Resources rejected; their previous state was kept.
    pub rejected: Vec<ResourceError>,
}

impl XdsClient {
    /// A client that publishes each new model into `model`.
    pub fn new(config: ClientConfig, model: watch::Sender<Arc<MeshConfig>>) -> XdsClient {
        XdsClient {
            config,
            held: BTreeMap::new(),
            model,
            published: false,
        }
    }

    /// Keeps a stream open to the server `connect` reaches, reconnecting with backoff,
    /// until `connect` is no longer wanted (the task is dropped or aborted).
    pub async fn run<C, F, E>(mut self, mut connect: C)
    where
        C: FnMut() -> F,
        F: Future<Output = Result<Channel, E>>,
        E: std::fmt::Display,
    {
        let mut backoff = self.config.min_backoff;
        loop {
            let delivered = match connect().await {
                Ok(channel) => match self.stream(channel).await {
                    Ok(delivered) => {
                        self.config.metrics.terminated(TerminationReason::Complete);
                        tracing::info!("xDS stream ended by the server; reconnecting");
                        delivered
                    }
                    Err((delivered, e)) => {
                        self.config.metrics.terminated(TerminationReason::Error);
                        tracing::warn!(error = %e, held = self.held.len(), "xDS stream failed; keeping the last model and reconnecting");
                        delivered
                    }
                },
                Err(e) => {
                    self.config
                        .metrics
                        .terminated(TerminationReason::ConnectionError);
                    tracing::warn!(error = %e, "cannot reach the xDS server");
                    false
                }
            };
            if delivered {
                backoff = self.config.min_backoff;
            }
            tokio::time::sleep(jittered(backoff)).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }

    /// One stream, until it ends; whether it delivered any response.
    async fn stream(&mut self, channel: Channel) -> Result<bool, (bool, tonic::Status)> {
        let authorization = match &self.config.token {
            Some(token) => Some(
                token
                    .authorization()
                    .map_err(|e| (false, tonic::Status::unauthenticated(e)))?,
            ),
            None => None,
        };
        let mut client = AggregatedDiscoveryServiceClient::with_interceptor(
            channel,
            move |mut request: tonic::Request<()>| {
                if let Some(value) = &authorization {
                    request
                        .metadata_mut()
                        .insert("authorization", value.clone());
                }
                Ok(request)
            },
        );
        let (tx, rx) = mpsc::channel(4);
        let first = DeltaDiscoveryRequest {
            node: Some(Node {
                id: self.config.node_id.clone(),
                ..Node::default()
            }),
            type_url: ADDRESS_TYPE_URL.to_owned(),
            resource_names_subscribe: vec!["*".to_owned()],
            initial_resource_versions: self
                .held
                .iter()
                .map(|(name, (version, _))| (name.clone(), version.clone()))
                .collect(),
            ..DeltaDiscoveryRequest::default()
        };
        // The channel has room: this cannot wait.
        let _ = tx.send(first).await;
        let mut responses = client
            .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|e| (false, e))?
            .into_inner();
        let mut delivered = false;
        loop {
            let response = match responses.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Ok(delivered),
                Err(e) => return Err((delivered, e)),
            };
            delivered = true;
            self.config.metrics.received(&response);
            let applied = self.apply(&response);
            let error_detail = (!applied.rejected.is_empty()).then(|| Status {
                code: INVALID_ARGUMENT,
                message: applied
                    .rejected
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
                details: Vec::new(),
            });
            if let Some(error) = &error_detail {
                tracing::warn!(nonce = %response.nonce, reason = %error.message, "xDS resources rejected (NACK); their previous state is kept");
            }
            tracing::debug!(nonce = %response.nonce, changed = applied.changed, removed = applied.removed, held = self.held.len(), "xDS update applied");
            let ack = DeltaDiscoveryRequest {
                type_url: ADDRESS_TYPE_URL.to_owned(),
                response_nonce: response.nonce.clone(),
                error_detail,
                ..DeltaDiscoveryRequest::default()
            };
            if tx.send(ack).await.is_err() {
                return Ok(delivered);
            }
        }
    }

    /// Applies one response to the held resources and publishes the model. A resource
    /// that cannot be decoded or used keeps its previous state.
    pub fn apply(&mut self, response: &DeltaDiscoveryResponse) -> Applied {
        let mut applied = Applied::default();
        // What this response replaces, to restore a resource it makes unusable. Only
        // the names it touches: the rest of what is held is not copied.
        let mut previous: BTreeMap<String, Option<(String, Address)>> = BTreeMap::new();
        for resource in &response.resources {
            let decoded = match &resource.resource {
                Some(any) if any.type_url == ADDRESS_TYPE_URL => {
                    Address::decode(any.value.as_slice()).map_err(|e| e.to_string())
                }
                Some(any) => Err(format!("type {:?} is not {ADDRESS_TYPE_URL}", any.type_url)),
                None => Err("no resource".into()),
            };
            match decoded {
                Ok(address) => {
                    let old = self
                        .held
                        .insert(resource.name.clone(), (resource.version.clone(), address));
                    previous.entry(resource.name.clone()).or_insert(old);
                    applied.changed += 1;
                }
                Err(reason) => applied.rejected.push(ResourceError {
                    name: resource.name.clone(),
                    reason,
                }),
            }
        }
        for name in &response.removed_resources {
            if let Some(old) = self.held.remove(name) {
                previous.entry(name.clone()).or_insert(Some(old));
                applied.removed += 1;
            }
        }
        let (mut model, errors) = from_resources(self.held.iter().map(|(n, (_, a))| (n, a)));
        if !errors.is_empty() {
            for error in errors {
                // Back to what it was before this response (it was usable then).
                match previous.remove(&error.name).flatten() {
                    Some(old) => self.held.insert(error.name.clone(), old),
                    None => self.held.remove(&error.name),
                };
                applied.changed = applied.changed.saturating_sub(1);
                applied.rejected.push(error);
            }
            model = from_resources(self.held.iter().map(|(n, (_, a))| (n, a))).0;
        }
        if applied.changed > 0 || applied.removed > 0 || !self.published {
            self.model.send_replace(Arc::new(model));
            self.published = true;
        }
        if !applied.rejected.is_empty() {
            self.config
                .metrics
                .rejected(ADDRESS_TYPE_URL, applied.rejected.len());
        }
        applied
    }
}

/// `d` give or take a quarter, so that many clients do not reconnect in step.
fn jittered(d: Duration) -> Duration {
    let quarter = d / 4;
    d - quarter + quarter.mul_f64(2.0 * rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_proto::xds::Resource;

    #[test]
    fn rejected_resources_are_counted_by_type() {
        let config = ClientConfig::new("ztunnel~a");
        let metrics = config.metrics.clone();
        let mut client = XdsClient::new(config, watch::channel(Arc::default()).0);
        let response = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE_URL.to_owned(),
            resources: vec![
                Resource {
                    name: "empty".into(),
                    version: "1".into(),
                    resource: Some(prost_types::Any {
                        type_url: ADDRESS_TYPE_URL.to_owned(),
                        value: Address { r#type: None }.encode_to_vec(),
                    }),
                    ..Resource::default()
                },
                Resource {
                    name: "garbage".into(),
                    version: "1".into(),
                    resource: Some(prost_types::Any {
                        type_url: ADDRESS_TYPE_URL.to_owned(),
                        value: vec![0xff, 0xff, 0xff],
                    }),
                    ..Resource::default()
                },
            ],
            ..DeltaDiscoveryResponse::default()
        };
        let applied = client.apply(&response);
        assert_eq!(applied.rejected.len(), 2, "{applied:?}");
        assert_eq!(metrics.rejected_count(ADDRESS_TYPE_URL), 2);
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(&format!(
                "ambit_xds_resources_rejected_total{{url=\"{ADDRESS_TYPE_URL}\"}} 2"
            )),
            "{text}"
        );
    }
}
