#![allow(clippy::unwrap_used)]
use super::*;

fn route(name: &str, created: i64, rules: Vec<RouteRule>) -> HttpRoute {
    HttpRoute {
        namespace: "shop".into(),
        name: name.into(),
        created,
        rules,
        grpc: false,
        virtual_service: false,
    }
}

fn rule(matches: Vec<RouteMatch>, backend: &str) -> RouteRule {
    RouteRule {
        matches,
        backends: vec![Backend {
            namespace: "shop".into(),
            name: backend.into(),
            port: None,
            weight: 1,
            subset: None,
        }],
        ..RouteRule::default()
    }
}

fn path(p: PathMatch) -> RouteMatch {
    RouteMatch {
        path: Some(p),
        ..RouteMatch::default()
    }
}

fn prefix(p: &str) -> RouteMatch {
    path(PathMatch::Prefix(p.into()))
}

fn exact(p: &str) -> RouteMatch {
    path(PathMatch::Exact(p.into()))
}

fn regex(p: &str) -> RouteMatch {
    path(PathMatch::Regex(Anchored::new(p).unwrap()))
}

/// The backend `method target` (with `headers`) is routed to, or `-`.
fn routed(table: &RouteTable, method: &str, target: &str, headers: &[(&str, &str)]) -> String {
    let mut map = http::HeaderMap::new();
    for (n, v) in headers {
        map.append(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let request = RequestView {
        method,
        path,
        query,
        headers: &map,
        authority: "shop.example:80",
    };
    table
        .select(&request)
        .map_or("-".into(), |s| s.rule.backends[0].name.clone())
}

#[test]
fn path_prefix_matches_whole_segments() {
    for (prefix, path, hit) in [
        ("/foo", "/foo", true),
        ("/foo", "/foo/", true),
        ("/foo", "/foo/bar", true),
        ("/foo", "/foobar", false),
        ("/foo/", "/foo", true),
        ("/foo/", "/foo/bar", true),
        ("/", "/anything", true),
        ("/", "/", true),
        ("/foo/bar", "/foo", false),
    ] {
        assert_eq!(prefix_matches(prefix, path), hit, "{prefix} vs {path}");
    }
}

#[test]
fn precedence_is_exact_then_longest_prefix_then_regex_then_method_headers_query() {
    let table = RouteTable::new(vec![route(
        "r",
        0,
        vec![
            rule(vec![regex("/api/.*")], "regex"),
            rule(vec![prefix("/")], "root"),
            rule(vec![prefix("/api")], "api"),
            rule(vec![prefix("/api/v2")], "v2"),
            rule(vec![exact("/api/v2/health")], "health"),
            rule(
                vec![RouteMatch {
                    method: Some("POST".into()),
                    ..prefix("/api")
                }],
                "api-post",
            ),
            rule(
                vec![RouteMatch {
                    headers: vec![HeaderMatch {
                        name: "x-canary".into(),
                        value: ValueMatch::Exact("yes".into()),
                    }],
                    ..prefix("/api")
                }],
                "api-canary",
            ),
            rule(
                vec![RouteMatch {
                    query: vec![QueryMatch {
                        name: "debug".into(),
                        value: ValueMatch::Regex(Anchored::new("1|true").unwrap()),
                    }],
                    ..prefix("/api")
                }],
                "api-debug",
            ),
        ],
    )]);
    for (method, target, headers, want) in [
        ("GET", "/api/v2/health", &[][..], "health"),
        ("GET", "/api/v2/healthz", &[], "v2"),
        ("GET", "/api/v1", &[], "api"),
        ("POST", "/api/v1", &[("x-canary", "yes")], "api-post"),
        ("GET", "/api/v1", &[("X-Canary", "yes")], "api-canary"),
        ("GET", "/api/v1", &[("x-canary", "no")], "api"),
        ("GET", "/api/v1?debug=true", &[], "api-debug"),
        ("GET", "/api/v1?debug=truest", &[], "api"),
        ("GET", "/other", &[], "root"),
        // A prefix beats a regex whatever their lengths.
        ("GET", "/apix/1", &[], "root"),
    ] {
        assert_eq!(
            routed(&table, method, target, headers),
            want,
            "{method} {target} {headers:?}"
        );
    }
}

#[test]
fn ties_go_to_the_older_route_then_by_name_then_in_written_order() {
    let same = |name: &str, created, backend: &str| {
        route(name, created, vec![rule(vec![prefix("/")], backend)])
    };
    let table = RouteTable::new(vec![same("b", 5, "newer"), same("z", 1, "older")]);
    assert_eq!(routed(&table, "GET", "/", &[]), "older");
    let table = RouteTable::new(vec![same("b", 1, "b"), same("a", 1, "a")]);
    assert_eq!(routed(&table, "GET", "/", &[]), "a");
    let table = RouteTable::new(vec![route(
        "r",
        0,
        vec![
            rule(vec![prefix("/")], "first"),
            rule(vec![prefix("/")], "second"),
        ],
    )]);
    assert_eq!(routed(&table, "GET", "/", &[]), "first");
}

#[test]
fn a_rule_without_matches_takes_everything_at_the_rank_of_prefix_root() {
    let table = RouteTable::new(vec![route(
        "r",
        0,
        vec![
            rule(vec![], "default"),
            rule(vec![prefix("/admin")], "admin"),
        ],
    )]);
    assert_eq!(routed(&table, "GET", "/admin/x", &[]), "admin");
    assert_eq!(routed(&table, "DELETE", "/x", &[]), "default");
    let none = RouteTable::new(vec![route("r", 0, vec![rule(vec![exact("/only")], "x")])]);
    assert_eq!(routed(&none, "GET", "/other", &[]), "-");
}

#[test]
fn any_match_of_a_rule_selects_it_and_all_conditions_of_a_match_are_needed() {
    let table = RouteTable::new(vec![route(
        "r",
        0,
        vec![rule(
            vec![
                RouteMatch {
                    method: Some("GET".into()),
                    headers: vec![HeaderMatch {
                        name: "x-user".into(),
                        value: ValueMatch::Regex(Anchored::new("a.*").unwrap()),
                    }],
                    ..exact("/a")
                },
                exact("/b"),
            ],
            "hit",
        )],
    )]);
    assert_eq!(routed(&table, "GET", "/a", &[("x-user", "alice")]), "hit");
    assert_eq!(routed(&table, "GET", "/a", &[("x-user", "bob")]), "-");
    assert_eq!(routed(&table, "POST", "/a", &[("x-user", "alice")]), "-");
    assert_eq!(routed(&table, "POST", "/b", &[]), "hit");
}

#[test]
fn a_regex_must_match_the_whole_value_and_a_bad_one_is_an_error() {
    let r = Anchored::new("/v[0-9]+").unwrap();
    assert!(r.is_match("/v12"));
    assert!(!r.is_match("/v12/x"));
    assert!(!r.is_match("x/v1"));
    assert!(Anchored::new("(unclosed").unwrap_err().contains("unclosed"));
    assert_eq!(
        Anchored::new("a{1000}{1000}").unwrap_err(),
        "too large once compiled"
    );
}

#[test]
fn weights_split_exactly_and_all_zero_is_none() {
    let mut r = rule(vec![], "v1");
    r.backends[0].weight = 90;
    r.backends.push(Backend {
        namespace: "shop".into(),
        name: "v2".into(),
        port: None,
        weight: 10,
        subset: None,
    });
    // Evenly spread randomness: exactly 90 % and 10 %.
    let mut counts = std::collections::BTreeMap::new();
    let n = 1000u64;
    // The middle of each of n equal slices of u64.
    let spread = |i: u64| ((u128::from(2 * i + 1) << 63) / u128::from(n)) as u64;
    for i in 0..n {
        let random = spread(i);
        *counts
            .entry(pick_backend(&r, random).unwrap().name.clone())
            .or_insert(0) += 1;
    }
    assert_eq!(counts["v1"], 900);
    assert_eq!(counts["v2"], 100);
    assert_eq!(pick_backend(&r, u64::MAX).unwrap().name, "v2");

    // 100/0 blue-green: never the 0.
    r.backends[0].weight = 100;
    r.backends[1].weight = 0;
    assert!((0..n).all(|i| pick_backend(&r, spread(i)).unwrap().name == "v1"));
    r.backends[0].weight = 0;
    assert_eq!(pick_backend(&r, 7), None);
    r.backends.clear();
    assert_eq!(pick_backend(&r, 7), None);
}

#[test]
fn replace_prefix_match_follows_the_gateway_apis_table() {
    // (matched prefix, request path, replacement, result)
    for (prefix, path, replacement, want) in [
        ("/foo", "/foo/bar", "/xyz", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo/bar", "/xyz/", "/xyz/bar"),
        ("/foo/", "/foo/bar", "/xyz", "/xyz/bar"),
        ("/foo", "/foo", "/", "/"),
        ("/foo", "/foo/", "/", "/"),
        ("/foo/", "/foo/bar", "/", "/bar"),
        ("/foo", "/foo/bar", "/", "/bar"),
        ("/foo", "/foo/", "/xyz", "/xyz/"),
        ("/", "/a/b", "/v2", "/v2/a/b"),
    ] {
        let got = PathModifier::Prefix(replacement.into()).apply(path, Some(prefix));
        assert_eq!(got, want, "{prefix} {path} -> {replacement}");
    }
    // A full replacement ignores the match; a prefix one without a prefix match
    // leaves the path.
    assert_eq!(PathModifier::Full("/x".into()).apply("/a/b", None), "/x");
    assert_eq!(
        PathModifier::Prefix("/x".into()).apply("/a/b", None),
        "/a/b"
    );
}

#[test]
fn the_prefix_a_request_matched_is_known_for_rewrites() {
    let table = RouteTable::new(vec![route(
        "r",
        0,
        vec![
            rule(vec![exact("/exact")], "a"),
            rule(vec![prefix("/api/")], "b"),
            rule(vec![], "c"),
        ],
    )]);
    let map = http::HeaderMap::new();
    let select = |path: &'static str| {
        table
            .select(&RequestView {
                method: "GET",
                path,
                query: None,
                headers: &map,
                authority: "",
            })
            .map(|s| s.matched_prefix)
    };
    assert_eq!(select("/exact"), Some(None));
    assert_eq!(select("/api/x"), Some(Some("/api/")));
    assert_eq!(select("/other"), Some(Some("/")));
}

#[test]
fn redirect_location() {
    let from = RedirectFrom {
        scheme: "http",
        host: "web.shop.svc.cluster.local",
        port: 8080,
        path: "/old/page",
        query: Some("a=1"),
        matched_prefix: Some("/old"),
    };
    let redirect = |scheme: Option<&str>, hostname: Option<&str>, port, path| Redirect {
        scheme: scheme.map(str::to_owned),
        hostname: hostname.map(str::to_owned),
        port,
        path,
        status: 302,
    };
    for (r, want) in [
        // Nothing changed but the path: the request's own port stays.
        (
            redirect(None, None, None, Some(PathModifier::Prefix("/new".into()))),
            "http://web.shop.svc.cluster.local:8080/new/page?a=1",
        ),
        // A scheme without a port: its well-known port, left out.
        (
            redirect(Some("https"), None, None, None),
            "https://web.shop.svc.cluster.local/old/page?a=1",
        ),
        (
            redirect(Some("http"), Some("example.com"), None, None),
            "http://example.com/old/page?a=1",
        ),
        (
            redirect(Some("https"), Some("example.com"), Some(8443), None),
            "https://example.com:8443/old/page?a=1",
        ),
        (
            redirect(None, None, Some(80), Some(PathModifier::Full("/".into()))),
            "http://web.shop.svc.cluster.local/?a=1",
        ),
        (
            redirect(None, Some("::1"), Some(81), None),
            "http://[::1]:81/old/page?a=1",
        ),
    ] {
        assert_eq!(r.location(&from), want, "{r:?}");
    }
}

#[test]
fn header_modifier_sets_adds_then_removes() {
    let mut headers = http::HeaderMap::new();
    headers.append("x-set", "old-1".parse().unwrap());
    headers.append("x-set", "old-2".parse().unwrap());
    headers.insert("x-add", "first".parse().unwrap());
    headers.insert("x-gone", "v".parse().unwrap());
    HeaderModifier {
        set: vec![
            ("x-set".into(), "new".into()),
            ("x-fresh".into(), "1".into()),
        ],
        add: vec![("x-add".into(), "second".into())],
        remove: vec!["x-gone".into(), "x-absent".into()],
    }
    .apply(&mut headers);
    let all = |name: &str| -> Vec<&str> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    };
    assert_eq!(all("x-set"), ["new"]);
    assert_eq!(all("x-fresh"), ["1"]);
    assert_eq!(all("x-add"), ["first", "second"]);
    assert!(all("x-gone").is_empty());
}

#[test]
fn mirror_share_and_shadow_host() {
    let mirror = |share_ppm| Mirror {
        backend: Backend {
            namespace: "shop".into(),
            name: "shadow".into(),
            port: None,
            weight: 1,
            subset: None,
        },
        share_ppm,
    };
    assert!(mirror(Mirror::ALL).sampled(u64::MAX));
    assert!(!mirror(0).sampled(0));
    let half = mirror(500_000);
    assert!(half.sampled(0));
    assert!(half.sampled(u64::MAX / 2 - 1_000_000_000));
    assert!(!half.sampled(u64::MAX / 2 + 1_000_000_000_000));
    let n = (0..10_000u64)
        .filter(|i| half.sampled(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .count();
    assert!((4_700..=5_300).contains(&n), "{n}");
    for (authority, want) in [
        (
            "web.shop.svc.cluster.local",
            "web.shop.svc.cluster.local-shadow",
        ),
        ("web:8080", "web-shadow:8080"),
        ("10.0.0.1:80", "10.0.0.1-shadow:80"),
        ("[fd00::1]:80", "[fd00::1]-shadow:80"),
        ("[fd00::1]", "[fd00::1]-shadow"),
    ] {
        assert_eq!(shadow_authority(authority), want);
    }
}

#[test]
fn a_virtual_service_keeps_the_order_written_and_matches_string_prefixes_and_authority() {
    let vs = |name: &str, created: i64, rules: Vec<RouteRule>| HttpRoute {
        virtual_service: true,
        ..route(name, created, rules)
    };
    let header = |name: &str, value: ValueMatch| RouteMatch {
        headers: vec![HeaderMatch {
            name: name.into(),
            value,
        }],
        ..RouteMatch::default()
    };
    let table = RouteTable::new(vec![
        vs(
            "second",
            2,
            vec![rule(vec![exact("/exact")], "never-first")],
        ),
        vs(
            "first",
            1,
            vec![
                // Written first: takes /api/x although a longer exact match follows.
                rule(vec![path(PathMatch::StartsWith("/api".into()))], "api"),
                rule(vec![exact("/api/x")], "shadowed"),
                rule(
                    vec![header("x-canary", ValueMatch::Prefix("tr".into()))],
                    "canary",
                ),
                rule(
                    vec![RouteMatch {
                        authority: Some(ValueMatch::Exact("shop.example:80".into())),
                        ..RouteMatch::default()
                    }],
                    "by-authority",
                ),
            ],
        ),
    ]);
    assert_eq!(routed(&table, "GET", "/api/x", &[]), "api");
    assert_eq!(
        routed(&table, "GET", "/apiv2", &[]),
        "api",
        "a string prefix"
    );
    assert_eq!(
        routed(&table, "GET", "/x", &[("x-canary", "true")]),
        "canary"
    );
    assert_eq!(
        routed(&table, "GET", "/x", &[("x-canary", "false")]),
        "by-authority"
    );
    // The older VirtualService's rules come first.
    assert_eq!(routed(&table, "GET", "/exact", &[]), "by-authority");
}
