//! Whether the waypoint tries a request again, as pure functions: Istio's default
//! retry policy, an HTTPRoute's `retry`, Envoy's jittered backoff and its retry
//! budget. Randomness is an input.
//!
//! **Default** (nothing configured, as Istio's mesh default): 2 retries on
//! `connect-failure`, `refused-stream`, `unavailable` (gRPC 14), `cancelled` (gRPC 1)
//! and `retriable-status-codes` (503), each to the next endpoint in turn.
//!
//! **HTTPRoute `retry`**: `attempts` retries (the Gateway API's field counts retries
//! too), on the connection failures above and on the listed `codes`; `backoff` is the
//! base interval.
//!
//! **VirtualService `retries`**: `attempts` retries on the conditions of `retryOn`
//! as Envoy reads them (`5xx`: any 5xx, a reset, a connect failure or a timed-out
//! try; `gateway-error`: 502, 503, 504 and the same failures; `reset`;
//! `connect-failure`; `refused-stream`; `retriable-4xx`: 409;
//! `retriable-status-codes` and bare numbers: those statuses (503 when none is
//! written); the gRPC names `cancelled`, `deadline-exceeded`, `internal`,
//! `resource-exhausted`, `unavailable`). Without `retryOn`, Istio's default
//! conditions.
//!
//! **Backoff** as Envoy's: before retry `n` (1-based), a uniformly random wait below
//! `base × 2^(n-1)`, capped at ten times the base; base 25 ms by default.
//!
//! **Budget** as Envoy's retry budget: a retry is allowed only while the retries in
//! flight stay below 20 % of the requests in flight (never below 3), so during an
//! outage retries add at most a fifth to the load instead of tripling it.

use std::time::Duration;

/// What a try ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No connection to the endpoint (refused, unreachable, TLS or HBONE failure):
    /// nothing reached the app.
    ConnectFailure,
    /// The upstream refused the stream before processing it (HTTP/2 `REFUSED_STREAM`).
    RefusedStream,
    /// The connection ended before the response's headers.
    Reset,
    /// The try's own time ran out (`backendRequest`).
    Timeout,
    /// A response, with its gRPC status when its headers carried one.
    Response { status: u16, grpc: Option<u32> },
}

/// When to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub retries: u32,
    pub on_connect_failure: bool,
    pub on_refused_stream: bool,
    /// gRPC statuses retried (Istio's `cancelled` 1, `unavailable` 14, ...).
    pub grpc: Vec<u32>,
    /// HTTP statuses retried (`retriable-status-codes`).
    pub codes: Vec<u16>,
    /// A try that timed out (`backendRequest`) is retried.
    pub on_timeout: bool,
    /// A connection that ended before the response's headers (`reset`).
    pub on_reset: bool,
    /// Any 5xx (`5xx`).
    pub on_5xx: bool,
    pub backoff_base: Duration,
}

/// Envoy's default backoff base interval.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

impl Default for RetryPolicy {
    /// Istio's mesh-wide default.
    fn default() -> Self {
        RetryPolicy {
            retries: 2,
            on_connect_failure: true,
            on_refused_stream: true,
            grpc: vec![1, 14],
            codes: vec![503],
            on_timeout: false,
            on_reset: false,
            on_5xx: false,
            backoff_base: DEFAULT_BACKOFF,
        }
    }
}

impl RetryPolicy {
    /// An HTTPRoute rule's `retry`: `attempts` retries (Gateway API default 0 when
    /// the field is absent; the route's author asked for retries, so connection
    /// failures are retried as Istio's default does), on `codes`, a timed-out try
    /// too, `backoff` as the base.
    pub fn from_route(attempts: u32, codes: Vec<u16>, backoff: Option<Duration>) -> Self {
        RetryPolicy {
            retries: attempts,
            on_connect_failure: true,
            on_refused_stream: true,
            grpc: Vec::new(),
            codes,
            on_timeout: true,
            on_reset: false,
            on_5xx: false,
            backoff_base: backoff.unwrap_or(DEFAULT_BACKOFF),
        }
    }

    /// A VirtualService's `retries`: `attempts` retries on `retry_on` (its
    /// comma-separated `retryOn`, split; empty: Istio's default conditions). The
    /// error names the condition that is not known.
    pub fn from_retry_on(attempts: u32, retry_on: &[String]) -> Result<Self, String> {
        if retry_on.is_empty() {
            return Ok(RetryPolicy {
                retries: attempts,
                ..RetryPolicy::default()
            });
        }
        let mut policy = RetryPolicy {
            retries: attempts,
            on_connect_failure: false,
            on_refused_stream: false,
            grpc: Vec::new(),
            codes: Vec::new(),
            on_timeout: false,
            on_reset: false,
            on_5xx: false,
            backoff_base: DEFAULT_BACKOFF,
        };
        let mut status_codes = false;
        for condition in retry_on.iter().map(|c| c.trim()).filter(|c| !c.is_empty()) {
            match condition {
                "5xx" => {
                    policy.on_5xx = true;
                    policy.on_timeout = true;
                    policy.on_reset = true;
                    policy.on_connect_failure = true;
                    policy.on_refused_stream = true;
                }
                "gateway-error" => {
                    policy.codes.extend([502, 503, 504]);
                    policy.on_timeout = true;
                    policy.on_reset = true;
                    policy.on_connect_failure = true;
                }
                "reset" => {
                    policy.on_reset = true;
                    policy.on_connect_failure = true;
                    policy.on_refused_stream = true;
                }
                "connect-failure" => policy.on_connect_failure = true,
                "refused-stream" => policy.on_refused_stream = true,
                "retriable-4xx" => policy.codes.push(409),
                "retriable-status-codes" => status_codes = true,
                "cancelled" => policy.grpc.push(1),
                "deadline-exceeded" => policy.grpc.push(4),
                "resource-exhausted" => policy.grpc.push(8),
                "internal" => policy.grpc.push(13),
                "unavailable" => policy.grpc.push(14),
                number => match number.parse::<u16>() {
                    Ok(code) if (100..=599).contains(&code) => {
                        policy.codes.push(code);
                        status_codes = true;
                    }
                    _ => {
                        return Err(format!(
                            "{number:?} is not a retry condition Ambit knows (5xx, gateway-error, reset, connect-failure, refused-stream, retriable-4xx, retriable-status-codes, an HTTP status, or a gRPC status name: cancelled, deadline-exceeded, internal, resource-exhausted, unavailable)"
                        ))
                    }
                },
            }
        }
        if status_codes && policy.codes.is_empty() {
            policy.codes.push(503);
        }
        Ok(policy)
    }

    /// Whether a try that ended with `outcome` is tried again, `done` tries in.
    /// A reset after the request reached the app is retried only when asked for
    /// (`reset`, `5xx`, `gateway-error`): the app may have acted on it.
    pub fn retries(&self, outcome: Outcome, done: u32) -> bool {
        if done > self.retries {
            return false;
        }
        match outcome {
            Outcome::ConnectFailure => self.on_connect_failure,
            Outcome::RefusedStream => self.on_refused_stream,
            Outcome::Reset => self.on_reset,
            Outcome::Timeout => self.on_timeout,
            Outcome::Response { status, grpc } => {
                self.codes.contains(&status)
                    || (self.on_5xx && (500..=599).contains(&status))
                    || grpc.is_some_and(|g| self.grpc.contains(&g))
            }
        }
    }

    /// How long to wait before retry `n` (1-based), given `random` uniform over `u64`.
    pub fn backoff(&self, n: u32, random: u64) -> Duration {
        let base = self.backoff_base.as_nanos().max(1);
        let cap = base.saturating_mul(10);
        let ceiling = base
            .saturating_mul(1u128 << n.saturating_sub(1).min(20))
            .min(cap);
        let wait = (u128::from(random) * ceiling) >> 64;
        Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX))
    }
}

/// Envoy's retry budget: the share of requests in flight that may be retries.
pub const BUDGET_PERCENT: u64 = 20;
/// Retries in flight always allowed, however few requests there are.
pub const BUDGET_MIN_CONCURRENCY: u64 = 3;

/// Whether one more retry may start with `requests` in flight (retries included)
/// and `retries` of them retrying.
pub fn budget_allows(requests: u64, retries: u64) -> bool {
    retries < (requests * BUDGET_PERCENT / 100).max(BUDGET_MIN_CONCURRENCY)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_default_retries_connection_failures_503_and_grpc_unavailable_twice() {
        let p = RetryPolicy::default();
        let unavailable = Outcome::Response {
            status: 200,
            grpc: Some(14),
        };
        for outcome in [
            Outcome::ConnectFailure,
            Outcome::RefusedStream,
            Outcome::Response {
                status: 503,
                grpc: None,
            },
            unavailable,
        ] {
            assert!(p.retries(outcome, 1), "{outcome:?}");
            assert!(p.retries(outcome, 2), "{outcome:?}");
            assert!(!p.retries(outcome, 3), "three tries in all: {outcome:?}");
        }
        for outcome in [
            Outcome::Reset,
            Outcome::Timeout,
            Outcome::Response {
                status: 500,
                grpc: None,
            },
            Outcome::Response {
                status: 200,
                grpc: Some(0),
            },
            Outcome::Response {
                status: 404,
                grpc: None,
            },
        ] {
            assert!(!p.retries(outcome, 1), "{outcome:?}");
        }
    }

    #[test]
    fn a_routes_retry_takes_its_codes_and_attempts() {
        let p = RetryPolicy::from_route(3, vec![500, 502], Some(Duration::from_millis(100)));
        let status = |status| Outcome::Response { status, grpc: None };
        assert!(p.retries(status(500), 3));
        assert!(!p.retries(status(500), 4));
        assert!(!p.retries(status(503), 1), "not listed");
        assert!(p.retries(Outcome::Timeout, 1));
        let none = RetryPolicy::from_route(0, vec![500], None);
        assert!(!none.retries(status(500), 1), "attempts 0: no retry");
    }

    #[test]
    fn backoff_is_jittered_below_an_exponential_ceiling_capped_at_ten_times_the_base() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1, 0), Duration::ZERO);
        let max = |n| p.backoff(n, u64::MAX);
        assert!(max(1) < Duration::from_millis(25) && max(1) > Duration::from_millis(24));
        assert!(max(2) < Duration::from_millis(50) && max(2) > Duration::from_millis(49));
        assert!(max(3) < Duration::from_millis(100));
        assert!(max(30) <= Duration::from_millis(250), "{:?}", max(30));
        assert!(max(30) > Duration::from_millis(249));
        let half = p.backoff(2, u64::MAX / 2);
        assert!(half > Duration::from_millis(24) && half < Duration::from_millis(26));
    }

    #[test]
    fn the_budget_keeps_retries_under_a_fifth_of_requests_in_flight() {
        assert!(budget_allows(1, 0));
        assert!(budget_allows(1, 2), "three retries are always allowed");
        assert!(!budget_allows(1, 3));
        assert!(budget_allows(100, 19));
        assert!(!budget_allows(100, 20));
        assert!(!budget_allows(1000, 200));
    }

    #[test]
    fn retry_on_reads_envoys_conditions() {
        let on = |v: &[&str]| {
            RetryPolicy::from_retry_on(3, &v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        let status = |status| Outcome::Response { status, grpc: None };
        let p = on(&["5xx"]).unwrap();
        for o in [
            status(500),
            status(599),
            Outcome::Reset,
            Outcome::Timeout,
            Outcome::ConnectFailure,
        ] {
            assert!(p.retries(o, 1), "5xx: {o:?}");
        }
        assert!(!p.retries(status(404), 1));
        assert!(!p.retries(status(500), 4), "3 retries, 4 tries in all");
        let p = on(&["gateway-error"]).unwrap();
        assert!(p.retries(status(502), 1) && p.retries(status(504), 1));
        assert!(!p.retries(status(500), 1));
        let p = on(&["connect-failure", "429"]).unwrap();
        assert!(p.retries(status(429), 1) && p.retries(Outcome::ConnectFailure, 1));
        assert!(!p.retries(status(503), 1) && !p.retries(Outcome::Reset, 1));
        let p = on(&["retriable-status-codes"]).unwrap();
        assert_eq!(p.codes, vec![503]);
        let p = on(&["unavailable", "cancelled"]).unwrap();
        assert!(p.retries(
            Outcome::Response {
                status: 200,
                grpc: Some(14)
            },
            1
        ));
        assert!(!p.retries(status(503), 1));
        assert_eq!(on(&[]).unwrap().retries, 3, "Istio's default conditions");
        assert_eq!(on(&[]).unwrap().codes, vec![503]);
        let e = on(&["5xx", "sometimes"]).unwrap_err();
        assert!(e.contains("\"sometimes\""), "{e}");
        assert!(on(&["700"]).is_err());
    }
}
