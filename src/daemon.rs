//! `caretaker daemon`: one tokio runtime, one main loop. The loop owns the state machine, pings the
//! watchdog (so a stuck loop fails it), handles signals and requests from the control plane.
//! READY is sent once the configuration is valid and our bus name is owned — never waiting for AWS
//! or the supervised services, so a daemon that cannot reach them still answers `status`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{self, Loaded, Sources};
use crate::control::dbus::{Control, Request};
use crate::control::jobs::Jobs;
use crate::control::wire::{DaemonStatus, ServiceStatus};
use crate::control::{self, BUS_NAME, OBJECT_PATH};
use crate::logging::LevelHandle;
use crate::systemd::notify::Notifier;
use crate::units::now_rfc3339;

/// How long shutdown waits for in-flight work after cancelling it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

/// The daemon's lifecycle. Every transition is checked against the allowed predecessors and
/// mirrored into sd_notify `STATUS=` and the `State` property.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonState {
    Starting,
    Running,
    Reloading,
    Stopping,
}

impl DaemonState {
    pub fn as_str(self) -> &'static str {
        match self {
            DaemonState::Starting => "starting",
            DaemonState::Running => "running",
            DaemonState::Reloading => "reloading",
            DaemonState::Stopping => "stopping",
        }
    }

    /// Whether `self → next` is a legal transition.
    pub fn can_become(self, next: DaemonState) -> bool {
        use DaemonState::*;
        matches!((self, next), (Starting, Running) | (Running, Reloading) | (Reloading, Running) | (_, Stopping))
    }
}

/// Why the daemon ended early.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Exit with [`crate::exit::CONFIG`]: systemd must not restart us into the same error.
    #[error("invalid configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("cannot take the bus name {BUS_NAME}{}: {source}\n  check the D-Bus policy /usr/share/dbus-1/system.d/io.shtetl.Caretaker1.conf and that no other caretaker daemon runs", address.as_deref().map(|a| format!(" on {a}")).unwrap_or_default())]
    Bus { address: Option<String>, source: zbus::Error },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

struct Daemon {
    /// What the control plane's jobs read; replaced on reload.
    shared_config: Arc<std::sync::RwLock<crate::config::Config>>,
    state: DaemonState,
    sources: Sources,
    loaded: Loaded,
    status: Arc<Mutex<DaemonStatus>>,
    notifier: Notifier,
    levels: LevelHandle,
}

impl Daemon {
    fn transition_to(&mut self, next: DaemonState, detail: &str) {
        assert!(self.state.can_become(next), "illegal daemon state transition {:?} → {:?}", self.state, next);
        self.state = next;
        let line = if detail.is_empty() { next.as_str().to_string() } else { format!("{}: {detail}", next.as_str()) };
        self.update_status(|s| s.state = next.as_str().to_string());
        match next {
            DaemonState::Stopping => self.notifier.stopping(),
            DaemonState::Reloading => {
                self.notifier.reloading();
                self.notifier.status(&line);
            }
            _ => self.notifier.status(&line),
        }
        info!(state = next.as_str(), "{line}");
    }

    fn update_status(&self, f: impl FnOnce(&mut DaemonStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Re-reads the configuration; on error the old one stays and the error is returned.
    fn reload(&mut self) -> Result<(), String> {
        self.transition_to(DaemonState::Reloading, "re-reading configuration");
        let result = match config::load(&self.sources) {
            Ok(loaded) => {
                if loaded.config.daemon.bus_address != self.loaded.config.daemon.bus_address {
                    warn!("daemon.bus-address changed; it takes effect at the next restart");
                }
                self.levels.set(loaded.config.daemon.log_level);
                *self.shared_config.write().unwrap_or_else(|p| p.into_inner()) = loaded.config.clone();
                let files = file_list(&loaded.files);
                info!(files = ?files, "configuration reloaded");
                self.loaded = loaded;
                self.update_status(|s| {
                    s.config_files = files;
                    s.last_reload = format!("ok at {}", now_rfc3339());
                });
                Ok(())
            }
            Err(e) => {
                error!("reload refused, keeping the configuration in force: {e}");
                let msg = e.to_string();
                self.update_status(|s| s.last_reload = format!("failed at {}: {msg}", now_rfc3339()));
                Err(msg)
            }
        };
        self.transition_to(DaemonState::Running, "");
        self.notifier.ready(&self.summary());
        result
    }

    fn summary(&self) -> String {
        format!("running: {} config file(s)", self.loaded.files.len())
    }
}

/// `[jobs]`'s share of the CPU for everything the daemon runs: its unit's `CPUWeight=`/`IOWeight=`
/// (cgroup v2 with systemd's cpu controller: the real box) and its session's autogroup nice
/// (where the kernel shares the CPU between sessions instead). Neither is fatal: a daemon that
/// cannot lower itself still does its work, and says so.
async fn apply_job_priority(systemd: Option<crate::systemd::manager::Systemd>, jobs: config::JobsConfig) {
    match crate::priority::set_autogroup_nice(jobs.nice).await {
        Ok(true) => info!(nice = jobs.nice, "the daemon's session (autogroup) runs at nice {}", jobs.nice),
        Ok(false) => {}
        Err(e) => warn!("cannot set the daemon's autogroup nice to {}: {e}", jobs.nice),
    }
    let Some(systemd) = systemd else { return };
    let unit = match systemd.unit_of(std::process::id()).await {
        Ok(unit) if unit.ends_with(".service") => unit,
        Ok(other) => {
            info!(unit = %other, "not run as a service: CPUWeight/IOWeight left alone");
            return;
        }
        Err(e) => {
            warn!("cannot find the daemon's own unit, CPUWeight/IOWeight left alone: {e}");
            return;
        }
    };
    match systemd.set_weights(&unit, jobs.cpu_weight, jobs.io_weight).await {
        Ok(()) => info!(
            unit = %unit, cpu_weight = jobs.cpu_weight, io_weight = jobs.io_weight,
            "{unit} runs at CPUWeight={} IOWeight={} (the API and PostgreSQL: 100)", jobs.cpu_weight, jobs.io_weight
        ),
        Err(e) => warn!("cannot set {unit}'s CPUWeight/IOWeight: {e}"),
    }
}

/// Once start-up has settled (configuration, D-Bus, clients, the first probes), the code pages
/// it alone touched go back to the kernel (see [`crate::pageout`]).
async fn release_startup_pages(cancel: CancellationToken) {
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = tokio::time::sleep(Duration::from_secs(30)) => {}
    }
    match crate::pageout::release_code_pages() {
        Ok(bytes) => debug!(bytes, "start-up code pages given back to the kernel"),
        Err(e) => debug!("cannot give start-up code pages back: {e}"),
    }
}

/// Work that starts after READY and must not hold up the control plane, in order: the alerts
/// (shared with jobs), the repair of an update interrupted by a crash, then supervision.
async fn start_background(
    cfg: Arc<crate::config::Config>,
    systemd: Option<crate::systemd::manager::Systemd>,
    services: watch::Sender<Vec<ServiceStatus>>,
    jobs: Arc<Jobs>,
    status: Arc<Mutex<DaemonStatus>>,
    cancel: CancellationToken,
) {
    let alerts = jobs.alerts().unwrap_or_else(|| pending_alerts(&cfg));
    alerts.set_mailer(build_mailer(&cfg).await);
    let gate = crate::backup::lease::Gate::default();
    if cfg.backup.bucket.is_some() {
        tokio::spawn(serve_wal(
            cfg.clone(),
            alerts.clone(),
            systemd.clone(),
            status.clone(),
            gate.clone(),
            cancel.clone(),
        ));
    }
    if cfg.backup.bucket.is_some() && cfg.backup.wal_archive {
        tokio::spawn(record_restore_points(cfg.clone(), gate.clone(), cancel.clone()));
    }
    if cfg.backup.bucket.is_some() {
        tokio::spawn(hold_lease(cfg.clone(), alerts.clone(), gate, cancel.clone()));
    }
    tokio::spawn(report_boot_recovery(cfg.clone(), alerts.clone(), services.subscribe(), jobs.clone()));
    if cfg.metrics.enabled {
        tokio::spawn(serve_metrics(cfg.clone(), services.subscribe(), status.clone(), cancel.clone()));
    } else {
        info!("CloudWatch metrics are off (metrics.enabled = false): nothing outside the box notices if it dies");
    }
    tokio::spawn(release_startup_pages(cancel.clone()));
    reconcile_releases(&cfg, systemd.as_ref(), &alerts).await;
    if cfg.backup.bucket.is_some() {
        // Leftovers of a killed restore or drill; postgres may come up only once supervision starts it.
        let cfg = cfg.clone();
        tokio::spawn(async move {
            for _ in 0..60 {
                let target = crate::pg::PgTarget::new(&cfg.services.postgres);
                if target.connect("postgres", Duration::from_secs(5)).await.is_ok() {
                    for line in crate::backup::restore::cleanup_leftovers(&cfg).await {
                        warn!("{line}");
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
    }
    match systemd {
        Some(systemd) if cfg.supervise.enabled => {
            crate::supervise::supervisor::supervise(cfg, systemd, alerts, services, cancel).await
        }
        None if cfg.supervise.enabled => error!("supervision disabled: cannot talk to systemd"),
        _ => info!("supervision is off (supervise.enabled = false)"),
    }
}

/// The WAL socket (PostgreSQL's archive_command) and its monitor, until `cancel`. Without the
/// keys or S3 it says why and retries: PostgreSQL keeps the WAL meanwhile.
async fn serve_wal(
    cfg: Arc<crate::config::Config>,
    alerts: crate::notify::Alerts,
    systemd: Option<crate::systemd::manager::Systemd>,
    status: Arc<Mutex<DaemonStatus>>,
    gate: crate::backup::lease::Gate,
    cancel: CancellationToken,
) {
    use crate::backup::wal::{archive::Archive, archive::WalError, monitor, server};
    if !cfg.backup.wal_archive {
        // Turned off: take back an archive_command caretaker set, or WAL would pile up for a
        // socket nobody serves.
        ensure_archiving(&cfg, systemd.as_ref(), None, &cancel).await;
        return;
    }
    let archive = loop {
        let made = match crate::backup::run::s3_for(&cfg).await {
            Ok(s3) => Archive::for_config(&cfg, s3).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match made {
            Ok(a) => break a,
            Err(e) => {
                error!("WAL archiving cannot start: {e}; PostgreSQL keeps its WAL until it can (retrying in 60 s)");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
        }
    };
    let mut allowed = vec![0];
    if let Ok(Some(u)) = nix::unistd::User::from_name(&cfg.services.postgres.user) {
        allowed.push(u.uid.as_raw());
    }
    let hook_alerts = alerts.clone();
    let server = Arc::new(
        server::WalServer::new(archive, &cfg.services.postgres.data_dir, allowed)
            .with_lease_gate(gate.clone())
            .with_failure_hook(move |e| {
                warn!("WAL archiving: {e}");
                if matches!(e, WalError::Conflict { .. }) {
                    hook_alerts
                        .open(crate::backup::alerts::WAL_CONFLICT, crate::backup::alerts::wal_conflict(&e.to_string()));
                }
            }),
    );
    let socket = cfg.backup.wal_socket.clone();
    let serving = tokio::spawn(server::serve(server.clone(), socket.clone(), cancel.clone()));
    let command = crate::supervise::provision::wal_push_command(&socket);
    {
        let (cfg, systemd, cancel) = (cfg.clone(), systemd.clone(), cancel.clone());
        tokio::spawn(async move { ensure_archiving(&cfg, systemd.as_ref(), Some(&command), &cancel).await });
    }
    if cfg.backup.wal_tip {
        let tip = Arc::new(crate::backup::wal::tip::Tip::default());
        let settings = crate::backup::wal::tip::TipSettings { interval: cfg.backup.wal_tip_interval.get() };
        let target = crate::pg::PgTarget::new(&cfg.services.postgres);
        tokio::spawn(crate::backup::wal::tip::run(
            server.shared_archive(),
            target,
            settings,
            gate.clone(),
            tip.clone(),
            cancel.clone(),
        ));
        tokio::spawn(watch_tip(cfg.clone(), tip, alerts.clone(), status.clone(), cancel.clone()));
    } else {
        info!("the WAL tip is off (backup.wal-tip = false): a lost box loses up to archive-timeout of commits");
    }
    let publish = move |w: monitor::WalStatus| status.lock().unwrap_or_else(|p| p.into_inner()).wal = Some(w);
    monitor::run((*cfg).clone(), server, alerts, publish, cancel).await;
    if let Ok(Err(e)) = serving.await {
        error!("the WAL socket stopped: {e}");
    }
}

/// A restore point with its row counts every `backup.restore-point-interval` (the first one an
/// interval after start), while this box holds the prefix; a failure (PostgreSQL down, a long
/// transaction in the way of the table locks) is logged and tried again in five minutes.
async fn record_restore_points(
    cfg: Arc<crate::config::Config>,
    gate: crate::backup::lease::Gate,
    cancel: CancellationToken,
) {
    let every = cfg.backup.restore_point_interval.get();
    let mut wait = every;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if let Some(why) = gate.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            debug!("no restore point: {why}");
            wait = every;
            continue;
        }
        let target = crate::pg::PgTarget::new(&cfg.services.postgres);
        let made = match crate::backup::run::s3_for(&cfg).await {
            Ok(s3) => crate::backup::restore_point::record(&cfg, &s3, &target, false).await,
            Err(e) => Err(e.to_string()),
        };
        wait = match made {
            Ok(rp) => {
                info!(name = %rp.name, lsn = %rp.lsn, tables = rp.counts.len(), "restore point recorded with its row counts");
                every
            }
            Err(e) => {
                warn!("{e}; trying again in 5 minutes");
                Duration::from_secs(300).min(every)
            }
        };
    }
}

/// The tip's status into the daemon's, every second; one alert while the live RPO stays above
/// `backup.wal-tip-lag-alert` (or the tip cannot stream that long while PostgreSQL runs).
async fn watch_tip(
    cfg: Arc<crate::config::Config>,
    tip: Arc<crate::backup::wal::tip::Tip>,
    alerts: crate::notify::Alerts,
    status: Arc<Mutex<DaemonStatus>>,
    cancel: CancellationToken,
) {
    use crate::backup::alerts;
    let limit = cfg.backup.wal_tip_lag_alert.get();
    let mut open = false;
    loop {
        let t = tip.status();
        let failing = t.failing_for.filter(|f| *f > limit).and(t.last_error.clone());
        let lagging = t.streaming && t.lag_seconds > limit.as_secs_f64();
        if failing.is_some() || lagging {
            let seconds = t.failing_for.map(|f| f.as_secs_f64()).unwrap_or(t.lag_seconds);
            let archive_timeout = cfg.backup.archive_timeout.get().as_secs();
            open = alerts
                .open(alerts::WAL_TIP, alerts::wal_tip(seconds, t.lag_bytes, failing.as_deref(), archive_timeout))
                || open;
        } else if open && t.streaming && t.lag_seconds < limit.as_secs_f64() / 2.0 {
            alerts.resolve(alerts::WAL_TIP, "commits reach S3 within seconds again");
            open = false;
        }
        status.lock().unwrap_or_else(|p| p.into_inner()).wal_tip = Some(t);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// After a restore at boot (firstboot.json says so), one email once the API is healthy (or ten
/// minutes passed): what was restored, from which backups, how old the last commit is, the keys
/// Redis holds against the backup's, and the API's health. Sent once per boot.
async fn report_boot_recovery(
    cfg: Arc<crate::config::Config>,
    alerts: crate::notify::Alerts,
    mut services: watch::Receiver<Vec<ServiceStatus>>,
    jobs: Arc<Jobs>,
) {
    let run = std::path::Path::new(crate::envfile::RUN_DIR);
    let sent = run.join("recovery-reported");
    let Ok(bytes) = std::fs::read(run.join("firstboot.json")) else { return };
    let Ok(report) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return };
    let restored = &report["recovery"]["outcome"]["Restored"];
    if !restored.is_object() || sent.exists() {
        return;
    }
    let summary = restored["summary"].as_str().unwrap_or("").to_string();
    let details = &restored["details"];
    // The API's health, as supervision sees it (none: supervision is off).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let api = loop {
        let state = services.borrow().iter().find(|s| s.name == "api").map(|s| s.state);
        match state {
            Some(crate::supervise::supervisor::SvcState::Healthy) => break "the API is healthy".to_string(),
            None if !cfg.supervise.enabled => break "the API's health was not checked (supervision is off)".into(),
            _ if tokio::time::Instant::now() >= deadline => {
                break format!("the API is NOT healthy ten minutes after the daemon started ({state:?}): check it");
            }
            _ => {}
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), services.changed()).await;
    };
    // A base backup with WAL ends at its last replayed commit; a logical dump at its snapshot.
    let dump_taken = details["postgres_dump"]["taken_at"].as_str().map(str::to_string);
    let last_commit = details["postgres"]["last_commit"].as_str().map(str::to_string).or(dump_taken.clone());
    let age = last_commit
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .map(|d| {
            format!(
                " ({} before this report: commits after it were lost with the old box)",
                humantime::format_duration(Duration::from_secs(d.as_secs()))
            )
        })
        .unwrap_or_default();
    let redis = match details["redis"]["keys"].as_i64() {
        Some(expected) => {
            let now = async {
                let client = redis::Client::open(cfg.services.redis.url.as_str()).ok()?;
                let mut c = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("DBSIZE").query_async::<i64>(&mut c).await.ok()
            };
            match tokio::time::timeout(Duration::from_secs(10), now).await.ok().flatten() {
                Some(n) if n == expected => format!("Redis holds {n} keys, as its backup did."),
                Some(n) => format!("Redis holds {n} keys; its backup had {expected}."),
                None => format!("Redis did not answer; its backup had {expected} keys."),
            }
        }
        None => "Redis was not restored (no Redis backup).".into(),
    };
    let id = crate::backup::run::instance_id();
    let body = format!(
        "Box {id} came up on a blank data volume and restored itself from backup before anything started.\n\n\
         {summary}.\n\n{}: {}{age}.\n{redis}\n{api}.\n\nfirstboot's report: /run/caretaker/firstboot.json; \
         journalctl -u caretaker-firstboot shows each step. A fresh backup is due: `caretaker backup now`.",
        if dump_taken.is_some() {
            "No base backup existed: the data is the logical backup's snapshot, taken at"
        } else {
            "The last restored commit"
        },
        last_commit.as_deref().unwrap_or("none replayed")
    );
    alerts.report(&format!("box {id} restored itself from backup; {api}"), &body);
    let _ = std::fs::write(&sent, b"");
    // The new timeline's first base backup, so that the next restore replays from here.
    if cfg.backup.wal_archive {
        for _ in 0..30 {
            let body = crate::control::bodies::backup_job(
                (*cfg).clone(),
                vec![crate::backup::run::Kind::Base],
                Some(alerts.clone()),
            );
            match jobs.start("backup", "base backup after the restore at boot", body) {
                Ok(job) => {
                    info!("a fresh base backup after the restore at boot: job {}", job.id);
                    return;
                }
                Err(busy) => {
                    info!("the base backup after the restore at boot waits: {busy}");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            }
        }
    }
}

/// Renews the backup prefix's lease every third of its time to live, until `cancel`. Held by
/// another instance: one alert naming it (two boxes write into one prefix), resolved once the
/// lease is this box's again.
async fn hold_lease(
    cfg: Arc<crate::config::Config>,
    alerts: crate::notify::Alerts,
    gate: crate::backup::lease::Gate,
    cancel: CancellationToken,
) {
    use crate::backup::lease::{self, Held, LeaseError};
    let ttl = cfg.recovery.lease_ttl.get();
    let holder = crate::backup::run::instance_id();
    let bucket = cfg.backup.bucket.clone().unwrap_or_default();
    let mut busy = false;
    // The client and keys are made once (a client per renewal would fetch credentials each time).
    let mut made: Option<(crate::aws::s3::S3, crate::backup::seal::SealKeys)> = None;
    loop {
        if made.is_none() {
            match (crate::backup::run::s3_for(&cfg).await, crate::backup::seal::SealKeys::for_config(&cfg)) {
                (Ok(s3), Ok(keys)) => made = Some((s3, keys)),
                (Err(e), _) => warn!("the backup prefix's lease cannot be renewed: {e}"),
                (_, Err(e)) => warn!("the backup prefix's lease cannot be renewed: {e}"),
            }
        }
        match &made {
            None => {}
            Some((s3, keys)) => match lease::acquire(s3, &bucket, &cfg.backup.prefix, keys, &holder, ttl).await {
                Ok(held) => {
                    match held {
                        Held::Taken => info!("took the backup prefix's lease as {holder}"),
                        Held::TakenOver(old) => warn!(
                            "took over the backup prefix's lease from instance {} (not renewed since {}: gone)",
                            old.holder, old.renewed_at
                        ),
                        Held::Renewed => {}
                    }
                    if busy {
                        *gate.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        alerts.resolve("lease", "This box holds the backup prefix's lease again: archiving goes on.");
                        busy = false;
                    }
                }
                Err(e @ (LeaseError::Busy(..) | LeaseError::Foreign(..))) => {
                    error!("{e}; WAL archiving stops until this box holds the prefix again");
                    *gate.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    busy = true;
                    alerts.open(
                        "lease",
                        crate::notify::Alert {
                            subject: "another box writes into this box's backup prefix".into(),
                            what_failed: e.to_string(),
                            what_done: "This box keeps running but stops archiving WAL into the prefix (PostgreSQL \
                                        keeps it; nothing is lost on this box): one writer per prefix."
                                .into(),
                            what_safe: "Existing backups are untouched.".into(),
                            next: "find the other instance (aws ec2 describe-instances), stop the one that should not \
                                   run, then `caretaker status` on the one that stays"
                                .into(),
                        },
                    );
                }
                Err(e) => warn!("the backup prefix's lease cannot be renewed: {e}"),
            },
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
    }
}

/// The CloudWatch metrics until `cancel`: a sample of the services, the backups (listed at start,
/// after every recorded backup/drill/prune, and hourly), the data volume and WAL archiving.
async fn serve_metrics(
    cfg: Arc<crate::config::Config>,
    services: watch::Receiver<Vec<ServiceStatus>>,
    status: Arc<Mutex<DaemonStatus>>,
    cancel: CancellationToken,
) {
    use crate::metrics::{BackupAges, Sample, WalNumbers};
    let region = loop {
        match crate::aws::region::resolve(&cfg.aws).await {
            Ok(r) => break r.name,
            Err(e) => {
                error!("CloudWatch metrics cannot start: {e} (retrying in 60 s)");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
        }
    };
    let sdk = crate::aws::sdk::sdk_config(&cfg.aws, &region).await;
    let cloudwatch = crate::aws::cloudwatch::CloudWatch::new(crate::aws::sdk::cloudwatch_client(&sdk, &cfg.aws));
    let backups: Arc<Mutex<Vec<BackupAges>>> = Arc::default();
    if cfg.backup.bucket.is_some() {
        let (cfg, backups, cancel) = (cfg.clone(), backups.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut records = crate::control::runs::watch_records();
            loop {
                match crate::backup::run::s3_for(&cfg).await {
                    Ok(s3) => match crate::backup::run::newest(&cfg, &s3).await {
                        Ok(list) => {
                            *backups.lock().unwrap_or_else(|p| p.into_inner()) = list
                                .into_iter()
                                .map(|n| BackupAges {
                                    kind: n.kind.as_str(),
                                    newest: n.newest,
                                    newest_verified: n.newest_verified,
                                    oldest: n.oldest,
                                })
                                .collect()
                        }
                        // The ages known so far stay (and grow): a listing that fails never
                        // makes a backup look newer.
                        Err(e) => warn!("metrics: cannot list the backups: {e}"),
                    },
                    Err(e) => warn!("metrics: {e}"),
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = records.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                }
            }
        });
    }
    let mount_point = cfg.volume.mount_point.clone();
    let archive_timeout = cfg.backup.archive_timeout.get().as_secs();
    let sample_status = status.clone();
    let sample = move || {
        let s = sample_status.lock().unwrap_or_else(|p| p.into_inner());
        let svcs = services.borrow();
        Sample {
            at: std::time::SystemTime::now(),
            services: svcs
                .iter()
                .map(|v| (v.name.clone(), v.state == crate::supervise::supervisor::SvcState::Healthy))
                .collect(),
            restarts: svcs.iter().map(|v| u64::from(v.restarts)).sum(),
            backups: backups.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            volume: crate::backup::room::measure(&mount_point).ok().map(|r| (r.free, r.total)),
            wal: s.wal.as_ref().map(|w| {
                let lag = w.lag_seconds.unwrap_or(0);
                // The tip streaming: S3 holds everything but its lag, whatever archiving's backlog
                // (chunks stay until their segment is archived).
                let tip = s.wal_tip.as_ref().filter(|t| t.streaming);
                WalNumbers {
                    lag_seconds: lag,
                    lag_bytes: w.ready as u64 * crate::backup::wal::name::DEFAULT_SEGMENT_SIZE,
                    rpo_seconds: tip.map(|t| t.lag_seconds.ceil() as u64).unwrap_or(lag + archive_timeout),
                    tip_lag_bytes: tip.map(|t| t.lag_bytes),
                }
            }),
        }
    };
    let publish = move |m| status.lock().unwrap_or_else(|p| p.into_inner()).metrics = Some(m);
    let instance = crate::backup::run::instance_id();
    crate::metrics::run(cfg.metrics.clone(), cfg.deployment(), instance, cloudwatch, sample, publish, cancel).await;
}

/// PostgreSQL's archiving settings as configured (ALTER SYSTEM), once PostgreSQL answers; a
/// restart of its unit when archive_mode changed (once: at the first start with PITR on).
async fn ensure_archiving(
    cfg: &crate::config::Config,
    systemd: Option<&crate::systemd::manager::Systemd>,
    command: Option<&str>,
    cancel: &CancellationToken,
) {
    let target = crate::pg::PgTarget::new(&cfg.services.postgres);
    let timeout = cfg.backup.archive_timeout.get().as_secs();
    loop {
        match crate::supervise::provision::archiving(&target, command, timeout).await {
            Ok(a) if a.restart_needed => {
                let unit = cfg.services.postgres.unit.to_string();
                let Some(systemd) = systemd else {
                    error!(
                        "WAL archiving: archive_mode changed, but {unit} cannot be restarted (no systemd): restart it"
                    );
                    return;
                };
                let hold = crate::maintenance::hold(&unit, "restarting once for archive_mode (WAL archiving)").await;
                // Another job may have held the unit meanwhile (a restore swaps the data directory,
                // whose settings are its own): ask again under the hold.
                match crate::supervise::provision::archiving(&target, command, timeout).await {
                    Ok(a) if a.restart_needed => {}
                    Ok(_) => return,
                    Err(e) => {
                        info!("WAL archiving settings not applied yet: {e}; retrying in 10 s");
                        drop(hold);
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                        }
                        continue;
                    }
                }
                warn!(
                    "restarting {unit} once: archive_mode changed (WAL archiving {})",
                    if command.is_some() { "on" } else { "off" }
                );
                match systemd.restart(&unit, cfg.supervise.start_timeout.get()).await {
                    Ok(out) if out.state.is_active() => {
                        info!("{unit} restarted: WAL archiving is {}", if command.is_some() { "on" } else { "off" })
                    }
                    Ok(out) => {
                        error!("{unit} did not come back after the archive_mode restart: {}", out.state.active_state)
                    }
                    Err(e) => error!("restarting {unit} for archive_mode: {e}"),
                }
                return;
            }
            Ok(_) => return,
            Err(e) => {
                info!("WAL archiving settings not applied yet: {e}; retrying in 10 s");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                }
            }
        }
    }
}

/// After a daemon killed mid-update: `current` back at a complete, verified release, and the API
/// restarted when it may be running something else.
async fn reconcile_releases(
    cfg: &crate::config::Config,
    systemd: Option<&crate::systemd::manager::Systemd>,
    alerts: &crate::notify::Alerts,
) {
    let dir = &cfg.services.api.install_dir;
    let r = match tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || crate::release::reconcile(&dir)
    })
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            error!("cannot check the releases in {}: {e}", dir.display());
            return;
        }
        Err(e) => {
            error!("checking the releases in {} panicked: {e}", dir.display());
            return;
        }
    };
    for repair in &r.repairs {
        warn!("releases in {}: {repair}", dir.display());
    }
    if r.restart_api {
        let unit = cfg.services.api.unit.to_string();
        let Some(systemd) = systemd else {
            error!("{unit} should be restarted to run {:?}, but systemd is unreachable", r.current);
            return;
        };
        let _hold = crate::maintenance::hold(&unit, "restarting after an interrupted update's repair").await;
        info!("restarting {unit} so that it runs {} (an update was interrupted)", r.current.as_deref().unwrap_or("?"));
        let problem = match systemd.restart(&unit, cfg.supervise.start_timeout.get()).await {
            Ok(out) if out.state.is_active() => {
                info!("{unit} restarted after the repair");
                alerts.resolve("api:reconcile", &format!("{unit} runs again after the repair."));
                return;
            }
            Ok(out) => format!("{unit} is {} after its restart ({})", out.state.active_state, out.state.result),
            Err(e) => e.to_string(),
        };
        error!("{problem}");
        alerts.open(
            "api:reconcile",
            crate::notify::Alert {
                subject: format!("{unit} did not come back after an interrupted update was repaired"),
                what_failed: format!("An update was interrupted; the release link was repaired, but {problem}."),
                what_done: format!(
                    "current points at {}, a complete, verified release.",
                    r.current.as_deref().unwrap_or("?")
                ),
                what_safe: "The data is untouched; the previous releases are on disk.".into(),
                next: format!("systemctl status {unit}; journalctl -u {unit} -n 100; then `caretaker status`"),
            },
        );
    }
}

/// Multipart uploads under our prefix left by a daemon that died mid-backup (SIGKILL, power loss)
/// are aborted at start. A job may already be running by then (the bus accepts jobs at once):
/// uploads this daemon created itself are never touched.
async fn abort_stale_uploads(cfg: &crate::config::Config) {
    let Some(bucket) = cfg.backup.bucket.clone() else { return };
    let s3 = match crate::backup::run::s3_for(cfg).await {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot check for stale uploads: {e}");
            return;
        }
    };
    let prefix = format!("{}/", cfg.backup.prefix);
    match crate::backup::stream::abort_stale_uploads(&s3, &bucket, &prefix).await {
        Ok(done) => {
            for (key, result) in done {
                match result {
                    Ok(()) => {
                        info!("aborted a stale multipart upload of s3://{bucket}/{key} (left by an interrupted backup)")
                    }
                    Err(e) => warn!("{e}"),
                }
            }
        }
        Err(e) => warn!("cannot list stale uploads: {e}"),
    }
}

/// Alerts with an SES mailer when `notify.sender` is set. The region comes from the config, the
/// instance.env firstboot wrote, or IMDS.
pub async fn build_alerts(cfg: &crate::config::Config) -> crate::notify::Alerts {
    crate::notify::Alerts::new(
        build_mailer(cfg).await,
        &cfg.notify.subject_prefix,
        &alert_origin(),
        cfg.notify.max_per_hour,
    )
}

/// Alerts whose mailer comes later ([`build_mailer`]): the daemon has them before its first job.
pub fn pending_alerts(cfg: &crate::config::Config) -> crate::notify::Alerts {
    crate::notify::Alerts::pending(&cfg.notify.subject_prefix, &alert_origin(), cfg.notify.max_per_hour)
}

/// How emails name this box: the instance id and host name.
fn alert_origin() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    match crate::envfile::instance_var("INSTANCE_ID") {
        Some(id) => format!("{id} ({host})"),
        None => host,
    }
}

/// The SES mailer of `[notify]`, or `None` (no sender, or no region: alerts are logged only).
pub async fn build_mailer(cfg: &crate::config::Config) -> Option<crate::notify::Mailer> {
    let from = cfg.notify.sender.as_ref()?;
    let region = match crate::aws::region::resolve(&cfg.aws).await {
        Ok(r) => r.name,
        Err(e) => {
            error!("alert emails disabled: {e}");
            return None;
        }
    };
    let sdk = crate::aws::sdk::sdk_config(&cfg.aws, &region).await;
    Some(crate::notify::Mailer {
        ses: crate::aws::ses::SesClient::new(crate::aws::sdk::ses_client(&sdk, &cfg.aws)),
        from: from.clone(),
        to: cfg.notify.recipients.clone(),
    })
}

fn file_list(files: &[PathBuf]) -> Vec<String> {
    files.iter().map(|p| p.display().to_string()).collect()
}

/// Runs the daemon until SIGTERM/SIGINT. `levels` comes from the logging set-up done by main.
pub async fn run(sources: Sources, levels: LevelHandle) -> Result<(), DaemonError> {
    let notifier = Notifier::from_env();
    notifier.status("starting: loading configuration");
    let loaded = match config::load(&sources) {
        Ok(l) => l,
        Err(e) => {
            notifier.status(&format!("failed: invalid configuration: {e}"));
            return Err(e.into());
        }
    };
    levels.set(loaded.config.daemon.log_level);
    // Builds older than this start are an interrupted restore's leftovers.
    let _ = crate::backup::pitr::process_started();
    info!(version = crate::VERSION, files = ?file_list(&loaded.files), "caretaker daemon starting");

    let status = Arc::new(Mutex::new(DaemonStatus {
        state: DaemonState::Starting.as_str().into(),
        version: crate::VERSION.into(),
        started_at: now_rfc3339(),
        config_files: file_list(&loaded.files),
        last_reload: String::new(),
        services: vec![],
        incidents: vec![],
        current_job: None,
        recent_jobs: vec![],
        schedule: None,
        wal: None,
        wal_tip: None,
        metrics: None,
    }));
    let (req_tx, mut req_rx) = mpsc::channel::<Request>(8);

    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;

    let address = loaded.config.daemon.bus_address.clone();
    let bus_err = |source| DaemonError::Bus { address: address.clone(), source };
    let cancel = CancellationToken::new();
    let jobs = Jobs::new(cancel.child_token());
    // Alerts exist before the first job or probe can fail; their mailer follows in the background.
    jobs.set_alerts(pending_alerts(&loaded.config));
    let job_events = jobs.events();
    let (services_tx, services_rx) = watch::channel(Vec::<ServiceStatus>::new());
    let shared_config = Arc::new(std::sync::RwLock::new(loaded.config.clone()));
    let connection = control::connect(address.as_deref())
        .await
        .and_then(|b| {
            b.name(BUS_NAME)?.serve_at(
                OBJECT_PATH,
                Control::new(status.clone(), services_rx.clone(), req_tx, jobs.clone(), shared_config.clone()),
            )
        })
        .map_err(bus_err)?
        .build()
        .await
        .map_err(bus_err)?;

    let mut daemon = Daemon { state: DaemonState::Starting, sources, loaded, status, notifier, levels, shared_config };
    let iface = connection
        .object_server()
        .interface::<_, Control>(OBJECT_PATH)
        .await
        .map_err(|source| DaemonError::Bus { address: address.clone(), source })?;

    daemon.transition_to(DaemonState::Running, &format!("owns {BUS_NAME}"));
    daemon.notifier.ready(&daemon.summary());
    let _ = iface.get().await.state_changed(iface.signal_emitter()).await;

    let forwarder = tokio::spawn(crate::control::dbus::forward_job_events(iface.signal_emitter().clone(), job_events));
    let systemd = match crate::systemd::manager::Systemd::new(&connection).await {
        Ok(s) => {
            jobs.set_systemd(s.clone());
            Some(s)
        }
        Err(e) => {
            error!("cannot talk to systemd: {e}");
            None
        }
    };
    apply_job_priority(systemd.clone(), daemon.loaded.config.jobs.clone()).await;
    // Background work (supervision, jobs) runs in these tasks and is cancelled on shutdown.
    let mut tasks: JoinSet<()> = JoinSet::new();
    if daemon.loaded.config.backup.bucket.is_some() {
        let cfg = daemon.loaded.config.clone();
        tasks.spawn(async move { abort_stale_uploads(&cfg).await });
    }
    {
        let (config, jobs, status, cancel) =
            (daemon.shared_config.clone(), jobs.clone(), daemon.status.clone(), cancel.clone());
        tasks.spawn(async move { crate::control::scheduler::run(config, jobs, status, cancel).await });
    }
    {
        let cfg = Arc::new(daemon.loaded.config.clone());
        let (jobs, cancel, background_systemd) = (jobs.clone(), cancel.clone(), systemd.clone());
        let status = daemon.status.clone();
        tasks.spawn(async move { start_background(cfg, background_systemd, services_tx, jobs, status, cancel).await });
    }
    let mut status_tick = tokio::time::interval(Duration::from_secs(2));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_summary = String::new();

    let mut watchdog = daemon.notifier.watchdog_interval().map(|period| {
        info!(period_ms = period.as_millis() as u64, "watchdog enabled");
        let mut t = tokio::time::interval(period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });

    loop {
        tokio::select! {
            _ = async { watchdog.as_mut().unwrap().tick().await }, if watchdog.is_some() => {
                daemon.notifier.watchdog();
            }
            _ = sigterm.recv() => { info!("SIGTERM received"); break; }
            _ = sigint.recv() => { info!("SIGINT received"); break; }
            _ = sighup.recv() => {
                info!("SIGHUP received: reloading configuration");
                if daemon.reload().is_ok() {
                    tokio::spawn(apply_job_priority(systemd.clone(), daemon.loaded.config.jobs.clone()));
                }
                let _ = iface.get().await.state_changed(iface.signal_emitter()).await;
            }
            Some(req) = req_rx.recv() => match req {
                Request::Reload(reply) => {
                    info!("reload requested over D-Bus");
                    let result = daemon.reload();
                    if result.is_ok() {
                        tokio::spawn(apply_job_priority(systemd.clone(), daemon.loaded.config.jobs.clone()));
                    }
                    let _ = reply.send(result);
                    let _ = iface.get().await.state_changed(iface.signal_emitter()).await;
                }
            },
            _ = status_tick.tick() => {
                let summary = crate::supervise::supervisor::summary(&services_rx.borrow());
                if summary != last_summary && daemon.state == DaemonState::Running {
                    daemon.notifier.status(&format!("running: {summary}"));
                    last_summary = summary;
                }
            }
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = res { error!("background task failed: {e}"); }
            }
        }
    }

    daemon.transition_to(DaemonState::Stopping, "cancelling in-flight work");
    cancel.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        jobs.shutdown(SHUTDOWN_GRACE).await;
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res {
                warn!("task ended badly during shutdown: {e}");
            }
        }
    })
    .await;
    if drained.is_err() {
        warn!("in-flight work did not stop within {SHUTDOWN_GRACE:?}; aborting it");
        tasks.abort_all();
    }
    // The last job signals (a cancelled job's JobFinished) go out before the bus connection closes.
    jobs.close_events();
    let _ = tokio::time::timeout(Duration::from_secs(1), forwarder).await;
    drop(connection);
    info!("caretaker daemon stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::DaemonState::*;

    #[test]
    fn transitions() {
        let allowed = [
            (Starting, Running),
            (Running, Reloading),
            (Reloading, Running),
            (Starting, Stopping),
            (Running, Stopping),
        ];
        let refused = [(Running, Starting), (Starting, Reloading), (Stopping, Running)];
        for (from, to) in allowed {
            assert!(from.can_become(to), "{from:?} → {to:?}");
        }
        for (from, to) in refused {
            assert!(!from.can_become(to), "{from:?} → {to:?}");
        }
    }
}
