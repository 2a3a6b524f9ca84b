//! Outlier detection as Envoy runs it for a DestinationRule's `outlierDetection`:
//! passive health checking of each endpoint of one Service port (subset), from the
//! outcomes of the requests sent to it. The current time (milliseconds on any
//! monotonic clock) is an argument.
//!
//! - Each endpoint counts consecutive 5xx (a response ≥ 500, or a local failure:
//!   connect failure, reset, timeout) and consecutive gateway errors (502, 503, 504,
//!   or a local failure). Any other outcome resets both.
//! - Reaching `consecutive5xxErrors` (or `consecutiveGatewayErrors`, when set) ejects
//!   the endpoint at once, unless ejecting it would put more than
//!   `maxEjectionPercent` of the endpoints out (the first ejection is always
//!   allowed, as Envoy's).
//! - An ejected endpoint is ejected for `baseEjectionTime` × the times it has been
//!   ejected (capped at Envoy's 300 s, or the base time if longer), and is returned
//!   by the first sweep (every `interval`) after that; each sweep that finds an
//!   endpoint in service lowers its multiplier by one.

use std::collections::HashMap;
use std::hash::Hash;

use crate::retry::Outcome;

/// Envoy's `max_ejection_time` default: no ejection lasts longer, unless the base
/// time itself is longer.
pub const MAX_EJECTION_MS: u64 = 300_000;

/// `outlierDetection` with its defaults applied
/// ([`crate::destination::OutlierDetection::settings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSettings {
    /// 0: 5xx do not eject.
    pub consecutive_5xx: u32,
    /// 0: gateway errors do not eject (Istio's default).
    pub consecutive_gateway: u32,
    pub interval_ms: u64,
    pub base_ejection_ms: u64,
    pub max_ejection_percent: u32,
}

/// What one try's outcome means for its endpoint's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Success,
    /// A 5xx response; `gateway`: 502, 503 or 504.
    ServerError {
        gateway: bool,
    },
    /// Nothing came back: connect failure, reset, timeout. Counted as both.
    LocalFailure,
}

impl Health {
    /// A try's outcome, as the retry policy saw it.
    pub fn of(outcome: Outcome) -> Health {
        match outcome {
            Outcome::Response { status, .. } if status >= 500 => Health::ServerError {
                gateway: matches!(status, 502..=504),
            },
            Outcome::Response { .. } => Health::Success,
            Outcome::ConnectFailure
            | Outcome::RefusedStream
            | Outcome::Reset
            | Outcome::Timeout => Health::LocalFailure,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct HostState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    /// Ejected until this time (returned at the first sweep from then on).
    ejected_until: Option<u64>,
    /// The multiplier of the next ejection's time, less one.
    ejections: u32,
}

/// The outlier state of one Service port's (subset's) endpoints, keyed by `K`.
#[derive(Debug, Clone)]
pub struct OutlierDetector<K> {
    settings: OutlierSettings,
    hosts: HashMap<K, HostState>,
    next_sweep_ms: u64,
}

/// What a report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    Counted,
    /// The endpoint is now ejected for this long.
    Ejected {
        for_ms: u64,
    },
    /// It reached the threshold but `maxEjectionPercent` kept it in.
    KeptByMaxEjectionPercent,
}

impl<K: Hash + Eq + Clone> OutlierDetector<K> {
    pub fn new(settings: OutlierSettings, now_ms: u64) -> Self {
        OutlierDetector {
            settings,
            hosts: HashMap::new(),
            next_sweep_ms: now_ms.saturating_add(settings.interval_ms.max(1)),
        }
    }

    pub fn settings(&self) -> OutlierSettings {
        self.settings
    }

    /// Records `health` for `host`, one of `hosts` endpoints in all.
    pub fn report(&mut self, host: &K, health: Health, hosts: usize, now_ms: u64) -> Reported {
        self.sweep(now_ms);
        let ejected = self.ejected_count();
        let s = self.settings;
        let state = self.hosts.entry(host.clone()).or_default();
        if state.ejected_until.is_some() {
            // Requests already in flight when it was ejected: no news.
            return Reported::Counted;
        }
        let (five, gateway) = match health {
            Health::Success => (false, false),
            Health::ServerError { gateway } => (true, gateway),
            Health::LocalFailure => (true, true),
        };
        state.consecutive_5xx = if five { state.consecutive_5xx + 1 } else { 0 };
        state.consecutive_gateway = if gateway {
            state.consecutive_gateway + 1
        } else {
            0
        };
        let tripped = (s.consecutive_5xx > 0 && state.consecutive_5xx >= s.consecutive_5xx)
            || (s.consecutive_gateway > 0 && state.consecutive_gateway >= s.consecutive_gateway);
        if !tripped {
            return Reported::Counted;
        }
        state.consecutive_5xx = 0;
        state.consecutive_gateway = 0;
        let allowed = ejected == 0
            || ((ejected + 1) as u64) * 100 <= u64::from(s.max_ejection_percent) * hosts as u64;
        if !allowed {
            return Reported::KeptByMaxEjectionPercent;
        }
        state.ejections = state.ejections.saturating_add(1);
        let for_ms = s
            .base_ejection_ms
            .saturating_mul(u64::from(state.ejections))
            .min(MAX_EJECTION_MS.max(s.base_ejection_ms));
        state.ejected_until = Some(now_ms.saturating_add(for_ms));
        Reported::Ejected { for_ms }
    }

    /// Whether `host` is out of the balancing set now.
    pub fn is_ejected(&mut self, host: &K, now_ms: u64) -> bool {
        self.sweep(now_ms);
        self.hosts
            .get(host)
            .is_some_and(|h| h.ejected_until.is_some())
    }

    /// Endpoints ejected now.
    pub fn ejected_count(&self) -> usize {
        self.hosts
            .values()
            .filter(|h| h.ejected_until.is_some())
            .count()
    }

    /// Forgets endpoints that are gone.
    pub fn retain(&mut self, keep: impl Fn(&K) -> bool) {
        self.hosts.retain(|k, _| keep(k));
    }

    /// Runs the sweeps due by `now_ms`: ejections whose time is up end; endpoints in
    /// service have their multiplier lowered.
    pub fn sweep(&mut self, now_ms: u64) {
        let interval = self.settings.interval_ms.max(1);
        if now_ms < self.next_sweep_ms {
            return;
        }
        let due = (now_ms - self.next_sweep_ms) / interval + 1;
        // Sweeps long past matter only through their number (multipliers), so a
        // detector idle for hours catches up in one step per host.
        let at = self.next_sweep_ms + (due - 1) * interval;
        for h in self.hosts.values_mut() {
            let mut sweeps = due;
            if let Some(until) = h.ejected_until {
                if until > at {
                    continue;
                }
                h.ejected_until = None;
                // The sweeps after the one that returned it count as in service.
                let first = self.next_sweep_ms;
                let returned_at = first + until.saturating_sub(first).div_ceil(interval) * interval;
                sweeps = at.saturating_sub(returned_at) / interval;
            }
            h.ejections = h
                .ejections
                .saturating_sub(u32::try_from(sweeps).unwrap_or(u32::MAX));
        }
        self.next_sweep_ms = at + interval;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn settings() -> OutlierSettings {
        OutlierSettings {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            interval_ms: 1000,
            base_ejection_ms: 5000,
            max_ejection_percent: 50,
        }
    }

    const FAIL: Health = Health::ServerError { gateway: false };

    #[test]
    fn outcomes_map_to_health() {
        let r = |status| Outcome::Response { status, grpc: None };
        assert_eq!(Health::of(r(200)), Health::Success);
        assert_eq!(Health::of(r(404)), Health::Success);
        assert_eq!(Health::of(r(500)), Health::ServerError { gateway: false });
        assert_eq!(Health::of(r(503)), Health::ServerError { gateway: true });
        assert_eq!(Health::of(Outcome::ConnectFailure), Health::LocalFailure);
        assert_eq!(Health::of(Outcome::Timeout), Health::LocalFailure);
    }

    #[test]
    fn consecutive_errors_eject_and_a_success_between_resets_the_count() {
        let mut d = OutlierDetector::new(settings(), 0);
        assert_eq!(d.report(&"a", FAIL, 4, 10), Reported::Counted);
        assert_eq!(d.report(&"a", FAIL, 4, 20), Reported::Counted);
        assert_eq!(d.report(&"a", Health::Success, 4, 30), Reported::Counted);
        assert_eq!(d.report(&"a", FAIL, 4, 40), Reported::Counted);
        assert_eq!(d.report(&"a", FAIL, 4, 50), Reported::Counted);
        assert!(!d.is_ejected(&"a", 50));
        assert_eq!(
            d.report(&"a", Health::LocalFailure, 4, 60),
            Reported::Ejected { for_ms: 5000 }
        );
        assert!(d.is_ejected(&"a", 60));
        assert!(!d.is_ejected(&"b", 60));
    }

    #[test]
    fn an_ejection_ends_at_the_first_sweep_after_its_time_and_grows_when_repeated() {
        let mut d = OutlierDetector::new(settings(), 0);
        for t in 0..3 {
            d.report(&"a", FAIL, 2, 100 + t);
        }
        // Ejected at 102 for 5 s: back at the sweep at 6000, not before.
        assert!(d.is_ejected(&"a", 5999));
        assert!(!d.is_ejected(&"a", 6000));
        // Ejected again at once: twice as long (its multiplier was not lowered yet).
        for t in 0..3 {
            d.report(&"a", FAIL, 2, 6100 + t);
        }
        assert!(d.is_ejected(&"a", 15_999));
        assert!(!d.is_ejected(&"a", 17_000));
        // Long in service, the multiplier is back to one.
        assert!(!d.is_ejected(&"a", 60_000));
        for t in 0..3 {
            assert_eq!(
                d.report(&"a", FAIL, 2, 60_100 + t),
                if t == 2 {
                    Reported::Ejected { for_ms: 5000 }
                } else {
                    Reported::Counted
                }
            );
        }
    }

    #[test]
    fn max_ejection_percent_caps_ejections_but_never_the_first() {
        // 10 % of 2 endpoints is none, yet one may always be ejected.
        let mut d = OutlierDetector::new(
            OutlierSettings {
                max_ejection_percent: 10,
                ..settings()
            },
            0,
        );
        for t in 0..3 {
            d.report(&"a", FAIL, 2, t);
        }
        assert!(d.is_ejected(&"a", 3));
        for t in 0..2 {
            d.report(&"b", FAIL, 2, t);
        }
        assert_eq!(
            d.report(&"b", FAIL, 2, 5),
            Reported::KeptByMaxEjectionPercent
        );
        assert_eq!(d.ejected_count(), 1);
        // 100 %: every endpoint may go.
        let mut d = OutlierDetector::new(
            OutlierSettings {
                max_ejection_percent: 100,
                ..settings()
            },
            0,
        );
        for host in ["a", "b"] {
            for t in 0..3 {
                d.report(&host, FAIL, 2, t);
            }
        }
        assert_eq!(d.ejected_count(), 2);
    }

    #[test]
    fn gateway_errors_count_only_when_asked_and_5xx_can_be_switched_off() {
        let mut d = OutlierDetector::new(
            OutlierSettings {
                consecutive_5xx: 0,
                consecutive_gateway: 2,
                ..settings()
            },
            0,
        );
        d.report(&"a", FAIL, 4, 1);
        d.report(&"a", FAIL, 4, 2);
        d.report(&"a", FAIL, 4, 3);
        assert!(!d.is_ejected(&"a", 3), "a 500 is not a gateway error");
        d.report(&"a", Health::ServerError { gateway: true }, 4, 4);
        assert_eq!(
            d.report(&"a", Health::LocalFailure, 4, 5),
            Reported::Ejected { for_ms: 5000 }
        );
        d.retain(|h| *h != "a");
        assert_eq!(d.ejected_count(), 0);
    }
}
