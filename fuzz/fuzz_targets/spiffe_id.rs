//! SPIFFE IDs arrive from CSRs, peer certificates and config files. Parsing must never
//! panic, and whatever parses must print back to the same string and re-parse equal.
#![no_main]

use ambit_core::SpiffeId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    if let Ok(id) = SpiffeId::parse(input) {
        assert_eq!(id.to_string(), input);
        assert_eq!(SpiffeId::parse(&id.to_string()), Ok(id.clone()));
        let rebuilt = format!(
            "spiffe://{}/ns/{}/sa/{}",
            id.trust_domain(),
            id.namespace(),
            id.service_account()
        );
        assert_eq!(rebuilt, input);
    }
});
