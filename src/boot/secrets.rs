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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::aws::ssm::{Parameter, SecretString, SsmClient, SsmError};
use crate::config::{EnvFileConfig, SecretsConfig};
use crate::fsutil::{self, FsError};

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
            "env file"
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

/// Renders every configured env file from `params` (full SSM names). Pure: no I/O.
pub fn render(cfg: &SecretsConfig, params: &[Parameter]) -> Result<Vec<RenderedFile>, SecretsError> {
    let prefix = if cfg.ssm_path.ends_with('/') { cfg.ssm_path.clone() } else { format!("{}/", cfg.ssm_path) };
    let by_name: BTreeMap<&str, &Parameter> = params.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut missing = Vec::new();
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for file in &cfg.files {
        let path = cfg.env_dir.join(format!("{}.env", file.name));
        check_file_name(&file.name).map_err(|message| SecretsError::Config { file: path.clone(), message })?;
        if !names.insert(file.name.as_str()) {
            return Err(SecretsError::Config { file: path, message: "configured twice".into() });
        }
        let mut r = FileRenderer { cfg, file, prefix: &prefix, by_name: &by_name, path, missing: &mut missing };
        if let Some(rendered) = r.render()? {
            out.push(rendered);
        }
    }
    if !missing.is_empty() {
        return Err(SecretsError::Missing { missing });
    }
    Ok(out)
}

/// Where a variable came from, for messages about clashes.
#[derive(Clone)]
enum Source {
    Var(String),
    Template,
    Expand(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Var(p) => write!(f, "vars (parameter {p})"),
            Source::Template => f.write_str("templates"),
            Source::Expand(p) => write!(f, "expand of parameter {p}"),
        }
    }
}

struct FileRenderer<'a> {
    cfg: &'a SecretsConfig,
    file: &'a EnvFileConfig,
    prefix: &'a str,
    by_name: &'a BTreeMap<&'a str, &'a Parameter>,
    path: PathBuf,
    missing: &'a mut Vec<MissingParameter>,
}

impl<'a> FileRenderer<'a> {
    fn config_error(&self, message: String) -> SecretsError {
        SecretsError::Config { file: self.path.clone(), message }
    }

    fn bad_parameter(&self, parameter: &str, message: String) -> SecretsError {
        SecretsError::BadParameter { file: self.path.clone(), parameter: parameter.to_string(), message }
    }

    /// The full SSM name of a reference (`db-password` → `/zmanim/prod/db-password`).
    fn full_name(&self, reference: &str) -> Result<String, SecretsError> {
        let ok_chars = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
        let full = if reference.starts_with('/') {
            if !reference.starts_with(self.prefix) {
                return Err(self.config_error(format!(
                    "parameter `{reference}` is not under secrets.ssm-path {}, which is all that is read",
                    self.cfg.ssm_path
                )));
            }
            reference.to_string()
        } else {
            format!("{}{reference}", self.prefix)
        };
        if reference.is_empty() || !ok_chars(reference) || full.ends_with('/') || full.contains("//") {
            return Err(self.config_error(format!("`{reference}` is not a parameter name")));
        }
        Ok(full)
    }

    /// The value of a referenced parameter: `Ok(None)` when it is absent (recorded as missing when
    /// it is required).
    fn lookup(&mut self, reference: &str, used: &mut Vec<String>) -> Result<Option<&'a SecretString>, SecretsError> {
        let full = self.full_name(reference)?;
        let Some(p) = self.by_name.get(full.as_str()).copied() else {
            let optional = self.file.optional.iter().any(|o| o == reference || *o == full);
            if !optional && !self.missing.iter().any(|m| m.parameter == full && m.file == self.path) {
                self.missing.push(MissingParameter { parameter: full, file: self.path.clone() });
            }
            return Ok(None);
        };
        if p.value.expose().contains('\0') {
            return Err(self.bad_parameter(&full, "contains a NUL byte, which an env file cannot carry".into()));
        }
        if !used.contains(&full) {
            used.push(full);
        }
        Ok(Some(&p.value))
    }

    fn render(&mut self) -> Result<Option<RenderedFile>, SecretsError> {
        let file = self.file;
        let mut entries: Vec<(String, String)> = Vec::new();
        let mut sources: BTreeMap<String, Source> = BTreeMap::new();
        let mut used = Vec::new();
        let mut omitted = Vec::new();
        let missing_before = self.missing.len();

        let mut add = |this: &Self, key: String, value: String, source: Source| -> Result<(), SecretsError> {
            if let Some(earlier) = sources.get(&key) {
                return Err(this.config_error(format!("variable {key} is set twice: by {earlier} and by {source}")));
            }
            sources.insert(key.clone(), source);
            entries.push((key, value));
            Ok(())
        };

        for (key, reference) in &file.vars {
            if !is_env_name(key) {
                return Err(self.config_error(format!("vars: `{key}` is not a variable name ({NAME_RULE})")));
            }
            match self.lookup(reference, &mut used)? {
                Some(v) => {
                    let v = v.expose().to_string();
                    add(self, key.clone(), v, Source::Var(self.full_name(reference)?))?
                }
                None => omitted.push(self.full_name(reference)?),
            }
        }

        for (key, template) in &file.templates {
            if !is_env_name(key) {
                return Err(self.config_error(format!("templates: `{key}` is not a variable name ({NAME_RULE})")));
            }
            let pieces =
                parse_template(template).map_err(|reason| self.config_error(format!("templates: {key}: {reason}")))?;
            let mut value = String::new();
            let mut complete = true;
            for piece in &pieces {
                match piece {
                    Piece::Text(t) => value.push_str(t),
                    Piece::Param(reference) => match self.lookup(reference, &mut used)? {
                        Some(v) => value.push_str(v.expose()),
                        None => {
                            complete = false;
                            omitted.push(self.full_name(reference)?);
                        }
                    },
                }
            }
            if complete {
                add(self, key.clone(), value, Source::Template)?;
            }
        }

        for reference in &file.expand {
            let Some(v) = self.lookup(reference, &mut used)? else {
                omitted.push(self.full_name(reference)?);
                continue;
            };
            let full = self.full_name(reference)?;
            let pairs = expand(v.expose()).map_err(|reason| self.bad_parameter(&full, reason))?;
            for (key, value) in pairs {
                add(self, key, value, Source::Expand(full.clone()))?;
            }
        }

        // Parameters were checked for NUL already; a template's own text may still hold one.
        if let Some((key, _)) = entries.iter().find(|(_, v)| v.contains('\0')) {
            return Err(self.config_error(format!("variable {key} would contain a NUL byte")));
        }
        if self.missing.len() > missing_before {
            // Required parameters are missing: keep going only to name them all.
            return Ok(None);
        }
        omitted.sort();
        omitted.dedup();
        let mut contents = format!(
            "# Written by caretaker from SSM parameters under {}; replaced at every boot, do not edit.\n",
            self.cfg.ssm_path.replace('\n', " ")
        );
        for (key, value) in &entries {
            contents.push_str(key);
            contents.push('=');
            contents.push_str(&quote_value(value));
            contents.push('\n');
        }
        Ok(Some(RenderedFile {
            name: file.name.clone(),
            path: self.path.clone(),
            mode: if file.group.is_some() { MODE_GROUP_READ } else { MODE_ROOT_ONLY },
            group: file.group.clone(),
            vars: entries.into_iter().map(|(k, _)| k).collect(),
            parameters: used,
            omitted,
            contents: SecretString::new(contents),
        }))
    }
}

const NAME_RULE: &str = "[A-Za-z_][A-Za-z0-9_]*";

/// `[A-Za-z_][A-Za-z0-9_]*`: a name every shell and every program reading its environment agrees on.
pub fn is_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn check_file_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
    if ok { Ok(()) } else { Err(format!("`{name}` is not a usable file name (letters, digits, `._@-`)")) }
}

/// `value` as a double-quoted systemd env-file value (see the module comment for the rules).
/// The caller rejects NUL first.
pub fn quote_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\' | '$' | '`') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Reads `key` back from an env file written by [`write_env_files`] (the inverse of
/// [`quote_value`]); `None` when the file or the key is absent.
pub fn read_env_var(path: &Path, key: &str) -> std::io::Result<Option<SecretString>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let prefix = format!("{key}=\"");
    let mut rest = text.as_str();
    while !rest.is_empty() {
        if let Some(body) = rest.strip_prefix(&prefix) {
            let mut value = String::new();
            let mut chars = body.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => return Ok(Some(SecretString::new(value))),
                    c => value.push(c),
                }
            }
            return Ok(None);
        }
        // Skip this line; a quoted value may span lines, but keys start only after a newline
        // that ends a closed value, and our values never contain an unescaped `"`.
        let mut in_quotes = false;
        let mut escaped = false;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match (c, escaped) {
                (_, true) => escaped = false,
                ('\\', false) => escaped = true,
                ('"', false) => in_quotes = !in_quotes,
                ('\n', false) if !in_quotes => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[end..];
    }
    Ok(None)
}

#[derive(Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Param(String),
}

/// `text {param} more {{literal}}` → pieces. Errors describe the template, which holds no secrets.
fn parse_template(t: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = t.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let rest = &t[i + 1..];
                let end = rest
                    .find('}')
                    .ok_or_else(|| format!("`{{` at byte {i} is never closed (write `{{{{` for a literal brace)"))?;
                let name = &rest[..end];
                if name.is_empty() || name.contains('{') {
                    return Err(format!("`{{` at byte {i} does not start a `{{parameter-name}}` placeholder"));
                }
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Param(name.to_string()));
                for _ in 0..name.chars().count() + 1 {
                    chars.next();
                }
            }
            '}' => return Err(format!("lone `}}` at byte {i} (write `}}}}` for a literal brace)")),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// A parameter holding `KEY=VALUE` lines or a JSON object → its variables, in order. Errors name a
/// line or a key position, never a value (a malformed line could be a secret itself).
fn expand(value: &str) -> Result<Vec<(String, String)>, String> {
    if value.trim_start().starts_with('{') {
        return expand_json(value);
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for (n, line) in value.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line).trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map(str::trim_start).unwrap_or(line);
        let Some((key, v)) = line.split_once('=') else {
            return Err(format!("line {} is not KEY=VALUE, a `#` comment or blank", n + 1));
        };
        let key = key.trim();
        if !is_env_name(key) {
            return Err(format!("line {}: the key is not a variable name ({NAME_RULE})", n + 1));
        }
        let v = v.trim();
        let v = match (v.chars().next(), v.chars().last()) {
            (Some(q @ ('"' | '\'')), Some(e)) if v.len() >= 2 && q == e => &v[1..v.len() - 1],
            _ => v,
        };
        if out.iter().any(|(k, _)| k == key) {
            return Err(format!("line {}: {key} is set twice", n + 1));
        }
        out.push((key.to_string(), v.to_string()));
    }
    Ok(out)
}

/// A JSON object's members in document order (serde_json's `Map` sorts them), so that errors can
/// point at "key #N" and variables come out in the order written.
struct OrderedObject(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for OrderedObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<OrderedObject, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(OrderedObject(members))
            }
        }
        d.deserialize_map(Members)
    }
}

fn expand_json(value: &str) -> Result<Vec<(String, String)>, String> {
    // Only the position of a JSON error: serde_json's message can quote the text.
    let OrderedObject(members) = serde_json::from_str(value).map_err(|e| {
        format!(
            "is not a JSON object of strings, numbers and booleans (error at line {} column {})",
            e.line(),
            e.column()
        )
    })?;
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, (key, v)) in members.into_iter().enumerate() {
        if !is_env_name(&key) {
            return Err(format!("key #{} of the JSON object is not a variable name ({NAME_RULE})", i + 1));
        }
        let v = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            other => {
                let kind = match other {
                    serde_json::Value::Null => "null",
                    serde_json::Value::Array(_) => "an array",
                    _ => "an object",
                };
                return Err(format!(
                    "key {key} of the JSON object is {kind}; only strings, numbers and booleans expand"
                ));
            }
        };
        if out.iter().any(|(k, _)| *k == key) {
            return Err(format!("key {key} appears twice in the JSON object"));
        }
        out.push((key, v));
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::ssm::ParameterKind;

    fn param(name: &str, value: &str) -> Parameter {
        Parameter { name: name.into(), value: SecretString::new(value), kind: ParameterKind::SecureString }
    }

    fn cfg(files: Vec<EnvFileConfig>) -> SecretsConfig {
        SecretsConfig { ssm_path: "/app/prod/".into(), env_dir: "/run/test-env".into(), files }
    }

    fn file(name: &str) -> EnvFileConfig {
        EnvFileConfig { name: name.into(), ..Default::default() }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// systemd's env-file parser (`parse_env_file_internal` in src/basic/env-file.c), ported state
    /// for state, so that what we write is checked against what systemd will read.
    fn systemd_parse(text: &str) -> Vec<(String, String)> {
        #[derive(Clone, Copy, PartialEq)]
        enum S {
            PreKey,
            Key,
            PreValue,
            Value,
            ValueEscape,
            Single,
            Double,
            DoubleEscape,
            Comment,
            CommentEscape,
        }
        let ws = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r');
        let nl = |c: char| matches!(c, '\n' | '\r');
        let mut out = Vec::new();
        let (mut key, mut value) = (String::new(), String::new());
        let (mut last_key_ws, mut last_value_ws): (Option<usize>, Option<usize>) = (None, None);
        let mut s = S::PreKey;
        let push = |out: &mut Vec<(String, String)>, key: &mut String, value: &mut String, lk: Option<usize>| {
            if let Some(n) = lk {
                key.truncate(n);
            }
            out.push((std::mem::take(key), std::mem::take(value)));
        };
        for c in text.chars() {
            match s {
                S::PreKey => {
                    if c == '#' || c == ';' {
                        s = S::Comment;
                    } else if !ws(c) {
                        s = S::Key;
                        last_key_ws = None;
                        key.push(c);
                    }
                }
                S::Key => {
                    if nl(c) {
                        s = S::PreKey;
                        key.clear();
                    } else if c == '=' {
                        s = S::PreValue;
                        last_value_ws = None;
                    } else {
                        if !ws(c) {
                            last_key_ws = None;
                        } else if last_key_ws.is_none() {
                            last_key_ws = Some(key.len());
                        }
                        key.push(c);
                    }
                }
                S::PreValue => {
                    if nl(c) {
                        s = S::PreKey;
                        push(&mut out, &mut key, &mut value, last_key_ws);
                    } else if c == '\'' {
                        s = S::Single;
                    } else if c == '"' {
                        s = S::Double;
                    } else if c == '\\' {
                        s = S::ValueEscape;
                    } else if !ws(c) {
                        s = S::Value;
                        value.push(c);
                    }
                }
                S::Value => {
                    if nl(c) {
                        s = S::PreKey;
                        if let Some(n) = last_value_ws {
                            value.truncate(n);
                        }
                        push(&mut out, &mut key, &mut value, last_key_ws);
                    } else if c == '\\' {
                        s = S::ValueEscape;
                        last_value_ws = None;
                    } else {
                        if !ws(c) {
                            last_value_ws = None;
                        } else if last_value_ws.is_none() {
                            last_value_ws = Some(value.len());
                        }
                        value.push(c);
                    }
                }
                S::ValueEscape => {
                    s = S::Value;
                    if !nl(c) {
                        value.push(c);
                    }
                }
                S::Single => {
                    if c == '\'' {
                        s = S::PreValue;
                    } else {
                        value.push(c);
                    }
                }
                S::Double => {
                    if c == '"' {
                        s = S::PreValue;
                    } else if c == '\\' {
                        s = S::DoubleEscape;
                    } else {
                        value.push(c);
                    }
                }
                S::DoubleEscape => {
                    s = S::Double;
                    if "\"\\`$".contains(c) {
                        value.push(c);
                    } else if c != '\n' {
                        value.push('\\');
                        value.push(c);
                    }
                }
                S::Comment => {
                    if c == '\\' {
                        s = S::CommentEscape;
                    } else if nl(c) {
                        s = S::PreKey;
                    }
                }
                S::CommentEscape => {
                    s = if nl(c) { S::PreKey } else { S::Comment };
                }
            }
        }
        if matches!(s, S::PreValue | S::Value | S::ValueEscape | S::Single | S::Double | S::DoubleEscape) {
            if s == S::Value
                && let Some(n) = last_value_ws
            {
                value.truncate(n);
            }
            push(&mut out, &mut key, &mut value, last_key_ws);
        }
        out
    }

    fn parsed(f: &RenderedFile) -> Vec<(String, String)> {
        systemd_parse(f.contents.expose())
    }

    #[test]
    fn vars_one_parameter_each() {
        let mut f = file("api");
        f.vars = map(&[("DB_PASSWORD", "db-password"), ("API_KEY", "nested/api-key")]);
        let params = [param("/app/prod/db-password", "pw"), param("/app/prod/nested/api-key", "k1")];
        let out = render(&cfg(vec![f]), &params).unwrap();
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert_eq!(r.path, Path::new("/run/test-env/api.env"));
        assert_eq!(r.mode, 0o600);
        assert_eq!(r.vars, ["API_KEY", "DB_PASSWORD"]);
        assert_eq!(parsed(r), [("API_KEY".into(), "k1".into()), ("DB_PASSWORD".into(), "pw".into())]);
        assert!(r.contents.expose().starts_with("# Written by caretaker"));
        assert!(r.contents.expose().ends_with("API_KEY=\"k1\"\nDB_PASSWORD=\"pw\"\n"));
    }

    #[test]
    fn templates_substitute_and_escape_braces() {
        let mut f = file("api");
        f.templates = map(&[
            ("DATABASE_URL", "postgres://zmanim:{db-password}@127.0.0.1:5432/zmanim"),
            ("BRACES", "{{literal}} {user}-{{x}}"),
        ]);
        let params = [param("/app/prod/db-password", "p@ss"), param("/app/prod/user", "bob")];
        let r = &render(&cfg(vec![f]), &params).unwrap()[0];
        assert_eq!(
            parsed(r),
            [
                ("BRACES".into(), "{literal} bob-{x}".into()),
                ("DATABASE_URL".into(), "postgres://zmanim:p@ss@127.0.0.1:5432/zmanim".into())
            ]
        );
        assert_eq!(r.parameters, ["/app/prod/user", "/app/prod/db-password"]);
    }

    #[test]
    fn bad_templates_are_config_errors() {
        for (t, needle) in [("a {x", "never closed"), ("a } b", "lone"), ("a {} b", "placeholder")] {
            let mut f = file("api");
            f.templates = map(&[("T", t)]);
            let e = render(&cfg(vec![f]), &[param("/app/prod/x", "v")]).unwrap_err();
            assert!(matches!(e, SecretsError::Config { .. }) && e.to_string().contains(needle), "{t}: {e}");
        }
    }

    #[test]
    fn expand_key_value_lines() {
        let mut f = file("api");
        f.expand = vec!["config".into()];
        let text = "# settings\n\nLOG_LEVEL=info\r\n  export PORT = 8080\nGREETING=\"hello world\"\nEMPTY=\nURL=a=b\n";
        let r = &render(&cfg(vec![f]), &[param("/app/prod/config", text)]).unwrap()[0];
        assert_eq!(
            parsed(r),
            [
                ("LOG_LEVEL".into(), "info".into()),
                ("PORT".into(), "8080".into()),
                ("GREETING".into(), "hello world".into()),
                ("EMPTY".into(), "".into()),
                ("URL".into(), "a=b".into()),
            ]
        );
    }

    #[test]
    fn expand_json_object() {
        let mut f = file("api");
        f.expand = vec!["config".into()];
        let text = r#"{"A": "x y", "C": true, "B": 42, "E": "line1\nline2", "D": 1.5}"#;
        let r = &render(&cfg(vec![f]), &[param("/app/prod/config", text)]).unwrap()[0];
        assert_eq!(
            parsed(r),
            [
                ("A".into(), "x y".into()),
                ("C".into(), "true".into()),
                ("B".into(), "42".into()),
                ("E".into(), "line1\nline2".into()),
                ("D".into(), "1.5".into()),
            ]
        );
    }

    #[test]
    fn expand_rejects_bad_keys_and_shapes_without_quoting_values() {
        for (text, needle) in [
            ("GOOD=1\n9BAD=secret-value-1\n", "line 2: the key is not a variable name"),
            ("GOOD=1\nsecret-value-1\n", "line 2 is not KEY=VALUE"),
            (r#"{"ok": "1", "bad-key": "secret-value-1"}"#, "key #2"),
            (r#"{"A": null}"#, "null"),
            (r#"{"A": ["secret-value-1"]}"#, "an array"),
            (r#"{"A": "secret-value-1""#, "not a JSON object"),
            (r#"["secret-value-1"]"#, "not KEY=VALUE"),
            (r#"{"A": "1", "A": "secret-value-1"}"#, "appears twice"),
            ("A=1\nA=secret-value-1\n", "set twice"),
        ] {
            let mut f = file("api");
            f.expand = vec!["config".into()];
            let e = render(&cfg(vec![f]), &[param("/app/prod/config", text)]).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, SecretsError::BadParameter { .. }), "{text}: {msg}");
            assert!(msg.contains(needle) && msg.contains("/app/prod/config"), "{text}: {msg}");
            assert!(!msg.contains("secret-value") && !format!("{e:?}").contains("secret-value"), "{msg}");
        }
    }

    #[test]
    fn escaping_round_trips_through_systemds_parser() {
        let nasty = [
            "plain",
            "",
            "with \"double\" and 'single' quotes",
            "dollar $HOME ${PATH} $$",
            "back`tick` and \\backslash\\ and \\\\ and trailing \\",
            "line1\nline2\n\nline4\n",
            "crlf\r\nend",
            "  leading and trailing spaces  ",
            "\\\n backslash before newline",
            "# not a comment; nor this",
            "tab\there, unicode ✓ שלום, emoji 🔑",
            "\\\"$`",
        ];
        let mut f = file("api");
        let mut params = Vec::new();
        for (i, v) in nasty.iter().enumerate() {
            f.vars.insert(format!("V{i:02}"), format!("p{i}"));
            params.push(param(&format!("/app/prod/p{i}"), v));
        }
        let r = &render(&cfg(vec![f]), &params).unwrap()[0];
        let got = parsed(r);
        assert_eq!(got.len(), nasty.len());
        for (i, v) in nasty.iter().enumerate() {
            assert_eq!(got[i], (format!("V{i:02}"), v.to_string()), "value {i}");
        }
    }

    #[test]
    fn read_env_var_inverts_quote_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.env");
        let tricky = "a\"b$c`d\\e\nline2";
        std::fs::write(&p, format!("FIRST={}\nSECOND={}\n", quote_value("multi\nline \"x\""), quote_value(tricky)))
            .unwrap();
        assert_eq!(read_env_var(&p, "SECOND").unwrap().unwrap().expose(), tricky);
        assert_eq!(read_env_var(&p, "FIRST").unwrap().unwrap().expose(), "multi\nline \"x\"");
        assert!(read_env_var(&p, "THIRD").unwrap().is_none());
        assert!(read_env_var(&dir.path().join("none"), "X").unwrap().is_none());
    }

    #[test]
    fn quoting_rules() {
        assert_eq!(quote_value(r#"a"b\c$d`e"#), r#""a\"b\\c\$d\`e""#);
        assert_eq!(quote_value("x\ny"), "\"x\ny\"");
    }

    #[test]
    fn a_nul_byte_is_rejected() {
        let mut f = file("api");
        f.vars = map(&[("A", "a")]);
        let e = render(&cfg(vec![f]), &[param("/app/prod/a", "x\0y")]).unwrap_err();
        assert!(e.to_string().contains("NUL") && e.to_string().contains("/app/prod/a"), "{e}");
        let mut f = file("api");
        f.templates = map(&[("T", "a\0b")]);
        let e = render(&cfg(vec![f]), &[]).unwrap_err();
        assert!(e.to_string().contains("variable T would contain a NUL byte"), "{e}");
    }

    #[test]
    fn missing_required_parameters_are_all_named_and_nothing_renders() {
        let mut a = file("api");
        a.vars = map(&[("DB_PASSWORD", "db-password"), ("OK", "present")]);
        a.templates = map(&[("URL", "x://{token}")]);
        let mut b = file("worker");
        b.expand = vec!["worker-config".into()];
        let e = render(&cfg(vec![a, b]), &[param("/app/prod/present", "secret-value-1")]).unwrap_err();
        let SecretsError::Missing { missing } = &e else { panic!("{e}") };
        let names: Vec<_> = missing.iter().map(|m| (m.parameter.as_str(), m.file.to_str().unwrap())).collect();
        assert_eq!(
            names,
            [
                ("/app/prod/db-password", "/run/test-env/api.env"),
                ("/app/prod/token", "/run/test-env/api.env"),
                ("/app/prod/worker-config", "/run/test-env/worker.env"),
            ]
        );
        let msg = e.to_string();
        assert!(msg.contains("/app/prod/db-password (needed by /run/test-env/api.env)"), "{msg}");
        assert!(msg.contains("no env file was written") && !msg.contains("secret-value"), "{msg}");
    }

    #[test]
    fn optional_missing_parameters_leave_their_variables_out() {
        let mut f = file("api");
        f.vars = map(&[("SENTRY_DSN", "sentry-dsn"), ("DB_PASSWORD", "db-password")]);
        f.templates = map(&[("URL", "x://{token}/{db-password}")]);
        f.expand = vec!["extra".into()];
        f.optional = vec!["sentry-dsn".into(), "/app/prod/token".into(), "extra".into()];
        let r = &render(&cfg(vec![f]), &[param("/app/prod/db-password", "pw")]).unwrap()[0];
        assert_eq!(r.vars, ["DB_PASSWORD"]);
        assert_eq!(r.omitted, ["/app/prod/extra", "/app/prod/sentry-dsn", "/app/prod/token"]);
        assert_eq!(parsed(r), [("DB_PASSWORD".into(), "pw".into())]);
    }

    #[test]
    fn clashes_bad_names_and_foreign_paths_are_config_errors() {
        let mut clash = file("api");
        clash.vars = map(&[("A", "a")]);
        clash.expand = vec!["cfg".into()];
        let params = [param("/app/prod/a", "1"), param("/app/prod/cfg", "A=2")];
        let e = render(&cfg(vec![clash]), &params).unwrap_err();
        assert!(e.to_string().contains("variable A is set twice"), "{e}");

        let mut bad_key = file("api");
        bad_key.vars = map(&[("BAD-KEY", "a")]);
        assert!(render(&cfg(vec![bad_key]), &params).unwrap_err().to_string().contains("BAD-KEY"));

        let mut foreign = file("api");
        foreign.vars = map(&[("A", "/other/a")]);
        assert!(render(&cfg(vec![foreign]), &params).unwrap_err().to_string().contains("not under"));

        for name in ["../x", "", ".hidden", "a/b"] {
            let e = render(&cfg(vec![file(name)]), &params).unwrap_err();
            assert!(e.to_string().contains("not a usable file name"), "{name}: {e}");
        }
        let e = render(&cfg(vec![file("api"), file("api")]), &params).unwrap_err();
        assert!(e.to_string().contains("configured twice"), "{e}");
    }

    #[test]
    fn group_files_are_0640() {
        let mut f = file("api");
        f.group = Some("zmanim".into());
        let r = &render(&cfg(vec![f]), &[]).unwrap()[0];
        assert_eq!((r.mode, r.group.as_deref()), (0o640, Some("zmanim")));
    }

    #[test]
    fn the_default_profile_renders() {
        let c = SecretsConfig::default();
        let params = [
            param("/zmanim/prod/clerk-secret-key", "sk_test"),
            param("/zmanim/prod/db-password", "pw"),
            param("/zmanim/prod/config", "PORT=8080\n"),
        ];
        let r = &render(&c, &params).unwrap()[0];
        assert_eq!(r.path, Path::new("/run/caretaker/env/zmanim-api.env"));
        assert_eq!(r.vars, ["CLERK_SECRET_KEY", "DB_PASSWORD", "DATABASE_URL", "PORT"]);
    }

    #[test]
    fn writing_is_idempotent_and_exact() {
        let dir = tempfile::tempdir().unwrap();
        let env_dir = dir.path().join("run/caretaker/env");
        let mut c = cfg(vec![file("api")]);
        c.env_dir = env_dir.clone();
        c.files[0].vars = map(&[("A", "a")]);
        let rendered = render(&c, &[param("/app/prod/a", "1")]).unwrap();
        assert_eq!(write_rendered(&env_dir, &rendered).unwrap(), [FileOutcome::Written]);
        for d in [dir.path().join("run"), dir.path().join("run/caretaker"), env_dir.clone()] {
            assert_eq!(fs::metadata(&d).unwrap().mode() & 0o7777, DIR_MODE, "{}", d.display());
        }
        let p = env_dir.join("api.env");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(write_rendered(&env_dir, &rendered).unwrap(), [FileOutcome::Unchanged]);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(write_rendered(&env_dir, &rendered).unwrap(), [FileOutcome::Written]);
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(fs::read_to_string(&p).unwrap(), rendered[0].contents.expose());
    }

    #[test]
    fn an_unknown_group_is_named_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(vec![file("a"), file("b")]);
        c.env_dir = dir.path().join("env");
        c.files[1].group = Some("no-such-group-caretaker".into());
        let rendered = render(&c, &[]).unwrap();
        let e = write_rendered(&c.env_dir, &rendered).unwrap_err();
        assert!(e.to_string().contains("`no-such-group-caretaker` does not exist"), "{e}");
        assert!(!c.env_dir.exists());
    }
}
