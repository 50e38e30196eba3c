//! sd_notify, in-process (never a forked `systemd-notify`, whose PID systemd may not attribute to
//! us). Every call is a no-op when we were not started by systemd with `NOTIFY_SOCKET`.

use std::time::Duration;

use sd_notify::NotifyState;

/// Talks to the service manager that started us, if any.
#[derive(Debug, Clone)]
pub struct Notifier {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID` from the environment.
    pub fn from_env() -> Self {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let mut usec = 0u64;
        let watchdog = if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
            Some(Duration::from_micros(usec))
        } else {
            None
        };
        Notifier { enabled, watchdog }
    }

    /// How often to ping: half the watchdog timeout, as sd_watchdog_enabled(3) recommends.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        if self.watchdog.is_some() {
            self.send(&[NotifyState::Watchdog]);
        }
    }

    pub fn reloading(&self) {
        self.send(&[NotifyState::Reloading]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!("sd_notify failed: {e}");
        }
    }
}
