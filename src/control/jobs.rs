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

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use super::wire::{JobInfo, JobState};
use crate::units::now_rfc3339;

/// How many finished jobs status remembers.
const HISTORY: usize = 20;
/// Progress signals are sent at most this often (phase changes always go out).
const PROGRESS_EVERY: Duration = Duration::from_millis(1000);

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

/// What the job table tells whoever listens (the D-Bus interface turns these into signals), in
/// the order they happened.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    Progress { id: String, message: String, done: u64, total: u64 },
    Finished { id: String, ok: bool, summary: String },
}

/// The daemon's job table.
pub struct Jobs {
    state: Mutex<State>,
    events: Mutex<Option<mpsc::UnboundedSender<JobEvent>>>,
    /// systemd, for jobs that stop and start units (set by the daemon once its bus connection exists).
    systemd: OnceLock<crate::systemd::manager::Systemd>,
    /// The daemon's alerts (shared so that incidents opened by a job are deduplicated and
    /// resolved like the supervisor's).
    alerts: OnceLock<crate::notify::Alerts>,
    cancel: CancellationToken,
}

impl Jobs {
    pub fn new(cancel: CancellationToken) -> Arc<Jobs> {
        Arc::new(Jobs {
            state: Mutex::new(State { current: None, handle: None, history: VecDeque::new(), counter: 0 }),
            events: Mutex::new(None),
            systemd: OnceLock::new(),
            alerts: OnceLock::new(),
            cancel,
        })
    }

    /// The job events from now on (one listener: a second call replaces the first).
    pub fn events(&self) -> mpsc::UnboundedReceiver<JobEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.events.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// No more events: the listener ends once it has received those already sent.
    pub fn close_events(&self) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    fn emit(&self, event: JobEvent) {
        if let Some(tx) = self.events.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = tx.send(event);
        }
    }

    /// systemd, once the daemon has connected to it.
    pub fn set_systemd(&self, systemd: crate::systemd::manager::Systemd) {
        let _ = self.systemd.set(systemd);
    }

    pub fn systemd(&self) -> Option<crate::systemd::manager::Systemd> {
        self.systemd.get().cloned()
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
        let stamp = crate::units::compact_stamp(SystemTime::now());
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
            // The body runs in a task of its own: if it panics, the job fails (and the slot is
            // freed) instead of staying "running" and refusing every later job as busy.
            let result = match tokio::spawn(fut).await {
                Ok(r) => r,
                Err(e) if e.is_panic() => {
                    let what = panic_message(e.into_panic());
                    error!(job = %id, "the job panicked: {what}");
                    if let Some(a) = jobs.alerts() {
                        a.open("job:panic", panic_alert(&id, &what));
                    }
                    Err(format!(
                        "the job failed unexpectedly (a bug in caretaker: {what}); nothing further was done, later jobs run normally"
                    ))
                }
                Err(_) => Err("the job was aborted".into()),
            };
            jobs.finish(&id, result);
        });
        s.handle = Some(handle);
        Ok(info)
    }

    fn finish(&self, id: &str, result: JobResult) {
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
        self.emit(JobEvent::Finished { id: id.to_string(), ok: result.is_ok(), summary: info.summary });
        // A job pages in code idle work never runs (the SDK's upload paths, restore, drills) and
        // grows the heap: both given back now, the idle daemon's resident set stays its working set.
        let _ = crate::pageout::release_code_pages();
        crate::pageout::release_heap();
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

/// The text of a panic payload (a `&str` or `String`; anything else is named as such).
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p.downcast::<&'static str>().map(|s| s.to_string()).unwrap_or_else(|_| "a panic".into()),
    }
}

fn panic_alert(id: &str, what: &str) -> crate::notify::Alert {
    crate::notify::Alert {
        subject: format!("job {id} failed with an internal error"),
        what_failed: format!("The job {id} stopped on an internal error (a bug): {what}"),
        what_done: "The job was marked failed and its slot freed: later backups, drills, restores and updates run."
            .into(),
        what_safe:
            "A job never changes live data before its new copy is complete and verified; the live data is as it was."
                .into(),
        next: "journalctl -u caretaker -n 200; report the message; run the job again (`caretaker status` shows it)"
            .into(),
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
        self.jobs.emit(JobEvent::Progress { id: self.id.clone(), message: message.to_string(), done, total });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (up to 2 s) until no job is running.
    async fn settled(jobs: &Jobs) {
        for _ in 0..200 {
            if jobs.current().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

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
        settled(&jobs).await;
        let done = jobs.get(&first.id).unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(done.summary, "42 bytes");
        let failed =
            jobs.start("verify", "verify latest", |_| Box::pin(async { Err("hash mismatch".into()) })).unwrap();
        settled(&jobs).await;
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

    #[tokio::test]
    async fn a_panicking_job_fails_and_frees_the_slot() {
        let jobs = Jobs::new(CancellationToken::new());
        let info =
            jobs.start("backup", "backup postgres", |_| Box::pin(async { panic!("id too short: `x`") })).unwrap();
        settled(&jobs).await;
        let done = jobs.get(&info.id).unwrap();
        assert_eq!(done.state, JobState::Failed);
        assert!(done.summary.contains("id too short"), "{}", done.summary);
        let next = jobs.start("verify", "verify latest", |_| Box::pin(async { Ok("fine".to_string()) }));
        assert!(next.is_ok(), "the slot is free after a panic");
    }
}
