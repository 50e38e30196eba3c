//! A cluster built from a logical dump, for the restore at boot when the backups hold no base
//! backup (archiving was never on): `initdb` in `DATA.pitr-STAMP` beside the empty data
//! directory; a private server there (its socket in a folder of its own, no TCP, no archiving);
//! the application's role, database and extensions provisioned as the daemon would; the dump
//! loaded into a new database by the unprivileged restore role, both hashes and every table's
//! row count checked against the manifest (see [`super::verify::load_postgres`]); the copy handed
//! to the application's role and renamed to the application's database; the server stopped
//! cleanly. Any failure removes the directory: nothing half-restored is ever left where the data
//! directory goes. (The `pitr-` name is the point-in-time build's: an interrupted build is
//! removed at the next start by [`super::pitr::cleanup`].)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::run::Manifest;
use crate::aws::s3::S3;
use crate::config::Config;
use crate::pg::{PgTarget, quote_ident};

/// A verified cluster, stopped, ready to be renamed into place.
#[derive(Debug, Clone, Serialize)]
pub struct DumpBuilt {
    pub dir: PathBuf,
    pub backup: String,
    /// When the dump's snapshot was taken.
    pub taken_at: String,
    pub tables: usize,
    pub rows: i64,
    pub load_ms: u64,
}

/// Builds the cluster of dump `m` in `dir` (which must not exist); on any failure `dir` is
/// removed.
pub async fn build(
    cfg: &Config,
    s3: &S3,
    m: &Manifest,
    dir: &Path,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<DumpBuilt, String> {
    if dir.exists() {
        return Err(format!("{} exists already", dir.display()));
    }
    let run = dir.with_file_name(format!("{}.run", dir.file_name().unwrap_or_default().to_string_lossy()));
    let r = build_in(cfg, s3, m, dir, &run, progress).await;
    let _ = std::fs::remove_dir_all(&run);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    r
}

async fn build_in(
    cfg: &Config,
    s3: &S3,
    m: &Manifest,
    dir: &Path,
    run: &Path,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<DumpBuilt, String> {
    let pg = &cfg.services.postgres;
    let user = nix::unistd::User::from_name(&pg.user)
        .ok()
        .flatten()
        .ok_or_else(|| format!("there is no OS user {}", pg.user))?;
    let _ = std::fs::remove_dir_all(run);
    make_dir(dir, 0o700, &user)?;
    // The restore role's pg_restore connects to the socket in here: searchable, not listable.
    make_dir(run, 0o711, &user)?;

    // 1. A new cluster, initialised as the box's own would be.
    let mut services = cfg.services.clone();
    services.postgres.data_dir = dir.to_path_buf();
    let clock = Instant::now();
    tokio::task::spawn_blocking(move || crate::boot::datadirs::initdb_if_empty(&services))
        .await
        .map_err(|e| format!("initdb: {e}"))?
        .map_err(|e| e.to_string())?;
    progress(format!("dump: a new cluster initialised in {} ({:.1} s)", dir.display(), clock.elapsed().as_secs_f64()));

    // 2. Its private server.
    let port = super::pitr::free_port()?;
    let log = run.join("postgres.log");
    let logfile = std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let settings = [
        format!("port={port}"),
        "listen_addresses=".into(),
        format!("unix_socket_directories={}", run.display()),
        "archive_mode=off".into(),
        "logging_collector=off".into(),
        "log_destination=stderr".into(),
        // caretaker.service's MemoryDenyWriteExecute= forbids JIT code.
        "jit=off".into(),
    ];
    let bin = super::pitr::Tools::for_config(cfg).server_bin;
    let mut child = super::pitr::spawn_server(&bin, dir, &settings, &user, logfile)?;
    let local = PgTarget { socket_dir: run.to_path_buf(), port, user: pg.user.clone(), bin_dir: pg.bin_dir.clone() };
    let up = Instant::now();
    loop {
        if local.connect("postgres", Duration::from_secs(2)).await.is_ok() {
            break;
        }
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the new cluster's server exited ({status}): {}", last_lines(&log_text())));
        }
        if up.elapsed() > Duration::from_secs(120) {
            return Err(format!("the new cluster's server did not answer within 120 s: {}", last_lines(&log_text())));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let result = load(cfg, s3, m, dir, run, port, &local, progress).await;
    // Fast shutdown: a clean checkpoint, so the cluster starts without recovery once in place.
    let stopped = super::pitr::stop_child(&mut child).await;
    let built = result?;
    stopped?;
    Ok(built)
}

#[allow(clippy::too_many_arguments)]
async fn load(
    cfg: &Config,
    s3: &S3,
    m: &Manifest,
    dir: &Path,
    run: &Path,
    port: u16,
    local: &PgTarget,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<DumpBuilt, String> {
    // 3. The application's role, database and extensions, as the daemon provisions them.
    let report = crate::supervise::provision::provision(local, &cfg.provision, &cfg.secrets.env_dir)
        .await
        .map_err(|e| format!("provisioning the new cluster: {e}"))?;
    progress(format!("dump: provisioned {}", report.created.join(", ")));

    // 4. The dump into a new database, verified; everything the supervisor and verify code
    //    read from the configuration points at the private server.
    let mut local_cfg = cfg.clone();
    local_cfg.services.postgres.socket_dir = run.to_path_buf();
    local_cfg.services.postgres.port = port;
    local_cfg.services.postgres.data_dir = dir.to_path_buf();
    let live = cfg.backup.database.clone();
    let new = format!("{live}_restore_{}", super::swap::stamp(std::time::SystemTime::now()));
    let loaded = super::verify::load_postgres(&local_cfg, s3, m, &new, progress)
        .await
        .map_err(|e| format!("backup {}: {e}", m.id))?;
    progress(format!(
        "dump: {new} matches backup {}: both hashes, {} tables with their row counts",
        m.id,
        loaded.tables.len()
    ));
    let owner = super::unprivileged::hand_to_owner_of(local, &new, &live, m.details["owner"].as_str())
        .await
        .map_err(|e| e.to_string())?;
    // 5. The provisioned database is the empty one this build created a moment ago: the
    //    verified copy takes its name.
    let admin = local.connect("postgres", Duration::from_secs(30)).await.map_err(|e| e.to_string())?;
    // (Two statements: DROP DATABASE refuses to run in the implicit transaction of one.)
    let live_q = quote_ident(&live);
    for sql in [
        format!("DROP DATABASE IF EXISTS {live_q} WITH (FORCE)"),
        format!("ALTER DATABASE {} RENAME TO {live_q}", quote_ident(&new)),
    ] {
        admin
            .batch_execute(&sql)
            .await
            .map_err(|e| format!("renaming {new} to {live}: {}", crate::pg::server_says(&e)))?;
    }
    let rows = loaded.tables.values().map(|(e, _)| e).sum();
    progress(format!(
        "dump: {live} holds backup {} ({} tables, {rows} rows), owned by {owner}",
        m.id,
        loaded.tables.len()
    ));
    Ok(DumpBuilt {
        dir: dir.to_path_buf(),
        backup: m.id.clone(),
        taken_at: m.started_at.clone(),
        tables: loaded.tables.len(),
        rows,
        load_ms: loaded.load_ms,
    })
}

fn make_dir(path: &Path, mode: u32, user: &nix::unistd::User) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(mode).create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    // The umask may have taken bits off.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", path.display()))?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid)).map_err(|e| format!("chown {}: {e}", path.display()))
}

fn last_lines(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}
