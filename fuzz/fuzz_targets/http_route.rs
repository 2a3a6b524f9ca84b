//! An HTTPRoute spec from arbitrary JSON: reading it (defaults, validation, regex
//! compilation with bounded size) never panics, and a route that reads routes any
//! request without panicking, its filters applied.
#![no_main]

#[path = "route_common.rs"]
mod route_common;

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
    if let Ok(route) = read(&ObjectKey::new("ns", "r"), &route).route {
        route_common::exercise(route, target);
    }
});
