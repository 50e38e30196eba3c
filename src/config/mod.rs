//! Configuration: `/etc/caretaker/caretaker.toml`, then drop-ins from `/etc/caretaker/caretaker.d/*.toml`
//! and `/run/caretaker/caretaker.d/*.toml`, merged in that order (later files win, tables merge key by
//! key, arrays are replaced whole). Keys are kebab-case; unknown keys and wrong types are rejected with
//! the file, line and column. Every field has a default: the defaults are the Zmanim profile.
//!
//! Loading has three stages: each file is parsed and type-checked on its own (so an error points into
//! the file that holds it), the files are merged as TOML values while remembering which file set each
//! key, and the merged value is checked as a whole (cross-field rules), naming the file of the key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod load;
mod redact;
mod services;
mod validate;

pub use load::{ConfigError, Loaded, Sources, load};
pub use redact::{redact_url_password, redacted, without_nulls};
pub use services::*;
pub use validate::parse_public_key;

/// The main file read when no `--config` is given.
pub const MAIN_FILE: &str = "/etc/caretaker/caretaker.toml";
/// Drop-in folders, merged in this order after the main file.
pub const DROPIN_DIRS: &[&str] = &["/etc/caretaker/caretaker.d", "/run/caretaker/caretaker.d"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub aws: AwsConfig,
    pub volume: VolumeConfig,
    pub services: ServicesConfig,
    pub secrets: SecretsConfig,
    pub notify: NotifyConfig,
    pub supervise: SuperviseConfig,
    pub provision: ProvisionConfig,
    pub backup: BackupConfig,
    pub release: ReleaseConfig,
    pub metrics: MetricsConfig,
    pub recovery: RecoveryConfig,
    pub jobs: JobsConfig,
}

/// The daemon itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct DaemonConfig {
    /// Log level (error, warn, info, debug, trace); `CARETAKER_LOG` overrides it.
    pub log_level: LogLevel,
    /// D-Bus address of the bus to own our name on and to reach systemd through. Unset: the system
    /// bus (or `DBUS_SYSTEM_BUS_ADDRESS`).
    pub bus_address: Option<String>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig { log_level: LogLevel::Info, bus_address: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// Where AWS is. Every endpoint can be pointed elsewhere (tests use moto and an IMDS fake).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct AwsConfig {
    /// Region; unset means: ask IMDS.
    pub region: Option<String>,
    /// Base URL of the instance metadata service (IMDSv2 only; never v1).
    pub imds_endpoint: String,
    /// Upper bound for all IMDS work of one command, retries included (IMDS can lag early in boot).
    pub imds_deadline: Seconds,
    pub s3_endpoint: Option<String>,
    pub ssm_endpoint: Option<String>,
    pub ses_endpoint: Option<String>,
    pub cloudwatch_endpoint: Option<String>,
}

impl Default for AwsConfig {
    fn default() -> Self {
        AwsConfig {
            region: None,
            imds_endpoint: "http://169.254.169.254".into(),
            imds_deadline: Seconds::from_secs(60),
            s3_endpoint: None,
            ssm_endpoint: None,
            ses_endpoint: None,
            cloudwatch_endpoint: None,
        }
    }
}

/// The EBS data volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct VolumeConfig {
    /// Which device holds the data: an EBS volume id (`vol-0abc…`), the device name asked for at
    /// attach time (`/dev/sdf` or `sdf`), or a device path (`/dev/nvme1n1`, `/dev/loop3`).
    pub device: VolumeSelector,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Filesystem made on a blank volume (a volume with any signature is never formatted).
    pub filesystem: Filesystem,
    pub mount_options: String,
    /// How long to wait for a volume that is attached late.
    pub attach_timeout: Seconds,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            device: VolumeSelector::DeviceName("sdf".into()),
            mount_point: "/data".into(),
            filesystem: Filesystem::Xfs,
            mount_options: "defaults,noatime".into(),
            attach_timeout: Seconds::from_secs(120),
        }
    }
}

/// How the data volume is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSelector {
    /// `vol-0123456789abcdef0`: matched against the NVMe serial of EBS devices.
    VolumeId(String),
    /// `sdf`: the block-device name requested at attach time, as EBS reports it in the NVMe vendor data.
    DeviceName(String),
    /// An explicit path (non-Nitro hosts, loop devices in the lab).
    Path(PathBuf),
}

impl VolumeSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(hex) = s.strip_prefix("vol-") {
            if (hex.len() == 8 || hex.len() == 17) && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(VolumeSelector::VolumeId(s.to_ascii_lowercase()));
            }
            return Err(format!("`{s}` looks like a volume id but is not `vol-` and 8 or 17 hex digits"));
        }
        let short = s.strip_prefix("/dev/").unwrap_or(s);
        let is_attach_name = |n: &str| {
            let (prefix, rest) = if let Some(r) = n.strip_prefix("xvd") {
                ("xvd", r)
            } else if let Some(r) = n.strip_prefix("sd") {
                ("sd", r)
            } else {
                return false;
            };
            !prefix.is_empty() && (1..=2).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_lowercase())
        };
        if is_attach_name(short) {
            return Ok(VolumeSelector::DeviceName(short.to_string()));
        }
        if s.starts_with("/dev/") && s.len() > 5 && !s.contains("..") {
            return Ok(VolumeSelector::Path(PathBuf::from(s)));
        }
        Err(format!("`{s}` is not a volume id (vol-…), an attach-time device name (sdf, /dev/xvdg) or a /dev/ path"))
    }
}

impl fmt::Display for VolumeSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VolumeSelector::VolumeId(v) => f.write_str(v),
            VolumeSelector::DeviceName(n) => write!(f, "/dev/{n}"),
            VolumeSelector::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Serialize for VolumeSelector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VolumeSelector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        VolumeSelector::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    Xfs,
    Ext4,
}

/// Backups to S3.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct BackupConfig {
    /// The bucket; unset disables backups.
    pub bucket: Option<String>,
    /// Key prefix: objects live at `PREFIX/KIND/YYYY/MM/DD/ID/`.
    pub prefix: String,
    /// The PostgreSQL database dumped.
    pub database: String,
    pub zstd_level: i32,
    /// Bytes per uploaded part at the start (grows for very large streams; at least 5 MiB).
    pub part_size: u64,
    /// Parts uploaded at once; the stream holds at most part-size × (parts-in-flight + 2) bytes.
    pub parts_in_flight: usize,
    /// age X25519 recipients (`age1…`). When empty, the passphrase below is used.
    pub recipients: Vec<String>,
    /// The env file (a `[[secrets.file]]` name) and variable holding the backup passphrase.
    pub passphrase_file: String,
    pub passphrase_var: String,
    /// With recipients: the variable of that env file holding the matching age identity
    /// (`AGE-SECRET-KEY-1…`), needed to verify and restore. Without it backups are still taken.
    pub identity_var: String,
    /// The variable of that env file holding the key that seals manifests and drill reports
    /// (at least 32 characters, e.g. `openssl rand -hex 32`). Optional: without it the key is
    /// derived from the age identity or the passphrase. A box that holds only the public recipient
    /// needs it to take backups.
    pub seal_key_var: String,
    /// Retention: the newest backup of each of the last N days, and of each of the last M weeks.
    /// The newest backup and the newest verified backup are always kept.
    pub keep_daily: usize,
    pub keep_weekly: usize,
    /// When postgres and redis are backed up (UTC calendar expression, e.g. "03:00", "Mon..Fri
    /// 02:30", "0,12:00"), or "off". A run missed while the box was off runs soon after start.
    pub schedule: String,
    /// When the newest backups get their restore drill, or "off".
    pub verify_schedule: String,
    /// Each scheduled run waits a random delay up to this (spreads many boxes' load).
    pub random_delay: Seconds,
    /// A run missed while the daemon was not running starts this long after the daemon does
    /// (the services settle first).
    pub catch_up_delay: Seconds,
    /// Free space a restore, drill or migration always leaves to the live cluster on the
    /// filesystem of PostgreSQL's data (bytes; at least 5 % of that filesystem is kept whatever
    /// this says). A restore that would need more is refused up front; one that gets this close
    /// while it runs is aborted and its new database dropped.
    pub restore_reserve: u64,
    /// Point-in-time recovery: archive every WAL segment to `PREFIX/wal/` (PostgreSQL's
    /// archive_command, set by caretaker), take base backups beside the dumps on `schedule`, and
    /// allow `caretaker restore postgres --to-time`.
    pub wal_archive: bool,
    /// PostgreSQL's archive_timeout: a segment is closed and archived at least this often while
    /// anything is written (the recovery point objective).
    pub archive_timeout: Seconds,
    /// The socket archive_command and restore_command talk to.
    pub wal_socket: PathBuf,
    /// Alert when this many segments wait to be archived, or when the newest archived one is
    /// older than `wal-lag-alert` while PostgreSQL writes.
    pub wal_backlog_alert: usize,
    pub wal_lag_alert: Seconds,
    /// How often the WAL chain from the newest base backup is listed and checked for gaps (the
    /// PITR window in `caretaker status` comes from this check).
    pub wal_check_interval: Seconds,
    /// The WAL tip: while archiving, the daemon streams the unfinished segment from PostgreSQL
    /// (replication protocol, no slot) and stores its new bytes in S3 every `wal-tip-interval`,
    /// so a lost box loses seconds of commits, not up to `archive-timeout`.
    pub wal_tip: bool,
    pub wal_tip_interval: Seconds,
    /// Alert when commits older than this are not yet in S3 (the live RPO), or when the tip
    /// cannot stream that long while PostgreSQL runs.
    pub wal_tip_lag_alert: Seconds,
    /// While archiving, a restore point with the exact row counts it holds is recorded this often
    /// (`PREFIX/restore-points/`); a base backup's drill also records one and checks the replayed
    /// cluster against the newest inside its WAL.
    pub restore_point_interval: Seconds,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            bucket: None,
            prefix: "caretaker".into(),
            database: "zmanim".into(),
            zstd_level: 3,
            part_size: 6 << 20,
            parts_in_flight: 2,
            recipients: vec![],
            passphrase_file: "caretaker".into(),
            passphrase_var: "BACKUP_PASSPHRASE".into(),
            identity_var: "BACKUP_AGE_IDENTITY".into(),
            seal_key_var: "BACKUP_SEAL_KEY".into(),
            keep_daily: 7,
            keep_weekly: 4,
            schedule: "03:00".into(),
            verify_schedule: "Sun 04:00".into(),
            random_delay: Seconds::from_secs(0),
            catch_up_delay: Seconds::from_secs(120),
            restore_reserve: 256 << 20,
            wal_archive: true,
            archive_timeout: Seconds::from_secs(60),
            wal_socket: "/run/caretaker/wal.sock".into(),
            wal_backlog_alert: 16,
            wal_lag_alert: Seconds::from_secs(300),
            wal_check_interval: Seconds::from_secs(3600),
            wal_tip: true,
            wal_tip_interval: Seconds::from_secs(1),
            wal_tip_lag_alert: Seconds::from_secs(60),
            restore_point_interval: Seconds::from_secs(3600),
        }
    }
}

/// Releases of the API: where `caretaker update` fetches them and how it checks them.
/// Layout in the bucket: `APP/VERSION/ARTIFACT`, `APP/VERSION/SHA256SUMS` (sha256sum lines),
/// optionally `APP/VERSION/SHA256SUMS.sig`, and `APP/LATEST` holding the newest version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ReleaseConfig {
    /// The releases bucket; unset disables updates.
    pub bucket: Option<String>,
    /// First key component: the application's folder in the bucket.
    pub app: String,
    /// The executable's file name, in the bucket and under `services.api.install-dir/releases/VERSION/`.
    pub artifact: String,
    /// Ed25519 public key, 64 hex digits (the raw 32-byte key). When set, a release is installed only
    /// with a valid `SHA256SUMS.sig` (the raw 64-byte signature, or it in hex) over `SHA256SUMS`.
    pub public_key: Option<String>,
    /// Releases kept on disk after a successful update; the current and the previous one are kept
    /// whatever this says.
    pub keep: usize,
    /// The health gate after a switch: this many consecutive healthy probes ...
    pub health_gate_consecutive: u32,
    /// ... within this long, or the update is rolled back.
    pub health_gate_timeout: Seconds,
    /// The largest artifact downloaded (bytes): a bigger one is refused before it is fetched (when
    /// S3 says its size) or as soon as the download passes this.
    pub max_artifact_bytes: u64,
}

impl Default for ReleaseConfig {
    fn default() -> Self {
        ReleaseConfig {
            bucket: None,
            app: "zmanim-api".into(),
            artifact: "zmanim-api".into(),
            public_key: None,
            keep: 3,
            health_gate_consecutive: 3,
            health_gate_timeout: Seconds::from_secs(60),
            max_artifact_bytes: 512 << 20,
        }
    }
}

/// Alert emails through SES.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct NotifyConfig {
    /// Verified SES sender; unset disables email (alerts are still logged and shown in status).
    pub sender: Option<String>,
    pub recipients: Vec<String>,
    /// At most this many emails per hour; more are logged, not sent.
    pub max_per_hour: u32,
    /// Start of every subject line.
    pub subject_prefix: String,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig { sender: None, recipients: vec![], max_per_hour: 12, subject_prefix: "[caretaker]".into() }
    }
}

/// What firstboot does with a blank data volume while backups may exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnBlankVolume {
    /// Restore the newest backup before anything starts (when `backup.bucket` is set).
    RestoreLatest,
    /// Start with an empty database (initdb), as a box without backups does.
    Empty,
    /// Stop: nothing starts until an operator decides.
    Refuse,
}

/// How caretaker's heavy work shares the box's CPU with PostgreSQL's foreground work and the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct JobsConfig {
    /// The nice value (0–19) of the producers a backup starts (pg_dump) and of the PostgreSQL
    /// backend that serves pg_dump: under contention they yield the CPU to the API's queries;
    /// on an idle box they run at full speed. 0 turns it off. The daemon's own session
    /// (its autogroup: how the kernel shares the CPU between sessions outside cgroup weights)
    /// runs at this nice value too.
    pub nice: i32,
    /// `SCHED_IDLE` for the same processes (pg_dump, pg_restore, pg_basebackup and the PostgreSQL
    /// backends serving them) and for the daemon's encoder/decoder thread of a backup or drill:
    /// they run only when nothing else wants the CPU, and a waking API request or query
    /// preempts them at once instead of waiting out their time slice.
    pub sched_idle: bool,
    /// caretaker.service's `CPUWeight=` (1–10000; systemd's default is 100), set by the daemon at
    /// start and on reload: the share of a contended CPU its work (compression, encryption,
    /// pg_dump, WAL archiving) gets beside PostgreSQL's and the API's 100 each.
    pub cpu_weight: u64,
    /// caretaker.service's `IOWeight=` (1–10000; default 100): effective only where the data
    /// volume's scheduler weighs IO (BFQ, or the io.cost controller); EC2 NVMe volumes use none.
    pub io_weight: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        // 10 of 100: the share nice 10 gives beside nice 0 (110 of 1024).
        JobsConfig { nice: 10, sched_idle: true, cpu_weight: 10, io_weight: 10 }
    }
}

impl JobsConfig {
    /// The priority of a job's heavy processes and threads.
    pub fn priority(&self) -> crate::priority::Priority {
        crate::priority::Priority { nice: self.nice, idle: self.sched_idle }
    }
}

/// Recovery at boot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RecoveryConfig {
    /// A volume formatted by this boot (or one never holding a cluster) with an empty PostgreSQL
    /// data directory: `restore-latest`, `empty` or `refuse`.
    pub on_blank_volume: OnBlankVolume,
    /// While S3 cannot be read, firstboot retries with a backoff up to this (it never starts an
    /// empty database meanwhile).
    pub retry_max: Seconds,
    /// The backup prefix's lease (one writer per prefix): an instance that has not renewed it for
    /// this long is taken to be gone. The daemon renews it every third of it.
    pub lease_ttl: Seconds,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            on_blank_volume: OnBlankVolume::RestoreLatest,
            retry_max: Seconds::from_secs(300),
            lease_ttl: Seconds::from_secs(300),
        }
    }
}

/// CloudWatch metrics (the dead man's switch: alarms in CloudWatch fire when they stop coming).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct MetricsConfig {
    /// Publish metrics (off: nothing is sent, and `caretaker doctor` says that nobody would hear
    /// of a dead box).
    pub enabled: bool,
    /// How often a sample is taken and published (CloudWatch's standard resolution is a minute).
    pub interval: Seconds,
    /// The CloudWatch namespace.
    pub namespace: String,
    /// The `Deployment` dimension, which the alarms watch; unset: `backup.prefix`. It outlives the
    /// instance (a replaced instance keeps its deployment's alarms).
    pub deployment: Option<String>,
    /// Samples kept while CloudWatch cannot be reached (at one per interval: 360 is 6 hours at
    /// 60 s); older ones are dropped, and counted.
    pub max_queued: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: false,
            interval: Seconds::from_secs(60),
            namespace: "Caretaker".into(),
            deployment: None,
            max_queued: 360,
        }
    }
}

impl Config {
    /// The `Deployment` dimension of the metrics.
    pub fn deployment(&self) -> String {
        self.metrics.deployment.clone().unwrap_or_else(|| self.backup.prefix.clone())
    }
}

/// A duration written as `30s`, `5m`, `1h 30m` or a plain number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(pub Duration);

impl Seconds {
    pub const fn from_secs(s: u64) -> Self {
        Seconds(Duration::from_secs(s))
    }
    pub fn get(self) -> Duration {
        self.0
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a duration such as \"30s\", \"5m\" or a number of seconds")
        })? {
            Raw::Int(n) => Ok(Seconds::from_secs(n)),
            Raw::Text(t) => humantime::parse_duration(&t).map(Seconds).map_err(|e| {
                serde::de::Error::custom(format!("`{t}` is not a duration ({e}); write e.g. \"30s\" or \"5m\""))
            }),
        }
    }
}

#[cfg(test)]
mod tests;
