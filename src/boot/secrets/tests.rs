use super::*;
use std::collections::BTreeMap;

use crate::aws::ssm::{Parameter, ParameterKind};
use crate::config::EnvFileConfig;

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
