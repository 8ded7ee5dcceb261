//! The trunk gate: a trunk that answers 503 (with or without Retry-After) is overloaded, so the whole
//! trunk pauses, not the citizen who happened to be called (RFC 3261 §21.5.4); a trunk that stops
//! answering OPTIONS pings is down until it answers again. A pure state machine of outcomes and time; the
//! dialer asks it before starting each call.

use std::time::{Duration, Instant};

/// Pause when a 503 carries no Retry-After.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(5);
/// Longest pause honoured, whatever Retry-After says.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Consecutive unanswered OPTIONS pings that mark a trunk down.
pub const DOWN_AFTER: u32 = 2;
/// While a trunk is down, how often the dialer looks again.
pub const DOWN_RECHECK: Duration = Duration::from_millis(500);

/// Whether new calls may go to the trunk.
#[derive(Debug, Default, Clone)]
pub struct TrunkGate {
    closed_until: Option<Instant>,
    unanswered_pings: u32,
    down: bool,
}

impl TrunkGate {
    /// The trunk refused a call as overloaded at `now`; `retry_after` is its Retry-After, if any.
    pub fn on_overload(&mut self, retry_after: Option<Duration>, now: Instant) {
        let until = now + retry_after.unwrap_or(DEFAULT_BACKOFF).min(MAX_BACKOFF);
        self.closed_until = Some(self.closed_until.map_or(until, |u| u.max(until)));
    }

    /// An OPTIONS ping was answered (any response) or not; returns `Some(up)` when the trunk's state changed.
    pub fn on_ping(&mut self, answered: bool) -> Option<bool> {
        let was_down = self.down;
        if answered {
            self.unanswered_pings = 0;
            self.down = false;
        } else {
            self.unanswered_pings += 1;
            self.down = self.unanswered_pings >= DOWN_AFTER;
        }
        (was_down != self.down).then_some(!self.down)
    }

    pub fn is_up(&self) -> bool {
        !self.down
    }

    /// When calls may start again; `None` if they may start now.
    pub fn reopens_at(&self, now: Instant) -> Option<Instant> {
        if self.down {
            return Some(now + DOWN_RECHECK);
        }
        self.closed_until.filter(|u| *u > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_503_closes_the_trunk_for_its_retry_after() {
        let t0 = Instant::now();
        let mut g = TrunkGate::default();
        assert_eq!(g.reopens_at(t0), None);
        g.on_overload(Some(Duration::from_secs(2)), t0);
        assert_eq!(
            g.reopens_at(t0 + Duration::from_secs(1)),
            Some(t0 + Duration::from_secs(2))
        );
        assert_eq!(g.reopens_at(t0 + Duration::from_secs(2)), None);
    }

    #[test]
    fn two_unanswered_pings_mark_the_trunk_down_and_one_answer_brings_it_back() {
        let t0 = Instant::now();
        let mut g = TrunkGate::default();
        assert_eq!(g.on_ping(false), None);
        assert!(g.is_up());
        assert_eq!(g.on_ping(false), Some(false));
        assert!(g.reopens_at(t0).is_some());
        assert_eq!(g.on_ping(false), None);
        assert_eq!(g.on_ping(true), Some(true));
        assert_eq!(g.reopens_at(t0), None);
        // One lost ping between answers changes nothing.
        assert_eq!(g.on_ping(false), None);
        assert_eq!(g.on_ping(true), None);
        assert!(g.is_up());
    }

    #[test]
    fn the_longest_pause_wins_and_is_capped() {
        let t0 = Instant::now();
        let mut g = TrunkGate::default();
        g.on_overload(Some(Duration::from_secs(10)), t0);
        g.on_overload(Some(Duration::from_secs(1)), t0);
        assert_eq!(g.reopens_at(t0), Some(t0 + Duration::from_secs(10)));
        g.on_overload(Some(Duration::from_secs(86_400)), t0);
        assert_eq!(g.reopens_at(t0), Some(t0 + MAX_BACKOFF));
        let mut g = TrunkGate::default();
        g.on_overload(None, t0);
        assert_eq!(g.reopens_at(t0), Some(t0 + DEFAULT_BACKOFF));
    }
}
