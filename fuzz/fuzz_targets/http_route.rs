//! An HTTPRoute spec from arbitrary JSON: reading it (defaults, validation, regex
//! compilation with bounded size) never panics, and a route that reads routes any
//! request without panicking, its filters applied.
#![no_main]

use ambit_core::route::{RequestView, RouteTable};
use ambit_k8s::http_route::{read, HttpRoute};
use ambit_k8s::resources::ObjectKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(split) = data.iter().position(|b| *b == 0) else {
        return;
    };
    let (spec, target) = (&data[..split], &data[split + 1..]);
    let Ok(spec) = serde_json::from_slice(spec) else {
        return;
    };
    let route = HttpRoute {
        spec,
        ..HttpRoute::default()
    };
    let Ok(route) = read(&ObjectKey::new("ns", "r"), &route).route else {
        return;
    };
    let table = RouteTable::new(vec![route]);
    let target = String::from_utf8_lossy(target);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target.as_ref(), None),
    };
    let mut headers = http::HeaderMap::new();
    let Some(selected) = table.select(&RequestView {
        method: "GET",
        path,
        query,
        headers: &headers,
        authority: "h",
    }) else {
        return;
    };
    // What the rule's filters do to the request never panics either.
    let filters = selected.rule.filters.clone();
    if let Some(m) = &filters.request_headers {
        m.apply(&mut headers);
    }
    if let Some(r) = &filters.rewrite {
        if let Some(p) = &r.path {
            let _ = p.apply(path, selected.matched_prefix);
        }
    }
    if let Some(r) = &filters.redirect {
        let _ = r.location(&ambit_core::route::RedirectFrom {
            scheme: "http",
            host: "h",
            port: 80,
            path,
            query,
            matched_prefix: selected.matched_prefix,
        });
    }
});
