//! When backups and drills run: calendar expressions in UTC, a subset of systemd's `OnCalendar=`
//! that covers what a backup schedule needs:
//!
//! ```text
//! daily | weekly | hourly
//! [WEEKDAYS] HH:MM[:SS]          e.g. "03:00", "Sun 04:30", "Mon..Fri 02:00", "Mon,Thu 01:15:00"
//! [WEEKDAYS] *-*-* HH:MM[:SS]    the same with systemd's date wildcard
//! ```
//! Hours and minutes may be lists (`0,12:00`) or `*` (every). A run missed while the box was off is
//! due as soon as the daemon starts (like systemd's `Persistent=true`): [`Calendar::missed`].

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A parsed calendar expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendar {
    text: String,
    /// Bit 0 = Monday … bit 6 = Sunday.
    weekdays: u8,
    hours: Vec<u32>,
    minutes: Vec<u32>,
    second: u32,
}

impl fmt::Display for Calendar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn weekday_index(s: &str) -> Option<u8> {
    let s = s.to_ascii_lowercase();
    DAYS.iter().position(|d| s.starts_with(d) && s.len() <= 9).map(|i| i as u8)
}

fn parse_list(s: &str, max: u32, what: &str) -> Result<Vec<u32>, String> {
    if s == "*" {
        return Ok((0..=max).collect());
    }
    let mut v = Vec::new();
    for part in s.split(',') {
        let n: u32 = part.parse().map_err(|_| format!("`{part}` is not a valid {what}"))?;
        if n > max {
            return Err(format!("{what} {n} is out of range (0–{max})"));
        }
        v.push(n);
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

impl Calendar {
    pub fn parse(text: &str) -> Result<Calendar, String> {
        let t = text.trim();
        let expanded = match t.to_ascii_lowercase().as_str() {
            "daily" => "00:00".to_string(),
            "weekly" => "Mon 00:00".to_string(),
            "hourly" => "*:00".to_string(),
            _ => t.to_string(),
        };
        let mut parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.is_empty() {
            return Err("empty calendar expression".into());
        }
        let mut weekdays = 0x7f;
        if parts[0].chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
            weekdays = 0;
            for item in parts[0].split(',') {
                if let Some((a, b)) = item.split_once("..") {
                    let (a, b) = (
                        weekday_index(a).ok_or_else(|| format!("`{a}` is not a weekday"))?,
                        weekday_index(b).ok_or_else(|| format!("`{b}` is not a weekday"))?,
                    );
                    let mut i = a;
                    loop {
                        weekdays |= 1 << i;
                        if i == b {
                            break;
                        }
                        i = (i + 1) % 7;
                    }
                } else {
                    weekdays |= 1 << weekday_index(item).ok_or_else(|| format!("`{item}` is not a weekday"))?;
                }
            }
            parts.remove(0);
        }
        if parts.first() == Some(&"*-*-*") {
            parts.remove(0);
        }
        let [time] = parts[..] else {
            return Err(format!("`{text}`: expected [WEEKDAYS] [*-*-*] HH:MM[:SS], daily, weekly or hourly"));
        };
        let fields: Vec<&str> = time.split(':').collect();
        if !(2..=3).contains(&fields.len()) {
            return Err(format!("`{time}` is not a time HH:MM[:SS]"));
        }
        let hours = parse_list(fields[0], 23, "hour")?;
        let minutes = parse_list(fields[1], 59, "minute")?;
        let second = match fields.get(2) {
            Some(s) => *parse_list(s, 59, "second")?.first().ok_or("no second")?,
            None => 0,
        };
        Ok(Calendar { text: text.trim().to_string(), weekdays, hours, minutes, second })
    }

    /// Seconds since the epoch of each matching moment of the UTC day starting at `day_start`.
    fn moments_of_day(&self, day: i64) -> impl Iterator<Item = i64> + '_ {
        // 1970-01-01 was a Thursday (index 3 with Monday = 0).
        let wd = (day + 3).rem_euclid(7) as u8;
        let on = self.weekdays & (1 << wd) != 0;
        self.hours.iter().filter(move |_| on).flat_map(move |h| {
            self.minutes.iter().map(move |m| day * 86400 + (*h as i64) * 3600 + (*m as i64) * 60 + self.second as i64)
        })
    }

    /// The first matching moment strictly after `t`.
    pub fn next_after(&self, t: SystemTime) -> SystemTime {
        let now = secs(t);
        let day = now.div_euclid(86400);
        for d in day..day + 8 {
            if let Some(m) = self.moments_of_day(d).find(|m| *m > now) {
                return at(m);
            }
        }
        unreachable!("every expression matches within a week")
    }

    /// The last matching moment at or before `t`.
    pub fn last_at_or_before(&self, t: SystemTime) -> SystemTime {
        let now = secs(t);
        let day = now.div_euclid(86400);
        for d in (day - 8..=day).rev() {
            if let Some(m) = self.moments_of_day(d).filter(|m| *m <= now).last() {
                return at(m);
            }
        }
        unreachable!("every expression matches within a week")
    }

    /// Whether a run was missed: the last scheduled moment is after the last run (or there was
    /// never one).
    pub fn missed(&self, last_run: Option<SystemTime>, now: SystemTime) -> bool {
        match last_run {
            None => true,
            Some(last) => self.last_at_or_before(now) > last,
        }
    }
}

fn secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn at(s: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s.max(0) as u64)
}

/// A delay in `[0, max)` that differs between boxes and runs (spreads load like
/// `RandomizedDelaySec=`), without a random-number crate.
pub fn random_delay(max: Duration, salt: &str) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let mut h: u64 = 0xcbf29ce484222325;
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    for b in salt.bytes().chain(nanos.to_le_bytes()).chain(std::process::id().to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    Duration::from_millis(h % (max.as_millis() as u64).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }
    fn fmt(t: SystemTime) -> String {
        crate::units::rfc3339(t)
    }

    #[test]
    fn daily_at_three() {
        let c = Calendar::parse("03:00").unwrap();
        assert_eq!(fmt(c.next_after(t("2026-11-22T02:59:59Z"))), "2026-11-22T03:00:00Z");
        assert_eq!(fmt(c.next_after(t("2026-11-22T03:00:00Z"))), "2026-11-23T03:00:00Z");
        assert_eq!(fmt(c.last_at_or_before(t("2026-11-22T02:00:00Z"))), "2026-11-21T03:00:00Z");
        assert_eq!(
            Calendar::parse("*-*-* 03:00:00").unwrap().next_after(t("2026-11-22T04:00:00Z")),
            t("2026-11-23T03:00:00Z")
        );
    }

    #[test]
    fn weekdays_ranges_lists_and_shorthands() {
        // 2026-11-22 is a Sunday.
        let c = Calendar::parse("Sun 04:30").unwrap();
        assert_eq!(fmt(c.next_after(t("2026-11-22T05:00:00Z"))), "2026-11-29T04:30:00Z");
        let c = Calendar::parse("Mon..Fri 02:00").unwrap();
        assert_eq!(fmt(c.next_after(t("2026-11-21T12:00:00Z"))), "2026-11-23T02:00:00Z");
        let c = Calendar::parse("Fri..Mon 02:00").unwrap();
        assert_eq!(fmt(c.next_after(t("2026-11-22T12:00:00Z"))), "2026-11-23T02:00:00Z");
        let c = Calendar::parse("0,12:15").unwrap();
        assert_eq!(fmt(c.next_after(t("2026-11-22T00:20:00Z"))), "2026-11-22T12:15:00Z");
        assert_eq!(
            fmt(Calendar::parse("weekly").unwrap().next_after(t("2026-11-22T00:00:00Z"))),
            "2026-11-23T00:00:00Z"
        );
        assert_eq!(
            fmt(Calendar::parse("hourly").unwrap().next_after(t("2026-11-22T00:20:00Z"))),
            "2026-11-22T01:00:00Z"
        );
    }

    #[test]
    fn missed_runs_are_due() {
        let c = Calendar::parse("03:00").unwrap();
        let now = t("2026-11-22T10:00:00Z");
        assert!(c.missed(None, now));
        assert!(c.missed(Some(t("2026-11-21T03:00:05Z")), now), "today's 03:00 was missed");
        assert!(!c.missed(Some(t("2026-11-22T03:00:07Z")), now));
    }

    #[test]
    fn bad_expressions_say_why() {
        for (e, needle) in
            [("25:00", "hour"), ("03:61", "minute"), ("Sunday", "expected"), ("Funday 03:00", "weekday"), ("", "empty")]
        {
            let err = Calendar::parse(e).unwrap_err();
            assert!(err.contains(needle), "{e}: {err}");
        }
    }

    #[test]
    fn random_delay_is_bounded() {
        for _ in 0..100 {
            assert!(random_delay(Duration::from_secs(60), "x") < Duration::from_secs(60));
        }
        assert_eq!(random_delay(Duration::ZERO, "x"), Duration::ZERO);
    }
}
