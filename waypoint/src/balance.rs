//! The waypoint's DestinationRule state: per Service port and subset (a cluster,
//! `ambit_core::destination::ClusterKey`) the round-robin turn, the active requests
//! per endpoint (least request), the consistent-hash ring, the connection pool's load
//! and the outlier detector. The decisions are `ambit_core`'s
//! ([`ambit_core::balance::pick`], [`ambit_core::destination::admit`],
//! [`ambit_core::outlier::OutlierDetector`]); this only keeps their inputs.
//!
//! - [`Balancer::pick`]: the endpoint of a Service (subset) for a request: subset by
//!   labels (503 `NC` when the rule does not define it), then without the ejected
//!   endpoints (503 `UH` when none is left), then by the rule's load balancer. A
//!   Service without a rule is balanced round robin as before, and its requests are
//!   neither limited nor counted.
//! - [`Balancer::admit`]: a permit to send one request, as the connection pool's
//!   circuit breakers allow (an HTTP/1.1 request may wait for a connection); refused:
//!   503 `UO`. The permit counts the request as active until it is dropped, with its
//!   response's body.
//! - [`Balancer::report`]: each try's outcome, for outlier detection.
//!
//! A cluster's state is kept while its policy stays the same; a changed rule starts
//! it afresh. One short mutex per cluster, never held across an await.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use ambit_core::balance::{hash_key, HashRing, PickInput};
use ambit_core::destination::{admit, Admission, ClusterKey, HashKey, Load, LoadBalancer, Policy};
use ambit_core::model::{MeshState, Service, ServicePort};
use ambit_core::outlier::{Health, OutlierDetector, Reported};
use ambit_core::retry::Outcome;
use ambit_core::waypoint::{endpoints, in_subset, Endpoint, NoEndpoint};
use http::HeaderMap;
use tokio::sync::Notify;

/// What a consistent hash may be taken over.
#[derive(Debug, Clone, Copy)]
pub struct HashInput<'a> {
    /// The request's headers; `None` for TCP.
    pub headers: Option<&'a HeaderMap>,
    pub client: IpAddr,
}

/// Where a request goes: a Service's port (in the VIP's address family) and subset.
#[derive(Debug, Clone, Copy)]
pub struct PickFor<'a> {
    pub service: &'a Service,
    pub port: &'a ServicePort,
    pub vip: IpAddr,
    pub subset: Option<&'a str>,
}

/// The waypoint's clusters.
#[derive(Debug)]
pub struct Balancer {
    clusters: Mutex<HashMap<Arc<ClusterKey>, Arc<Cluster>>>,
    started: Instant,
}

impl Default for Balancer {
    fn default() -> Self {
        Balancer {
            clusters: Mutex::default(),
            started: Instant::now(),
        }
    }
}

#[derive(Debug)]
struct Cluster {
    key: Arc<ClusterKey>,
    policy: Policy,
    state: Mutex<ClusterState>,
    /// A request finished: one waiting for a connection may go.
    freed: Notify,
}

#[derive(Debug, Default)]
struct ClusterState {
    turn: u64,
    load: Load,
    active: HashMap<SocketAddr, u64>,
    /// The ring and the candidates (by address) it was built over.
    ring: Option<(Vec<SocketAddr>, HashRing)>,
    outlier: Option<OutlierDetector<SocketAddr>>,
    /// Endpoints at the last pick, for `maxEjectionPercent`.
    hosts: usize,
}

/// The connection pool refused a request (503 `UO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

impl Balancer {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The endpoint of `to` for a request (`hash`: what a consistent hash reads);
    /// `turn` gives the round-robin turn of a Service without a DestinationRule.
    pub fn pick(
        &self,
        state: &MeshState,
        to: PickFor<'_>,
        hash: HashInput<'_>,
        turn: impl FnOnce() -> u64,
    ) -> Result<Endpoint, NoEndpoint> {
        let PickFor {
            service,
            port,
            vip,
            subset,
        } = to;
        let rule = state.destination_rule(&service.spec.namespace, &service.spec.name);
        let candidates = in_subset(
            rule.map(|r| &**r),
            subset,
            endpoints(state, service, port, vip),
        )?;
        let Some(rule) = rule else {
            if candidates.is_empty() {
                return Err(NoEndpoint::NoHealthy);
            }
            let index = (turn() % candidates.len() as u64) as usize;
            return candidates
                .into_iter()
                .nth(index)
                .ok_or(NoEndpoint::NoHealthy);
        };
        let policy = rule.policy(port.port, subset);
        let cluster = self.cluster(
            ClusterKey {
                namespace: service.spec.namespace.clone(),
                service: service.spec.name.clone(),
                port: port.port,
                subset: subset.map(str::to_owned),
            },
            policy,
        );
        let now = self.now_ms();
        let mut st = lock(&cluster.state);
        st.hosts = candidates.len();
        let available: Vec<Endpoint> = match st.outlier.as_mut() {
            Some(detector) => {
                let present: std::collections::HashSet<SocketAddr> =
                    candidates.iter().map(|e| e.addr).collect();
                detector.retain(|a| present.contains(a));
                candidates
                    .into_iter()
                    .filter(|e| !detector.is_ejected(&e.addr, now))
                    .collect()
            }
            None => candidates,
        };
        if available.is_empty() {
            return Err(NoEndpoint::NoHealthy);
        }
        let lb = &cluster.policy.load_balancer;
        let key = match lb {
            LoadBalancer::ConsistentHash(k) => hash_of(k, hash),
            _ => None,
        };
        let addrs: Vec<SocketAddr> = available.iter().map(|e| e.addr).collect();
        if matches!(lb, LoadBalancer::ConsistentHash(_))
            && st.ring.as_ref().is_none_or(|(a, _)| *a != addrs)
        {
            let keys: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            st.ring = Some((addrs.clone(), HashRing::new(&keys)));
        }
        let active: Vec<u64> = match lb {
            LoadBalancer::LeastRequest => addrs
                .iter()
                .map(|a| st.active.get(a).copied().unwrap_or(0))
                .collect(),
            _ => Vec::new(),
        };
        let turn = st.turn;
        st.turn = st.turn.wrapping_add(1);
        let index = ambit_core::balance::pick(
            lb,
            available.len(),
            &PickInput {
                active: &active,
                turn,
                random: [rand::random(), rand::random()],
                hash: key,
                ring: st.ring.as_ref().map(|(_, r)| r),
            },
        )
        .ok_or(NoEndpoint::NoHealthy)?;
        drop(st);
        let mut endpoint = available
            .into_iter()
            .nth(index)
            .ok_or(NoEndpoint::NoHealthy)?;
        endpoint.cluster = Some(cluster.key.clone());
        Ok(endpoint)
    }

    /// The cluster `key` with `policy`, afresh when its policy changed.
    fn cluster(&self, key: ClusterKey, policy: Policy) -> Arc<Cluster> {
        let mut clusters = lock(&self.clusters);
        if let Some(c) = clusters.get(&key).filter(|c| c.policy == policy) {
            return c.clone();
        }
        let key = Arc::new(key);
        let outlier = policy
            .outlier_detection
            .as_ref()
            .map(|o| OutlierDetector::new(o.settings(), self.now_ms()));
        let cluster = Arc::new(Cluster {
            key: key.clone(),
            policy,
            state: Mutex::new(ClusterState {
                outlier,
                ..ClusterState::default()
            }),
            freed: Notify::new(),
        });
        clusters.insert(key, cluster.clone());
        cluster
    }

    fn cluster_of(&self, endpoint: &Endpoint) -> Option<Arc<Cluster>> {
        let key = endpoint.cluster.as_ref()?;
        lock(&self.clusters).get(key).cloned()
    }

    /// A permit to send one request to `endpoint` (`http2`: multiplexed), as its
    /// cluster's connection pool allows; waits while an HTTP/1.1 request is queued.
    pub async fn admit(&self, endpoint: &Endpoint, http2: bool) -> Result<Permit, Overflow> {
        let Some(cluster) = self.cluster_of(endpoint) else {
            return Ok(Permit::default());
        };
        loop {
            let notified = cluster.freed.notified();
            tokio::pin!(notified);
            let _waiting = {
                let mut st = lock(&cluster.state);
                match admit(&cluster.policy.connection_pool, st.load, http2) {
                    Admission::Send => {
                        st.load.requests += 1;
                        if !http2 {
                            st.load.connections += 1;
                        }
                        *st.active.entry(endpoint.addr).or_default() += 1;
                        return Ok(Permit {
                            held: Some((cluster.clone(), endpoint.addr, http2)),
                        });
                    }
                    Admission::Overflow => return Err(Overflow),
                    Admission::Queue => {
                        st.load.pending += 1;
                        notified.as_mut().enable();
                        Waiting(&cluster)
                    }
                }
            };
            notified.await;
        }
    }

    /// `maxRequestsPerConnection` for `endpoint`'s cluster; `None`: no limit.
    pub fn requests_per_connection(&self, endpoint: &Endpoint) -> Option<u32> {
        self.cluster_of(endpoint)?
            .policy
            .connection_pool
            .max_requests_per_connection
            .filter(|n| *n > 0)
    }

    /// Records one try's outcome at `endpoint`, for its cluster's outlier detection.
    pub fn report(&self, endpoint: &Endpoint, outcome: Outcome) {
        let Some(cluster) = self.cluster_of(endpoint) else {
            return;
        };
        let now = self.now_ms();
        let mut st = lock(&cluster.state);
        let hosts = st.hosts;
        let Some(detector) = st.outlier.as_mut() else {
            return;
        };
        match detector.report(&endpoint.addr, Health::of(outcome), hosts, now) {
            Reported::Ejected { for_ms } => {
                tracing::info!(cluster = ?cluster.key, upstream = %endpoint.addr, ejected_ms = for_ms, "endpoint ejected (outlier detection)")
            }
            Reported::KeptByMaxEjectionPercent => {
                tracing::info!(cluster = ?cluster.key, upstream = %endpoint.addr, "endpoint not ejected: maxEjectionPercent reached")
            }
            Reported::Counted => {}
        }
    }
}

/// The request's hash for `key`, if it carries one.
fn hash_of(key: &HashKey, input: HashInput<'_>) -> Option<u64> {
    match key {
        HashKey::SourceIp => Some(hash_key(input.client.to_string().as_bytes())),
        HashKey::Header { name } => input
            .headers?
            .get(name.as_str())
            .map(|v| hash_key(v.as_bytes())),
        HashKey::Cookie(c) => input
            .headers?
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(name, _)| *name == c.name)
            .map(|(_, value)| hash_key(value.as_bytes())),
    }
}

/// Counts a request waiting for a connection while it waits (a client that goes
/// away stops waiting too).
struct Waiting<'a>(&'a Cluster);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = lock(&self.0.state);
        st.load.pending = st.load.pending.saturating_sub(1);
    }
}

/// Counts one request in its cluster (active at its endpoint, in the pool's load)
/// while it lives. Default: counted nowhere (no DestinationRule).
#[derive(Debug, Default)]
pub struct Permit {
    held: Option<(Arc<Cluster>, SocketAddr, bool)>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some((cluster, addr, http2)) = self.held.take() else {
            return;
        };
        {
            let mut st = lock(&cluster.state);
            st.load.requests = st.load.requests.saturating_sub(1);
            if !http2 {
                st.load.connections = st.load.connections.saturating_sub(1);
            }
            if let Some(n) = st.active.get_mut(&addr) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    st.active.remove(&addr);
                }
            }
        }
        cluster.freed.notify_one();
    }
}

/// A response body that keeps its request's [`Permit`] until it ends or is dropped.
#[derive(Debug)]
pub struct Held<B> {
    inner: B,
    permit: Option<Permit>,
}

impl<B> Held<B> {
    pub fn new(inner: B, permit: Permit) -> Self {
        Held {
            inner,
            permit: Some(permit),
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
