//! Templates (`text {param} {{literal}}`) and parameters that expand into several variables
//! (`KEY=VALUE` lines or a JSON object). Errors name positions, never values.

use std::fmt;

use crate::envfile::{NAME_RULE, is_env_name};

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Piece {
    Text(String),
    Param(String),
}

/// `text {param} more {{literal}}` → pieces. Errors describe the template, which holds no secrets.
pub(super) fn parse_template(t: &str) -> Result<Vec<Piece>, String> {
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
pub(super) fn expand(value: &str) -> Result<Vec<(String, String)>, String> {
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

pub(super) fn expand_json(value: &str) -> Result<Vec<(String, String)>, String> {
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
