//! HTTPRoutes as xDS resources, both ways: an [`HttpRouteSpec`] becomes an
//! [`HttpRoute`] named `httproute/<namespace>/<name>`, and a received one is read back
//! with its regular expressions compiled again, so a pattern the control plane could
//! not have sent (one that does not compile, or compiles too large) rejects that
//! resource alone.

use ambit_core::model::{HttpRouteSpec, RouteParentSpec};
use ambit_core::route::{
    self, Anchored, Backend, Filters, HeaderMatch, HeaderModifier, Mirror, PathMatch, PathModifier,
    QueryMatch, Redirect, Rewrite, RouteMatch, RouteRule, ValueMatch,
};
use ambit_proto::workload::{
    route_abort, route_match, route_path_modifier, route_value_match, HttpRoute, RouteAbort,
    RouteBackend, RouteDelay, RouteFault, RouteFilters, RouteHeader, RouteHeaderModifier,
    RouteMirror, RouteParent, RoutePathModifier, RouteRedirect, RouteRetryOn, RouteRewrite,
    RouteValueMatch,
};

/// The resource name of an HTTPRoute (`httproute/...`) or a GRPCRoute
/// (`grpcroute/...`).
pub fn route_name(route: &route::HttpRoute) -> String {
    let kind = if route.virtual_service {
        "virtualservice"
    } else if route.grpc {
        "grpcroute"
    } else {
        "httproute"
    };
    format!("{kind}/{}/{}", route.namespace, route.name)
}

pub fn route_to_proto(spec: &HttpRouteSpec) -> HttpRoute {
    let r = &spec.route;
    let value = |v: &ValueMatch| match v {
        ValueMatch::Exact(s) => route_value_match::Value::Exact(s.clone()),
        ValueMatch::Regex(a) => route_value_match::Value::Regex(a.source.clone()),
        ValueMatch::Prefix(s) => route_value_match::Value::Prefix(s.clone()),
    };
    HttpRoute {
        virtual_service: r.virtual_service,
        name: r.name.clone(),
        namespace: r.namespace.clone(),
        created: r.created,
        grpc: r.grpc,
        parents: spec
            .parents
            .iter()
            .map(|p| RouteParent {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                port: p.port.map_or(0, u32::from),
            })
            .collect(),
        rules: r
            .rules
            .iter()
            .map(|rule| ambit_proto::workload::RouteRule {
                matches: rule
                    .matches
                    .iter()
                    .map(|m| ambit_proto::workload::RouteMatch {
                        path: m.path.as_ref().map(|p| match p {
                            PathMatch::Exact(s) => route_match::Path::Exact(s.clone()),
                            PathMatch::Prefix(s) => route_match::Path::Prefix(s.clone()),
                            PathMatch::Regex(a) => route_match::Path::Regex(a.source.clone()),
                            PathMatch::StartsWith(s) => route_match::Path::StartsWith(s.clone()),
                        }),
                        authority: m.authority.as_ref().map(|a| RouteValueMatch {
                            name: String::new(),
                            value: Some(value(a)),
                        }),
                        method: m.method.clone().unwrap_or_default(),
                        headers: m
                            .headers
                            .iter()
                            .map(|h| RouteValueMatch {
                                name: h.name.clone(),
                                value: Some(value(&h.value)),
                            })
                            .collect(),
                        query_params: m
                            .query
                            .iter()
                            .map(|q| RouteValueMatch {
                                name: q.name.clone(),
                                value: Some(value(&q.value)),
                            })
                            .collect(),
                    })
                    .collect(),
                request_timeout_ms: rule.request_timeout_ms.unwrap_or(0),
                backend_timeout_ms: rule.backend_timeout_ms.unwrap_or(0),
                backends: rule.backends.iter().map(backend_to_proto).collect(),
                filters: (!rule.filters.is_empty()).then(|| filters_to_proto(&rule.filters)),
                retry: rule
                    .retry
                    .as_ref()
                    .map(|r| ambit_proto::workload::RouteRetry {
                        attempts: r.attempts,
                        codes: r.codes.iter().map(|c| u32::from(*c)).collect(),
                        backoff_ms: r.backoff_ms.unwrap_or(0),
                        retry_on: r.retry_on.as_ref().map(|c| RouteRetryOn {
                            conditions: c.clone(),
                        }),
                    }),
                fault: rule.fault.as_ref().map(fault_to_proto),
            })
            .collect(),
    }
}

fn backend_to_proto(b: &Backend) -> RouteBackend {
    RouteBackend {
        namespace: b.namespace.clone(),
        name: b.name.clone(),
        port: b.port.map_or(0, u32::from),
        weight: b.weight,
        subset: b.subset.clone().unwrap_or_default(),
    }
}

fn backend_from_proto(b: &RouteBackend, what: &str) -> Result<Backend, String> {
    Ok(Backend {
        namespace: b.namespace.clone(),
        name: b.name.clone(),
        port: port(b.port, what)?,
        weight: b.weight,
        subset: (!b.subset.is_empty()).then(|| b.subset.clone()),
    })
}

fn filters_to_proto(f: &Filters) -> RouteFilters {
    let headers = |m: &HeaderModifier| RouteHeaderModifier {
        set: m.set.iter().map(header).collect(),
        add: m.add.iter().map(header).collect(),
        remove: m.remove.clone(),
    };
    let path = |p: &PathModifier| RoutePathModifier {
        path: Some(match p {
            PathModifier::Full(s) => route_path_modifier::Path::Full(s.clone()),
            PathModifier::Prefix(s) => route_path_modifier::Path::Prefix(s.clone()),
        }),
    };
    RouteFilters {
        request_headers: f.request_headers.as_ref().map(headers),
        response_headers: f.response_headers.as_ref().map(headers),
        redirect: f.redirect.as_ref().map(|r| RouteRedirect {
            scheme: r.scheme.clone().unwrap_or_default(),
            hostname: r.hostname.clone().unwrap_or_default(),
            path: r.path.as_ref().map(path),
            port: r.port.map_or(0, u32::from),
            status: u32::from(r.status),
        }),
        rewrite: f.rewrite.as_ref().map(|r| RouteRewrite {
            hostname: r.hostname.clone().unwrap_or_default(),
            path: r.path.as_ref().map(path),
        }),
        mirrors: f
            .mirrors
            .iter()
            .map(|m| RouteMirror {
                backend: Some(backend_to_proto(&m.backend)),
                share_ppm: m.share_ppm,
            })
            .collect(),
    }
}

fn header((name, value): &(String, String)) -> RouteHeader {
    RouteHeader {
        name: name.clone(),
        value: value.clone(),
    }
}

/// Read back with the checks a header name and value need to be applied, so a
/// resource that could not be applied is rejected whole rather than in part.
fn filters_from_proto(f: &RouteFilters, at: &str) -> Result<Filters, String> {
    let pairs = |list: &[RouteHeader]| -> Result<Vec<(String, String)>, String> {
        list.iter()
            .map(|h| {
                http::HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| format!("{at}: header name {:?} is not valid", h.name))?;
                http::HeaderValue::from_str(&h.value)
                    .map_err(|_| format!("{at}: header value {:?} is not valid", h.value))?;
                Ok((h.name.to_ascii_lowercase(), h.value.clone()))
            })
            .collect()
    };
    let headers = |m: &RouteHeaderModifier| -> Result<HeaderModifier, String> {
        Ok(HeaderModifier {
            set: pairs(&m.set)?,
            add: pairs(&m.add)?,
            remove: m.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
        })
    };
    let path = |p: &RoutePathModifier| -> Result<PathModifier, String> {
        match &p.path {
            Some(route_path_modifier::Path::Full(s)) => Ok(PathModifier::Full(s.clone())),
            Some(route_path_modifier::Path::Prefix(s)) => Ok(PathModifier::Prefix(s.clone())),
            None => Err(format!("{at}: a path modifier without a path")),
        }
    };
    let text = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    Ok(Filters {
        request_headers: f.request_headers.as_ref().map(headers).transpose()?,
        response_headers: f.response_headers.as_ref().map(headers).transpose()?,
        redirect: f
            .redirect
            .as_ref()
            .map(|r| -> Result<Redirect, String> {
                let status = match r.status {
                    s @ (301 | 302 | 303 | 307 | 308) => s as u16,
                    other => return Err(format!("{at}: redirect status {other}")),
                };
                Ok(Redirect {
                    scheme: text(&r.scheme),
                    hostname: text(&r.hostname),
                    path: r.path.as_ref().map(path).transpose()?,
                    port: port(r.port, at)?,
                    status,
                })
            })
            .transpose()?,
        rewrite: f
            .rewrite
            .as_ref()
            .map(|r| -> Result<Rewrite, String> {
                Ok(Rewrite {
                    hostname: text(&r.hostname),
                    path: r.path.as_ref().map(path).transpose()?,
                })
            })
            .transpose()?,
        mirrors: f
            .mirrors
            .iter()
            .map(|m| {
                let backend = m
                    .backend
                    .as_ref()
                    .ok_or_else(|| format!("{at}: a mirror without a backend"))?;
                Ok(Mirror {
                    backend: backend_from_proto(backend, at)?,
                    share_ppm: m.share_ppm.min(Mirror::ALL),
                })
            })
            .collect::<Result<_, String>>()?,
    })
}

fn port(p: u32, what: &str) -> Result<Option<u16>, String> {
    match p {
        0 => Ok(None),
        p => u16::try_from(p)
            .map(Some)
            .map_err(|_| format!("{what}: port {p} is out of range")),
    }
}

fn value(v: &RouteValueMatch, what: &str) -> Result<ValueMatch, String> {
    match &v.value {
        Some(route_value_match::Value::Exact(s)) => Ok(ValueMatch::Exact(s.clone())),
        Some(route_value_match::Value::Regex(s)) => Anchored::new(s)
            .map(ValueMatch::Regex)
            .map_err(|e| format!("{what}: regex {s:?}: {e}")),
        Some(route_value_match::Value::Prefix(s)) => Ok(ValueMatch::Prefix(s.clone())),
        None => Err(format!("{what}: no value match")),
    }
}

pub fn route_from_proto(r: &HttpRoute) -> Result<HttpRouteSpec, String> {
    let kind = if r.virtual_service {
        "VirtualService"
    } else if r.grpc {
        "GRPCRoute"
    } else {
        "HTTPRoute"
    };
    let key = format!("{kind} {}/{}", r.namespace, r.name);
    let parents = r
        .parents
        .iter()
        .map(|p| {
            Ok(RouteParentSpec {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                port: port(p.port, &key)?,
            })
        })
        .collect::<Result<_, String>>()?;
    let mut rules = Vec::new();
    for (i, rule) in r.rules.iter().enumerate() {
        let at = format!("{key} rule {i}");
        let mut matches = Vec::new();
        for m in &rule.matches {
            let path = match &m.path {
                None => None,
                Some(route_match::Path::Exact(s)) => Some(PathMatch::Exact(s.clone())),
                Some(route_match::Path::Prefix(s)) => Some(PathMatch::Prefix(s.clone())),
                Some(route_match::Path::Regex(s)) => Some(PathMatch::Regex(
                    Anchored::new(s).map_err(|e| format!("{at}: regex {s:?}: {e}"))?,
                )),
                Some(route_match::Path::StartsWith(s)) => Some(PathMatch::StartsWith(s.clone())),
            };
            matches.push(RouteMatch {
                path,
                method: (!m.method.is_empty()).then(|| m.method.clone()),
                headers: m
                    .headers
                    .iter()
                    .map(|h| {
                        Ok(HeaderMatch {
                            name: h.name.to_ascii_lowercase(),
                            value: value(h, &at)?,
                        })
                    })
                    .collect::<Result<_, String>>()?,
                query: m
                    .query_params
                    .iter()
                    .map(|q| {
                        Ok(QueryMatch {
                            name: q.name.clone(),
                            value: value(q, &at)?,
                        })
                    })
                    .collect::<Result<_, String>>()?,
                authority: m.authority.as_ref().map(|a| value(a, &at)).transpose()?,
            });
        }
        let backends = rule
            .backends
            .iter()
            .map(|b| backend_from_proto(b, &at))
            .collect::<Result<_, String>>()?;
        rules.push(RouteRule {
            matches,
            backends,
            request_timeout_ms: (rule.request_timeout_ms > 0).then_some(rule.request_timeout_ms),
            backend_timeout_ms: (rule.backend_timeout_ms > 0).then_some(rule.backend_timeout_ms),
            filters: match &rule.filters {
                Some(f) => filters_from_proto(f, &at)?,
                None => Filters::default(),
            },
            retry: match &rule.retry {
                None => None,
                Some(r) => Some(route::RouteRetry {
                    attempts: r.attempts,
                    codes: r
                        .codes
                        .iter()
                        .map(|c| match u16::try_from(*c) {
                            Ok(c) if (400..600).contains(&c) => Ok(c),
                            _ => Err(format!("{at}: retry code {c} is not between 400 and 599")),
                        })
                        .collect::<Result<_, String>>()?,
                    backoff_ms: (r.backoff_ms > 0).then_some(r.backoff_ms),
                    retry_on: match &r.retry_on {
                        None => None,
                        Some(on) => {
                            ambit_core::retry::RetryPolicy::from_retry_on(
                                r.attempts,
                                &on.conditions,
                            )
                            .map_err(|e| format!("{at}: retryOn: {e}"))?;
                            Some(on.conditions.clone())
                        }
                    },
                }),
            },
            fault: rule
                .fault
                .as_ref()
                .map(|f| fault_from_proto(f, &at))
                .transpose()?,
        });
    }
    Ok(HttpRouteSpec {
        parents,
        route: route::HttpRoute {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            created: r.created,
            rules,
            grpc: r.grpc,
            virtual_service: r.virtual_service,
        },
    })
}

fn fault_to_proto(f: &route::Fault) -> RouteFault {
    RouteFault {
        delay: f.delay.as_ref().map(|d| RouteDelay {
            fixed_delay_ms: d.fixed_delay_ms,
            share_ppm: d.share_ppm,
        }),
        abort: f.abort.as_ref().map(|a| RouteAbort {
            status: match (a.http_status, a.grpc_status) {
                (Some(s), _) => Some(route_abort::Status::HttpStatus(u32::from(s))),
                (None, Some(g)) => Some(route_abort::Status::GrpcStatus(g)),
                (None, None) => None,
            },
            share_ppm: a.share_ppm,
        }),
    }
}

fn fault_from_proto(f: &RouteFault, at: &str) -> Result<route::Fault, String> {
    Ok(route::Fault {
        delay: f.delay.as_ref().map(|d| route::Delay {
            fixed_delay_ms: d.fixed_delay_ms,
            share_ppm: d.share_ppm.min(route::ALL_PPM),
        }),
        abort: f
            .abort
            .as_ref()
            .map(|a| {
                let (http_status, grpc_status) = match a.status {
                    Some(route_abort::Status::HttpStatus(s)) => match u16::try_from(s) {
                        Ok(s) if (200..600).contains(&s) => (Some(s), None),
                        _ => return Err(format!("{at}: fault abort status {s}")),
                    },
                    Some(route_abort::Status::GrpcStatus(g)) if g < 17 => (None, Some(g)),
                    Some(route_abort::Status::GrpcStatus(g)) => {
                        return Err(format!("{at}: fault abort gRPC status {g}"))
                    }
                    None => return Err(format!("{at}: a fault abort without a status")),
                };
                Ok(route::Abort {
                    http_status,
                    grpc_status,
                    share_ppm: a.share_ppm.min(route::ALL_PPM),
                })
            })
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> HttpRouteSpec {
        HttpRouteSpec {
            parents: vec![RouteParentSpec {
                namespace: "shop".into(),
                name: "reviews".into(),
                port: Some(9080),
            }],
            route: route::HttpRoute {
                namespace: "shop".into(),
                name: "canary".into(),
                created: 1_700_000_000,
                grpc: false,
                virtual_service: false,
                rules: vec![
                    RouteRule {
                        matches: vec![RouteMatch {
                            path: Some(PathMatch::Regex(Anchored::new("/v[0-9]+/.*").unwrap())),
                            method: Some("GET".into()),
                            headers: vec![HeaderMatch {
                                name: "x-tag".into(),
                                value: ValueMatch::Exact("v2".into()),
                            }],
                            query: vec![QueryMatch {
                                name: "debug".into(),
                                value: ValueMatch::Regex(Anchored::new("1|true").unwrap()),
                            }],
                            authority: None,
                        }],
                        backends: vec![Backend {
                            namespace: "shop".into(),
                            name: "reviews-v2".into(),
                            port: Some(9080),
                            weight: 1,
                            subset: None,
                        }],
                        request_timeout_ms: None,
                        backend_timeout_ms: Some(250),
                        filters: Filters {
                            request_headers: Some(HeaderModifier {
                                set: vec![("x-set".into(), "1".into())],
                                add: vec![("x-add".into(), "2".into())],
                                remove: vec!["x-gone".into()],
                            }),
                            response_headers: Some(HeaderModifier::default()),
                            redirect: None,
                            rewrite: Some(Rewrite {
                                hostname: Some("reviews.internal".into()),
                                path: Some(PathModifier::Prefix("/v2".into())),
                            }),
                            mirrors: vec![Mirror {
                                backend: Backend {
                                    namespace: "qa".into(),
                                    name: "shadow".into(),
                                    port: Some(80),
                                    weight: 1,
                                    subset: None,
                                },
                                share_ppm: 250_000,
                            }],
                        },
                        retry: None,
                        fault: None,
                    },
                    RouteRule {
                        matches: vec![],
                        request_timeout_ms: Some(1500),
                        backend_timeout_ms: None,
                        filters: Filters {
                            redirect: Some(Redirect {
                                scheme: Some("https".into()),
                                hostname: None,
                                path: Some(PathModifier::Full("/".into())),
                                port: Some(8443),
                                status: 301,
                            }),
                            ..Filters::default()
                        },
                        retry: Some(route::RouteRetry {
                            attempts: 3,
                            codes: vec![500, 503],
                            backoff_ms: Some(100),
                            retry_on: None,
                        }),
                        fault: None,
                        backends: vec![
                            Backend {
                                namespace: "shop".into(),
                                name: "reviews-v1".into(),
                                port: None,
                                weight: 90,
                                subset: None,
                            },
                            Backend {
                                namespace: "shop".into(),
                                name: "reviews-v2".into(),
                                port: None,
                                weight: 10,
                                subset: None,
                            },
                        ],
                    },
                ],
            },
        }
    }

    #[test]
    fn a_route_round_trips() {
        let mut spec = spec();
        assert_eq!(route_from_proto(&route_to_proto(&spec)).unwrap(), spec);
        assert_eq!(route_name(&spec.route), "httproute/shop/canary");
        spec.route.grpc = true;
        assert_eq!(route_from_proto(&route_to_proto(&spec)).unwrap(), spec);
        assert_eq!(route_name(&spec.route), "grpcroute/shop/canary");
    }

    #[test]
    fn a_virtual_service_round_trips_with_its_own_matches_retries_and_faults() {
        let mut spec = spec();
        spec.route.virtual_service = true;
        let rule = &mut spec.route.rules[1];
        rule.matches = vec![RouteMatch {
            path: Some(PathMatch::StartsWith("/api".into())),
            headers: vec![HeaderMatch {
                name: "x-user".into(),
                value: ValueMatch::Prefix("qa-".into()),
            }],
            authority: Some(ValueMatch::Exact("reviews:9080".into())),
            ..RouteMatch::default()
        }];
        rule.retry = Some(route::RouteRetry {
            attempts: 2,
            codes: vec![],
            backoff_ms: None,
            retry_on: Some(vec!["5xx".into(), "429".into()]),
        });
        rule.fault = Some(route::Fault {
            delay: Some(route::Delay {
                fixed_delay_ms: 200,
                share_ppm: 500_000,
            }),
            abort: Some(route::Abort {
                http_status: None,
                grpc_status: Some(14),
                share_ppm: 100_000,
            }),
        });
        assert_eq!(route_from_proto(&route_to_proto(&spec)).unwrap(), spec);
        assert_eq!(route_name(&spec.route), "virtualservice/shop/canary");
        // A condition the control plane could not have sent rejects the resource.
        let mut wire = route_to_proto(&spec);
        wire.rules[1].retry.as_mut().unwrap().retry_on = Some(RouteRetryOn {
            conditions: vec!["often".into()],
        });
        assert!(route_from_proto(&wire).unwrap_err().contains("retryOn"));
    }

    #[test]
    fn a_regex_that_does_not_compile_rejects_the_resource_naming_it() {
        let mut proto = route_to_proto(&spec());
        proto.rules[0].matches[0].path = Some(route_match::Path::Regex("(".into()));
        let err = route_from_proto(&proto).unwrap_err();
        assert!(
            err.contains("HTTPRoute shop/canary rule 0: regex \"(\""),
            "{err}"
        );
        let mut proto = route_to_proto(&spec());
        proto.rules[1].backends[0].port = 70_000;
        assert!(route_from_proto(&proto).unwrap_err().contains("70000"));
    }
}
