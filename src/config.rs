//! Configuration: `/etc/caretaker/caretaker.toml`, then drop-ins from `/etc/caretaker/caretaker.d/*.toml`
//! and `/run/caretaker/caretaker.d/*.toml`, merged in that order (later files win, tables merge key by
//! key, arrays are replaced whole). Keys are kebab-case; unknown keys and wrong types are rejected with
//! the file, line and column. Every field has a default: the defaults are the Zmanim profile.
//!
//! Loading has three stages: each file is parsed and type-checked on its own (so an error points into
//! the file that holds it), the files are merged as TOML values while remembering which file set each
//! key, and the merged value is checked as a whole (cross-field rules), naming the file of the key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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

/// The supervised services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServicesConfig {
    pub postgres: PostgresService,
    pub redis: RedisService,
    pub api: ApiService,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct PostgresService {
    pub unit: UnitName,
    /// Folder of the server's unix socket.
    pub socket_dir: PathBuf,
    pub port: u16,
    /// Data directory; initialised with `initdb` at boot when empty, never touched otherwise
    /// (beyond fixing its owner).
    pub data_dir: PathBuf,
    /// The system user the server runs as.
    pub user: String,
    /// `initdb` to run for an empty data directory.
    pub initdb: PathBuf,
    /// Arguments for initdb besides `-D DIR`.
    pub initdb_args: Vec<String>,
}

impl Default for PostgresService {
    fn default() -> Self {
        PostgresService {
            unit: UnitName("postgresql.service".into()),
            socket_dir: "/run/postgresql".into(),
            port: 5432,
            data_dir: "/data/postgres".into(),
            user: "postgres".into(),
            initdb: "/usr/bin/initdb".into(),
            initdb_args: ["--encoding=UTF8", "--locale=C.UTF-8", "--auth-local=peer", "--auth-host=scram-sha-256"]
                .map(String::from)
                .to_vec(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RedisService {
    pub unit: UnitName,
    /// `redis://…` or `unix://…` URL of the server.
    pub url: String,
    pub data_dir: PathBuf,
    /// The system user the server runs as.
    pub user: String,
}

impl Default for RedisService {
    fn default() -> Self {
        RedisService {
            unit: UnitName("redis.service".into()),
            url: "redis://127.0.0.1:6379".into(),
            data_dir: "/data/redis".into(),
            user: "redis".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ApiService {
    pub unit: UnitName,
    /// Health endpoint, probed with GET; 200 means healthy.
    pub health_url: String,
    /// With `health-json-value`: a field of the health answer's JSON (dots for nesting) that must
    /// hold that value, e.g. `status` = `ok`.
    pub health_json_field: Option<String>,
    pub health_json_value: Option<String>,
    /// Where releases live: `releases/VERSION/` and the `current` symlink.
    pub install_dir: PathBuf,
}

impl Default for ApiService {
    fn default() -> Self {
        ApiService {
            unit: UnitName("zmanim-api.service".into()),
            health_url: "http://127.0.0.1:8080/health".into(),
            health_json_field: None,
            health_json_value: None,
            install_dir: "/opt/zmanim".into(),
        }
    }
}

/// A systemd unit name, checked for shape on load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct UnitName(pub String);

impl UnitName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UnitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for UnitName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let suffix_ok = [".service", ".socket", ".target", ".mount", ".timer"].iter().any(|x| s.ends_with(x));
        let chars_ok = s.bytes().all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b));
        if s.len() > 255 || !suffix_ok || !chars_ok || s.starts_with('.') {
            return Err(serde::de::Error::custom(format!(
                "`{s}` is not a systemd unit name (expected something like `zmanim-api.service`)"
            )));
        }
        Ok(UnitName(s))
    }
}

/// Secrets from SSM Parameter Store, written at boot into env files for the services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct SecretsConfig {
    /// The parameter path read (recursively, with decryption) at boot.
    pub ssm_path: String,
    /// Where env files are written (on /run: never on disk).
    pub env_dir: PathBuf,
    /// One env file per entry: `ENV_DIR/NAME.env`.
    #[serde(rename = "file")]
    pub files: Vec<EnvFileConfig>,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        SecretsConfig {
            ssm_path: "/zmanim/prod/".into(),
            env_dir: "/run/caretaker/env".into(),
            files: vec![EnvFileConfig {
                name: "zmanim-api".into(),
                group: None,
                vars: BTreeMap::from([
                    ("CLERK_SECRET_KEY".to_string(), "clerk-secret-key".to_string()),
                    ("DB_PASSWORD".to_string(), "db-password".to_string()),
                ]),
                templates: BTreeMap::from([(
                    "DATABASE_URL".to_string(),
                    "postgres://zmanim:{db-password}@127.0.0.1:5432/zmanim".to_string(),
                )]),
                expand: vec!["config".into()],
                optional: vec![],
            }],
        }
    }
}

/// One env file. Parameter names are relative to `secrets.ssm-path` (`clerk-secret-key` is
/// `/zmanim/prod/clerk-secret-key`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct EnvFileConfig {
    /// File name without `.env`, usually the service's name.
    pub name: String,
    /// When set, the file is mode 0640 and owned by this group (for a service not running as
    /// root); otherwise 0600 root.
    pub group: Option<String>,
    /// `ENV_KEY = "parameter-name"`: one parameter, one variable.
    pub vars: BTreeMap<String, String>,
    /// `ENV_KEY = "text with {parameter-name} placeholders"`: composed values.
    pub templates: BTreeMap<String, String>,
    /// Parameters whose value is `KEY=VALUE` lines or a JSON object, expanded into one variable each.
    pub expand: Vec<String>,
    /// Parameters (from vars, templates or expand) that may be missing; every other one is required.
    pub optional: Vec<String>,
}

/// How the daemon watches the services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct SuperviseConfig {
    /// Supervise at all (false: the daemon only answers the control plane).
    pub enabled: bool,
    /// Start order at daemon start; each is waited for until healthy before the next.
    pub order: Vec<ServiceKind>,
    pub probe_interval: Seconds,
    pub probe_timeout: Seconds,
    /// Consecutive failed probes before a restart.
    pub failures_before_restart: u32,
    /// Restarts allowed within `restart-window`; one more and the service is Failed (an email
    /// goes out and caretaker stops restarting it until it is healthy again).
    pub max_restarts: u32,
    pub restart_window: Seconds,
    /// Wait after a restart before the next one, doubled each time up to `restart-backoff-max`.
    pub restart_backoff: Seconds,
    pub restart_backoff_max: Seconds,
    /// How long a unit may take to become healthy after start or restart.
    pub start_timeout: Seconds,
}

impl Default for SuperviseConfig {
    fn default() -> Self {
        SuperviseConfig {
            enabled: true,
            order: vec![ServiceKind::Postgres, ServiceKind::Redis, ServiceKind::Api],
            probe_interval: Seconds::from_secs(10),
            probe_timeout: Seconds::from_secs(5),
            failures_before_restart: 2,
            max_restarts: 3,
            restart_window: Seconds::from_secs(600),
            restart_backoff: Seconds::from_secs(5),
            restart_backoff_max: Seconds::from_secs(300),
            start_timeout: Seconds::from_secs(120),
        }
    }
}

/// The three supervised services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    Postgres,
    Redis,
    Api,
}

impl ServiceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Postgres => "postgres",
            ServiceKind::Redis => "redis",
            ServiceKind::Api => "api",
        }
    }
}

/// What is created in PostgreSQL once it is healthy, if missing. Nothing that exists is ever
/// altered or dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ProvisionConfig {
    pub enabled: bool,
    /// The application's login role.
    pub role: String,
    /// Its database (owned by the role).
    pub database: String,
    /// The env file (a `[[secrets.file]]` name) and variable holding the role's password.
    pub password_file: String,
    pub password_var: String,
    /// Extensions created in the database.
    pub extensions: Vec<String>,
}

impl Default for ProvisionConfig {
    fn default() -> Self {
        ProvisionConfig {
            enabled: true,
            role: "zmanim".into(),
            database: "zmanim".into(),
            password_file: "zmanim-api".into(),
            password_var: "DB_PASSWORD".into(),
            extensions: vec!["postgis".into()],
        }
    }
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
            keep_daily: 7,
            keep_weekly: 4,
            schedule: "03:00".into(),
            verify_schedule: "Sun 04:00".into(),
            random_delay: Seconds::from_secs(0),
            catch_up_delay: Seconds::from_secs(120),
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

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub main: PathBuf,
    /// A missing main file is fine for the system path (defaults apply), an error for `--config`.
    pub main_required: bool,
    pub dropin_dirs: Vec<PathBuf>,
}

impl Sources {
    /// The system layout: main file plus both drop-in folders.
    pub fn system() -> Self {
        Sources {
            main: MAIN_FILE.into(),
            main_required: false,
            dropin_dirs: DROPIN_DIRS.iter().map(PathBuf::from).collect(),
        }
    }

    /// One explicit file and nothing else (`--config PATH`).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Sources { main: path.into(), main_required: true, dropin_dirs: vec![] }
    }

    /// `--config PATH` when given, else the system layout.
    pub fn from_arg(path: Option<&Path>) -> Self {
        match path {
            Some(p) => Sources::file(p),
            None => Sources::system(),
        }
    }

    /// The files to read, in merge order. Drop-ins are sorted by file name across both folders
    /// with `/run` winning over `/etc` for the same name (as systemd does).
    pub fn files(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let mut files = Vec::new();
        if self.main.exists() || self.main_required {
            files.push(self.main.clone());
        }
        let mut by_name: BTreeMap<std::ffi::OsString, PathBuf> = BTreeMap::new();
        for dir in &self.dropin_dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(ConfigError::Read { path: dir.clone(), source }),
            };
            for entry in entries {
                let entry = entry.map_err(|source| ConfigError::Read { path: dir.clone(), source })?;
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                    by_name.insert(entry.file_name(), path);
                }
            }
        }
        files.extend(by_name.into_values());
        Ok(files)
    }
}

/// A configuration error, always naming the file and, where there is one, the line, column and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}:{column}: {}{message}", path.display(), key_prefix(key))]
    Parse { path: PathBuf, line: usize, column: usize, key: Option<String>, message: String },
    #[error("{}: key `{key}`: {message}", origin.display())]
    Invalid { origin: PathBuf, key: String, message: String },
}

fn key_prefix(key: &Option<String>) -> String {
    match key {
        Some(k) if !k.is_empty() && k != "." => format!("key `{k}`: "),
        _ => String::new(),
    }
}

/// The merged, validated configuration and the files it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub files: Vec<PathBuf>,
}

/// Reads, merges and validates the configuration from `sources`.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let files = sources.files()?;
    let mut merged = toml::Table::new();
    let mut origins: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in &files {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let table = parse_fragment(path, &text)?;
        merge(&mut merged, table, "", path, &mut origins);
    }
    let config: Config = toml::Value::Table(merged).try_into().map_err(|e: toml::de::Error| ConfigError::Invalid {
        origin: files.last().cloned().unwrap_or_else(|| PathBuf::from("(defaults)")),
        key: ".".into(),
        message: e.message().to_string(),
    })?;
    validate(&config, &origins)?;
    Ok(Loaded { config, files })
}

/// Parses one file and checks it against the schema on its own, so that an error carries the
/// position in that file.
fn parse_fragment(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    let at = |span: Option<std::ops::Range<usize>>| -> (usize, usize) {
        let offset = span.map(|s| s.start).unwrap_or(0).min(text.len());
        let before = &text[..offset];
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
        (line, column)
    };
    let table: toml::Table = toml::from_str(text).map_err(|e: toml::de::Error| {
        let (line, column) = at(e.span());
        ConfigError::Parse { path: path.into(), line, column, key: None, message: e.message().trim().to_string() }
    })?;
    let de = toml::Deserializer::new(text);
    if let Err(e) = serde_path_to_error::deserialize::<_, Config>(de) {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let (line, column) = at(inner.span());
        return Err(ConfigError::Parse {
            path: path.into(),
            line,
            column,
            key: Some(key),
            message: inner.message().trim().to_string(),
        });
    }
    Ok(table)
}

/// Deep-merges `from` into `into`, recording which file set each leaf key.
fn merge(
    into: &mut toml::Table,
    from: toml::Table,
    prefix: &str,
    origin: &Path,
    origins: &mut BTreeMap<String, PathBuf>,
) {
    for (key, value) in from {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming)) => {
                merge(existing, incoming, &path, origin, origins);
            }
            (_, value) => {
                if let toml::Value::Table(t) = &value {
                    record_origins(t, &path, origin, origins);
                }
                origins.insert(path, origin.to_path_buf());
                into.insert(key, value);
            }
        }
    }
}

fn record_origins(table: &toml::Table, prefix: &str, origin: &Path, origins: &mut BTreeMap<String, PathBuf>) {
    for (key, value) in table {
        let path = format!("{prefix}.{key}");
        if let toml::Value::Table(t) = value {
            record_origins(t, &path, origin, origins);
        }
        origins.insert(path, origin.to_path_buf());
    }
}

/// Rules that span fields or need the merged picture.
fn validate(config: &Config, origins: &BTreeMap<String, PathBuf>) -> Result<(), ConfigError> {
    let fail = |key: &str, message: String| ConfigError::Invalid {
        origin: origins.get(key).cloned().unwrap_or_else(|| PathBuf::from("(defaults)")),
        key: key.to_string(),
        message,
    };
    let url_check = |key: &str, url: &str| -> Result<(), ConfigError> {
        match url.split_once("://") {
            Some(("http" | "https", rest)) if !rest.is_empty() && !rest.starts_with('/') => Ok(()),
            _ => Err(fail(key, format!("`{url}` is not an http:// or https:// URL"))),
        }
    };
    url_check("aws.imds-endpoint", &config.aws.imds_endpoint)?;
    for (key, value) in [
        ("aws.s3-endpoint", &config.aws.s3_endpoint),
        ("aws.ssm-endpoint", &config.aws.ssm_endpoint),
        ("aws.ses-endpoint", &config.aws.ses_endpoint),
    ] {
        if let Some(v) = value {
            url_check(key, v)?;
        }
    }
    if let Some(region) = &config.aws.region
        && (region.is_empty() || !region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    {
        return Err(fail("aws.region", format!("`{region}` is not a region name such as eu-west-1")));
    }
    if config.aws.imds_deadline.get() < Duration::from_secs(1) {
        return Err(fail("aws.imds-deadline", "must be at least 1s".into()));
    }
    url_check("services.api.health-url", &config.services.api.health_url)?;
    let redis = &config.services.redis.url;
    if !(redis.starts_with("redis://") || redis.starts_with("unix://") || redis.starts_with("rediss://")) {
        return Err(fail("services.redis.url", format!("`{redis}` is not a redis://, rediss:// or unix:// URL")));
    }
    if !config.volume.mount_point.is_absolute() || config.volume.mount_point == Path::new("/") {
        return Err(fail("volume.mount-point", "must be an absolute path other than /".into()));
    }
    let ssm = &config.secrets.ssm_path;
    if !ssm.starts_with('/') || !ssm.ends_with('/') {
        return Err(fail("secrets.ssm-path", format!("`{ssm}` must start and end with `/` (e.g. /zmanim/prod/)")));
    }
    if !config.secrets.env_dir.starts_with("/run") {
        return Err(fail("secrets.env-dir", "must be under /run (secrets are never written to disk)".into()));
    }
    let email_ok = |e: &str| {
        e.split_once('@').is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !e.contains(char::is_whitespace))
    };
    if let Some(sender) = &config.notify.sender
        && !email_ok(sender)
    {
        return Err(fail("notify.sender", format!("`{sender}` is not an email address")));
    }
    for r in &config.notify.recipients {
        if !email_ok(r) {
            return Err(fail("notify.recipients", format!("`{r}` is not an email address")));
        }
    }
    let sup = &config.supervise;
    if sup.probe_timeout >= sup.probe_interval {
        return Err(fail("supervise.probe-timeout", "must be shorter than supervise.probe-interval".into()));
    }
    if sup.failures_before_restart == 0 {
        return Err(fail("supervise.failures-before-restart", "must be at least 1".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    if !sup.order.iter().all(|k| seen.insert(*k)) {
        return Err(fail("supervise.order", "lists a service twice".into()));
    }
    if (config.services.api.health_json_field.is_some()) != (config.services.api.health_json_value.is_some()) {
        return Err(fail(
            "services.api.health-json-field",
            "set both health-json-field and health-json-value, or neither".into(),
        ));
    }
    let ident_ok = |s: &str| !s.is_empty() && s.len() < 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    for (key, v) in [("provision.role", &config.provision.role), ("provision.database", &config.provision.database)] {
        if !ident_ok(v) {
            return Err(fail(key, format!("`{v}` must be letters, digits and _ (at most 63)")));
        }
    }
    for e in &config.provision.extensions {
        if !ident_ok(&e.replace('-', "_")) {
            return Err(fail("provision.extensions", format!("`{e}` is not an extension name")));
        }
    }
    let b = &config.backup;
    if let Some(bucket) = &b.bucket
        && (bucket.len() < 3
            || !bucket.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.'))
    {
        return Err(fail("backup.bucket", format!("`{bucket}` is not an S3 bucket name")));
    }
    if b.prefix.is_empty() || b.prefix.starts_with('/') || b.prefix.ends_with('/') || b.prefix.contains("..") {
        return Err(fail(
            "backup.prefix",
            format!("`{}` must be a relative key prefix without a trailing /", b.prefix),
        ));
    }
    if !(1..=19).contains(&b.zstd_level) {
        return Err(fail("backup.zstd-level", format!("{} is not a zstd level (1–19)", b.zstd_level)));
    }
    if b.part_size < 5 << 20 || b.parts_in_flight == 0 || b.parts_in_flight > 32 {
        return Err(fail("backup.part-size", "part-size must be at least 5 MiB and parts-in-flight 1–32".into()));
    }
    for (key, text) in [("backup.schedule", &b.schedule), ("backup.verify-schedule", &b.verify_schedule)] {
        if text != "off"
            && let Err(e) = crate::backup::schedule::Calendar::parse(text)
        {
            return Err(fail(key, format!("`{text}` is not a calendar expression (or \"off\"): {e}")));
        }
    }
    for r in &b.recipients {
        if !r.starts_with("age1") {
            return Err(fail("backup.recipients", format!("`{r}` is not an age X25519 recipient (age1…)")));
        }
    }
    let r = &config.release;
    if let Some(bucket) = &r.bucket
        && (bucket.len() < 3
            || !bucket.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.'))
    {
        return Err(fail("release.bucket", format!("`{bucket}` is not an S3 bucket name")));
    }
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('.')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    for (key, v) in [("release.app", &r.app), ("release.artifact", &r.artifact)] {
        if !name_ok(v) {
            return Err(fail(key, format!("`{v}` must be letters, digits, . _ - (not starting with .), at most 64")));
        }
    }
    if let Some(k) = &r.public_key
        && let Err(e) = crate::release::verify::parse_public_key(k)
            .and_then(|_| if k.len() == 64 { Ok(()) } else { Err("surrounding spaces".into()) })
    {
        return Err(fail("release.public-key", format!("must be an Ed25519 public key as 64 hex digits: {e}")));
    }
    if r.keep == 0 {
        return Err(fail("release.keep", "must be at least 1".into()));
    }
    if r.health_gate_consecutive == 0 {
        return Err(fail("release.health-gate-consecutive", "must be at least 1".into()));
    }
    if r.health_gate_timeout.get() < Duration::from_secs(1) {
        return Err(fail("release.health-gate-timeout", "must be at least 1s".into()));
    }
    if !config.notify.recipients.is_empty() && config.notify.sender.is_none() {
        return Err(fail("notify.recipients", "recipients are set but notify.sender is not".into()));
    }
    Ok(())
}

/// The configuration as TOML/JSON-ready value with secret-looking values replaced.
pub fn redacted(config: &Config) -> serde_json::Value {
    let mut v = serde_json::to_value(config).expect("config serializes");
    redact_value(&mut v, "");
    v
}

const SECRET_WORDS: &[&str] = &["password", "secret", "token", "passphrase", "private", "credential", "api-key"];

fn redact_value(v: &mut serde_json::Value, key: &str) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                redact_value(child, k);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| redact_value(i, key)),
        serde_json::Value::String(s) => {
            let lower = key.to_ascii_lowercase();
            if SECRET_WORDS.iter().any(|w| lower.contains(w)) {
                *s = "<redacted>".into();
            } else if let Some(clean) = redact_url_password(s) {
                *s = clean;
            }
        }
        _ => {}
    }
}

/// Drops unset (null) values: TOML has no null, an absent key means "unset".
pub fn without_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|_, c| !c.is_null());
            map.values_mut().for_each(without_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(without_nulls),
        _ => {}
    }
}

/// `scheme://user:pass@host` → `scheme://user:<redacted>@host`.
pub fn redact_url_password(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let (userinfo, host) = rest.split_once('@')?;
    if userinfo.contains('/') {
        return None;
    }
    let (user, _) = userinfo.split_once(':')?;
    Some(format!("{scheme}://{user}:<redacted>@{host}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    fn sources(dir: &Path) -> Sources {
        Sources {
            main: dir.join("caretaker.toml"),
            main_required: false,
            dropin_dirs: vec![dir.join("etc.d"), dir.join("run.d")],
        }
    }

    #[test]
    fn defaults_are_the_zmanim_profile_and_valid() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = load(&sources(dir.path())).unwrap();
        let c = loaded.config;
        assert!(loaded.files.is_empty());
        assert_eq!(c.services.api.unit.as_str(), "zmanim-api.service");
        assert_eq!(c.services.api.health_url, "http://127.0.0.1:8080/health");
        assert_eq!(c.volume.mount_point, Path::new("/data"));
        assert_eq!(c.secrets.ssm_path, "/zmanim/prod/");
        assert_eq!(c.aws.region, None, "region comes from IMDS by default");
        assert_eq!(c.volume.filesystem, Filesystem::Xfs);
    }

    #[test]
    fn dropins_merge_in_order_and_run_wins() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "caretaker.toml", "[daemon]\nlog-level = \"warn\"\n[aws]\nregion = \"eu-west-1\"\n");
        write(dir.path(), "etc.d/10-a.toml", "[daemon]\nlog-level = \"debug\"\n");
        write(dir.path(), "etc.d/20-b.toml", "[aws]\nregion = \"us-east-1\"\n");
        write(dir.path(), "run.d/20-b.toml", "[aws]\nregion = \"eu-central-1\"\n");
        write(dir.path(), "etc.d/ignored.conf", "garbage");
        let loaded = load(&sources(dir.path())).unwrap();
        assert_eq!(loaded.config.daemon.log_level, LogLevel::Debug);
        assert_eq!(loaded.config.aws.region.as_deref(), Some("eu-central-1"));
        assert_eq!(loaded.files.len(), 3, "{:?}", loaded.files);
        assert!(loaded.files[2].ends_with("run.d/20-b.toml"));
    }

    #[test]
    fn unknown_key_names_file_line_column_and_key() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "etc.d/50-bad.toml", "# comment\n[daemon]\nlog-level = \"info\"\nlog-levle = \"x\"\n");
        let err = load(&sources(dir.path())).unwrap_err().to_string();
        assert!(err.contains("50-bad.toml:4:1"), "{err}");
        assert!(err.contains("log-levle"), "{err}");
        assert!(err.contains("daemon"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "caretaker.toml", "[services.postgres]\nport = \"fivefour\"\n");
        let err = load(&sources(dir.path())).unwrap_err().to_string();
        assert!(err.contains("caretaker.toml:2:8"), "{err}");
        assert!(err.contains("key `services.postgres.port`"), "{err}");
    }

    #[test]
    fn syntax_error_is_positioned() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "caretaker.toml", "[daemon]\nlog-level = \n");
        let err = load(&sources(dir.path())).unwrap_err().to_string();
        assert!(err.contains("caretaker.toml:2:"), "{err}");
    }

    #[test]
    fn cross_field_error_names_the_file_that_set_the_key() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "caretaker.toml", "[notify]\nsender = \"ops@example.com\"\n");
        write(dir.path(), "run.d/x.toml", "[secrets]\nssm-path = \"/zmanim/prod\"\n");
        let err = load(&sources(dir.path())).unwrap_err().to_string();
        assert!(err.contains("run.d/x.toml: key `secrets.ssm-path`"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected() {
        for (text, needle) in [
            ("[volume]\ndevice = \"vol-xyz\"\n", "volume id"),
            ("[volume]\ndevice = \"nvme1n1\"\n", "not a volume id"),
            ("[volume]\nattach-timeout = \"soon\"\n", "not a duration"),
            ("[services.api]\nunit = \"zmanim api\"\n", "not a systemd unit name"),
            ("[aws]\ns3-endpoint = \"localhost:9000\"\n", "not an http"),
            ("[notify]\nrecipients = [\"ops@example.com\"]\n", "sender is not"),
            ("[secrets]\nenv-dir = \"/etc/caretaker/env\"\n", "under /run"),
            ("[daemon]\nlog-level = \"loud\"\n", "unknown variant"),
            ("[release]\npublic-key = \"abc\"\n", "64 hex digits"),
            ("[release]\nartifact = \"../bin/sh\"\n", "release.artifact"),
            ("[release]\nhealth-gate-consecutive = 0\n", "at least 1"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "caretaker.toml", text);
            let err = load(&sources(dir.path())).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} → {err}");
        }
    }

    #[test]
    fn explicit_file_must_exist() {
        let err = load(&Sources::file("/nonexistent/caretaker.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn volume_selector_forms() {
        assert_eq!(
            VolumeSelector::parse("vol-0123456789abcdef0").unwrap(),
            VolumeSelector::VolumeId("vol-0123456789abcdef0".into())
        );
        assert_eq!(VolumeSelector::parse("/dev/sdf").unwrap(), VolumeSelector::DeviceName("sdf".into()));
        assert_eq!(VolumeSelector::parse("xvdg").unwrap(), VolumeSelector::DeviceName("xvdg".into()));
        assert_eq!(VolumeSelector::parse("/dev/loop3").unwrap(), VolumeSelector::Path("/dev/loop3".into()));
        assert!(VolumeSelector::parse("/dev/../etc/passwd").is_err());
    }

    #[test]
    fn redaction_hides_secret_looking_values() {
        let mut v = serde_json::json!({"a": {"db-password": "hunter2", "url": "postgres://app:hunter2@db/x", "unit": "x.service"}});
        redact_value(&mut v, "");
        let s = v.to_string();
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("x.service"));
    }

    #[test]
    fn default_config_round_trips_through_toml() {
        let text = toml::to_string(&Config::default()).unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, Config::default());
    }
}
