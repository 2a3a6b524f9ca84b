#![allow(clippy::unwrap_used)]
use super::*;

fn vs(yaml: &str) -> ReadVirtualService {
    let spec: Value = serde_yaml_ng::from_str(yaml).unwrap();
    read(
        &ObjectKey::new("shop", "reviews"),
        &VirtualService {
            metadata: ObjectMeta::default(),
            spec,
        },
    )
}

fn error(yaml: &str) -> String {
    vs(yaml).route.unwrap_err()
}

#[test]
fn a_canary_by_header_and_weight_reads_into_ordered_rules() {
    let read = vs(r#"
hosts: [reviews, ratings.shop.svc.cluster.local]
http:
- name: tagged
  match:
  - headers: {x-canary: {exact: "true"}}
    uri: {prefix: /api}
  route:
  - destination: {host: reviews, subset: v2}
- timeout: 2s
  retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,retriable-4xx"}
  fault:
    delay: {fixedDelay: 0.2s, percentage: {value: 50}}
    abort: {httpStatus: 503, percentage: {value: 12.5}}
  route:
  - destination: {host: reviews.shop, subset: v1, port: {number: 9080}}
    weight: 90
  - destination: {host: reviews, subset: v2}
    weight: 10
"#);
    assert_eq!(
        read.hosts,
        vec![
            VsHost::Service {
                namespace: "shop".into(),
                name: "reviews".into()
            },
            VsHost::Service {
                namespace: "shop".into(),
                name: "ratings".into()
            },
        ]
    );
    assert!(read.for_mesh);
    let route = read.route.unwrap();
    assert!(route.virtual_service);
    assert_eq!(route.kind(), "VirtualService");
    let [tagged, split] = route.rules.as_slice() else {
        panic!("{:?}", route.rules)
    };
    assert_eq!(
        tagged.matches[0].path,
        Some(PathMatch::StartsWith("/api".into()))
    );
    assert_eq!(
        tagged.matches[0].headers[0].value,
        ValueMatch::Exact("true".into())
    );
    assert_eq!(tagged.backends[0].weight, 100, "a single destination");
    assert_eq!(tagged.backends[0].subset.as_deref(), Some("v2"));
    assert_eq!(
        split.matches[0].path,
        Some(PathMatch::StartsWith("/".into())),
        "no match: every path"
    );
    assert_eq!(
        split.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
        vec![90, 10]
    );
    assert_eq!(split.backends[0].port, Some(9080));
    assert_eq!(split.request_timeout_ms, Some(2000));
    assert_eq!(split.backend_timeout_ms, Some(500));
    let retry = split.retry.as_ref().unwrap();
    assert_eq!(retry.attempts, 3);
    let policy = retry.policy();
    assert!(policy.on_5xx && policy.codes.contains(&409));
    let fault = split.fault.as_ref().unwrap();
    assert_eq!(
        fault.delay,
        Some(Delay {
            fixed_delay_ms: 200,
            share_ppm: 500_000
        })
    );
    assert_eq!(fault.abort.as_ref().unwrap().share_ppm, 125_000);
    assert_eq!(fault.abort.as_ref().unwrap().http_status, Some(503));
}

#[test]
fn headers_rewrite_redirect_and_mirrors() {
    let route = vs(r#"
hosts: [reviews]
http:
- match: [{uri: {exact: /old}}]
  redirect: {uri: /new, authority: reviews.shop}
- match: [{uri: {prefix: /v1/}}, {uri: {prefix: /V1/}, ignoreUriCase: true}]
  rewrite: {authority: reviews-v2}
  headers:
    request: {set: {X-Env: prod}, add: {x-trace: "1"}, remove: [x-debug]}
    response: {remove: [server]}
  mirror: {host: shadow}
  mirrorPercentage: {value: 25}
  route: [{destination: {host: reviews}}]
"#)
    .route
    .unwrap();
    let redirect = route.rules[0].filters.redirect.as_ref().unwrap();
    assert_eq!(redirect.status, 301, "Istio's default redirect code");
    assert_eq!(redirect.path, Some(PathModifier::Full("/new".into())));
    let rule = &route.rules[1];
    assert!(
        matches!(&rule.matches[1].path, Some(PathMatch::Regex(r)) if r.is_match("/v1/x") && !r.is_match("/v2/x"))
    );
    let f = &rule.filters;
    assert_eq!(
        f.request_headers.as_ref().unwrap().set,
        vec![("x-env".into(), "prod".into())]
    );
    assert_eq!(f.response_headers.as_ref().unwrap().remove, vec!["server"]);
    assert_eq!(f.mirrors[0].share_ppm, 250_000);
    assert_eq!(f.mirrors[0].backend.name, "shadow");
    assert_eq!(
        f.rewrite.as_ref().unwrap().hostname.as_deref(),
        Some("reviews-v2")
    );
}

#[test]
fn ingress_only_virtual_services_and_matches_are_not_for_the_mesh() {
    let read = vs("hosts: [reviews]\ngateways: [shop/ingress]\nhttp: [{route: [{destination: {host: reviews}}]}]");
    assert!(!read.for_mesh);
    let route = vs(r#"
hosts: [reviews]
gateways: [mesh, shop/ingress]
http:
- match: [{gateways: [shop/ingress], uri: {exact: /ingress}}]
  route: [{destination: {host: ingress-only}}]
- route: [{destination: {host: reviews}}]
"#)
    .route
    .unwrap();
    assert_eq!(route.rules.len(), 1, "the ingress-only rule is left out");
    assert_eq!(route.rules[0].backends[0].name, "reviews");
}

#[test]
fn what_cannot_be_enforced_is_refused_with_its_field() {
    for (yaml, says) in [
        (
            "hosts: [reviews]\nhttp: [{match: [{uri: {regex: '/(['}}], route: [{destination: {host: reviews}}]}]",
            "spec.http[0].match[0].uri.regex: \"/([\" is not a valid regular expression",
        ),
        (
            "hosts: [reviews]\nhttp: [{route: [{destination: {host: reviews}, weight: -1}]}]",
            "spec.http[0].route[0].weight: -1 is not between 0 and 1000000",
        ),
        (
            "hosts: [reviews]\nhttp: [{corsPolicy: {}, route: [{destination: {host: reviews}}]}]",
            "spec.http[0].corsPolicy: not supported by Ambit yet",
        ),
        (
            "hosts: [reviews]\nhttp: [{match: [{withoutHeaders: {x: {}}}], route: [{destination: {host: reviews}}]}]",
            "spec.http[0].match[0].withoutHeaders: not supported by Ambit yet",
        ),
        (
            "hosts: [reviews]\ntcp: [{route: [{destination: {host: reviews}}]}]",
            "spec.tcp: tcp routes are not supported by Ambit yet",
        ),
        ("hosts: ['*.shop']\nhttp: []", "spec.hosts[0]: wildcard host"),
        ("http: []", "spec.hosts: at least one host is required"),
        (
            "hosts: [reviews]\nhttp: [{timeout: '5 seconds', route: [{destination: {host: reviews}}]}]",
            "spec.http[0].timeout: \"5 seconds\"",
        ),
        (
            "hosts: [reviews]\nhttp: [{retries: {attempts: 2, retryOn: sometimes}, route: [{destination: {host: reviews}}]}]",
            "spec.http[0].retries.retryOn: \"sometimes\" is not a retry condition",
        ),
        (
            "hosts: [reviews]\nhttp: [{fault: {abort: {httpStatus: 503, grpcStatus: UNAVAILABLE}}, route: [{destination: {host: reviews}}]}]",
            "spec.http[0].fault.abort: exactly one of httpStatus and grpcStatus",
        ),
        (
            "hosts: [reviews]\nhttp: [{fault: {delay: {fixedDelay: 1s, percentage: {value: 150}}}, route: [{destination: {host: reviews}}]}]",
            "spec.http[0].fault.delay.percentage.value: 150 is not between 0 and 100",
        ),
        (
            "hosts: [reviews]\nhttp: [{route: [{destination: {host: api.example.com}}]}]",
            "spec.http[0].route[0].destination.host: \"api.example.com\" is not a Service of this cluster",
        ),
        (
            "hosts: [reviews]\nhttp: [{match: [{uri: {regex: '/v[0-9]'}}], rewrite: {uri: /}, route: [{destination: {host: reviews}}]}]",
            "spec.http[0].rewrite.uri: a rewrite of a route matched by a regular expression or with ignoreUriCase needs",
        ),
        (
            "hosts: [reviews]\nhttp: [{match: [{uri: {prefix: /a}, ignoreUriCase: true}], rewrite: {uri: /b}, route: [{destination: {host: reviews}}]}]",
            "spec.http[0].rewrite.uri: a rewrite of a route matched by a regular expression or with ignoreUriCase",
        ),
        ("hosts: [reviews]\nhttp: [{}]", "spec.http[0].route: a route needs a destination"),
        (
            "hosts: [reviews]\nhttp: [{route: [{destination: {host: a}, weight: 0}, {destination: {host: b}}]}]",
            "spec.http[0].route: every weight is 0",
        ),
    ] {
        let e = error(yaml);
        assert!(e.contains(says), "{yaml}\n  says {e:?}\n  not {says:?}");
    }
}

#[test]
fn durations_as_istio_writes_them() {
    for (s, ms) in [
        ("1s", 1000),
        ("0.5s", 500),
        ("250ms", 250),
        ("1m", 60_000),
        ("1h30m", 5_400_000),
        ("1500us", 2),
        ("0s", 0),
    ] {
        assert_eq!(duration_ms(s), Ok(ms), "{s}");
    }
    for s in ["", "5", "s", "1x", "-1s", "1.2.3s"] {
        assert!(duration_ms(s).is_err(), "{s}");
    }
}

#[test]
fn an_exact_match_rewrite_replaces_the_whole_path() {
    let route = vs(r#"
hosts: [reviews]
http:
- match: [{uri: {exact: /reviews/old}}]
  rewrite: {uri: /reviews/new}
  route: [{destination: {host: reviews}}]
"#)
    .route
    .unwrap();
    let table = ambit_core::route::RouteTable::new(vec![route]);
    let headers = http::HeaderMap::new();
    let selected = table
        .select(&ambit_core::route::RequestView {
            method: "GET",
            path: "/reviews/old",
            query: None,
            headers: &headers,
            authority: "reviews",
        })
        .unwrap();
    let rewrite = selected.rule.filters.rewrite.as_ref().unwrap();
    assert_eq!(
        rewrite
            .path
            .as_ref()
            .unwrap()
            .apply("/reviews/old", selected.matched_prefix),
        "/reviews/new"
    );
}
