//! The update procedure: validate the version, fetch SHA256SUMS (and check its signature when a key
//! is configured), stream the artifact to a temporary file and verify it, switch `current`, restart
//! the API, health-gate it; roll back by itself when the gate fails.
//!
//! Order matters for crash safety: the artifact is renamed into place only after its hash matched,
//! `.verified` is written after that, the state file is written before `current` moves, and it says
//! `done` only once the gate passed; [`super::reconcile`] relies on exactly that.

use std::future::Future;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use super::layout::{Install, Phase, State};
use super::store::{Chunk, Store};
use super::{UpdateError, validate_version, verify};
use crate::aws::s3::S3;
use crate::config::Config;
use crate::fsutil::{self, FsError};
use crate::health::{Gate, Probe};
use crate::notify::{Alert, Alerts};

/// The incident key of update alerts (opened on a roll back, resolved by the next good update).
pub const INCIDENT: &str = "update";

/// Which release to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Version(String),
    /// What `APP/LATEST` in the bucket names.
    Latest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRequest {
    pub target: Target,
    /// Fetch and verify only: stop before the switch and remove what was downloaded (unless it
    /// was on disk already).
    pub dry_run: bool,
    /// Install a version older than the running one (refused otherwise).
    pub allow_downgrade: bool,
}

/// How an update ended. Every variant but [`Outcome::RolledBack`] is a success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// `current` points at `to`, which passed its health gate. `pruned`: release folders deleted.
    Updated { from: Option<String>, to: String, pruned: Vec<String> },
    /// `current` already pointed at this verified release: nothing done.
    AlreadyRunning { version: String },
    /// Dry run: `to` exists in the bucket and verified; nothing switched.
    DryRun { from: Option<String>, to: String },
    /// `to` failed its health gate; `current` is back at `from`, which is healthy.
    RolledBack { from: String, to: String, reason: String },
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        !matches!(self, Outcome::RolledBack { .. })
    }

    /// One line for the CLI's last line and the job's summary.
    pub fn summary(&self) -> String {
        match self {
            Outcome::Updated { from: Some(from), to, .. } => format!("updated from {from} to {to}"),
            Outcome::Updated { from: None, to, .. } => format!("installed {to}"),
            Outcome::AlreadyRunning { version } => format!("{version} is already running: nothing to do"),
            Outcome::DryRun { from, to } => format!(
                "dry run: {to} is in the bucket and verifies; current stays at {}",
                from.as_deref().unwrap_or("nothing")
            ),
            Outcome::RolledBack { from, reason, .. } => format!("rolled back to {from}: {reason}"),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.summary())
    }
}

/// Updates the API to the requested release (see the module docs).
///
/// `restart` restarts the API so that it runs what `current` points at (the daemon passes a
/// systemd RestartUnit of `services.api.unit`); `probe` is the API's health probe; `alerts`, when
/// given, gets one incident email on a roll back; `progress` receives short lines as it goes.
///
/// Refusals (bad version, missing release, bad hash or signature, failed download) come back as
/// `Err` with nothing on disk or in the running API changed. A failed gate that could be rolled
/// back is `Ok(Outcome::RolledBack)`: for the CLI still a failure ([`Outcome::is_success`]).
pub async fn update<R, F>(
    cfg: &Config,
    s3: &S3,
    request: &UpdateRequest,
    mut restart: R,
    probe: &Probe,
    alerts: Option<&Alerts>,
    progress: impl Fn(String) + Send + Sync,
) -> Result<Outcome, UpdateError>
where
    R: FnMut() -> F + Send,
    F: Future<Output = anyhow::Result<()>> + Send,
{
    if let Target::Version(v) = &request.target {
        validate_version(v)?;
    }
    let rc = &cfg.release;
    let bucket = rc.bucket.as_deref().ok_or(UpdateError::NoBucket)?;
    let key = rc.public_key.as_deref().map(verify::parse_public_key).transpose().map_err(UpdateError::BadKey)?;
    let store = Store { s3, bucket, app: &rc.app, artifact: &rc.artifact };
    let install = Install::new(&cfg.services.api.install_dir, &rc.artifact);

    let version = match &request.target {
        Target::Version(v) => v.clone(),
        Target::Latest => latest(&store).await?,
    };
    let current = install.current()?;
    if current.as_deref() == Some(&version) && intact(&install, &version).await {
        progress(format!("{version} is already current and verified"));
        return Ok(Outcome::AlreadyRunning { version });
    }
    if let Some(from) = &current
        && !request.allow_downgrade
        && crate::release::compare_versions(&version, from) == std::cmp::Ordering::Less
    {
        // A dry run changes nothing: it still verifies, and says what the real update would do.
        if !request.dry_run {
            return Err(UpdateError::Downgrade { from: from.clone(), to: version });
        }
        progress(format!("{version} is older than {from}: the update itself needs --allow-downgrade"));
    }

    // SHA256SUMS, its signature, and the expected hash of the artifact.
    let sums_key = store.key(&version, "SHA256SUMS");
    progress(format!("fetching s3://{bucket}/{sums_key}"));
    let Some(sums) = store.small(&sums_key).await? else {
        let available = store.versions().await?;
        return Err(UpdateError::NoSuchVersion { bucket: bucket.into(), app: rc.app.clone(), version, available });
    };
    if let Some(key) = &key {
        let sig_key = store.key(&version, "SHA256SUMS.sig");
        let Some(sig) = store.small(&sig_key).await? else {
            return Err(UpdateError::Unsigned { version, bucket: bucket.into(), key: sig_key });
        };
        verify::verify_signature(key, &rc.app, &version, &sums, &sig)
            .map_err(|reason| UpdateError::BadSignature { version: version.clone(), reason })?;
        progress(format!("the signature over {} {version} and SHA256SUMS verifies", rc.app));
    }
    let expected = verify::expected_sha256(&sums, &rc.artifact)
        .map_err(|what| UpdateError::Incomplete { version: version.clone(), what })?;

    // The artifact: reused when the same bytes are on disk and verified, else downloaded.
    let already_there = install.marker(&version).is_some_and(|m| m.sha256 == expected)
        && sha256_file(&install.artifact_path(&version)).await.is_ok_and(|h| h == expected);
    if already_there {
        progress(format!("{version} is on disk already and matches SHA256SUMS"));
    } else {
        download(&store, &install, &version, &expected, !request.dry_run, rc.max_artifact_bytes, &progress).await?;
    }
    if request.dry_run {
        return Ok(Outcome::DryRun { from: current, to: version });
    }

    // Something to roll back to: what current pointed at, if it still has its executable.
    let from = current.filter(|c| *c != version && install.artifact_path(c).is_file());
    let gate = Gate::from_config(cfg);
    let unit = cfg.services.api.unit.as_str();
    install.write_state(&State { from: from.clone(), to: version.clone(), phase: Phase::Switching, reason: None })?;
    install.switch(&version)?;
    progress(format!("current -> releases/{version}; restarting {unit}"));
    let verdict = match restart().await {
        Ok(()) => {
            progress(format!(
                "health gate: {} healthy probes in a row within {}s",
                gate.consecutive,
                gate.timeout.as_secs()
            ));
            gate.run(probe).await
        }
        Err(e) => Err(format!("restarting {unit} failed: {e:#}")),
    };
    match verdict {
        Ok(()) => {
            install.write_state(&State {
                from: from.clone(),
                to: version.clone(),
                phase: Phase::Done,
                reason: None,
            })?;
            progress(format!("{version} is healthy"));
            let pruned = match install.prune(rc.keep, from.as_deref()) {
                Ok(p) => {
                    if !p.is_empty() {
                        progress(format!("removed old releases: {}", p.join(", ")));
                    }
                    p
                }
                Err(e) => {
                    warn!("pruning old releases failed: {e}");
                    progress(format!("pruning old releases failed (the update stands): {e}"));
                    Vec::new()
                }
            };
            if let Some(a) = alerts {
                a.resolve(INCIDENT, &format!("{version} is installed and healthy."));
            }
            info!(from = from.as_deref().unwrap_or("-"), to = %version, "API updated");
            Ok(Outcome::Updated { from, to: version, pruned })
        }
        Err(reason) => {
            let reason = format!("{version} failed its health gate: {reason}");
            progress(reason.clone());
            roll_back(&install, cfg, from, version, reason, &mut restart, probe, gate, alerts, &progress).await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn roll_back<R, F>(
    install: &Install,
    cfg: &Config,
    from: Option<String>,
    to: String,
    reason: String,
    restart: &mut R,
    probe: &Probe,
    gate: Gate,
    alerts: Option<&Alerts>,
    progress: &(impl Fn(String) + Send + Sync),
) -> Result<Outcome, UpdateError>
where
    R: FnMut() -> F + Send,
    F: Future<Output = anyhow::Result<()>> + Send,
{
    let unit = cfg.services.api.unit.as_str();
    let dir = install.dir.display();
    let Some(from) = from else {
        alert(
            alerts,
            format!("update to {to} failed its health gate, nothing to roll back to"),
            reason.clone(),
            format!("left {dir}/current at {to}: there is no earlier release on this box"),
            "nothing: the API is not healthy".into(),
        );
        install.write_state(&State {
            from: None,
            to: to.clone(),
            phase: Phase::Failed,
            reason: Some(reason.clone()),
        })?;
        return Err(UpdateError::GateFailedNoPrevious { version: to, reason });
    };
    install.write_state(&State {
        from: Some(from.clone()),
        to: to.clone(),
        phase: Phase::RollingBack,
        reason: Some(reason.clone()),
    })?;
    install.switch(&from)?;
    progress(format!("rolling back: current -> releases/{from}; restarting {unit}"));
    let verdict = match restart().await {
        Ok(()) => gate.run(probe).await,
        Err(e) => Err(format!("restarting {unit} failed: {e:#}")),
    };
    install.write_state(&State {
        from: Some(from.clone()),
        to: to.clone(),
        phase: Phase::RolledBack,
        reason: Some(reason.clone()),
    })?;
    match verdict {
        Ok(()) => {
            progress(format!("{from} is healthy again"));
            alert(
                alerts,
                format!("update to {to} rolled back to {from}"),
                reason.clone(),
                format!("switched {dir}/current back to {from}, restarted {unit}; {from} passed the health gate again"),
                format!("{from} is running and healthy; {to} stays on disk in {dir}/releases/{to} for inspection"),
            );
            warn!(%from, %to, "update rolled back: {reason}");
            Ok(Outcome::RolledBack { from, to, reason })
        }
        Err(rollback_reason) => {
            alert(
                alerts,
                format!("update to {to} failed and {from} is unhealthy after the roll back"),
                format!("{reason}; after switching back, {from}: {rollback_reason}"),
                format!("switched {dir}/current back to {from} and restarted {unit}"),
                "nothing: the API is not healthy".into(),
            );
            Err(UpdateError::RollbackUnhealthy { from, to, reason, rollback_reason })
        }
    }
}

fn alert(alerts: Option<&Alerts>, subject: String, what_failed: String, what_done: String, what_safe: String) {
    let Some(alerts) = alerts else { return };
    alerts.open(
        INCIDENT,
        Alert {
            subject,
            what_failed,
            what_done,
            what_safe,
            next: "look at the release (journalctl -u the API unit), publish a fixed version, then: caretaker update --version NEW"
                .into(),
        },
    );
}

/// The version `APP/LATEST` names.
async fn latest(store: &Store<'_>) -> Result<String, UpdateError> {
    let key = store.latest_key();
    let problem = match store.small(&key).await? {
        None => "does not exist".to_string(),
        Some(bytes) => {
            let text = String::from_utf8_lossy(&bytes).trim().to_string();
            if validate_version(&text).is_ok() {
                return Ok(text);
            }
            format!("holds {:?}, which is not a release version", text.chars().take(80).collect::<String>())
        }
    };
    Err(UpdateError::NoLatest {
        bucket: store.bucket.into(),
        app: store.app.into(),
        problem,
        available: store.versions().await?,
    })
}

/// Whether `version` has a marker and an artifact whose hash is the marker's.
async fn intact(install: &Install, version: &str) -> bool {
    match install.marker(version) {
        Some(m) if m.version == version => {
            sha256_file(&install.artifact_path(version)).await.is_ok_and(|h| h == m.sha256)
        }
        _ => false,
    }
}

async fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// Streams the artifact to `.ARTIFACT.partial-PID`, checks its hash, and (with `install_it`) puts
/// it in place with its marker. On any failure, and without `install_it` (a dry run), the
/// temporary file and a release folder this call created are removed again.
async fn download(
    store: &Store<'_>,
    install: &Install,
    version: &str,
    expected: &str,
    install_it: bool,
    max: u64,
    progress: &(impl Fn(String) + Send + Sync),
) -> Result<(), UpdateError> {
    let dir = install.release_dir(version);
    let created = !dir.exists();
    let fs_err = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| UpdateError::Fs(FsError { action, path, source })
    };
    std::fs::create_dir_all(&dir).map_err(fs_err("create", &dir))?;
    // The API runs as its own user: the folders must be traversable whatever caretaker's umask.
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [install.releases(), dir.clone()] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).map_err(fs_err("chmod", &d))?;
        }
    }
    let partial = install.partial_path(version);
    let result = async {
        let key = store.key(version, store.artifact);
        let Some(mut body) = store.artifact(version).await? else {
            return Err(UpdateError::Incomplete {
                version: version.into(),
                what: format!("s3://{}/{key} does not exist", store.bucket),
            });
        };
        if let Some(length) = body.length
            && length > max
        {
            return Err(UpdateError::TooLarge { version: version.into(), bytes: length, max });
        }
        progress(format!(
            "downloading s3://{}/{key}{}",
            store.bucket,
            body.length.map(|l| format!(" ({:.1} MiB)", l as f64 / (1 << 20) as f64)).unwrap_or_default()
        ));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .await
            .map_err(fs_err("create", &partial))?;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let failed = |bytes: u64, reason: String| UpdateError::Download {
            version: version.into(),
            bucket: store.bucket.into(),
            key: key.clone(),
            bytes,
            reason,
        };
        loop {
            match body.next().await {
                Chunk::Data(chunk) => {
                    if bytes + chunk.len() as u64 > max {
                        return Err(UpdateError::TooLarge {
                            version: version.into(),
                            bytes: bytes + chunk.len() as u64,
                            max,
                        });
                    }
                    hasher.update(&chunk);
                    file.write_all(&chunk).await.map_err(fs_err("write", &partial))?;
                    bytes += chunk.len() as u64;
                }
                Chunk::End => break,
                Chunk::Failed(reason) => return Err(failed(bytes, reason)),
            }
        }
        if let Some(length) = body.length
            && length != bytes
        {
            return Err(failed(bytes, format!("the object has {length} bytes")));
        }
        file.sync_all().await.map_err(fs_err("fsync", &partial))?;
        drop(file);
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            return Err(UpdateError::HashMismatch {
                version: version.into(),
                artifact: store.artifact.into(),
                expected: expected.into(),
                actual,
            });
        }
        progress(format!("{version}: {bytes} bytes, sha256 {}… matches SHA256SUMS", &actual[..16]));
        if !install_it {
            progress(format!("dry run: {version} verifies; removing the download"));
            return Ok(false);
        }
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
            .await
            .map_err(fs_err("chmod", &partial))?;
        // An old marker must not vouch for the new bytes, not even for a moment.
        let marker = dir.join(super::layout::MARKER);
        match std::fs::remove_file(&marker) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fs_err("remove", &marker)(e)),
            _ => {}
        }
        let target = install.artifact_path(version);
        tokio::fs::rename(&partial, &target).await.map_err(fs_err("rename into place", &target))?;
        fsutil::sync_dir(&dir)?;
        install.write_marker(version, &actual)?;
        fsutil::sync_dir(&install.releases())?;
        Ok(true)
    }
    .await;
    if !matches!(result, Ok(true)) {
        let _ = std::fs::remove_file(&partial);
        if created {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon runs updates as spawned jobs: the future must be `Send`.
    #[allow(dead_code)]
    fn update_future_is_send(cfg: &Config, s3: &S3, probe: &Probe, alerts: &Alerts) {
        fn is_send<T: Send>(_: T) {}
        let request = UpdateRequest { target: Target::Latest, dry_run: false, allow_downgrade: false };
        is_send(update(cfg, s3, &request, || async { Ok(()) }, probe, Some(alerts), |_| {}));
    }

    #[test]
    fn summaries() {
        let rb =
            Outcome::RolledBack { from: "v2".into(), to: "v3".into(), reason: "v3 failed its health gate: x".into() };
        assert_eq!(rb.to_string(), "rolled back to v2: v3 failed its health gate: x");
        assert!(!rb.is_success());
        assert_eq!(
            Outcome::Updated { from: Some("v1".into()), to: "v2".into(), pruned: vec![] }.summary(),
            "updated from v1 to v2"
        );
    }
}
