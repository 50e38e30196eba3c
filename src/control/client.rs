//! The CLI side of the control plane: a thin client of the daemon's D-Bus interface.

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use zbus::proxy;

use super::wire::{DaemonStatus, JobInfo, JobState};
use crate::units::human_bytes;

#[proxy(
    interface = "io.shtetl.Caretaker1",
    default_service = "io.shtetl.Caretaker1",
    default_path = "/io/shtetl/Caretaker1"
)]
pub trait Caretaker1 {
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn started_at(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn status_json(&self) -> zbus::Result<String>;
    fn reload(&self) -> zbus::Result<()>;
    fn job_status(&self, id: &str) -> zbus::Result<String>;
    fn backup_now(&self, kind: &str) -> zbus::Result<String>;
    fn prune(&self, dry_run: bool) -> zbus::Result<String>;
    fn migrate(&self, ssm_param: &str, url_file: &str, swap: bool) -> zbus::Result<String>;
    fn restore(&self, what: &str, backup: &str, target_db: &str) -> zbus::Result<String>;
    fn restore_to_time(&self, target: &str) -> zbus::Result<String>;
    fn verify(&self, kind: &str, id: &str) -> zbus::Result<String>;
    fn update(&self, version: &str, dry_run: bool, allow_downgrade: bool) -> zbus::Result<String>;
    #[zbus(signal)]
    fn job_progress(&self, id: String, message: String, done: u64, total: u64) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_finished(&self, id: String, ok: bool, summary: String) -> zbus::Result<()>;
}

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the system bus{}: {source}\n  check: systemctl status dbus",
        address.as_deref().map(|a| format!(" at {a}")).unwrap_or_default()
    )]
    Bus { address: Option<String>, source: zbus::Error },
    #[error(
        "the caretaker daemon is not running (nobody owns {name} on the bus)\n  check: systemctl status caretaker; journalctl -u caretaker -n 50"
    )]
    NotRunning { name: &'static str },
    #[error("the daemon refused {method}: {message}")]
    Refused { method: &'static str, message: String },
    #[error("calling {method} on the daemon failed: {source}")]
    Call { method: &'static str, source: zbus::Error },
    #[error("the daemon sent a status this CLI cannot read: {0}")]
    BadStatus(serde_json::Error),
}

/// A connected client.
pub struct Client {
    proxy: Caretaker1Proxy<'static>,
}

impl Client {
    pub async fn connect(address: Option<&str>) -> Result<Client, ClientError> {
        let bus_err = |source| ClientError::Bus { address: address.map(str::to_string), source };
        let conn = super::connect(address).await.map_err(bus_err)?.build().await.map_err(bus_err)?;
        let proxy = Caretaker1Proxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(bus_err)?;
        Ok(Client { proxy })
    }

    fn classify(method: &'static str, e: zbus::Error) -> ClientError {
        match &e {
            zbus::Error::MethodError(name, msg, _) => {
                let name = name.as_str();
                if name == "org.freedesktop.DBus.Error.ServiceUnknown"
                    || name == "org.freedesktop.DBus.Error.NameHasNoOwner"
                {
                    ClientError::NotRunning { name: super::BUS_NAME }
                } else {
                    ClientError::Refused { method, message: msg.clone().unwrap_or_else(|| name.to_string()) }
                }
            }
            zbus::Error::FDO(fdo) => match **fdo {
                zbus::fdo::Error::ServiceUnknown(_) | zbus::fdo::Error::NameHasNoOwner(_) => {
                    ClientError::NotRunning { name: super::BUS_NAME }
                }
                _ => ClientError::Call { method, source: e },
            },
            _ => ClientError::Call { method, source: e },
        }
    }

    pub async fn status(&self) -> Result<DaemonStatus, ClientError> {
        let json = self.proxy.status_json().await.map_err(|e| Self::classify("Get(StatusJson)", e))?;
        serde_json::from_str(&json).map_err(ClientError::BadStatus)
    }

    pub async fn reload(&self) -> Result<(), ClientError> {
        self.proxy.reload().await.map_err(|e| Self::classify("Reload", e))
    }

    pub async fn job_status(&self, id: &str) -> Result<JobInfo, ClientError> {
        let json = self.proxy.job_status(id).await.map_err(|e| Self::classify("JobStatus", e))?;
        serde_json::from_str(&json).map_err(ClientError::BadStatus)
    }

    /// Starts a job with `start` (a call of one of the daemon's job methods, returning the job id)
    /// and follows it to its end, handing each progress line to `line`. Signals are subscribed to
    /// before the job starts, and the job's status is polled too, so nothing is missed.
    pub async fn run_job<F, Fut>(
        &self,
        method: &'static str,
        start: F,
        mut line: impl FnMut(&str),
    ) -> Result<JobInfo, ClientError>
    where
        F: FnOnce(Caretaker1Proxy<'static>) -> Fut,
        Fut: Future<Output = zbus::Result<String>>,
    {
        let sub = |e| Self::classify("subscribe to job signals", e);
        let mut progress = self.proxy.receive_job_progress().await.map_err(sub)?;
        let mut finished = self.proxy.receive_job_finished().await.map_err(sub)?;
        let id = start(self.proxy.clone()).await.map_err(|e| Self::classify(method, e))?;
        let started = Instant::now();
        line(&format!("job {id} started"));
        let mut poll = tokio::time::interval(Duration::from_secs(2));
        poll.tick().await;
        loop {
            // Biased: progress queued before the JobFinished signal is printed before it.
            tokio::select! {
                biased;
                Some(sig) = progress.next() => {
                    if let Ok(a) = sig.args() && a.id == id {
                        let amount = if a.total > 0 {
                            format!(" ({} of {})", human_bytes(a.done), human_bytes(a.total))
                        } else if a.done > 0 {
                            format!(" ({})", human_bytes(a.done))
                        } else {
                            String::new()
                        };
                        line(&format!("[{:>7.1}s] {}{amount}", started.elapsed().as_secs_f64(), a.message));
                    }
                }
                Some(sig) = finished.next() => {
                    if let Ok(a) = sig.args() && a.id == id {
                        return self.job_status(&id).await;
                    }
                }
                _ = poll.tick() => {
                    let info = self.job_status(&id).await?;
                    if info.state != JobState::Running {
                        return Ok(info);
                    }
                }
            }
        }
    }
}
