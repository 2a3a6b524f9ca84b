//! Callers of the CA and xDS in a cluster: a Kubernetes service account token, checked
//! with the API server's TokenReview for the audience `istio-ca`. The token's user
//! `system:serviceaccount:<ns>:<sa>` becomes the identity
//! `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
//!
//! A caller running as one of the configured node-agent service accounts (ztunnel's)
//! is a node agent, on the node its token is bound to: the review's
//! `authentication.kubernetes.io/node-name`, or else the node of the pod named by
//! `authentication.kubernetes.io/pod-name` (with a matching `pod-uid`, so a token of a
//! deleted pod does not borrow a new pod's node). A node agent whose node cannot be
//! established is refused, never trusted with every node.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ambit_ca::auth::{AuthError, Authenticator, Credentials};
use ambit_core::certificate::Caller;
use ambit_core::{SpiffeId, TrustDomain};
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::resources::ObjectKey;

/// The audience a token must be issued for (Istio's CA audience).
pub const AUDIENCE: &str = "istio-ca";

const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// A pod's uid and node, as the control plane sees it.
pub trait PodNodes: Send + Sync + std::fmt::Debug {
    /// `(uid, node)` of pod `key`, if it exists and is scheduled.
    fn pod_node(&self, key: &ObjectKey) -> Option<(String, String)>;
}

/// Authenticates bearer tokens with TokenReview.
pub struct TokenReviewAuthenticator {
    client: Client,
    trust_domain: TrustDomain,
    /// `(namespace, service account)` of the trusted node agents.
    node_agents: Vec<(String, String)>,
    pods: Arc<dyn PodNodes>,
    cache: ReviewCache,
}

/// How long an accepted token is taken without asking the API server again: a burst of
/// certificate requests and xDS reconnects (a node restarting) costs one review per
/// token. A revoked token keeps working at most this long. Refusals are never cached.
pub const REVIEW_CACHE_TTL: Duration = Duration::from_secs(60);
/// Accepted tokens remembered at most; past that, the expired ones go, and if none has
/// expired, all of them.
const REVIEW_CACHE_SIZE: usize = 10_000;

/// Accepted tokens, by SHA-256 digest (the tokens themselves are not kept).
#[derive(Debug, Default)]
struct ReviewCache {
    entries: Mutex<HashMap<[u8; 32], (Instant, Caller)>>,
}

impl ReviewCache {
    fn get(&self, digest: &[u8; 32], now: Instant) -> Option<Caller> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(digest)
            .filter(|(at, _)| now.duration_since(*at) < REVIEW_CACHE_TTL)
            .map(|(_, caller)| caller.clone())
    }

    fn put(&self, digest: [u8; 32], caller: Caller, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= REVIEW_CACHE_SIZE {
            entries.retain(|_, (at, _)| now.duration_since(*at) < REVIEW_CACHE_TTL);
            if entries.len() >= REVIEW_CACHE_SIZE {
                entries.clear();
            }
        }
        entries.insert(digest, (now, caller));
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("node_agents", &self.node_agents)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    pub fn new(
        client: Client,
        trust_domain: TrustDomain,
        node_agents: Vec<(String, String)>,
        pods: Arc<dyn PodNodes>,
    ) -> Self {
        TokenReviewAuthenticator {
            client,
            trust_domain,
            node_agents,
            pods,
            cache: ReviewCache::default(),
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let digest = digest(token);
        if let Some(caller) = self.cache.get(&digest, Instant::now()) {
            return Ok(caller);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| self.rejected(format!("the API server's TokenReview failed: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        let caller = caller_of(
            &status,
            &self.trust_domain,
            &self.node_agents,
            self.pods.as_ref(),
        )
        .map_err(|reason| self.rejected(reason))?;
        self.cache.put(digest, caller.clone(), Instant::now());
        Ok(caller)
    }

    fn rejected(&self, reason: String) -> AuthError {
        AuthError::Rejected {
            authenticator: self.name(),
            reason,
        }
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn name(&self) -> &'static str {
        "Kubernetes TokenReview"
    }

    fn authenticate<'a>(
        &'a self,
        credentials: &'a Credentials,
    ) -> BoxFuture<'a, Result<Option<Caller>, AuthError>> {
        Box::pin(async move {
            match credentials.bearer_token.as_deref() {
                None => Ok(None),
                Some(token) => self.review(token).await.map(Some),
            }
        })
    }
}

/// The caller a TokenReview's answer describes, or why there is none.
pub fn caller_of(
    status: &TokenReviewStatus,
    trust_domain: &TrustDomain,
    node_agents: &[(String, String)],
    pods: &dyn PodNodes,
) -> Result<Caller, String> {
    if let Some(error) = status.error.as_deref().filter(|e| !e.is_empty()) {
        return Err(format!("token not authenticated: {error}"));
    }
    if status.authenticated != Some(true) {
        return Err("token not authenticated".into());
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == AUDIENCE) {
        return Err(format!(
            "token is not for audience {AUDIENCE} (it is for {audiences:?})"
        ));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, sa) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| {
            format!("user {username:?} is not a service account (system:serviceaccount:<ns>:<sa>)")
        })?;
    let identity = SpiffeId::new(trust_domain.clone(), namespace, sa)
        .map_err(|e| format!("user {username:?}: {e}"))?;
    let node_agent = node_agents
        .iter()
        .any(|(ns, name)| ns == namespace && name == sa);
    let node = if node_agent {
        Some(bound_node(
            &user.extra.unwrap_or_default(),
            namespace,
            pods,
        )?)
    } else {
        None
    };
    Ok(Caller {
        identity,
        node_agent,
        node,
    })
}

/// The node a node agent's token is bound to.
fn bound_node(
    extra: &BTreeMap<String, Vec<String>>,
    namespace: &str,
    pods: &dyn PodNodes,
) -> Result<String, String> {
    let one = |key: &str| {
        extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|s| !s.is_empty())
    };
    if let Some(node) = one(NODE_NAME) {
        return Ok(node.clone());
    }
    let pod = one(POD_NAME).ok_or_else(|| {
        "a node agent's token must be bound to its pod (a projected service account token), to know its node".to_string()
    })?;
    let key = ObjectKey::new(namespace, pod);
    let (uid, node) = pods
        .pod_node(&key)
        .ok_or_else(|| format!("node agent pod {key} is not known or not scheduled"))?;
    match one(POD_UID) {
        Some(token_uid) if *token_uid != uid => Err(format!(
            "the token was issued to an earlier pod {key} (uid {token_uid}, now {uid})"
        )),
        _ => Ok(node),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    #[derive(Debug)]
    struct OnePod;
    impl PodNodes for OnePod {
        fn pod_node(&self, key: &ObjectKey) -> Option<(String, String)> {
            (key == &ObjectKey::new("ambit-system", "ztunnel-abc"))
                .then(|| ("uid-1".to_owned(), "node-a".to_owned()))
        }
    }

    fn status(user: &str, extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec!["istio-ca".into()]),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect(),
                ),
                ..UserInfo::default()
            }),
            ..TokenReviewStatus::default()
        }
    }

    fn caller(status: &TokenReviewStatus) -> Result<Caller, String> {
        caller_of(
            status,
            &"cluster.local".parse().unwrap(),
            &[("ambit-system".into(), "ztunnel".into())],
            &OnePod,
        )
    }

    #[test]
    fn accepted_tokens_are_remembered_for_a_minute() {
        let cache = ReviewCache::default();
        let t0 = Instant::now();
        let caller = caller(&status("system:serviceaccount:shop:web", &[])).unwrap();
        assert_eq!(cache.get(&digest("t"), t0), None);
        cache.put(digest("t"), caller.clone(), t0);
        assert_eq!(
            cache.get(&digest("t"), t0 + Duration::from_secs(59)),
            Some(caller)
        );
        assert_eq!(cache.get(&digest("t"), t0 + REVIEW_CACHE_TTL), None);
        assert_eq!(cache.get(&digest("other"), t0), None);
    }

    #[test]
    fn a_workload_token_is_its_service_account() {
        let c = caller(&status("system:serviceaccount:shop:web", &[])).unwrap();
        assert_eq!(
            c.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert!(!c.node_agent);
        assert_eq!(c.node, None);
    }

    #[test]
    fn a_node_agent_is_on_the_node_its_token_is_bound_to() {
        let by_node = status(
            "system:serviceaccount:ambit-system:ztunnel",
            &[(NODE_NAME, "node-b"), (POD_NAME, "ztunnel-abc")],
        );
        let c = caller(&by_node).unwrap();
        assert!(c.node_agent);
        assert_eq!(c.node.as_deref(), Some("node-b"));

        let by_pod = status(
            "system:serviceaccount:ambit-system:ztunnel",
            &[(POD_NAME, "ztunnel-abc"), (POD_UID, "uid-1")],
        );
        assert_eq!(caller(&by_pod).unwrap().node.as_deref(), Some("node-a"));
    }

    #[test]
    fn a_node_agent_without_a_known_node_is_refused() {
        let unbound = status("system:serviceaccount:ambit-system:ztunnel", &[]);
        assert!(caller(&unbound).unwrap_err().contains("bound to its pod"));
        let gone = status(
            "system:serviceaccount:ambit-system:ztunnel",
            &[(POD_NAME, "ztunnel-old")],
        );
        assert!(caller(&gone).unwrap_err().contains("not known"));
        let earlier = status(
            "system:serviceaccount:ambit-system:ztunnel",
            &[(POD_NAME, "ztunnel-abc"), (POD_UID, "uid-0")],
        );
        assert!(caller(&earlier).unwrap_err().contains("earlier pod"));
    }

    #[test]
    fn unauthenticated_foreign_audience_and_non_service_account_tokens_are_refused() {
        let mut s = status("system:serviceaccount:shop:web", &[]);
        s.authenticated = Some(false);
        s.error = Some("token has expired".into());
        assert!(caller(&s).unwrap_err().contains("token has expired"));

        let mut s = status("system:serviceaccount:shop:web", &[]);
        s.audiences = Some(vec!["https://kubernetes.default.svc".into()]);
        assert!(caller(&s).unwrap_err().contains("audience istio-ca"));

        let s = status("alice@example.com", &[]);
        assert!(caller(&s).unwrap_err().contains("not a service account"));
    }
}
