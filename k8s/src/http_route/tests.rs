#![allow(clippy::unwrap_used)]
use super::*;
use serde_json::json;

fn read_spec(spec: Value) -> ReadRoute {
    let route = HttpRoute {
        spec,
        ..HttpRoute::default()
    };
    read(&ObjectKey::new("shop", "canary"), &route)
}

fn canary() -> Value {
    json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
        "rules": [
            {"matches": [{"headers": [{"name": "X-Tag", "value": "v2"}]}],
             "backendRefs": [{"name": "reviews-v2", "port": 9080}]},
            {"backendRefs": [
                {"name": "reviews-v1", "port": 9080, "weight": 90},
                {"name": "reviews-v2", "port": 9080, "weight": 10}]}
        ]
    })
}

#[test]
fn a_canary_route_reads_with_the_crds_defaults() {
    let read = read_spec(canary());
    assert_eq!(
        read.parents,
        [RouteParent {
            kind: ParentKind::Service,
            namespace: "shop".into(),
            name: "reviews".into(),
            port: Some(9080),
        }]
    );
    let route = read.route.unwrap();
    assert_eq!(route.rules.len(), 2);
    let tagged = &route.rules[0].matches[0];
    assert!(
        matches!(&tagged.path, Some(PathMatch::Prefix(p)) if p == "/"),
        "{tagged:?}"
    );
    assert_eq!(tagged.headers[0].name, "x-tag");
    assert!(matches!(&tagged.headers[0].value, ValueMatch::Exact(v) if v == "v2"));
    assert_eq!(route.rules[0].backends[0].weight, 1);
    assert_eq!(route.rules[1].backends[1].weight, 10);
    assert_eq!(route.rules[1].backends[1].namespace, "shop");
    assert!(route.rules[1].matches.is_empty());
}

#[test]
fn a_gateway_parent_is_left_to_its_controller_and_other_kinds_are_refused() {
    let mut spec = canary();
    spec["parentRefs"] = json!([{"name": "ingress"}]);
    let read = read_spec(spec.clone());
    assert!(read.parents.is_empty());
    assert!(read.route.is_ok());
    spec["parentRefs"] = json!([{"kind": "Pod", "group": "", "name": "x"}]);
    assert!(read_spec(spec)
        .route
        .unwrap_err()
        .contains("spec.parentRefs[0]: /Pod"));
}

#[test]
fn what_cannot_be_enforced_is_refused_naming_the_field() {
    let cases = [
        (
            json!({"matches": [{"path": {"type": "RegularExpression", "value": "(unclosed"}}]}),
            "spec.rules[0].matches[0].path.value",
        ),
        (
            json!({"matches": [{"path": {"type": "Exact", "value": "relative"}}]}),
            "must be an absolute path",
        ),
        (
            json!({"matches": [{"path": {"type": "PathPrefix", "value": "/a//b"}}]}),
            "'//'",
        ),
        (
            json!({"matches": [{"path": {"type": "PathPrefix", "value": "/a/../b"}}]}),
            "'/../'",
        ),
        (
            json!({"matches": [{"path": {"type": "Glob", "value": "/a"}}]}),
            "spec.rules[0].matches[0].path.type",
        ),
        (
            json!({"matches": [{"method": "FETCH"}]}),
            "spec.rules[0].matches[0].method",
        ),
        (
            json!({"matches": [{"headers": [{"name": "bad name", "value": "x"}]}]}),
            "headers[0].name",
        ),
        (
            json!({"matches": [{"headers": [{"name": "a", "value": "x"}, {"name": "A", "value": "y"}]}]}),
            "matched twice",
        ),
        (
            json!({"matches": [{"queryParams": [{"name": "q"}]}]}),
            "queryParams[0].value: is required",
        ),
        (
            json!({"backendRefs": [{"name": "v1", "port": 80, "weight": -1}]}),
            "backendRefs[0].weight: -1",
        ),
        (
            json!({"backendRefs": [{"name": "v1", "port": 80, "weight": 1_000_001}]}),
            "weight: 1000001",
        ),
        (
            json!({"backendRefs": [{"name": "v1"}]}),
            "backendRefs[0].port: is required",
        ),
        (
            json!({"backendRefs": [{"name": "v1", "port": 0}]}),
            "port: 0",
        ),
        (
            json!({"backendRefs": [{"kind": "Bucket", "group": "s3", "name": "v1", "port": 80}]}),
            "s3/Bucket",
        ),
        (
            json!({"filters": [{"type": "RequestMirror"}]}),
            "spec.rules[0].filters: not supported",
        ),
        (
            json!({"timeouts": {"request": "1 s"}}),
            "spec.rules[0].timeouts.request: \"1 s\" is not a duration",
        ),
        (
            json!({"timeouts": {"request": "1s", "backendRequest": "2s"}}),
            "backendRequest: may not be longer",
        ),
        (
            json!({"timeouts": {"request": "123456s"}}),
            "timeouts.request",
        ),
        (json!("rule"), "spec.rules[0]: must be an object"),
    ];
    for (rule, want) in cases {
        let mut spec = canary();
        spec["rules"] = json!([rule]);
        let err = read_spec(spec.clone()).route.unwrap_err();
        assert!(err.contains(want), "{spec}: {err}");
    }
    let mut spec = canary();
    spec["rules"] = json!(vec![json!({}); 17]);
    assert!(read_spec(spec).route.unwrap_err().contains("at most 16"));
}

#[test]
fn a_read_route_routes_like_the_core_table() {
    let route = read_spec(canary()).route.unwrap();
    let table = ambit_core::route::RouteTable::new(vec![route]);
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tag", "v2".parse().unwrap());
    let view = ambit_core::route::RequestView {
        method: "GET",
        path: "/reviews/1",
        query: None,
        headers: &headers,
    };
    let (_, rule) = table.select(&view).unwrap();
    assert_eq!(rule.backends[0].name, "reviews-v2");
    let plain = http::HeaderMap::new();
    let (_, rule) = table
        .select(&ambit_core::route::RequestView {
            headers: &plain,
            ..view
        })
        .unwrap();
    assert_eq!(rule.backends.len(), 2);
}

fn read_grpc_spec(spec: Value) -> ReadRoute {
    let route = GrpcRoute {
        spec,
        ..GrpcRoute::default()
    };
    read_grpc(&ObjectKey::new("shop", "grpc"), &route)
}

#[test]
fn a_grpc_route_routes_by_service_and_method_as_paths() {
    let read = read_grpc_spec(json!({
        "parentRefs": [{"group": "", "kind": "Service", "name": "greeter"}],
        "rules": [
            {"matches": [{"method": {"service": "helloworld.Greeter", "method": "SayHello"}}],
             "backendRefs": [{"name": "v2", "port": 50051}]},
            {"matches": [{"method": {"service": "helloworld.Greeter"}}],
             "backendRefs": [{"name": "v1", "port": 50051}]},
            {"matches": [{"method": {"method": "Watch"}, "headers": [{"name": "x-user", "value": "bob"}]}],
             "backendRefs": [{"name": "watch", "port": 50051}]},
            {"matches": [{"method": {"type": "RegularExpression", "service": "admin\\..*"}}],
             "backendRefs": [{"name": "admin", "port": 50051}]},
        ]
    }));
    let table = ambit_core::route::RouteTable::new(vec![read.route.unwrap()]);
    let route = |path: &str, user: Option<&str>| {
        let mut headers = http::HeaderMap::new();
        if let Some(u) = user {
            headers.insert("x-user", u.parse().unwrap());
        }
        let view = ambit_core::route::RequestView {
            method: "POST",
            path,
            query: None,
            headers: &headers,
        };
        table
            .select(&view)
            .map_or("-".to_owned(), |(_, r)| r.backends[0].name.clone())
    };
    assert_eq!(route("/helloworld.Greeter/SayHello", None), "v2");
    assert_eq!(route("/helloworld.Greeter/SayGoodbye", None), "v1");
    assert_eq!(route("/other.Svc/Watch", Some("bob")), "watch");
    assert_eq!(route("/other.Svc/Watch", None), "-");
    assert_eq!(route("/admin.Users/Delete", None), "admin");
    assert_eq!(route("/other.Svc/Get", None), "-");
}

#[test]
fn a_grpc_match_that_cannot_be_enforced_is_refused_naming_the_field() {
    for (m, want) in [
        (
            json!({"method": {}}),
            "one of service and method is required",
        ),
        (
            json!({"method": {"service": "a/b"}}),
            "matches[0].method.service",
        ),
        (
            json!({"method": {"type": "RegularExpression", "method": "("}}),
            "matches[0].method.method",
        ),
        (
            json!({"method": {"type": "Prefix", "service": "a"}}),
            "method.type",
        ),
    ] {
        let read = read_grpc_spec(json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "greeter"}],
            "rules": [{"matches": [m.clone()], "backendRefs": [{"name": "v1", "port": 1}]}]
        }));
        let err = read.route.unwrap_err();
        assert!(err.contains(want), "{m}: {err}");
    }
}

#[test]
fn timeouts_read_as_gateway_api_durations() {
    let mut spec = canary();
    spec["rules"][1]["timeouts"] = json!({"request": "1m30s", "backendRequest": "500ms"});
    spec["rules"][0]["timeouts"] = json!({"request": "0s"});
    let route = read_spec(spec).route.unwrap();
    assert_eq!(route.rules[1].request_timeout_ms, Some(90_000));
    assert_eq!(route.rules[1].backend_timeout_ms, Some(500));
    assert_eq!(
        route.rules[1].timeout(),
        Some(std::time::Duration::from_millis(500))
    );
    assert_eq!(route.rules[0].timeout(), None, "0s: no timeout");
    assert_eq!(gateway_duration("1h"), Ok(3_600_000));
    assert!(gateway_duration("1h2m3s4ms5s").is_err(), "at most 4 parts");
    assert!(gateway_duration("").is_err());
    assert!(gateway_duration("10").is_err());
}
