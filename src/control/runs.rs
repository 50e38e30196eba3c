//! The last backup and drill that ran, scheduled or asked for, in `/var/lib/caretaker/schedule.json`:
//! status shows them and the scheduler catches up from them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::units::rfc3339;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct State {
    pub(super) last_backup: Option<String>,
    pub(super) last_backup_ok: Option<bool>,
    pub(super) last_verify: Option<String>,
    pub(super) last_verify_ok: Option<bool>,
}

pub(super) fn state_path() -> PathBuf {
    Path::new(crate::envfile::STATE_DIR).join("schedule.json")
}

pub(super) fn load_state(path: &Path) -> Option<State> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn save_state(path: &Path, s: &State) {
    let json = serde_json::to_vec_pretty(s).expect("state serializes");
    if let Err(e) = crate::fsutil::write_atomic(path, &json, 0o644, None) {
        warn!("cannot record the schedule's last runs: {e}");
    }
}

static STATE_LOCK: Mutex<()> = Mutex::new(());
/// Wakes the schedule loop after a run was recorded (status then shows it at once). One waiter:
/// a record while it does not wait is kept for its next wait.
static RECORDED: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// How many runs were recorded, for every other watcher (the metrics' backup listing).
static RECORD_COUNT: std::sync::LazyLock<tokio::sync::watch::Sender<u64>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::channel(0).0);

/// What ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    Backup,
    Verify,
}

/// Records a backup or drill that ran (scheduled or asked for): status shows it, and a manual run
/// counts as the last run for catching up.
pub fn record(what: Run, at: SystemTime, ok: bool) {
    let _guard = STATE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let path = state_path();
    let mut s = load_state(&path).unwrap_or_default();
    match what {
        Run::Backup => (s.last_backup, s.last_backup_ok) = (Some(rfc3339(at)), Some(ok)),
        Run::Verify => (s.last_verify, s.last_verify_ok) = (Some(rfc3339(at)), Some(ok)),
    }
    save_state(&path, &s);
    RECORDED.notify_one();
    RECORD_COUNT.send_modify(|n| *n += 1);
}

/// A receiver that sees every [`record`] after this call (`changed()`), each watcher its own.
pub fn watch_records() -> tokio::sync::watch::Receiver<u64> {
    RECORD_COUNT.subscribe()
}

/// Resolves after the next [`record`] (the schedule loop's; others use [`watch_records`]).
pub(super) async fn recorded() {
    RECORDED.notified().await
}
