//! `io.shtetl.Caretaker1`: properties expose the daemon's status, methods ask it to act. Methods
//! that change anything are allowed to root only, by the D-Bus policy in
//! `packaging/dbus/io.shtetl.Caretaker1.conf`; properties and introspection are open to all.

use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;
use zbus::interface;
use zbus::object_server::SignalEmitter;

use super::bodies;
use super::jobs::{JobEvent, Jobs};
pub use super::wire::DaemonStatus;
use super::wire::ServiceStatus;
use crate::backup::migrate::Source;
use crate::backup::run::Kind;
use crate::config::Config;
use crate::systemd::manager::Systemd;

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
    /// The caller is not root (checked by the daemon itself, beside the D-Bus policy).
    AccessDenied(String),
}

/// A request from a D-Bus caller to the main loop, answered through the oneshot.
#[derive(Debug)]
pub enum Request {
    Reload(oneshot::Sender<Result<(), String>>),
}

/// `all`, `postgres` or `redis` as kinds.
fn parse_kinds(kind: &str) -> Result<Vec<Kind>, ControlError> {
    Kind::parse_set(kind)
        .ok_or_else(|| ControlError::InvalidArgs(format!("kind `{kind}` is not one of all, postgres, redis, base")))
}

/// A backup id as the methods take it: an id like `20261122T030000Z-a1b2c3`, or `latest`.
fn check_backup_id(id: &str) -> Result<(), ControlError> {
    if id == "latest" || crate::backup::run::valid_id(id) {
        Ok(())
    } else {
        Err(ControlError::InvalidArgs(format!("`{id}` is not a backup id (like 20261122T030000Z-a1b2c3) or latest")))
    }
}

/// Defence in depth beside the D-Bus policy (which already lets only root call these): a method
/// that changes anything serves root only, whatever a policy file on the box says.
async fn require_root(conn: &zbus::Connection, hdr: &zbus::message::Header<'_>) -> Result<(), ControlError> {
    let sender = hdr.sender().ok_or_else(|| ControlError::AccessDenied("the call has no sender".into()))?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await.map_err(ControlError::ZBus)?;
    let uid = dbus
        .get_connection_unix_user(zbus::names::BusName::from(sender.to_owned()))
        .await
        .map_err(|e| ControlError::ZBus(e.into()))?;
    if uid != 0 {
        return Err(ControlError::AccessDenied(format!(
            "only root may change anything through caretaker (the caller runs as uid {uid})"
        )));
    }
    Ok(())
}

fn busy(b: super::jobs::Busy) -> ControlError {
    ControlError::Busy(b.to_string())
}

/// Sends the job table's events as `JobProgress` and `JobFinished` signals, in order, until the
/// table is gone.
pub async fn forward_job_events(emitter: SignalEmitter<'static>, mut events: mpsc::UnboundedReceiver<JobEvent>) {
    while let Some(event) = events.recv().await {
        let sent = match &event {
            JobEvent::Progress { id, message, done, total } => {
                Control::job_progress(&emitter, id, message, *done, *total).await
            }
            JobEvent::Finished { id, ok, summary } => Control::job_finished(&emitter, id, *ok, summary).await,
        };
        if let Err(e) = sent {
            warn!("cannot send a job signal: {e}");
        }
    }
}

/// The object served at `/io/shtetl/Caretaker1`.
pub struct Control {
    status: Arc<Mutex<DaemonStatus>>,
    /// The supervised services, as the supervisor publishes them.
    services: watch::Receiver<Vec<ServiceStatus>>,
    requests: mpsc::Sender<Request>,
    jobs: Arc<Jobs>,
    /// The configuration in force (replaced on reload).
    config: Arc<RwLock<Config>>,
}

impl Control {
    pub fn new(
        status: Arc<Mutex<DaemonStatus>>,
        services: watch::Receiver<Vec<ServiceStatus>>,
        requests: mpsc::Sender<Request>,
        jobs: Arc<Jobs>,
        config: Arc<RwLock<Config>>,
    ) -> Self {
        Control { status, services, requests, jobs, config }
    }

    fn snapshot(&self) -> DaemonStatus {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.services = self.services.borrow().clone();
        s.incidents = self.jobs.alerts().map(|a| a.incidents()).unwrap_or_default();
        s.current_job = self.jobs.current();
        s.recent_jobs = self.jobs.history();
        s
    }

    fn config(&self) -> Config {
        self.config.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The configuration, when backups are configured.
    fn backup_config(&self) -> Result<Config, ControlError> {
        let cfg = self.config();
        if cfg.backup.bucket.is_none() {
            return Err(ControlError::InvalidArgs("backups are not configured: set backup.bucket".into()));
        }
        Ok(cfg)
    }

    fn systemd(&self) -> Result<Systemd, ControlError> {
        self.jobs.systemd().ok_or_else(|| ControlError::ShuttingDown("the daemon is still starting; try again".into()))
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
    async fn backup_now(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        kind: &str,
    ) -> Result<String, ControlError> {
        require_root(conn, &hdr).await?;
        let mut kinds = parse_kinds(kind)?;
        let cfg = self.backup_config()?;
        if kind == "all" {
            kinds = Kind::all_for(&cfg);
        }
        if kinds.contains(&Kind::Base) && !cfg.backup.wal_archive {
            return Err(ControlError::InvalidArgs(
                "a base backup needs WAL archiving: backup.wal-archive is off".into(),
            ));
        }
        let body = bodies::backup_job(cfg, kinds, self.jobs.alerts());
        Ok(self.jobs.start("backup", &format!("backup {kind}"), body).map_err(busy)?.id)
    }

    /// Starts a restore drill of backup `id` (`latest`: the newest of each kind in `kind`); returns
    /// the job id. `kind` is `all`, `postgres` or `redis`.
    async fn verify(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        kind: &str,
        id: &str,
    ) -> Result<String, ControlError> {
        require_root(conn, &hdr).await?;
        let mut kinds = parse_kinds(kind)?;
        check_backup_id(id)?;
        let cfg = self.backup_config()?;
        if kind == "all" && id == "latest" {
            kinds = Kind::all_for(&cfg);
        }
        let body = bodies::verify_job(cfg, kinds, id.to_string(), self.jobs.alerts());
        Ok(self.jobs.start("verify", &format!("verify {kind} {id}"), body).map_err(busy)?.id)
    }

    /// Starts a restore (a job): `what` is `postgres` or `redis`; `backup` an id or `latest`;
    /// `target_db` (postgres only, empty: backup.database) the database to replace. The backup is
    /// loaded into something new and verified before anything live is touched.
    async fn restore(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        what: &str,
        backup: &str,
        target_db: &str,
    ) -> Result<String, ControlError> {
        require_root(conn, &hdr).await?;
        let kind = Kind::parse(what)
            .ok_or_else(|| ControlError::InvalidArgs(format!("`{what}` is not one of postgres, redis")))?;
        check_backup_id(backup)?;
        if !target_db.is_empty()
            && (kind != Kind::Postgres
                || target_db.len() > 32
                || !target_db.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'))
        {
            return Err(ControlError::InvalidArgs(format!(
                "target database `{target_db}`: postgres only, lowercase letters, digits and _ (at most 32, so that the names a restore derives stay within PostgreSQL's 63)"
            )));
        }
        if let Some(why) = crate::backup::restore::refused_target(target_db) {
            return Err(ControlError::InvalidArgs(format!("target database {why}")));
        }
        let cfg = self.backup_config()?;
        let systemd = self.systemd()?;
        let body = bodies::restore_job(cfg, systemd, kind, backup.to_string(), target_db.to_string());
        Ok(self.jobs.start("restore", &format!("restore {what} {backup}"), body).map_err(busy)?.id)
    }

    /// Starts a point-in-time restore of the whole PostgreSQL cluster (a job): `target` is
    /// `latest` or a UTC time (`2026-12-01 14:03:07Z`). Refused up front when the WAL archive is
    /// off; the plan (window, chain) is checked by the job before anything is touched.
    async fn restore_to_time(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        target: &str,
    ) -> Result<String, ControlError> {
        require_root(conn, &hdr).await?;
        let parsed = crate::backup::pitr::Target::parse(target).map_err(ControlError::InvalidArgs)?;
        let cfg = self.backup_config()?;
        if !cfg.backup.wal_archive {
            return Err(ControlError::InvalidArgs(
                "point-in-time recovery needs WAL archiving: backup.wal-archive is off".into(),
            ));
        }
        let systemd = self.systemd()?;
        let body = bodies::pitr_job(cfg, systemd, parsed);
        Ok(self.jobs.start("restore", &format!("restore postgres to {}", parsed.describe()), body).map_err(busy)?.id)
    }

    /// Starts a migration (a job) from the PostgreSQL named by the SSM parameter `ssm_param` or the
    /// root-only file `url_file` (exactly one non-empty); with `swap` the verified copy replaces
    /// the live database. The connection string itself never crosses the bus.
    async fn migrate(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        ssm_param: &str,
        url_file: &str,
        swap: bool,
    ) -> Result<String, ControlError> {
        require_root(conn, &hdr).await?;
        let source = match (ssm_param.is_empty(), url_file.is_empty()) {
            (false, true) => {
                if !ssm_param.starts_with('/')
                    || !ssm_param.bytes().all(|c| c.is_ascii_alphanumeric() || b"/_.-".contains(&c))
                {
                    return Err(ControlError::InvalidArgs(format!("`{ssm_param}` is not an SSM parameter name")));
                }
                Source::SsmParameter(ssm_param.to_string())
            }
            (true, false) => Source::File(url_file.into()),
            _ => {
                return Err(ControlError::InvalidArgs(
                    "give exactly one of --source-ssm-param and --source-url-file".into(),
                ));
            }
        };
        let systemd = self.systemd()?;
        let body = bodies::migrate_job(self.config(), systemd, source, swap);
        let description = format!("migrate{}", if swap { " and swap" } else { "" });
        Ok(self.jobs.start("migrate", &description, body).map_err(busy)?.id)
    }

    /// Applies retention (keep-daily, keep-weekly; never the newest or the newest verified backup):
    /// deletes what is not kept, or with `dry_run` only says what would go. Returns the job id.
    async fn prune(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        dry_run: bool,
    ) -> Result<String, ControlError> {
        require_root(conn, &hdr).await?;
        let cfg = self.backup_config()?;
        let alerts = self.jobs.alerts().filter(|_| !dry_run);
        let description = if dry_run { "prune (dry run)" } else { "prune" };
        Ok(self.jobs.start("prune", description, bodies::prune_job(cfg, dry_run, alerts)).map_err(busy)?.id)
    }

    /// Starts an update of the API to `version` (`latest`: what APP/LATEST names); with `dry_run`
    /// fetch and verify only; a version older than the running one only with `allow_downgrade`.
    /// Returns the job id. The version is validated before anything else.
    async fn update(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
        version: &str,
        dry_run: bool,
        allow_downgrade: bool,
    ) -> Result<String, ControlError> {
        require_root(conn, &hdr).await?;
        let target = if version == "latest" {
            crate::release::Target::Latest
        } else {
            crate::release::validate_version(version).map_err(|e| ControlError::InvalidArgs(e.to_string()))?;
            crate::release::Target::Version(version.to_string())
        };
        let cfg = self.config();
        if cfg.release.bucket.is_none() {
            return Err(ControlError::InvalidArgs("updates are not configured: set release.bucket".into()));
        }
        let systemd = self.systemd()?;
        let description = format!("update to {version}{}", if dry_run { " (dry run)" } else { "" });
        let request = crate::release::UpdateRequest { target, dry_run, allow_downgrade };
        let body = bodies::update_job(cfg, systemd, request, self.jobs.alerts());
        Ok(self.jobs.start("update", &description, body).map_err(busy)?.id)
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
    async fn reload(
        &self,
        #[zbus(header)] hdr: zbus::message::Header<'_>,
        #[zbus(connection)] conn: &zbus::Connection,
    ) -> Result<(), ControlError> {
        require_root(conn, &hdr).await?;
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
