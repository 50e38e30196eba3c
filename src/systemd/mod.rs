//! systemd integration.

/// systemd's manager over D-Bus: jobs and unit state.
pub mod manager;
/// sd_notify: READY, STATUS, WATCHDOG, STOPPING.
pub mod notify;
