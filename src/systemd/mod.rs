//! systemd integration.

/// sd_notify: READY, STATUS, WATCHDOG, STOPPING.
pub mod notify;
