//! What the route targets share: a route that was read selects a rule for an arbitrary
//! request target, and what the rule does to the request never panics.

use ambit_core::route::{HttpRoute, RedirectFrom, RequestView, RouteTable};

/// Routes `target` (`path?query`) through `route`, applying the selected rule's
/// filters and drawing its faults and retry policy.
pub fn exercise(route: HttpRoute, target: &[u8]) {
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
    if let Some(f) = &selected.rule.fault {
        let _ = f.decide(u64::MAX, 0);
    }
    if let Some(r) = &selected.rule.retry {
        let _ = r.policy();
    }
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
        let _ = r.location(&RedirectFrom {
            scheme: "http",
            host: "h",
            port: 80,
            path,
            query,
            matched_prefix: selected.matched_prefix,
        });
    }
}
