//! The services' folders on the data volume: created with tight modes, owned by the service users
//! of *this* image (a new image may number them differently than the one that wrote the volume),
//! and PostgreSQL's initialised with `initdb` when empty. A non-empty data directory is never
//! touched beyond its ownership.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::unistd::User;
use serde::Serialize;
use tracing::info;

use crate::config::ServicesConfig;

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("service user `{user}` (for {}) does not exist on this image", dir.display())]
    NoUser { user: String, dir: PathBuf },
    #[error("{action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("initdb for {} failed ({status}): {stderr}", dir.display())]
    Initdb { dir: PathBuf, status: String, stderr: String },
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct DataDirsOutcome {
    pub created: Vec<PathBuf>,
    /// Trees whose owner was changed to this image's service user.
    pub rechowned: Vec<PathBuf>,
    pub initialised: bool,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DataDirError + 'a {
    move |source| DataDirError::Io { action, path: path.to_path_buf(), source }
}

/// Changes the owner of every entry under `root` (symlinks themselves, not their targets).
fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<(), DataDirError> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).map_err(io("chown", &p))?;
        let meta = std::fs::symlink_metadata(&p).map_err(io("stat", &p))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&p).map_err(io("list", &p))? {
                stack.push(entry.map_err(io("list", &p))?.path());
            }
        }
    }
    Ok(())
}

/// Makes `dir` exist with `mode`, owned by `user`; fixes the owner of an existing tree that
/// belongs to someone else. Returns (created, rechowned).
fn ensure_dir(dir: &Path, user: &str, mode: u32) -> Result<(bool, bool), DataDirError> {
    let u = User::from_name(user)
        .ok()
        .flatten()
        .ok_or_else(|| DataDirError::NoUser { user: user.to_string(), dir: dir.to_path_buf() })?;
    let (uid, gid) = (u.uid.as_raw(), u.gid.as_raw());
    let mut created = false;
    let mut rechowned = false;
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", dir))?;
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(io("chown", dir))?;
            info!(dir = %dir.display(), user, "created {} (owner {user}, mode {mode:o})", dir.display());
            created = true;
        }
        Err(e) => return Err(DataDirError::Io { action: "stat", path: dir.into(), source: e }),
        Ok(meta) => {
            if meta.uid() != uid || meta.gid() != gid {
                info!(dir = %dir.display(), user, old_uid = meta.uid(), new_uid = uid,
                    "{}: owner uid {} differs from this image's {user} (uid {uid}; new image, old volume?): fixing ownership", dir.display(), meta.uid());
                chown_tree(dir, uid, gid)?;
                rechowned = true;
            }
            if meta.mode() & 0o777 != mode {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", dir))?;
            }
        }
    }
    Ok((created, rechowned))
}

/// Prepares the PostgreSQL and Redis folders, and initialises an empty PostgreSQL directory.
pub fn prepare(services: &ServicesConfig) -> Result<DataDirsOutcome, DataDirError> {
    let mut out = prepare_dirs(services)?;
    out.initialised = initdb_if_empty(services)?;
    Ok(out)
}

/// The PostgreSQL and Redis folders, with their owners and modes; nothing initialised.
pub fn prepare_dirs(services: &ServicesConfig) -> Result<DataDirsOutcome, DataDirError> {
    let mut out = DataDirsOutcome::default();
    let pg = &services.postgres;
    let redis = &services.redis;
    for (dir, user, mode) in [(&pg.data_dir, &pg.user, 0o700), (&redis.data_dir, &redis.user, 0o750)] {
        let (created, rechowned) = ensure_dir(dir, user, mode)?;
        if created {
            out.created.push(dir.clone());
        }
        if rechowned {
            out.rechowned.push(dir.clone());
        }
    }
    Ok(out)
}

/// Runs `initdb` (as the PostgreSQL user) when the data directory is empty; whether it did.
pub fn initdb_if_empty(services: &ServicesConfig) -> Result<bool, DataDirError> {
    let pg = &services.postgres;
    let empty = std::fs::read_dir(&pg.data_dir).map_err(io("list", &pg.data_dir))?.next().is_none();
    if empty {
        info!(dir = %pg.data_dir.display(), "PostgreSQL data directory is empty: running initdb");
        let dir = pg.data_dir.to_string_lossy().into_owned();
        // setpriv, not su/runuser: no PAM session, supplementary groups cleared.
        let output = Command::new("setpriv")
            .arg(format!("--reuid={}", pg.user))
            .arg(format!("--regid={}", pg.user))
            .arg("--clear-groups")
            .arg("--")
            .arg(&pg.initdb)
            .arg("-D")
            .arg(&dir)
            .args(&pg.initdb_args)
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(io("run initdb for", &pg.data_dir))?;
        if !output.status.success() || !pg.data_dir.join("PG_VERSION").exists() {
            return Err(DataDirError::Initdb {
                dir: pg.data_dir.clone(),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        return Ok(true);
    }
    Ok(false)
}
