//! The install folder (`services.api.install-dir`): release folders and their `.verified` markers,
//! the `current` link and how it is switched, the update state file, pruning, and the repair after
//! a crash ([`reconcile`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::{UpdateError, compare_versions, validate_version};
use crate::fsutil::{self, FsError};

/// Under the install folder: one folder per release.
pub const RELEASES: &str = "releases";
/// Under the install folder: the link to the running release.
pub const CURRENT: &str = "current";
/// In a release folder: written last, after the artifact is verified and in place.
pub const MARKER: &str = ".verified";
/// Under the install folder: what the update in progress (or the last one) was doing.
pub const STATE_FILE: &str = ".caretaker-update.json";

fn fs_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UpdateError + 'a {
    move |source| UpdateError::Fs(FsError { action, path: path.to_path_buf(), source })
}

/// `.verified`: proof that the artifact next to it was checked against its release's SHA256SUMS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub version: String,
    /// Lowercase hex SHA-256 of the artifact.
    pub sha256: String,
    /// When it was verified (RFC 3339, microseconds): orders releases for pruning.
    pub time: String,
}

/// Where an update is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Written before `current` moves to `to`; stays until the health gate has passed.
    Switching,
    /// `to` failed its gate; `current` is going back to `from`.
    RollingBack,
    /// `to` passed its gate.
    Done,
    /// `current` is back at `from` (after a failed gate, or repaired by [`reconcile`]).
    RolledBack,
    /// `to` failed its gate and there was nothing to roll back to: `current` stays at `to`.
    Failed,
}

/// `.caretaker-update.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// What `current` pointed at before the update (none on a first install).
    pub from: Option<String>,
    pub to: String,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The install folder of one application.
#[derive(Debug, Clone)]
pub struct Install {
    pub dir: PathBuf,
    pub artifact: String,
}

impl Install {
    pub fn new(dir: impl Into<PathBuf>, artifact: &str) -> Self {
        Install { dir: dir.into(), artifact: artifact.to_string() }
    }

    pub fn releases(&self) -> PathBuf {
        self.dir.join(RELEASES)
    }

    pub fn release_dir(&self, version: &str) -> PathBuf {
        self.releases().join(version)
    }

    pub fn artifact_path(&self, version: &str) -> PathBuf {
        self.release_dir(version).join(&self.artifact)
    }

    /// Where a download of `version` by this process goes before it is verified.
    pub fn partial_path(&self, version: &str) -> PathBuf {
        self.release_dir(version).join(format!(".{}.partial-{}", self.artifact, std::process::id()))
    }

    pub fn current_link(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    /// The version `current` names (also when its folder is gone); `None` without a link.
    pub fn current(&self) -> Result<Option<String>, UpdateError> {
        current_version(&self.dir)
    }

    pub fn marker(&self, version: &str) -> Option<Marker> {
        read_marker(&self.release_dir(version))
    }

    /// Writes `.verified` (atomically; fsyncs the folder).
    pub fn write_marker(&self, version: &str, sha256: &str) -> Result<(), UpdateError> {
        let marker = Marker { version: version.into(), sha256: sha256.into(), time: now_micros() };
        let text = serde_json::to_vec_pretty(&marker).expect("marker serializes");
        fsutil::write_atomic(&self.release_dir(version).join(MARKER), &text, 0o644, None)?;
        Ok(())
    }

    /// Points `current` at `releases/VERSION` atomically: a new link `current.new-PID`, renamed
    /// over `current`, then the folder fsynced. Refuses to replace anything but a link.
    pub fn switch(&self, version: &str) -> Result<(), UpdateError> {
        switch_current(&self.dir, version)
    }

    pub fn read_state(&self) -> Option<State> {
        read_state(&self.dir)
    }

    pub fn write_state(&self, state: &State) -> Result<(), UpdateError> {
        let text = serde_json::to_vec_pretty(state).expect("state serializes");
        fsutil::write_atomic(&self.dir.join(STATE_FILE), &text, 0o644, None)?;
        Ok(())
    }

    /// Deletes release folders beyond the newest `keep` (by verification time, then version),
    /// never the one `current` points at nor `previous`. Returns the versions deleted.
    pub fn prune(&self, keep: usize, previous: Option<&str>) -> Result<Vec<String>, UpdateError> {
        let current = self.current()?;
        let mut releases = list_releases(&self.releases())?;
        releases.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| compare_versions(&b.version, &a.version)));
        let mut deleted = Vec::new();
        for r in releases.iter().skip(keep) {
            if Some(r.version.as_str()) == current.as_deref() || Some(r.version.as_str()) == previous {
                continue;
            }
            let path = self.release_dir(&r.version);
            fs::remove_dir_all(&path).map_err(fs_err("remove", &path))?;
            deleted.push(r.version.clone());
        }
        if !deleted.is_empty() {
            fsutil::sync_dir(&self.releases())?;
        }
        Ok(deleted)
    }
}

fn now_micros() -> String {
    crate::units::now_rfc3339_micros()
}

fn read_marker(release_dir: &Path) -> Option<Marker> {
    let text = fs::read(release_dir.join(MARKER)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn read_state(dir: &Path) -> Option<State> {
    serde_json::from_slice(&fs::read(dir.join(STATE_FILE)).ok()?).ok()
}

/// The version the `current` link in `dir` names (`releases/V` or an absolute `…/releases/V`).
fn current_version(dir: &Path) -> Result<Option<String>, UpdateError> {
    let link = dir.join(CURRENT);
    match fs::symlink_metadata(&link) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fs_err("inspect", &link)(e)),
        Ok(m) if !m.file_type().is_symlink() => return Err(UpdateError::CurrentNotALink(link)),
        Ok(_) => {}
    }
    let target = fs::read_link(&link).map_err(fs_err("read link", &link))?;
    let name = target.file_name().and_then(|n| n.to_str());
    let parent_ok = target.parent().and_then(|p| p.file_name()).is_some_and(|p| p == RELEASES);
    Ok(name.filter(|n| parent_ok && validate_version(n).is_ok()).map(str::to_string))
}

fn switch_current(dir: &Path, version: &str) -> Result<(), UpdateError> {
    let link = dir.join(CURRENT);
    if let Ok(m) = fs::symlink_metadata(&link)
        && !m.file_type().is_symlink()
    {
        return Err(UpdateError::CurrentNotALink(link));
    }
    let tmp = dir.join(format!("{CURRENT}.new-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(Path::new(RELEASES).join(version), &tmp).map_err(fs_err("create link", &tmp))?;
    if let Err(e) = fs::rename(&tmp, &link) {
        let _ = fs::remove_file(&tmp);
        return Err(fs_err("rename into place", &link)(e));
    }
    fsutil::sync_dir(dir)?;
    Ok(())
}

struct Release {
    version: String,
    time: SystemTime,
    verified: bool,
}

/// Release folders (valid version names) with their marker time, or the folder's mtime without one.
fn list_releases(releases: &Path) -> Result<Vec<Release>, UpdateError> {
    let entries = match fs::read_dir(releases) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other.map_err(fs_err("list", releases))?,
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(fs_err("list", releases))?;
        let Some(version) = entry.file_name().to_str().map(str::to_string) else { continue };
        if validate_version(&version).is_err() || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let marker = read_marker(&entry.path()).filter(|m| m.version == version);
        let time = marker
            .as_ref()
            .and_then(|m| humantime::parse_rfc3339(&m.time).ok())
            .or_else(|| entry.metadata().and_then(|m| m.modified()).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        out.push(Release { version, time, verified: marker.is_some() });
    }
    Ok(out)
}

/// Whether `release_dir` holds an artifact named by its marker (not re-hashed here).
fn verified(install_dir: &Path, version: &str) -> bool {
    let dir = install_dir.join(RELEASES).join(version);
    read_marker(&dir).is_some_and(|m| m.version == version)
}

fn pid_alive(pid: &str) -> bool {
    match pid.parse::<u32>() {
        Ok(p) => p == std::process::id() || Path::new(&format!("/proc/{p}")).exists(),
        Err(_) => false,
    }
}

/// What [`reconcile`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Reconciled {
    /// One line per repair; empty when everything was in order.
    pub repairs: Vec<String>,
    /// The version `current` points at now.
    pub current: Option<String>,
    /// `current` changed, or an update was interrupted while the API may run either version:
    /// restart the API so that it runs `current`.
    pub restart_api: bool,
}

/// Repairs what a daemon killed mid-update left in `install_dir`, so that `current` points at a
/// complete, verified release:
/// - removes `current.new-*` links and `.ARTIFACT.partial-PID` downloads of processes that are gone,
///   and release folders left empty;
/// - an update interrupted before its health gate passed (state file phase `switching` or
///   `rolling-back`) is undone: `current` goes back to the state's `from`;
/// - `current` dangling or pointing at a release without `.verified` is moved to the newest
///   verified release, preferring the state's `from`. Without any verified release it is left.
///
/// Returns what it did; when `restart_api` is set the caller restarts the API unit.
pub fn reconcile(install_dir: &Path) -> Result<Reconciled, UpdateError> {
    let mut out = Reconciled::default();
    if !install_dir.exists() {
        return Ok(out);
    }
    for entry in fs::read_dir(install_dir).map_err(fs_err("list", install_dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(&format!("{CURRENT}.new-"))
            && !pid_alive(pid)
        {
            fs::remove_file(entry.path()).map_err(fs_err("remove", &entry.path()))?;
            out.repairs.push(format!("removed the leftover link {name}"));
        }
    }
    let releases = install_dir.join(RELEASES);
    if let Ok(entries) = fs::read_dir(&releases) {
        for dir in entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
            let version = dir.file_name().to_string_lossy().into_owned();
            for f in fs::read_dir(dir.path()).map_err(fs_err("list", &dir.path()))?.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if let Some((_, pid)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".partial-"))
                    && !pid_alive(pid)
                {
                    fs::remove_file(f.path()).map_err(fs_err("remove", &f.path()))?;
                    out.repairs.push(format!("removed the interrupted download {version}/{name}"));
                }
            }
            fsutil::remove_stale_temps(&dir.path());
            if fs::read_dir(dir.path()).is_ok_and(|mut d| d.next().is_none()) && fs::remove_dir(dir.path()).is_ok() {
                out.repairs.push(format!("removed the empty release folder {version}"));
            }
        }
    }

    let state = read_state(install_dir);
    let current = current_version(install_dir)?;
    let has_artifact = |v: &str| {
        fs::read_dir(releases.join(v))
            .is_ok_and(|d| d.flatten().any(|e| !e.file_name().to_string_lossy().starts_with('.') && e.path().is_file()))
    };
    let link_exists = fs::symlink_metadata(install_dir.join(CURRENT)).is_ok();
    let mut target = None;
    let mut interrupted = None;
    if let Some(s) = &state
        && matches!(s.phase, Phase::Switching | Phase::RollingBack)
    {
        interrupted = Some(s.clone());
        match &s.from {
            Some(from) if has_artifact(from) => target = Some(from.clone()),
            _ => {}
        }
    }
    let current_ok = current.as_deref().is_some_and(|v| verified(install_dir, v) && has_artifact(v));
    if target.is_none() && !current_ok && (link_exists || current.is_some()) {
        let from = state.as_ref().and_then(|s| s.from.clone()).filter(|f| verified(install_dir, f) && has_artifact(f));
        target = from.or_else(|| {
            let mut all = list_releases(&releases).ok()?;
            all.retain(|r| r.verified && has_artifact(&r.version));
            all.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| compare_versions(&b.version, &a.version)));
            all.into_iter().next().map(|r| r.version)
        });
        if target.is_none() {
            out.repairs.push(format!(
                "current points at {}, which is not a verified release, and there is no verified release to point it at: left as it is",
                current.as_deref().unwrap_or("nothing")
            ));
        }
    }
    if let Some(t) = &target
        && current.as_deref() != Some(t)
    {
        switch_current(install_dir, t)?;
        out.repairs.push(format!("pointed current at {t} (it pointed at {})", current.as_deref().unwrap_or("nothing")));
        out.restart_api = true;
    }
    if let Some(s) = interrupted {
        out.restart_api = true;
        out.repairs.push(format!(
            "the update from {} to {} was interrupted before its health gate passed: undone",
            s.from.as_deref().unwrap_or("nothing"),
            s.to
        ));
        let done = State {
            phase: Phase::RolledBack,
            reason: Some("interrupted (caretaker stopped mid-update); undone on restart".into()),
            ..s
        };
        let text = serde_json::to_vec_pretty(&done).expect("state serializes");
        fsutil::write_atomic(&install_dir.join(STATE_FILE), &text, 0o644, None)?;
    }
    out.current = current_version(install_dir)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(install: &Install, v: &str, verified: bool) {
        fs::create_dir_all(install.release_dir(v)).unwrap();
        fs::write(install.artifact_path(v), v).unwrap();
        if verified {
            install.write_marker(v, &"0".repeat(64)).unwrap();
        }
    }

    #[test]
    fn switch_replaces_the_link_and_refuses_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let install = Install::new(dir.path(), "app");
        release(&install, "v1", true);
        release(&install, "v2", true);
        assert_eq!(install.current().unwrap(), None);
        install.switch("v1").unwrap();
        assert_eq!(install.current().unwrap().as_deref(), Some("v1"));
        install.switch("v2").unwrap();
        assert_eq!(fs::read_link(install.current_link()).unwrap(), Path::new("releases/v2"));
        assert_eq!(fs::read_to_string(dir.path().join("current/app")).unwrap(), "v2");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(!names.iter().any(|n| n.to_string_lossy().starts_with("current.new")), "{names:?}");

        let other = tempfile::tempdir().unwrap();
        fs::create_dir(other.path().join("current")).unwrap();
        let e = Install::new(other.path(), "app").switch("v1").unwrap_err();
        assert!(matches!(e, UpdateError::CurrentNotALink(_)), "{e}");
    }

    #[test]
    fn prune_keeps_the_newest_and_current_and_previous() {
        let dir = tempfile::tempdir().unwrap();
        let install = Install::new(dir.path(), "app");
        for v in ["v1", "v2", "v3", "v4", "v5"] {
            release(&install, v, true);
        }
        install.switch("v2").unwrap();
        let deleted = install.prune(2, Some("v1")).unwrap();
        assert_eq!(deleted, ["v3"]);
        let left: std::collections::BTreeSet<_> =
            fs::read_dir(install.releases()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(left, ["v1", "v2", "v4", "v5"].map(String::from).into());
    }

    #[test]
    fn reconcile_undoes_an_interrupted_switch() {
        let dir = tempfile::tempdir().unwrap();
        let install = Install::new(dir.path(), "app");
        release(&install, "v1", true);
        release(&install, "v2", true);
        install.switch("v2").unwrap();
        install
            .write_state(&State { from: Some("v1".into()), to: "v2".into(), phase: Phase::Switching, reason: None })
            .unwrap();
        let r = reconcile(dir.path()).unwrap();
        assert_eq!(r.current.as_deref(), Some("v1"));
        assert!(r.restart_api);
        assert_eq!(install.read_state().unwrap().phase, Phase::RolledBack);
        let again = reconcile(dir.path()).unwrap();
        assert_eq!(again, Reconciled { repairs: vec![], current: Some("v1".into()), restart_api: false });
    }

    #[test]
    fn reconcile_leaves_an_unverified_current_without_alternative() {
        let dir = tempfile::tempdir().unwrap();
        let install = Install::new(dir.path(), "app");
        release(&install, "v1", false);
        install.switch("v1").unwrap();
        let r = reconcile(dir.path()).unwrap();
        assert_eq!(r.current.as_deref(), Some("v1"));
        assert!(!r.restart_api);
        assert_eq!(r.repairs.len(), 1, "{r:?}");
    }
}
