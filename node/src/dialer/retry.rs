//! When to call a subscriber again: a pure function of the attempt's outcome, the attempts so far, the
//! campaign's policy, its deadline and the time. The dialer records its decision in the same Raft
//! entry as the outcome, so every replica agrees without re-deciding.
//!
//! The schedule: the first `quick_retries` retries come after at most `quick_delay_ms` (someone who
//! missed the first ring is likely near the phone), later ones after the outcome's steady delay
//! (busy sooner than no answer). A policy that rings `until_deadline` ignores `max_attempts` when
//! the campaign has a deadline; any retry that would fall at or after the deadline is not scheduled
//! and the task ends `exhausted` at once.

use campanile_cluster::{FinalState, Next, Outcome, RetryPolicy};

/// Decides what follows an attempt that ended with `outcome` at `now_ms`.
/// `attempts` counts attempts made so far, this one included; `deadline_ms` is the campaign's.
pub fn next_step(
    outcome: &Outcome,
    attempts: u32,
    policy: &RetryPolicy,
    require_confirmation: bool,
    deadline_ms: Option<u64>,
    now_ms: u64,
) -> Next {
    let steady = match outcome {
        Outcome::Confirmed => return Next::Final(FinalState::Confirmed),
        Outcome::Heard if !require_confirmation => return Next::Final(FinalState::Confirmed),
        Outcome::OptOut => return Next::Final(FinalState::OptedOut),
        Outcome::InvalidNumber { .. } => return Next::Final(FinalState::Invalid),
        // Our node or our trunk failed: not the citizen's attempt. Due at once; the trunk gate decides
        // when calls may start again.
        Outcome::Interrupted | Outcome::TrunkRejected { .. } => return Next::RetryAt(now_ms),
        Outcome::Busy => policy.busy_delay_ms,
        // A message left on an answering machine has not reached the citizen yet: call again.
        Outcome::Heard
        | Outcome::NotConfirmed
        | Outcome::HungUp { .. }
        | Outcome::Voicemail
        | Outcome::NoAnswer => policy.no_answer_delay_ms,
        Outcome::Unreachable | Outcome::Rejected { .. } => policy.failure_delay_ms,
    };
    // Retry number `attempts` follows attempt number `attempts`.
    let delay = if attempts <= policy.quick_retries {
        steady.min(policy.quick_delay_ms)
    } else {
        steady
    };
    let until_deadline = policy.until_deadline && deadline_ms.is_some();
    if attempts >= policy.max_attempts && !until_deadline {
        return Next::Final(FinalState::Exhausted);
    }
    let at = now_ms.saturating_add(delay);
    if deadline_ms.is_some_and(|d| at >= d) {
        // Nobody is called from the deadline on: waiting for it would change nothing.
        return Next::Final(FinalState::Exhausted);
    }
    Next::RetryAt(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        busy_delay_ms: 1_000,
        no_answer_delay_ms: 5_000,
        failure_delay_ms: 2_000,
        ..RetryPolicy::NONE
    };

    #[test]
    fn a_message_left_on_voicemail_is_never_final() {
        assert_eq!(
            next_step(&Outcome::Voicemail, 1, &POLICY, false, None, 100),
            Next::RetryAt(5_100)
        );
        assert_eq!(
            next_step(&Outcome::Voicemail, 3, &POLICY, true, None, 100),
            Next::Final(FinalState::Exhausted)
        );
    }

    #[test]
    fn busy_subscriber_is_retried_before_no_answer() {
        assert_eq!(
            next_step(&Outcome::Busy, 1, &POLICY, true, None, 100),
            Next::RetryAt(1_100)
        );
        assert_eq!(
            next_step(&Outcome::NoAnswer, 1, &POLICY, true, None, 100),
            Next::RetryAt(5_100)
        );
    }

    #[test]
    fn invalid_numbers_end_at_once() {
        assert_eq!(
            next_step(
                &Outcome::InvalidNumber { code: 404 },
                1,
                &POLICY,
                true,
                None,
                0
            ),
            Next::Final(FinalState::Invalid)
        );
    }

    #[test]
    fn the_retry_budget_ends_in_exhausted() {
        assert_eq!(
            next_step(&Outcome::NotConfirmed, 3, &POLICY, true, None, 0),
            Next::Final(FinalState::Exhausted)
        );
    }

    #[test]
    fn hearing_the_message_confirms_only_when_no_key_press_is_asked() {
        assert_eq!(
            next_step(&Outcome::Heard, 1, &POLICY, false, None, 0),
            Next::Final(FinalState::Confirmed)
        );
        assert_eq!(
            next_step(&Outcome::Heard, 1, &POLICY, true, None, 0),
            Next::RetryAt(5_000)
        );
    }

    #[test]
    fn interrupted_attempts_are_redialled_at_once_even_at_the_budget() {
        assert_eq!(
            next_step(&Outcome::Interrupted, 3, &POLICY, true, None, 7),
            Next::RetryAt(7)
        );
    }

    /// An emergency's defaults: 8 attempts, no answer 60 s, busy 30 s, two quick retries at 15 s.
    fn emergency() -> RetryPolicy {
        RetryPolicy::default_for(campanile_cluster::Priority::Emergency)
    }

    #[test]
    fn an_emergency_retries_quickly_at_first_then_at_a_steady_interval() {
        let p = emergency();
        let after = |attempts| match next_step(&Outcome::NoAnswer, attempts, &p, true, None, 0) {
            Next::RetryAt(at) => at,
            other => panic!("attempt {attempts}: {other:?}"),
        };
        assert_eq!(after(1), 15_000);
        assert_eq!(after(2), 15_000);
        assert_eq!(after(3), 60_000);
        assert_eq!(after(7), 60_000);
        // A busy line is retried sooner than no answer, and never later than a quick retry.
        assert_eq!(
            next_step(&Outcome::Busy, 1, &p, true, None, 0),
            Next::RetryAt(15_000)
        );
        assert_eq!(
            next_step(&Outcome::Busy, 3, &p, true, None, 0),
            Next::RetryAt(30_000)
        );
    }

    #[test]
    fn an_emergency_with_a_deadline_rings_until_confirmed_or_the_deadline() {
        let p = emergency();
        let deadline = Some(10_000_000);
        // Far beyond the attempt budget, the citizen is still called.
        assert_eq!(
            next_step(&Outcome::NoAnswer, 40, &p, true, deadline, 1_000_000),
            Next::RetryAt(1_060_000)
        );
        assert_eq!(
            next_step(&Outcome::Voicemail, 200, &p, true, deadline, 2_000_000),
            Next::RetryAt(2_060_000)
        );
        // ... until pressing 1 ends it ...
        assert_eq!(
            next_step(&Outcome::Confirmed, 41, &p, true, deadline, 1_100_000),
            Next::Final(FinalState::Confirmed)
        );
        // ... or the next call would come at or after the deadline.
        assert_eq!(
            next_step(&Outcome::NoAnswer, 41, &p, true, deadline, 9_940_000),
            Next::Final(FinalState::Exhausted)
        );
        assert_eq!(
            next_step(&Outcome::NoAnswer, 41, &p, true, deadline, 9_939_999),
            Next::RetryAt(9_999_999)
        );
        // Invalid numbers still end at once.
        assert_eq!(
            next_step(
                &Outcome::InvalidNumber { code: 404 },
                1,
                &p,
                true,
                deadline,
                0
            ),
            Next::Final(FinalState::Invalid)
        );
    }

    #[test]
    fn without_a_deadline_the_attempt_budget_bounds_even_an_emergency() {
        let p = emergency();
        assert!(matches!(
            next_step(&Outcome::NoAnswer, 7, &p, true, None, 0),
            Next::RetryAt(_)
        ));
        assert_eq!(
            next_step(&Outcome::NoAnswer, 8, &p, true, None, 0),
            Next::Final(FinalState::Exhausted)
        );
    }

    #[test]
    fn other_priorities_keep_their_budget_before_a_deadline_and_never_call_past_it() {
        let info = RetryPolicy::default_for(campanile_cluster::Priority::Info);
        let deadline = Some(100_000_000);
        assert_eq!(
            next_step(&Outcome::NoAnswer, 3, &info, true, deadline, 0),
            Next::Final(FinalState::Exhausted)
        );
        assert_eq!(
            next_step(&Outcome::NoAnswer, 1, &info, true, deadline, 0),
            Next::RetryAt(900_000),
            "no quick retries unless the policy asks"
        );
        assert_eq!(
            next_step(&Outcome::NoAnswer, 1, &info, true, Some(500_000), 0),
            Next::Final(FinalState::Exhausted)
        );
        // Failures that are not the citizen's are retried at once, deadline or not: the dialer
        // starts no call past it.
        assert_eq!(
            next_step(
                &Outcome::TrunkRejected { code: 503 },
                1,
                &info,
                true,
                Some(5),
                7
            ),
            Next::RetryAt(7)
        );
    }
}
