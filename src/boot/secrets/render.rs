//! Rendering: parameters → env files in memory, every clash and bad name refused before anything
//! is written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use super::expand::{Piece, expand, parse_template};
use super::{MODE_GROUP_READ, MODE_ROOT_ONLY, MissingParameter, RenderedFile, SecretsError};
use crate::aws::ssm::{Parameter, SecretString};
use crate::config::{EnvFileConfig, SecretsConfig};
use crate::envfile::{NAME_RULE, is_env_name, quote_value};

fn check_file_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
    if ok { Ok(()) } else { Err(format!("`{name}` is not a usable file name (letters, digits, `._@-`)")) }
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
