//! The env-file format systemd's `EnvironmentFile=` reads, written and read in one place.
//!
//! Values are written double-quoted, as systemd's env-file parser reads them (`src/basic/env-file.c`,
//! `DOUBLE_QUOTE_VALUE`): inside double quotes a backslash escapes `"`, `\`, `` ` `` and `$`; any
//! other character, newline included, is taken as it is. A newline is therefore written as a
//! literal newline inside the quotes: `\n` would arrive as backslash-n, and a backslash before a
//! newline is eaten as a line continuation. Only NUL cannot be carried. Unquoted `KEY=value` lines
//! (instance.env, whose values never need quoting) are read too.

use std::path::Path;

use crate::aws::ssm::SecretString;

/// caretaker's runtime folder (tmpfs: empty after every reboot).
pub const RUN_DIR: &str = "/run/caretaker";
/// caretaker's state on the root disk (survives reboots, not instance replacement).
pub const STATE_DIR: &str = "/var/lib/caretaker";

/// The rule [`is_env_name`] checks, for messages.
pub const NAME_RULE: &str = "[A-Za-z_][A-Za-z0-9_]*";

/// `[A-Za-z_][A-Za-z0-9_]*`: a name every shell and every program reading its environment agrees on.
pub fn is_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
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

/// Reads `key` back from an env file written by [`quote_value`] (its inverse), or an unquoted
/// `KEY=value` line; `None` when the file or the key is absent.
pub fn read_env_var(path: &Path, key: &str) -> std::io::Result<Option<SecretString>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let prefix = format!("{key}=\"");
    let mut rest = text.as_str();
    while !rest.is_empty() {
        if let Some(line) = rest.strip_prefix(&format!("{key}=")).filter(|r| !r.starts_with('"')) {
            return Ok(Some(SecretString::new(line.split('\n').next().unwrap_or_default())));
        }
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

/// A value from the `instance.env` firstboot wrote (`INSTANCE_ID`, `REGION`, …); `None` when the
/// file or the key is absent or empty.
pub fn instance_var(key: &str) -> Option<String> {
    read_env_var(&Path::new(RUN_DIR).join("instance.env"), key)
        .ok()
        .flatten()
        .map(|v| v.expose().to_string())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn unquoted_lines_are_read_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("instance.env");
        std::fs::write(&p, "INSTANCE_ID=i-0abc\nREGION=eu-west-1\nEMPTY=\n").unwrap();
        assert_eq!(read_env_var(&p, "REGION").unwrap().unwrap().expose(), "eu-west-1");
        assert_eq!(read_env_var(&p, "INSTANCE_ID").unwrap().unwrap().expose(), "i-0abc");
        assert_eq!(read_env_var(&p, "EMPTY").unwrap().unwrap().expose(), "");
        assert!(read_env_var(&p, "REGIO").unwrap().is_none());
    }
}
