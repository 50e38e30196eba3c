//! A Run Command simulator for the SSM documents in `packaging/ssm/`: load a document (schema 2.2),
//! check parameter values the way SSM does before it sends anything to an instance, substitute
//! them into the `aws:runShellScript` lines the way the SSM agent does, and run the resulting
//! script with `sh`, here or in a lab box.
//!
//! What SSM does, and so this does:
//! - a value must be one of `allowedValues` when those are given, and must match `allowedPattern`
//!   when that is given; the pattern must match the whole value (as Java's `matches()`), so
//!   `^[0-9]+$` and `[0-9]+` mean the same. A value with a newline fails any pattern whose classes
//!   exclude it (`.` never matches a newline here).
//! - a parameter without a value takes its `default`; without a default it is required.
//! - `{{ Name }}` and `{{Name}}` (any spaces inside the braces) in `runCommand` lines are replaced
//!   by the value verbatim: no quoting, which is why the patterns matter. A placeholder naming no
//!   declared parameter is an error (SSM refuses such a document).
//! - the lines are joined with newlines into one script, run by `sh`; the step's output is cut
//!   after [`OUTPUT_LIMIT`] characters.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, bail};
use regex::Regex;
use serde::Deserialize;

/// SSM keeps this many characters of a step's output (the rest is only in S3, when configured).
pub const OUTPUT_LIMIT: usize = 24_000;

/// A parameter as declared in the document.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Parameter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub default: Option<serde_json::Value>,
    #[serde(default)]
    pub allowed_pattern: Option<String>,
    #[serde(default)]
    pub allowed_values: Option<Vec<String>>,
}

/// One `mainSteps` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub action: String,
    pub name: String,
    #[serde(default)]
    pub inputs: StepInputs,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepInputs {
    #[serde(default)]
    pub run_command: Vec<String>,
    /// A number or a `{{ placeholder }}` (SSM accepts both as a string).
    #[serde(default)]
    pub timeout_seconds: Option<serde_json::Value>,
    #[serde(default)]
    pub working_directory: Option<String>,
}

/// A Command document.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    pub schema_version: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, Parameter>,
    pub main_steps: Vec<Step>,
}

/// Why SSM would refuse a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamError {
    Unknown(String),
    Required(String),
    NotAllowed { name: String, value: String, allowed: Vec<String> },
    NoMatch { name: String, value: String, pattern: String },
    Unsupported { name: String, kind: String },
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamError::Unknown(n) => write!(f, "parameter {n} is not declared by the document"),
            ParamError::Required(n) => write!(f, "parameter {n} is required (it has no default)"),
            ParamError::NotAllowed { name, value, allowed } => {
                write!(f, "parameter {name}: {value:?} is not one of the allowed values {allowed:?}")
            }
            ParamError::NoMatch { name, value, pattern } => {
                write!(f, "parameter {name}: {value:?} fails the allowed pattern {pattern}")
            }
            ParamError::Unsupported { name, kind } => {
                write!(f, "parameter {name}: type {kind} is not simulated (only String)")
            }
        }
    }
}

impl std::error::Error for ParamError {}

/// `{{ Name }}`, `{{Name}}`: the placeholders SSM substitutes (parameter names are letters,
/// digits, `_`, `-` and `.`).
fn placeholder() -> Regex {
    Regex::new(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*\}\}").expect("placeholder pattern compiles")
}

impl Document {
    pub fn parse(text: &str) -> anyhow::Result<Document> {
        let doc: Document = serde_json::from_str(text).context("not an SSM document (JSON)")?;
        for (name, p) in &doc.parameters {
            if let Some(pattern) = &p.allowed_pattern {
                full_match(pattern).with_context(|| format!("parameter {name}: allowedPattern does not compile"))?;
            }
        }
        Ok(doc)
    }

    pub fn load(path: &Path) -> anyhow::Result<Document> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Document::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Checks `values` as SSM does and fills in defaults: every parameter's value.
    pub fn resolve(&self, values: &[(&str, &str)]) -> Result<BTreeMap<String, String>, ParamError> {
        for (name, _) in values {
            if !self.parameters.contains_key(*name) {
                return Err(ParamError::Unknown(name.to_string()));
            }
        }
        let mut out = BTreeMap::new();
        for (name, p) in &self.parameters {
            if p.kind != "String" {
                return Err(ParamError::Unsupported { name: name.clone(), kind: p.kind.clone() });
            }
            let value = match values.iter().rev().find(|(n, _)| n == name) {
                Some((_, v)) => v.to_string(),
                None => match &p.default {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => return Err(ParamError::Required(name.clone())),
                },
            };
            check_value(name, p, &value)?;
            out.insert(name.clone(), value);
        }
        Ok(out)
    }

    /// The `aws:runShellScript` steps as scripts (lines joined with newlines), values checked and
    /// substituted. Placeholders outside `runCommand` (e.g. `timeoutSeconds`) are not touched.
    pub fn render_steps(&self, values: &[(&str, &str)]) -> anyhow::Result<Vec<(String, String)>> {
        let resolved = self.resolve(values)?;
        let mut out = Vec::new();
        for step in self.main_steps.iter().filter(|s| s.action == "aws:runShellScript") {
            let mut lines = Vec::new();
            for line in &step.inputs.run_command {
                lines.push(substitute(line, &resolved).with_context(|| format!("step {}", step.name))?);
            }
            out.push((step.name.clone(), lines.join("\n") + "\n"));
        }
        if out.is_empty() {
            bail!("the document has no aws:runShellScript step");
        }
        Ok(out)
    }

    /// The script of the document's only `aws:runShellScript` step (an error when there are more).
    pub fn render(&self, values: &[(&str, &str)]) -> anyhow::Result<String> {
        let mut steps = self.render_steps(values)?;
        if steps.len() != 1 {
            bail!("the document has {} aws:runShellScript steps; use render_steps", steps.len());
        }
        Ok(steps.remove(0).1)
    }

    /// A step's execution timeout (`timeoutSeconds`, a placeholder in it resolved with `values`);
    /// `None` when the step sets none (SSM's default then is 3600 s).
    pub fn timeout(&self, step: &Step, values: &[(&str, &str)]) -> anyhow::Result<Option<Duration>> {
        let text = match &step.inputs.timeout_seconds {
            None => return Ok(None),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => bail!("step {}: timeoutSeconds is {other}", step.name),
        };
        let text = substitute(&text, &self.resolve(values)?)?;
        let secs: u64 = text.trim().parse().with_context(|| format!("step {}: timeoutSeconds {text:?}", step.name))?;
        Ok(Some(Duration::from_secs(secs)))
    }
}

fn full_match(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

fn check_value(name: &str, p: &Parameter, value: &str) -> Result<(), ParamError> {
    if let Some(allowed) = &p.allowed_values
        && !allowed.iter().any(|a| a == value)
    {
        return Err(ParamError::NotAllowed { name: name.into(), value: value.into(), allowed: allowed.clone() });
    }
    if let Some(pattern) = &p.allowed_pattern {
        let re = full_match(pattern).expect("checked when the document was parsed");
        if !re.is_match(value) {
            return Err(ParamError::NoMatch { name: name.into(), value: value.into(), pattern: pattern.clone() });
        }
    }
    Ok(())
}

/// Replaces `{{ Name }}` / `{{Name}}` in `line` with `values[Name]`, verbatim.
pub fn substitute(line: &str, values: &BTreeMap<String, String>) -> anyhow::Result<String> {
    let re = placeholder();
    let mut missing = None;
    let out = re.replace_all(line, |c: &regex::Captures<'_>| match values.get(&c[1]) {
        Some(v) => v.clone(),
        None => {
            missing.get_or_insert_with(|| c[1].to_string());
            String::new()
        }
    });
    if let Some(name) = missing {
        bail!("{{{{ {name} }}}} names no declared parameter");
    }
    Ok(out.into_owned())
}

/// Runs `script` as the agent does, `sh -c SCRIPT`, appended to `prefix`: a command whose program
/// and arguments so far are a launcher, e.g. `LabBox::command(&[] as &[&str])` (nsenter into the
/// box) or `Command::new("env")` for this machine. Waits for it and returns its output.
pub fn run_script(mut prefix: Command, script: &str) -> std::io::Result<Output> {
    prefix.arg("sh").arg("-c").arg(script).output()
}

/// [`run_script`] on this machine, with `env` (extra variables) set.
pub fn run_local(script: &str, env: &[(&str, &str)]) -> std::io::Result<Output> {
    let mut cmd = Command::new("env");
    cmd.stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_script(cmd, script)
}

/// Stdout as SSM would show it: cut after [`OUTPUT_LIMIT`] characters.
pub fn ssm_output(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).chars().take(OUTPUT_LIMIT).collect()
}
