//! caretaker: looks after a single-box production stack — PostgreSQL, Redis and an HTTP API on one
//! EC2 instance. It boots the box (data volume, secrets), supervises the services through systemd,
//! backs up to S3, and updates or restores on request through its own D-Bus interface.
//!
//! Three floors; a module imports only from its own floor's shared pieces or from below
//! (`../shared/tools/import-cycles src` finds no cycle):
//!
//! - **top**: [`cli`] and `main.rs`, [`daemon`] (lifecycle; the one place that builds the shared
//!   handles), [`control`] (the D-Bus interface, its client, the job table, the job bodies, the
//!   schedule), [`doctor`].
//! - **capabilities**: [`boot`], [`backup`], [`release`], [`supervise`]. None imports the control
//!   plane or another capability.
//! - **adapters**: [`aws`], [`systemd`], [`pg`], [`http`], [`config`], [`health`],
//!   [`maintenance`], [`notify`], [`replication`], [`calendar`], [`envfile`], [`fsutil`], [`mountinfo`], [`units`],
//!   [`logging`], [`exit`]. None imports a floor above.

// ---- top
/// The command line (clap definitions; also used to generate the man page).
pub mod cli;
/// The daemon's own D-Bus interface, its client, the job table, the job bodies and the schedule.
pub mod control;
/// `caretaker daemon`: lifecycle, main loop, watchdog; builds the shared handles.
pub mod daemon;
/// `caretaker doctor`: one line per check of everything the box depends on.
pub mod doctor;

// ---- capabilities
/// Backups to S3, their verification, restores, migration and swaps.
pub mod backup;
/// Boot: the data volume and secrets.
pub mod boot;
/// CloudWatch metrics: samples of the box, published with a bounded queue and backoff.
pub mod metrics;
/// Releases of the API: fetch, verify, switch, health gate, roll back.
pub mod release;
/// Supervision of postgres, redis and the API.
pub mod supervise;

// ---- adapters
/// AWS clients (IMDS, SSM, S3, SES, CloudWatch) and the one region resolver; the only users of the SDK.
pub mod aws;
/// Calendar expressions (a subset of systemd's `OnCalendar=`) and random delays.
pub mod calendar;
/// Layered TOML configuration with positioned errors.
pub mod config;
/// The env-file format (the one reader and writer), and caretaker's own folders.
pub mod envfile;
/// Exit codes shared by every command.
pub mod exit;
/// Atomic file writes.
pub mod fsutil;
/// Health probes of the services and the health gate.
pub mod health;
/// A small HTTP/1.1 client for IMDS and health probes.
pub mod http;
/// tracing to journald or stderr.
pub mod logging;
/// Holds that pause supervision of a unit while a job works on it.
pub mod maintenance;
/// /proc/self/mountinfo, parsed.
pub mod mountinfo;
/// Incidents and alert emails.
pub mod notify;
/// Clean code pages that start-up touched, given back to the kernel.
pub mod pageout;
/// PostgreSQL access as the database's OS user (peer authentication).
pub mod pg;
/// CPU priority for caretaker's heavy work.
pub mod priority;
/// PostgreSQL's physical streaming replication protocol, client side (the WAL tip).
pub mod replication;
/// SCRAM-SHA-256 password verifiers (a password never reaches PostgreSQL).
pub mod scram;
/// systemd integration (sd_notify, the manager over D-Bus).
pub mod systemd;
/// Bytes, rates and times as people read them.
pub mod units;

/// caretaker's version, as reported over D-Bus and by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
