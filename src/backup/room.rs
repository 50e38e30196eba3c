//! Room for a second copy. A restore, a drill and a migration each build a whole new database next
//! to the live one, on the same filesystem: if that filesystem fills, the live PostgreSQL PANICs
//! ("No space left on device"), every session dies, and it does not come back by itself. So each
//! one first checks that the new copy fits and still leaves a reserve to the live cluster, and
//! refuses naming the numbers; and while it loads, it watches the free space and stops well before
//! the reserve is touched (its new database is then dropped).
//!
//! The need: the database size the backup recorded (`pg_database_size` at backup time, in the
//! manifest since caretaker 0.1 records it) — or, for older manifests, twice the dump's plaintext
//! size (a custom-format dump without compression holds the rows once and no indexes; restored
//! with its indexes a database measured 1.35× its dump here on pgbench data and more with PostGIS
//! indexes) — plus the WAL the load writes: about as much as the data, at most `max_wal_size`
//! before checkpoints recycle it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pg::PgTarget;
use crate::units::human_bytes;

/// The filesystem holding PostgreSQL's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub dir: PathBuf,
    /// Bytes an unprivileged writer may still use (PostgreSQL does not run as root).
    pub free: u64,
    pub total: u64,
}

async fn show(admin: &tokio_postgres::Client, name: &str) -> Option<String> {
    admin.query_one(&format!("SHOW {name}"), &[]).await.ok().map(|r| r.get::<_, String>(0))
}

/// Where PostgreSQL keeps its data, as it says (else the configured data dir). What PostgreSQL
/// says is only used to measure: a path that is not absolute is not used.
pub async fn data_dir(admin: &tokio_postgres::Client, configured: &Path) -> PathBuf {
    show(admin, "data_directory")
        .await
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| configured.to_path_buf())
}

/// Where PostgreSQL keeps its data and its `max_wal_size`.
async fn where_and_wal(target: &PgTarget, configured: &Path) -> (PathBuf, u64) {
    let Ok(admin) = target.connect("postgres", Duration::from_secs(10)).await else {
        return (configured.to_path_buf(), 1 << 30);
    };
    let dir = data_dir(&admin, configured).await;
    let wal = show(&admin, "max_wal_size").await.and_then(|s| parse_size(&s)).unwrap_or(1 << 30).min(64 << 30);
    (dir, wal)
}

/// PostgreSQL's size notation (`1GB`, `64MB`, `512kB`, a bare number of MB for max_wal_size).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..digits].parse().ok()?;
    let unit = match s[digits..].trim() {
        "" | "MB" => 1 << 20,
        "B" => 1,
        "kB" => 1 << 10,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(unit)
}

/// Free and total bytes of the filesystem holding `dir`.
pub fn measure(dir: &Path) -> std::io::Result<Room> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let frsize = st.fragment_size() as u64;
    Ok(Room { dir: dir.to_path_buf(), free: st.blocks_available() as u64 * frsize, total: st.blocks() as u64 * frsize })
}

/// The reserve the live cluster keeps: the configured bytes, at least 5 % of the filesystem.
pub fn reserve(configured: u64, total: u64) -> u64 {
    configured.max(total / 20)
}

/// What a load will need, from what the backup says about itself (bounded: a manifest cannot make
/// the estimate overflow or go to zero).
pub fn estimate(database_bytes: Option<u64>, plain_bytes: u64) -> u64 {
    match database_bytes {
        Some(b) if b > 0 => b.saturating_add(b / 10),
        _ => plain_bytes.saturating_mul(2),
    }
    .max(16 << 20)
}

/// A plan that fits: where, and the free space under which the load stops.
#[derive(Debug, Clone)]
pub struct Plan {
    pub dir: PathBuf,
    pub floor: u64,
}

/// Checks that `need` bytes plus the WAL fit beside the live data and leave the reserve; the
/// refusal names every number. `what` says what is being built ("the restore of backup X").
pub async fn check(
    target: &PgTarget,
    configured_dir: &Path,
    configured_reserve: u64,
    need: u64,
    what: &str,
) -> Result<Plan, String> {
    let (dir, max_wal) = where_and_wal(target, configured_dir).await;
    // The load writes about as much WAL as it writes data (new tables are WAL-logged, indexes
    // too), and checkpoints recycle it past max_wal_size: whichever is less.
    let wal = max_wal.min(need);
    let room = measure(&dir).map_err(|e| format!("cannot measure the free space of {}: {e}", dir.display()))?;
    let floor = reserve(configured_reserve, room.total);
    let want = need.saturating_add(wal).saturating_add(floor);
    if room.free < want {
        return Err(format!(
            "not enough room for {what} on the filesystem of {}: it needs about {} (the new database ~{} \
             + WAL up to {}) and leaves a reserve of {} to the live cluster, {} in all, but {} of {} is free. \
             Nothing was started. Free space (`caretaker restore list-kept`, then `caretaker restore drop-kept NAME`) \
             or grow the volume",
            dir.display(),
            human_bytes(need.saturating_add(wal)),
            human_bytes(need),
            human_bytes(wal),
            human_bytes(floor),
            human_bytes(want),
            human_bytes(room.free),
            human_bytes(room.total),
        ));
    }
    Ok(Plan { dir, floor })
}

/// Resolves once free space under `plan.dir` drops below the reserve (checked twice a second),
/// with the numbers; never while there is room.
pub async fn until_short(plan: &Plan) -> String {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Ok(room) = measure(&plan.dir)
            && room.free < plan.floor
        {
            return format!(
                "stopped: only {} of {} free on the filesystem of {}, the reserve the live cluster keeps is {}; \
                 the new database is dropped and the live one was never touched",
                human_bytes(room.free),
                human_bytes(room.total),
                plan.dir.display(),
                human_bytes(plan.floor)
            );
        }
    }
}

/// After a restore: a line to warn with when the filesystem is nearly full (under 15 % free),
/// saying how much the kept previous database would give back.
pub fn nearly_full(room: &Room, kept: Option<(&str, u64)>) -> Option<String> {
    if room.total == 0 || room.free.saturating_mul(100) / room.total >= 15 {
        return None;
    }
    let back = match kept {
        Some((name, bytes)) => {
            format!(
                "; `caretaker restore drop-kept {name}` gives back about {} once you no longer need it",
                human_bytes(bytes)
            )
        }
        None => String::new(),
    };
    Some(format!(
        "warning: the filesystem of {} is {}% full ({} free of {}){back}",
        room.dir.display(),
        100 - room.free.saturating_mul(100) / room.total,
        human_bytes(room.free),
        human_bytes(room.total)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_postgres_notation() {
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("64MB"), Some(64 << 20));
        assert_eq!(parse_size("512kB"), Some(512 << 10));
        assert_eq!(parse_size("80"), Some(80 << 20));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("99999999999999TB"), None);
    }

    #[test]
    fn the_estimate_uses_the_recorded_size_else_twice_the_dump_and_the_reserve_is_at_least_5_percent() {
        assert_eq!(estimate(Some(1000 << 20), 600 << 20), 1100 << 20);
        assert_eq!(estimate(None, 600 << 20), 1200 << 20);
        assert_eq!(estimate(Some(0), 1), 16 << 20);
        assert_eq!(estimate(None, u64::MAX), u64::MAX);
        assert_eq!(reserve(512 << 20, 100 << 30), 5 << 30);
        assert_eq!(reserve(512 << 20, 4 << 30), 512 << 20);
    }

    #[test]
    fn a_nearly_full_volume_is_said_with_what_drop_kept_gives_back() {
        let room = Room { dir: "/data".into(), free: 10 << 20, total: 100 << 20 };
        let w = nearly_full(&room, Some(("zmanim_pre_restore_20261122_170501", 40 << 20))).unwrap();
        assert!(w.contains("90% full") && w.contains("drop-kept zmanim_pre_restore_20261122_170501"), "{w}");
        assert!(w.contains("40.0 MiB"), "{w}");
        assert!(nearly_full(&Room { free: 50 << 20, ..room }, None).is_none());
    }
}
