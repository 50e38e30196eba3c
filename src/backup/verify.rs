//! Loading a backup into a NEW database, checked all the way, and the restore drill built on it.
//!
//! [`load_postgres`] creates the database, streams the object through [`super::fetch`] into
//! `pg_restore`'s stdin, compares both hashes with the manifest and every table's row count with
//! the counts taken in the dump's snapshot. Any failure drops the new database; nothing else is
//! touched. The drill ([`verify`]) loads into a scratch database, drops it, and stores
//! `verify.json` beside the backup (retention never deletes the newest verified backup). A restore
//! (`super::restore`) loads the same way and then swaps.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::fetch::{self, Fetched};
use super::run::{self, DATA, Kind, Manifest, VERIFY};
use crate::aws::s3::S3;
use crate::config::Config;
use crate::pg::PgTarget;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0}")]
    Backup(#[from] run::BackupError),
    #[error("no {kind} backup {id} in s3://{bucket}/{prefix}/ (see `caretaker backup list`){ignored}")]
    NoSuchBackup { kind: &'static str, id: String, bucket: String, prefix: String, ignored: String },
    #[error("{0}")]
    Fetch(#[from] fetch::FetchError),
    /// pg_restore exited non-zero (its stderr is in the journal, see `pg::tool_failure`).
    #[error("{0}")]
    Restore(String),
    #[error("the restored copy does not match the backup's manifest: {}", .0.join("; "))]
    Mismatch(Vec<String>),
    /// pg_restore could not be run or waited for.
    #[error("postgres: {0}")]
    PgRestore(String),
    /// Not enough room for the new database beside the live one (the message has the numbers).
    #[error("{0}")]
    NoRoom(String),
    #[error("cancelled")]
    Cancelled,
    #[error("postgres: {0}")]
    PgClient(#[from] crate::pg::PgError),
    #[error("postgres: {}", crate::pg::server_says(.0))]
    PgQuery(#[from] tokio_postgres::Error),
}

/// The backup `id` of `kind` (`latest`: the newest).
pub async fn find(cfg: &Config, s3: &S3, kind: Kind, id: &str) -> Result<Manifest, VerifyError> {
    let listing = run::listing(cfg, s3, kind).await?;
    let all = listing.backups;
    let found = if id == "latest" { all.last().cloned() } else { all.into_iter().find(|m| m.id == id) };
    found.ok_or_else(|| VerifyError::NoSuchBackup {
        kind: kind.as_str(),
        id: id.into(),
        bucket: cfg.backup.bucket.clone().unwrap_or_default(),
        prefix: cfg.backup.prefix.clone(),
        ignored: match listing.ignored.len() {
            0 => String::new(),
            n => format!(
                "; {n} manifest(s) there were ignored, not sealed by this box's keys (is the seal key or identity \
                 the one they were written with?)"
            ),
        },
    })
}

/// A database loaded from a backup and checked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Loaded {
    pub database: String,
    pub fetched: Fetched,
    /// table → (in the manifest, in the new database).
    pub tables: BTreeMap<String, (i64, i64)>,
    pub load_ms: u64,
}

/// Drops `database` if it exists, ending its sessions.
pub async fn drop_database(cfg: &Config, database: &str) -> Result<(), VerifyError> {
    Ok(super::leftovers::drop_database(&PgTarget::new(&cfg.services.postgres), database).await?)
}

/// Creates `database` (it must not exist), restores backup `m` into it and checks it against the
/// manifest. On any failure the new database is dropped and the error returned.
pub async fn load_postgres(
    cfg: &Config,
    s3: &S3,
    m: &Manifest,
    database: &str,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<Loaded, VerifyError> {
    let target = PgTarget::new(&cfg.services.postgres);
    let database_bytes = m.details.get("database_bytes").and_then(|v| v.as_u64());
    let need = super::room::estimate(database_bytes, m.plain_bytes);
    let what = format!("the backup {} as database {database}", m.id);
    let plan = super::room::check(&target, &cfg.services.postgres.data_dir, cfg.backup.restore_reserve, need, &what)
        .await
        .map_err(VerifyError::NoRoom)?;
    progress(format!(
        "room: about {} needed on the filesystem of {}; the load stops if free space falls under {}",
        crate::units::human_bytes(need),
        plan.dir.display(),
        crate::units::human_bytes(plan.floor)
    ));
    let restorer = super::unprivileged::prepare(&target).await?;
    super::leftovers::create_database(&target, database, Some(super::unprivileged::ROLE)).await?;
    let result = tokio::select! {
        r = load_into(cfg, s3, m, database, &restorer, progress) => r,
        // Dropping the load kills pg_restore (kill_on_drop) before the volume fills.
        why = super::room::until_short(&plan) => Err(VerifyError::NoRoom(why)),
    };
    if result.is_err()
        && let Err(e) = drop_database(cfg, database).await
    {
        tracing::error!("could not drop the incomplete database {database}: {e} (the next daemon start will)");
    }
    result
}

async fn load_into(
    cfg: &Config,
    s3: &S3,
    m: &Manifest,
    database: &str,
    restorer: &PgTarget,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<Loaded, VerifyError> {
    let started = Instant::now();
    let bucket = cfg.backup.bucket.clone().ok_or(run::BackupError::NoBucket)?;
    let key = format!("{}{DATA}", run::folder(&cfg.backup.prefix, Kind::Postgres, &m.id));
    let target = PgTarget::new(&cfg.services.postgres);

    // Pass 1: the archive's table of contents (at its start), for the extensions to create first.
    let toc = table_of_contents(s3, &bucket, &key, m, fetch::decryption(cfg)?, restorer).await?;
    let list = super::unprivileged::prepare_load(&target, database, &toc, progress).await?;

    // Pass 2: the whole archive, as the unprivileged role, objects owned by it.
    // pg_restore and the backend loading its data run at `[jobs] nice`, as a backup's pg_dump does.
    let decryption = fetch::decryption(cfg)?;
    let app = format!("caretaker-load-{}", m.id);
    let mut cmd = restorer.tool("pg_restore")?;
    cmd.args(restorer.tool_args(database))
        .args(["--exit-on-error", "--no-owner"])
        .arg(format!("--use-list={}", list.path().display()))
        .env("PGAPPNAME", &app)
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    crate::priority::child_at(&mut cmd, cfg.jobs.priority());
    let mut child = cmd.spawn().map_err(|e| VerifyError::PgRestore(format!("cannot run pg_restore: {e}")))?;
    let stdin = child.stdin.take().expect("piped");
    crate::fsutil::grow_pipe(&stdin);
    let err_task = crate::pg::collect_stderr(child.stderr.take());
    progress(format!(
        "postgres: restoring backup {} ({} stored) into database {database}",
        m.id,
        crate::units::human_bytes(m.stored_bytes)
    ));
    let total = m.plain_bytes;
    let last = std::sync::Mutex::new((Instant::now(), 0u64));
    let (expect, priority) = (fetch::Expect::of(m), cfg.jobs.priority());
    let fetching = fetch::fetch_into_at(priority, s3, &bucket, &key, expect, decryption, stdin, |_, plain| {
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if (last.0.elapsed() < Duration::from_secs(2) && plain < total) || plain == last.1 {
            return;
        }
        *last = (Instant::now(), plain);
        progress(format!(
            "postgres: restored {} of {}, {}",
            crate::units::human_bytes(plain),
            crate::units::human_bytes(total),
            crate::units::human_rate(plain, started.elapsed())
        ))
    });
    let fetched = super::postgres::while_lowered(&target, "pg_restore", &app, cfg.jobs.priority(), fetching).await;
    let fetched = match fetched {
        Ok(f) => f,
        Err(e) => {
            let _ = child.kill().await;
            return Err(e.into());
        }
    };
    let status = child.wait().await.map_err(|e| VerifyError::PgRestore(format!("waiting for pg_restore: {e}")))?;
    let stderr = err_task.await.unwrap_or_default();
    if !status.success() {
        return Err(VerifyError::Restore(crate::pg::tool_failure("pg_restore", &status.to_string(), &stderr)));
    }
    let mut problems = fetch::check(m, &fetched);
    progress(format!(
        "postgres: hashes {}; counting rows in {database}",
        if problems.is_empty() { "match" } else { "DIFFER" }
    ));
    let actual = super::postgres::row_counts(&target, database, None, super::postgres::count_workers()).await?;
    let expected = run::row_counts(m);
    let mut tables = BTreeMap::new();
    for (t, e) in &expected {
        tables.insert(t.clone(), (*e, actual.get(t).copied().unwrap_or(-1)));
    }
    for (t, a) in &actual {
        tables.entry(t.clone()).or_insert((-1, *a));
    }
    for (t, e, a) in super::postgres::compare_counts(&expected, &actual) {
        problems.push(match (e, a) {
            (_, -1) => format!("table {t} is missing ({e} rows expected)"),
            (-1, _) => format!("table {t} is not in the manifest ({a} rows)"),
            _ => format!("table {t}: {a} rows, the manifest says {e}"),
        });
    }
    if !problems.is_empty() {
        return Err(VerifyError::Mismatch(problems));
    }
    Ok(Loaded { database: database.into(), fetched, tables, load_ms: started.elapsed().as_millis() as u64 })
}

/// `pg_restore --list` of the archive, as the restore role: pg_restore reads the table of
/// contents at the archive's start and exits, which ends the download early.
async fn table_of_contents(
    s3: &S3,
    bucket: &str,
    key: &str,
    m: &Manifest,
    decryption: fetch::Decryption,
    restorer: &PgTarget,
) -> Result<String, VerifyError> {
    let mut child = restorer
        .tool("pg_restore")?
        .arg("--list")
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| VerifyError::PgRestore(format!("cannot run pg_restore: {e}")))?;
    let stdin = child.stdin.take().expect("piped");
    let out_task = crate::pg::collect_stdout(child.stdout.take(), 16 << 20);
    let err_task = crate::pg::collect_stderr(child.stderr.take());
    match fetch::fetch_into(s3, bucket, key, fetch::Expect::of(m), decryption, stdin, |_, _| {}).await {
        // pg_restore stopped reading once it had the table of contents.
        Ok(_) | Err(fetch::FetchError::Sink(_)) => {}
        Err(e) => {
            let _ = child.kill().await;
            return Err(e.into());
        }
    }
    let status = child.wait().await.map_err(|e| VerifyError::PgRestore(format!("waiting for pg_restore: {e}")))?;
    let (toc, stderr) = (out_task.await.unwrap_or_default(), err_task.await.unwrap_or_default());
    if !status.success() {
        return Err(VerifyError::Restore(crate::pg::tool_failure("pg_restore --list", &status.to_string(), &stderr)));
    }
    Ok(toc)
}

/// `verify.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema: u32,
    pub id: String,
    pub kind: Kind,
    pub ok: bool,
    /// RFC 3339.
    pub checked_at: String,
    pub duration_ms: u64,
    /// What was checked, one line each.
    pub checks: Vec<String>,
    /// Why it failed (empty when ok).
    pub problems: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched: Option<Fetched>,
    /// postgres: table → (in the manifest, restored).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tables: BTreeMap<String, (i64, i64)>,
}

/// The scratch database of a drill.
pub fn scratch_name(id: &str) -> String {
    format!("caretaker_verify_{}", id.to_ascii_lowercase().replace('-', "_"))
}

/// A byte sink that keeps the first bytes (for the RDB magic).
struct HeadSink {
    head: Vec<u8>,
}

impl tokio::io::AsyncWrite for HeadSink {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let want = 512usize.saturating_sub(self.head.len()).min(buf.len());
        self.head.extend_from_slice(&buf[..want]);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The PITR drill of base backup `m`: a fresh restore point (with its row counts) recorded on the
/// live cluster and its segment archived; then `m` replayed with the archive (and the WAL tip)
/// to the latest point in a scratch data directory on a port of its own, pausing at the newest
/// restore point inside the replayed WAL to compare the copy's row counts with the recorded ones;
/// the scratch directory is removed whatever happened. The scratch cluster never archives (its
/// `archive_command` is empty) and the tip never connects to it.
async fn drill_base(
    cfg: &Config,
    s3: &S3,
    m: &Manifest,
    tools: &super::pitr::Tools,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<super::pitr::Built, VerifyError> {
    use super::pitr;
    use super::wal::name::{Lsn, Segment, WalFile};
    let fail = VerifyError::Restore;
    let archive = super::wal::archive::Archive::for_config(cfg, s3.clone())?;
    let live = PgTarget::new(&cfg.services.postgres);
    if cfg.backup.wal_archive {
        match super::restore_point::record(cfg, s3, &live, true).await {
            Ok(rp) => {
                progress(format!(
                    "base: restore point {} recorded at {} ({} tables)",
                    rp.name,
                    rp.lsn,
                    rp.counts.len()
                ));
                // Its segment was closed: wait (bounded) until the archive holds it.
                if let Ok(lsn) = rp.lsn.parse::<Lsn>() {
                    let seg = Segment::of(rp.timeline, lsn, archive.segment_size);
                    let until = Instant::now() + Duration::from_secs(120);
                    while Instant::now() < until {
                        if let Ok(Some(_)) = archive.describe(&WalFile::Segment(seg)).await {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            Err(e) => progress(format!("base: no fresh restore point ({e}); using the newest recorded one")),
        }
    }
    let survey = pitr::survey(cfg, s3, &archive).await.map_err(|e| fail(e.to_string()))?;
    let mut plan = survey.plans_to_latest().into_iter().find(|p| p.base.id == m.id).ok_or_else(|| {
        fail(format!("base backup {} has no unbroken WAL chain to replay: {}", m.id, survey.reasons.join("; ")))
    })?;
    let (points, bad) = super::restore_point::list(cfg, s3).await.map_err(fail)?;
    for b in bad {
        tracing::warn!("restore point not used: {b}");
    }
    let start = plan.details.stop_lsn;
    let end = Lsn(plan.chain.last.start(archive.segment_size).0 + archive.segment_size);
    plan.restore_point = points.into_iter().rev().find(|p| {
        p.system_identifier == plan.details.system_identifier
            && p.lsn.parse::<Lsn>().is_ok_and(|l| l >= start && l < end)
    });
    let p = &cfg.services.postgres;
    let need = plan.base.plain_bytes.saturating_add(plan.base.plain_bytes / 10);
    super::room::check(
        &live,
        &p.data_dir,
        cfg.backup.restore_reserve,
        need,
        &format!("the drill of base backup {}", m.id),
    )
    .await
    .map_err(|e| VerifyError::NoRoom(e.to_string()))?;
    let dir = pitr::build_dir(&p.data_dir, &format!("drill-{}", super::swap::stamp(std::time::SystemTime::now())));
    progress(format!(
        "base: replaying {} and {} segments{} in {}",
        m.id,
        plan.chain.segments.len(),
        plan.restore_point.as_ref().map(|r| format!(", pausing at restore point {}", r.name)).unwrap_or_default(),
        dir.display()
    ));
    let built = pitr::build(cfg, s3, archive, &plan, &dir, tools, progress).await;
    let _ = std::fs::remove_dir_all(&dir);
    built.map_err(|e| fail(e.to_string()))
}

/// The restore drill of backup `m`: download, both hashes, and for postgres a restore into a
/// scratch database with every table's row count compared; the scratch database is dropped. The
/// report is stored as `verify.json` beside the backup (also when the drill failed).
pub async fn verify(
    cfg: &Config,
    s3: &S3,
    m: &Manifest,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<Report, VerifyError> {
    verify_with(cfg, s3, m, &super::pitr::Tools::for_config(cfg), progress).await
}

/// [`verify`] with the server binaries and the `caretaker` whose `wal fetch` a base backup's
/// replay runs as its restore_command.
pub async fn verify_with(
    cfg: &Config,
    s3: &S3,
    m: &Manifest,
    tools: &super::pitr::Tools,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<Report, VerifyError> {
    let started = Instant::now();
    let bucket = cfg.backup.bucket.clone().ok_or(run::BackupError::NoBucket)?;
    let mut report = Report {
        schema: 1,
        id: m.id.clone(),
        kind: m.kind,
        ok: false,
        checked_at: String::new(),
        duration_ms: 0,
        checks: vec![],
        problems: vec![],
        fetched: None,
        tables: BTreeMap::new(),
    };
    let outcome: Result<(), VerifyError> = async {
        match m.kind {
            Kind::Postgres => {
                let scratch = scratch_name(&m.id);
                drop_database(cfg, &scratch).await?;
                let loaded = load_postgres(cfg, s3, m, &scratch, progress).await;
                let dropped = drop_database(cfg, &scratch).await;
                let loaded = loaded?;
                dropped?;
                report.checks.push(format!(
                    "restored into a scratch database with pg_restore: {} tables, {} rows, row counts equal to the manifest",
                    loaded.tables.len(),
                    loaded.tables.values().map(|(e, _)| e).sum::<i64>()
                ));
                report.checks.push(format!("stored SHA-256 and plaintext {} equal to the manifest", m.plain_digest().0.name()));
                report.fetched = Some(loaded.fetched);
                report.tables = loaded.tables;
            }
            Kind::Redis => {
                let key = format!("{}{DATA}", run::folder(&cfg.backup.prefix, Kind::Redis, &m.id));
                progress(format!("redis: downloading and decrypting backup {}", m.id));
                let mut sink = HeadSink { head: Vec::new() };
                let fetched = fetch::fetch_into(s3, &bucket, &key, fetch::Expect::of(m), fetch::decryption(cfg)?, &mut sink, |_, _| {})
                        .await?;
                let mut problems = fetch::check(m, &fetched);
                if !sink.head.starts_with(b"REDIS") {
                    problems.push("the restored data is not an RDB file (no REDIS magic)".into());
                }
                if !problems.is_empty() {
                    return Err(VerifyError::Mismatch(problems));
                }
                report.checks.push(format!("stored SHA-256 and plaintext {} equal to the manifest; an RDB file", m.plain_digest().0.name()));
                report.fetched = Some(fetched);
            }
            Kind::Base => {
                let built = drill_base(cfg, s3, m, tools, progress).await?;
                report.checks.push(format!(
                    "replayed base backup {} with the WAL archive to its end in a scratch data directory: {} segment \
                     fetches ({} from the WAL tip), last commit {}, timeline {}; PostgreSQL says: {}",
                    built.base,
                    built.segments_fetched,
                    built.tip_segments,
                    built.last_commit.as_deref().unwrap_or("none replayed"),
                    built.timeline,
                    built.stopped
                ));
                match &built.restore_point {
                    Some(rp) => report.checks.push(format!(
                        "at restore point {rp} the replayed cluster held exactly the row counts recorded with it"
                    )),
                    None => report.checks.push(
                        "no restore point inside the replayed WAL: row counts were not compared (PostgreSQL was \
                         not reachable to record one)"
                            .into(),
                    ),
                }
                report.checks.push("stored and plaintext SHA-256 of the base backup equal to its manifest".into());
                report.tables = built.row_counts.iter().map(|(t, n)| (t.clone(), (*n, *n))).collect();
                report.fetched = Some(built.fetched);
            }
        }
        Ok(())
    }
    .await;
    report.duration_ms = started.elapsed().as_millis() as u64;
    report.checked_at = crate::units::now_rfc3339();
    match &outcome {
        Ok(()) => report.ok = true,
        Err(VerifyError::Mismatch(p)) => report.problems = p.clone(),
        Err(e) => report.problems = vec![e.to_string()],
    }
    // Sealed like the manifest: retention trusts only a report this box's keys made.
    let json = match super::seal::SealKeys::for_config(cfg) {
        Ok(keys) => keys.seal(&report),
        Err(e) => {
            tracing::error!("cannot seal the drill report: {e}");
            return outcome.map(|()| report);
        }
    };
    let key = format!("{}{VERIFY}", run::folder(&cfg.backup.prefix, m.kind, &m.id));
    if let Err(e) = s3.put_object(&bucket, &key, json).await {
        tracing::error!("cannot store {key}: {e}");
    }
    outcome.map(|()| report)
}
