//! Watching archiving from the daemon: the backlog (`archive_status/*.ready`), PostgreSQL's own
//! archiver counters, pg_wal against the volume's free space, and — every
//! `backup.wal-check-interval` — the chain from the newest base backup (the PITR window, gaps).
//! One email per problem while it lasts (the alerts' incident keys).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::archive::Archive;
use super::server::WalServer;
use crate::backup::alerts;
use crate::config::Config;
use crate::notify::Alerts;
use crate::pg::PgTarget;

/// What `caretaker status` shows of point-in-time recovery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalStatus {
    pub socket: String,
    /// Pushes this daemon stored, found already stored, and failed.
    pub archived: u64,
    pub already_archived: u64,
    pub failed: u64,
    pub last_archived: Option<String>,
    pub last_archived_at: Option<String>,
    pub last_failure: Option<String>,
    /// Segments waiting to be archived.
    pub ready: usize,
    /// Seconds since PostgreSQL's last successful archive, while segments wait.
    pub lag_seconds: Option<u64>,
    pub pg_wal_bytes: u64,
    pub free_bytes: u64,
    /// The restorable window (oldest … newest), from the last chain check.
    pub window_oldest: Option<String>,
    pub window_newest: Option<String>,
    pub window_gap: Option<String>,
    pub window_checked_at: Option<String>,
    pub window_error: Option<String>,
}

/// `(.ready files, bytes in pg_wal)`.
pub fn backlog(data_dir: &Path) -> (usize, u64) {
    let ready = std::fs::read_dir(data_dir.join("pg_wal/archive_status"))
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".ready")).count())
        .unwrap_or(0);
    let bytes = std::fs::read_dir(data_dir.join("pg_wal"))
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0);
    (ready, bytes)
}

/// Runs until `cancel`, refreshing `status` every 30 s.
pub async fn run(
    cfg: Config,
    server: Arc<WalServer>,
    alerts: Alerts,
    publish: impl Fn(WalStatus) + Send,
    cancel: CancellationToken,
) {
    let data_dir = cfg.services.postgres.data_dir.clone();
    let target = PgTarget::new(&cfg.services.postgres);
    let mut last_check: Option<Instant> = None;
    let mut window = (None, None, None, None, None);
    loop {
        let (ready, pg_wal_bytes) = backlog(&data_dir);
        let free_bytes = crate::backup::room::measure(&data_dir).map(|r| r.free).unwrap_or(0);
        let lag_seconds = if ready > 0 { archiver_age(&target).await } else { None };
        let stats = server.stats();
        let b = &cfg.backup;
        let behind = ready >= b.wal_backlog_alert || lag_seconds.is_some_and(|s| s > b.wal_lag_alert.get().as_secs());
        if behind {
            alerts.open(
                alerts::WAL_BACKLOG,
                alerts::wal_backlog(ready, lag_seconds, stats.last_failure.as_deref().unwrap_or("")),
            );
        } else if ready <= b.wal_backlog_alert / 2 {
            alerts.resolve(alerts::WAL_BACKLOG, "WAL archiving caught up");
        }
        if free_bytes > 0 && pg_wal_bytes > free_bytes / 2 && ready > 0 {
            alerts.open(alerts::WAL_DISK, alerts::wal_disk(pg_wal_bytes, free_bytes));
        } else if ready == 0 {
            alerts.resolve(alerts::WAL_DISK, "pg_wal is back to normal");
        }
        if last_check.is_none_or(|t| t.elapsed() >= b.wal_check_interval.get()) {
            last_check = Some(Instant::now());
            window = check_chain(&cfg, server.archive(), &alerts).await;
        }
        publish(WalStatus {
            socket: b.wal_socket.display().to_string(),
            archived: stats.archived,
            already_archived: stats.already_archived,
            failed: stats.failed,
            last_archived: stats.last_archived,
            last_archived_at: stats.last_archived_at,
            last_failure: stats.last_failure,
            ready,
            lag_seconds,
            pg_wal_bytes,
            free_bytes,
            window_oldest: window.0.clone(),
            window_newest: window.1.clone(),
            window_gap: window.2.clone(),
            window_checked_at: window.3.clone(),
            window_error: window.4.clone(),
        });
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

type WindowView = (Option<String>, Option<String>, Option<String>, Option<String>, Option<String>);

async fn check_chain(cfg: &Config, archive: &Archive, alerts: &Alerts) -> WindowView {
    let checked = Some(crate::units::now_rfc3339());
    match crate::backup::pitr::window(cfg, &archive.s3, archive).await {
        Ok(w) => {
            let gap =
                w.gap.as_ref().map(|(missing, resume)| format!("{missing} missing (the archive resumes at {resume})"));
            match &gap {
                Some(g) => {
                    alerts.open(alerts::WAL_GAP, alerts::wal_gap(g));
                }
                None => {
                    alerts.resolve(alerts::WAL_GAP, "the WAL chain is whole again");
                }
            }
            (w.oldest, w.newest, gap, checked, None)
        }
        Err(e) => (None, None, None, checked, Some(e.to_string())),
    }
}

/// Seconds since PostgreSQL last archived a segment (None when it never did or cannot say).
async fn archiver_age(target: &PgTarget) -> Option<u64> {
    let c = target.connect("postgres", Duration::from_secs(5)).await.ok()?;
    let row = c
        .query_one("SELECT extract(epoch FROM now() - last_archived_time)::bigint FROM pg_stat_archiver", &[])
        .await
        .ok()?;
    row.get::<_, Option<i64>>(0).and_then(|s| u64::try_from(s).ok())
}
