//! A DestinationRule spec from arbitrary JSON: reading it never panics; a rule that
//! reads survives the xDS round trip unchanged, and its policy for any port and
//! subset balances a request without panicking.
#![no_main]

use ambit_core::balance::{hash_key, pick, HashRing, PickInput};
use ambit_k8s::destination_rule::read_spec;
use ambit_k8s::resources::ObjectKey;
use ambit_net::xds::destination::{destination_rule_from_proto, destination_rule_to_proto};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(spec) = serde_json::from_slice(data) else {
        return;
    };
    let Ok(rule) = read_spec(&ObjectKey::new("ns", "r"), 0, &spec) else {
        return;
    };
    let back = destination_rule_from_proto(&destination_rule_to_proto(&rule));
    assert_eq!(back.as_ref(), Ok(&rule));
    let keys = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"];
    let ring = HashRing::new(&keys);
    let subsets = rule.subsets.iter().map(|s| Some(s.name.as_str()));
    for subset in std::iter::once(None).chain(subsets) {
        for port in [80, 9080, 65535] {
            let policy = rule.policy(port, subset);
            let input = PickInput {
                active: &[1, 0, 2],
                turn: u64::from(port),
                random: [7, 11],
                hash: Some(hash_key(data)),
                ring: Some(&ring),
            };
            let at = pick(&policy.load_balancer, keys.len(), &input);
            assert!(at.is_some_and(|i| i < keys.len()));
            if let Some(od) = &policy.outlier_detection {
                let s = od.settings();
                assert!(s.max_ejection_percent <= 100 && s.interval_ms > 0);
            }
        }
    }
});
