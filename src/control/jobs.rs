//! Jobs: mutating work (backups, verification, restores, updates) runs as a job inside the daemon.
//! A D-Bus method starts one and returns its id at once; `JobProgress` and `JobFinished` signals
//! carry what happens; `JobStatus(id)` answers for a client that missed a signal. One mutating job
//! runs at a time: a second request is refused with a message naming the running job, so nothing
//! ever runs twice concurrently (safety rule 8).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use zbus::object_server::SignalEmitter;

/// How many finished jobs status remembers.
const HISTORY: usize = 20;
/// Progress signals are sent at most this often (phase changes always go out).
const PROGRESS_EVERY: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
}

/// A job as status and `JobStatus` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobInfo {
    pub id: String,
    /// `backup`, `verify`, `prune`, `update`, `restore`, `migrate`.
    pub kind: String,
    /// What it does, e.g. "backup postgres".
    pub description: String,
    pub state: JobState,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// The last progress line.
    pub progress: String,
    /// The result: a one-line summary on success, the error on failure.
    pub summary: String,
}

/// Refusal of a second mutating job.
#[derive(Debug, thiserror::Error)]
#[error("another job is running: {description} ({id}, since {since}); wait for it (`caretaker status`) and try again")]
pub struct Busy {
    pub id: String,
    pub description: String,
    pub since: String,
}

/// What a job's body returns: a summary, or an error message (one line per cause).
pub type JobResult = Result<String, String>;
pub type JobFuture = Pin<Box<dyn Future<Output = JobResult> + Send>>;

struct State {
    current: Option<JobInfo>,
    handle: Option<JoinHandle<()>>,
    history: VecDeque<JobInfo>,
    counter: u64,
}

/// The daemon's job table.
pub struct Jobs {
    state: Mutex<State>,
    emitter: OnceLock<SignalEmitter<'static>>,
    /// The daemon's alerts (shared so that incidents opened by a job are deduplicated and
    /// resolved like the supervisor's).
    alerts: OnceLock<crate::notify::Alerts>,
    cancel: CancellationToken,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Jobs {
    pub fn new(cancel: CancellationToken) -> Arc<Jobs> {
        Arc::new(Jobs {
            state: Mutex::new(State { current: None, handle: None, history: VecDeque::new(), counter: 0 }),
            emitter: OnceLock::new(),
            alerts: OnceLock::new(),
            cancel,
        })
    }

    /// Signals go out once the bus connection exists.
    pub fn set_emitter(&self, emitter: SignalEmitter<'static>) {
        let _ = self.emitter.set(emitter);
    }

    /// The daemon's bus connection (for jobs that talk to systemd), once it exists.
    pub fn connection(&self) -> Option<zbus::Connection> {
        self.emitter.get().map(|e| e.connection().clone())
    }

    /// The daemon's alerts, once built.
    pub fn set_alerts(&self, alerts: crate::notify::Alerts) {
        let _ = self.alerts.set(alerts);
    }

    pub fn alerts(&self) -> Option<crate::notify::Alerts> {
        self.alerts.get().cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The running job, if any.
    pub fn current(&self) -> Option<JobInfo> {
        self.lock().current.clone()
    }

    /// Finished jobs, newest last.
    pub fn history(&self) -> Vec<JobInfo> {
        self.lock().history.iter().cloned().collect()
    }

    /// A job by id, running or finished.
    pub fn get(&self, id: &str) -> Option<JobInfo> {
        let s = self.lock();
        s.current.iter().chain(s.history.iter()).find(|j| j.id == id).cloned()
    }

    /// Starts a job unless one is running. `body` gets a [`JobCtx`] for progress and cancellation.
    pub fn start(
        self: &Arc<Self>,
        kind: &str,
        description: &str,
        body: impl FnOnce(JobCtx) -> JobFuture,
    ) -> Result<JobInfo, Busy> {
        let mut s = self.lock();
        if let Some(cur) = &s.current {
            return Err(Busy {
                id: cur.id.clone(),
                description: cur.description.clone(),
                since: cur.started_at.clone(),
            });
        }
        s.counter += 1;
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace([':', '-'], "");
        let id = format!("{kind}-{}-{}", stamp.trim_end_matches('Z'), s.counter);
        let info = JobInfo {
            id: id.clone(),
            kind: kind.into(),
            description: description.into(),
            state: JobState::Running,
            started_at: now_rfc3339(),
            finished_at: None,
            progress: "starting".into(),
            summary: String::new(),
        };
        s.current = Some(info.clone());
        info!(job = %id, "job started: {description}");
        let ctx = JobCtx {
            id: id.clone(),
            jobs: self.clone(),
            cancel: self.cancel.child_token(),
            last_emit: Mutex::new(None),
        };
        let fut = body(ctx);
        let jobs = self.clone();
        let handle = tokio::spawn(async move {
            let result = fut.await;
            jobs.finish(&id, result).await;
        });
        s.handle = Some(handle);
        Ok(info)
    }

    async fn finish(&self, id: &str, result: JobResult) {
        let info = {
            let mut s = self.lock();
            let Some(mut info) = s.current.take().filter(|c| c.id == id) else { return };
            s.handle = None;
            info.finished_at = Some(now_rfc3339());
            match &result {
                Ok(summary) => {
                    info.state = JobState::Succeeded;
                    info.summary = summary.clone();
                }
                Err(e) => {
                    info.state = JobState::Failed;
                    info.summary = e.clone();
                }
            }
            s.history.push_back(info.clone());
            while s.history.len() > HISTORY {
                s.history.pop_front();
            }
            info
        };
        match &result {
            Ok(summary) => info!(job = %id, "job succeeded: {}: {summary}", info.description),
            Err(e) => error!(job = %id, "job failed: {}: {e}", info.description),
        }
        if let Some(em) = self.emitter.get()
            && let Err(e) = super::dbus::Control::job_finished(em, id, result.is_ok(), &info.summary).await
        {
            warn!("cannot send JobFinished: {e}");
        }
    }

    /// Cancels the running job and waits up to `grace` for it to end.
    pub async fn shutdown(&self, grace: Duration) {
        self.cancel.cancel();
        let handle = self.lock().handle.take();
        if let Some(h) = handle
            && tokio::time::timeout(grace, h).await.is_err()
        {
            warn!("the running job did not stop within {grace:?}");
        }
    }
}

/// Handed to a job's body.
pub struct JobCtx {
    pub id: String,
    jobs: Arc<Jobs>,
    /// Cancelled on daemon shutdown: stop, clean up, return an error.
    pub cancel: CancellationToken,
    last_emit: Mutex<Option<Instant>>,
}

impl JobCtx {
    /// A phase change: always logged and signalled.
    pub async fn phase(&self, message: &str) {
        info!(job = %self.id, "{message}");
        self.emit(message, 0, 0, true).await;
    }

    /// Progress within a phase (bytes done and total, 0 when unknown); throttled.
    pub async fn progress(&self, message: &str, done: u64, total: u64) {
        self.emit(message, done, total, false).await;
    }

    async fn emit(&self, message: &str, done: u64, total: u64, always: bool) {
        {
            let mut last = self.last_emit.lock().unwrap_or_else(|p| p.into_inner());
            if !always && last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        if let Some(cur) = self.jobs.lock().current.as_mut().filter(|c| c.id == self.id) {
            cur.progress = message.to_string();
        }
        if let Some(em) = self.jobs.emitter.get()
            && let Err(e) = super::dbus::Control::job_progress(em, &self.id, message, done, total).await
        {
            warn!("cannot send JobProgress: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_job_at_a_time_and_results_are_kept() {
        let jobs = Jobs::new(CancellationToken::new());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let first = jobs
            .start("backup", "backup postgres", |ctx| {
                Box::pin(async move {
                    ctx.phase("dumping").await;
                    let _ = rx.await;
                    Ok("42 bytes".to_string())
                })
            })
            .unwrap();
        let busy = jobs.start("update", "update to v2", |_| Box::pin(async { Ok(String::new()) })).unwrap_err();
        assert_eq!(busy.id, first.id);
        assert!(busy.to_string().contains("backup postgres"), "{busy}");
        tx.send(()).unwrap();
        for _ in 0..100 {
            if jobs.current().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let done = jobs.get(&first.id).unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(done.summary, "42 bytes");
        let failed =
            jobs.start("verify", "verify latest", |_| Box::pin(async { Err("hash mismatch".into()) })).unwrap();
        for _ in 0..100 {
            if jobs.current().is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(jobs.get(&failed.id).unwrap().state, JobState::Failed);
        assert_eq!(jobs.history().len(), 2);
    }

    #[tokio::test]
    async fn shutdown_cancels_the_running_job() {
        let jobs = Jobs::new(CancellationToken::new());
        let info = jobs
            .start("backup", "backup redis", |ctx| {
                Box::pin(async move {
                    ctx.cancel.cancelled().await;
                    Err("cancelled: the daemon is stopping".to_string())
                })
            })
            .unwrap();
        jobs.shutdown(Duration::from_secs(2)).await;
        assert_eq!(jobs.get(&info.id).unwrap().state, JobState::Failed);
    }
}
