//! A VirtualService spec from arbitrary JSON: reading it (durations, percentages,
//! retry conditions, regex compilation with bounded size) never panics, and one that
//! reads routes any request without panicking, its filters applied and its faults
//! drawn.
#![no_main]

#[path = "route_common.rs"]
mod route_common;

use ambit_k8s::resources::ObjectKey;
use ambit_k8s::virtual_service::{read, VirtualService};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(split) = data.iter().position(|b| *b == 0) else {
        return;
    };
    let (spec, target) = (&data[..split], &data[split + 1..]);
    let Ok(spec) = serde_json::from_slice(spec) else {
        return;
    };
    let vs = VirtualService {
        spec,
        ..VirtualService::default()
    };
    if let Ok(route) = read(&ObjectKey::new("ns", "r"), &vs).route {
        route_common::exercise(route, target);
    }
});
