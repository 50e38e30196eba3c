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
    #[error("creating extension `{extension}` in {database} failed: {source} (is its package installed on the image?)")]
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
