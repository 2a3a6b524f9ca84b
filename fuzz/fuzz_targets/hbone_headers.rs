//! HBONE request headers come from any peer that completed mTLS: parsing the CONNECT
//! authority, `forwarded`, `baggage` and `traceparent` must never panic, and what
//! parses must round-trip.
#![no_main]

use ambit_core::hbone::{Baggage, ConnectTarget, Forwarded, HboneTarget, TraceParent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Ok(t) = HboneTarget::parse_authority(input) {
        assert_eq!(HboneTarget::parse_authority(&t.to_string()), Ok(t));
    }
    if let Ok(t) = ConnectTarget::parse_authority(input) {
        assert_eq!(ConnectTarget::parse_authority(&t.to_string()), Ok(t));
    }
    if let Ok(f) = Forwarded::parse(input) {
        assert_eq!(Forwarded::parse(&f.header_value()).ok().map(|g| g.for_addr), Some(f.for_addr));
    }
    let b = Baggage::parse(input);
    assert_eq!(Baggage::parse(&b.header_value()), b);
    if let Ok(t) = input.parse::<TraceParent>() {
        assert_eq!(t.header_value().parse::<TraceParent>().ok(), Some(t));
    }
});
