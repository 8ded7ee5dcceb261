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

/// Calls start on a grid of this step, as SIPp's scheduler starts its calls (`-timer_resol`, 10 ms
/// by default): the calls whose turn falls within one step start together, so the node wakes once a
/// step instead of once a call, and the trunk's answers come back in bursts that one read drains. A
/// call waits at most one step longer than its turn, nothing next to a ring of seconds.
pub const LAUNCH_TICK: Duration = Duration::from_millis(10);

/// `t` moved up to the next step of the [`LAUNCH_TICK`] grid that starts at `base` (unchanged if it
/// is on the grid, or before `base`).
pub fn on_launch_tick(base: Instant, t: Instant) -> Instant {
    let tick = LAUNCH_TICK.as_nanos();
    let into_step = t.saturating_duration_since(base).as_nanos() % tick;
    if into_step == 0 {
        return t;
    }
    // Less than a step (10 ms), so it fits.
    t + Duration::from_nanos((tick - into_step) as u64)
}

/// The trunk's calls-per-second limit as carriers count it: at most `limit` INVITEs in any one
/// second, not one every `1/limit` s. After a pause (a 503's Retry-After) the channels that freed
/// meanwhile may all start at once, up to the limit, instead of trickling back at the spaced rate.
/// Slots lie on the [`LAUNCH_TICK`] grid that starts at the first one; as a second is a whole
/// number of steps, moving a slot up to the grid keeps every one-second window within the limit.
#[derive(Debug, Clone)]
pub struct CallRate {
    limit: usize,
    /// The latest `limit` slots handed out, oldest first (some may lie ahead of now).
    slots: std::collections::VecDeque<Instant>,
    /// Where the grid starts: the first slot handed out.
    grid: Option<Instant>,
}

impl CallRate {
    pub fn new(calls_per_second: u32) -> CallRate {
        // Not preallocated: the queue holds no more slots than calls were placed in a second,
        // whatever limit a config file names.
        CallRate {
            limit: calls_per_second.max(1) as usize,
            slots: std::collections::VecDeque::new(),
            grid: None,
        }
    }

    /// Reserves the earliest time from `now` at which one more INVITE keeps every one-second
    /// window within the limit, on the launch grid. Slots come out in order, so a caller that
    /// sleeps until its slot sends in order too.
    pub fn reserve(&mut self, now: Instant) -> Instant {
        let grid = *self.grid.get_or_insert(now);
        let mut slot = self.slots.back().map_or(now, |b| (*b).max(now));
        if self.slots.len() == self.limit {
            if let Some(oldest) = self.slots.pop_front() {
                slot = slot.max(oldest + Duration::from_secs(1));
            }
        }
        let slot = on_launch_tick(grid, slot);
        self.slots.push_back(slot);
        slot
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

    /// The most slots within any one-second window (a slot exactly one second after another is in
    /// the next window).
    fn busiest_second(slots: &[Instant]) -> usize {
        (0..slots.len())
            .map(|i| {
                slots[i..]
                    .iter()
                    .take_while(|s| **s < slots[i] + Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn calls_per_second_allow_a_burst_up_to_the_limit_and_no_more_in_any_second() {
        let t0 = Instant::now();
        let mut r = CallRate::new(5);
        let first: Vec<Instant> = (0..5).map(|_| r.reserve(t0)).collect();
        assert!(first.iter().all(|s| *s == t0), "a burst of 5 goes at once");
        let sixth = r.reserve(t0);
        assert_eq!(sixth, t0 + Duration::from_secs(1));
        // A steady demand, asked for every 50 ms for 10 s: never more than 5 in a second.
        let mut slots = first;
        slots.push(sixth);
        for k in 0..200u64 {
            slots.push(r.reserve(t0 + Duration::from_millis(50 * k)));
        }
        assert!(
            slots.windows(2).all(|w| w[0] <= w[1]),
            "slots come in order"
        );
        assert_eq!(busiest_second(&slots), 5);
    }

    #[test]
    fn slots_lie_on_the_launch_grid_and_never_before_their_turn() {
        let t0 = Instant::now();
        let mut r = CallRate::new(1000);
        assert_eq!(r.reserve(t0), t0, "the first call goes at once");
        let mut slots = Vec::new();
        for k in 0..3000u64 {
            // Demand every 0.7 ms, off the grid, and faster than the limit for a while.
            let now = t0 + Duration::from_micros(700 * k);
            let slot = r.reserve(now);
            assert!(slot >= now);
            let off_grid = slot.duration_since(t0).as_nanos() % LAUNCH_TICK.as_nanos();
            assert_eq!(off_grid, 0, "slot {k} is off the grid");
            slots.push(slot);
        }
        assert!(slots.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(busiest_second(&slots), 1000);
        // Calls asked for within one step share the step's end.
        let mut r = CallRate::new(1000);
        r.reserve(t0);
        let tick = LAUNCH_TICK.as_micros() as u64;
        let shared: Vec<Instant> = (1..=4)
            .map(|i| r.reserve(t0 + Duration::from_micros(i * tick / 5)))
            .collect();
        assert_eq!(shared, vec![t0 + LAUNCH_TICK; 4]);
    }

    #[test]
    fn on_the_grid_a_time_stays_and_off_it_moves_up_less_than_a_step() {
        let base = Instant::now();
        assert_eq!(on_launch_tick(base, base), base);
        assert_eq!(
            on_launch_tick(base, base + LAUNCH_TICK * 3),
            base + LAUNCH_TICK * 3
        );
        let t = base + LAUNCH_TICK * 3 + Duration::from_nanos(1);
        assert_eq!(on_launch_tick(base, t), base + LAUNCH_TICK * 4);
        // Before the grid's start nothing moves.
        let later = base + Duration::from_secs(1);
        assert_eq!(on_launch_tick(later, base), base);
    }

    #[test]
    fn after_a_quiet_spell_the_whole_limit_is_available_again() {
        let t0 = Instant::now();
        let mut r = CallRate::new(3);
        for _ in 0..3 {
            r.reserve(t0);
        }
        let later = t0 + Duration::from_millis(2500);
        let burst: Vec<Instant> = (0..3).map(|_| r.reserve(later)).collect();
        assert_eq!(burst, vec![later; 3]);
        assert_eq!(r.reserve(later), later + Duration::from_secs(1));
    }
}
