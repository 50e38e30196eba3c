//! Swapping a verified database in for the live one, and the names that swaps leave behind:
//! `DB_pre_restore_YYYYMMDD_HHMMSS` (the previous live database, kept) and
//! `DB_failed_restore_…` (a copy the API was unhealthy on). Restores and migrations both end here.

use std::time::{Duration, SystemTime};

use tracing::warn;

use super::leftovers::is_stamp;
use crate::config::{Config, ServiceKind};
use crate::health::{Gate, Probe};
use crate::maintenance;
use crate::pg::{PgTarget, quote_ident, quote_literal};
use crate::systemd::manager::Systemd;

/// What went wrong while swapping; the message says what state the databases are in.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error("postgres: {0}")]
    PgClient(#[from] crate::pg::PgError),
    #[error("postgres: {}", crate::pg::server_says(.0))]
    PgQuery(#[from] tokio_postgres::Error),
    #[error("systemd: {0}")]
    Systemd(String),
    #[error("{0}")]
    Refused(String),
    /// The renames kept failing.
    #[error("postgres: {0}")]
    Pg(String),
}

/// `20261122_170501`: a suffix for the names restores create.
pub fn stamp(t: SystemTime) -> String {
    let s = crate::units::rfc3339(t); // 2026-11-22T17:05:01Z
    s.trim_end_matches('Z').replace(['-', ':'], "").replace('T', "_")
}

/// `make(stamp)` for a stamp of now whose database does not exist yet, waiting for the next
/// second when an earlier job of this very second took the name (a kept migration copy).
pub async fn unused_name(
    target: &crate::pg::PgTarget,
    make: impl Fn(&str) -> String,
) -> Result<(String, String), crate::pg::PgError> {
    let admin = target.connect("postgres", std::time::Duration::from_secs(30)).await?;
    for _ in 0..3 {
        let ts = stamp(std::time::SystemTime::now());
        let name = make(&ts);
        if admin.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_none() {
            return Ok((ts, name));
        }
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    }
    Err(crate::pg::PgError::Refused("no unused database name in three seconds".into()))
}

/// Whether `name` is a database a restore kept (`DB_pre_restore_YYYYMMDD_HHMMSS`).
pub fn is_kept_name(db: &str, name: &str) -> bool {
    name.strip_prefix(db).and_then(|r| r.strip_prefix("_pre_restore_")).is_some_and(is_stamp)
}

async fn api_was_active(systemd: &Systemd, unit: &str) -> bool {
    systemd.state(unit).await.map(|s| s.is_active()).unwrap_or(false)
}

pub(super) async fn stop(systemd: &Systemd, unit: &str, cfg: &Config) -> Result<(), SwapError> {
    let out =
        systemd.stop(unit, cfg.supervise.start_timeout.get()).await.map_err(|e| SwapError::Systemd(e.to_string()))?;
    if out.state.is_active() {
        return Err(SwapError::Systemd(format!("{unit} is still {} after stopping it", out.state.active_state)));
    }
    Ok(())
}

pub(super) async fn start(systemd: &Systemd, unit: &str, cfg: &Config) -> Result<(), SwapError> {
    let out =
        systemd.start(unit, cfg.supervise.start_timeout.get()).await.map_err(|e| SwapError::Systemd(e.to_string()))?;
    if !out.state.is_active() {
        return Err(SwapError::Systemd(format!(
            "{unit} did not start: job {}, unit {} ({})",
            out.job_result, out.state.active_state, out.state.result
        )));
    }
    Ok(())
}

/// Renames `from` → `to` and `new` → `live` in one transaction, after ending every session on
/// `live` (retried while sessions linger). `live` may not exist (then only `new` is renamed).
async fn swap(cfg: &Config, live: &str, new: &str, aside: &str) -> Result<bool, SwapError> {
    let admin = PgTarget::new(&cfg.services.postgres).connect("postgres", Duration::from_secs(30)).await?;
    let exists = admin.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&live]).await?.is_some();
    let mut last = String::new();
    for _ in 0..20 {
        if exists {
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&live],
                )
                .await?;
        }
        let sql = if exists {
            format!(
                "BEGIN; ALTER DATABASE {l} RENAME TO {a}; ALTER DATABASE {n} RENAME TO {l}; COMMIT;",
                l = quote_ident(live),
                a = quote_ident(aside),
                n = quote_ident(new)
            )
        } else {
            format!("ALTER DATABASE {} RENAME TO {}", quote_ident(new), quote_ident(live))
        };
        match admin.batch_execute(&sql).await {
            Ok(()) => return Ok(exists),
            Err(e) => {
                let _ = admin.batch_execute("ROLLBACK").await;
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Err(SwapError::Pg(format!("cannot rename the databases (sessions keep coming back?): {last}")))
}

/// Swaps the verified database `new` in as `live`: the API (when running) is stopped, `live`
/// becomes `LIVE_pre_restore_TS` (kept; none when there was no live database) and `new` becomes
/// `live` in one transaction; the API is started and health-gated, and a failed gate swaps back.
/// On an error before the rename, `new` is dropped and the API started again.
pub async fn swap_in(
    cfg: &Config,
    systemd: &Systemd,
    live: &str,
    new: &str,
    ts: &str,
    progress: &(dyn Fn(String) + Send + Sync),
) -> Result<Option<String>, SwapError> {
    let (live, new) = (live.to_string(), new.to_string());
    let aside = format!("{live}_pre_restore_{ts}");
    // The point of no return is the rename; everything before it left the live data alone.
    // The API is stopped (and health-gated after) only when its own database is swapped.
    let api = cfg.services.api.unit.to_string();
    let api_uses_it = live == cfg.provision.database;
    let _hold = if api_uses_it { Some(maintenance::hold(&api, "restore in progress").await) } else { None };
    let api_active = api_uses_it && api_was_active(systemd, &api).await;
    if !api_uses_it {
        progress(format!("swap: {live} is not the API's database ({}): the API keeps running", cfg.provision.database));
    }
    if api_active {
        progress(format!("swap: stopping {api}"));
        if let Err(e) = stop(systemd, &api, cfg).await {
            let _ = super::leftovers::drop_database(&PgTarget::new(&cfg.services.postgres), &new).await;
            return Err(e);
        }
    }
    progress(format!("swap: {live} → {aside} (kept), {new} → {live}"));
    let had_live = match swap(cfg, &live, &new, &aside).await {
        Ok(h) => {
            super::leftovers::forget(&new);
            h
        }
        Err(e) => {
            let _ = super::leftovers::drop_database(&PgTarget::new(&cfg.services.postgres), &new).await;
            if api_active {
                let _ = start(systemd, &api, cfg).await;
            }
            return Err(e);
        }
    };
    if had_live {
        let admin = PgTarget::new(&cfg.services.postgres).connect("postgres", Duration::from_secs(30)).await?;
        let _ = admin
            .batch_execute(&format!(
                "COMMENT ON DATABASE {} IS {}",
                quote_ident(&aside),
                quote_literal(&format!("kept by caretaker: replaced by {new} at {ts}"))
            ))
            .await;
    }
    if api_active {
        progress(format!("swap: starting {api} and health-gating it"));
        let gate = Gate::from_config(cfg);
        let started = start(systemd, &api, cfg).await;
        let gated = match started {
            Ok(()) => gate.run(&Probe::for_service(&cfg.services, ServiceKind::Api)).await,
            Err(e) => Err(e.to_string()),
        };
        if let Err(reason) = gated {
            if !had_live {
                return Err(SwapError::Refused(format!(
                    "the API is unhealthy on the restored database ({reason}); there was no previous database to swap back to"
                )));
            }
            warn!("the API is unhealthy on the restored database: {reason}; swapping back");
            progress(format!("swap back: the API is unhealthy on the restored database: {reason}"));
            let _ = stop(systemd, &api, cfg).await;
            let failed = format!("{live}_failed_restore_{ts}");
            swap(cfg, &live, &aside, &failed).await?;
            start(systemd, &api, cfg).await?;
            return Err(SwapError::Refused(format!(
                "swapped back: the API was unhealthy on the restored database ({reason}); the live database is the one \
                 from before, the restored copy is kept as {failed}"
            )));
        }
    }
    Ok(had_live.then_some(aside))
}
