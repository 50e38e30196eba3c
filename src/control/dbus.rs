//! `io.shtetl.Caretaker1`: properties expose the daemon's status, methods ask it to act. Methods
//! that change anything are allowed to root only, by the D-Bus policy in
//! `packaging/dbus/io.shtetl.Caretaker1.conf`; properties and introspection are open to all.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use zbus::interface;
use zbus::object_server::SignalEmitter;

use super::jobs::Jobs;
use crate::backup::run::Kind;

/// Errors returned to D-Bus callers, as `io.shtetl.Caretaker1.Error.*`.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "io.shtetl.Caretaker1.Error")]
pub enum ControlError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The new configuration is invalid; the old one stays in force.
    InvalidConfig(String),
    /// The daemon is shutting down.
    ShuttingDown(String),
    /// Another mutating job is running.
    Busy(String),
    /// No job with that id.
    NoSuchJob(String),
    /// The request is invalid (bad argument); nothing was started.
    InvalidArgs(String),
}

/// A request from a D-Bus caller to the main loop, answered through the oneshot.
#[derive(Debug)]
pub enum Request {
    Reload(oneshot::Sender<Result<(), String>>),
}

/// What the daemon tells anyone who asks. Kept small and cheap to clone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DaemonStatus {
    pub state: String,
    pub version: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub config_files: Vec<String>,
    /// The last reload's outcome ("" before the first reload).
    pub last_reload: String,
    /// The supervised services, in start order (empty when supervision is off).
    #[serde(default)]
    pub services: Vec<crate::supervise::supervisor::ServiceStatus>,
    /// Open incidents (each sent one email when it started).
    #[serde(default)]
    pub incidents: Vec<crate::notify::Incident>,
    /// The running job, if any.
    #[serde(default)]
    pub current_job: Option<super::jobs::JobInfo>,
    /// Finished jobs, newest last.
    #[serde(default)]
    pub recent_jobs: Vec<super::jobs::JobInfo>,
    /// The backup schedule: next and last runs (none when backups are not configured).
    #[serde(default)]
    pub schedule: Option<crate::backup::scheduler::ScheduleStatus>,
}

/// `all`, `postgres` or `redis` as kinds.
fn parse_kinds(kind: &str) -> Result<Vec<Kind>, ControlError> {
    match kind {
        "all" => Ok(vec![Kind::Postgres, Kind::Redis]),
        k => Ok(vec![
            Kind::parse(k)
                .ok_or_else(|| ControlError::InvalidArgs(format!("kind `{k}` is not one of all, postgres, redis")))?,
        ]),
    }
}

/// Runs `work`, turning the lines it sends on `rx` into job progress, then drains them.
async fn pump<T>(
    ctx: &super::jobs::JobCtx,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    work: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let out = loop {
        tokio::select! {
            r = &mut work => break r,
            Some(line) = rx.recv() => ctx.phase(&line).await,
        }
    };
    while let Ok(line) = rx.try_recv() {
        ctx.phase(&line).await;
    }
    out
}

/// Applies retention.
pub fn prune_job(
    cfg: crate::config::Config,
    dry_run: bool,
    alerts: Option<crate::notify::Alerts>,
) -> impl FnOnce(super::jobs::JobCtx) -> super::jobs::JobFuture {
    move |ctx| {
        Box::pin(async move {
            let s3 = crate::backup::run::s3_for(&cfg).await.map_err(|e| e.to_string())?;
            let reports = match crate::backup::run::prune(&cfg, &s3, dry_run).await {
                Ok(r) => {
                    if let Some(a) = &alerts {
                        a.resolve("prune", "Retention was applied.");
                    }
                    r
                }
                Err(e) => {
                    if let Some(a) = &alerts {
                        a.open("prune", crate::backup::alerts::prune_failed(&e.to_string()));
                    }
                    return Err(e.to_string());
                }
            };
            let mut gone = 0;
            let mut kept = 0;
            for r in &reports {
                for d in &r.decisions {
                    let verb = match (d.keep, dry_run) {
                        (true, _) => "keep",
                        (false, true) => "would delete",
                        (false, false) => "deleted",
                    };
                    ctx.phase(&format!("{} {} {verb} {}", r.kind.as_str(), d.id, d.reasons.join(", "))).await;
                    if d.keep { kept += 1 } else { gone += 1 }
                }
            }
            Ok(format!("{kept} kept, {gone} {}", if dry_run { "would be deleted" } else { "deleted" }))
        })
    }
}

/// Restore drills of backup `id` (or the newest) of `kinds`.
pub fn verify_job(
    cfg: crate::config::Config,
    kinds: Vec<Kind>,
    id: String,
    alerts: Option<crate::notify::Alerts>,
) -> impl FnOnce(super::jobs::JobCtx) -> super::jobs::JobFuture {
    move |ctx| {
        Box::pin(async move {
            let s3 = crate::backup::run::s3_for(&cfg).await.map_err(|e| e.to_string())?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let progress = move |l: String| {
                let _ = tx.send(l);
            };
            let work = async {
                let mut done = Vec::new();
                let mut found = 0;
                for k in &kinds {
                    let m = match crate::backup::verify::find(&cfg, &s3, *k, &id).await {
                        Ok(m) => m,
                        // An id names one backup: the other kind not having it is fine.
                        Err(crate::backup::verify::VerifyError::NoSuchBackup { .. })
                            if id != "latest" || kinds.len() > 1 =>
                        {
                            continue;
                        }
                        Err(e) => return Err(e.to_string()),
                    };
                    found += 1;
                    let key = format!("verify:{}", k.as_str());
                    match crate::backup::verify::verify(&cfg, &s3, &m, &progress).await {
                        Ok(r) => {
                            progress(format!("{} {}: verified ({})", k.as_str(), m.id, r.checks.join("; ")));
                            if let Some(a) = &alerts {
                                a.resolve(&key, &format!("The {} backup {} verified.", k.as_str(), m.id));
                            }
                            done.push(format!("{} {} verified", k.as_str(), m.id));
                        }
                        Err(e) => {
                            if let Some(a) = &alerts {
                                a.open(&key, crate::backup::alerts::drill_failed(*k, &m.id, &e.to_string()));
                            }
                            crate::backup::scheduler::record("verify", std::time::SystemTime::now(), false);
                            return Err(format!("{} {} FAILED verification: {e}", k.as_str(), m.id));
                        }
                    }
                }
                if found == 0 {
                    return Err(format!("no backup {id} (see `caretaker backup list`)"));
                }
                crate::backup::scheduler::record("verify", std::time::SystemTime::now(), true);
                Ok(done.join(", "))
            };
            pump(&ctx, &mut rx, work).await
        })
    }
}

/// Backs up `kinds` in turn; alerts on failure, resolves on success.
pub fn backup_job(
    cfg: crate::config::Config,
    kinds: Vec<Kind>,
    alerts: Option<crate::notify::Alerts>,
) -> impl FnOnce(super::jobs::JobCtx) -> super::jobs::JobFuture {
    move |ctx| {
        Box::pin(async move {
            let started = std::time::SystemTime::now();
            let s3 = crate::backup::run::s3_for(&cfg).await.map_err(|e| e.to_string())?;
            let instance = crate::backup::run::instance_id();
            let mut done = Vec::new();
            for k in kinds {
                ctx.phase(&format!("{}: starting", k.as_str())).await;
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                let work = crate::backup::run::backup(&cfg, &s3, k, &instance, move |line| {
                    let _ = tx.send(line);
                });
                tokio::pin!(work);
                let manifest = loop {
                    tokio::select! {
                        r = &mut work => match r {
                            Ok(m) => {
                                if let Some(a) = &alerts {
                                    a.resolve(&crate::backup::alerts::backup_key(k), &format!("The {} backup {} succeeded.", k.as_str(), m.id));
                                }
                                break m;
                            }
                            Err(e) => {
                                if let Some(a) = &alerts {
                                    a.open(&crate::backup::alerts::backup_key(k), crate::backup::alerts::backup_failed(k, &e.to_string()));
                                }
                                crate::backup::scheduler::record("backup", started, false);
                                return Err(format!("{} backup failed: {e}", k.as_str()));
                            }
                        },
                        Some(line) = rx.recv() => ctx.progress(&line, 0, 0).await,
                        _ = ctx.cancel.cancelled() => return Err("cancelled: the daemon is stopping; the upload was aborted".into()),
                    }
                };
                while let Ok(line) = rx.try_recv() {
                    ctx.phase(&line).await;
                }
                done.push(format!(
                    "{} {} ({} stored)",
                    k.as_str(),
                    manifest.id,
                    crate::control::client::human_bytes(manifest.stored_bytes)
                ));
            }
            crate::backup::scheduler::record("backup", started, true);
            Ok(format!("backed up: {}", done.join(", ")))
        })
    }
}
/// The object served at `/io/shtetl/Caretaker1`.
pub struct Control {
    status: Arc<Mutex<DaemonStatus>>,
    requests: mpsc::Sender<Request>,
    jobs: Arc<Jobs>,
    /// The configuration in force (replaced on reload).
    config: Arc<std::sync::RwLock<crate::config::Config>>,
}

impl Control {
    pub fn new(
        status: Arc<Mutex<DaemonStatus>>,
        requests: mpsc::Sender<Request>,
        jobs: Arc<Jobs>,
        config: Arc<std::sync::RwLock<crate::config::Config>>,
    ) -> Self {
        Control { status, requests, jobs, config }
    }

    fn snapshot(&self) -> DaemonStatus {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.current_job = self.jobs.current();
        s.recent_jobs = self.jobs.history();
        s
    }
}

#[interface(name = "io.shtetl.Caretaker1")]
impl Control {
    /// The daemon's state: starting, running, reloading, stopping.
    #[zbus(property)]
    fn state(&self) -> String {
        self.snapshot().state
    }

    /// caretaker's version.
    #[zbus(property)]
    fn version(&self) -> String {
        self.snapshot().version
    }

    /// When this daemon process started (RFC 3339, UTC).
    #[zbus(property)]
    fn started_at(&self) -> String {
        self.snapshot().started_at
    }

    /// The configuration files in force, in merge order.
    #[zbus(property)]
    fn config_files(&self) -> Vec<String> {
        self.snapshot().config_files
    }

    /// Outcome of the last reload.
    #[zbus(property)]
    fn last_reload(&self) -> String {
        self.snapshot().last_reload
    }

    /// The whole status as one JSON document (what `caretaker status --json` prints).
    #[zbus(property)]
    fn status_json(&self) -> String {
        serde_json::to_string(&self.snapshot()).unwrap_or_default()
    }

    /// Starts a backup job of `kind` (`all`, `postgres` or `redis`); returns the job id.
    async fn backup_now(&self, kind: &str) -> Result<String, ControlError> {
        let kinds =
            match kind {
                "all" => vec![Kind::Postgres, Kind::Redis],
                k => vec![Kind::parse(k).ok_or_else(|| {
                    ControlError::InvalidArgs(format!("kind `{k}` is not one of all, postgres, redis"))
                })?],
            };
        let cfg = self.config.read().unwrap_or_else(|p| p.into_inner()).clone();
        if cfg.backup.bucket.is_none() {
            return Err(ControlError::InvalidArgs("backups are not configured: set backup.bucket".into()));
        }
        let alerts = self.jobs.alerts();
        let description = format!("backup {kind}");
        let info = self
            .jobs
            .start("backup", &description, backup_job(cfg, kinds, alerts))
            .map_err(|b| ControlError::Busy(b.to_string()))?;
        Ok(info.id)
    }

    /// Starts a restore drill of backup `id` (`latest`: the newest of each kind in `kind`); returns
    /// the job id. `kind` is `all`, `postgres` or `redis`.
    async fn verify(&self, kind: &str, id: &str) -> Result<String, ControlError> {
        let kinds = parse_kinds(kind)?;
        if id != "latest" && !crate::backup::run::valid_id(id) {
            return Err(ControlError::InvalidArgs(format!(
                "`{id}` is not a backup id (like 20261122T030000Z-a1b2c3) or latest"
            )));
        }
        let cfg = self.config.read().unwrap_or_else(|p| p.into_inner()).clone();
        if cfg.backup.bucket.is_none() {
            return Err(ControlError::InvalidArgs("backups are not configured: set backup.bucket".into()));
        }
        let id = id.to_string();
        let alerts = self.jobs.alerts();
        let description = format!("verify {kind} {id}");
        let info = self
            .jobs
            .start("verify", &description, verify_job(cfg, kinds, id, alerts))
            .map_err(|b| ControlError::Busy(b.to_string()))?;
        Ok(info.id)
    }

    /// Starts a restore (a job): `what` is `postgres` or `redis`; `backup` an id or `latest`;
    /// `target_db` (postgres only, empty: backup.database) the database to replace. The backup is
    /// loaded into something new and verified before anything live is touched.
    async fn restore(&self, what: &str, backup: &str, target_db: &str) -> Result<String, ControlError> {
        let kind = Kind::parse(what)
            .ok_or_else(|| ControlError::InvalidArgs(format!("`{what}` is not one of postgres, redis")))?;
        if backup != "latest" && !crate::backup::run::valid_id(backup) {
            return Err(ControlError::InvalidArgs(format!(
                "`{backup}` is not a backup id (like 20261122T030000Z-a1b2c3) or latest"
            )));
        }
        if !target_db.is_empty()
            && (kind != Kind::Postgres
                || target_db.len() > 40
                || !target_db.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'))
        {
            return Err(ControlError::InvalidArgs(format!(
                "target database `{target_db}`: postgres only, lowercase letters, digits and _ (at most 40)"
            )));
        }
        let cfg = self.config.read().unwrap_or_else(|p| p.into_inner()).clone();
        if cfg.backup.bucket.is_none() {
            return Err(ControlError::InvalidArgs("backups are not configured: set backup.bucket".into()));
        }
        let conn = self
            .jobs
            .connection()
            .ok_or_else(|| ControlError::ShuttingDown("the daemon is still starting; try again".into()))?;
        let (backup, target_db) = (backup.to_string(), target_db.to_string());
        let description = format!("restore {what} {backup}");
        let info = self
            .jobs
            .start("restore", &description, move |ctx| {
                Box::pin(async move {
                    let s3 = crate::backup::run::s3_for(&cfg).await.map_err(|e| e.to_string())?;
                    let systemd = crate::systemd::manager::Systemd::new(&conn).await.map_err(|e| e.to_string())?;
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                    let progress = move |l: String| {
                        let _ = tx.send(l);
                    };
                    let work = async {
                        match kind {
                            Kind::Postgres => {
                                let target = (!target_db.is_empty()).then_some(target_db.as_str());
                                let r =
                                    crate::restore::restore_postgres(&cfg, &s3, &systemd, &backup, target, &progress)
                                        .await
                                        .map_err(|e| format!("restore failed, the live database is unchanged: {e}"))?;
                                Ok(format!(
                                    "restored backup {} as {} ({} tables, {} rows){}",
                                    r.backup,
                                    r.database,
                                    r.tables,
                                    r.rows,
                                    r.kept
                                        .map(|k| format!("; the previous database is kept as {k}"))
                                        .unwrap_or_default()
                                ))
                            }
                            Kind::Redis => {
                                let r = crate::restore::restore_redis(&cfg, &s3, &systemd, &backup, &progress)
                                    .await
                                    .map_err(|e| format!("restore failed: {e}"))?;
                                Ok(format!(
                                    "restored redis backup {} ({} keys); the previous RDB is kept as {}",
                                    r.backup,
                                    r.dbsize,
                                    r.kept.display()
                                ))
                            }
                        }
                    };
                    pump(&ctx, &mut rx, work).await
                })
            })
            .map_err(|b| ControlError::Busy(b.to_string()))?;
        Ok(info.id)
    }

    /// Starts a migration (a job) from the PostgreSQL named by the SSM parameter `ssm_param` or the
    /// root-only file `url_file` (exactly one non-empty); with `swap` the verified copy replaces
    /// the live database. The connection string itself never crosses the bus.
    async fn migrate(&self, ssm_param: &str, url_file: &str, swap: bool) -> Result<String, ControlError> {
        let source = match (ssm_param.is_empty(), url_file.is_empty()) {
            (false, true) => {
                if !ssm_param.starts_with('/')
                    || !ssm_param.bytes().all(|c| c.is_ascii_alphanumeric() || b"/_.-".contains(&c))
                {
                    return Err(ControlError::InvalidArgs(format!("`{ssm_param}` is not an SSM parameter name")));
                }
                crate::migrate::Source::SsmParameter(ssm_param.to_string())
            }
            (true, false) => crate::migrate::Source::File(url_file.into()),
            _ => {
                return Err(ControlError::InvalidArgs(
                    "give exactly one of --source-ssm-param and --source-url-file".into(),
                ));
            }
        };
        let cfg = self.config.read().unwrap_or_else(|p| p.into_inner()).clone();
        let conn = self
            .jobs
            .connection()
            .ok_or_else(|| ControlError::ShuttingDown("the daemon is still starting; try again".into()))?;
        let description = format!("migrate{}", if swap { " and swap" } else { "" });
        let info = self
            .jobs
            .start("migrate", &description, move |ctx| {
                Box::pin(async move {
                    let systemd = crate::systemd::manager::Systemd::new(&conn).await.map_err(|e| e.to_string())?;
                    let report_path = std::path::Path::new(crate::boot::firstboot::STATE_DIR)
                        .join(format!("migrate-{}.json", crate::restore::stamp(std::time::SystemTime::now())));
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                    let progress = move |l: String| {
                        let _ = tx.send(l);
                    };
                    let work = async {
                        let r = crate::migrate::migrate(&cfg, &source, swap.then_some(&systemd), &report_path, &progress)
                            .await
                            .map_err(|e| format!("migration failed, the live database is unchanged: {e}"))?;
                        let checks = r.checks.len();
                        Ok(match r.kept {
                            Some(k) => format!(
                                "migrated: {checks} checks [OK]; swapped in as {}, the previous database is kept as {k}; report {}",
                                r.database,
                                report_path.display()
                            ),
                            None if swap => format!("migrated: {checks} checks [OK]; swapped in as {}", r.database),
                            None => format!(
                                "migrated: {checks} checks [OK]; the copy is {} (not swapped: run again with --swap); report {}",
                                r.database,
                                report_path.display()
                            ),
                        })
                    };
                    pump(&ctx, &mut rx, work).await
                })
            })
            .map_err(|b| ControlError::Busy(b.to_string()))?;
        Ok(info.id)
    }

    /// Applies retention (keep-daily, keep-weekly; never the newest or the newest verified backup):
    /// deletes what is not kept, or with `dry_run` only says what would go. Returns the job id.
    async fn prune(&self, dry_run: bool) -> Result<String, ControlError> {
        let cfg = self.config.read().unwrap_or_else(|p| p.into_inner()).clone();
        if cfg.backup.bucket.is_none() {
            return Err(ControlError::InvalidArgs("backups are not configured: set backup.bucket".into()));
        }
        let alerts = self.jobs.alerts().filter(|_| !dry_run);
        let description = if dry_run { "prune (dry run)" } else { "prune" };
        let info = self
            .jobs
            .start("prune", description, prune_job(cfg, dry_run, alerts))
            .map_err(|b| ControlError::Busy(b.to_string()))?;
        Ok(info.id)
    }

    /// Starts an update of the API to `version` (`latest`: what APP/LATEST names); with `dry_run`
    /// fetch and verify only. Returns the job id. The version is validated before anything else.
    async fn update(&self, version: &str, dry_run: bool) -> Result<String, ControlError> {
        let target = if version == "latest" {
            crate::release::Target::Latest
        } else {
            crate::release::validate_version(version).map_err(|e| ControlError::InvalidArgs(e.to_string()))?;
            crate::release::Target::Version(version.to_string())
        };
        let cfg = self.config.read().unwrap_or_else(|p| p.into_inner()).clone();
        if cfg.release.bucket.is_none() {
            return Err(ControlError::InvalidArgs("updates are not configured: set release.bucket".into()));
        }
        let conn = self
            .jobs
            .connection()
            .ok_or_else(|| ControlError::ShuttingDown("the daemon is still starting; try again".into()))?;
        let alerts = self.jobs.alerts();
        let description = format!("update to {version}{}", if dry_run { " (dry run)" } else { "" });
        let request = crate::release::UpdateRequest { target, dry_run };
        let info = self
            .jobs
            .start("update", &description, move |ctx| {
                Box::pin(async move {
                    let s3 = crate::backup::run::s3_for(&cfg).await.map_err(|e| e.to_string())?;
                    let systemd = crate::systemd::manager::Systemd::new(&conn).await.map_err(|e| e.to_string())?;
                    let unit = cfg.services.api.unit.to_string();
                    let timeout = cfg.supervise.start_timeout.get();
                    let probe = crate::supervise::supervisor::probe_for(&cfg, crate::config::ServiceKind::Api);
                    // The supervisor must not restart the API while the update restarts it.
                    let _hold = (!dry_run).then(|| crate::supervise::maintenance::hold(&unit, &ctx.id));
                    let restart = || {
                        let (systemd, unit) = (systemd.clone(), unit.clone());
                        async move {
                            let out = systemd.restart(&unit, timeout).await?;
                            if !out.state.is_active() {
                                anyhow::bail!(
                                    "restarting {unit}: job {}, unit {} ({})",
                                    out.job_result,
                                    out.state.active_state,
                                    out.state.result
                                );
                            }
                            Ok(())
                        }
                    };
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                    let work =
                        crate::release::update(&cfg, &s3, &request, restart, &probe, alerts.as_ref(), move |l| {
                            let _ = tx.send(l);
                        });
                    tokio::pin!(work);
                    let outcome = loop {
                        tokio::select! {
                            r = &mut work => break r,
                            Some(line) = rx.recv() => ctx.phase(&line).await,
                        }
                    };
                    while let Ok(line) = rx.try_recv() {
                        ctx.phase(&line).await;
                    }
                    match outcome {
                        Ok(o) if o.is_success() => Ok(o.summary()),
                        Ok(o) => Err(o.summary()),
                        Err(e) => Err(e.to_string()),
                    }
                })
            })
            .map_err(|b| ControlError::Busy(b.to_string()))?;
        Ok(info.id)
    }

    /// A job's state as JSON (see `JobInfo`), for clients that missed its signals.
    fn job_status(&self, id: &str) -> Result<String, ControlError> {
        self.jobs
            .get(id)
            .map(|j| serde_json::to_string(&j).unwrap_or_default())
            .ok_or_else(|| ControlError::NoSuchJob(format!("no job {id} (status keeps the last 20)")))
    }

    /// Progress of a running job: a line of text and, when known, bytes done and total.
    #[zbus(signal)]
    pub async fn job_progress(
        emitter: &SignalEmitter<'_>,
        id: &str,
        message: &str,
        done: u64,
        total: u64,
    ) -> zbus::Result<()>;

    /// A job ended: `ok` and its one-line summary (or error).
    #[zbus(signal)]
    pub async fn job_finished(emitter: &SignalEmitter<'_>, id: &str, ok: bool, summary: &str) -> zbus::Result<()>;

    /// Re-reads the configuration. An invalid configuration is refused with
    /// `io.shtetl.Caretaker1.Error.InvalidConfig` and the old one stays in force.
    async fn reload(&self) -> Result<(), ControlError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Reload(tx))
            .await
            .map_err(|_| ControlError::ShuttingDown("the daemon is shutting down".into()))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(msg)) => Err(ControlError::InvalidConfig(msg)),
            Err(_) => Err(ControlError::ShuttingDown("the daemon is shutting down".into())),
        }
    }
}
