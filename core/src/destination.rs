//! Istio's DestinationRule as the waypoint applies it: which endpoints of a Service a
//! subset names ([`Subset::selects`]), and the traffic policy in effect for one
//! Service port and subset ([`DestinationRule::policy`]): load balancing
//! ([`crate::balance`]), the connection pool's limits ([`ConnectionPool`], admitted
//! by [`admit`]) and outlier detection ([`crate::outlier`]).
//!
//! The policy in effect is built in Istio's order, each later layer replacing what it
//! sets (a whole `loadBalancer`, `connectionPool` or `outlierDetection`): the
//! DestinationRule's `trafficPolicy`, its `portLevelSettings` for the port, the
//! subset's `trafficPolicy`, the subset's `portLevelSettings` for the port. What no
//! layer sets is Istio's default: round robin, no connection limits, no outlier
//! detection.
//!
//! The values are as written (the control plane validated them); defaults are
//! applied here, where they are used.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A DestinationRule, its `host` resolved to a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRule {
    /// The DestinationRule's own namespace and name.
    pub namespace: String,
    pub name: String,
    /// Creation time, seconds since the epoch: of two rules for one Service, the
    /// older applies.
    #[serde(default)]
    pub created: i64,
    /// The Service it applies to (`host`).
    pub service_namespace: String,
    pub service_name: String,
    #[serde(default)]
    pub traffic_policy: TrafficPolicy,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
}

/// A named group of a Service's endpoints, by labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

impl Subset {
    /// Whether a workload with `labels` is in this subset: it carries every label
    /// of the subset with the same value.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// `trafficPolicy`: what it sets, for every port and per port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

/// One of `portLevelSettings`: the settings for one Service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

/// `loadBalancer`: `simple`, or `consistentHash` on one key. In the model's YAML:
/// `{policy: leastRequest}`, `{policy: consistentHash, key: header, name: x-user}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "policy")]
pub enum LoadBalancer {
    /// `ROUND_ROBIN`, and Istio's default (`UNSPECIFIED` too).
    #[default]
    RoundRobin,
    /// `LEAST_REQUEST`: the fewer active requests of two endpoints picked at random.
    LeastRequest,
    /// `RANDOM`.
    Random,
    /// `consistentHash`: requests with the same key go to the same endpoint while
    /// it stays.
    ConsistentHash(HashKey),
}

/// What a consistent hash is taken over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "key")]
pub enum HashKey {
    /// `httpHeaderName`: the header's value (lower-case name).
    Header { name: String },
    /// `httpCookie`: the cookie's value; without one, and with a `ttl`, the waypoint
    /// makes one and sets it on the response.
    Cookie(HashCookie),
    /// `useSourceIp`: the client's address.
    SourceIp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HashCookie {
    pub name: String,
    /// `ttl`, milliseconds; absent or 0: a session cookie, never made by the waypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// `connectionPool`, as written; absent: Istio's default, no limit (2³²−1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: connections to all endpoints of the Service (HTTP/1.1:
    /// requests being sent, each on its own connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1_max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: requests in flight to all endpoints (HTTP/1.1 too,
    /// as Envoy's `max_requests`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2_max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: a connection closes after this many requests;
    /// absent or 0: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

/// `outlierDetection`, as written; [`OutlierDetection::settings`] applies Istio's
/// defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

impl OutlierDetection {
    /// With Istio's (and Envoy's) defaults: 5 consecutive 5xx, gateway errors not
    /// counted, a 10 s interval, 30 s base ejection time, at most 10 % ejected.
    pub fn settings(&self) -> crate::outlier::OutlierSettings {
        crate::outlier::OutlierSettings {
            consecutive_5xx: self.consecutive_5xx_errors.unwrap_or(5),
            consecutive_gateway: self.consecutive_gateway_errors.unwrap_or(0),
            interval_ms: self.interval_ms.filter(|i| *i > 0).unwrap_or(10_000),
            base_ejection_ms: self.base_ejection_time_ms.unwrap_or(30_000),
            max_ejection_percent: self.max_ejection_percent.unwrap_or(10).min(100),
        }
    }
}

/// The traffic policy in effect for one Service port and subset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub load_balancer: LoadBalancer,
    pub connection_pool: ConnectionPool,
    /// `None`: no outlier detection.
    pub outlier_detection: Option<OutlierDetection>,
}

impl DestinationRule {
    /// `<namespace>/<name>` of the DestinationRule.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The subset `name`.
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// The policy for requests to the Service's `port` (the Service port) in
    /// `subset` (`None`: the whole Service; a subset it does not define: as `None`).
    pub fn policy(&self, port: u16, subset: Option<&str>) -> Policy {
        let mut policy = Policy::default();
        let subset = subset.and_then(|s| self.subset(s));
        let layers = std::iter::once(&self.traffic_policy)
            .chain(subset.and_then(|s| s.traffic_policy.as_ref()));
        for layer in layers {
            policy.apply(
                &layer.load_balancer,
                &layer.connection_pool,
                &layer.outlier_detection,
            );
            if let Some(p) = layer.port_level_settings.iter().find(|p| p.port == port) {
                policy.apply(&p.load_balancer, &p.connection_pool, &p.outlier_detection);
            }
        }
        policy
    }
}

impl Policy {
    fn apply(
        &mut self,
        load_balancer: &Option<LoadBalancer>,
        connection_pool: &Option<ConnectionPool>,
        outlier_detection: &Option<OutlierDetection>,
    ) {
        if let Some(lb) = load_balancer {
            self.load_balancer = lb.clone();
        }
        if let Some(pool) = connection_pool {
            self.connection_pool = pool.clone();
        }
        if let Some(od) = outlier_detection {
            self.outlier_detection = Some(od.clone());
        }
    }
}

/// A Service port and subset a DestinationRule applies to: what Envoy calls a
/// cluster. Its endpoints share one connection pool and one outlier detector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterKey {
    pub namespace: String,
    pub service: String,
    pub port: u16,
    pub subset: Option<String>,
}

/// What a Service port (one subset of it) is carrying now, for [`admit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// HTTP/1.1 requests being sent, each holding a connection.
    pub connections: u64,
    /// Requests waiting for a connection.
    pub pending: u64,
    /// Requests in flight, of either version.
    pub requests: u64,
}

/// What to do with one more request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send it now.
    Send,
    /// Wait for a connection to come free (HTTP/1.1 at `maxConnections`).
    Queue,
    /// Refuse it: 503 with response flag `UO`, as Envoy's circuit breakers.
    Overflow,
}

/// Envoy's circuit breakers for one more request under `load`: over
/// `http2MaxRequests` it overflows; an HTTP/1.1 request at `maxConnections` waits
/// while fewer than `http1MaxPendingRequests` do, and overflows otherwise. An HTTP/2
/// request shares its endpoint's connection, so only the request limit applies.
pub fn admit(pool: &ConnectionPool, load: Load, http2: bool) -> Admission {
    let limit = |v: Option<u32>| v.map_or(u64::from(u32::MAX), u64::from);
    if load.requests >= limit(pool.http2_max_requests) {
        return Admission::Overflow;
    }
    if http2 || load.connections < limit(pool.max_connections) {
        return Admission::Send;
    }
    if load.pending < limit(pool.http1_max_pending_requests) {
        Admission::Queue
    } else {
        Admission::Overflow
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const RULE: &str = r#"
namespace: shop
name: reviews
serviceNamespace: shop
serviceName: reviews
trafficPolicy:
  loadBalancer: {policy: leastRequest}
  connectionPool: {maxConnections: 100}
  portLevelSettings:
  - {port: 9080, loadBalancer: {policy: random}}
subsets:
- name: v1
  labels: {version: v1}
- name: v2
  labels: {version: v2, track: canary}
  trafficPolicy:
    loadBalancer: {policy: consistentHash, key: header, name: x-user}
    outlierDetection: {consecutive5xxErrors: 2}
    portLevelSettings:
    - {port: 9080, connectionPool: {http2MaxRequests: 7}}
"#;

    fn rule() -> DestinationRule {
        serde_yaml_ng::from_str(RULE).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_subset_selects_the_workloads_with_all_of_its_labels() {
        let r = rule();
        let v2 = r.subset("v2").unwrap();
        for (have, selected) in [
            (labels(&[("version", "v2"), ("track", "canary")]), true),
            (
                labels(&[("version", "v2"), ("track", "canary"), ("app", "r")]),
                true,
            ),
            (labels(&[("version", "v2")]), false),
            (labels(&[("version", "v1"), ("track", "canary")]), false),
            (labels(&[]), false),
        ] {
            assert_eq!(v2.selects(&have), selected, "{have:?}");
        }
        assert!(r.subset("v3").is_none());
        let all = Subset {
            name: "all".into(),
            labels: BTreeMap::new(),
            traffic_policy: None,
        };
        assert!(all.selects(&labels(&[])));
    }

    #[test]
    fn the_policy_is_layered_rule_port_subset_subset_port() {
        let r = rule();
        let pool = |max_connections, http2_max_requests| ConnectionPool {
            max_connections,
            http2_max_requests,
            ..ConnectionPool::default()
        };
        let hash = LoadBalancer::ConsistentHash(HashKey::Header {
            name: "x-user".into(),
        });
        let od = OutlierDetection {
            consecutive_5xx_errors: Some(2),
            ..OutlierDetection::default()
        };
        for (port, subset, lb, connection_pool, outlier) in [
            (
                80,
                None,
                LoadBalancer::LeastRequest,
                pool(Some(100), None),
                None,
            ),
            (
                9080,
                None,
                LoadBalancer::Random,
                pool(Some(100), None),
                None,
            ),
            (
                80,
                Some("v1"),
                LoadBalancer::LeastRequest,
                pool(Some(100), None),
                None,
            ),
            (
                9080,
                Some("v1"),
                LoadBalancer::Random,
                pool(Some(100), None),
                None,
            ),
            (
                80,
                Some("v2"),
                hash.clone(),
                pool(Some(100), None),
                Some(od.clone()),
            ),
            // The subset's port level replaces the whole connection pool.
            (
                9080,
                Some("v2"),
                hash.clone(),
                pool(None, Some(7)),
                Some(od.clone()),
            ),
            (
                80,
                Some("nope"),
                LoadBalancer::LeastRequest,
                pool(Some(100), None),
                None,
            ),
        ] {
            let got = r.policy(port, subset);
            assert_eq!(
                got,
                Policy {
                    load_balancer: lb,
                    connection_pool,
                    outlier_detection: outlier
                },
                "{port} {subset:?}"
            );
        }
    }

    #[test]
    fn outlier_detection_takes_istios_defaults_for_what_is_absent() {
        let s = OutlierDetection::default().settings();
        assert_eq!(
            (
                s.consecutive_5xx,
                s.consecutive_gateway,
                s.interval_ms,
                s.base_ejection_ms,
                s.max_ejection_percent
            ),
            (5, 0, 10_000, 30_000, 10)
        );
        let s = OutlierDetection {
            consecutive_5xx_errors: Some(0),
            consecutive_gateway_errors: Some(3),
            interval_ms: Some(1000),
            base_ejection_time_ms: Some(2000),
            max_ejection_percent: Some(150),
        }
        .settings();
        assert_eq!(
            (
                s.consecutive_5xx,
                s.consecutive_gateway,
                s.interval_ms,
                s.max_ejection_percent
            ),
            (0, 3, 1000, 100)
        );
    }

    #[test]
    fn the_connection_pool_admits_as_envoys_circuit_breakers() {
        let none = ConnectionPool::default();
        let one = ConnectionPool {
            max_connections: Some(1),
            http1_max_pending_requests: Some(1),
            ..ConnectionPool::default()
        };
        let requests = ConnectionPool {
            http2_max_requests: Some(2),
            ..ConnectionPool::default()
        };
        let load = |connections, pending, requests| Load {
            connections,
            pending,
            requests,
        };
        use Admission::*;
        for (pool, l, http2, want) in [
            (&none, load(10_000, 10_000, 10_000), false, Send),
            (&one, load(0, 0, 0), false, Send),
            (&one, load(1, 0, 1), false, Queue),
            (&one, load(1, 1, 2), false, Overflow),
            // HTTP/2 multiplexes: the connection limit does not hold it back.
            (&one, load(1, 1, 2), true, Send),
            (&requests, load(1, 0, 1), true, Send),
            (&requests, load(2, 0, 2), true, Overflow),
            (&requests, load(2, 0, 2), false, Overflow),
        ] {
            assert_eq!(admit(pool, l, http2), want, "{pool:?} {l:?} {http2}");
        }
    }
}
