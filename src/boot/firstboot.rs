//! `caretaker firstboot`, on every boot: instance identity from IMDSv2, the data volume, the
//! services' folders, secrets from SSM into env files. Each step is idempotent and records its
//! result last, so a run interrupted anywhere (even SIGKILL) is completed by the next one, and a
//! second run on the same boot changes nothing. Any failure exits non-zero; the units of the data
//! services `Require=` this one, so nothing that writes data starts without the volume and secrets.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use tracing::info;

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
}

/// What each step did, for the log and `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub instance: InstanceInfo,
    pub volume: volume::VolumeOutcome,
    pub data_dirs: datadirs::DataDirsOutcome,
    pub secrets: secrets::SecretsReport,
    pub took_ms: u64,
}

/// Runs every step in order; stops at the first failure.
pub async fn run(cfg: &Config) -> Result<Report, FirstbootError> {
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
    let data_dirs = tokio::task::spawn_blocking(move || datadirs::prepare(&services)).await??;

    let region = crate::aws::region::pick(
        cfg.aws.region.as_deref(),
        [(crate::aws::region::RegionSource::Imds, Some(instance.identity.region.clone()))],
    )
    .map(|r| r.name)
    .unwrap_or_default();
    let sdk = crate::aws::sdk::sdk_config(&cfg.aws, &region).await;
    let ssm = crate::aws::ssm::SsmClient::new(crate::aws::sdk::ssm_client(&sdk, &cfg.aws));
    let secrets = secrets::write_env_files(&cfg.secrets, &ssm).await?;

    let report = Report { instance, volume, data_dirs, secrets, took_ms: started.elapsed().as_millis() as u64 };
    let mut done = serde_json::to_vec_pretty(&report).expect("report serializes");
    done.push(b'\n');
    crate::fsutil::write_atomic(&run_dir.join("firstboot.json"), &done, 0o644, None)?;
    info!(took_ms = report.took_ms, "firstboot complete");
    Ok(report)
}
