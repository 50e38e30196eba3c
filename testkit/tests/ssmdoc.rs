//! The Run Command simulator and the project's SSM documents: values checked as SSM checks them,
//! substituted as the agent does, and every document under packaging/ssm/ well-formed.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use caretaker_testkit::ssmdoc::{Document, ParamError, run_local, ssm_output, substitute};

fn docs_dir() -> PathBuf {
    caretaker_testkit::repo_root().join("packaging/ssm")
}

fn update_doc() -> Document {
    Document::load(&docs_dir().join("caretaker-update.json")).unwrap()
}

const HOSTILE: &[&str] = &[
    "1.2.3; rm -rf /",
    "$(id)",
    "`id`",
    "v1\nid",
    "v1\n",
    "v1 && id",
    "v1|id",
    "v1'",
    "v1\"",
    "../v1",
    "v1/../../etc",
    "v1 ",
    "",
    "latest; id",
    "--help",
];

#[test]
fn good_versions_pass_the_update_documents_pattern() {
    let doc = update_doc();
    for v in ["latest", "v1", "v2", "1.2.3", "v1.2.3", "1.2.3-rc.1", "v10.0.0+build.7", "0.0.1-x.y.z+abc"] {
        let values = doc.resolve(&[("Version", v)]).unwrap_or_else(|e| panic!("{v:?}: {e}"));
        assert_eq!(values["Version"], v);
        assert_eq!(values["DryRun"], "false", "the default applies");
    }
}

#[test]
fn values_with_shell_metacharacters_are_rejected() {
    let doc = update_doc();
    for v in HOSTILE {
        match doc.resolve(&[("Version", v)]) {
            Err(ParamError::NoMatch { name, .. }) => assert_eq!(name, "Version"),
            other => panic!("{v:?} should fail the pattern, got {other:?}"),
        }
    }
    for v in ["yes", "True", "true; id", "true\n"] {
        assert!(
            matches!(doc.resolve(&[("Version", "v1"), ("DryRun", v)]), Err(ParamError::NotAllowed { .. })),
            "DryRun={v:?}"
        );
    }
    assert!(matches!(doc.resolve(&[]), Err(ParamError::Required(n)) if n == "Version"));
    assert!(matches!(doc.resolve(&[("Version", "v1"), ("Other", "x")]), Err(ParamError::Unknown(_))));
    assert!(doc.resolve(&[("Version", "v1"), ("executionTimeout", "60; id")]).is_err());
}

#[test]
fn substitution_is_verbatim_with_or_without_spaces() {
    let values = BTreeMap::from([("A".to_string(), "x y".to_string()), ("B".to_string(), "2".to_string())]);
    assert_eq!(substitute("echo {{ A }}-{{B}}-{{  B  }}", &values).unwrap(), "echo x y-2-2");
    assert_eq!(substitute("no placeholders {}", &values).unwrap(), "no placeholders {}");
    assert!(substitute("echo {{ C }}", &values).unwrap_err().to_string().contains("C"));

    let doc = update_doc();
    let script = doc.render(&[("Version", "1.2.3-rc.1"), ("DryRun", "true")]).unwrap();
    assert!(script.contains("--version '1.2.3-rc.1'"), "{script}");
    assert!(!script.contains("{{"), "{script}");
    let step = &doc.main_steps[0];
    assert_eq!(doc.timeout(step, &[("Version", "v1")]).unwrap(), Some(std::time::Duration::from_secs(900)));
}

/// The rendered script, run with `sh` against a stand-in `caretaker` that prints its arguments:
/// the right flags, the exit status passed on, one summary line at the end, output bounded.
#[test]
fn the_update_script_runs_the_cli_and_ends_with_one_summary_line() {
    let dir = tempfile_dir();
    let fake = dir.join("caretaker");
    std::fs::write(
        &fake,
        "#!/bin/sh\nfor i in $(seq 1 500); do echo \"progress line $i $(printf '%0400d' 0)\"; done\necho \"args: $*\"\n[ \"$*\" = 'update --version v3' ] && exit 3\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let doc = update_doc();
    for (values, want_args, want_ok) in [
        (vec![("Version", "v2")], "args: update --version v2", true),
        (vec![("Version", "latest")], "args: update --latest", true),
        (vec![("Version", "1.2.3"), ("DryRun", "true")], "args: update --version 1.2.3 --dry-run", true),
        (vec![("Version", "v3")], "args: update --version v3", false),
    ] {
        let script = doc.render(&values).unwrap();
        let out = run_local(&script, &[("PATH", &path)]).unwrap();
        let text = ssm_output(&out);
        assert_eq!(out.status.success(), want_ok, "{values:?}: {text}");
        if !want_ok {
            assert_eq!(out.status.code(), Some(3));
        }
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[lines.len() - 2], want_args, "{values:?}");
        let last = lines.last().unwrap();
        assert!(last.starts_with(if want_ok { "caretaker-update: OK" } else { "caretaker-update: FAILED" }), "{last}");
        assert!(out.stdout.len() < 20_000, "{} bytes of output", out.stdout.len());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ssmdoc-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_document_is_schema_2_2_with_checked_parameters_and_a_timeout() {
    let mut seen = 0;
    for entry in std::fs::read_dir(docs_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        seen += 1;
        let doc = Document::load(&path).unwrap();
        let name = path.display();
        assert_eq!(doc.schema_version, "2.2", "{name}");
        assert!(!doc.description.is_empty(), "{name}: no description");
        for (p, param) in &doc.parameters {
            assert!(
                param.allowed_pattern.is_some() || param.allowed_values.is_some(),
                "{name}: parameter {p} has neither allowedPattern nor allowedValues"
            );
        }
        assert!(!doc.main_steps.is_empty(), "{name}");
        for step in &doc.main_steps {
            assert_eq!(step.action, "aws:runShellScript", "{name}");
            assert!(step.inputs.timeout_seconds.is_some(), "{name}: step {} has no timeoutSeconds", step.name);
            // Every placeholder names a declared parameter.
            let values: Vec<(String, String)> = doc
                .parameters
                .iter()
                .map(|(k, p)| {
                    let v = match (&p.allowed_values, &p.default) {
                        (Some(vals), _) => vals[0].clone(),
                        (None, Some(serde_json::Value::String(d))) => d.clone(),
                        // A required value: the first sample its pattern accepts.
                        _ => ["v1", "/zmanim/prod/name", "latest", "a"]
                            .into_iter()
                            .find(|v| {
                                p.allowed_pattern
                                    .as_deref()
                                    .is_none_or(|pat| regex::Regex::new(pat).is_ok_and(|r| r.is_match(v)))
                            })
                            .unwrap_or("v1")
                            .to_string(),
                    };
                    (k.clone(), v)
                })
                .collect();
            let borrowed: Vec<(&str, &str)> = values.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            doc.render_steps(&borrowed).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert!(doc.timeout(step, &borrowed).unwrap().is_some_and(|t| t.as_secs() > 0), "{name}");
        }
    }
    assert!(seen >= 2, "expected the backup and update documents, saw {seen}");
}
