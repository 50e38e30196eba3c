//! systemd's D-Bus API (org.freedesktop.systemd1): start, stop, restart, reset-failed, and the
//! state of units. A job's result says little — for a Type=simple unit the start job is "done"
//! even when the process exits 1 a moment later — so every action is judged by the unit's
//! ActiveState/SubState/Result after its job has ended (and a short settle time).

use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use zbus::proxy;
use zbus::zvariant::OwnedObjectPath;

#[proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
pub trait Manager {
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    #[zbus(name = "GetUnitByPID")]
    fn get_unit_by_pid(&self, pid: u32) -> zbus::Result<OwnedObjectPath>;
    fn set_unit_properties(
        &self,
        name: &str,
        runtime: bool,
        properties: &[(&str, zbus::zvariant::Value<'_>)],
    ) -> zbus::Result<()>;
    fn subscribe(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(&self, id: u32, job: OwnedObjectPath, unit: String, result: String) -> zbus::Result<()>;
}

#[proxy(interface = "org.freedesktop.systemd1.Unit", default_service = "org.freedesktop.systemd1")]
pub trait Unit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn load_state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn id(&self) -> zbus::Result<String>;
}

#[proxy(interface = "org.freedesktop.systemd1.Service", default_service = "org.freedesktop.systemd1")]
pub trait Service {
    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;
    #[zbus(property, name = "NRestarts")]
    fn n_restarts(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> zbus::Result<u32>;
    #[zbus(property, name = "CPUWeight")]
    fn cpu_weight(&self) -> zbus::Result<u64>;
    #[zbus(property, name = "IOWeight")]
    fn io_weight(&self) -> zbus::Result<u64>;
}

/// A failed call, with the unit and method it was about.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("systemd {method} {unit}: {source}")]
    Call { method: &'static str, unit: String, source: zbus::Error },
    #[error("systemd {method} {unit}: the job did not finish within {timeout:?}")]
    JobTimeout { method: &'static str, unit: String, timeout: Duration },
    #[error("unit {unit} is not known to systemd (LoadState={load_state})")]
    NotLoaded { unit: String, load_state: String },
}

/// A unit's state as systemd reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitState {
    pub active_state: String,
    pub sub_state: String,
    /// Service `Result` (success, exit-code, watchdog, start-limit-hit, …); empty for non-services.
    pub result: String,
    pub n_restarts: u32,
    pub main_pid: u32,
}

impl UnitState {
    pub fn is_active(&self) -> bool {
        self.active_state == "active" || self.active_state == "reloading"
    }
    pub fn is_failed(&self) -> bool {
        self.active_state == "failed"
    }
    /// systemd refused to start it again because of StartLimitBurst.
    pub fn hit_start_limit(&self) -> bool {
        self.result == "start-limit-hit"
    }
}

/// What came of a start/stop/restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobOutcome {
    /// The job's own result: done, failed, canceled, timeout, dependency, skipped.
    pub job_result: String,
    /// The unit's state after the job (the real verdict).
    pub state: UnitState,
}

/// A client of systemd's manager on one bus connection.
#[derive(Clone)]
pub struct Systemd {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
    /// How long a state must hold after a start before it counts (Type=simple units).
    settle: Duration,
}

impl Systemd {
    /// Uses `conn` (the daemon's own connection to the system bus). Subscribes to job signals.
    pub async fn new(conn: &zbus::Connection) -> Result<Systemd, SystemdError> {
        let call = |source| SystemdError::Call { method: "Subscribe", unit: String::new(), source };
        let manager = ManagerProxy::new(conn).await.map_err(call)?;
        // Subscriptions are per connection: a second client on the daemon's connection (a job
        // next to the supervisor) finds it subscribed already, which is what it wanted.
        match manager.subscribe().await {
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.AlreadySubscribed" => {}
            r => r.map_err(call)?,
        }
        Ok(Systemd { conn: conn.clone(), manager, settle: Duration::from_millis(500) })
    }

    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    async fn unit_path(&self, unit: &str) -> Result<OwnedObjectPath, SystemdError> {
        self.manager.load_unit(unit).await.map_err(|source| SystemdError::Call {
            method: "LoadUnit",
            unit: unit.into(),
            source,
        })
    }

    /// The unit's current state.
    pub async fn state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        let path = self.unit_path(unit).await?;
        let err = |method| move |source| SystemdError::Call { method, unit: unit.to_string(), source };
        let u = UnitProxy::builder(&self.conn)
            .path(path.clone())
            .map_err(err("Unit"))?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(err("Unit"))?;
        let load_state = u.load_state().await.map_err(err("Get LoadState"))?;
        if load_state != "loaded" {
            return Err(SystemdError::NotLoaded { unit: unit.into(), load_state });
        }
        let active_state = u.active_state().await.map_err(err("Get ActiveState"))?;
        let sub_state = u.sub_state().await.map_err(err("Get SubState"))?;
        let (result, n_restarts, main_pid) = if unit.ends_with(".service") {
            let s = ServiceProxy::builder(&self.conn)
                .path(path)
                .map_err(err("Service"))?
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
                .map_err(err("Service"))?;
            (
                s.result().await.map_err(err("Get Result"))?,
                s.n_restarts().await.unwrap_or(0),
                s.main_pid().await.map_err(err("Get MainPID"))?,
            )
        } else {
            (String::new(), 0, 0)
        };
        Ok(UnitState { active_state, sub_state, result, n_restarts, main_pid })
    }

    /// Runs one job-creating method and waits for the job to end, then for the unit to settle.
    async fn job(&self, method: &'static str, unit: &str, timeout: Duration) -> Result<JobOutcome, SystemdError> {
        let err = |source| SystemdError::Call { method, unit: unit.to_string(), source };
        // Listen before asking, so the JobRemoved signal cannot be missed.
        let mut removed = self.manager.receive_job_removed().await.map_err(err)?;
        let job = match method {
            "StartUnit" => self.manager.start_unit(unit, "replace").await,
            "StopUnit" => self.manager.stop_unit(unit, "replace").await,
            "RestartUnit" => self.manager.restart_unit(unit, "replace").await,
            _ => unreachable!("not a job method: {method}"),
        }
        .map_err(err)?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                if let Ok(args) = signal.args()
                    && args.job == job
                {
                    return Some(args.result);
                }
            }
            None
        };
        let job_result = match tokio::time::timeout(timeout, wait).await {
            Ok(Some(r)) => r,
            Ok(None) => "unknown".into(),
            Err(_) => return Err(SystemdError::JobTimeout { method, unit: unit.into(), timeout }),
        };
        if method != "StopUnit" {
            tokio::time::sleep(self.settle).await;
        }
        let state = self.state(unit).await?;
        Ok(JobOutcome { job_result, state })
    }

    /// A failed unit refuses to start while its start limit is hit (`start-limit-hit`): every
    /// start and restart caretaker asks for first clears the failed state, so a unit that a crash,
    /// a killed update or a restart storm left failed runs again (the Result is logged first).
    async fn reset_if_failed(&self, unit: &str) {
        if let Ok(st) = self.state(unit).await
            && st.is_failed()
        {
            tracing::info!(unit, result = %st.result, "{unit}: resetting its failed state (Result={}, e.g. the start limit) before starting it", st.result);
            if let Err(e) = self.reset_failed(unit).await {
                tracing::warn!("{e}");
            }
        }
    }

    /// Starts `unit` (clearing a failed state first, see [`Self::reset_if_failed`]).
    pub async fn start(&self, unit: &str, timeout: Duration) -> Result<JobOutcome, SystemdError> {
        self.reset_if_failed(unit).await;
        self.job("StartUnit", unit, timeout).await
    }

    pub async fn stop(&self, unit: &str, timeout: Duration) -> Result<JobOutcome, SystemdError> {
        self.job("StopUnit", unit, timeout).await
    }

    /// Restarts `unit` (clearing a failed state first, see [`Self::reset_if_failed`]).
    pub async fn restart(&self, unit: &str, timeout: Duration) -> Result<JobOutcome, SystemdError> {
        self.reset_if_failed(unit).await;
        self.job("RestartUnit", unit, timeout).await
    }

    /// The unit process `pid` runs in (its name, e.g. `caretaker.service`).
    pub async fn unit_of(&self, pid: u32) -> Result<String, SystemdError> {
        let call = |source| SystemdError::Call { method: "GetUnitByPID", unit: format!("of pid {pid}"), source };
        let path = self.manager.get_unit_by_pid(pid).await.map_err(call)?;
        let unit = UnitProxy::builder(&self.conn).path(path).map_err(call)?.build().await.map_err(call)?;
        unit.id().await.map_err(call)
    }

    /// Service `unit`'s `CPUWeight=` and `IOWeight=` (u64::MAX: not set).
    pub async fn weights(&self, unit: &str) -> Result<(u64, u64), SystemdError> {
        let call = |source| SystemdError::Call { method: "Get CPUWeight/IOWeight", unit: unit.into(), source };
        let path = self.unit_path(unit).await?;
        let svc = ServiceProxy::builder(&self.conn).path(path).map_err(call)?.build().await.map_err(call)?;
        Ok((svc.cpu_weight().await.map_err(call)?, svc.io_weight().await.map_err(call)?))
    }

    /// Sets `unit`'s `CPUWeight=` and `IOWeight=` until the next boot (runtime properties, as
    /// `systemctl set-property --runtime` does); systemd writes them into the unit's cgroup. Values
    /// already in force are not written again: each write is a drop-in under /run that makes
    /// `systemctl` ask for a daemon-reload.
    pub async fn set_weights(&self, unit: &str, cpu: u64, io: u64) -> Result<(), SystemdError> {
        use zbus::zvariant::Value;
        if self.weights(unit).await.ok() == Some((cpu, io)) {
            return Ok(());
        }
        let props = [("CPUWeight", Value::U64(cpu)), ("IOWeight", Value::U64(io))];
        self.manager.set_unit_properties(unit, true, &props).await.map_err(|source| SystemdError::Call {
            method: "SetUnitProperties",
            unit: unit.into(),
            source,
        })
    }

    /// Clears a unit's failed state (and its start-limit counter).
    pub async fn reset_failed(&self, unit: &str) -> Result<(), SystemdError> {
        self.manager.reset_failed_unit(unit).await.map_err(|source| SystemdError::Call {
            method: "ResetFailedUnit",
            unit: unit.into(),
            source,
        })
    }
}
