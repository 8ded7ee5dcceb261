//! The trunk gate: a trunk that answers 503 (with or without Retry-After) is overloaded, so the whole
//! trunk pauses, not the citizen who happened to be called (RFC 3261 §21.5.4). A pure state machine of
//! outcomes and time; the dialer asks it before starting each call.

use std::time::{Duration, Instant};

/// Pause when a 503 carries no Retry-After.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(5);
/// Longest pause honoured, whatever Retry-After says.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Whether new calls may go to the trunk.
#[derive(Debug, Default, Clone)]
pub struct TrunkGate {
    closed_until: Option<Instant>,
}

impl TrunkGate {
    /// The trunk refused a call as overloaded at `now`; `retry_after` is its Retry-After, if any.
    pub fn on_overload(&mut self, retry_after: Option<Duration>, now: Instant) {
        let until = now + retry_after.unwrap_or(DEFAULT_BACKOFF).min(MAX_BACKOFF);
        self.closed_until = Some(self.closed_until.map_or(until, |u| u.max(until)));
    }

    /// When calls may start again; `None` if they may start now.
    pub fn reopens_at(&self, now: Instant) -> Option<Instant> {
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
