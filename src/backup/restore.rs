//! Restores from caretaker's own backups. The live data is never at risk:
//!
//! - **PostgreSQL**: the backup is loaded into a NEW database `DB_restore_TS` and checked (both
//!   hashes, every table's row count: [`super::verify::load_postgres`]); any failure drops
//!   it and changes nothing. Only then: the API is stopped through systemd, sessions on the live
//!   database are ended, and in one transaction the live database becomes `DB_pre_restore_TS` (kept)
//!   and the new one becomes `DB`. The API is started and health-gated; a failed gate swaps back.
//! - **Redis**: the RDB is downloaded and checked next to the live one, Redis is stopped, the live
//!   RDB is kept aside as `FILE.pre-restore-TS`, the new one renamed into place, Redis started and
//!   its DBSIZE compared with the manifest; on any failure the old RDB is put back.
//!
//! A daemon killed mid-restore leaves at most a `DB_restore_TS` database (dropped at the next
//! start by [`cleanup_leftovers`]) or a `.FILE.restore-TS` download (removed likewise).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::{info, warn};

use super::fetch;
use super::leftovers::is_stamp;
use super::run::{self, DATA, Kind};
use super::swap::{SwapError, is_kept_name, stamp, start, stop, swap_in};
use super::verify::{self, VerifyError};
use crate::aws::s3::S3;
use crate::config::Config;
use crate::maintenance;
use crate::pg::PgTarget;
use crate::systemd::manager::Systemd;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0}")]
    Verify(#[from] VerifyError),
    #[error("{0}")]
    Swap(#[from] SwapError),
    #[error("redis: {0}")]
    Redis(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Fs(String),
    #[error("systemd: {0}")]
    Systemd(String),
    #[error("postgres: {0}")]
    PgClient(#[from] crate::pg::PgError),
    #[error("postgres: {}", crate::pg::server_says(.0))]
    PgQuery(#[from] tokio_postgres::Error),
}

/// What a PostgreSQL restore did.
#[derive(Debug, Clone, Serialize)]
pub struct PgRestored {
    pub backup: String,
    pub database: String,
    /// The previous live database, kept under this name (none when there was none).
    pub kept: Option<String>,
    pub tables: usize,
    pub rows: i64,
}

/// Why `name` may not be replaced by a restore: PostgreSQL's own databases (`postgres`, the
/// templates) and the names caretaker gives its own new, kept and scratch databases.
pub fn refused_target(name: &str) -> Option<String> {
    if ["postgres", "template0", "template1"].contains(&name) {
        return Some(format!("`{name}` is one of PostgreSQL's own databases: a restore never replaces it"));
    }
    if super::leftovers::is_ours(name) || name.contains("_pre_restore_") || name.contains("_failed_restore_") {
        return Some(format!("`{name}` is a database caretaker made for a restore, drill or migration"));
    }
    None
}

/// Restores PostgreSQL backup `backup` (`latest` or an id) as database `target` (default
/// `backup.database`). See the module docs for the order of things.
pub async fn restore_postgres(
    cfg: &Config,
    s3: &S3,
    systemd: &Systemd,
    backup: &str,
    target: Option<&str>,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<PgRestored, RestoreError> {
    let live = target.unwrap_or(&cfg.backup.database).to_string();
    if let Some(why) = refused_target(&live) {
        return Err(RestoreError::Refused(why));
    }
    let m = verify::find(cfg, s3, Kind::Postgres, backup).await?;
    let ts = stamp(SystemTime::now());
    let new = format!("{live}_restore_{ts}");
    progress(format!(
        "restore: backup {} of {} ({} rows in {} tables) into the new database {new}",
        m.id,
        m.started_at,
        run::row_counts(&m).values().sum::<i64>(),
        run::row_counts(&m).len()
    ));
    let loaded = verify::load_postgres(cfg, s3, &m, &new, progress).await?;
    progress(format!(
        "verify: {new} matches the backup: both hashes, {} tables with their row counts",
        loaded.tables.len()
    ));
    // The restore role loaded and owns everything: give it to whoever owns the live database
    // (else the backed-up database's owner, else the server's superuser).
    let admin = PgTarget::new(&cfg.services.postgres);
    match super::unprivileged::hand_to_owner_of(&admin, &new, &live, m.details["owner"].as_str()).await {
        Ok(owner) => progress(format!("restore: {new} and its objects now belong to {owner}")),
        Err(e) => {
            let _ = verify::drop_database(cfg, &new).await;
            return Err(e.into());
        }
    }

    let kept = swap_in(cfg, systemd, &live, &new, &ts, progress).await?;
    info!("restored backup {} as {live}; the previous database: {kept:?}", m.id);
    warn_if_nearly_full(cfg, kept.as_deref(), progress).await;
    Ok(PgRestored {
        backup: m.id.clone(),
        database: live,
        kept,
        tables: loaded.tables.len(),
        rows: loaded.tables.values().map(|(e, _)| e).sum(),
    })
}

/// After a restore: says so when the data's filesystem is nearly full, and what dropping the kept
/// previous database would give back.
async fn warn_if_nearly_full(cfg: &Config, kept: Option<&str>, progress: &(dyn Fn(String) + Send + Sync)) {
    let target = PgTarget::new(&cfg.services.postgres);
    let Ok(admin) = target.connect("postgres", Duration::from_secs(10)).await else { return };
    let dir = super::room::data_dir(&admin, &cfg.services.postgres.data_dir).await;
    let Ok(room) = super::room::measure(&dir) else { return };
    let kept_bytes = match kept {
        Some(name) => admin
            .query_one("SELECT pg_database_size($1)", &[&name])
            .await
            .ok()
            .and_then(|r| u64::try_from(r.get::<_, i64>(0)).ok())
            .map(|b| (name, b)),
        None => None,
    };
    if let Some(line) = super::room::nearly_full(&room, kept_bytes) {
        warn!("{line}");
        progress(line);
    }
}

/// A database a restore kept.
#[derive(Debug, Clone, Serialize)]
pub struct Kept {
    pub name: String,
    pub bytes: i64,
    pub comment: String,
}

pub async fn list_kept(cfg: &Config) -> Result<Vec<Kept>, RestoreError> {
    let admin = PgTarget::new(&cfg.services.postgres).connect("postgres", Duration::from_secs(30)).await?;
    let rows = admin
        .query(
            "SELECT d.datname, pg_database_size(d.oid), coalesce(shobj_description(d.oid, 'pg_database'), '') \
             FROM pg_database d ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| Kept { name: r.get(0), bytes: r.get(1), comment: r.get(2) })
        .filter(|k| {
            is_kept_name(&cfg.backup.database, &k.name)
                || k.name.contains("_failed_restore_")
                || k.name.starts_with(&format!("{}_migrate_", cfg.backup.database))
        })
        .collect())
}

pub async fn drop_kept(cfg: &Config, name: &str) -> Result<(), RestoreError> {
    let kept = list_kept(cfg).await?;
    if !kept.iter().any(|k| k.name == name) {
        return Err(RestoreError::Refused(format!(
            "`{name}` is not a database kept by a restore; kept: {}",
            if kept.is_empty() {
                "none".to_string()
            } else {
                kept.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(", ")
            }
        )));
    }
    verify::drop_database(cfg, name).await?;
    Ok(())
}

/// At daemon start (no job running): drops the databases the record of created ones still names
/// (any target database's `NAME_restore_TS`, `caretaker_verify_*`, `NAME_migrate_TS`), those of
/// the configured database's shapes left by older versions, and removes `.FILE.restore-TS`
/// downloads left by a killed restore or drill. Never a configured live database.
pub async fn cleanup_leftovers(cfg: &Config) -> Vec<String> {
    let mut done = Vec::new();
    let db = &cfg.backup.database;
    let recorded = super::leftovers::recorded();
    match PgTarget::new(&cfg.services.postgres).connect("postgres", Duration::from_secs(10)).await {
        Ok(admin) => {
            if let Ok(rows) = admin.query("SELECT datname FROM pg_database", &[]).await {
                let existing: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                for gone in recorded.iter().filter(|n| !existing.contains(n)) {
                    super::leftovers::forget(gone);
                }
                for name in existing {
                    // A job of this daemon may already be running: what it created is recorded
                    // before it exists, so a database listed here and recorded by this process is
                    // that job's, not a leftover.
                    let live = name == *db
                        || name == cfg.provision.database
                        || super::leftovers::created_here().contains(&name);
                    let leftover = !live
                        && super::leftovers::is_ours(&name)
                        && (recorded.contains(&name)
                            || name
                                .strip_prefix(db.as_str())
                                .and_then(|r| r.strip_prefix("_restore_"))
                                .is_some_and(is_stamp)
                            || name.starts_with("caretaker_verify_"));
                    if leftover {
                        match verify::drop_database(cfg, &name).await {
                            Ok(()) => done
                                .push(format!("dropped the database {name} left by an interrupted restore or drill")),
                            Err(e) => warn!("cannot drop the leftover database {name}: {e}"),
                        }
                    }
                }
            }
        }
        Err(e) => info!("leftover restore databases not checked: postgres unreachable: {e}"),
    }
    done.extend(super::pitr::cleanup(&cfg.services.postgres.data_dir, super::pitr::process_started()));
    if let Ok(entries) = std::fs::read_dir(&cfg.services.redis.data_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".restore-") && std::fs::remove_file(e.path()).is_ok() {
                done.push(format!("removed the interrupted download {}", e.path().display()));
            }
        }
    }
    done
}

/// What a Redis restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RedisRestored {
    pub backup: String,
    pub rdb: PathBuf,
    pub kept: PathBuf,
    pub dbsize: i64,
}

async fn redis_query<T: redis::FromRedisValue>(url: &str, cmd: &redis::Cmd) -> Result<T, RestoreError> {
    let client = redis::Client::open(url).map_err(|e| RestoreError::Redis(e.to_string()))?;
    let mut conn = client.get_multiplexed_tokio_connection().await.map_err(|e| RestoreError::Redis(e.to_string()))?;
    cmd.query_async(&mut conn).await.map_err(|e| RestoreError::Redis(e.to_string()))
}

async fn config_get(url: &str, key: &str) -> Result<String, RestoreError> {
    let v: Vec<String> = redis_query(url, redis::cmd("CONFIG").arg("GET").arg(key)).await?;
    Ok(v.get(1).cloned().unwrap_or_default())
}

/// DBSIZE once Redis answers (it may be loading the RDB).
async fn dbsize_when_up(url: &str, within: Duration) -> Result<i64, RestoreError> {
    let end = tokio::time::Instant::now() + within;
    loop {
        match redis_query::<i64>(url, &redis::cmd("DBSIZE")).await {
            Ok(n) => return Ok(n),
            Err(e) if tokio::time::Instant::now() >= end => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The folder of Redis's RDB: the configured `services.redis.data-dir`, when Redis reports the same
/// folder; a folder no one but its owner and root can write.
fn redis_dir(cfg: &Config, reported: &str) -> Result<PathBuf, RestoreError> {
    use std::os::unix::fs::MetadataExt;
    let configured = &cfg.services.redis.data_dir;
    let canon = |p: &Path| std::fs::canonicalize(p).map_err(|e| RestoreError::Fs(format!("{}: {e}", p.display())));
    let dir = canon(configured)?;
    if canon(Path::new(reported)).ok().as_deref() != Some(dir.as_path()) {
        return Err(RestoreError::Refused(format!(
            "Redis says its folder is `{}`, the configuration says {} (services.redis.data-dir): refused",
            reported.escape_debug(),
            configured.display()
        )));
    }
    let meta = std::fs::metadata(&dir).map_err(|e| RestoreError::Fs(format!("{}: {e}", dir.display())))?;
    if meta.mode() & 0o002 != 0 {
        return Err(RestoreError::Refused(format!("{} is writable by everyone: refused", dir.display())));
    }
    Ok(dir)
}

/// Creates `path` new (never through a link, never an existing file), mode 0600, and gives it —
/// through the descriptor, never the name — the owner of the live RDB (or of the folder).
pub(super) fn create_private(path: &Path, dir: &Path, rdb: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let owner = std::fs::symlink_metadata(rdb).or_else(|_| std::fs::metadata(dir))?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)?;
    std::os::unix::fs::fchown(&f, Some(owner.uid()), Some(owner.gid()))?;
    Ok(f)
}

/// Restores Redis backup `backup` (`latest` or an id). See the module docs.
pub async fn restore_redis(
    cfg: &Config,
    s3: &S3,
    systemd: &Systemd,
    backup: &str,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<RedisRestored, RestoreError> {
    let url = &cfg.services.redis.url;
    let m = verify::find(cfg, s3, Kind::Redis, backup).await?;
    let expected = m.details["dbsize"].as_i64().unwrap_or(-1);
    if config_get(url, "appendonly").await? == "yes" {
        return Err(RestoreError::Refused(
            "Redis runs with appendonly yes: it would load its AOF, not the restored RDB. Restore by hand \
             (see the README) or turn AOF off first"
                .into(),
        ));
    }
    // Paths come from caretaker's configuration; what Redis says only has to agree with it.
    let dir = redis_dir(cfg, &config_get(url, "dir").await?)?;
    let file = config_get(url, "dbfilename").await?;
    let file = if file.is_empty() { "dump.rdb".to_string() } else { file };
    if file.len() > 200
        || file.starts_with('.')
        || !file.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(RestoreError::Refused(format!(
            "Redis names its RDB `{}`: not a plain file name",
            file.escape_debug()
        )));
    }
    let rdb = dir.join(&file);
    if std::fs::symlink_metadata(&rdb).is_ok_and(|m| !m.file_type().is_file()) {
        return Err(RestoreError::Refused(format!("{} is not a plain file (a symlink?): refused", rdb.display())));
    }
    let ts = stamp(SystemTime::now());
    // Not predictable: another user owns this folder and must not prepare a link at the name.
    let salt = crate::calendar::random_delay(Duration::from_secs(1 << 30), "download").as_nanos() % 1_000_000_007;
    let download = dir.join(format!(".{file}.restore-{ts}-{salt}"));
    let kept = dir.join(format!("{file}.pre-restore-{ts}"));

    // 1. Download and check next to the live file (same filesystem: the rename is atomic).
    progress(format!("restore: downloading redis backup {} to {}", m.id, download.display()));
    let bucket = cfg.backup.bucket.clone().ok_or(run::BackupError::NoBucket).map_err(VerifyError::from)?;
    let key = format!("{}{DATA}", run::folder(&cfg.backup.prefix, Kind::Redis, &m.id));
    let fetched = async {
        let f = create_private(&download, &dir, &rdb)
            .map_err(|e| RestoreError::Fs(format!("{}: {e}", download.display())))?;
        let f = tokio::fs::File::from_std(f);
        let decryption = fetch::decryption(cfg).map_err(VerifyError::from)?;
        let mut w = tokio::io::BufWriter::new(f);
        let fetched = fetch::fetch_into(s3, &bucket, &key, fetch::Expect::of(&m), decryption, &mut w, |_, _| {})
            .await
            .map_err(VerifyError::from)?;
        let mut f = w.into_inner();
        f.sync_all().await.map_err(|e| RestoreError::Fs(format!("fsync {}: {e}", download.display())))?;
        let problems = fetch::check(&m, &fetched);
        if !problems.is_empty() {
            return Err(RestoreError::from(VerifyError::Mismatch(problems)));
        }
        // Read back through the same descriptor: the name may have been replaced meanwhile.
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let mut head = [0u8; 5];
        f.seek(std::io::SeekFrom::Start(0)).await.map_err(|e| RestoreError::Fs(e.to_string()))?;
        f.read_exact(&mut head).await.map_err(|e| RestoreError::Fs(e.to_string()))?;
        if &head != b"REDIS" {
            return Err(RestoreError::Refused("the backup is not an RDB file".into()));
        }
        Ok(fetched)
    }
    .await;
    if let Err(e) = fetched {
        let _ = std::fs::remove_file(&download);
        return Err(e);
    }
    progress(format!("verify: the download matches the backup's hashes ({expected} keys expected)"));

    // 2. Stop Redis (it saves on shutdown: the live file then holds the latest data), swap files.
    let unit = cfg.services.redis.unit.to_string();
    let _hold = maintenance::hold(&unit, "restore in progress").await;
    progress(format!("swap: stopping {unit}"));
    if let Err(e) = stop(systemd, &unit, cfg).await {
        let _ = std::fs::remove_file(&download);
        return Err(e.into());
    }
    let had_live = std::fs::symlink_metadata(&rdb).is_ok();
    let swapped = (|| -> std::io::Result<()> {
        if had_live {
            std::fs::rename(&rdb, &kept)?;
        }
        std::fs::rename(&download, &rdb)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    let outcome = match swapped {
        Err(e) => Err(RestoreError::Fs(format!("placing {}: {e}", rdb.display()))),
        Ok(()) => {
            progress(format!("swap: starting {unit}"));
            match start(systemd, &unit, cfg).await {
                Err(e) => Err(e.into()),
                Ok(()) => match dbsize_when_up(url, cfg.supervise.start_timeout.get()).await {
                    Ok(n) if n == expected || expected < 0 => Ok(n),
                    Ok(n) => Err(RestoreError::Refused(format!(
                        "Redis holds {n} keys after the restore; the backup had {expected}"
                    ))),
                    Err(e) => Err(e),
                },
            }
        }
    };
    match outcome {
        Ok(n) => Ok(RedisRestored { backup: m.id.clone(), rdb, kept, dbsize: n }),
        Err(e) => {
            warn!("redis restore failed: {e}; putting the old RDB back");
            progress(format!("swap back: {e}"));
            let _ = stop(systemd, &unit, cfg).await;
            if had_live && kept.exists() {
                let _ = std::fs::rename(&kept, &rdb);
            } else if !had_live {
                let _ = std::fs::remove_file(&rdb);
            }
            let _ = std::fs::remove_file(&download);
            start(systemd, &unit, cfg).await?;
            Err(RestoreError::Refused(format!("{e}; the previous data is back in place")))
        }
    }
}
