//! Wall-clock time as a comune reads it: Italy's time (CET, and CEST from the last Sunday of March to
//! the last Sunday of October, 01:00 UTC, as in all the EU), without a time-zone database.

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;

/// 01:00 UTC of the last Sunday of `month`: when Italy (like all the EU) changes clocks.
fn clock_change_ms(year: i64, month: u32) -> i64 {
    let last = days_from_civil(year, month, 31);
    // 1970-01-01 was a Thursday; 0 is Sunday.
    let weekday = (last + 4).rem_euclid(7);
    (last - weekday) * DAY_MS + HOUR_MS
}

/// The calendar date in Italy (CET, CEST from the last Sunday of March to the last of October)
/// of a wall-clock time in milliseconds since the epoch: what "registered on" means to a comune.
pub fn italian_date(ms: u64) -> String {
    let utc = i64::try_from(ms).unwrap_or(i64::MAX / 2);
    let (year, _, _) = civil_from_days(utc.div_euclid(DAY_MS));
    let summer = (clock_change_ms(year, 3)..clock_change_ms(year, 10)).contains(&utc);
    let local = utc + if summer { 2 * HOUR_MS } else { HOUR_MS };
    let (y, m, d) = civil_from_days(local.div_euclid(DAY_MS));
    format!("{y:04}-{m:02}-{d:02}")
}

/// RFC 3339 in UTC, for the export (a machine reads it; no time zone to guess).
pub fn utc_timestamp(ms: u64) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX / 2);
    let (y, m, d) = civil_from_days(ms.div_euclid(DAY_MS));
    let secs = ms.rem_euclid(DAY_MS) / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The time in Italy of `ms`, as `YYYY-MM-DD HH:MM`.
pub fn italian_datetime(ms: u64) -> String {
    let local = to_italian(ms);
    let (y, m, d) = civil_from_days(local.div_euclid(DAY_MS));
    let mins = local.rem_euclid(DAY_MS) / 60_000;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}", mins / 60, mins % 60)
}

/// Minutes after local midnight in Italy at `ms` (0 to 1439), as a wall clock there reads: on the
/// day summer time starts 02:00 to 02:59 never comes, on the day it ends they come twice.
pub fn italian_minute_of_day(ms: u64) -> u16 {
    (to_italian(ms).rem_euclid(DAY_MS) / 60_000) as u16
}

fn to_italian(ms: u64) -> i64 {
    let utc = i64::try_from(ms).unwrap_or(i64::MAX / 2);
    let (year, _, _) = civil_from_days(utc.div_euclid(DAY_MS));
    let summer = (clock_change_ms(year, 3)..clock_change_ms(year, 10)).contains(&utc);
    utc + if summer { 2 * HOUR_MS } else { HOUR_MS }
}

/// A time in Italy as a `datetime-local` field sends it (`YYYY-MM-DDTHH:MM`, seconds optional), in
/// milliseconds since the epoch; None when it is not one.
pub fn parse_italian_local(s: &str) -> Option<u64> {
    let (date, time) = s.trim().split_once('T')?;
    let mut d = date.split('-');
    let (y, mo, da) = (
        d.next()?.parse::<i64>().ok()?,
        d.next()?.parse::<u32>().ok()?,
        d.next()?.parse::<u32>().ok()?,
    );
    let mut t = time.split(':');
    let (h, mi) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    if !(1..=12).contains(&mo)
        || !(1..=31).contains(&da)
        || !(0..24).contains(&h)
        || !(0..60).contains(&mi)
        || !(1970..=9999).contains(&y)
    {
        return None;
    }
    let local = days_from_civil(y, mo, da) * DAY_MS + h * HOUR_MS + mi * 60_000;
    // Summer time if the UTC instant that would be falls inside it; otherwise winter time.
    let as_summer = local - 2 * HOUR_MS;
    let utc = if (clock_change_ms(y, 3)..clock_change_ms(y, 10)).contains(&as_summer) {
        as_summer
    } else {
        local - HOUR_MS
    };
    u64::try_from(utc).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn italian_local_times_round_trip_in_winter_and_summer() {
        // 2026-01-15 10:30 CET = 09:30 UTC; 2026-07-15 10:30 CEST = 08:30 UTC.
        let winter = parse_italian_local("2026-01-15T10:30").unwrap();
        assert_eq!(utc_timestamp(winter), "2026-01-15T09:30:00Z");
        assert_eq!(italian_datetime(winter), "2026-01-15 10:30");
        let summer = parse_italian_local("2026-07-15T10:30").unwrap();
        assert_eq!(utc_timestamp(summer), "2026-07-15T08:30:00Z");
        assert_eq!(italian_datetime(summer), "2026-07-15 10:30");
        assert_eq!(italian_date(summer), "2026-07-15");
        for bad in [
            "",
            "2026-13-01T10:00",
            "2026-01-01",
            "2026-01-01T25:00",
            "x-y-zTa:b",
        ] {
            assert_eq!(parse_italian_local(bad), None, "{bad}");
        }
    }

    #[test]
    fn minutes_of_the_day_follow_the_italian_clock_across_clock_changes() {
        assert_eq!(utc_timestamp(1_768_509_000_000), "2026-01-15T20:30:00Z");
        assert_eq!(italian_minute_of_day(1_768_509_000_000), 21 * 60 + 30); // CET
        assert_eq!(italian_minute_of_day(1_784_147_400_000), 22 * 60 + 30); // 2026-07-15T20:30Z, CEST
        assert_eq!(italian_minute_of_day(1_768_519_800_000), 30); // 23:30Z: past local midnight
                                                                  // 2026-03-29: at 01:00 UTC clocks jump from 02:00 CET to 03:00 CEST.
        assert_eq!(italian_minute_of_day(1_774_745_100_000), 60 + 45); // 00:45Z
        assert_eq!(italian_minute_of_day(1_774_746_300_000), 3 * 60 + 5); // 01:05Z
                                                                          // 2026-10-25: at 01:00 UTC clocks go back from 03:00 CEST to 02:00 CET.
        assert_eq!(italian_minute_of_day(1_792_888_200_000), 2 * 60 + 30); // 00:30Z
        assert_eq!(italian_minute_of_day(1_792_891_800_000), 2 * 60 + 30); // 01:30Z
        assert_eq!(italian_minute_of_day(1_792_893_600_000), 3 * 60); // 02:00Z
    }

    #[test]
    fn registration_dates_are_italian_calendar_days() {
        // Winter: UTC+1.
        assert_eq!(italian_date(1_704_063_600_000 - 1), "2023-12-31"); // 22:59:59.999 UTC
        assert_eq!(italian_date(1_704_063_600_000), "2024-01-01"); // 2023-12-31T23:00Z
                                                                   // Summer time starts 2024-03-31 01:00 UTC and ends 2024-10-27 01:00 UTC.
        assert_eq!(utc_timestamp(1_711_846_800_000), "2024-03-31T01:00:00Z");
        assert_eq!(
            italian_date(1_711_929_600_000 - 2 * 3_600_000),
            "2024-04-01"
        ); // 22:00Z
        assert_eq!(
            italian_date(1_711_929_600_000 - 2 * 3_600_000 - 1),
            "2024-03-31"
        );
        assert_eq!(italian_date(1_730_070_000_000), "2024-10-28"); // 2024-10-27T23:00Z, winter
        assert_eq!(italian_date(1_730_070_000_000 - 1), "2024-10-27");
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        for days in [-1, 0, 59, 365, 11_016, 19_783, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
