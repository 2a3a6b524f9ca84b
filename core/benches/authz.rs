//! The cost of one authorization decision at ztunnel with 10,000 policies in the mesh,
//! most of them not selecting the destination: the policies that apply are found
//! through the model's index (mesh-wide, the namespace's, the workload's own keys),
//! then evaluated. Target: under 1 µs.
//!
//! Run: `cargo bench -p ambit-core --bench authz`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use ambit_core::authz::{
    evaluate, Action, Cidr, Clause, Connection, Match, Policy, Rule, StringMatch,
};
use ambit_core::model::{MeshConfig, MeshState, PolicyScope, PolicySpec, Protocol, WorkloadSpec};
use ambit_core::{SpiffeId, TrustDomain};
use criterion::{criterion_group, criterion_main, Criterion};

const POLICIES: usize = 10_000;
const NAMESPACES: usize = 100;

fn policy(namespace: &str, name: &str, action: Action, principal: &str, port: u16) -> Policy {
    Policy {
        namespace: namespace.into(),
        name: name.into(),
        action,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![
                Clause {
                    matches: vec![Match {
                        principals: vec![StringMatch::parse(principal)],
                        not_source_ips: vec![Cidr::parse("192.168.0.0/16").unwrap()],
                        ..Match::default()
                    }],
                },
                Clause {
                    matches: vec![Match {
                        destination_ports: vec![port],
                        ..Match::default()
                    }],
                },
            ],
        }],
    }
}

fn workload(i: usize, namespace: &str, policies: Vec<String>) -> WorkloadSpec {
    WorkloadSpec {
        uid: format!("{namespace}/w{i}"),
        name: format!("w{i}"),
        namespace: namespace.into(),
        service_account: format!("sa{i}"),
        node: "node-a".into(),
        ips: vec![IpAddr::from([
            10,
            (i / 65536) as u8 + 1,
            (i / 256 % 256) as u8,
            (i % 256) as u8,
        ])],
        protocol: Protocol::Hbone,
        canonical_name: None,
        canonical_revision: None,
        workload_kind: None,
        workload_name: None,
        healthy: true,
        waypoint: None,
        ambient: true,
        authorization_policies: policies,
        labels: Default::default(),
    }
}

fn mesh() -> MeshConfig {
    let mut config = MeshConfig::default();
    // One workload per selector policy, each selecting only its own workload, spread
    // over the namespaces; plus a namespace ALLOW and DENY in every namespace and two
    // mesh-wide policies.
    for i in 0..POLICIES - 2 * NAMESPACES - 2 {
        let ns = format!("ns{}", i % NAMESPACES);
        let name = format!("p{i}");
        config.policies.push(PolicySpec {
            condition: None,
            scope: PolicyScope::WorkloadSelector,
            policy: policy(
                &ns,
                &name,
                Action::Allow,
                &format!("cluster.local/ns/{ns}/sa/sa{i}"),
                8080,
            ),
        });
        config
            .workloads
            .push(workload(i, &ns, vec![format!("{ns}/{name}")]));
    }
    for n in 0..NAMESPACES {
        let ns = format!("ns{n}");
        config.policies.push(PolicySpec {
            condition: None,
            scope: PolicyScope::Namespace,
            policy: policy(
                &ns,
                "allow-ns",
                Action::Allow,
                &format!("cluster.local/ns/{ns}/*"),
                8080,
            ),
        });
        config.policies.push(PolicySpec {
            condition: None,
            scope: PolicyScope::Namespace,
            policy: policy(
                &ns,
                "deny-legacy",
                Action::Deny,
                "cluster.local/ns/legacy/*",
                8080,
            ),
        });
    }
    for name in ["deny-bad", "audit-all"] {
        config.policies.push(PolicySpec {
            condition: None,
            scope: PolicyScope::Global,
            policy: policy(
                "istio-system",
                name,
                if name == "audit-all" {
                    Action::Audit
                } else {
                    Action::Deny
                },
                "cluster.local/ns/bad/*",
                9999,
            ),
        });
    }
    config
}

fn bench(c: &mut Criterion) {
    let config = mesh();
    assert_eq!(config.policies.len(), POLICIES);
    let state = MeshState::build(&config, &TrustDomain::default()).unwrap();
    let destination = state.workload("ns7/w7").unwrap();
    let peer = SpiffeId::parse("spiffe://cluster.local/ns/ns7/sa/sa107").unwrap();
    let connection = Connection {
        peer: Some(&peer),
        source_ip: "10.1.0.107".parse().unwrap(),
        destination_ip: destination.spec.ips[0],
        destination_port: 8080,
    };
    let verdict = evaluate(state.policies_for(&destination.spec), &connection);
    assert!(verdict.allowed(), "{verdict:?}");
    c.bench_function(
        "authorize one connection, 10,000 policies in the mesh",
        |b| {
            b.iter(|| {
                let verdict = evaluate(
                    state.policies_for(std::hint::black_box(&destination.spec)),
                    std::hint::black_box(&connection),
                );
                std::hint::black_box(verdict.allowed())
            })
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
