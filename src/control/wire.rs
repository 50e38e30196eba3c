//! What crosses the bus: the types the daemon serializes and the CLI reads back.

use serde::{Deserialize, Serialize};

pub use crate::supervise::supervisor::ServiceStatus;

/// What the daemon tells anyone who asks. Kept small and cheap to clone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DaemonStatus {
    pub state: String,
    pub version: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub config_files: Vec<String>,
    /// The last reload's outcome ("" before the first reload).
    pub last_reload: String,
    /// The supervised services, in start order (empty when supervision is off).
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// Open incidents (each sent one email when it started).
    #[serde(default)]
    pub incidents: Vec<crate::notify::Incident>,
    /// The running job, if any.
    #[serde(default)]
    pub current_job: Option<JobInfo>,
    /// Finished jobs, newest last.
    #[serde(default)]
    pub recent_jobs: Vec<JobInfo>,
    /// The backup schedule: next and last runs (none when backups are not configured).
    #[serde(default)]
    pub schedule: Option<ScheduleStatus>,
    /// WAL archiving and the point-in-time recovery window (none when off).
    #[serde(default)]
    pub wal: Option<crate::backup::wal::monitor::WalStatus>,
    /// The WAL tip: the live RPO (none when the tip is off).
    #[serde(default)]
    pub wal_tip: Option<crate::backup::wal::tip::TipStatus>,
    /// CloudWatch metrics publishing (none when off).
    #[serde(default)]
    pub metrics: Option<crate::metrics::MetricsStatus>,
}

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

/// What status shows about the schedule (times in RFC 3339, UTC).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleStatus {
    pub backup_schedule: String,
    pub verify_schedule: String,
    pub next_backup: Option<String>,
    pub next_verify: Option<String>,
    pub last_backup: Option<String>,
    pub last_backup_ok: Option<bool>,
    pub last_verify: Option<String>,
    pub last_verify_ok: Option<bool>,
}
