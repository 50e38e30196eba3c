//! The emails backups send: one per failure while it persists (the incident key deduplicates),
//! one when it recovers. Each says what failed, that earlier backups are intact, and what to run.

use super::run::Kind;
use crate::notify::Alert;

/// Incident key of a kind's backups.
pub fn backup_key(kind: Kind) -> String {
    format!("backup:{}", kind.as_str())
}

pub fn backup_failed(kind: Kind, error: &str) -> Alert {
    let k = kind.as_str();
    Alert {
        subject: format!("{k} backup failed: {}", first_line(error)),
        what_failed: format!("The {k} backup failed: {error}"),
        what_done: "Nothing was published: a backup exists only once its manifest is written, after the producer \
                    exited 0 and every part was uploaded; the partial upload was aborted. The next scheduled run will \
                    try again."
            .into(),
        what_safe: "Earlier backups are intact and listed by `caretaker backup list`. The live data is untouched."
            .into(),
        next: format!("journalctl -u caretaker -n 100; fix the cause, then `caretaker backup now --kind {k}`"),
    }
}

pub fn drill_failed(kind: Kind, id: &str, error: &str) -> Alert {
    let k = kind.as_str();
    Alert {
        subject: format!("{k} backup {id} failed its restore drill"),
        what_failed: format!("The restore drill of the {k} backup {id} failed: {error}"),
        what_done: "The scratch copy was dropped; verify.json beside the backup records the failure. Retention keeps \
                    the newest backup that did verify."
            .into(),
        what_safe: "The live data is untouched. This backup may not be restorable: do not rely on it.".into(),
        next: format!(
            "caretaker backup list; take a fresh backup (`caretaker backup now --kind {k}`) and verify it \
             (`caretaker backup verify latest --kind {k}`)"
        ),
    }
}

pub fn prune_failed(error: &str) -> Alert {
    Alert {
        subject: format!("backup pruning failed: {}", first_line(error)),
        what_failed: format!("Applying retention failed: {error}"),
        what_done: "Pruning stopped where it failed; it deletes a backup's manifest first, so a half-deleted backup \
                    is no longer listed, never half-listed."
            .into(),
        what_safe: "Backups that were to be kept are untouched; the bucket may hold more than retention asks.".into(),
        next: "journalctl -u caretaker -n 100; then `caretaker backup prune --dry-run` and `caretaker backup prune`"
            .into(),
    }
}

/// Incident key of objects in the backup prefix that caretaker did not write.
pub const FOREIGN: &str = "backup:foreign";

/// Objects that look like backups but are not sealed by this box (or not where caretaker writes
/// them): someone else wrote the bucket, or the box lost its key. Sent once while they stay.
pub fn foreign_objects(ignored: &[super::run::Ignored]) -> Alert {
    let list: Vec<String> = ignored.iter().take(20).map(|i| format!("  {}: {}", i.key, i.why)).collect();
    let more = ignored.len().saturating_sub(20);
    Alert {
        subject: format!("{} object(s) in the backup bucket are not backups this box wrote", ignored.len()),
        what_failed: format!(
            "These manifests are not sealed by this box's backup keys or are not where caretaker writes them:\n{}{}",
            list.join("\n"),
            if more > 0 { format!("\n  … and {more} more") } else { String::new() }
        ),
        what_done: "They are ignored: never listed, drilled, restored, or counted or deleted by retention.".into(),
        what_safe: "Sealed backups are unaffected. If these are yours (written before sealing, or with a key this box \
                    no longer has), they can still be restored by hand with stock tools."
            .into(),
        next: "Find out who can write the bucket (CloudTrail data events); if the box lost its key, put the seal \
               key or identity back in its env file. `caretaker backup prune --dry-run` lists what is ignored."
            .into(),
    }
}

fn first_line(s: &str) -> &str {
    let line = s.lines().next().unwrap_or_default();
    match line.char_indices().nth(120) {
        Some((i, _)) => &line[..i],
        None => line,
    }
}

/// Incident keys of WAL archiving.
pub const WAL_BACKLOG: &str = "wal:backlog";
pub const WAL_CONFLICT: &str = "wal:conflict";
pub const WAL_DISK: &str = "wal:disk";
pub const WAL_GAP: &str = "wal:gap";
pub const WAL_TIP: &str = "wal:tip";

pub fn wal_backlog(ready: usize, lag: Option<u64>, last_failure: &str) -> Alert {
    let lag = lag.map(|s| format!(", the newest archived segment is {s} s old")).unwrap_or_default();
    Alert {
        subject: format!("WAL archiving is behind: {ready} segments wait{lag}"),
        what_failed: format!(
            "{ready} WAL segments are waiting to be archived to S3{lag}. Last error: {}",
            if last_failure.is_empty() { "none reported (is caretaker.service running?)" } else { last_failure }
        ),
        what_done: "PostgreSQL keeps every segment that was not acknowledged and archive_command keeps retrying; \
                    nothing is skipped."
            .into(),
        what_safe: "At risk: the commits in those segments exist only on this box's data volume. Losing the volume \
                    now loses them; point-in-time recovery ends at the newest archived segment."
            .into(),
        next: "caretaker status; caretaker doctor (S3 reachable? credentials?); journalctl -u caretaker -u postgresql -n 100"
            .into(),
    }
}

/// The live RPO is above `[backup] wal-tip-lag-alert`: commits older than that are on this box only.
pub fn wal_tip(lag_seconds: f64, lag_bytes: u64, failing: Option<&str>, archive_timeout: u64) -> Alert {
    let why = match failing {
        Some(e) => format!("The WAL tip cannot stream from PostgreSQL: {e}"),
        None => format!(
            "The WAL tip streams, but S3 has not acknowledged {} of flushed WAL for {lag_seconds:.0} s",
            crate::units::human_bytes(lag_bytes)
        ),
    };
    Alert {
        subject: format!("Commits are not reaching S3 within seconds (RPO {lag_seconds:.0} s)"),
        what_failed: why,
        what_done: "The daemon keeps retrying (the tip reconnects and stores what it holds). Whole segments still go \
                    to S3 through archive_command, which PostgreSQL waits for."
            .into(),
        what_safe: format!(
            "At risk: commits since the last chunk in S3 exist only on this box. Losing the box now loses them — up to \
             archive-timeout ({archive_timeout} s) while the tip is down, more if archiving is behind too."
        ),
        next: "caretaker status (wal-tip line); journalctl -u caretaker -n 100 | grep 'WAL tip'; SELECT * FROM \
               pg_stat_replication WHERE application_name = 'caretaker-wal-tip'; caretaker doctor"
            .into(),
    }
}

pub fn wal_conflict(error: &str) -> Alert {
    Alert {
        subject: "WAL archive conflict: an archived segment differs from PostgreSQL's".into(),
        what_failed: format!("Archiving refused to overwrite an object: {error}"),
        what_done: "Nothing was overwritten. PostgreSQL keeps the segment and retries; archiving is stuck until this \
                    is resolved."
            .into(),
        what_safe: "The archive is intact. Two clusters may be writing into one backup prefix (an old instance still \
                    running, or a restored copy): only one may."
            .into(),
        next: "Stop the other writer (check other instances of this deployment); then see README 'WAL archive \
               conflict'."
            .into(),
    }
}

pub fn wal_disk(pg_wal: u64, free: u64) -> Alert {
    Alert {
        subject: "pg_wal is growing toward the volume's free space".into(),
        what_failed: format!(
            "pg_wal holds {} and the data volume has {} free: unarchived WAL is piling up",
            crate::units::human_bytes(pg_wal),
            crate::units::human_bytes(free)
        ),
        what_done: "Nothing yet: PostgreSQL stops accepting writes when the volume fills.".into(),
        what_safe: "Archived WAL and backups in S3 are intact.".into(),
        next: "Fix archiving first (caretaker status, journalctl -u caretaker); grow the volume if it must wait".into(),
    }
}

pub fn wal_gap(gap: &str) -> Alert {
    Alert {
        subject: "the WAL archive has a gap: point-in-time recovery cannot pass it".into(),
        what_failed: format!("The chain check found {gap}"),
        what_done: "Nothing: a restore refuses to replay across a gap (it would end early and lose data).".into(),
        what_safe: "Restores to times before the gap still work; the logical dumps are unaffected.".into(),
        next: "Take a base backup now (`caretaker backup now --kind base`): the window restarts from it".into(),
    }
}
