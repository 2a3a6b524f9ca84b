//! DestinationRules in the waypoint over real sockets: outlier detection ejects a
//! failing endpoint for `baseEjectionTime` and takes it back; the connection pool
//! answers its overflow 503 `UO`; subsets pick endpoints by label (503 `NC` for one
//! the rule does not define); a consistent hash keeps a header value on one endpoint.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use ambit_core::model::MeshConfig;
use ambit_waypoint::http::Limits;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::*;

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "echo.shop.svc.cluster.local")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Adds the DestinationRules (model YAML) to the model.
fn with_rules(yaml: &'static str) -> impl FnOnce(&mut MeshConfig) {
    move |config| {
        let extra: MeshConfig = serde_yaml_ng::from_str(yaml).unwrap();
        config.destination_rules.extend(extra.destination_rules);
        config.http_routes.extend(extra.http_routes);
        config.services.extend(extra.services);
    }
}

#[tokio::test]
async fn a_failing_endpoint_is_ejected_for_the_base_ejection_time_and_comes_back() {
    let mesh = Mesh::start_edited(
        Limits::default(),
        with_rules(
            "destinationRules:\n\
             - {namespace: shop, name: echo, serviceNamespace: shop, serviceName: echo,\n\
                trafficPolicy: {outlierDetection: {consecutive5xxErrors: 2, intervalMs: 100,\n\
                baseEjectionTimeMs: 1500, maxEjectionPercent: 100}}}\n",
        ),
    )
    .await;
    let conn = mesh.client().await;
    let mut client = http1_client(&conn, ECHO_VIP).await;
    let marker = format!("/dr/eject-{}", rand::random::<u32>());
    let hits = |who: &str| seen(&marker).iter().filter(|l| l.starts_with(who)).count();
    // echo-1 answers 503: the default retry hides it, and after its second failure
    // in a row it is ejected.
    let mut ejected_at = None;
    for _ in 0..20 {
        client.ready().await.unwrap();
        let response = client.send_request(get(&marker)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response).await, "echo-2");
        if ejected_at.is_none() && hits("echo-1") == 2 {
            ejected_at = Some(Instant::now());
        }
    }
    let ejected_at = ejected_at.expect("echo-1 never failed twice");
    assert_eq!(hits("echo-1"), 2, "{:?}", seen(&marker));
    assert!(hits("echo-2") >= 18, "{:?}", seen(&marker));
    // Back after 1.5 s (at the first sweep after): polled, a request every 50 ms.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hits("echo-1") == 2 {
        assert!(Instant::now() < deadline, "echo-1 never came back");
        client.ready().await.unwrap();
        let response = client.send_request(get(&marker)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = ejected_at.elapsed();
    assert!(
        out >= Duration::from_millis(1400),
        "back after {out:?}, before the base ejection time"
    );
    assert!(out < Duration::from_secs(4), "back only after {out:?}");
}

#[tokio::test]
async fn a_retry_goes_to_another_endpoint_whatever_the_balancer_picks() {
    // RANDOM and no outlier detection: echo-1 answers every request 503. A retry
    // that picked at random could land on echo-1 again (both retries: 1 in 4); the
    // default retry avoids the endpoints it tried, so the client sees only 200s.
    let mesh = Mesh::start_edited(
        Limits::default(),
        with_rules(
            "destinationRules:\n\
             - {namespace: shop, name: echo, serviceNamespace: shop, serviceName: echo,\n\
                trafficPolicy: {loadBalancer: {policy: random}}}\n",
        ),
    )
    .await;
    let conn = mesh.client().await;
    let mut client = http1_client(&conn, ECHO_VIP).await;
    let marker = format!("/dr/random-{}", rand::random::<u32>());
    for i in 0..60 {
        client.ready().await.unwrap();
        let response = client.send_request(get(&marker)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "request {i}");
        assert_eq!(text(response).await, "echo-2");
    }
    let tried_first = seen(&marker)
        .iter()
        .filter(|l| l.starts_with("echo-1"))
        .count();
    assert!(
        tried_first > 0,
        "RANDOM never picked echo-1: {:?}",
        seen(&marker)
    );
}

#[tokio::test]
async fn max_connections_1_answers_the_overflow_503_uo_and_counts_it() {
    let mesh = Mesh::start_edited(
        Limits::default(),
        with_rules(
            "destinationRules:\n\
             - {namespace: shop, name: guarded, serviceNamespace: shop, serviceName: guarded,\n\
                trafficPolicy: {connectionPool: {maxConnections: 1, http1MaxPendingRequests: 1}}}\n",
        ),
    )
    .await;
    let conn = mesh.client().await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(http1_client(&conn, "10.96.0.40:80").await);
    }
    let started = Instant::now();
    let answers = futures::future::join_all(clients.into_iter().map(|mut c| async move {
        c.ready().await.unwrap();
        let response = c.send_request(get("/slow")).await.unwrap();
        let status = response.status();
        (status, text(response).await)
    }))
    .await;
    let ok = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let overflow: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    // One sent, one waiting for the connection, eight refused.
    assert_eq!((ok, overflow.len()), (2, 8), "{answers:?}");
    for (_, body) in overflow {
        assert_eq!(
            body,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        );
    }
    // The waiting one went after the first: one at a time.
    assert!(started.elapsed() >= Duration::from_millis(3900));
    let (_, metrics) = http_get(mesh.metrics, "/metrics").await;
    // Counted per endpoint picked: 8 in all.
    let counted: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("response_code=\"503\"")
                && l.contains("response_flags=\"UO\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(counted, 8, "{metrics}");
    // With the pool free again, requests pass.
    let mut client = http1_client(&conn, "10.96.0.40:80").await;
    client.ready().await.unwrap();
    let response = client.send_request(get("/name")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn subsets_pick_endpoints_by_label_and_a_consistent_hash_keeps_a_user_on_one() {
    let mesh = Mesh::start_edited(Limits::default(), |config| {
        for (uid, version) in [("shop/echo-1", "v1"), ("shop/echo-2", "v2")] {
            let w = config.workloads.iter_mut().find(|w| w.uid == uid).unwrap();
            w.labels.insert("version".into(), version.into());
        }
        with_rules(
            r#"
services:
- {name: versions, namespace: shop, vips: [10.96.0.60], ports: [{port: 80, targetPort: 8080}],
   waypoint: {address: 10.96.0.99, name: waypoint, namespace: shop}}
httpRoutes:
- parents: [{namespace: shop, name: versions}]
  route:
    namespace: shop
    name: versions
    created: 0
    rules:
    - matches: [{path: {type: prefix, value: /v1}}]
      backends: [{namespace: shop, name: echo, port: 80, weight: 1, subset: v1}]
    - matches: [{path: {type: prefix, value: /v2}}]
      backends: [{namespace: shop, name: echo, port: 80, weight: 1, subset: v2}]
    - matches: [{path: {type: prefix, value: /v3}}]
      backends: [{namespace: shop, name: echo, port: 80, weight: 1, subset: v3}]
    - matches: [{path: {type: prefix, value: /free}}]
      backends: [{namespace: shop, name: free, port: 80, weight: 1, subset: v1}]
destinationRules:
- namespace: shop
  name: echo
  serviceNamespace: shop
  serviceName: echo
  trafficPolicy: {loadBalancer: {policy: consistentHash, key: header, name: x-user}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {policy: roundRobin}}}
  - {name: v3, labels: {version: v3}}
"#,
        )(config);
    })
    .await;
    let conn = mesh.client().await;
    let mut versions = http1_client(&conn, "10.96.0.60:80").await;
    let mut send = async |path: &str| {
        versions.ready().await.unwrap();
        let response = versions.send_request(get(path)).await.unwrap();
        let status = response.status();
        (status, text(response).await)
    };
    for _ in 0..10 {
        let (status, body) = send("/v1/a").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("echo-1 "), "{body}");
        let (status, body) = send("/v2/a").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.starts_with("echo-2 "), "{body}");
    }
    // A subset no endpoint has: no healthy upstream (UH); one the rule does not
    // define, or a Service without a rule: NC.
    assert_eq!(
        send("/v3/a").await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream".into()
        )
    );
    assert_eq!(
        send("/free/a").await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream".into()
        )
    );
    let (_, metrics) = http_get(mesh.metrics, "/metrics").await;
    for flag in ["UH", "NC"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_requests_total{")
                    && l.contains("response_code=\"503\"")
                    && l.contains(&format!("response_flags=\"{flag}\""))),
            "{flag}: {metrics}"
        );
    }
    // The whole Service by consistent hash on x-user: each user stays on one
    // endpoint, and users spread over both.
    let mut echo = http1_client(&conn, ECHO_VIP).await;
    let mut endpoints_seen = std::collections::BTreeSet::new();
    for user in 0..20 {
        let mut first = None;
        for _ in 0..5 {
            echo.ready().await.unwrap();
            let mut request = get("/name");
            request
                .headers_mut()
                .insert("x-user", format!("user-{user}").parse().unwrap());
            let response = echo.send_request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = text(response).await;
            let who = body.split(' ').next().unwrap().to_owned();
            match &first {
                None => first = Some(who.clone()),
                Some(f) => assert_eq!(*f, who, "user-{user} moved"),
            }
            endpoints_seen.insert(who);
        }
    }
    assert_eq!(endpoints_seen.len(), 2, "{endpoints_seen:?}");
}
