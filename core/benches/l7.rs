//! The cost of authorizing one request at a waypoint: normalizing its path and
//! evaluating the policies attached to its service, the shape of issue 13's demo and
//! benchmark (a DENY on admin paths, an ALLOW by namespace, method and path template,
//! a header condition). Measured here, never asserted: the waypoint's request path
//! adds this to every request.
//!
//! Run: `cargo bench -p ambit-core --bench l7`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ambit_core::l7::{
    evaluate, normalize_path, Action, Condition, Connection, HostMatch, Operation, PathMatch,
    Policy, Request, Rule, Source, StringMatch,
};
use ambit_core::SpiffeId;
use criterion::{criterion_group, criterion_main, Criterion};

fn policies() -> Vec<Policy> {
    let deny_admin = Policy {
        namespace: "shop".into(),
        name: "deny-admin".into(),
        action: Action::Deny,
        dry_run: false,
        rules: vec![Rule {
            to: vec![Operation {
                paths: vec![PathMatch::parse("/admin/{**}").unwrap()],
                ..Operation::default()
            }],
            ..Rule::default()
        }],
    };
    let allow = Policy {
        namespace: "shop".into(),
        name: "allow-readers".into(),
        action: Action::Allow,
        dry_run: false,
        rules: vec![Rule {
            from: vec![Source {
                namespaces: vec![StringMatch::parse("shop")],
                ..Source::default()
            }],
            to: vec![Operation {
                hosts: vec![HostMatch::parse("*.shop.svc.cluster.local")],
                methods: vec![StringMatch::parse("GET"), StringMatch::parse("HEAD")],
                paths: vec![PathMatch::parse("/api/{*}/items/{**}").unwrap()],
                ..Operation::default()
            }],
            when: vec![Condition::parse(
                "request.headers[x-tenant]",
                &["acme".into()],
                &[],
                "shop",
            )
            .unwrap()],
        }],
    };
    vec![deny_admin, allow]
}

fn bench(c: &mut Criterion) {
    let policies = policies();
    let peer = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tenant", "acme".parse().unwrap());
    headers.insert("user-agent", "curl/8".parse().unwrap());
    let connection = Connection {
        peer: Some(&peer),
        source_ip: "10.1.0.2".parse().unwrap(),
        destination_ip: "10.96.0.10".parse().unwrap(),
        destination_port: 80,
        sni: None,
    };
    c.bench_function("l7: normalize the path and authorize a GET", |b| {
        b.iter(|| {
            let path = normalize_path("/api/v1/items/42?full=1").unwrap();
            let request = Request {
                connection,
                remote_ip: connection.source_ip,
                host: "catalog.shop.svc.cluster.local",
                method: "GET",
                path: &path,
                headers: &headers,
                auth: None,
            };
            let verdict = evaluate(&policies, &request);
            assert!(verdict.allowed());
            verdict
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
