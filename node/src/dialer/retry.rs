//! When to call a subscriber again: a pure function of the attempt's outcome, the attempts so far, the
//! campaign's policy and the time. The dialer records its decision in the same Raft entry as the
//! outcome, so every replica agrees without re-deciding.

use campanile_cluster::{FinalState, Next, Outcome, RetryPolicy};

/// Decides what follows an attempt that ended with `outcome` at `now_ms`.
/// `attempts` counts attempts made so far, this one included.
pub fn next_step(
    outcome: &Outcome,
    attempts: u32,
    policy: &RetryPolicy,
    require_confirmation: bool,
    now_ms: u64,
) -> Next {
    let delay = match outcome {
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
    if attempts >= policy.max_attempts {
        Next::Final(FinalState::Exhausted)
    } else {
        Next::RetryAt(now_ms.saturating_add(delay))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        busy_delay_ms: 1_000,
        no_answer_delay_ms: 5_000,
        failure_delay_ms: 2_000,
    };

    #[test]
    fn a_message_left_on_voicemail_is_never_final() {
        assert_eq!(
            next_step(&Outcome::Voicemail, 1, &POLICY, false, 100),
            Next::RetryAt(5_100)
        );
        assert_eq!(
            next_step(&Outcome::Voicemail, 3, &POLICY, true, 100),
            Next::Final(FinalState::Exhausted)
        );
    }

    #[test]
    fn busy_subscriber_is_retried_before_no_answer() {
        assert_eq!(
            next_step(&Outcome::Busy, 1, &POLICY, true, 100),
            Next::RetryAt(1_100)
        );
        assert_eq!(
            next_step(&Outcome::NoAnswer, 1, &POLICY, true, 100),
            Next::RetryAt(5_100)
        );
    }

    #[test]
    fn invalid_numbers_end_at_once() {
        assert_eq!(
            next_step(&Outcome::InvalidNumber { code: 404 }, 1, &POLICY, true, 0),
            Next::Final(FinalState::Invalid)
        );
    }

    #[test]
    fn the_retry_budget_ends_in_exhausted() {
        assert_eq!(
            next_step(&Outcome::NotConfirmed, 3, &POLICY, true, 0),
            Next::Final(FinalState::Exhausted)
        );
    }

    #[test]
    fn hearing_the_message_confirms_only_when_no_key_press_is_asked() {
        assert_eq!(
            next_step(&Outcome::Heard, 1, &POLICY, false, 0),
            Next::Final(FinalState::Confirmed)
        );
        assert_eq!(
            next_step(&Outcome::Heard, 1, &POLICY, true, 0),
            Next::RetryAt(5_000)
        );
    }

    #[test]
    fn interrupted_attempts_are_redialled_at_once_even_at_the_budget() {
        assert_eq!(
            next_step(&Outcome::Interrupted, 3, &POLICY, true, 7),
            Next::RetryAt(7)
        );
    }
}
