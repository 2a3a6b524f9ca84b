//! CA root rotation with overlap (decision 0014): when signing may move to a new root,
//! and when the old root may leave the trust bundle. The time is always an argument.
//!
//! A rotation has three phases. (1) *Overlap*: the new root is in the bundle next to
//! the old one, the CA still signs with the old. Every certificate issued from then on
//! carries both roots, and each proxy trusts the bundle of its current certificate, so
//! once every certificate issued before the overlap has expired (or the operator's
//! shorter overlap has passed) every proxy trusts the new root. (2) *Switched*: the CA
//! signs with the new root; workloads move to it at their next renewal; both roots stay
//! trusted. (3) *Done*: once no certificate the old root signed can still be valid, it
//! leaves the bundle.

use std::time::{Duration, SystemTime};

/// A rotation in progress, as the CA records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// When the new root entered the trust bundle.
    pub started: SystemTime,
    /// The latest NotAfter of any certificate issued before `started`: a certificate
    /// without the new root in its bundle is valid until then at most.
    pub unaware_until: SystemTime,
    /// An overlap the operator chose instead of waiting for `unaware_until`.
    pub overlap: Option<Duration>,
    /// When signing moved to the new root; `None` while the old one signs.
    pub switched: Option<SystemTime>,
    /// The latest NotAfter of any certificate the old root signed.
    pub old_signed_until: SystemTime,
}

/// Where a rotation stands at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Both roots trusted, the old one signs.
    Overlap,
    /// Both roots trusted, the new one signs.
    Switched,
    /// Only the new root is trusted.
    Done,
}

/// What the CA has to do about a rotation at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing before `until`.
    Wait { until: SystemTime },
    /// Sign with the new root from now on.
    SwitchSigning,
    /// No certificate signed by the old root is left: drop it from the bundle.
    DropOldRoot,
}

impl Rotation {
    /// A rotation starting at `now`, with certificates issued so far valid until
    /// `issued_until` at most (the old root signed all of them).
    pub fn start(now: SystemTime, issued_until: SystemTime, overlap: Option<Duration>) -> Self {
        Rotation {
            started: now,
            unaware_until: issued_until,
            overlap,
            switched: None,
            old_signed_until: issued_until,
        }
    }

    /// When signing moves to the new root: once no certificate lacking the new root
    /// can be valid, or after the operator's overlap.
    pub fn switch_at(&self) -> SystemTime {
        match self.overlap {
            Some(overlap) => self.started + overlap,
            None => self.unaware_until.max(self.started),
        }
    }

    /// When the old root leaves the bundle (once signing has switched).
    pub fn drop_at(&self) -> Option<SystemTime> {
        self.switched.map(|at| at.max(self.old_signed_until))
    }

    /// The phase at `now`.
    pub fn phase(&self, now: SystemTime) -> Phase {
        match self.drop_at() {
            None => Phase::Overlap,
            Some(at) if now < at => Phase::Switched,
            Some(_) => Phase::Done,
        }
    }

    /// What to do at `now`.
    pub fn next_step(&self, now: SystemTime) -> Step {
        match self.drop_at() {
            None if now >= self.switch_at() => Step::SwitchSigning,
            None => Step::Wait {
                until: self.switch_at(),
            },
            Some(at) if now >= at => Step::DropOldRoot,
            Some(at) => Step::Wait { until: at },
        }
    }

    /// Records a certificate valid until `not_after`, signed by the old root (before
    /// the switch) or the new one (after: no effect on the rotation).
    pub fn record_issued(&mut self, not_after: SystemTime) {
        if self.switched.is_none() {
            self.old_signed_until = self.old_signed_until.max(not_after);
        }
    }
}

/// How far past the latest NotAfter a stored "issued until" mark is set, so it is
/// written at most once per margin while certificates are issued steadily.
pub const ISSUED_MARK_MARGIN: Duration = Duration::from_secs(60);

/// The new value of a stored "issued until" mark (the latest NotAfter a root has
/// signed, rounded up by [`ISSUED_MARK_MARGIN`]) after a certificate valid until
/// `not_after`, or `None` when the stored mark already covers it.
pub fn issued_mark(stored: Option<SystemTime>, not_after: SystemTime) -> Option<SystemTime> {
    match stored {
        Some(mark) if mark >= not_after => None,
        _ => Some(not_after + ISSUED_MARK_MARGIN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn steps_through_the_phases_by_time() {
        // Started at 1000; certificates issued before are valid until 1600 at most.
        let mut r = Rotation::start(t(1000), t(1600), None);
        let cases = [
            (t(1000), Step::Wait { until: t(1600) }, Phase::Overlap),
            (t(1599), Step::Wait { until: t(1600) }, Phase::Overlap),
            (t(1600), Step::SwitchSigning, Phase::Overlap),
            (t(9999), Step::SwitchSigning, Phase::Overlap),
        ];
        for (now, step, phase) in cases {
            assert_eq!(r.next_step(now), step, "at {now:?}");
            assert_eq!(r.phase(now), phase, "at {now:?}");
        }
        // Still signing with the old root during the overlap: until 2200.
        r.record_issued(t(2200));
        r.switched = Some(t(1600));
        r.record_issued(t(3000)); // signed by the new root: no effect
        let cases = [
            (t(1600), Step::Wait { until: t(2200) }, Phase::Switched),
            (t(2199), Step::Wait { until: t(2200) }, Phase::Switched),
            (t(2200), Step::DropOldRoot, Phase::Done),
        ];
        for (now, step, phase) in cases {
            assert_eq!(r.next_step(now), step, "at {now:?}");
            assert_eq!(r.phase(now), phase, "at {now:?}");
        }
    }

    #[test]
    fn an_operator_overlap_replaces_waiting_for_expiry() {
        let r = Rotation::start(t(1000), t(87_400), Some(Duration::from_secs(30)));
        assert_eq!(r.switch_at(), t(1030));
        assert_eq!(r.next_step(t(1029)), Step::Wait { until: t(1030) });
        assert_eq!(r.next_step(t(1030)), Step::SwitchSigning);
    }

    #[test]
    fn the_old_root_stays_while_a_certificate_it_signed_is_valid() {
        let table = [
            // (switched, old signed until, now, step)
            (t(100), t(50), t(100), Step::DropOldRoot),
            (t(100), t(500), t(100), Step::Wait { until: t(500) }),
            (t(100), t(500), t(499), Step::Wait { until: t(500) }),
            (t(100), t(500), t(500), Step::DropOldRoot),
        ];
        for (switched, until, now, step) in table {
            let mut r = Rotation::start(t(0), until, None);
            r.switched = Some(switched);
            assert_eq!(
                r.next_step(now),
                step,
                "switched {switched:?} until {until:?}"
            );
        }
    }

    #[test]
    fn nothing_issued_before_means_no_wait() {
        let r = Rotation::start(t(1000), t(0), None);
        assert_eq!(r.switch_at(), t(1000));
        assert_eq!(r.next_step(t(1000)), Step::SwitchSigning);
    }

    #[test]
    fn issued_mark_moves_only_past_what_it_covers() {
        let table = [
            (None, t(100), Some(t(160))),
            (Some(t(160)), t(100), None),
            (Some(t(160)), t(160), None),
            (Some(t(160)), t(161), Some(t(221))),
        ];
        for (stored, not_after, want) in table {
            assert_eq!(
                issued_mark(stored, not_after),
                want,
                "{stored:?} {not_after:?}"
            );
        }
    }
}
