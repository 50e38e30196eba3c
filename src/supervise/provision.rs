//! Provisioning, once PostgreSQL is healthy: the application's login role (password from the env
//! file written at boot), its database, and the configured extensions — each created only if
//! missing. Nothing that exists is ever altered or dropped, so running it any number of times is
//! safe. The password never reaches a log: the statement carrying it is not logged.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use tracing::info;

use crate::config::ProvisionConfig;
use crate::envfile::read_env_var;
use crate::pg::{PgError, PgTarget, quote_ident, quote_literal};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{0}")]
    Pg(#[from] PgError),
    #[error(
        "role `{role}` is missing and its password is not in {file} ({var}); run `caretaker firstboot` or add the SSM parameter"
    )]
    NoPassword { role: String, file: String, var: String },
    #[error("cannot read {file}: {source}")]
    ReadEnv { file: String, source: std::io::Error },
    #[error(
        "creating extension `{extension}` in {database} failed: {} (is its package installed on the image?)",
        crate::pg::server_says(source)
    )]
    Extension { extension: String, database: String, source: tokio_postgres::Error },
}

/// What provisioning created this time (empty on a second run).
#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct ProvisionReport {
    pub created: Vec<String>,
}

pub async fn provision(
    target: &PgTarget,
    cfg: &ProvisionConfig,
    env_dir: &Path,
) -> Result<ProvisionReport, ProvisionError> {
    let timeout = Duration::from_secs(30);
    let mut report = ProvisionReport::default();
    let client = target.connect("postgres", timeout).await?;

    let role_exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&cfg.role])
        .await
        .map_err(PgError::Query)?
        .is_some();
    if !role_exists {
        let file = env_dir.join(format!("{}.env", cfg.password_file));
        let password = read_env_var(&file, &cfg.password_var)
            .map_err(|source| ProvisionError::ReadEnv { file: file.display().to_string(), source })?
            .ok_or_else(|| ProvisionError::NoPassword {
                role: cfg.role.clone(),
                file: file.display().to_string(),
                var: cfg.password_var.clone(),
            })?;
        // CREATE ROLE takes no bind parameters: the verifier, not the password, is what the
        // statement carries (and what PostgreSQL's log would show if it failed). A password that
        // SASLprep could change is handed over as it is, quoted.
        let secret = crate::scram::verifier(password.expose()).unwrap_or_else(|| password.expose().to_string());
        client
            .batch_execute(&format!("CREATE ROLE {} LOGIN PASSWORD {}", quote_ident(&cfg.role), quote_literal(&secret)))
            .await
            .map_err(PgError::Query)?;
        info!(role = %cfg.role, "created the application role");
        report.created.push(format!("role {}", cfg.role));
    }

    let db_exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&cfg.database])
        .await
        .map_err(PgError::Query)?
        .is_some();
    if !db_exists {
        client
            .batch_execute(&format!("CREATE DATABASE {} OWNER {}", quote_ident(&cfg.database), quote_ident(&cfg.role)))
            .await
            .map_err(PgError::Query)?;
        info!(database = %cfg.database, owner = %cfg.role, "created the application database");
        report.created.push(format!("database {}", cfg.database));
    }

    if !cfg.extensions.is_empty() {
        let db = target.connect(&cfg.database, timeout).await?;
        for ext in &cfg.extensions {
            let present = db
                .query_opt("SELECT 1 FROM pg_extension WHERE extname = $1", &[ext])
                .await
                .map_err(PgError::Query)?
                .is_some();
            if !present {
                db.batch_execute(&format!("CREATE EXTENSION IF NOT EXISTS {}", quote_ident(ext))).await.map_err(
                    |source| ProvisionError::Extension {
                        extension: ext.clone(),
                        database: cfg.database.clone(),
                        source,
                    },
                )?;
                info!(extension = %ext, database = %cfg.database, "created extension");
                report.created.push(format!("extension {ext}"));
            }
        }
    }
    Ok(report)
}

/// PostgreSQL's archive_command: the installed caretaker (or this very binary in development).
pub fn wal_push_command(socket: &Path) -> String {
    let installed = Path::new("/usr/bin/caretaker");
    let exe = if installed.exists() {
        installed.to_path_buf()
    } else {
        std::env::current_exe().unwrap_or_else(|_| installed.to_path_buf())
    };
    format!("{} wal push --socket {} %p", exe.display(), socket.display())
}

/// What [`archiving`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Archiving {
    pub changed: Vec<String>,
    /// archive_mode takes effect only at a server start.
    pub restart_needed: bool,
}

/// Sets PostgreSQL's WAL archiving (ALTER SYSTEM, in postgresql.auto.conf, which base backups
/// carry): with `command` (`caretaker wal push …`) archive_mode on, archive_command and
/// archive_timeout as given; without (PITR turned off) both reset — but only an archive_command
/// caretaker set, never one the operator wrote. Reloads; says whether a restart is needed.
pub async fn archiving(
    target: &PgTarget,
    command: Option<&str>,
    timeout_secs: u64,
) -> Result<Archiving, ProvisionError> {
    let client = target.connect("postgres", Duration::from_secs(30)).await?;
    let setting = |name: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one("SELECT setting FROM pg_settings WHERE name = $1", &[&name])
                .await
                .map_err(PgError::Query)?;
            Ok::<String, ProvisionError>(row.get(0))
        }
    };
    let mut out = Archiving::default();
    let current_command = setting("archive_command").await?;
    match command {
        Some(cmd) => {
            let wanted = [
                ("archive_mode", "on".to_string()),
                ("archive_command", cmd.to_string()),
                ("archive_timeout", timeout_secs.to_string()),
            ];
            for (name, want) in wanted {
                // pg_settings shows the running value; ALTER SYSTEM's pending one is in the file.
                if setting(name).await? != want || name == "archive_mode" && !auto_conf_has(&client, name).await {
                    let value = if name == "archive_timeout" { format!("{want}s") } else { want };
                    client
                        .batch_execute(&format!("ALTER SYSTEM SET {name} = {}", quote_literal(&value)))
                        .await
                        .map_err(PgError::Query)?;
                    out.changed.push(name.to_string());
                }
            }
        }
        None if current_command.contains(" wal push ") => {
            for name in ["archive_mode", "archive_command", "archive_timeout"] {
                client.batch_execute(&format!("ALTER SYSTEM RESET {name}")).await.map_err(PgError::Query)?;
                out.changed.push(name.to_string());
            }
        }
        None => return Ok(out),
    }
    if !out.changed.is_empty() {
        client.batch_execute("SELECT pg_reload_conf()").await.map_err(PgError::Query)?;
    }
    let running_mode = setting("archive_mode").await?;
    out.restart_needed = match command {
        Some(_) => running_mode == "off",
        None => running_mode != "off" && out.changed.iter().any(|c| c == "archive_mode"),
    };
    if !out.changed.is_empty() {
        info!(changed = ?out.changed, restart = out.restart_needed, "WAL archiving settings written (ALTER SYSTEM)");
    }
    Ok(out)
}

/// Whether postgresql.auto.conf (ALTER SYSTEM) sets `name` (so a value that comes from
/// elsewhere is pinned where base backups carry it).
async fn auto_conf_has(client: &tokio_postgres::Client, name: &str) -> bool {
    client
        .query_opt(
            "SELECT 1 FROM pg_file_settings WHERE name = $1 AND sourcefile LIKE '%postgresql.auto.conf' AND applied",
            &[&name],
        )
        .await
        .ok()
        .flatten()
        .is_some()
}
