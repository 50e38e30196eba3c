//! caretaker: looks after a single-box production stack — PostgreSQL, Redis and an HTTP API on one
//! EC2 instance. It boots the box (data volume, secrets), supervises the services through systemd,
//! backs up to S3, and updates or restores on request through its own D-Bus interface.

/// AWS clients (IMDS, SSM, S3, SES), each behind its own error type.
pub mod aws;
/// Backups to S3 and their verification.
pub mod backup;
/// Boot: the data volume and secrets.
pub mod boot;
/// The command line (clap definitions; also used to generate the man page).
pub mod cli;
/// Layered TOML configuration with positioned errors.
pub mod config;
/// The daemon's own D-Bus interface and its client.
pub mod control;
/// `caretaker daemon`: lifecycle, main loop, watchdog.
pub mod daemon;
/// `caretaker doctor`: one line per check of everything the box depends on.
pub mod doctor;
/// Exit codes shared by every command.
pub mod exit;
/// Atomic file writes.
pub mod fsutil;
/// A small HTTP/1.1 client for IMDS and health probes.
pub mod http;
/// tracing to journald or stderr.
pub mod logging;
/// Migration from an external PostgreSQL: copy, prove equal, then swap.
pub mod migrate;
/// Incidents and alert emails.
pub mod notify;
/// PostgreSQL access as the database's OS user (peer authentication).
pub mod pg;
/// Releases of the API: fetch, verify, switch, health gate, roll back.
pub mod release;
/// Restores from backups: load into something new, verify, then swap.
pub mod restore;
/// Supervision of postgres, redis and the API.
pub mod supervise;
/// systemd integration (sd_notify).
pub mod systemd;

/// caretaker's version, as reported over D-Bus and by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
