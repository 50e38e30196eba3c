//! Point-in-time restore: a base backup plus the WAL archive, replayed to a second (or to the end
//! of the archive) in a NEW data directory beside the live one, verified, then swapped in with
//! PostgreSQL stopped — the old directory kept, the API health-gated, the swap undone when the
//! gate fails.
//!
//! In order, and nothing is touched before the first three have passed:
//! 1. [`plan`]: the newest sealed base backup that ended before the target, on the timeline
//!    ancestry PostgreSQL will follow; the whole chain of segments from its start checked present
//!    in S3 (a gap is named); the target inside the window (the window is printed otherwise).
//! 2. Room for the copy beside the live data (`backup::room`).
//! 3. [`build`]: the tar streamed from S3 into `DATA.pitr-TS` (hashes checked against the
//!    manifest), a PostgreSQL of our own on a private socket with `restore_command` = `caretaker wal
//!    fetch` against a socket served by this job (segments prefetched ahead of replay; a segment
//!    the plan holds is never "not found"; S3 errors retried, then recovery aborted, never ended),
//!    archiving paused (`archive_command = ''` keeps the `.ready` files for the live archiver),
//!    only local peer connections; then checked: where recovery stopped, the last replayed commit,
//!    and the application's database answering with its row counts.
//! 4. [`swap_in`]: API and PostgreSQL stopped, `DATA` → `DATA.before-pitr-TS` (kept), the new
//!    directory → `DATA`, PostgreSQL started, the API started and health-gated; a failed gate
//!    puts the old directory back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::base::BaseDetails;
use super::fetch;
use super::run::{BackupError, DATA, Kind, Manifest, folder, listing};
use super::wal::archive::{Archive, WalError};
use super::wal::chain::{self, Chain, Switch};
use super::wal::name::WalFile;
use super::wal::server::{FetchPlan, WalServer, serve};
use crate::aws::s3::S3;
use crate::config::{Config, ServiceKind};
use crate::health::{Gate, Probe};
use crate::maintenance;
use crate::pg::PgTarget;
use crate::systemd::manager::Systemd;
use crate::units::rfc3339;

/// Where recovery stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The end of the archive.
    Latest,
    /// Every transaction committed at or before this time, none after.
    Time(SystemTime),
}

impl Target {
    /// `latest`, or a UTC time (`2026-12-01 14:03:07Z`, `2026-12-01T14:03:07.25Z`); why not.
    pub fn parse(s: &str) -> Result<Target, String> {
        let s = s.trim();
        if s == "latest" {
            return Ok(Target::Latest);
        }
        let t = s
            .strip_suffix('Z')
            .or_else(|| s.strip_suffix("+00:00"))
            .ok_or_else(|| format!("{s:?}: give the time in UTC with a Z, like \"2026-12-01 14:03:07Z\""))?;
        humantime::parse_rfc3339_weak(t)
            .map(Target::Time)
            .map_err(|e| format!("{s:?} is not a time like \"2026-12-01 14:03:07Z\": {e}"))
    }

    pub fn describe(&self) -> String {
        match self {
            Target::Latest => "the end of the WAL archive".into(),
            Target::Time(t) => crate::units::rfc3339_micros(*t),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PitrError {
    /// Refused before anything was touched.
    #[error("{0}; nothing was changed")]
    Refused(String),
    #[error("{0}")]
    Backup(#[from] BackupError),
    #[error("{0}")]
    Wal(#[from] WalError),
    /// The copy could not be built or verified; it was removed, the live data is unchanged.
    #[error("{0}; the restored copy was removed, the live data is unchanged")]
    Build(String),
    #[error("{0}")]
    Swap(String),
}

/// The restorable span: from the end of the oldest base backup to the newest archived segment.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub oldest: Option<String>,
    pub newest: Option<String>,
    /// Base backups with a usable chain.
    pub base_backups: usize,
    /// The newest archived segment on the newest backup's chain.
    pub newest_segment: Option<String>,
    /// A gap in the newest backup's chain: (missing, resumes at).
    pub gap: Option<(String, String)>,
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.oldest, &self.newest) {
            (Some(o), Some(n)) => write!(f, "{o} … {n}"),
            _ => write!(f, "empty (no base backup with its WAL)"),
        }
    }
}

/// What [`plan`] chose.
#[derive(Debug, Clone)]
pub struct Plan {
    pub target: Target,
    pub base: Manifest,
    pub details: BaseDetails,
    pub chain: Chain,
    pub window: Window,
    /// A drill's check on the way: replay pauses at this restore point, the copy's row counts
    /// must equal the ones recorded with it, then replay goes on to the target.
    pub restore_point: Option<crate::backup::restore_point::RestorePoint>,
}

fn details_of(m: &Manifest) -> Option<BaseDetails> {
    serde_json::from_value(m.details.clone()).ok()
}

fn time_of(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Every timeline history in the archive, fetched and checked.
async fn histories(archive: &Archive, files: &[WalFile]) -> Result<BTreeMap<u32, Vec<Switch>>, PitrError> {
    let mut out = BTreeMap::new();
    for f in files {
        if let WalFile::History(tli) = f {
            let name = f.file_name(archive.segment_size);
            let text = archive.fetch(&name, None).await?.unwrap_or_default();
            let parsed = chain::parse_history(&String::from_utf8_lossy(&text))
                .map_err(|e| PitrError::Refused(format!("{name} in the archive is not a timeline history: {e}")))?;
            out.insert(*tli, parsed);
        }
    }
    Ok(out)
}

/// What the bucket holds for point-in-time recovery: base backups with a usable chain (newest
/// first) and the window.
pub struct Survey {
    usable: Vec<(Manifest, BaseDetails, Chain)>,
    /// Why base backups that exist cannot be used.
    pub reasons: Vec<String>,
    pub any_base: bool,
    pub window: Window,
    segment_size: u64,
}

impl Survey {
    /// Base backups restorable with their WAL.
    pub fn usable(&self) -> usize {
        self.usable.len()
    }

    /// A plan to the end of the archive from each usable base backup whose chain to it has no
    /// gap, newest first: what a restore falls back on when the newest fails to build or verify.
    pub fn plans_to_latest(&self) -> Vec<Plan> {
        self.usable
            .iter()
            .filter(|(_, _, chain)| chain.gap.is_none())
            .map(|(base, details, chain)| Plan {
                restore_point: None,
                target: Target::Latest,
                base: base.clone(),
                details: details.clone(),
                chain: chain.clone(),
                window: self.window.clone(),
            })
            .collect()
    }
}

/// Lists base backups and the WAL archive and checks each backup's chain.
pub async fn survey(cfg: &Config, s3: &S3, archive: &Archive) -> Result<Survey, PitrError> {
    let bases = listing(cfg, s3, Kind::Base).await?.backups;
    let files = archive.list().await?;
    let histories = histories(archive, &files).await?;
    let mut usable: Vec<(Manifest, BaseDetails, Chain)> = Vec::new();
    let mut reasons = Vec::new();
    for m in bases.iter().rev() {
        let Some(d) = details_of(m) else {
            reasons.push(format!("{}: its manifest has no WAL positions", m.id));
            continue;
        };
        match chain::check(&files, &histories, d.timeline, d.start_lsn, archive.segment_size) {
            // The backup is consistent only once its end is replayed: its chain must reach it.
            Ok(c) if c.last.start(archive.segment_size).0 + archive.segment_size > d.stop_lsn.0 => {
                usable.push((m.clone(), d, c))
            }
            Ok(c) => reasons.push(format!(
                "{}: the archive lacks WAL up to its end {} (the chain stops at {})",
                m.id,
                d.stop_lsn,
                c.last.file_name(archive.segment_size)
            )),
            Err(e) => reasons.push(format!("{}: {e}", m.id)),
        }
    }
    let mut window = Window { base_backups: usable.len(), ..Window::default() };
    if let Some((newest_m, _, c)) = usable.first() {
        let newest_at = archive.describe(&WalFile::Segment(c.last)).await?.map(|d| d.archived_at);
        window.oldest = usable.last().map(|(m, _, _)| m.finished_at.clone());
        // The last segment can be archived before the backup's manifest is written: a restore
        // reaches at least the newest backup's end, so the window never ends before it.
        window.newest = match newest_at {
            Some(at) if time_of(&at) > time_of(&newest_m.finished_at) => Some(at),
            _ => Some(newest_m.finished_at.clone()),
        };
        window.newest_segment = Some(c.last.file_name(archive.segment_size));
        window.gap = c.gap.map(|(a, b)| (a.file_name(archive.segment_size), b.file_name(archive.segment_size)));
    }
    Ok(Survey { usable, reasons, any_base: !bases.is_empty(), window, segment_size: archive.segment_size })
}

/// The window alone (status, doctor).
pub async fn window(cfg: &Config, s3: &S3, archive: &Archive) -> Result<Window, PitrError> {
    Ok(survey(cfg, s3, archive).await?.window)
}

/// The backup and chain a restore to `target` uses, or why none can.
pub async fn plan(cfg: &Config, s3: &S3, archive: &Archive, target: Target) -> Result<Plan, PitrError> {
    let survey = survey(cfg, s3, archive).await?;
    let seg = survey.segment_size;
    let window = survey.window.clone();
    let Some(newest) = survey.usable.first() else {
        let why = if survey.any_base {
            survey.reasons.join("; ")
        } else {
            "there is no base backup (`caretaker backup now --kind base`)".to_string()
        };
        return Err(PitrError::Refused(format!("no base backup can be restored with its WAL: {why}")));
    };
    let gap_text = |c: &Chain| {
        c.gap.map(|(missing, resume)| {
            format!(
                "the WAL chain has a gap: {} is missing from the archive (it resumes at {}); replay cannot pass it",
                missing.file_name(seg),
                resume.file_name(seg)
            )
        })
    };
    let (base, details, chain) = match target {
        Target::Latest => {
            if let Some(g) = gap_text(&newest.2) {
                return Err(PitrError::Refused(format!(
                    "{g}; restoring to the latest point would silently lose everything after it. Restore to a time \
                     before the gap (--to-time), window {window}"
                )));
            }
            newest.clone()
        }
        Target::Time(t) => {
            let newest_at = window.newest.as_deref().map(time_of).unwrap_or(SystemTime::UNIX_EPOCH);
            if t > newest_at {
                return Err(PitrError::Refused(format!(
                    "{} is after the newest archived WAL: the window is {window}",
                    rfc3339(t)
                )));
            }
            let Some(chosen) = survey.usable.iter().find(|(m, _, _)| time_of(&m.finished_at) <= t) else {
                return Err(PitrError::Refused(format!(
                    "{} is before the end of the oldest base backup: the window is {window}",
                    rfc3339(t)
                )));
            };
            // A gap after the segment archived last before the target does not matter.
            if let Some(g) = gap_text(&chosen.2) {
                let last_at =
                    archive.describe(&WalFile::Segment(chosen.2.last)).await?.map(|d| time_of(&d.archived_at));
                if last_at.is_none_or(|at| at < t) {
                    return Err(PitrError::Refused(format!("{g}; {} is after it", rfc3339(t))));
                }
            }
            chosen.clone()
        }
    };
    Ok(Plan { target, base, details, chain, window, restore_point: None })
}

/// How to run the server binaries and the restore command.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The folder of `postgres` (of the backup's major version).
    pub server_bin: PathBuf,
    /// The caretaker binary PostgreSQL runs as restore_command.
    pub caretaker: PathBuf,
}

impl Tools {
    pub fn for_config(cfg: &Config) -> Tools {
        let p = &cfg.services.postgres;
        let server_bin = p
            .bin_dir
            .clone()
            .or_else(|| p.initdb.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("/usr/bin"));
        let caretaker = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/bin/caretaker"));
        Tools { server_bin, caretaker }
    }
}

/// A verified copy, stopped, ready to swap in.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Built {
    pub dir: PathBuf,
    pub base: String,
    /// The last transaction replayed (commit time), if any.
    pub last_commit: Option<String>,
    /// PostgreSQL's own line on where recovery stopped.
    pub stopped: String,
    pub timeline: u32,
    pub segments_fetched: u64,
    /// Of those, segments past the archive's end assembled from the WAL tip's chunks.
    pub tip_segments: u64,
    /// The restore point whose row counts the copy matched on the way (a drill's check).
    pub restore_point: Option<String>,
    /// The base backup as it came from S3 (sizes, hashes: checked against its manifest).
    pub fetched: fetch::Fetched,
    pub tables: usize,
    pub rows: i64,
    pub row_counts: BTreeMap<String, i64>,
}

fn pg_user(cfg: &Config) -> Result<nix::unistd::User, PitrError> {
    nix::unistd::User::from_name(&cfg.services.postgres.user)
        .ok()
        .flatten()
        .ok_or_else(|| PitrError::Refused(format!("there is no OS user {}", cfg.services.postgres.user)))
}

fn make_dir_for(path: &Path, user: &nix::unistd::User) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid)).map_err(|e| format!("chown {}: {e}", path.display()))
}

fn write_for(path: &Path, contents: &str, user: &nix::unistd::User) -> Result<(), String> {
    std::fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid)).map_err(|e| format!("chown {}: {e}", path.display()))
}

/// `DATA.pitr-TS`: where a restore builds (the same filesystem as `DATA`, so the swap is a rename).
pub fn build_dir(data_dir: &Path, ts: &str) -> PathBuf {
    sibling(data_dir, &format!("pitr-{ts}"))
}

fn sibling(data_dir: &Path, suffix: &str) -> PathBuf {
    let name = data_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "postgres".into());
    data_dir.with_file_name(format!("{name}.{suffix}"))
}

/// Builds and verifies the restored cluster of `plan` in `dir` (which must not exist). On any
/// failure `dir` is removed.
pub async fn build(
    cfg: &Config,
    s3: &S3,
    archive: Archive,
    plan: &Plan,
    dir: &Path,
    tools: &Tools,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<Built, PitrError> {
    let user = pg_user(cfg)?;
    if dir.exists() {
        return Err(PitrError::Refused(format!("{} exists already", dir.display())));
    }
    check_server(tools, &plan.details).await?;
    let run = dir.with_file_name(format!("{}.run", dir.file_name().unwrap_or_default().to_string_lossy()));
    let r = build_in(cfg, s3, archive, plan, dir, &run, tools, &user, progress).await;
    let _ = std::fs::remove_dir_all(&run);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    r
}

#[allow(clippy::too_many_arguments)]
async fn build_in(
    cfg: &Config,
    s3: &S3,
    archive: Archive,
    plan: &Plan,
    dir: &Path,
    run: &Path,
    tools: &Tools,
    user: &nix::unistd::User,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<Built, PitrError> {
    let fail = PitrError::Build;
    let _ = std::fs::remove_dir_all(run);
    make_dir_for(dir, user).map_err(fail)?;
    make_dir_for(run, user).map_err(fail)?;

    // 1. The base backup, streamed into tar as the database's user.
    let m = &plan.base;
    let bucket = cfg.backup.bucket.clone().ok_or(BackupError::NoBucket)?;
    let key = format!("{}{DATA}", folder(&cfg.backup.prefix, Kind::Base, &m.id));
    progress(format!(
        "pitr: base backup {} ({}, WAL {} … {} on timeline {}) → {}",
        m.id,
        crate::units::human_bytes(m.plain_bytes),
        plan.details.start_lsn,
        plan.details.stop_lsn,
        plan.details.timeline,
        dir.display()
    ));
    let mut tar = tokio::process::Command::new("tar")
        .args(["--extract", "--file=-", "--no-same-owner", "--delay-directory-restore", "--directory"])
        .arg(dir)
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .current_dir("/")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot run tar: {e}")))?;
    let stdin = tar.stdin.take().expect("piped");
    let err_task = crate::pg::collect_stderr(tar.stderr.take());
    let clock = Instant::now();
    let fetched =
        fetch::fetch_into(s3, &bucket, &key, fetch::Expect::of(m), fetch::decryption(cfg)?, stdin, |_, _| {}).await;
    let status = tar.wait().await.map_err(|e| fail(format!("waiting for tar: {e}")))?;
    let tar_err = err_task.await.unwrap_or_default();
    let fetched = fetched.map_err(|e| fail(format!("base backup {}: {e}", m.id)))?;
    let problems = fetch::check(m, &fetched);
    if !problems.is_empty() {
        return Err(fail(format!("base backup {}: {}", m.id, problems.join("; "))));
    }
    if !status.success() {
        return Err(fail(format!("tar failed ({status}): {}", tar_err.trim())));
    }
    progress(format!("pitr: base backup extracted and its hashes checked in {:.1} s", clock.elapsed().as_secs_f64()));

    // 2. Recovery settings: on the command line only (nothing of them stays in the copy), our own
    //    configuration files: local peer connections only, no archiving until the live one.
    for f in ["recovery.signal", "standby.signal", "postmaster.pid", "postmaster.opts"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    write_for(&dir.join("recovery.signal"), "", user).map_err(fail)?;
    write_for(&run.join("postgresql.conf"), "# caretaker: settings for the restore are on the command line\n", user)
        .map_err(fail)?;
    write_for(&run.join("pg_hba.conf"), "local all all peer\n", user).map_err(fail)?;
    write_for(&run.join("pg_ident.conf"), "", user).map_err(fail)?;

    let socket = run.join("wal.sock");
    let sysid = plan.details.system_identifier();
    let server = Arc::new(WalServer::new(archive, dir, vec![0, user.uid.as_raw()]));
    server.set_plan(Some(FetchPlan { required: plan.chain.segments.clone(), system_identifier: sysid }));
    let cancel = CancellationToken::new();
    let _stop_server = cancel.clone().drop_guard();
    tokio::spawn(serve(server.clone(), socket.clone(), cancel.clone()));
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let port = free_port().map_err(fail)?;
    let mut target_time = match plan.target {
        // PostgreSQL's own spelling (it refuses the RFC 3339 `T…Z` form here).
        Target::Time(t) => Some(crate::units::rfc3339_micros(t).replace('T', " ").replace('Z', "+00")),
        Target::Latest => None,
    };
    if let Some(rp) = &plan.restore_point {
        check_restore_point(cfg, tools, dir, run, &socket, user, &server, plan, rp, progress).await?;
    }
    let mut log_path = run.join("postgres.log");
    let mut attempt = 0;
    let (log, mut child) = loop {
        attempt += 1;
        let mut child = start_server(tools, dir, run, &socket, port, target_time.as_deref(), &log_path, user, None)?;
        let outcome = wait_promoted(&mut child, run, port, &log_path, &server, plan, progress).await;
        match outcome {
            Ok(()) => break (std::fs::read_to_string(&log_path).unwrap_or_default(), child),
            Err(log)
                if attempt == 1
                    && target_time.is_some()
                    && log.contains("before configured recovery target was reached") =>
            {
                // Every commit in the archive is before the target (the archive ends inside the
                // window, past the target, with no later commit): the end of the archive is the target.
                progress(
                    "pitr: no transaction in the archive committed after the target: replaying to the archive's end"
                        .into(),
                );
                target_time = None;
                log_path = run.join("postgres-2.log");
            }
            Err(log) => {
                return Err(fail(format!("recovery failed: {}", last_lines(&log, 8))));
            }
        }
    };

    // 3. Verify: where recovery stopped, the last commit, the application's tables.
    let stopped = ["recovery stopping", "last completed transaction", "archive recovery complete"]
        .iter()
        .find_map(|needle| log.lines().rev().find(|l| l.contains(needle)))
        .map(|l| l.split("LOG:").nth(1).unwrap_or(l).trim().to_string())
        .unwrap_or_default();
    progress(format!("pitr: PostgreSQL says: {stopped}"));
    let local =
        PgTarget { socket_dir: run.to_path_buf(), port, user: cfg.services.postgres.user.clone(), bin_dir: None };
    let verified = verify_copy(cfg, &local, plan).await;
    // Fast shutdown: a clean checkpoint, so the swapped-in cluster starts without recovery.
    let stopped_cleanly = stop_child(&mut child).await;
    let (last_commit, timeline, counts) = verified?;
    stopped_cleanly.map_err(fail)?;
    // To the latest: recovery must have asked for the chain's last segment (a recovery that ended
    // inside the chain would have promoted early and dropped every commit after).
    if plan.target == Target::Latest
        && !plan.chain.segments.is_empty()
        && server.stats().newest_planned_fetched.is_none_or(|s| s < plan.chain.last)
    {
        return Err(fail(format!(
            "recovery ended before the archive's end: it never asked for {} (the chain's last segment); \
             PostgreSQL says: {stopped}",
            plan.chain.last.file_name(server.archive().segment_size)
        )));
    }
    let rows = counts.values().sum();
    let tip_segments = server.stats().tip_segments;
    if tip_segments > 0 {
        progress(format!("pitr: {tip_segments} fetch(es) past the archive's end were served from the WAL tip"));
    }
    progress(format!(
        "pitr: restored to {} (last commit {}), timeline {timeline}; {} tables, {rows} rows in {}",
        plan.target.describe(),
        last_commit.as_deref().unwrap_or("none replayed"),
        counts.len(),
        cfg.backup.database
    ));
    Ok(Built {
        dir: dir.to_path_buf(),
        base: m.id.clone(),
        last_commit,
        stopped,
        timeline,
        segments_fetched: server.stats().fetched,
        tip_segments: server.stats().tip_segments,
        restore_point: plan.restore_point.as_ref().map(|r| r.name.clone()),
        fetched,
        tables: counts.len(),
        rows,
        row_counts: counts,
    })
}

/// The server binary exists and is of the base backup's major version (replay needs exactly
/// that); refused before anything is created otherwise.
async fn check_server(tools: &Tools, d: &BaseDetails) -> Result<(), PitrError> {
    let postgres = tools.server_bin.join("postgres");
    let out = tokio::process::Command::new(&postgres).arg("--version").output().await.map_err(|e| {
        PitrError::Refused(format!(
            "cannot run {}: {e} (set services.postgres.bin-dir to the server's folder)",
            postgres.display()
        ))
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "postgres (PostgreSQL) 16.4" → 16
    let major = text.split_whitespace().nth(2).and_then(|v| v.split('.').next()).and_then(|m| m.parse::<i32>().ok());
    let wanted = d.server_version_num / 10_000;
    if major != Some(wanted) {
        return Err(PitrError::Refused(format!(
            "the base backup is of PostgreSQL {wanted}, {} is {}: replay needs the same major version \
             (set services.postgres.bin-dir)",
            postgres.display(),
            text.trim()
        )));
    }
    Ok(())
}

pub(super) fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn last_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> =
        log.lines().filter(|l| l.contains("FATAL") || l.contains("ERROR") || l.contains("caretaker")).collect();
    let pick = if lines.is_empty() { log.lines().collect::<Vec<_>>() } else { lines };
    pick[pick.len().saturating_sub(n)..].join(" | ")
}

#[allow(clippy::too_many_arguments)]
fn start_server(
    tools: &Tools,
    dir: &Path,
    run: &Path,
    socket: &Path,
    port: u16,
    target_time: Option<&str>,
    log: &Path,
    user: &nix::unistd::User,
    pause_at: Option<(&str, &[String])>,
) -> Result<tokio::process::Child, PitrError> {
    let logfile =
        std::fs::File::create(log).map_err(|e| PitrError::Build(format!("cannot create {}: {e}", log.display())))?;
    let _ = nix::unistd::chown(log, Some(user.uid), Some(user.gid));
    let restore_command = format!("{} wal fetch %f %p --socket {}", tools.caretaker.display(), socket.display());
    let mut settings = vec![
        format!("config_file={}", run.join("postgresql.conf").display()),
        format!("hba_file={}", run.join("pg_hba.conf").display()),
        format!("ident_file={}", run.join("pg_ident.conf").display()),
        format!("port={port}"),
        "listen_addresses=".into(),
        format!("unix_socket_directories={}", run.display()),
        // Archiving paused: the .ready files wait for the live archiver after the swap.
        "archive_mode=on".into(),
        "archive_command=".into(),
        format!("restore_command={restore_command}"),
        "recovery_target_timeline=latest".into(),
        "recovery_target_action=promote".into(),
        // No connections during recovery (and no hot-standby parameter checks against the primary).
        "hot_standby=off".into(),
        "logging_collector=off".into(),
        "log_destination=stderr".into(),
        "shared_preload_libraries=".into(),
        // caretaker.service's MemoryDenyWriteExecute= forbids JIT code: the verify queries fail.
        "jit=off".into(),
    ];
    if let Some(t) = target_time {
        settings.push(format!("recovery_target_time={t}"));
        settings.push("recovery_target_inclusive=true".into());
    }
    if let Some((name, standby)) = pause_at {
        // Read-only queries while replay waits at the restore point, with the primary's limits
        // (a hot standby refuses to run with lower ones than pg_control records).
        settings.retain(|s| !s.starts_with("hot_standby=") && !s.starts_with("recovery_target_action="));
        settings.push(format!("recovery_target_name={name}"));
        settings.push("recovery_target_action=pause".into());
        settings.push("hot_standby=on".into());
        settings.extend(standby.iter().cloned());
    }
    spawn_server(&tools.server_bin, dir, &settings, user, logfile).map_err(PitrError::Build)
}

/// Runs `BIN/postgres -D dir -c SETTING…` as `user`, its log into `logfile`; killed when dropped.
pub(super) fn spawn_server(
    bin: &Path,
    dir: &Path,
    settings: &[String],
    user: &nix::unistd::User,
    logfile: std::fs::File,
) -> Result<tokio::process::Child, String> {
    let mut cmd = tokio::process::Command::new(bin.join("postgres"));
    cmd.arg("-D").arg(dir);
    for s in settings {
        cmd.arg("-c").arg(s);
    }
    // Not systemd's notify socket: only the daemon talks to it.
    cmd.env_remove("NOTIFY_SOCKET")
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(logfile)
        .kill_on_drop(true);
    cmd.spawn().map_err(|e| format!("cannot run {}: {e}", bin.join("postgres").display()))
}

/// The hot-standby limits the primary ran with, from the copy's pg_control (`pg_controldata`):
/// `-c` settings at least as high.
async fn standby_limits(tools: &Tools, dir: &Path, user: &nix::unistd::User) -> Vec<String> {
    let out = tokio::process::Command::new(tools.server_bin.join("pg_controldata"))
        .arg("-D")
        .arg(dir)
        .env("LC_ALL", "C")
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .current_dir("/")
        .output()
        .await;
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let mut limits = Vec::new();
    for (label, setting) in [
        ("max_connections setting:", "max_connections"),
        ("max_worker_processes setting:", "max_worker_processes"),
        ("max_wal_senders setting:", "max_wal_senders"),
        ("max_prepared_xacts setting:", "max_prepared_transactions"),
        ("max_locks_per_xact setting:", "max_locks_per_transaction"),
    ] {
        let value = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|v| *v < 100_000);
        if let Some(v) = value {
            limits.push(format!("{setting}={v}"));
        }
    }
    limits
}

/// Replays to the plan's restore point and pauses there (a hot standby), counts the copy's rows
/// and compares them with the ones recorded with the point, then stops the server (replay goes on
/// from there to the target). A point never reached, or a count that differs, fails the build.
#[allow(clippy::too_many_arguments)]
async fn check_restore_point(
    cfg: &Config,
    tools: &Tools,
    dir: &Path,
    run: &Path,
    socket: &Path,
    user: &nix::unistd::User,
    server: &Arc<WalServer>,
    plan: &Plan,
    rp: &crate::backup::restore_point::RestorePoint,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(), PitrError> {
    let fail = PitrError::Build;
    progress(format!("pitr: replaying to restore point {} ({}, recorded {})", rp.name, rp.lsn, rp.created_at));
    let limits = standby_limits(tools, dir, user).await;
    let port = free_port().map_err(fail)?;
    let log = run.join("postgres-restore-point.log");
    let mut child = start_server(tools, dir, run, socket, port, None, &log, user, Some((&rp.name, &limits)))?;
    let local =
        PgTarget { socket_dir: run.to_path_buf(), port, user: cfg.services.postgres.user.clone(), bin_dir: None };
    let mut last_report = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(fail(format!(
                "recovery did not reach restore point {} ({status}): {}",
                rp.name,
                last_lines(&text, 6)
            )));
        }
        if let Ok(c) = local.connect("postgres", Duration::from_secs(2)).await
            && let Ok(row) = c.query_one("SELECT pg_get_wal_replay_pause_state()", &[]).await
            && row.get::<_, String>(0) == "paused"
        {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            let through = server.stats().newest_planned_fetched;
            let done = through.map_or(0, |s| plan.chain.segments.range(..=s).count());
            progress(format!(
                "pitr: replaying to the restore point: segment {done} of the chain's {} fetched",
                plan.chain.segments.len()
            ));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let counted = super::postgres::row_counts(&local, &rp.database, None, 1).await;
    let stopped = stop_child(&mut child).await;
    let counts = counted.map_err(|e| fail(format!("counting rows at restore point {}: {e}", rp.name)))?;
    stopped.map_err(fail)?;
    let diff = crate::backup::restore_point::differences(rp, &counts);
    if !diff.is_empty() {
        let list: Vec<String> = diff.iter().map(|(t, e, a)| format!("{t}: {e} recorded, {a} replayed")).collect();
        return Err(fail(format!(
            "at restore point {} the replayed cluster does not hold what was committed: {}",
            rp.name,
            list.join("; ")
        )));
    }
    progress(format!(
        "pitr: at restore point {}: {} tables, {} rows, every count equal to the recorded ones",
        rp.name,
        rp.counts.len(),
        rp.counts.values().sum::<i64>()
    ));
    Ok(())
}

/// Waits until the server has promoted (Ok), or has exited (Err with its log).
async fn wait_promoted(
    child: &mut tokio::process::Child,
    run: &Path,
    port: u16,
    log: &Path,
    server: &Arc<WalServer>,
    plan: &Plan,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<(), String> {
    let target = PgTarget { socket_dir: run.to_path_buf(), port, user: "postgres".into(), bin_dir: None };
    let mut last_report = Instant::now();
    let need = plan.chain.segments.len();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return Err(std::fs::read_to_string(log).unwrap_or_default());
        }
        if let Ok(c) = target.connect("postgres", Duration::from_secs(2)).await
            && let Ok(row) = c.query_one("SELECT pg_is_in_recovery()", &[]).await
            && !row.get::<_, bool>(0)
        {
            return Ok(());
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            // By position in the chain: PostgreSQL asks for some files twice, and for history files.
            let through = server.stats().newest_planned_fetched;
            let done = through.map_or(0, |s| plan.chain.segments.range(..=s).count());
            progress(format!("pitr: replaying WAL: segment {done} of the chain's {need} fetched"));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn verify_copy(
    cfg: &Config,
    local: &PgTarget,
    plan: &Plan,
) -> Result<(Option<String>, u32, BTreeMap<String, i64>), PitrError> {
    let fail = PitrError::Build;
    let c = local.connect("postgres", Duration::from_secs(30)).await.map_err(|e| fail(e.to_string()))?;
    let row = c
        .query_one(
            "SELECT to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                    (SELECT timeline_id FROM pg_control_checkpoint()),
                    (SELECT system_identifier::text FROM pg_control_system())",
            &[],
        )
        .await
        .map_err(|e| fail(format!("asking the restored cluster: {e}")))?;
    let last: Option<String> = row.get(0);
    let timeline: i32 = row.get(1);
    let sysid: String = row.get(2);
    if sysid != plan.details.system_identifier {
        return Err(fail(format!(
            "the restored cluster is system {sysid}, the base backup's is {}",
            plan.details.system_identifier
        )));
    }
    if let (Target::Time(t), Some(l)) = (plan.target, &last)
        && time_of(l) > t
    {
        return Err(fail(format!("recovery went past the target: the last replayed commit is at {l}")));
    }
    let db = &cfg.backup.database;
    let exists = c
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[db])
        .await
        .map_err(|e| fail(e.to_string()))?
        .is_some();
    if !exists {
        return Err(fail(format!("the application's database {db} is not in the restored cluster")));
    }
    let counts = super::postgres::row_counts(local, db, None, 1)
        .await
        .map_err(|e| fail(format!("the restored {db} does not answer: {e}")))?;
    Ok((last, timeline as u32, counts))
}

/// Fast shutdown of the restore's own server (SIGINT), waited for (at most 10 minutes: the
/// shutdown checkpoint writes what replay dirtied).
pub(super) async fn stop_child(child: &mut tokio::process::Child) -> Result<(), String> {
    let Some(pid) = child.id() else { return Ok(()) };
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT);
    match tokio::time::timeout(Duration::from_secs(600), child.wait()).await {
        Ok(Ok(s)) if s.success() => Ok(()),
        Ok(Ok(s)) => Err(format!("the restored cluster did not shut down cleanly ({s})")),
        Ok(Err(e)) => Err(format!("waiting for the restored cluster to stop: {e}")),
        Err(_) => Err("the restored cluster did not stop within 10 minutes".into()),
    }
}

/// When this process started (a build it runs itself is newer than that).
pub fn process_started() -> SystemTime {
    static AT: std::sync::OnceLock<SystemTime> = std::sync::OnceLock::new();
    *AT.get_or_init(SystemTime::now)
}

/// Removes what an interrupted build left beside `data_dir` (`NAME.pitr-STAMP`, its `.run`
/// folder) — never the live directory, never a kept one, never one newer than `since` (a build
/// running now). Returns what it did.
pub fn cleanup(data_dir: &Path, since: SystemTime) -> Vec<String> {
    let (Some(parent), Some(name)) = (data_dir.parent(), data_dir.file_name()) else { return vec![] };
    let prefix = format!("{}.pitr-", name.to_string_lossy());
    let mut done = Vec::new();
    for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = n.strip_prefix(&prefix) else { continue };
        let stamp = rest.strip_suffix(".run").unwrap_or(rest);
        let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < since);
        if super::leftovers::is_stamp(stamp) && old && e.path() != data_dir && std::fs::remove_dir_all(e.path()).is_ok()
        {
            done.push(format!("removed {} left by an interrupted point-in-time restore", e.path().display()));
        }
    }
    done
}

/// Puts the built copy in place of the live data directory (see the module's step 4). Returns
/// where the old directory is kept.
pub async fn swap_in(
    cfg: &Config,
    systemd: &Systemd,
    built: &Built,
    ts: &str,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<PathBuf, PitrError> {
    let data = cfg.services.postgres.data_dir.clone();
    let kept = sibling(&data, &format!("before-pitr-{ts}"));
    let pg_unit = cfg.services.postgres.unit.to_string();
    let api = cfg.services.api.unit.to_string();
    if let Some(other) = maintenance::held(&pg_unit) {
        progress(format!("swap: waiting until {pg_unit} is released ({other})"));
    }
    let _hold_pg = maintenance::hold(&pg_unit, "point-in-time restore in progress").await;
    let _hold_api = maintenance::hold(&api, "point-in-time restore in progress").await;
    let swap_err = |e: super::swap::SwapError| PitrError::Swap(e.to_string());
    let api_active = systemd.state(&api).await.map(|s| s.is_active()).unwrap_or(false);
    if api_active {
        progress(format!("swap: stopping {api}"));
        super::swap::stop(systemd, &api, cfg).await.map_err(swap_err)?;
    }
    progress(format!("swap: stopping {pg_unit}"));
    if let Err(e) = super::swap::stop(systemd, &pg_unit, cfg).await {
        if api_active {
            let _ = super::swap::start(systemd, &api, cfg).await;
        }
        return Err(swap_err(e));
    }
    progress(format!(
        "swap: {} → {} (kept), {} → {}",
        data.display(),
        kept.display(),
        built.dir.display(),
        data.display()
    ));
    if let Err(e) = std::fs::rename(&data, &kept) {
        let _ = super::swap::start(systemd, &pg_unit, cfg).await;
        if api_active {
            let _ = super::swap::start(systemd, &api, cfg).await;
        }
        return Err(PitrError::Swap(format!("cannot move {} aside: {e}; nothing was swapped", data.display())));
    }
    if let Err(e) = std::fs::rename(&built.dir, &data) {
        let _ = std::fs::rename(&kept, &data);
        let _ = super::swap::start(systemd, &pg_unit, cfg).await;
        return Err(PitrError::Swap(format!("cannot move the restored copy into place: {e}; the old data is back")));
    }
    let _ = crate::fsutil::sync_dir(data.parent().unwrap_or(Path::new("/")));
    let gate = Gate::from_config(cfg);
    let healthy = async {
        super::swap::start(systemd, &pg_unit, cfg).await.map_err(|e| e.to_string())?;
        gate.run(&Probe::for_service(&cfg.services, ServiceKind::Postgres)).await?;
        if api_active {
            progress(format!("swap: starting {api} and health-gating it"));
            super::swap::start(systemd, &api, cfg).await.map_err(|e| e.to_string())?;
            gate.run(&Probe::for_service(&cfg.services, ServiceKind::Api)).await?;
        }
        Ok::<(), String>(())
    }
    .await;
    if let Err(reason) = healthy {
        warn!("unhealthy on the restored data: {reason}; swapping back");
        progress(format!("swap back: unhealthy on the restored data: {reason}"));
        let _ = super::swap::stop(systemd, &api, cfg).await;
        let _ = super::swap::stop(systemd, &pg_unit, cfg).await;
        let failed = sibling(&data, &format!("failed-pitr-{ts}"));
        let back = std::fs::rename(&data, &failed).and_then(|()| std::fs::rename(&kept, &data));
        let _ = super::swap::start(systemd, &pg_unit, cfg).await;
        if api_active {
            let _ = super::swap::start(systemd, &api, cfg).await;
        }
        return Err(PitrError::Swap(match back {
            Ok(()) => format!(
                "swapped back: unhealthy on the restored data ({reason}); the live data is the one from before, the \
                 restored copy is kept as {}",
                failed.display()
            ),
            Err(e) => format!("unhealthy on the restored data ({reason}) and the swap back failed: {e}"),
        }));
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_removes_only_interrupted_builds_older_than_the_process() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("postgres");
        for n in [
            "postgres",
            "postgres.pitr-20261201_140307",
            "postgres.pitr-20261201_140307.run",
            "postgres.before-pitr-20261201_140307",
            "postgres.pitr-junk",
            "other.pitr-20261201_140307",
        ] {
            std::fs::create_dir_all(d.path().join(n)).unwrap();
        }
        // Nothing is older than a start in the past: a build running now is left alone.
        assert!(cleanup(&data, SystemTime::UNIX_EPOCH).is_empty());
        let done = cleanup(&data, SystemTime::now() + Duration::from_secs(5));
        assert_eq!(done.len(), 2, "{done:?}");
        let left: std::collections::BTreeSet<String> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            left,
            ["other.pitr-20261201_140307", "postgres", "postgres.before-pitr-20261201_140307", "postgres.pitr-junk"]
                .map(String::from)
                .into()
        );
    }

    #[test]
    fn targets_parse_in_utc_only() {
        assert_eq!(Target::parse("latest").unwrap(), Target::Latest);
        let t = Target::parse("2026-12-01 14:03:07Z").unwrap();
        assert_eq!(t, Target::Time(humantime::parse_rfc3339("2026-12-01T14:03:07Z").unwrap()));
        let t = Target::parse("2026-12-01T14:03:07.250Z").unwrap();
        assert_eq!(t.describe(), "2026-12-01T14:03:07.250000Z");
        assert!(Target::parse("2026-12-01 14:03:07").unwrap_err().contains("UTC"));
        assert!(Target::parse("yesterday Z").is_err());
        assert_eq!(
            build_dir(Path::new("/data/postgres"), "20261201_140307"),
            PathBuf::from("/data/postgres.pitr-20261201_140307")
        );
    }
}
