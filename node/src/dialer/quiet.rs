//! Quiet hours: a tenant may ask that its non-emergency campaigns start no calls during a daily
//! window of Italian local time (the night, a siesta). A pure decision of the campaign's priority,
//! the tenant's window and the time; the dialer leaves such tasks due, and they are called once the
//! window ends. Calls already up when the window opens go on to their end.

use std::collections::BTreeSet;

use campanile_cluster::{CampaignId, CampaignState, Priority, QuietHours, State};
use campanile_dashboard::italian_time::italian_minute_of_day;

/// Whether a campaign of `priority` must start no calls at `now_ms` under the tenant's `quiet`
/// hours. Emergencies always call.
pub fn holds(priority: Priority, quiet: Option<&QuietHours>, now_ms: u64) -> bool {
    priority != Priority::Emergency
        && quiet.is_some_and(|q| q.contains(italian_minute_of_day(now_ms)))
}

/// The running campaigns whose calls wait for their tenant's quiet hours to end at `now_ms`.
pub fn held_campaigns(state: &State, now_ms: u64) -> BTreeSet<CampaignId> {
    state
        .campaigns()
        .filter(|c| c.state == CampaignState::Running)
        .filter(|c| {
            let quiet = state
                .tenant(&c.spec.tenant)
                .and_then(|t| t.quiet_hours.as_ref());
            holds(c.spec.priority, quiet, now_ms)
        })
        .map(|c| c.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NIGHT: QuietHours = QuietHours {
        start_minute: 22 * 60,
        end_minute: 7 * 60,
    };
    const SIESTA: QuietHours = QuietHours {
        start_minute: 13 * 60,
        end_minute: 15 * 60 + 30,
    };

    /// UTC instants (ms) by what the Italian clock reads then.
    const WINTER_2130: u64 = 1_768_509_000_000; // 2026-01-15T20:30Z = 21:30 CET
    const WINTER_0700: u64 = 1_768_456_800_000; // 2026-01-15T06:00Z = 07:00 CET
    const SUMMER_2230: u64 = 1_784_147_400_000; // 2026-07-15T20:30Z = 22:30 CEST
    const SUMMER_0700: u64 = 1_784_091_600_000; // 2026-07-15T05:00Z = 07:00 CEST
    const MINUTE: u64 = 60_000;

    #[test]
    fn a_window_over_midnight_holds_from_its_start_until_its_end() {
        for (minute, inside) in [
            (21 * 60 + 59, false),
            (22 * 60, true),
            (23 * 60 + 59, true),
            (0, true),
            (6 * 60 + 59, true),
            (7 * 60, false),
            (12 * 60, false),
        ] {
            assert_eq!(NIGHT.contains(minute), inside, "minute {minute}");
        }
    }

    #[test]
    fn a_window_within_the_day_holds_only_inside_it() {
        assert!(!SIESTA.contains(12 * 60 + 59));
        assert!(SIESTA.contains(13 * 60));
        assert!(SIESTA.contains(15 * 60 + 29));
        assert!(!SIESTA.contains(15 * 60 + 30));
        assert!(!SIESTA.contains(23 * 60));
    }

    #[test]
    fn the_window_is_read_on_the_italian_clock_in_winter_and_in_summer() {
        // 20:30 UTC is outside the night in winter (21:30) and inside it in summer (22:30).
        assert!(!holds(Priority::Info, Some(&NIGHT), WINTER_2130));
        assert!(holds(Priority::Info, Some(&NIGHT), SUMMER_2230));
        assert!(holds(Priority::Urgent, Some(&NIGHT), WINTER_0700 - MINUTE));
        assert!(!holds(Priority::Urgent, Some(&NIGHT), WINTER_0700));
        assert!(holds(Priority::Urgent, Some(&NIGHT), SUMMER_0700 - MINUTE));
        assert!(!holds(Priority::Urgent, Some(&NIGHT), SUMMER_0700));
    }

    #[test]
    fn on_clock_change_days_the_local_clock_decides() {
        let two_to_three = QuietHours {
            start_minute: 2 * 60,
            end_minute: 3 * 60,
        };
        let half_past_one_to_half_past_two = QuietHours {
            start_minute: 60 + 30,
            end_minute: 2 * 60 + 30,
        };
        // 2026-03-29, 01:00 UTC: 02:00 CET becomes 03:00 CEST; the hour 02:00 to 03:00 never comes.
        let spring = 1_774_746_000_000; // 01:00Z
        for t in (spring - 60 * MINUTE..spring + 60 * MINUTE).step_by(MINUTE as usize) {
            assert!(!holds(Priority::Info, Some(&two_to_three), t), "{t}");
        }
        assert!(holds(
            Priority::Info,
            Some(&half_past_one_to_half_past_two),
            spring - MINUTE
        ));
        assert!(!holds(
            Priority::Info,
            Some(&half_past_one_to_half_past_two),
            spring
        ));
        // 2026-10-25, 01:00 UTC: 03:00 CEST becomes 02:00 CET; 02:00 to 03:00 comes twice, and
        // the window holds both times.
        let autumn = 1_792_890_000_000; // 01:00Z
        assert!(!holds(
            Priority::Info,
            Some(&two_to_three),
            autumn - 61 * MINUTE
        ));
        assert!(holds(
            Priority::Info,
            Some(&two_to_three),
            autumn - 60 * MINUTE
        ));
        assert!(holds(Priority::Info, Some(&two_to_three), autumn - MINUTE));
        assert!(holds(Priority::Info, Some(&two_to_three), autumn));
        assert!(holds(
            Priority::Info,
            Some(&two_to_three),
            autumn + 59 * MINUTE
        ));
        assert!(!holds(
            Priority::Info,
            Some(&two_to_three),
            autumn + 60 * MINUTE
        ));
    }

    #[test]
    fn emergencies_and_tenants_without_quiet_hours_always_call() {
        let all_day = QuietHours {
            start_minute: 0,
            end_minute: 24 * 60 - 1,
        };
        assert!(!holds(Priority::Emergency, Some(&NIGHT), SUMMER_2230));
        assert!(!holds(Priority::Info, None, SUMMER_2230));
        assert!(holds(Priority::Info, Some(&all_day), WINTER_2130));
    }
}
