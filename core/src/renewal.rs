//! When the certificate manager renews a certificate and how it backs off after a
//! failure. Randomness (jitter) and the clock are arguments, so the schedule is tested
//! without waiting.

use std::time::{Duration, SystemTime};

/// The renewal schedule's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewalPolicy {
    /// Fraction of the lifetime after which a certificate is renewed (0.5: half-life).
    pub renew_fraction: f64,
    /// Spread around that point, as a fraction of the lifetime, so that many
    /// certificates issued together do not all renew in the same instant.
    pub jitter_fraction: f64,
    /// First retry delay after a failed request.
    pub initial_backoff: Duration,
    /// Retry delays double up to this.
    pub max_backoff: Duration,
}

impl Default for RenewalPolicy {
    fn default() -> Self {
        RenewalPolicy {
            renew_fraction: 0.5,
            jitter_fraction: 0.1,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RenewalPolicy {
    /// When to renew a certificate valid over `[not_before, not_after]`. `jitter` is a
    /// random number in `[0, 1)`; the result lies within `jitter_fraction / 2` of the
    /// lifetime around the renewal point.
    pub fn renew_at(
        &self,
        not_before: SystemTime,
        not_after: SystemTime,
        jitter: f64,
    ) -> SystemTime {
        let lifetime = not_after
            .duration_since(not_before)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        let jitter = jitter.clamp(0.0, 1.0);
        let fraction = self.renew_fraction + self.jitter_fraction * (jitter - 0.5);
        not_before + Duration::from_secs_f64((lifetime * fraction.clamp(0.0, 1.0)).max(0.0))
    }

    /// Delay before retry number `attempt` (1 for the first retry). Exponential,
    /// capped, with `jitter` in `[0, 1)` spreading it over its upper half.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// Whether a certificate may still be served at `now`.
pub fn usable(now: SystemTime, not_before: SystemTime, not_after: SystemTime) -> bool {
    not_before <= now && now < not_after
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renews_at_half_life_within_jitter() {
        let p = RenewalPolicy::default();
        // 24h certificate: half-life 12h, jitter spreads +-1.2h.
        let nb = t(1000);
        let na = t(1000 + 86_400);
        assert_eq!(p.renew_at(nb, na, 0.5), t(1000 + 43_200));
        assert_eq!(p.renew_at(nb, na, 0.0), t(1000 + 43_200 - 4_320));
        let latest = p.renew_at(nb, na, 0.999_999);
        assert!(latest <= t(1000 + 43_200 + 4_320) && latest > t(1000 + 43_200 + 4_300));
    }

    #[test]
    fn renewal_of_degenerate_certificate_is_immediate() {
        let p = RenewalPolicy::default();
        assert_eq!(p.renew_at(t(50), t(10), 0.3), t(50));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RenewalPolicy::default();
        let full: Vec<u64> = (1..=9)
            .map(|a| p.backoff(a, 1.0).as_millis() as u64)
            .collect();
        assert_eq!(
            full,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(p.backoff(1, 0.0), Duration::from_millis(250));
        assert_eq!(p.backoff(u32::MAX, 1.0), Duration::from_secs(30));
    }

    #[test]
    fn usable_window() {
        assert!(usable(t(10), t(5), t(20)));
        assert!(!usable(t(20), t(5), t(20)));
        assert!(!usable(t(4), t(5), t(20)));
    }
}
