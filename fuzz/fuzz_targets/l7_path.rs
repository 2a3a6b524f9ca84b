//! Request paths arrive from any HTTP client through the waypoint. Normalization must
//! never panic; what it returns must hold no `%00`, control byte, backslash or dot
//! segment, must normalize to itself (decoding exactly once leaves nothing to decode),
//! and must keep the query as it came. Path templates are read from policies: parsing
//! and matching them must never panic either.
#![no_main]

use ambit_core::l7::{normalize_path, PathMatch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Ok(p) = normalize_path(input) {
        let path = p.path();
        assert!(!path.contains("%00"), "{input:?} -> {path:?}");
        assert!(!path.bytes().any(|b| b.is_ascii_control() || b == b'\\'));
        if path != "*" {
            assert!(path.starts_with('/'));
            assert!(
                !path.split('/').any(|s| s == "." || s == ".."),
                "{input:?} -> {path:?}"
            );
        }
        let again = normalize_path(path).expect("a normalized path normalizes");
        assert_eq!(again.path(), path, "{input:?}");
        assert_eq!(p.query(), input.split_once('?').map(|(_, q)| q));
        // Any path against a template made of the input: no panic.
        if let Ok(m) = PathMatch::parse(input) {
            let _ = m.matches(path);
        }
    }
});
