//! `caretaker firstboot`, on every boot: instance identity from IMDSv2, the data volume, the
//! services' folders, secrets from SSM into env files. Each step is idempotent and records its
//! result last, so a run interrupted anywhere (even SIGKILL) is completed by the next one, and a
//! second run on the same boot changes nothing. Any failure exits non-zero; the units of the data
//! services `Require=` this one, so nothing that writes data starts without the volume and secrets.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{error, info, warn};

use super::recovery::{Facts, Verdict, decide};
use super::{datadirs, secrets, volume};
use crate::aws::imds::{ImdsClient, InstanceInfo};
use crate::config::Config;

pub use crate::envfile::{RUN_DIR, STATE_DIR, instance_var};

#[derive(Debug, thiserror::Error)]
pub enum FirstbootError {
    #[error("instance identity: {0}")]
    Imds(#[from] crate::aws::imds::ImdsError),
    #[error("data volume: {0}")]
    Volume(#[from] volume::VolumeError),
    #[error("data directories: {0}")]
    DataDirs(#[from] datadirs::DataDirError),
    #[error("secrets: {0}")]
    Secrets(#[from] secrets::SecretsError),
    #[error("{0}")]
    Write(#[from] crate::fsutil::FsError),
    #[error("internal: a boot step panicked or was cancelled: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// Recovery at boot stopped: nothing was started on the blank volume.
    #[error("recovery at boot: {0}; no empty cluster was made and nothing was started")]
    Recovery(String),
}

/// What a restore at boot did.
#[derive(Debug, Clone, Serialize)]
pub enum Recovered {
    /// The newest backup is in place: a one-line summary, and details for firstboot.json.
    Restored { summary: String, details: serde_json::Value },
    /// S3 was read, and holds no backup of this deployment: an empty cluster is right.
    NothingToRestore(String),
}

/// Why a restore at boot did not happen.
#[derive(Debug, Clone)]
pub enum RecoverError {
    /// Not now: S3 (or the keys to read it) cannot be read, or another instance holds the backup
    /// prefix. Retried; nothing is initialised meanwhile.
    Wait(String),
    /// Backups exist but cannot be restored (a gap, a failed verification, only kinds not restored
    /// at boot): stop and say why.
    Refused(String),
}

/// The restore at boot, provided by the caller (it lives in the backup capability).
pub type Recover = dyn Fn() -> Pin<Box<dyn Future<Output = Result<Recovered, RecoverError>> + Send>> + Send + Sync;

/// Told when recovery waits (`Some(why)`) and when it stops waiting (`None`): the alert.
pub type OnWait = dyn Fn(Option<&str>) + Send + Sync;

/// The recovery decision and what came of it.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryReport {
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Recovered>,
    /// Attempts that had to wait (S3 unreadable, the prefix held) before the outcome.
    pub waited: u32,
}

/// What each step did, for the log and `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub instance: InstanceInfo,
    pub volume: volume::VolumeOutcome,
    pub data_dirs: datadirs::DataDirsOutcome,
    pub secrets: secrets::SecretsReport,
    pub recovery: RecoveryReport,
    pub took_ms: u64,
}

/// Runs every step in order; stops at the first failure. `recover` restores the newest backup
/// onto a blank volume (none: a blank volume with backups configured stops instead).
pub async fn run(cfg: &Config, recover: Option<&Recover>, on_wait: &OnWait) -> Result<Report, FirstbootError> {
    let started = Instant::now();
    let run_dir = Path::new(RUN_DIR);
    std::fs::create_dir_all(run_dir).map_err(|source| crate::fsutil::FsError {
        action: "create",
        path: run_dir.into(),
        source,
    })?;

    // Temporary files of a run that was killed (atomic writes not yet renamed into place).
    for dir in [run_dir, cfg.secrets.env_dir.as_path()] {
        crate::fsutil::remove_stale_temps(dir);
    }

    info!(endpoint = %cfg.aws.imds_endpoint, "reading the instance identity (IMDSv2)");
    let imds = ImdsClient::new(&cfg.aws.imds_endpoint, cfg.aws.imds_deadline.get());
    let instance = imds.instance_info().await?;
    crate::fsutil::write_if_changed(&run_dir.join("instance.env"), instance.env_file().as_bytes(), 0o644, None)?;
    info!(instance_id = %instance.identity.instance_id, region = %instance.identity.region, "instance identity written to /run/caretaker/instance.env");

    let vol_cfg = cfg.volume.clone();
    let instance_id = instance.identity.instance_id.clone();
    let volume = tokio::task::spawn_blocking(move || {
        volume::prepare(&vol_cfg, Path::new("/sys"), Path::new(STATE_DIR), &instance_id)
    })
    .await??;
    info!(device = %volume.device.display(), fstype = %volume.fstype, formatted = volume.formatted,
        mounted_now = volume.mounted_now, mount_point = %cfg.volume.mount_point.display(),
        "data volume ready: {} ({}) at {}", volume.device.display(), volume.fstype, cfg.volume.mount_point.display());

    let services = cfg.services.clone();
    let mut data_dirs = tokio::task::spawn_blocking(move || datadirs::prepare_dirs(&services)).await??;

    let region = crate::aws::region::pick(
        cfg.aws.region.as_deref(),
        [(crate::aws::region::RegionSource::Imds, Some(instance.identity.region.clone()))],
    )
    .map(|r| r.name)
    .unwrap_or_default();
    let sdk = crate::aws::sdk::sdk_config(&cfg.aws, &region).await;
    let ssm = crate::aws::ssm::SsmClient::new(crate::aws::sdk::ssm_client(&sdk, &cfg.aws));
    let secrets = secrets::write_env_files(&cfg.secrets, &ssm).await?;

    // Recovery at boot, before anything could initialise an empty cluster.
    let mp = cfg.volume.mount_point.clone();
    let marker = volume::read_marker(&mp);
    let facts =
        Facts::read(marker.as_ref(), &volume::boot_id(), &cfg.services.postgres.data_dir, cfg.backup.bucket.is_some());
    let verdict = decide(cfg.recovery.on_blank_volume, &facts);
    let mut recovery = RecoveryReport { verdict: verdict.clone(), outcome: None, waited: 0 };
    match &verdict {
        Verdict::StartNormally(why) => info!("recovery at boot: not needed: {why}"),
        Verdict::Refuse(why) => return Err(FirstbootError::Recovery(why.clone())),
        Verdict::LookForBackups(why) => {
            info!("recovery at boot: {why}");
            let Some(recover) = recover else {
                return Err(FirstbootError::Recovery("this build cannot restore at boot".into()));
            };
            let mut wait = Duration::from_secs(5);
            loop {
                match recover().await {
                    Ok(outcome) => {
                        if recovery.waited > 0 {
                            on_wait(None);
                        }
                        match &outcome {
                            Recovered::Restored { summary, .. } => info!("recovery at boot: {summary}"),
                            Recovered::NothingToRestore(why) => info!("recovery at boot: nothing to restore: {why}"),
                        }
                        recovery.outcome = Some(outcome);
                        break;
                    }
                    Err(RecoverError::Refused(why)) => {
                        error!("recovery at boot refused: {why}");
                        return Err(FirstbootError::Recovery(why));
                    }
                    Err(RecoverError::Wait(why)) => {
                        recovery.waited += 1;
                        let text = format!(
                            "waiting (attempt {}): {why}; PostgreSQL is not initialised and nothing is started until then (retrying in {})",
                            recovery.waited,
                            humantime::format_duration(wait)
                        );
                        warn!("recovery at boot: {text}");
                        on_wait(Some(&text));
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(cfg.recovery.retry_max.get());
                    }
                }
            }
        }
    }
    let services = cfg.services.clone();
    data_dirs.initialised = tokio::task::spawn_blocking(move || datadirs::initdb_if_empty(&services)).await??;
    if cfg.services.postgres.data_dir.join("PG_VERSION").exists() {
        let mp = mp.clone();
        tokio::task::spawn_blocking(move || volume::mark_held_cluster(&mp)).await??;
    }

    let report =
        Report { instance, volume, data_dirs, secrets, recovery, took_ms: started.elapsed().as_millis() as u64 };
    let mut done = serde_json::to_vec_pretty(&report).expect("report serializes");
    done.push(b'\n');
    crate::fsutil::write_atomic(&run_dir.join("firstboot.json"), &done, 0o644, None)?;
    info!(took_ms = report.took_ms, "firstboot complete");
    Ok(report)
}
