//! The supervised services, their secrets, their supervision and provisioning.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use super::Seconds;

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
    /// The folder of pg_dump, pg_restore, pg_basebackup (unset: found on PATH). The server
    /// binaries a point-in-time restore runs are taken from this folder, else from initdb's.
    pub bin_dir: Option<PathBuf>,
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
            bin_dir: None,
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

impl ServicesConfig {
    /// The systemd unit of a service.
    pub fn unit(&self, kind: ServiceKind) -> String {
        match kind {
            ServiceKind::Postgres => self.postgres.unit.to_string(),
            ServiceKind::Redis => self.redis.unit.to_string(),
            ServiceKind::Api => self.api.unit.to_string(),
        }
    }
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
