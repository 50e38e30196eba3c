//! Secrets from SSM Parameter Store into one env file per service (`ENV_DIR/NAME.env`), for the
//! services' `EnvironmentFile=`.
//!
//! Fail closed, all or nothing: every file is rendered in memory first; a missing required
//! parameter, a malformed one or an unknown group stops the step before anything is written, so a
//! service never starts on half its settings. Each file is then replaced atomically (temp file with
//! the final mode from the start, fsync, rename), and a file that is already exactly right is left
//! alone. Values never reach logs or errors: the report and every message carry names only.
//!
//! Values are written double-quoted, as systemd's env-file parser reads them (`src/basic/env-file.c`,
//! `DOUBLE_QUOTE_VALUE`): inside double quotes a backslash escapes `"`, `\`, `` ` `` and `$`; any
//! other character, newline included, is taken as it is. A newline is therefore written as a
//! literal newline inside the quotes: `\n` would arrive as backslash-n, and a backslash before a
//! newline is eaten as a line continuation. Only NUL cannot be carried.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::aws::ssm::{SecretString, SsmClient, SsmError};
use crate::config::SecretsConfig;
use crate::fsutil::{self, FsError};

mod expand;
mod render;
#[cfg(test)]
mod tests;

pub use render::render;

/// Mode of a file read by root only.
pub const MODE_ROOT_ONLY: u32 = 0o600;
/// Mode of a file also read by the service's group.
pub const MODE_GROUP_READ: u32 = 0o640;
/// Mode of folders created on the way to the env dir.
pub const DIR_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("reading secrets failed, no env file was written: {0}")]
    Ssm(#[from] SsmError),
    #[error("{}", missing_message(.missing))]
    Missing { missing: Vec<MissingParameter> },
    #[error("env file {}: {message}; no env file was written", file.display())]
    Config { file: PathBuf, message: String },
    #[error("env file {}: SSM parameter {parameter} {message}; no env file was written", file.display())]
    BadParameter { file: PathBuf, parameter: String, message: String },
    #[error("env file {}: group `{group}` does not exist on this system; no env file was written", file.display())]
    UnknownGroup { file: PathBuf, group: String },
    #[error("env file {}: looking up group `{group}`: {source}; no env file was written", file.display())]
    GroupLookup { file: PathBuf, group: String, source: nix::Error },
    #[error("env dir {}: {reason}", path.display())]
    EnvDir { path: PathBuf, reason: String },
    #[error("writing env files: {0}")]
    Write(#[from] FsError),
    #[error("the env-file writer did not finish: {0}")]
    Task(String),
}

/// A required parameter that SSM does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingParameter {
    /// Full SSM name, e.g. `/zmanim/prod/db-password`.
    pub parameter: String,
    /// The env file that needs it.
    pub file: PathBuf,
}

fn missing_message(missing: &[MissingParameter]) -> String {
    let list: Vec<String> =
        missing.iter().map(|m| format!("{} (needed by {})", m.parameter, m.file.display())).collect();
    let noun = if missing.len() == 1 { "parameter is" } else { "parameters are" };
    format!(
        "required SSM {noun} missing: {}; no env file was written (create the parameter, or list it under `optional` of that file)",
        list.join(", ")
    )
}

/// One env file, rendered in memory and not yet written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedFile {
    /// `NAME` of `NAME.env`.
    pub name: String,
    pub path: PathBuf,
    /// [`MODE_ROOT_ONLY`] or [`MODE_GROUP_READ`].
    pub mode: u32,
    pub group: Option<String>,
    /// Variable names, in file order.
    pub vars: Vec<String>,
    /// Full names of the parameters used.
    pub parameters: Vec<String>,
    /// Full names of optional parameters that were absent (their variables are left out).
    pub omitted: Vec<String>,
    /// The whole file.
    pub contents: SecretString,
}

/// What happened to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileOutcome {
    Written,
    /// Content, mode and owner were already right; the file was not touched.
    Unchanged,
}

/// One file of a [`SecretsReport`]: names only, never values.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileReport {
    pub path: PathBuf,
    pub mode: u32,
    pub group: Option<String>,
    pub vars: Vec<String>,
    pub omitted: Vec<String>,
    pub outcome: FileOutcome,
}

/// What [`write_env_files`] did, for logs and status: names and counts, never values.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SecretsReport {
    pub ssm_path: String,
    pub parameters_read: usize,
    /// Parameters per `GetParametersByPath` page.
    pub pages: Vec<usize>,
    /// Throttled or failed calls that were retried.
    pub retries: u32,
    pub files: Vec<FileReport>,
    /// Parameters under the path that no file uses.
    pub unused_parameters: Vec<String>,
}

impl SecretsReport {
    pub fn written(&self) -> usize {
        self.files.iter().filter(|f| f.outcome == FileOutcome::Written).count()
    }

    pub fn unchanged(&self) -> usize {
        self.files.iter().filter(|f| f.outcome == FileOutcome::Unchanged).count()
    }
}

impl fmt::Display for SecretsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} env files ({} written, {} unchanged) from {} parameters under {} ({} pages, {} retries)",
            self.files.len(),
            self.written(),
            self.unchanged(),
            self.parameters_read,
            self.ssm_path,
            self.pages.len(),
            self.retries
        )
    }
}

/// Reads every parameter under `cfg.ssm_path`, renders all env files, and writes those that
/// changed. Nothing is written unless every file rendered.
pub async fn write_env_files(cfg: &SecretsConfig, ssm: &SsmClient) -> Result<SecretsReport, SecretsError> {
    let listing = ssm.read_path(&cfg.ssm_path).await?;
    let rendered = render(cfg, &listing.parameters)?;
    let used: BTreeSet<&str> = rendered.iter().flat_map(|f| f.parameters.iter().map(String::as_str)).collect();
    let unused_parameters: Vec<String> =
        listing.parameters.iter().map(|p| p.name.clone()).filter(|n| !used.contains(n.as_str())).collect();
    let env_dir = cfg.env_dir.clone();
    let outcomes = tokio::task::spawn_blocking(move || write_rendered(&env_dir, &rendered).map(|o| (rendered, o)))
        .await
        .map_err(|e| SecretsError::Task(e.to_string()))?;
    let (rendered, outcomes) = outcomes?;
    let files: Vec<FileReport> = rendered
        .into_iter()
        .zip(outcomes)
        .map(|(r, outcome)| FileReport {
            path: r.path,
            mode: r.mode,
            group: r.group,
            vars: r.vars,
            omitted: r.omitted,
            outcome,
        })
        .collect();
    for f in &files {
        info!(
            file = %f.path.display(),
            mode = %format_args!("{:o}", f.mode),
            group = f.group.as_deref().unwrap_or("root"),
            vars = f.vars.join(","),
            outcome = ?f.outcome,
            "env file {} ({:?}, mode {:o}, group {}): {}",
            f.path.display(),
            f.outcome,
            f.mode,
            f.group.as_deref().unwrap_or("root"),
            f.vars.join(", ")
        );
        if !f.omitted.is_empty() {
            warn!(file = %f.path.display(), absent = f.omitted.join(","), "optional parameters absent; their variables are left out");
        }
    }
    let report = SecretsReport {
        ssm_path: cfg.ssm_path.clone(),
        parameters_read: listing.parameters.len(),
        pages: listing.pages,
        retries: listing.retries,
        files,
        unused_parameters,
    };
    info!("{report}");
    Ok(report)
}

/// Owner (uid, gid) of each file: the writer, with the file's group when it has one. All groups are
/// looked up before anything is written.
fn owners(files: &[RenderedFile]) -> Result<Vec<(u32, u32)>, SecretsError> {
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    files
        .iter()
        .map(|f| match &f.group {
            None => Ok((uid, gid)),
            Some(group) => match nix::unistd::Group::from_name(group) {
                Ok(Some(g)) => Ok((uid, g.gid.as_raw())),
                Ok(None) => Err(SecretsError::UnknownGroup { file: f.path.clone(), group: group.clone() }),
                Err(source) => Err(SecretsError::GroupLookup { file: f.path.clone(), group: group.clone(), source }),
            },
        })
        .collect()
}

/// Creates `dir` and any missing parents with [`DIR_MODE`] (exactly, whatever the umask).
/// Existing folders are left as they are.
fn ensure_dir(dir: &Path) -> Result<(), SecretsError> {
    let fail = |reason: String| SecretsError::EnvDir { path: dir.to_path_buf(), reason };
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => return Err(fail("exists and is not a folder".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e.to_string())),
    }
    let mut to_create = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        to_create.push(d);
        cur = d.parent();
    }
    for d in to_create.into_iter().rev() {
        match fs::DirBuilder::new().mode(DIR_MODE).create(d) {
            Ok(()) => {
                fs::set_permissions(d, fs::Permissions::from_mode(DIR_MODE))
                    .map_err(|e| fail(format!("chmod {}: {e}", d.display())))?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(fail(format!("creating {}: {e}", d.display()))),
        }
    }
    Ok(())
}

/// Is the file at `path` already exactly `contents`, with `mode` and `owner`? A symlink or anything
/// but a plain file is never "right".
fn up_to_date(path: &Path, contents: &[u8], mode: u32, owner: (u32, u32)) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else { return false };
    if !meta.file_type().is_file()
        || meta.mode() & 0o7777 != mode
        || (meta.uid(), meta.gid()) != owner
        || meta.len() != contents.len() as u64
    {
        return false;
    }
    let Ok(mut f) = fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW).open(path) else {
        return false;
    };
    let mut now = Vec::with_capacity(contents.len());
    f.read_to_end(&mut now).is_ok() && now == contents
}

/// Writes the rendered files into `env_dir` (blocking I/O).
fn write_rendered(env_dir: &Path, files: &[RenderedFile]) -> Result<Vec<FileOutcome>, SecretsError> {
    let owners = owners(files)?;
    ensure_dir(env_dir)?;
    let mut outcomes = Vec::with_capacity(files.len());
    for (f, owner) in files.iter().zip(owners) {
        let bytes = f.contents.expose().as_bytes();
        if up_to_date(&f.path, bytes, f.mode, owner) {
            outcomes.push(FileOutcome::Unchanged);
        } else {
            fsutil::write_atomic(&f.path, bytes, f.mode, Some(owner))?;
            outcomes.push(FileOutcome::Written);
        }
    }
    Ok(outcomes)
}
