//! The restore firstboot runs on a blank volume (boot::recovery decided it), before PostgreSQL
//! starts: the newest base backup and its WAL to the end of the archive, built and verified beside
//! the (empty) data directory exactly as a point-in-time restore builds it, then renamed into
//! place. Nothing is swapped: no service runs yet. Without any base backup the newest logical
//! dump that verifies becomes a new cluster instead (see [`super::dump_build`]).
//!
//! What S3 says is sorted three ways, because the difference decides whether an empty cluster may
//! be made: it could not be read (retry, never initdb); it holds nothing of this deployment (an
//! empty cluster is right); it holds backups that cannot be restored at boot (stop, say why).

use std::path::Path;
use std::time::SystemTime;

use super::pitr::{self, Target};
use super::run::{self, Kind};
use super::wal::archive::Archive;
use crate::config::Config;

/// Why no restore happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AtBootError {
    /// S3 or the keys cannot be read now, or another instance holds the prefix: wait.
    Wait(String),
    /// Backups exist, and this restore cannot use them.
    Refused(String),
}

/// What happened.
#[derive(Debug, Clone, PartialEq)]
pub enum AtBoot {
    Restored { summary: String, details: serde_json::Value },
    NothingToRestore(String),
}

/// Restores the newest base backup with its WAL into `cfg.services.postgres.data_dir`, which must
/// be missing or empty.
pub async fn restore_newest(cfg: &Config, progress: &(dyn Fn(String) + Send + Sync)) -> Result<AtBoot, AtBootError> {
    let unreadable = |e: &dyn std::fmt::Display| AtBootError::Wait(format!("the backups in S3 cannot be read: {e}"));
    let bucket = cfg.backup.bucket.clone().ok_or(AtBootError::Refused("no backup bucket".into()))?;
    let s3 = run::s3_for(cfg).await.map_err(|e| unreadable(&e))?;
    // A prefix with no manifest at all is a new deployment: nothing to restore, and no key is
    // needed to know it (on a first boot the keys may not be there yet).
    let prefix = format!("{}/", cfg.backup.prefix);
    let keys_there = s3.list_keys(&bucket, &prefix).await.map_err(|e| unreadable(&e))?;
    if keys_there.is_empty() {
        return Ok(AtBoot::NothingToRestore(format!("s3://{bucket}/{prefix} is empty (a new deployment)")));
    }
    if !keys_there.iter().any(|k| k.ends_with("/manifest.json")) {
        // WAL or a lease without any backup: something ran here. An empty cluster may be right
        // (it never took a backup) or not (its backups were hidden): an operator decides.
        return Err(AtBootError::Refused(format!(
            "s3://{bucket}/{prefix} holds {} object(s) but no backup (e.g. {}): set recovery.on-blank-volume = \
             \"empty\" if an empty database is right",
            keys_there.len(),
            keys_there[0]
        )));
    }
    let no_keys = |e: &dyn std::fmt::Display| {
        AtBootError::Refused(format!(
            "s3://{bucket}/{prefix} holds backups, but this box cannot read them: {e} (put the keys in SSM and \
             `systemctl restart caretaker-firstboot`)"
        ))
    };
    let archive = Archive::for_config(cfg, s3.clone()).map_err(|e| no_keys(&e))?;
    // One writer per prefix: a box still running on these backups (or one restoring them right
    // now) holds the lease; this one waits until it stops renewing it.
    let holder = run::instance_id();
    match super::lease::acquire(&s3, &bucket, &cfg.backup.prefix, &archive.keys, &holder, cfg.recovery.lease_ttl.get())
        .await
    {
        Ok(super::lease::Held::TakenOver(old)) => progress(format!(
            "took over the backup prefix's lease from instance {} (not renewed since {})",
            old.holder, old.renewed_at
        )),
        Ok(_) => progress(format!("holding the backup prefix's lease as {holder}")),
        Err(e @ super::lease::LeaseError::Busy(..)) => return Err(AtBootError::Wait(e.to_string())),
        Err(e @ super::lease::LeaseError::Foreign(..)) => return Err(AtBootError::Refused(e.to_string())),
        Err(super::lease::LeaseError::S3(e)) => return Err(unreadable(&e)),
    }
    progress(format!("looking for backups in s3://{bucket}/{}/", cfg.backup.prefix));
    let survey = pitr::survey(cfg, &s3, &archive).await.map_err(|e| unreadable(&e))?;
    if survey.usable() == 0 {
        if survey.any_base {
            return Err(AtBootError::Refused(format!(
                "there are base backups, but none can be restored with its WAL: {}",
                survey.reasons.join("; ")
            )));
        }
        let dumps = run::list(cfg, &s3, Kind::Postgres).await.map_err(|e| unreadable(&e))?;
        if !dumps.is_empty() {
            return restore_dump(cfg, &s3, &dumps, progress).await;
        }
        let redis = restore_redis_rdb(cfg, &s3, progress).await?;
        return Ok(AtBoot::NothingToRestore(format!(
            "s3://{bucket}/{}/ holds no PostgreSQL backup (base or logical){}",
            cfg.backup.prefix,
            redis.map(|(id, keys)| format!("; Redis restored from backup {id} ({keys} keys)")).unwrap_or_default()
        )));
    }
    let plans = survey.plans_to_latest();
    if plans.is_empty() {
        // The newest chain has a gap: plan() says it the way a restore by hand would.
        let e = pitr::plan(cfg, &s3, &archive, Target::Latest).await.err().map(|e| e.to_string());
        return Err(AtBootError::Refused(e.unwrap_or_else(|| "no base backup has a complete WAL chain".into())));
    }
    let data = cfg.services.postgres.data_dir.clone();
    let parent = data.parent().unwrap_or(Path::new("/")).to_path_buf();
    let mut failures = Vec::new();
    let mut built = None;
    for (n, plan) in plans.iter().enumerate() {
        progress(format!(
            "restoring base backup {} ({}) and {} WAL segments on timeline {} to the end of the archive (window {}){}",
            plan.base.id,
            plan.base.finished_at,
            plan.chain.segments.len(),
            plan.chain.timeline,
            plan.window,
            if n > 0 { format!(" — the {} newer one(s) failed", n) } else { String::new() }
        ));
        let need = plan.base.plain_bytes.saturating_add(plan.base.plain_bytes / 10);
        if let Ok(room) = super::room::measure(&parent)
            && room.free < need
        {
            return Err(AtBootError::Refused(format!(
                "{} has {} free, the restore needs about {}: grow the volume",
                parent.display(),
                crate::units::human_bytes(room.free),
                crate::units::human_bytes(need)
            )));
        }
        let ts = super::swap::stamp(SystemTime::now());
        let dir = pitr::build_dir(&data, &ts);
        // A failed build removed its copy: nothing half-restored is left, and the next older
        // backup (with more WAL to replay) is tried.
        let archive = Archive::for_config(cfg, s3.clone()).map_err(|e| unreadable(&e))?;
        match pitr::build(cfg, &s3, archive, plan, &dir, &pitr::Tools::for_config(cfg), progress).await {
            Ok(b) => {
                built = Some(b);
                break;
            }
            Err(e) => {
                let left = plans.len() - n - 1;
                tracing::error!(
                    "recovery at boot: base backup {} failed: {e}; {left} older one(s) left to try",
                    plan.base.id
                );
                progress(format!("base backup {} failed: {e}; {left} older one(s) left to try", plan.base.id));
                failures.push(format!("{}: {e}", plan.base.id));
            }
        }
    }
    let Some(built) = built else {
        return Err(AtBootError::Refused(format!(
            "every base backup with a complete WAL chain failed ({} tried): {}",
            failures.len(),
            failures.join("; ")
        )));
    };
    place(&data, &built.dir)?;
    let redis = restore_redis_rdb(cfg, &s3, progress).await?;
    let summary = format!(
        "restored base backup {} and its WAL to the end of the archive (last commit {}); {} tables, {} rows in {}{}",
        built.base,
        built.last_commit.as_deref().unwrap_or("none replayed"),
        built.tables,
        built.rows,
        cfg.backup.database,
        redis.as_ref().map(|(id, keys)| format!("; Redis from backup {id} ({keys} keys)")).unwrap_or_default()
    );
    progress(summary.clone());
    let mut details = serde_json::json!({ "postgres": built });
    if let Some((id, keys)) = redis {
        details["redis"] = serde_json::json!({ "backup": id, "keys": keys });
    }
    Ok(AtBoot::Restored { summary, details })
}

/// How many logical dumps the restore at boot tries, newest first, before it gives up.
pub const DUMPS_TRIED: usize = 3;

/// No base backup, only logical dumps: the newest that loads and verifies (of the newest
/// [`DUMPS_TRIED`]) becomes the cluster, built beside the data directory (see
/// [`super::dump_build`]), then Redis.
async fn restore_dump(
    cfg: &Config,
    s3: &crate::aws::s3::S3,
    dumps: &[run::Manifest],
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<AtBoot, AtBootError> {
    let data = cfg.services.postgres.data_dir.clone();
    let tried: Vec<&run::Manifest> = dumps.iter().rev().take(DUMPS_TRIED).collect();
    let mut failures = Vec::new();
    let mut built = None;
    for (n, m) in tried.iter().enumerate() {
        progress(format!(
            "no base backup: restoring logical backup {} (taken {}, {} rows in {} tables){}",
            m.id,
            m.started_at,
            run::row_counts(m).values().sum::<i64>(),
            run::row_counts(m).len(),
            if n > 0 { format!(" — the {n} newer one(s) failed") } else { String::new() }
        ));
        let dir = pitr::build_dir(&data, &super::swap::stamp(SystemTime::now()));
        match super::dump_build::build(cfg, s3, m, &dir, progress).await {
            Ok(b) => {
                built = Some(b);
                break;
            }
            Err(e) => {
                let left = tried.len() - n - 1;
                tracing::error!(
                    "recovery at boot: logical backup {} failed: {e}; {left} older one(s) left to try",
                    m.id
                );
                progress(format!("logical backup {} failed: {e}; {left} older one(s) left to try", m.id));
                failures.push(format!("{}: {e}", m.id));
            }
        }
    }
    let Some(built) = built else {
        return Err(AtBootError::Refused(format!(
            "every logical backup tried failed (the newest {} of {}): {}",
            tried.len(),
            dumps.len(),
            failures.join("; ")
        )));
    };
    place(&data, &built.dir)?;
    let redis = restore_redis_rdb(cfg, s3, progress).await?;
    let summary = format!(
        "restored logical backup {} (taken {}); {} tables, {} rows in {}{}",
        built.backup,
        built.taken_at,
        built.tables,
        built.rows,
        cfg.backup.database,
        redis.as_ref().map(|(id, keys)| format!("; Redis from backup {id} ({keys} keys)")).unwrap_or_default()
    );
    progress(summary.clone());
    let mut details = serde_json::json!({ "postgres_dump": built });
    if let Some((id, keys)) = redis {
        details["redis"] = serde_json::json!({ "backup": id, "keys": keys });
    }
    Ok(AtBoot::Restored { summary, details })
}

/// The data directory is empty (the decision checked): it makes room for the verified copy
/// `built`, which is removed if it cannot be put there.
fn place(data: &Path, built: &Path) -> Result<(), AtBootError> {
    let parent = data.parent().unwrap_or(Path::new("/"));
    let go = || -> std::io::Result<()> {
        match std::fs::remove_dir(data) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::rename(built, data)?;
        crate::fsutil::sync_dir(parent).map_err(|e| std::io::Error::other(e.to_string()))
    };
    go().map_err(|e| {
        let _ = std::fs::remove_dir_all(built);
        AtBootError::Refused(format!("cannot put the restored copy at {}: {e}", data.display()))
    })
}

/// The newest Redis backup into `services.redis.data-dir/dump.rdb` before Redis starts, its hashes
/// and RDB magic checked (the key count is the manifest's: Redis is not running to ask). Only when
/// there is no RDB there yet; none when there is no Redis backup. (backup id, keys).
async fn restore_redis_rdb(
    cfg: &Config,
    s3: &crate::aws::s3::S3,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<Option<(String, i64)>, AtBootError> {
    let wait = |e: &dyn std::fmt::Display| AtBootError::Wait(format!("the backups in S3 cannot be read: {e}"));
    let dir = cfg.services.redis.data_dir.clone();
    let rdb = dir.join("dump.rdb");
    if std::fs::symlink_metadata(&rdb).is_ok() {
        progress(format!("{} exists: Redis keeps it", rdb.display()));
        return Ok(None);
    }
    let Some(m) = run::list(cfg, s3, Kind::Redis).await.map_err(|e| wait(&e))?.pop() else {
        return Ok(None);
    };
    let keys = m.details["dbsize"].as_i64().unwrap_or(-1);
    progress(format!("restoring Redis backup {} ({}, {keys} keys) to {}", m.id, m.finished_at, rdb.display()));
    let bucket = cfg.backup.bucket.clone().unwrap_or_default();
    let key = format!("{}{}", run::folder(&cfg.backup.prefix, Kind::Redis, &m.id), run::DATA);
    let download = dir.join(format!(".dump.rdb.boot-restore-{}", std::process::id()));
    let fetched = async {
        let f = super::restore::create_private(&download, &dir, &rdb)
            .map_err(|e| format!("{}: {e}", download.display()))?;
        let decryption = super::fetch::decryption(cfg).map_err(|e| e.to_string())?;
        let mut w = tokio::io::BufWriter::new(tokio::fs::File::from_std(f));
        let fetched =
            super::fetch::fetch_into(s3, &bucket, &key, super::fetch::Expect::of(&m), decryption, &mut w, |_, _| {})
                .await
                .map_err(|e| e.to_string())?;
        let f = w.into_inner();
        f.sync_all().await.map_err(|e| e.to_string())?;
        let problems = super::fetch::check(&m, &fetched);
        if !problems.is_empty() {
            return Err(format!("Redis backup {} does not match its manifest: {}", m.id, problems.join("; ")));
        }
        let mut head = [0u8; 5];
        let head = std::fs::File::open(&download)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
            .is_ok_and(|()| &head == b"REDIS");
        if !head {
            return Err(format!("Redis backup {} is not an RDB file", m.id));
        }
        std::fs::rename(&download, &rdb).map_err(|e| format!("{}: {e}", rdb.display()))?;
        crate::fsutil::sync_dir(&dir).map_err(|e| e.to_string())
    }
    .await;
    if let Err(e) = fetched {
        let _ = std::fs::remove_file(&download);
        return Err(AtBootError::Refused(format!("the Redis restore failed: {e}")));
    }
    progress(format!("Redis backup {} is in place ({keys} keys)", m.id));
    Ok(Some((m.id.clone(), keys)))
}
