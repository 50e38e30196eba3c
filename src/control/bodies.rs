//! The job bodies: what each job does, built from the configuration and the daemon's handles. The
//! D-Bus interface validates a request and starts one of these; the scheduler starts them too.

use std::future::Future;
use std::time::SystemTime;

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::jobs::{JobCtx, JobFuture};
use super::runs;
use crate::backup::run::Kind;
use crate::config::{Config, ServiceKind};
use crate::notify::Alerts;
use crate::systemd::manager::Systemd;

/// A job body, ready for [`super::jobs::Jobs::start`].
pub type Body = Box<dyn FnOnce(JobCtx) -> JobFuture + Send>;

/// A progress callback for capability code, and the receiver [`pump`] turns into job progress.
fn progress_channel() -> (impl Fn(String) + Send + Sync + Clone + 'static, UnboundedReceiver<String>) {
    let (tx, rx) = unbounded_channel::<String>();
    (move |l: String| drop(tx.send(l)), rx)
}

/// Runs `work`, turning the lines it sends on `rx` into job progress, then drains them.
async fn pump<T>(ctx: &JobCtx, rx: &mut UnboundedReceiver<String>, work: impl Future<Output = T>) -> T {
    tokio::pin!(work);
    let out = loop {
        tokio::select! {
            r = &mut work => break r,
            Some(line) = rx.recv() => ctx.phase(&line).await,
        }
    };
    while let Ok(line) = rx.try_recv() {
        ctx.phase(&line).await;
    }
    out
}

/// Applies retention.
pub fn prune_job(cfg: Config, dry_run: bool, alerts: Option<Alerts>) -> Body {
    Box::new(move |ctx| {
        Box::pin(async move {
            let s3 = crate::backup::run::s3_for(&cfg).await.map_err(|e| e.to_string())?;
            let reports = match crate::backup::run::prune(&cfg, &s3, dry_run).await {
                Ok(r) => {
                    if let Some(a) = &alerts {
                        a.resolve("prune", "Retention was applied.");
                    }
                    r
                }
                Err(e) => {
                    if let Some(a) = &alerts {
                        a.open("prune", crate::backup::alerts::prune_failed(&e.to_string()));
                    }
                    return Err(e.to_string());
                }
            };
            let ignored: Vec<crate::backup::run::Ignored> = reports.iter().flat_map(|r| r.ignored.clone()).collect();
            for i in &ignored {
                ctx.phase(&format!("ignored {}: {}", i.key, i.why)).await;
            }
            if let Some(a) = &alerts {
                if ignored.is_empty() {
                    a.resolve(crate::backup::alerts::FOREIGN, "No foreign objects remain in the backup prefix.");
                } else {
                    a.open(crate::backup::alerts::FOREIGN, crate::backup::alerts::foreign_objects(&ignored));
                }
            }
            let mut gone = 0;
            let mut kept = 0;
            for r in &reports {
                for d in &r.decisions {
                    let verb = match (d.keep, dry_run) {
                        (true, _) => "keep",
                        (false, true) => "would delete",
                        (false, false) => "deleted",
                    };
                    ctx.phase(&format!("{} {} {verb} {}", r.kind.as_str(), d.id, d.reasons.join(", "))).await;
                    if d.keep { kept += 1 } else { gone += 1 }
                }
                if let (Some(first), Some(last)) = (r.wal_deleted.first(), r.wal_deleted.last()) {
                    let verb = if dry_run { "would delete" } else { "deleted" };
                    ctx.phase(&format!(
                        "wal {verb} {} files {first} … {last}: older than every kept base backup",
                        r.wal_deleted.len()
                    ))
                    .await;
                }
            }
            let wal: usize = reports.iter().map(|r| r.wal_deleted.len()).sum();
            Ok(format!(
                "{kept} kept, {gone} {}{}",
                if dry_run { "would be deleted" } else { "deleted" },
                if wal > 0 { format!("; {wal} WAL files") } else { String::new() }
            ))
        })
    })
}

/// Restore drills of backup `id` (or the newest) of `kinds`.
pub fn verify_job(cfg: Config, kinds: Vec<Kind>, id: String, alerts: Option<Alerts>) -> Body {
    Box::new(move |ctx| {
        Box::pin(async move {
            let s3 = crate::backup::run::s3_for(&cfg).await.map_err(|e| e.to_string())?;
            let (progress, mut rx) = progress_channel();
            let work = async {
                let mut done = Vec::new();
                let mut found = 0;
                for k in &kinds {
                    let m = match crate::backup::verify::find(&cfg, &s3, *k, &id).await {
                        Ok(m) => m,
                        // An id names one backup: the other kind not having it is fine.
                        Err(crate::backup::verify::VerifyError::NoSuchBackup { .. })
                            if id != "latest" || kinds.len() > 1 =>
                        {
                            continue;
                        }
                        Err(e) => return Err(e.to_string()),
                    };
                    found += 1;
                    let key = format!("verify:{}", k.as_str());
                    match crate::backup::verify::verify(&cfg, &s3, &m, &progress).await {
                        Ok(r) => {
                            progress(format!("{} {}: verified ({})", k.as_str(), m.id, r.checks.join("; ")));
                            if let Some(a) = &alerts {
                                a.resolve(&key, &format!("The {} backup {} verified.", k.as_str(), m.id));
                            }
                            done.push(format!("{} {} verified", k.as_str(), m.id));
                        }
                        Err(e) => {
                            if let Some(a) = &alerts {
                                a.open(&key, crate::backup::alerts::drill_failed(*k, &m.id, &e.to_string()));
                            }
                            runs::record(runs::Run::Verify, SystemTime::now(), false);
                            return Err(format!("{} {} FAILED verification: {e}", k.as_str(), m.id));
                        }
                    }
                }
                if found == 0 {
                    return Err(format!("no backup {id} (see `caretaker backup list`)"));
                }
                runs::record(runs::Run::Verify, SystemTime::now(), true);
                Ok(done.join(", "))
            };
            pump(&ctx, &mut rx, work).await
        })
    })
}

/// Backs up `kinds` in turn; alerts on failure, resolves on success.
pub fn backup_job(cfg: Config, kinds: Vec<Kind>, alerts: Option<Alerts>) -> Body {
    Box::new(move |ctx| {
        Box::pin(async move {
            let started = SystemTime::now();
            let s3 = crate::backup::run::s3_for(&cfg).await.map_err(|e| e.to_string())?;
            let instance = crate::backup::run::instance_id();
            let mut done = Vec::new();
            for k in kinds {
                ctx.phase(&format!("{}: starting", k.as_str())).await;
                let (progress, mut rx) = progress_channel();
                let work = crate::backup::run::backup(&cfg, &s3, k, &instance, progress);
                tokio::pin!(work);
                let key = crate::backup::alerts::backup_key(k);
                let manifest = loop {
                    tokio::select! {
                        r = &mut work => match r {
                            Ok(m) => {
                                if let Some(a) = &alerts {
                                    a.resolve(&key, &format!("The {} backup {} succeeded.", k.as_str(), m.id));
                                }
                                break m;
                            }
                            Err(e) => {
                                if let Some(a) = &alerts {
                                    a.open(&key, crate::backup::alerts::backup_failed(k, &e.to_string()));
                                }
                                runs::record(runs::Run::Backup, started, false);
                                return Err(format!("{} backup failed: {e}", k.as_str()));
                            }
                        },
                        Some(line) = rx.recv() => ctx.progress(&line, 0, 0).await,
                        _ = ctx.cancel.cancelled() => return Err("cancelled: the daemon is stopping; the upload was aborted".into()),
                    }
                };
                while let Ok(line) = rx.try_recv() {
                    ctx.phase(&line).await;
                }
                done.push(format!(
                    "{} {} ({} stored)",
                    k.as_str(),
                    manifest.id,
                    crate::units::human_bytes(manifest.stored_bytes)
                ));
            }
            runs::record(runs::Run::Backup, started, true);
            Ok(format!("backed up: {}", done.join(", ")))
        })
    })
}

/// Restores `kind` from backup `backup` (an id or `latest`); `target_db` (postgres only, empty:
/// backup.database) is the database to replace.
pub fn restore_job(cfg: Config, systemd: Systemd, kind: Kind, backup: String, target_db: String) -> Body {
    Box::new(move |ctx| {
        Box::pin(async move {
            let s3 = crate::backup::run::s3_for(&cfg).await.map_err(|e| e.to_string())?;
            let (progress, mut rx) = progress_channel();
            let work = async {
                match kind {
                    Kind::Postgres => {
                        let target = (!target_db.is_empty()).then_some(target_db.as_str());
                        let r =
                            crate::backup::restore::restore_postgres(&cfg, &s3, &systemd, &backup, target, &progress)
                                .await
                                .map_err(|e| format!("restore failed, the live database is unchanged: {e}"))?;
                        Ok(format!(
                            "restored backup {} as {} ({} tables, {} rows){}",
                            r.backup,
                            r.database,
                            r.tables,
                            r.rows,
                            r.kept.map(|k| format!("; the previous database is kept as {k}")).unwrap_or_default()
                        ))
                    }
                    Kind::Base => Err("a base backup is restored to a point in time: `caretaker restore postgres \
                                       --to-time TIME` or `--to-latest`"
                        .to_string()),
                    Kind::Redis => {
                        let r = crate::backup::restore::restore_redis(&cfg, &s3, &systemd, &backup, &progress)
                            .await
                            .map_err(|e| format!("restore failed: {e}"))?;
                        Ok(format!(
                            "restored redis backup {} ({} keys); the previous RDB is kept as {}",
                            r.backup,
                            r.dbsize,
                            r.kept.display()
                        ))
                    }
                }
            };
            pump(&ctx, &mut rx, work).await
        })
    })
}

/// Point-in-time restore of the whole cluster to `target`: plan (refused before anything is
/// touched), room, build and verify beside the live data, swap with PostgreSQL stopped.
pub fn pitr_job(cfg: Config, systemd: Systemd, target: crate::backup::pitr::Target) -> Body {
    use crate::backup::pitr;
    Box::new(move |ctx| {
        Box::pin(async move {
            let s3 = crate::backup::run::s3_for(&cfg).await.map_err(|e| e.to_string())?;
            let (progress, mut rx) = progress_channel();
            let work = async {
                let archive = crate::backup::wal::archive::Archive::for_config(&cfg, s3.clone())
                    .map_err(|e| format!("restore refused, nothing was changed: {e}"))?;
                progress(format!("pitr: checking the window and the WAL chain for {}", target.describe()));
                let plan = pitr::plan(&cfg, &s3, &archive, target).await.map_err(|e| e.to_string())?;
                progress(format!(
                    "pitr: window {}; base backup {} ({}), {} segments to replay on timeline {}",
                    plan.window,
                    plan.base.id,
                    plan.base.finished_at,
                    plan.chain.segments.len(),
                    plan.chain.timeline
                ));
                let p = &cfg.services.postgres;
                let target_pg = crate::pg::PgTarget::new(p);
                // The copy is about as large as the backup's files, plus the WAL replay writes.
                let need = plan.base.plain_bytes.saturating_add(plan.base.plain_bytes / 10);
                crate::backup::room::check(
                    &target_pg,
                    &p.data_dir,
                    cfg.backup.restore_reserve,
                    need,
                    &format!("the point-in-time restore from base backup {}", plan.base.id),
                )
                .await
                .map_err(|e| format!("restore refused: {e}"))?;
                let ts = crate::backup::swap::stamp(SystemTime::now());
                let dir = pitr::build_dir(&p.data_dir, &ts);
                let built = pitr::build(&cfg, &s3, archive, &plan, &dir, &pitr::Tools::for_config(&cfg), &progress)
                    .await
                    .map_err(|e| format!("restore failed: {e}"))?;
                let kept = pitr::swap_in(&cfg, &systemd, &built, &ts, &progress)
                    .await
                    .map_err(|e| format!("restore failed: {e}"))?;
                Ok(format!(
                    "restored PostgreSQL to {} from base backup {} (last commit {}; {}); {} tables, {} rows in {}; \
                     the previous data directory is kept as {}",
                    target.describe(),
                    built.base,
                    built.last_commit.as_deref().unwrap_or("none replayed"),
                    built.stopped,
                    built.tables,
                    built.rows,
                    cfg.backup.database,
                    kept.display()
                ))
            };
            pump(&ctx, &mut rx, work).await
        })
    })
}

/// Migrates from `source`; with `swap` the verified copy replaces the live database.
pub fn migrate_job(cfg: Config, systemd: Systemd, source: crate::backup::migrate::Source, swap: bool) -> Body {
    Box::new(move |ctx| {
        Box::pin(async move {
            let report_path = std::path::Path::new(crate::envfile::STATE_DIR)
                .join(format!("migrate-{}.json", crate::backup::swap::stamp(SystemTime::now())));
            let (progress, mut rx) = progress_channel();
            let work = async {
                let r =
                    crate::backup::migrate::migrate(&cfg, &source, swap.then_some(&systemd), &report_path, &progress)
                        .await
                        .map_err(|e| format!("migration failed, the live database is unchanged: {e}"))?;
                let checks = r.checks.len();
                Ok(match r.kept {
                    Some(k) => format!(
                        "migrated: {checks} checks [OK]; swapped in as {}, the previous database is kept as {k}; report {}",
                        r.database,
                        report_path.display()
                    ),
                    None if swap => format!("migrated: {checks} checks [OK]; swapped in as {}", r.database),
                    None => format!(
                        "migrated: {checks} checks [OK]; the copy is {} (not swapped: run again with --swap); report {}",
                        r.database,
                        report_path.display()
                    ),
                })
            };
            pump(&ctx, &mut rx, work).await
        })
    })
}

/// Updates the API as `request` says, health-gated, rolled back when the gate fails.
pub fn update_job(
    cfg: Config,
    systemd: Systemd,
    request: crate::release::UpdateRequest,
    alerts: Option<Alerts>,
) -> Body {
    Box::new(move |ctx| {
        Box::pin(async move {
            let s3 = crate::backup::run::s3_for(&cfg).await.map_err(|e| e.to_string())?;
            let unit = cfg.services.api.unit.to_string();
            let timeout = cfg.supervise.start_timeout.get();
            let probe = crate::health::Probe::for_service(&cfg.services, ServiceKind::Api);
            // The supervisor must not restart the API while the update restarts it.
            let _hold = if request.dry_run { None } else { Some(crate::maintenance::hold(&unit, &ctx.id).await) };
            let restart = || {
                let (systemd, unit) = (systemd.clone(), unit.clone());
                async move {
                    let out = systemd.restart(&unit, timeout).await?;
                    if !out.state.is_active() {
                        anyhow::bail!(
                            "restarting {unit}: job {}, unit {} ({})",
                            out.job_result,
                            out.state.active_state,
                            out.state.result
                        );
                    }
                    Ok(())
                }
            };
            let (progress, mut rx) = progress_channel();
            let work = crate::release::update(&cfg, &s3, &request, restart, &probe, alerts.as_ref(), progress);
            match pump(&ctx, &mut rx, work).await {
                Ok(o) if o.is_success() => Ok(o.summary()),
                Ok(o) => Err(o.summary()),
                Err(e) => Err(e.to_string()),
            }
        })
    })
}
