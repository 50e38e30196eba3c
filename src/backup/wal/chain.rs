//! The chain a restore replays: from a base backup's start segment, along the timeline ancestry
//! PostgreSQL will follow (`recovery_target_timeline = latest`), to the end of the archive. The
//! check runs on the archive's listing before anything is touched: a gap is named, never found by
//! recovery (which would take it for the end of the archive and promote early).

use std::collections::{BTreeMap, BTreeSet};

use super::name::{Lsn, Segment, WalFile};

/// One line of a timeline history file: timeline `parent` ended at `switch` (where its child
/// begins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub parent: u32,
    pub switch: Lsn,
}

/// The ancestry in a `TTTTTTTT.history` file, oldest first; refuses anything that is not one.
pub fn parse_history(text: &str) -> Result<Vec<Switch>, String> {
    let mut out: Vec<Switch> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let bad = || format!("line {}: {:?} is not `TLI LSN reason`", i + 1, line.chars().take(80).collect::<String>());
        let parent: u32 = fields.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
        let switch: Lsn = fields.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        if out.last().is_some_and(|p| p.parent >= parent || p.switch > switch) {
            return Err(format!("line {}: timelines and switch points must increase", i + 1));
        }
        out.push(Switch { parent, switch });
    }
    Ok(out)
}

/// Where each timeline on the path to `target` begins: `[(tli, begin)]`, oldest first (the first
/// timeline begins at 0).
pub fn path(target: u32, history: &[Switch]) -> Vec<(u32, Lsn)> {
    let mut out = Vec::new();
    let mut begin = Lsn(0);
    for s in history {
        out.push((s.parent, begin));
        begin = s.switch;
    }
    out.push((target, begin));
    out
}

/// The timeline PostgreSQL reads segment `number` from on `path`: the newest one that had begun.
pub fn timeline_of(path: &[(u32, Lsn)], number: u64, segment_size: u64) -> u32 {
    path.iter().rev().find(|(_, begin)| begin.0 / segment_size <= number).map(|(t, _)| *t).unwrap_or(path[0].0)
}

/// What the chain check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The timeline recovery ends on.
    pub timeline: u32,
    /// Every segment from the start to `last`, all present.
    pub segments: BTreeSet<Segment>,
    /// The last segment of the unbroken chain.
    pub last: Segment,
    /// The first missing segment after `last` that is followed by more WAL on the path (a gap),
    /// if any.
    pub gap: Option<(Segment, Segment)>,
}

/// The chain from `start` (a base backup's start LSN on `start_timeline`) through `files`.
/// `histories` maps each timeline to its parsed history. The path is to the newest timeline
/// whose ancestry holds `start_timeline` at or after `start` (PostgreSQL's `latest`).
pub fn check(
    files: &[WalFile],
    histories: &BTreeMap<u32, Vec<Switch>>,
    start_timeline: u32,
    start: Lsn,
    segment_size: u64,
) -> Result<Chain, String> {
    let mut target = start_timeline;
    let mut target_path = path(start_timeline, &[]);
    for (&tli, h) in histories {
        if tli <= target {
            continue;
        }
        // A descendant of the base backup's timeline that branched after the backup started.
        if h.iter().any(|s| s.parent == start_timeline && s.switch >= start) {
            target = tli;
            target_path = path(tli, h);
        }
    }
    // Only the part of the path from the backup's own timeline on matters.
    let from = target_path.iter().position(|(t, _)| *t == start_timeline).unwrap_or(0);
    let target_path: Vec<(u32, Lsn)> = target_path[from..].to_vec();

    let present: BTreeSet<Segment> = files
        .iter()
        .filter_map(|f| match f {
            WalFile::Segment(s) => Some(*s),
            _ => None,
        })
        .collect();
    let first = Segment::of(start_timeline, start, segment_size).number;
    // The newest segment number on the path that the archive has.
    let newest = present
        .iter()
        .filter(|s| timeline_of(&target_path, s.number, segment_size) == s.timeline && s.number >= first)
        .map(|s| s.number)
        .max();
    let Some(newest) = newest else {
        let s = Segment { timeline: start_timeline, number: first };
        return Err(format!(
            "the archive has no WAL from the base backup's start on: {} is missing",
            s.file_name(segment_size)
        ));
    };
    let mut segments = BTreeSet::new();
    let mut last = None;
    let mut gap = None;
    for n in first..=newest {
        let s = Segment { timeline: timeline_of(&target_path, n, segment_size), number: n };
        if present.contains(&s) {
            if gap.is_none() {
                segments.insert(s);
                last = Some(s);
            }
        } else if gap.is_none() {
            // The segment to resume after the gap: the next present one on the path.
            let resume = (n + 1..=newest)
                .map(|m| Segment { timeline: timeline_of(&target_path, m, segment_size), number: m })
                .find(|s| present.contains(s))
                .expect("newest is present");
            gap = Some((s, resume));
        }
    }
    let Some(last) = last else {
        let s = Segment { timeline: start_timeline, number: first };
        return Err(format!(
            "the base backup's first segment {} is missing from the archive",
            s.file_name(segment_size)
        ));
    };
    Ok(Chain { timeline: target, segments, last, gap })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn seg(t: u32, n: u64) -> WalFile {
        WalFile::Segment(Segment { timeline: t, number: n })
    }

    #[test]
    fn history_files_parse_and_nonsense_is_refused() {
        let h =
            parse_history("1\t0/3000060\tno recovery target specified\n\n2\t0/5000000\tbefore 2026-12-01\n").unwrap();
        assert_eq!(h, vec![Switch { parent: 1, switch: Lsn(0x3000060) }, Switch { parent: 2, switch: Lsn(0x5000000) }]);
        assert!(parse_history("x y z").is_err());
        assert!(parse_history("2\t0/5000000\tr\n1\t0/3000000\tr\n").is_err());
        let p = path(3, &h);
        assert_eq!(p, vec![(1, Lsn(0)), (2, Lsn(0x3000060)), (3, Lsn(0x5000000))]);
        assert_eq!(timeline_of(&p, 2, SEG), 1);
        assert_eq!(timeline_of(&p, 3, SEG), 2, "the switch segment is read from the new timeline");
        assert_eq!(timeline_of(&p, 5, SEG), 3);
    }

    #[test]
    fn the_chain_follows_the_newest_descendant_and_names_a_gap() {
        let mut histories = BTreeMap::new();
        // Timeline 2 branched from 1 at 0/4000100; segment 4 is then read from timeline 2.
        histories.insert(2, parse_history("1\t0/4000100\tr\n").unwrap());
        let files =
            vec![seg(1, 2), seg(1, 3), seg(1, 4), seg(1, 5), seg(2, 4), seg(2, 5), seg(2, 6), WalFile::History(2)];
        let c = check(&files, &histories, 1, Lsn(0x2000028), SEG).unwrap();
        assert_eq!(c.timeline, 2);
        assert_eq!(
            c.segments.iter().map(|s| s.file_name(SEG)).collect::<Vec<_>>(),
            [
                "000000010000000000000002",
                "000000010000000000000003",
                "000000020000000000000004",
                "000000020000000000000005",
                "000000020000000000000006"
            ]
        );
        assert_eq!(c.gap, None);
        // A base backup taken on timeline 1 after the branch point: timeline 2 is not its future.
        let c = check(&files, &histories, 1, Lsn(0x5000028), SEG).unwrap();
        assert_eq!((c.timeline, c.last.number), (1, 5));
        // A missing segment in the middle: the chain stops before it and names it.
        let holed: Vec<WalFile> = files.iter().filter(|f| **f != seg(2, 5)).cloned().collect();
        let c = check(&holed, &histories, 1, Lsn(0x2000028), SEG).unwrap();
        assert_eq!(c.last.file_name(SEG), "000000020000000000000004");
        let (missing, resume) = c.gap.unwrap();
        assert_eq!(
            (missing.file_name(SEG), resume.file_name(SEG)),
            ("000000020000000000000005".into(), "000000020000000000000006".into())
        );
        // Nothing from the start on: refused.
        assert!(
            check(&[seg(1, 9)], &BTreeMap::new(), 1, Lsn(0x2000028), SEG)
                .unwrap_err()
                .contains("000000010000000000000002")
        );
    }
}
