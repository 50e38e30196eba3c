//! Which backups to keep: the newest backup of each of the last `daily` days that have one, the
//! newest of each of the last `weekly` weeks (Monday to Sunday, UTC) that have one — and, always,
//! the newest *verified* backup (safety rule 4) and the newest backup of all. Pure: it decides,
//! the caller deletes (manifest first, then data, so an interrupted prune never leaves a manifest
//! without its data).

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// What retention needs to know of one backup (of one kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRef {
    pub id: String,
    pub started: SystemTime,
    /// A restore drill passed on it.
    pub verified: bool,
}

/// Why a backup is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub keep: bool,
    pub reasons: Vec<String>,
}

fn day_index(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0).div_euclid(86400)
}

/// Monday-based week number (1970-01-01 was a Thursday).
fn week_index(t: SystemTime) -> i64 {
    (day_index(t) + 3).div_euclid(7)
}

/// Decides for every backup of one kind; the result is in the input's order.
pub fn plan(backups: &[BackupRef], daily: usize, weekly: usize) -> Vec<Decision> {
    let mut order: Vec<usize> = (0..backups.len()).collect();
    order.sort_by(|a, b| {
        backups[*b].started.cmp(&backups[*a].started).then_with(|| backups[*b].id.cmp(&backups[*a].id))
    });
    let mut reasons: Vec<Vec<String>> = vec![vec![]; backups.len()];

    if let Some(&newest) = order.first() {
        reasons[newest].push("newest backup".into());
    }
    if let Some(&v) = order.iter().find(|&&i| backups[i].verified) {
        reasons[v].push("newest verified backup".into());
    }
    let mut days = BTreeSet::new();
    let mut weeks = BTreeSet::new();
    for &i in &order {
        let d = day_index(backups[i].started);
        if days.len() < daily && days.insert(d) {
            reasons[i].push(format!("daily #{}", days.len()));
        }
        let w = week_index(backups[i].started);
        if weeks.len() < weekly && weeks.insert(w) {
            reasons[i].push(format!("weekly #{}", weeks.len()));
        }
    }
    backups.iter().zip(reasons).map(|(b, r)| Decision { id: b.id.clone(), keep: !r.is_empty(), reasons: r }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(day: u64, hour: u64) -> SystemTime {
        // Day 0 = Monday 2026-11-02.
        humantime::parse_rfc3339("2026-11-02T00:00:00Z").unwrap() + Duration::from_secs(day * 86400 + hour * 3600)
    }

    fn history(days: u64) -> Vec<BackupRef> {
        (0..days)
            .flat_map(|d| [(d, 3), (d, 15)])
            .map(|(d, h)| BackupRef { id: format!("d{d:02}h{h:02}"), started: at(d, h), verified: false })
            .collect()
    }

    fn kept(plan: &[Decision]) -> Vec<String> {
        plan.iter().filter(|d| d.keep).map(|d| d.id.clone()).collect()
    }

    #[test]
    fn keeps_exactly_seven_daily_and_four_weekly() {
        let h = history(35); // five weeks, two backups a day
        let p = plan(&h, 7, 4);
        let mut want: Vec<String> = (28..35).map(|d| format!("d{d:02}h15")).collect();
        // Newest of each of the last 4 weeks: week 4 is covered by the dailies (its Sunday d34 is one);
        // weeks 3, 2 and 1 keep their Sundays.
        want.extend(["d13h15", "d20h15", "d27h15"].map(String::from));
        want.sort();
        let mut got = kept(&p);
        got.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn the_newest_verified_backup_is_never_deleted() {
        let mut h = history(40);
        h[2].verified = true; // an old one: the only verified backup
        let p = plan(&h, 7, 4);
        assert!(p[2].keep, "{:?}", p[2]);
        assert!(p[2].reasons.iter().any(|r| r.contains("verified")));
        // With nothing to keep by count, the newest and the newest verified still stay.
        let p = plan(&h, 0, 0);
        assert_eq!(kept(&p), vec!["d01h03".to_string(), "d39h15".to_string()]);
    }

    #[test]
    fn empty_and_single() {
        assert!(plan(&[], 7, 4).is_empty());
        let one = [BackupRef { id: "x".into(), started: at(0, 0), verified: false }];
        assert!(plan(&one, 0, 0)[0].keep);
    }
}
