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
            "spec.rules[0].filters[0].requestMirror: is required",
        ),
        (
            json!({"filters": [{"type": "ExtensionRef", "extensionRef": {"group": "x", "kind": "Y", "name": "z"}}]}),
            "ExtensionRef filters are not supported",
        ),
        (
            json!({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {}, "urlRewrite": {}}]}),
            "filters[0].urlRewrite: must not be set for type RequestHeaderModifier",
        ),
        (
            json!({"filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {}},
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {}}]}),
            "filters[1]: a rule may have one RequestHeaderModifier filter",
        ),
        (
            json!({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "bad name", "value": "v"}]}}]}),
            "requestHeaderModifier.set[0].name: \"bad name\" is not a valid header name",
        ),
        (
            json!({"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"add": [{"name": "Host", "value": "v"}]}}]}),
            "may not be modified by a filter",
        ),
        (
            json!({"filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "a", "value": "1"}, {"name": "A", "value": "2"}]}}]}),
            "set[1].name: \"a\" is listed twice",
        ),
        (
            json!({"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 304}}]}),
            "statusCode: 304 is not 301",
        ),
        (
            json!({"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "ftp"}}]}),
            "scheme: \"ftp\" is not http or https",
        ),
        (
            json!({"filters": [
                {"type": "RequestRedirect", "requestRedirect": {}},
                {"type": "URLRewrite", "urlRewrite": {}}]}),
            "RequestRedirect and URLRewrite may not both be used",
        ),
        (
            json!({"matches": [{"path": {"type": "Exact", "value": "/a"}}],
                   "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}}}]}),
            "ReplacePrefixMatch needs the rule to have exactly one match, of type PathPrefix",
        ),
        (
            json!({"filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "*.example.com"}}]}),
            "urlRewrite.hostname: \"*.example.com\" is not a hostname",
        ),
        (
            json!({"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 80}, "percent": 101}}]}),
            "requestMirror.percent: 101",
        ),
        (
            json!({"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 80}, "percent": 5, "fraction": {"numerator": 1}}}]}),
            "percent and fraction may not both be set",
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
        authority: "reviews",
    };
    let rule = table.select(&view).unwrap().rule;
    assert_eq!(rule.backends[0].name, "reviews-v2");
    let plain = http::HeaderMap::new();
    let rule = table
        .select(&ambit_core::route::RequestView {
            headers: &plain,
            ..view
        })
        .unwrap()
        .rule;
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
            authority: "reviews",
        };
        table
            .select(&view)
            .map_or("-".to_owned(), |s| s.rule.backends[0].name.clone())
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

#[test]
fn filters_read_with_the_crds_defaults() {
    let mut spec = canary();
    spec["rules"] = json!([
        {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
         "filters": [
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                "set": [{"name": "X-Set", "value": "1"}],
                "add": [{"name": "x-add", "value": "2"}],
                "remove": ["X-Gone"]}},
            {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                "set": [{"name": "x-served-by", "value": "ambit"}]}},
            {"type": "URLRewrite", "urlRewrite": {
                "hostname": "reviews.internal",
                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}},
            {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 9080}, "percent": 25}},
            {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow2", "namespace": "qa", "port": 80}, "fraction": {"numerator": 1, "denominator": 3}}},
         ],
         "backendRefs": [{"name": "reviews-v1", "port": 9080}]},
        {"matches": [{"path": {"type": "Exact", "value": "/moved"}}],
         "filters": [{"type": "RequestRedirect", "requestRedirect": {
             "scheme": "https", "path": {"type": "ReplaceFullPath", "replaceFullPath": "/here"}}}]},
    ]);
    let route = read_spec(spec).route.unwrap();
    let f = &route.rules[0].filters;
    let request = f.request_headers.as_ref().unwrap();
    assert_eq!(request.set, [("x-set".to_owned(), "1".to_owned())]);
    assert_eq!(request.add, [("x-add".to_owned(), "2".to_owned())]);
    assert_eq!(request.remove, ["x-gone"]);
    assert_eq!(
        f.response_headers.as_ref().unwrap().set,
        [("x-served-by".to_owned(), "ambit".to_owned())]
    );
    let rewrite = f.rewrite.as_ref().unwrap();
    assert_eq!(rewrite.hostname.as_deref(), Some("reviews.internal"));
    assert_eq!(
        rewrite.path,
        Some(ambit_core::route::PathModifier::Prefix("/new".into()))
    );
    assert_eq!(f.mirrors.len(), 2);
    assert_eq!(f.mirrors[0].share_ppm, 250_000);
    assert_eq!(f.mirrors[0].backend.name, "shadow");
    assert_eq!(f.mirrors[0].backend.namespace, "shop");
    assert_eq!(f.mirrors[1].share_ppm, 333_333);
    assert_eq!(f.mirrors[1].backend.namespace, "qa");
    let redirect = route.rules[1].filters.redirect.as_ref().unwrap();
    assert_eq!(redirect.status, 302, "the CRD's default");
    assert_eq!(redirect.scheme.as_deref(), Some("https"));
    assert!(route.rules[1].backends.is_empty());
}

#[test]
fn grpc_routes_take_header_modifiers_and_mirrors_only() {
    let route = GrpcRoute {
        spec: json!({
            "parentRefs": [{"group": "", "kind": "Service", "name": "greeter", "port": 50051}],
            "rules": [{"filters": [{"type": "URLRewrite", "urlRewrite": {}}]}],
        }),
        ..GrpcRoute::default()
    };
    let err = read_grpc(&ObjectKey::new("shop", "g"), &route)
        .route
        .unwrap_err();
    assert!(err.contains("\"URLRewrite\" is not one of RequestHeaderModifier, ResponseHeaderModifier, RequestMirror"), "{err}");
}

#[test]
fn retry_reads_attempts_codes_and_backoff() {
    let mut spec = canary();
    spec["rules"][0]["retry"] = json!({"attempts": 3, "codes": [500, 503], "backoff": "100ms"});
    let route = read_spec(spec.clone()).route.unwrap();
    assert_eq!(
        route.rules[0].retry,
        Some(ambit_core::route::RouteRetry {
            attempts: 3,
            codes: vec![500, 503],
            backoff_ms: Some(100),
            retry_on: None,
        })
    );
    assert_eq!(route.rules[1].retry, None, "the mesh's default");
    for (retry, want) in [
        (
            json!({"codes": [200]}),
            "retry.codes[0]: 200 is not between 400 and 599",
        ),
        (json!({"attempts": -1}), "retry.attempts: -1"),
        (
            json!({"backoff": "soon"}),
            "retry.backoff: \"soon\" is not a duration",
        ),
    ] {
        spec["rules"][0]["retry"] = retry;
        let err = read_spec(spec.clone()).route.unwrap_err();
        assert!(err.contains(want), "{err}");
    }
}
