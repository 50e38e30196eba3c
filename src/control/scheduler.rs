//! The daemon's schedule: backups of postgres and redis at `backup.schedule`, each followed by
//! retention, and the restore drill of the newest backups at `backup.verify-schedule`. Runs are
//! ordinary jobs, so they never overlap with each other or with an operator's job (a busy slot is
//! retried a minute later). A run missed while the daemon was not running — the last scheduled
//! moment is after the last run — starts `backup.catch-up-delay` after the daemon does (like
//! systemd's `Persistent=true`). The last runs are kept in `/var/lib/caretaker/schedule.json`;
//! without that file the newest backup in the bucket says when the last backup ran.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::bodies::{self, Body};
use super::jobs::{JobState, Jobs};
use super::runs::{self, load_state, state_path};
use super::wire::{DaemonStatus, ScheduleStatus};
use crate::backup::run::Kind;
use crate::calendar::{Calendar, random_delay};
use crate::config::Config;
use crate::units::rfc3339 as rfc;

fn parse_time(s: &Option<String>) -> Option<SystemTime> {
    s.as_deref().and_then(|t| humantime::parse_rfc3339(t).ok())
}

fn calendar(text: &str) -> Option<Calendar> {
    (text != "off").then(|| Calendar::parse(text).ok()).flatten()
}

/// When a task next runs: soon after `started` when a run was missed, else its next moment.
pub fn next_run(cal: &Calendar, last: Option<SystemTime>, now: SystemTime, catch_up: SystemTime) -> SystemTime {
    if cal.missed(last, now) { catch_up.max(now) } else { cal.next_after(now) }
}

async fn wait_for_job(jobs: &Jobs, id: &str, cancel: &CancellationToken) -> Option<bool> {
    loop {
        match jobs.get(id) {
            Some(j) if j.state != JobState::Running => return Some(j.state == JobState::Succeeded),
            None => return None,
            _ => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Starts a job, retrying every minute while another one runs; waits for its end.
async fn run_job(
    jobs: &Arc<Jobs>,
    kind: &str,
    description: &str,
    mut make: impl FnMut() -> Body,
    cancel: &CancellationToken,
) -> Option<bool> {
    loop {
        match jobs.start(kind, description, make()) {
            Ok(info) => return wait_for_job(jobs, &info.id, cancel).await,
            Err(busy) => {
                info!("{description} waits: {busy}");
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
            }
        }
    }
}

/// Runs the schedule until `cancel`. The configuration is re-read on every turn (reloads apply).
pub async fn run(
    config: Arc<RwLock<Config>>,
    jobs: Arc<Jobs>,
    status: Arc<Mutex<DaemonStatus>>,
    cancel: CancellationToken,
) {
    let path = state_path();
    let started = SystemTime::now();
    let mut state = load_state(&path).unwrap_or_default();
    if state.last_backup.is_none() {
        // No record: the newest backup in the bucket is the last run (none: a run is due).
        let cfg = config.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let Ok(s3) = crate::backup::run::s3_for(&cfg).await {
            let mut newest: Option<String> = None;
            for k in [Kind::Postgres, Kind::Redis] {
                if let Ok(list) = crate::backup::run::list(&cfg, &s3, k).await
                    && let Some(m) = list.last()
                {
                    newest = newest.max(Some(m.started_at.clone()));
                }
            }
            state.last_backup = newest;
        }
    }
    if state.last_verify.is_none() {
        // Never drilled on this box: the first drill waits for its scheduled moment.
        state.last_verify = Some(rfc(started));
    }
    let delay_backup =
        random_delay(config.read().unwrap_or_else(|p| p.into_inner()).backup.random_delay.get(), "backup");
    let delay_verify =
        random_delay(config.read().unwrap_or_else(|p| p.into_inner()).backup.random_delay.get(), "verify");
    loop {
        // Jobs record their runs in the file too (`record`): it is the truth once it exists.
        if let Some(s) = load_state(&path) {
            state.last_backup = s.last_backup.or(state.last_backup);
            state.last_backup_ok = s.last_backup_ok.or(state.last_backup_ok);
            state.last_verify = s.last_verify.or(state.last_verify);
            state.last_verify_ok = s.last_verify_ok.or(state.last_verify_ok);
        }
        let cfg = config.read().unwrap_or_else(|p| p.into_inner()).clone();
        let now = SystemTime::now();
        let catch_up = started + cfg.backup.catch_up_delay.get();
        let next_backup = calendar(&cfg.backup.schedule)
            .filter(|_| cfg.backup.bucket.is_some())
            .map(|c| next_run(&c, parse_time(&state.last_backup), now, catch_up) + delay_backup);
        let next_verify = calendar(&cfg.backup.verify_schedule)
            .filter(|_| cfg.backup.bucket.is_some())
            .map(|c| next_run(&c, parse_time(&state.last_verify), now, catch_up) + delay_verify);
        {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            s.schedule = Some(ScheduleStatus {
                backup_schedule: cfg.backup.schedule.clone(),
                verify_schedule: cfg.backup.verify_schedule.clone(),
                next_backup: next_backup.map(rfc),
                next_verify: next_verify.map(rfc),
                last_backup: state.last_backup.clone(),
                last_backup_ok: state.last_backup_ok,
                last_verify: state.last_verify.clone(),
                last_verify_ok: state.last_verify_ok,
            });
        }
        let due = [next_backup, next_verify].into_iter().flatten().min();
        // Wake at least every minute: a reload may have changed the schedule.
        let wait = due
            .map(|d| d.duration_since(now).unwrap_or_default())
            .unwrap_or(Duration::MAX)
            .min(Duration::from_secs(60));
        if !wait.is_zero() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = runs::recorded() => {}
            }
            continue;
        }
        let alerts = jobs.alerts();
        if next_backup.is_some_and(|t| t <= now) {
            info!("scheduled backup ({}) is due", cfg.backup.schedule);
            let at = SystemTime::now();
            let c = cfg.clone();
            let a = alerts.clone();
            let ok = run_job(
                &jobs,
                "backup",
                "scheduled backup all",
                || bodies::backup_job(c.clone(), Kind::all_for(&c), a.clone()),
                &cancel,
            )
            .await;
            let Some(ok) = ok else { return };
            state.last_backup = Some(rfc(at));
            state.last_backup_ok = Some(ok);
            if ok {
                let (c, a) = (cfg.clone(), alerts.clone());
                let _ = run_job(
                    &jobs,
                    "prune",
                    "scheduled prune",
                    || bodies::prune_job(c.clone(), false, a.clone()),
                    &cancel,
                )
                .await;
            }
        } else if next_verify.is_some_and(|t| t <= now) {
            info!("scheduled restore drill ({}) is due", cfg.backup.verify_schedule);
            let at = SystemTime::now();
            let (c, a) = (cfg.clone(), alerts.clone());
            let ok = run_job(
                &jobs,
                "verify",
                "scheduled verify all latest",
                || bodies::verify_job(c.clone(), Kind::all_for(&c), "latest".into(), a.clone()),
                &cancel,
            )
            .await;
            let Some(ok) = ok else { return };
            state.last_verify = Some(rfc(at));
            state.last_verify_ok = Some(ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn a_missed_run_is_caught_up_after_the_delay_and_otherwise_waits_for_its_moment() {
        let cal = Calendar::parse("03:00").unwrap();
        let now = t("2026-11-22T10:00:00Z");
        let catch_up = t("2026-11-22T10:02:00Z");
        // Last run yesterday 03:00: today's 03:00 was missed.
        assert_eq!(next_run(&cal, Some(t("2026-11-21T03:00:05Z")), now, catch_up), catch_up);
        // Never ran: due now (after the delay).
        assert_eq!(next_run(&cal, None, now, catch_up), catch_up);
        // Ran today at 03:00: next is tomorrow.
        assert_eq!(next_run(&cal, Some(t("2026-11-22T03:00:04Z")), now, catch_up), t("2026-11-23T03:00:00Z"));
        // Long after start, a missed run is due at once.
        assert_eq!(next_run(&cal, Some(t("2026-11-21T03:00:05Z")), now, t("2026-11-22T09:00:00Z")), now);
    }

    #[test]
    fn off_disables_a_task() {
        assert!(calendar("off").is_none());
        assert!(calendar("Sun 04:00").is_some());
    }
}
