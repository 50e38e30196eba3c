//! Restore points that know what they hold: a named point in the WAL
//! (`pg_create_restore_point`) together with the exact row counts of every table of the
//! application's database at that point, stored as a sealed object
//! `PREFIX/restore-points/NAME.json`. A drill replays the newest base backup to such a point and
//! compares the replayed cluster's counts with these, table by table: the replayed cluster holds
//! exactly what was committed there.
//!
//! Why the counts are exact. The counts come from a snapshot exported by the transaction that
//! writes the restore point, in the same statement (one statement, one snapshot), while that
//! transaction holds SHARE locks on every counted table: no transaction that changes one of them
//! is in progress (the lock waited for them, and a committing transaction becomes visible before it
//! releases its locks) and none can start. So the snapshot and the restore point's WAL record see
//! the same committed state of those tables. The locks are held for milliseconds: the other
//! connections import the snapshot, then the locking transaction commits, and the counting
//! happens afterwards in the imported snapshot. `lock_timeout` bounds how long writers can queue
//! behind the lock request (a long transaction in the way: this point is skipped, the next try
//! comes later).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::aws::s3::S3;
use crate::backup::seal::SealKeys;
use crate::config::Config;
use crate::pg::{PgError, PgTarget, quote_ident};

/// How long writers may queue behind the restore point's table locks.
const LOCK_TIMEOUT_MS: u32 = 200;
/// Restore points kept in S3 (older ones are deleted when a new one is recorded).
const KEEP: usize = 200;
const MAX_OBJECT: usize = 4 << 20;

/// A recorded restore point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestorePoint {
    /// `caretaker-YYYYMMDDTHHMMSSZ`: what `recovery_target_name` asks for.
    pub name: String,
    /// Where its WAL record is, and the timeline it was written on.
    pub lsn: String,
    pub timeline: u32,
    pub system_identifier: String,
    pub created_at: String,
    pub database: String,
    /// `schema.table` → rows, at the restore point.
    pub counts: BTreeMap<String, i64>,
}

pub fn folder(prefix: &str) -> String {
    format!("{prefix}/restore-points/")
}

fn key(prefix: &str, name: &str) -> String {
    format!("{}{name}.json", folder(prefix))
}

fn valid_name(name: &str) -> bool {
    name.len() == "caretaker-20261203T180351Z".len()
        && name.starts_with("caretaker-")
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Records a restore point in `cfg.backup.database` of `target` with its row counts, and
/// stores it. With `switch`, the segment holding it is closed right after (`pg_switch_wal`), so
/// archiving has it within seconds.
pub async fn record(cfg: &Config, s3: &S3, target: &PgTarget, switch: bool) -> Result<RestorePoint, String> {
    let db = &cfg.backup.database;
    let name = format!("caretaker-{}", crate::units::compact_stamp(std::time::SystemTime::now()));
    let err = |what: &str, e: PgError| format!("restore point: {what}: {e}");
    let lister = target.connect(db, Duration::from_secs(30)).await.map_err(|e| err("connecting", e))?;
    let tables = super::postgres::tables_to_count(&lister).await.map_err(|e| err("listing tables", e))?;
    drop(lister);
    let locker = target.connect(db, Duration::from_secs(30)).await.map_err(|e| err("connecting", e))?;
    let mut begin = format!("BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms';");
    if !tables.is_empty() {
        let list: Vec<String> = tables.iter().map(|(s, t)| format!("{}.{}", quote_ident(s), quote_ident(t))).collect();
        begin.push_str(&format!(" LOCK TABLE {} IN SHARE MODE;", list.join(", ")));
    }
    locker.batch_execute(&begin).await.map_err(|e| err("locking the tables (writers busy?)", e.into()))?;
    // One statement: the transaction's snapshot is taken here, with the locks held.
    let row = locker
        .query_one(
            "SELECT pg_export_snapshot(), lsn::text, pg_walfile_name(lsn), \
                    (SELECT system_identifier::text FROM pg_control_system()) \
             FROM pg_create_restore_point($1) AS lsn",
            &[&name],
        )
        .await
        .map_err(|e| err("creating it", e.into()))?;
    let (snapshot, lsn, walfile, sysid): (String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let counters =
        super::postgres::counting_clients(target, db, Some(&snapshot), super::postgres::count_workers().min(2))
            .await
            .map_err(|e| err("importing its snapshot", e));
    // The writers go on now; the counting reads the imported snapshot.
    let _ = locker.batch_execute("COMMIT").await;
    let counts = super::postgres::count_rows(&counters?, tables).await.map_err(|e| err("counting rows", e))?;
    if switch {
        let c = target.connect(db, Duration::from_secs(30)).await.map_err(|e| err("connecting", e))?;
        c.batch_execute("SELECT pg_switch_wal()").await.map_err(|e| err("closing its segment", e.into()))?;
    }
    let timeline = u32::from_str_radix(walfile.get(..8).unwrap_or("0"), 16).unwrap_or(0);
    let rp = RestorePoint {
        name,
        lsn,
        timeline,
        system_identifier: sysid,
        created_at: crate::units::now_rfc3339(),
        database: db.clone(),
        counts,
    };
    let keys = SealKeys::for_config(cfg).map_err(|e| e.to_string())?;
    let bucket = cfg.backup.bucket.clone().ok_or("no backup bucket")?;
    s3.put_object(&bucket, &key(&cfg.backup.prefix, &rp.name), keys.seal(&rp)).await.map_err(|e| e.to_string())?;
    prune(cfg, s3, &bucket).await;
    Ok(rp)
}

async fn prune(cfg: &Config, s3: &S3, bucket: &str) {
    let Ok(mut keys) = s3.list_keys(bucket, &folder(&cfg.backup.prefix)).await else { return };
    keys.sort();
    let excess = keys.len().saturating_sub(KEEP);
    for k in &keys[..excess] {
        let _ = s3.delete_object(bucket, k).await;
    }
}

/// Every restore point in S3 whose seal verifies, oldest first; others are named in the second
/// list (never used).
pub async fn list(cfg: &Config, s3: &S3) -> Result<(Vec<RestorePoint>, Vec<String>), String> {
    let bucket = cfg.backup.bucket.clone().ok_or("no backup bucket")?;
    let keys_in = SealKeys::for_config(cfg).map_err(|e| e.to_string())?;
    let mut names = s3.list_keys(&bucket, &folder(&cfg.backup.prefix)).await.map_err(|e| e.to_string())?;
    names.sort();
    let (mut good, mut bad) = (Vec::new(), Vec::new());
    for k in names {
        let Some(name) = k.strip_prefix(&folder(&cfg.backup.prefix)).and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if !valid_name(name) {
            bad.push(format!("{k}: not a restore point's name"));
            continue;
        }
        let Some(bytes) = s3.get_small(&bucket, &k, MAX_OBJECT).await.map_err(|e| e.to_string())? else { continue };
        match keys_in.open(&bytes).and_then(|v| serde_json::from_value::<RestorePoint>(v).map_err(|e| e.to_string())) {
            Ok(rp) if rp.name == name => good.push(rp),
            Ok(_) => bad.push(format!("{k}: its content names another restore point")),
            Err(e) => bad.push(format!("{k}: {e}")),
        }
    }
    Ok((good, bad))
}

/// The tables whose counts differ: `(table, at the restore point, in the copy)` (-1: missing).
pub fn differences(rp: &RestorePoint, actual: &BTreeMap<String, i64>) -> Vec<(String, i64, i64)> {
    rp.counts
        .iter()
        .filter_map(|(t, e)| {
            let a = actual.get(t).copied().unwrap_or(-1);
            (a != *e).then(|| (t.clone(), *e, a))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_strict() {
        assert!(valid_name("caretaker-20261203T180351Z"));
        for bad in ["caretaker-2026", "caretaker-20261203T180351Z/../x", "other-20261203T1803511Z", ""] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
