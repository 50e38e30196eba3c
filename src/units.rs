//! Units people read: byte counts, rates and times. One formatter for each, used by every floor.

use std::time::{Duration, SystemTime};

/// 1536 → "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// `n` bytes over `elapsed` as a rate: `98.2 MiB/s`.
pub fn human_rate(n: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    format!("{}/s", human_bytes((n as f64 / secs) as u64))
}

/// `t` in RFC 3339, UTC, whole seconds: `2026-11-22T17:05:01Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Now in RFC 3339, UTC, whole seconds.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// Now in RFC 3339, UTC, with microseconds (records that must order events within a second).
/// `t` in RFC 3339 with microseconds, UTC.
pub fn rfc3339_micros(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

pub fn now_rfc3339_micros() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// `t` as `20261122T170501Z`: for ids and names that sort by time.
pub fn compact_stamp(t: SystemTime) -> String {
    rfc3339(t).replace(['-', ':'], "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_rates_and_stamps() {
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_rate(10 << 20, Duration::from_secs(2)), "5.0 MiB/s");
        let t = humantime::parse_rfc3339("2026-11-22T17:05:01Z").unwrap();
        assert_eq!(rfc3339(t), "2026-11-22T17:05:01Z");
        assert_eq!(compact_stamp(t), "20261122T170501Z");
    }
}
