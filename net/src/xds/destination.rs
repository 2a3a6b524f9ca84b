//! DestinationRules as xDS resources, both ways: an
//! [`ambit_core::destination::DestinationRule`] becomes a [`DestinationRule`] named
//! `destinationrule/<namespace>/<name>`, and a received one is read back, a value the
//! control plane could not have sent (a port 0, an empty subset or cookie name, a
//! hash key or policy missing) rejecting that resource alone.

use ambit_core::destination::{
    ConnectionPool, DestinationRule as Rule, HashCookie, HashKey, LoadBalancer, OutlierDetection,
    PortTrafficPolicy, Subset, TrafficPolicy,
};
use ambit_proto::workload::{
    self as pb, consistent_hash_key, load_balancer, ConsistentHashKey, DestinationRule,
    DestinationSubset, SimpleLoadBalancer,
};

/// The resource name of a DestinationRule.
pub fn destination_rule_name(namespace: &str, name: &str) -> String {
    format!("destinationrule/{namespace}/{name}")
}

pub fn destination_rule_to_proto(r: &Rule) -> DestinationRule {
    DestinationRule {
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        created: r.created,
        service_namespace: r.service_namespace.clone(),
        service_name: r.service_name.clone(),
        traffic_policy: Some(policy_to_proto(&r.traffic_policy)),
        subsets: r
            .subsets
            .iter()
            .map(|s| DestinationSubset {
                name: s.name.clone(),
                labels: s.labels.clone().into_iter().collect(),
                traffic_policy: s.traffic_policy.as_ref().map(policy_to_proto),
            })
            .collect(),
    }
}

fn policy_to_proto(p: &TrafficPolicy) -> pb::TrafficPolicy {
    pb::TrafficPolicy {
        load_balancer: p.load_balancer.as_ref().map(lb_to_proto),
        connection_pool: p.connection_pool.as_ref().map(pool_to_proto),
        outlier_detection: p.outlier_detection.as_ref().map(outlier_to_proto),
        port_level_settings: p
            .port_level_settings
            .iter()
            .map(|p| pb::PortTrafficPolicy {
                port: u32::from(p.port),
                load_balancer: p.load_balancer.as_ref().map(lb_to_proto),
                connection_pool: p.connection_pool.as_ref().map(pool_to_proto),
                outlier_detection: p.outlier_detection.as_ref().map(outlier_to_proto),
            })
            .collect(),
    }
}

fn lb_to_proto(lb: &LoadBalancer) -> pb::LoadBalancer {
    let simple = |s: SimpleLoadBalancer| load_balancer::Policy::Simple(s as i32);
    let hash = |k| load_balancer::Policy::ConsistentHash(ConsistentHashKey { key: Some(k) });
    pb::LoadBalancer {
        policy: Some(match lb {
            LoadBalancer::RoundRobin => simple(SimpleLoadBalancer::RoundRobin),
            LoadBalancer::LeastRequest => simple(SimpleLoadBalancer::LeastRequest),
            LoadBalancer::Random => simple(SimpleLoadBalancer::Random),
            LoadBalancer::ConsistentHash(HashKey::Header { name }) => {
                hash(consistent_hash_key::Key::HttpHeaderName(name.clone()))
            }
            LoadBalancer::ConsistentHash(HashKey::Cookie(c)) => {
                hash(consistent_hash_key::Key::HttpCookie(pb::HashCookie {
                    name: c.name.clone(),
                    ttl_ms: c.ttl_ms.unwrap_or(0),
                    path: c.path.clone().unwrap_or_default(),
                }))
            }
            LoadBalancer::ConsistentHash(HashKey::SourceIp) => {
                hash(consistent_hash_key::Key::UseSourceIp(true))
            }
        }),
    }
}

fn pool_to_proto(p: &ConnectionPool) -> pb::ConnectionPool {
    pb::ConnectionPool {
        max_connections: p.max_connections,
        http1_max_pending_requests: p.http1_max_pending_requests,
        http2_max_requests: p.http2_max_requests,
        max_requests_per_connection: p.max_requests_per_connection,
    }
}

fn outlier_to_proto(o: &OutlierDetection) -> pb::OutlierDetection {
    pb::OutlierDetection {
        consecutive_5xx_errors: o.consecutive_5xx_errors,
        consecutive_gateway_errors: o.consecutive_gateway_errors,
        interval_ms: o.interval_ms,
        base_ejection_time_ms: o.base_ejection_time_ms,
        max_ejection_percent: o.max_ejection_percent,
    }
}

pub fn destination_rule_from_proto(r: &DestinationRule) -> Result<Rule, String> {
    if r.name.is_empty()
        || r.namespace.is_empty()
        || r.service_name.is_empty()
        || r.service_namespace.is_empty()
    {
        return Err("DestinationRule without a name, namespace or Service".into());
    }
    let mut subsets = Vec::new();
    for s in &r.subsets {
        if s.name.is_empty() {
            return Err("a subset without a name".into());
        }
        subsets.push(Subset {
            name: s.name.clone(),
            labels: s.labels.clone().into_iter().collect(),
            traffic_policy: s
                .traffic_policy
                .as_ref()
                .map(|p| policy_from_proto(p, &format!("subset {}", s.name)))
                .transpose()?,
        });
    }
    Ok(Rule {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        created: r.created,
        service_namespace: r.service_namespace.clone(),
        service_name: r.service_name.clone(),
        traffic_policy: r
            .traffic_policy
            .as_ref()
            .map(|p| policy_from_proto(p, "trafficPolicy"))
            .transpose()?
            .unwrap_or_default(),
        subsets,
    })
}

fn policy_from_proto(p: &pb::TrafficPolicy, at: &str) -> Result<TrafficPolicy, String> {
    let mut port_level_settings = Vec::new();
    for s in &p.port_level_settings {
        let port = u16::try_from(s.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{at}: port {} is not between 1 and 65535", s.port))?;
        port_level_settings.push(PortTrafficPolicy {
            port,
            load_balancer: s
                .load_balancer
                .as_ref()
                .map(|l| lb_from_proto(l, at))
                .transpose()?,
            connection_pool: s.connection_pool.as_ref().map(pool_from_proto),
            outlier_detection: s.outlier_detection.as_ref().map(outlier_from_proto),
        });
    }
    Ok(TrafficPolicy {
        load_balancer: p
            .load_balancer
            .as_ref()
            .map(|l| lb_from_proto(l, at))
            .transpose()?,
        connection_pool: p.connection_pool.as_ref().map(pool_from_proto),
        outlier_detection: p.outlier_detection.as_ref().map(outlier_from_proto),
        port_level_settings,
    })
}

fn lb_from_proto(lb: &pb::LoadBalancer, at: &str) -> Result<LoadBalancer, String> {
    Ok(match &lb.policy {
        None => return Err(format!("{at}: a load balancer without a policy")),
        Some(load_balancer::Policy::Simple(s)) => match SimpleLoadBalancer::try_from(*s) {
            Ok(SimpleLoadBalancer::RoundRobin) => LoadBalancer::RoundRobin,
            Ok(SimpleLoadBalancer::LeastRequest) => LoadBalancer::LeastRequest,
            Ok(SimpleLoadBalancer::Random) => LoadBalancer::Random,
            Err(_) => return Err(format!("{at}: unknown load balancer {s}")),
        },
        Some(load_balancer::Policy::ConsistentHash(h)) => {
            LoadBalancer::ConsistentHash(match &h.key {
                Some(consistent_hash_key::Key::HttpHeaderName(n)) if !n.is_empty() => {
                    HashKey::Header {
                        name: n.to_ascii_lowercase(),
                    }
                }
                Some(consistent_hash_key::Key::HttpCookie(c)) if !c.name.is_empty() => {
                    HashKey::Cookie(HashCookie {
                        name: c.name.clone(),
                        ttl_ms: (c.ttl_ms > 0).then_some(c.ttl_ms),
                        path: (!c.path.is_empty()).then(|| c.path.clone()),
                    })
                }
                Some(consistent_hash_key::Key::UseSourceIp(true)) => HashKey::SourceIp,
                _ => return Err(format!("{at}: a consistent hash without a usable key")),
            })
        }
    })
}

fn pool_from_proto(p: &pb::ConnectionPool) -> ConnectionPool {
    ConnectionPool {
        max_connections: p.max_connections,
        http1_max_pending_requests: p.http1_max_pending_requests,
        http2_max_requests: p.http2_max_requests,
        max_requests_per_connection: p.max_requests_per_connection,
    }
}

fn outlier_from_proto(o: &pb::OutlierDetection) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx_errors: o.consecutive_5xx_errors,
        consecutive_gateway_errors: o.consecutive_gateway_errors,
        interval_ms: o.interval_ms,
        base_ejection_time_ms: o.base_ejection_time_ms,
        max_ejection_percent: o.max_ejection_percent,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const RULE: &str = r#"
namespace: shop
name: reviews
created: 7
serviceNamespace: shop
serviceName: reviews
trafficPolicy:
  loadBalancer: {policy: consistentHash, key: cookie, name: user, ttlMs: 60000, path: /}
  connectionPool: {maxConnections: 1, http1MaxPendingRequests: 0}
  outlierDetection: {consecutive5xxErrors: 2, intervalMs: 1000, baseEjectionTimeMs: 3000, maxEjectionPercent: 100}
  portLevelSettings:
  - {port: 9080, loadBalancer: {policy: leastRequest}, connectionPool: {maxRequestsPerConnection: 1}}
subsets:
- {name: v1, labels: {version: v1}}
- name: v2
  labels: {version: v2}
  trafficPolicy: {loadBalancer: {policy: consistentHash, key: sourceIp}, outlierDetection: {}}
- name: v3
  trafficPolicy: {loadBalancer: {policy: consistentHash, key: header, name: x-user}}
"#;

    #[test]
    fn a_destination_rule_survives_the_round_trip() {
        let rule: Rule = serde_yaml_ng::from_str(RULE).unwrap();
        let back = destination_rule_from_proto(&destination_rule_to_proto(&rule)).unwrap();
        assert_eq!(back, rule);
        assert_eq!(
            destination_rule_name("shop", "reviews"),
            "destinationrule/shop/reviews"
        );
    }

    #[test]
    fn what_the_control_plane_cannot_send_rejects_the_resource() {
        let rule: Rule = serde_yaml_ng::from_str(RULE).unwrap();
        let good = destination_rule_to_proto(&rule);
        let mut no_key = good.clone();
        no_key.traffic_policy.as_mut().unwrap().load_balancer = Some(pb::LoadBalancer {
            policy: Some(load_balancer::Policy::ConsistentHash(ConsistentHashKey {
                key: None,
            })),
        });
        let mut port0 = good.clone();
        port0.traffic_policy.as_mut().unwrap().port_level_settings[0].port = 0;
        let mut unnamed = good.clone();
        unnamed.subsets[0].name.clear();
        let mut no_service = good;
        no_service.service_name.clear();
        for (bad, says) in [
            (no_key, "consistent hash without a usable key"),
            (port0, "port 0"),
            (unnamed, "subset without a name"),
            (no_service, "without a name, namespace or Service"),
        ] {
            let e = destination_rule_from_proto(&bad).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
