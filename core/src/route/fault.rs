//! A VirtualService's `fault` as pure decisions: Istio's HTTP fault injection as
//! Envoy's fault filter applies it. For each request, independently: a delay of
//! `fixedDelay` for `percentage` of requests, then an abort with `httpStatus` (or a
//! gRPC status, answered as a trailers-only gRPC response) for `percentage` of them.
//! Istio's `percentage` left out means no request (its documentation: "If left
//! unspecified, no request will be delayed/aborted"). Randomness is an input.

use serde::{Deserialize, Serialize};

/// Parts per million: 100 % is 1,000,000.
pub const ALL_PPM: u32 = 1_000_000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delay {
    pub fixed_delay_ms: u64,
    pub share_ppm: u32,
}

/// An HTTP status, or a gRPC status code (the response is HTTP 200 with
/// `grpc-status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Abort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    pub share_ppm: u32,
}

/// What is injected into one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Injected {
    /// Wait this long before going on (Envoy's response flag `DI`).
    pub delay: Option<std::time::Duration>,
    /// Answer this instead of forwarding (`FI`): an HTTP status, or a gRPC status.
    pub abort: Option<AbortWith>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortWith {
    Http(u16),
    Grpc(u32),
}

/// Whether a draw uniform over `u64` falls in `share_ppm` millionths.
fn sampled(share_ppm: u32, random: u64) -> bool {
    let point = ((u128::from(random) * u128::from(ALL_PPM)) >> 64) as u32;
    point < share_ppm
}

impl Fault {
    /// The faults for one request, given two independent draws uniform over `u64`
    /// (one for the delay, one for the abort).
    pub fn decide(&self, delay_draw: u64, abort_draw: u64) -> Injected {
        Injected {
            delay: self
                .delay
                .as_ref()
                .filter(|d| sampled(d.share_ppm, delay_draw))
                .map(|d| std::time::Duration::from_millis(d.fixed_delay_ms)),
            abort: self
                .abort
                .as_ref()
                .filter(|a| sampled(a.share_ppm, abort_draw))
                .and_then(|a| match (a.http_status, a.grpc_status) {
                    (Some(s), _) => Some(AbortWith::Http(s)),
                    (None, Some(g)) => Some(AbortWith::Grpc(g)),
                    (None, None) => None,
                }),
        }
    }
}

/// The gRPC status code of a name as Istio's `grpcStatus` takes it (`UNAVAILABLE`)
/// or a number.
pub fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES
        .iter()
        .position(|n| *n == name)
        .map(|i| i as u32)
        .or_else(|| name.parse().ok().filter(|n| *n < 17))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fault(delay_ppm: u32, abort_ppm: u32) -> Fault {
        Fault {
            delay: Some(Delay {
                fixed_delay_ms: 50,
                share_ppm: delay_ppm,
            }),
            abort: Some(Abort {
                http_status: Some(503),
                grpc_status: None,
                share_ppm: abort_ppm,
            }),
        }
    }

    #[test]
    fn shares_are_drawn_independently_and_exactly() {
        let half = fault(500_000, 500_000);
        let low = u64::MAX / 4;
        let high = u64::MAX / 4 * 3;
        assert_eq!(
            half.decide(low, high),
            Injected {
                delay: Some(Duration::from_millis(50)),
                abort: None
            }
        );
        assert_eq!(
            half.decide(high, low),
            Injected {
                delay: None,
                abort: Some(AbortWith::Http(503))
            }
        );
        // 0 % never, 100 % always, at the ends of the draw.
        let none = fault(0, 0);
        assert_eq!(none.decide(0, 0), Injected::default());
        let all = fault(ALL_PPM, ALL_PPM);
        let both = all.decide(u64::MAX, u64::MAX);
        assert!(both.delay.is_some() && both.abort.is_some());
    }

    #[test]
    fn a_grpc_abort_and_status_names() {
        let f = Fault {
            delay: None,
            abort: Some(Abort {
                http_status: None,
                grpc_status: grpc_code("UNAVAILABLE"),
                share_ppm: ALL_PPM,
            }),
        };
        assert_eq!(f.decide(0, 0).abort, Some(AbortWith::Grpc(14)));
        assert_eq!(grpc_code("UNAUTHENTICATED"), Some(16));
        assert_eq!(grpc_code("7"), Some(7));
        assert_eq!(grpc_code("unavailable"), None);
        assert_eq!(grpc_code("17"), None);
    }
}
