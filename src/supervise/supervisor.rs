//! The per-service state machine and the ordered start.
//!
//! ```text
//! Starting ──healthy──▶ Healthy ──N failed probes──▶ Degraded ──▶ Restarting ──▶ Starting …
//!                          ▲                              │ (M restarts within the window)
//!                          └──────────healthy─────────────┴──────────▶ Failed ──healthy──▶ Healthy
//! ```
//! systemd restarts what crashes; this catches what hangs or degrades. A Failed service is not
//! restarted again (no restart storms): one email goes out, and when it is healthy again (an
//! operator fixed it) a recovery email follows. A Redis that refuses writes is Degraded and
//! alerted, not restarted (a restart cannot free a full disk). Probes run in their own tasks with
//! timeouts, so they never hold up the daemon's main loop and its watchdog.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::provision;
use crate::config::{Config, ServiceKind};
use crate::health::{Health, Probe, ProbeResult};
use crate::notify::{Alert, Alerts};
use crate::pg::PgTarget;
use crate::systemd::manager::Systemd;
use crate::units::now_rfc3339;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SvcState {
    Starting,
    Healthy,
    Degraded,
    Restarting,
    Failed,
}

impl SvcState {
    /// Whether `self → next` is allowed.
    pub fn can_become(self, next: SvcState) -> bool {
        use SvcState::*;
        match next {
            Healthy => true,
            Degraded => matches!(self, Healthy | Starting | Degraded),
            Restarting => matches!(self, Degraded | Starting | Healthy),
            Starting => matches!(self, Restarting | Starting),
            Failed => matches!(self, Degraded | Starting | Restarting | Healthy),
        }
    }
}

/// One service's status, as shown by `caretaker status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub unit: String,
    pub state: SvcState,
    pub last_probe: Option<ProbeResult>,
    /// RFC 3339.
    pub last_probe_at: Option<String>,
    pub consecutive_failures: u32,
    /// Restarts by caretaker since the daemon started.
    pub restarts: u32,
    pub last_restart_at: Option<String>,
    /// What caretaker last did or noticed.
    pub note: String,
}

/// Watches one service.
struct Watch {
    kind: ServiceKind,
    unit: String,
    probe: Probe,
    cfg: Arc<Config>,
    systemd: Systemd,
    alerts: Alerts,
    services: watch::Sender<Vec<ServiceStatus>>,
    state: SvcState,
    failures: u32,
    restarts: VecDeque<Instant>,
    last_restart: Option<Instant>,
    backoff: Duration,
    /// Wakes this watch for an immediate probe.
    kick: Arc<Notify>,
    /// Kicked after this service was restarted (postgres → the API).
    dependents: Vec<Arc<Notify>>,
}

impl Watch {
    fn update(&self, f: impl FnOnce(&mut ServiceStatus)) {
        self.services.send_modify(|services| {
            if let Some(svc) = services.iter_mut().find(|x| x.name == self.kind.as_str()) {
                f(svc);
            }
        });
    }

    fn transition(&mut self, next: SvcState, note: &str) {
        if self.state == next {
            self.update(|s| s.note = note.to_string());
            return;
        }
        debug_assert!(self.state.can_become(next), "{:?} → {:?}", self.state, next);
        info!(service = self.kind.as_str(), unit = %self.unit, from = ?self.state, to = ?next, "{}: {note}", self.unit);
        self.state = next;
        self.update(|s| {
            s.state = next;
            s.note = note.to_string();
        });
    }

    fn key(&self, what: &str) -> String {
        format!("{}:{what}", self.kind.as_str())
    }

    async fn probe(&self) -> ProbeResult {
        let r = self.probe.run(self.cfg.supervise.probe_timeout.get()).await;
        let (r2, failures) = (r.clone(), self.failures);
        self.update(move |s| {
            s.last_probe = Some(r2);
            s.last_probe_at = Some(now_rfc3339());
            s.consecutive_failures = failures;
        });
        r
    }

    /// Polls until healthy or `timeout`; returns the last result.
    async fn wait_healthy(&self, timeout: Duration, cancel: &CancellationToken) -> ProbeResult {
        let end = Instant::now() + timeout;
        loop {
            let r = self.probe().await;
            if r.health.is_healthy() || Instant::now() >= end || cancel.is_cancelled() {
                return r;
            }
            tokio::select! {
                _ = cancel.cancelled() => return r,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// The ordered start: adopt a running unit, or start it and wait until healthy.
    async fn start_in_order(&mut self, cancel: &CancellationToken) {
        let timeout = self.cfg.supervise.start_timeout.get();
        match self.systemd.state(&self.unit).await {
            Ok(st) if st.is_active() => {
                let r = self.wait_healthy(timeout.min(Duration::from_secs(10)), cancel).await;
                if r.health.is_healthy() {
                    self.transition(SvcState::Healthy, "already running: adopted");
                    return;
                }
                warn!(unit = %self.unit, "running but not healthy yet: {:?}", r.health);
            }
            Ok(_) => {
                // A failed state (the start limit) is cleared by `Systemd::start` itself.
                info!(unit = %self.unit, "{}: starting", self.unit);
                match self.systemd.start(&self.unit, timeout).await {
                    Ok(out) if !out.state.is_active() => warn!(unit = %self.unit, job = %out.job_result,
                        state = %out.state.active_state, result = %out.state.result, "start did not leave the unit active"),
                    Ok(_) => {}
                    Err(e) => error!("{e}"),
                }
            }
            Err(e) => error!("{e}"),
        }
        let r = self.wait_healthy(timeout, cancel).await;
        if r.health.is_healthy() {
            self.transition(SvcState::Healthy, "started and healthy");
        } else {
            let reason = match &r.health {
                Health::Unhealthy(m) | Health::Degraded(m) => m.clone(),
                Health::Healthy => String::new(),
            };
            self.transition(SvcState::Starting, &format!("not healthy {timeout:?} after start: {reason}"));
            self.last_restart = Some(Instant::now());
        }
    }

    async fn run(mut self, cancel: CancellationToken) {
        let interval = self.cfg.supervise.probe_interval.get();
        let mut last_start = tokio::time::Instant::now();
        loop {
            // Probes keep a fixed cadence (a slow, timing-out probe does not push the next one
            // back), and a service coming back from a (re)start is probed every second until
            // healthy, so detection and recovery are not padded by whole intervals.
            let wait = if self.state == SvcState::Starting { interval.min(Duration::from_secs(1)) } else { interval };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(last_start + wait) => {}
                _ = self.kick.notified() => info!(service = self.kind.as_str(), "re-probing now"),
            }
            last_start = tokio::time::Instant::now();
            let r = self.probe().await;
            if let Some(reason) = crate::maintenance::held(&self.unit) {
                // A job is working on this unit: report, but neither restart nor alert.
                self.failures = 0;
                self.update(|s| s.note = format!("supervision paused: {reason}"));
                continue;
            }
            self.on_probe(r, &cancel).await;
        }
    }

    async fn on_probe(&mut self, r: ProbeResult, cancel: &CancellationToken) {
        match r.health {
            Health::Healthy => {
                self.failures = 0;
                self.backoff = self.cfg.supervise.restart_backoff.get();
                if self.state != SvcState::Healthy {
                    if self.state == SvcState::Failed {
                        self.restarts.clear();
                    }
                    self.transition(SvcState::Healthy, "healthy");
                }
                let unit = self.unit.clone();
                self.alerts.resolve(&self.key("failed"), &format!("{unit} is healthy again."));
                self.alerts.resolve(&self.key("degraded"), &format!("{unit} is healthy again; writes are accepted."));
            }
            Health::Degraded(reason) => {
                self.failures = 0;
                if self.state != SvcState::Degraded {
                    self.transition(SvcState::Degraded, &reason);
                }
                self.alerts.open(
                    &self.key("degraded"),
                    Alert {
                        subject: format!("{} is degraded: {reason}", self.unit),
                        what_failed: format!("{} answers, but {reason}.", self.unit),
                        what_done: "caretaker keeps probing; a restart would not help, so it does not restart it.".into(),
                        what_safe: "Data already written is safe. Writes are refused until the cause is fixed; the API may return errors.".into(),
                        next: format!("df -h {}; journalctl -u {} -n 50; then redis-cli BGSAVE and `caretaker status`", self.cfg.services.redis.data_dir.display(), self.unit),
                    },
                );
            }
            Health::Unhealthy(reason) => {
                self.failures += 1;
                if self.state == SvcState::Failed {
                    return;
                }
                // A freshly (re)started service gets its start timeout before failures count.
                if self.state == SvcState::Starting
                    && self.last_restart.is_some_and(|t| t.elapsed() < self.cfg.supervise.start_timeout.get())
                {
                    return;
                }
                if self.state == SvcState::Healthy {
                    self.transition(SvcState::Degraded, &format!("probe failed: {reason}"));
                }
                if self.failures >= self.cfg.supervise.failures_before_restart {
                    self.restart(&reason, cancel).await;
                }
            }
        }
    }

    async fn restart(&mut self, reason: &str, cancel: &CancellationToken) {
        let cfg = self.cfg.clone();
        let sup = &cfg.supervise;
        let window = sup.restart_window.get();
        while self.restarts.front().is_some_and(|t| t.elapsed() > window) {
            self.restarts.pop_front();
        }
        if self.restarts.len() as u32 >= sup.max_restarts {
            let n = self.restarts.len();
            self.transition(SvcState::Failed, &format!("{n} restarts within {window:?} did not help: {reason}"));
            self.alerts.open(
                &self.key("failed"),
                Alert {
                    subject: format!("{} failed: {reason}", self.unit),
                    what_failed: format!("{} stayed unhealthy: {reason}", self.unit),
                    what_done: format!(
                        "caretaker restarted it {n} times within {}, then stopped restarting it to avoid a restart storm. It keeps probing and will report when it is healthy again.",
                        humantime::format_duration(window)
                    ),
                    what_safe: "The data on /data is untouched; backups are unaffected. The service may be down.".into(),
                    next: format!("systemctl status {u}; journalctl -u {u} -n 100; fix the cause, then `systemctl restart {u}` and `caretaker status`", u = self.unit),
                },
            );
            return;
        }
        if let Some(last) = self.last_restart {
            let wait = self.backoff.saturating_sub(last.elapsed());
            if !wait.is_zero() {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        self.transition(SvcState::Restarting, &format!("restarting: {reason}"));
        // A failed state (the start limit) is cleared by `Systemd::restart` itself.
        match self.systemd.restart(&self.unit, sup.start_timeout.get()).await {
            Ok(out) => info!(unit = %self.unit, job = %out.job_result, state = %out.state.active_state,
                "{}: restart job {}, unit {}", self.unit, out.job_result, out.state.active_state),
            Err(e) => error!("{e}"),
        }
        self.restarts.push_back(Instant::now());
        self.last_restart = Some(Instant::now());
        self.backoff = (self.backoff * 2).min(sup.restart_backoff_max.get());
        self.failures = 0;
        let at = now_rfc3339();
        self.update(|s| {
            s.restarts += 1;
            s.last_restart_at = Some(at);
        });
        self.transition(SvcState::Starting, "restarted; waiting until healthy");
        for d in &self.dependents {
            d.notify_one();
        }
    }
}

/// Runs supervision until `cancel`: the ordered start (with provisioning after postgres), then
/// one watch per service.
pub async fn supervise(
    cfg: Arc<Config>,
    systemd: Systemd,
    alerts: Alerts,
    services: watch::Sender<Vec<ServiceStatus>>,
    cancel: CancellationToken,
) {
    let order = cfg.supervise.order.clone();
    {
        services.send_replace(
            order
                .iter()
                .map(|k| ServiceStatus {
                    name: k.as_str().into(),
                    unit: cfg.services.unit(*k),
                    state: SvcState::Starting,
                    last_probe: None,
                    last_probe_at: None,
                    consecutive_failures: 0,
                    restarts: 0,
                    last_restart_at: None,
                    note: "waiting for its turn in the start order".into(),
                })
                .collect(),
        );
    }
    let api_kick = Arc::new(Notify::new());
    let mut watches: Vec<Watch> = order
        .iter()
        .map(|k| Watch {
            kind: *k,
            unit: cfg.services.unit(*k),
            probe: Probe::for_service(&cfg.services, *k),
            cfg: cfg.clone(),
            systemd: systemd.clone(),
            alerts: alerts.clone(),
            services: services.clone(),
            state: SvcState::Starting,
            failures: 0,
            restarts: VecDeque::new(),
            last_restart: None,
            backoff: cfg.supervise.restart_backoff.get(),
            kick: if *k == ServiceKind::Api { api_kick.clone() } else { Arc::new(Notify::new()) },
            dependents: if *k == ServiceKind::Postgres { vec![api_kick.clone()] } else { vec![] },
        })
        .collect();

    for w in watches.iter_mut() {
        if cancel.is_cancelled() {
            return;
        }
        w.start_in_order(&cancel).await;
        if w.kind == ServiceKind::Postgres && w.state == SvcState::Healthy && cfg.provision.enabled {
            match provision::provision(&PgTarget::new(&cfg.services.postgres), &cfg.provision, &cfg.secrets.env_dir)
                .await
            {
                Ok(r) if r.created.is_empty() => info!("provisioning: everything already exists"),
                Ok(r) => info!(created = ?r.created, "provisioning done"),
                Err(e) => {
                    error!("provisioning failed: {e}");
                    w.update(|s| s.note = format!("provisioning failed: {e}"));
                }
            }
        }
    }
    let mut set = tokio::task::JoinSet::new();
    for w in watches {
        set.spawn(w.run(cancel.clone()));
    }
    while let Some(res) = set.join_next().await {
        if let Err(e) = res {
            error!("a service watch ended abnormally: {e}");
        }
    }
}

/// One line for sd_notify STATUS=.
pub fn summary(services: &[ServiceStatus]) -> String {
    services
        .iter()
        .map(|s| {
            let state =
                serde_json::to_value(s.state).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
            format!("{} {}", s.name, state)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::SvcState::*;

    #[test]
    fn transitions() {
        assert!(Healthy.can_become(Degraded));
        assert!(Degraded.can_become(Restarting));
        assert!(Restarting.can_become(Starting));
        assert!(Starting.can_become(Healthy));
        assert!(Degraded.can_become(Failed));
        assert!(Failed.can_become(Healthy));
        assert!(!Failed.can_become(Restarting), "a failed service is not restarted again");
        assert!(!Healthy.can_become(Starting));
    }
}
