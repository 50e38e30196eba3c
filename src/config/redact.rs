//! The configuration as shown to people: secret-looking values replaced.

use super::Config;

/// The configuration as TOML/JSON-ready value with secret-looking values replaced.
pub fn redacted(config: &Config) -> serde_json::Value {
    let mut v = serde_json::to_value(config).expect("config serializes");
    redact_value(&mut v, "");
    v
}

const SECRET_WORDS: &[&str] = &["password", "secret", "token", "passphrase", "private", "credential", "api-key"];

pub(super) fn redact_value(v: &mut serde_json::Value, key: &str) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                redact_value(child, k);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| redact_value(i, key)),
        serde_json::Value::String(s) => {
            let lower = key.to_ascii_lowercase();
            if SECRET_WORDS.iter().any(|w| lower.contains(w)) {
                *s = "<redacted>".into();
            } else if let Some(clean) = redact_url_password(s) {
                *s = clean;
            }
        }
        _ => {}
    }
}

/// Drops unset (null) values: TOML has no null, an absent key means "unset".
pub fn without_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|_, c| !c.is_null());
            map.values_mut().for_each(without_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(without_nulls),
        _ => {}
    }
}

/// `scheme://user:pass@host` → `scheme://user:<redacted>@host`.
pub fn redact_url_password(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let (userinfo, host) = rest.split_once('@')?;
    if userinfo.contains('/') {
        return None;
    }
    let (user, _) = userinfo.split_once(':')?;
    Some(format!("{scheme}://{user}:<redacted>@{host}"))
}
