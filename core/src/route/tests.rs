#![allow(clippy::unwrap_used)]
use super::*;

fn route(name: &str, created: i64, rules: Vec<RouteRule>) -> HttpRoute {
    HttpRoute {
        namespace: "shop".into(),
        name: name.into(),
        created,
        rules,
        grpc: false,
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
    };
    table
        .select(&request)
        .map_or("-".into(), |(_, rule)| rule.backends[0].name.clone())
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
