//! The loader: files in order, each type-checked on its own, merged with the origin of every key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::validate::validate;
use super::{Config, DROPIN_DIRS, MAIN_FILE};

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub main: PathBuf,
    /// A missing main file is fine for the system path (defaults apply), an error for `--config`.
    pub main_required: bool,
    pub dropin_dirs: Vec<PathBuf>,
}

impl Sources {
    /// The system layout: main file plus both drop-in folders.
    pub fn system() -> Self {
        Sources {
            main: MAIN_FILE.into(),
            main_required: false,
            dropin_dirs: DROPIN_DIRS.iter().map(PathBuf::from).collect(),
        }
    }

    /// One explicit file and nothing else (`--config PATH`).
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Sources { main: path.into(), main_required: true, dropin_dirs: vec![] }
    }

    /// `--config PATH` when given, else the system layout.
    pub fn from_arg(path: Option<&Path>) -> Self {
        match path {
            Some(p) => Sources::file(p),
            None => Sources::system(),
        }
    }

    /// The files to read, in merge order. Drop-ins are sorted by file name across both folders
    /// with `/run` winning over `/etc` for the same name (as systemd does).
    pub fn files(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let mut files = Vec::new();
        if self.main.exists() || self.main_required {
            files.push(self.main.clone());
        }
        let mut by_name: BTreeMap<std::ffi::OsString, PathBuf> = BTreeMap::new();
        for dir in &self.dropin_dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(ConfigError::Read { path: dir.clone(), source }),
            };
            for entry in entries {
                let entry = entry.map_err(|source| ConfigError::Read { path: dir.clone(), source })?;
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                    by_name.insert(entry.file_name(), path);
                }
            }
        }
        files.extend(by_name.into_values());
        Ok(files)
    }
}

/// A configuration error, always naming the file and, where there is one, the line, column and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}:{column}: {}{message}", path.display(), key_prefix(key))]
    Parse { path: PathBuf, line: usize, column: usize, key: Option<String>, message: String },
    #[error("{}: key `{key}`: {message}", origin.display())]
    Invalid { origin: PathBuf, key: String, message: String },
}

fn key_prefix(key: &Option<String>) -> String {
    match key {
        Some(k) if !k.is_empty() && k != "." => format!("key `{k}`: "),
        _ => String::new(),
    }
}

/// The merged, validated configuration and the files it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub files: Vec<PathBuf>,
}

/// Reads, merges and validates the configuration from `sources`.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let files = sources.files()?;
    let mut merged = toml::Table::new();
    let mut origins: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in &files {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let table = parse_fragment(path, &text)?;
        merge(&mut merged, table, "", path, &mut origins);
    }
    let config: Config = toml::Value::Table(merged).try_into().map_err(|e: toml::de::Error| ConfigError::Invalid {
        origin: files.last().cloned().unwrap_or_else(|| PathBuf::from("(defaults)")),
        key: ".".into(),
        message: e.message().to_string(),
    })?;
    validate(&config, &origins)?;
    Ok(Loaded { config, files })
}

/// Parses one file and checks it against the schema on its own, so that an error carries the
/// position in that file.
fn parse_fragment(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    let at = |span: Option<std::ops::Range<usize>>| -> (usize, usize) {
        let offset = span.map(|s| s.start).unwrap_or(0).min(text.len());
        let before = &text[..offset];
        let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
        let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
        (line, column)
    };
    let table: toml::Table = toml::from_str(text).map_err(|e: toml::de::Error| {
        let (line, column) = at(e.span());
        ConfigError::Parse { path: path.into(), line, column, key: None, message: e.message().trim().to_string() }
    })?;
    let de = toml::Deserializer::new(text);
    if let Err(e) = serde_path_to_error::deserialize::<_, Config>(de) {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let (line, column) = at(inner.span());
        return Err(ConfigError::Parse {
            path: path.into(),
            line,
            column,
            key: Some(key),
            message: inner.message().trim().to_string(),
        });
    }
    Ok(table)
}

/// Deep-merges `from` into `into`, recording which file set each leaf key.
fn merge(
    into: &mut toml::Table,
    from: toml::Table,
    prefix: &str,
    origin: &Path,
    origins: &mut BTreeMap<String, PathBuf>,
) {
    for (key, value) in from {
        let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming)) => {
                merge(existing, incoming, &path, origin, origins);
            }
            (_, value) => {
                if let toml::Value::Table(t) = &value {
                    record_origins(t, &path, origin, origins);
                }
                origins.insert(path, origin.to_path_buf());
                into.insert(key, value);
            }
        }
    }
}

fn record_origins(table: &toml::Table, prefix: &str, origin: &Path, origins: &mut BTreeMap<String, PathBuf>) {
    for (key, value) in table {
        let path = format!("{prefix}.{key}");
        if let toml::Value::Table(t) = value {
            record_origins(t, &path, origin, origins);
        }
        origins.insert(path, origin.to_path_buf());
    }
}
