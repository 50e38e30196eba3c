//! What an operator installs, checked without AWS: the IAM policy is least privilege, the SSM
//! documents follow the rules, the sysusers/tmpfiles entries are well-formed (and do what they
//! say under systemd's own tools), the example configuration is valid and documents every key,
//! the shipped API unit carries no lab settings, and the Packer template is valid — with
//! `packer validate` when a packer is installed, and always with a structural check of its own
//! that is shown to fail on broken copies.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------------------------
// IAM

/// Actions AWS only authorizes against `"Resource": "*"` (no resource-level permissions);
/// PutMetricData is limited by its namespace condition instead.
const NEED_STAR_RESOURCE: &[&str] = &["ses:GetIdentityVerificationAttributes", "cloudwatch:PutMetricData"];

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|x| x.as_str().expect("a string").to_string()).collect(),
        other => panic!("expected a string or a list of strings, got {other}"),
    }
}

/// The statements that grant `action`.
fn granting<'a>(policy: &'a Value, action: &str) -> Vec<&'a Value> {
    policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["Effect"] == "Allow" && strings(&s["Action"]).iter().any(|a| a == action))
        .collect()
}

/// Every rule the policy must follow; the problems found.
fn iam_problems(policy: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if policy["Version"] != "2012-10-17" {
        problems.push("Version must be 2012-10-17".into());
    }
    let Some(statements) = policy["Statement"].as_array() else { return vec!["no Statement list".into()] };
    let mut sids = BTreeSet::new();
    for s in statements {
        let sid = s["Sid"].as_str().unwrap_or("");
        if sid.is_empty() || !sid.bytes().all(|b| b.is_ascii_alphanumeric()) {
            problems.push(format!("statement without a proper Sid: {s}"));
        }
        if !sids.insert(sid.to_string()) {
            problems.push(format!("Sid {sid} twice"));
        }
        if s["Effect"] != "Allow" && s["Effect"] != "Deny" {
            problems.push(format!("{sid}: Effect must be Allow or Deny"));
        }
        for key in ["NotAction", "NotResource", "NotPrincipal", "Principal"] {
            if s.get(key).is_some() {
                problems.push(format!("{sid}: {key} has no place in an instance role policy"));
            }
        }
        let actions = strings(&s["Action"]);
        for a in &actions {
            if a.contains('*') || !a.contains(':') {
                problems.push(format!("{sid}: action {a} is a wildcard"));
            }
        }
        for r in strings(&s["Resource"]) {
            let star_ok = actions.iter().all(|a| NEED_STAR_RESOURCE.contains(&a.as_str()));
            if r == "*" && !star_ok {
                problems.push(format!("{sid}: Resource * for {actions:?}, which AWS can scope"));
            }
            if r != "*" && !r.starts_with("arn:aws:") {
                problems.push(format!("{sid}: {r} is not an ARN"));
            }
            if r.starts_with("arn:aws:s3:::") && r.trim_start_matches("arn:aws:s3:::").starts_with('*') {
                problems.push(format!("{sid}: {r} names every bucket"));
            }
        }
    }
    // What caretaker does, and no more.
    let by_path: Vec<String> =
        granting(policy, "ssm:GetParametersByPath").iter().flat_map(|s| strings(&s["Resource"])).collect();
    for want in ["arn:aws:ssm:*:*:parameter/zmanim/prod", "arn:aws:ssm:*:*:parameter/zmanim/prod/*"] {
        if !by_path.iter().any(|r| r == want) {
            problems.push(format!("ssm:GetParametersByPath must name {want} (AWS checks the path itself too)"));
        }
    }
    for s in granting(policy, "kms:Decrypt") {
        if s["Condition"]["StringLike"]["kms:ViaService"] != "ssm.*.amazonaws.com" {
            problems.push("kms:Decrypt must be conditioned on kms:ViaService = ssm.*.amazonaws.com".into());
        }
    }
    for action in
        ["s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
    {
        let on_backups = granting(policy, action)
            .iter()
            .flat_map(|s| strings(&s["Resource"]))
            .any(|r| r == "arn:aws:s3:::BACKUP_BUCKET/caretaker/*");
        if !on_backups {
            problems.push(format!("{action} on the backup prefix is missing"));
        }
    }
    for action in ["s3:ListBucket", "s3:ListBucketMultipartUploads"] {
        for s in granting(policy, action) {
            if s["Condition"]["StringLike"]["s3:prefix"].is_null() {
                problems.push(format!("{} ({action}) must be limited by an s3:prefix condition", s["Sid"]));
            }
        }
    }
    if !granting(policy, "s3:GetObject")
        .iter()
        .flat_map(|s| strings(&s["Resource"]))
        .any(|r| r == "arn:aws:s3:::RELEASES_BUCKET/zmanim-api/*")
    {
        problems.push("s3:GetObject on the releases prefix is missing".into());
    }
    let put = granting(policy, "cloudwatch:PutMetricData");
    if put.is_empty() || put.iter().any(|s| s["Condition"]["StringEquals"]["cloudwatch:namespace"] != "Caretaker") {
        problems
            .push("cloudwatch:PutMetricData must be limited to the Caretaker namespace (cloudwatch:namespace)".into());
    }
    let send = granting(policy, "ses:SendEmail");
    if send.is_empty() || send.iter().any(|s| s["Condition"]["StringEquals"]["ses:FromAddress"].is_null()) {
        problems.push("ses:SendEmail must be limited by a ses:FromAddress condition".into());
    }
    // The backup bucket's history: never destroyable by the box (explicit Deny, whatever else
    // someone attaches to the role).
    let denied: BTreeSet<String> = statements
        .iter()
        .filter(|s| {
            s["Effect"] == "Deny" && strings(&s["Resource"]).iter().any(|r| r.starts_with("arn:aws:s3:::BACKUP_BUCKET"))
        })
        .flat_map(|s| strings(&s["Action"]))
        .collect();
    for action in [
        "s3:DeleteObjectVersion",
        "s3:BypassGovernanceRetention",
        "s3:PutObjectRetention",
        "s3:PutBucketVersioning",
        "s3:PutBucketObjectLockConfiguration",
        "s3:PutLifecycleConfiguration",
    ] {
        if !denied.contains(action) {
            problems.push(format!("{action} on the backup bucket must be denied explicitly"));
        }
    }
    let actions: BTreeSet<String> =
        statements.iter().filter(|s| s["Effect"] == "Allow").flat_map(|s| strings(&s["Action"])).collect();
    let expected: BTreeSet<String> = [
        "ssm:GetParametersByPath",
        "kms:Decrypt",
        "s3:PutObject",
        "s3:GetObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
        "s3:ListBucket",
        "s3:ListBucketMultipartUploads",
        "ses:SendEmail",
        "ses:GetIdentityVerificationAttributes",
        "s3:GetBucketVersioning",
        "s3:GetBucketObjectLockConfiguration",
        "cloudwatch:PutMetricData",
        "cloudwatch:DescribeAlarms",
    ]
    .map(String::from)
    .into();
    for extra in actions.difference(&expected) {
        problems.push(format!("{extra} is granted but caretaker does not call it"));
    }
    problems
}

#[test]
fn the_iam_policy_grants_only_what_caretaker_does() {
    let policy: Value = serde_json::from_str(&read("packaging/iam/caretaker-policy.json")).expect("the policy is JSON");
    let problems = iam_problems(&policy);
    assert!(problems.is_empty(), "packaging/iam/caretaker-policy.json:\n  {}", problems.join("\n  "));

    // The checks catch what they are meant to catch.
    let mut wild = policy.clone();
    wild["Statement"][0]["Action"] = "ssm:*".into();
    assert!(iam_problems(&wild).iter().any(|p| p.contains("wildcard")));
    let mut star = policy.clone();
    star["Statement"][2]["Resource"] = "*".into();
    assert!(iam_problems(&star).iter().any(|p| p.contains("Resource *")));
    let mut nosid = policy.clone();
    nosid["Statement"][1].as_object_mut().unwrap().remove("Sid");
    assert!(iam_problems(&nosid).iter().any(|p| p.contains("Sid")));
    let mut no_via = policy.clone();
    no_via["Statement"][1].as_object_mut().unwrap().remove("Condition");
    assert!(iam_problems(&no_via).iter().any(|p| p.contains("ViaService")));
    let mut any_namespace = policy.clone();
    for s in any_namespace["Statement"].as_array_mut().unwrap() {
        if s["Action"] == "cloudwatch:PutMetricData" {
            s.as_object_mut().unwrap().remove("Condition");
        }
    }
    assert!(iam_problems(&any_namespace).iter().any(|p| p.contains("cloudwatch:namespace")));
    let mut no_deny = policy.clone();
    no_deny["Statement"].as_array_mut().unwrap().retain(|s| s["Effect"] != "Deny");
    assert!(iam_problems(&no_deny).iter().any(|p| p.contains("DeleteObjectVersion")));
}

#[test]
fn the_readme_documents_the_iam_placeholders() {
    let readme = read("README.md");
    let section = readme.split("### IAM policy").nth(1).expect("README.md has a ### IAM policy section");
    for placeholder in ["BACKUP_BUCKET", "RELEASES_BUCKET", "ALERT_SENDER"] {
        assert!(read("packaging/iam/caretaker-policy.json").contains(placeholder));
        assert!(section.contains(placeholder), "README's IAM section does not explain {placeholder}");
    }
}

// ---------------------------------------------------------------------------------------------
// SSM documents

/// `{{ Name }}` references in a string.
fn references(s: &str) -> Vec<String> {
    s.split("{{").skip(1).filter_map(|r| r.split_once("}}")).map(|(name, _)| name.trim().to_string()).collect()
}

fn ssm_problems(doc: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    if doc["schemaVersion"] != "2.2" {
        problems.push(format!("schemaVersion is {}, not \"2.2\"", doc["schemaVersion"]));
    }
    if doc["description"].as_str().unwrap_or("").is_empty() {
        problems.push("no description".into());
    }
    let params = doc["parameters"].as_object().cloned().unwrap_or_default();
    for (name, p) in &params {
        if p["allowedPattern"].is_null() && p["allowedValues"].is_null() {
            problems.push(format!("parameter {name} has neither allowedPattern nor allowedValues"));
        }
        if p["type"].as_str().is_none() {
            problems.push(format!("parameter {name} has no type"));
        }
    }
    let steps = doc["mainSteps"].as_array().cloned().unwrap_or_default();
    if steps.is_empty() {
        problems.push("no mainSteps".into());
    }
    for step in &steps {
        let name = step["name"].as_str().unwrap_or("?");
        // The execution timeout: each step's timeoutSeconds, a number or `{{ executionTimeout }}`.
        match &step["inputs"]["timeoutSeconds"] {
            Value::String(t) if t.parse::<u32>().is_ok() => {}
            Value::Number(_) => {}
            Value::String(t) if references(t) == ["executionTimeout"] => {
                if params.get("executionTimeout").is_none() {
                    problems
                        .push(format!("step {name}: timeoutSeconds uses executionTimeout, which is not a parameter"));
                }
            }
            other => problems.push(format!("step {name}: no execution timeout (inputs.timeoutSeconds is {other})")),
        }
        for r in references(&step.to_string()) {
            if !params.contains_key(&r) && !r.starts_with("ssm:") {
                problems.push(format!("step {name} uses {{{{ {r} }}}}, which is not a parameter"));
            }
        }
    }
    problems
}

#[test]
fn every_ssm_document_has_schema_2_2_checked_parameters_and_a_timeout() {
    let dir = repo().join("packaging/ssm");
    let mut docs: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(_) => Vec::new(),
    };
    docs.sort();
    let mut all = Vec::new();
    for path in &docs {
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        for p in ssm_problems(&doc) {
            all.push(format!("{}: {p}", path.display()));
        }
    }
    println!("{} SSM documents checked", docs.len());
    assert!(all.is_empty(), "{}", all.join("\n"));

    let good = serde_json::json!({
        "schemaVersion": "2.2", "description": "x",
        "parameters": {
            "Kind": { "type": "String", "allowedValues": ["a"] },
            "executionTimeout": { "type": "String", "default": "3600", "allowedPattern": "^[0-9]{1,5}$" }
        },
        "mainSteps": [{ "action": "aws:runShellScript", "name": "s",
            "inputs": { "timeoutSeconds": "{{ executionTimeout }}", "runCommand": ["caretaker x {{ Kind }}"] } }]
    });
    assert!(ssm_problems(&good).is_empty(), "{:?}", ssm_problems(&good));
    let mut bad = good.clone();
    bad["schemaVersion"] = "2.0".into();
    bad["parameters"]["Kind"].as_object_mut().unwrap().remove("allowedValues");
    bad["mainSteps"][0]["inputs"].as_object_mut().unwrap().remove("timeoutSeconds");
    let p = ssm_problems(&bad);
    assert_eq!(p.len(), 3, "{p:?}");
}

// ---------------------------------------------------------------------------------------------
// sysusers.d, tmpfiles.d

/// Fields of a config line, honouring double quotes (as systemd's own parsers do).
fn fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    out.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            c => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(cur);
    }
    out
}

fn config_lines(text: &str) -> Vec<(usize, Vec<String>)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|(i, l)| (i + 1, fields(l)))
        .collect()
}

fn name_ok(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 31
        && n.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[test]
fn sysusers_and_tmpfiles_entries_are_well_formed_and_work() {
    let sysusers = read("packaging/sysusers.d/caretaker.conf");
    let lines = config_lines(&sysusers);
    assert!(!lines.is_empty());
    for (n, f) in &lines {
        assert!((2..=6).contains(&f.len()), "sysusers line {n}: {f:?}");
        assert!(["u", "g", "m", "r"].contains(&f[0].as_str()), "sysusers line {n}: type {}", f[0]);
        assert!(name_ok(&f[1]), "sysusers line {n}: user name {}", f[1]);
        if let Some(id) = f.get(2) {
            assert!(id == "-" || id.parse::<u32>().is_ok() || id.starts_with('/'), "sysusers line {n}: id {id}");
        }
        for path in f.iter().skip(4) {
            assert!(path == "-" || path.starts_with('/'), "sysusers line {n}: {path} is not absolute");
        }
    }
    assert!(lines.iter().any(|(_, f)| f[0] == "u" && f[1] == "zmanim"), "the API's user");
    assert!(!lines.iter().any(|(_, f)| f[1] == "caretaker"), "caretaker runs as root");

    let tmpfiles = read("packaging/tmpfiles.d/caretaker.conf");
    let mut dirs = BTreeMap::new();
    for (n, f) in config_lines(&tmpfiles) {
        assert!((2..=7).contains(&f.len()), "tmpfiles line {n}: {f:?}");
        assert!(
            ["d", "D", "e", "v", "q", "Q", "f", "L", "z", "Z"].contains(&f[0].as_str()),
            "tmpfiles line {n}: {}",
            f[0]
        );
        assert!(f[1].starts_with('/') && !f[1].contains(".."), "tmpfiles line {n}: path {}", f[1]);
        let mode = &f[2];
        assert!(
            mode == "-" || (mode.len() == 4 && u32::from_str_radix(mode, 8).is_ok()),
            "tmpfiles line {n}: mode {mode}"
        );
        for owner in f.iter().skip(3).take(2) {
            assert!(owner == "-" || name_ok(owner), "tmpfiles line {n}: owner {owner}");
        }
        dirs.insert(f[1].clone(), mode.clone());
    }
    for (dir, mode) in [
        ("/run/caretaker", "0755"),
        ("/run/caretaker/env", "0755"),
        ("/var/lib/caretaker", "0700"),
        ("/opt/zmanim/releases", "0755"),
    ] {
        assert_eq!(dirs.get(dir).map(String::as_str), Some(mode), "{dir}");
    }

    // systemd's own tools, on a scratch root: they parse the files and do what they say.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let (Some(sysusers_bin), Some(tmpfiles_bin)) = (which("systemd-sysusers"), which("systemd-tmpfiles")) else {
        println!("systemd-sysusers/systemd-tmpfiles not installed: only the line checks ran");
        return;
    };
    let run = |bin: &Path, args: &[&str], file: &str| {
        let out = Command::new(bin)
            .arg(format!("--root={}", root.path().display()))
            .args(args)
            .arg(repo().join(file))
            .output()
            .unwrap();
        assert!(
            out.status.success() && !text(&out.stderr).contains("ignoring"),
            "{}: {}",
            bin.display(),
            text(&out.stderr)
        );
    };
    run(&sysusers_bin, &[], "packaging/sysusers.d/caretaker.conf");
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let zmanim = passwd.lines().find(|l| l.starts_with("zmanim:")).expect("zmanim in passwd");
    assert!(zmanim.ends_with(":/usr/sbin/nologin"), "{zmanim}");
    let uid: u32 = zmanim.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid < 1000, "a system user: {zmanim}");
    run(&tmpfiles_bin, &["--create"], "packaging/tmpfiles.d/caretaker.conf");
    use std::os::unix::fs::PermissionsExt;
    for (dir, mode) in dirs {
        let meta =
            std::fs::metadata(root.path().join(dir.trim_start_matches('/'))).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(meta.is_dir());
        assert_eq!(format!("{:04o}", meta.permissions().mode() & 0o7777), mode, "{dir}");
    }
}

// ---------------------------------------------------------------------------------------------
// The example configuration

fn config_check(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_caretaker"))
        .args(["config", "check"])
        .arg(path)
        .env_remove("CARETAKER_CONFIG")
        .output()
        .expect("run caretaker")
}

/// Dotted keys of a JSON object's leaves (`backup.keep-daily`); arrays of tables stop the descent.
fn leaf_keys(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Value::Object(m) = v {
        for (k, v) in m {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                Value::Object(_) => leaf_keys(v, &key, out),
                Value::Array(a) if a.first().is_some_and(Value::is_object) => {
                    out.insert(format!("[[{key}]]"));
                }
                _ => {
                    out.insert(key);
                }
            }
        }
    }
}

#[test]
fn the_example_configuration_is_valid_uncommented_too_and_documents_every_key() {
    let example = repo().join("packaging/caretaker.toml.example");
    let out = config_check(&example);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Every `# key = value` line and `# [table]` header uncommented: still valid.
    let body = read("packaging/caretaker.toml.example");
    let mut uncommented = String::new();
    let mut settings = 0;
    for line in body.lines() {
        let inner = line.strip_prefix("# ").unwrap_or("");
        let is_setting = inner.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        let is_header = inner.starts_with('[') && inner.ends_with(']') && !inner.contains(' ');
        if is_setting || is_header {
            settings += 1;
            uncommented.push_str(inner);
        } else {
            uncommented.push_str(line);
        }
        uncommented.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("all.toml");
    std::fs::write(&all, &uncommented).unwrap();
    let out = config_check(&all);
    assert!(out.status.success(), "the example with every setting uncommented: {}\n{uncommented}", text(&out.stderr));
    assert!(settings > 60, "only {settings} commented settings found");

    // Every key caretaker knows appears in the example.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let show = Command::new(env!("CARGO_BIN_EXE_caretaker"))
        .args(["config", "show", "--json"])
        .arg("--config")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(show.status.success(), "{}", text(&show.stderr));
    let defaults: Value = serde_json::from_slice(&show.stdout).unwrap();
    let mut keys = BTreeSet::new();
    leaf_keys(&defaults, "", &mut keys);
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| {
            if k.starts_with("[[") {
                return !body.contains(&format!("\n# {k}\n")) && !body.contains(&format!("\n{k}\n"));
            }
            let (table, key) = k.rsplit_once('.').unwrap();
            let header = format!("[{table}]");
            let in_table = body.split(&header).nth(1).map(|rest| rest.split("\n[").next().unwrap_or(rest));
            !in_table.is_some_and(|t| t.contains(&format!("# {key} = ")) || t.contains(&format!("\n{key} = ")))
        })
        .collect();
    assert!(missing.is_empty(), "keys missing from packaging/caretaker.toml.example: {missing:?}");
}

// ---------------------------------------------------------------------------------------------
// The shipped API unit

#[test]
fn the_daemon_unit_bounds_its_memory_and_tasks() {
    let unit = read("systemd/caretaker.service");
    let value = |key: &str| unit.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_string);
    let mem = value("MemoryMax").expect("MemoryMax= in caretaker.service");
    assert!(
        mem.ends_with('M') && mem.trim_end_matches('M').parse::<u64>().is_ok_and(|m| (128..=1024).contains(&m)),
        "{mem}"
    );
    let tasks = value("TasksMax").expect("TasksMax= in caretaker.service");
    assert!(tasks.parse::<u64>().is_ok_and(|t| (32..=512).contains(&t)), "{tasks}");
}

#[test]
fn the_shipped_api_unit_is_sandboxed_and_carries_no_lab_settings() {
    let unit = read("systemd/zmanim-api.service");
    let settings: Vec<(&str, &str)> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .collect();
    let get = |k: &str| settings.iter().filter(|(key, _)| *key == k).map(|(_, v)| *v).collect::<Vec<_>>();
    assert!(!unit.contains("TEST_API"), "lab settings belong in tests/lab/units, not the shipped unit");
    assert!(get("EnvironmentFile").is_empty(), "the env files come from the drop-in zmanim-api.service.d/");
    assert_eq!(get("ExecStart"), ["/opt/zmanim/current/zmanim-api"]);
    assert_eq!(get("User"), ["zmanim"]);
    assert_eq!(get("CapabilityBoundingSet"), [""], "no capabilities at all");
    assert_eq!(get("ProtectSystem"), ["strict"]);
    for flag in ["NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome", "MemoryDenyWriteExecute"] {
        assert_eq!(get(flag), ["yes"], "{flag}");
    }
    assert!(get("SystemCallFilter").contains(&"@system-service"));
    // The internet, but not the instance metadata service (the instance role is caretaker's).
    assert_eq!(get("IPAddressDeny"), ["169.254.169.254/32 fd00:ec2::254/128"]);
    assert!(get("IPAddressAllow").is_empty(), "the API reaches the internet");
    for data in ["postgresql", "redis"] {
        let dropin = read(&format!("systemd/{data}.service.d/10-caretaker.conf"));
        assert!(dropin.contains("IPAddressDeny=169.254.169.254/32 fd00:ec2::254/128"), "{data}: {dropin}");
    }
    let dropin = read("systemd/zmanim-api.service.d/10-caretaker.conf");
    assert!(dropin.contains("EnvironmentFile=/run/caretaker/env/zmanim-api.env"));
}

// ---------------------------------------------------------------------------------------------
// Packer

/// What the structural check learns about an HCL2 file.
#[derive(Debug, Default)]
struct Hcl {
    /// Top-level blocks: type and labels.
    blocks: Vec<Vec<String>>,
    var_refs: BTreeSet<String>,
    local_refs: BTreeSet<String>,
    locals: BTreeSet<String>,
    strings: Vec<String>,
}

/// A small HCL2 scanner: comments, strings with `${…}` interpolation, heredocs, balanced
/// brackets, top-level block headers, `var.X`/`local.X` references and the names in `locals`.
fn scan_hcl(src: &str) -> Result<Hcl, String> {
    let c: Vec<char> = src.chars().collect();
    let mut hcl = Hcl::default();
    let mut i = 0;
    scan_code(&c, &mut i, false, &mut hcl, &mut Vec::new(), &mut Vec::new())?;
    Ok(hcl)
}

fn line_of(c: &[char], i: usize) -> usize {
    c[..i.min(c.len())].iter().filter(|&&x| x == '\n').count() + 1
}

fn ident_at(c: &[char], i: usize) -> Option<(String, usize)> {
    let start = i;
    let mut j = i;
    while j < c.len() && (c[j].is_ascii_alphanumeric() || c[j] == '_' || c[j] == '-') {
        j += 1;
    }
    (j > start && (c[start].is_ascii_alphabetic() || c[start] == '_')).then(|| (c[start..j].iter().collect(), j))
}

/// Code until EOF (top level) or the `}` that closes an interpolation (`interp`).
fn scan_code(
    c: &[char],
    i: &mut usize,
    interp: bool,
    hcl: &mut Hcl,
    stack: &mut Vec<(char, usize)>,
    header: &mut Vec<String>,
) -> Result<(), String> {
    let base = stack.len();
    let mut current_block: Option<String> = None;
    while *i < c.len() {
        let ch = c[*i];
        let next = c.get(*i + 1).copied();
        match ch {
            '#' => skip_line(c, i),
            '/' if next == Some('/') => skip_line(c, i),
            '/' if next == Some('*') => {
                let start = *i;
                *i += 2;
                while *i + 1 < c.len() && !(c[*i] == '*' && c[*i + 1] == '/') {
                    *i += 1;
                }
                if *i + 1 >= c.len() {
                    return Err(format!("line {}: unterminated /* comment", line_of(c, start)));
                }
                *i += 2;
            }
            '"' => {
                let s = scan_string(c, i, hcl)?;
                if !interp && stack.len() == base {
                    header.push(s.clone());
                }
                hcl.strings.push(s);
            }
            '<' if next == Some('<') => scan_heredoc(c, i, hcl)?,
            '{' | '[' | '(' => {
                if !interp && ch == '{' && stack.is_empty() {
                    if header.is_empty() {
                        return Err(format!("line {}: a block without a type", line_of(c, *i)));
                    }
                    hcl.blocks.push(std::mem::take(header));
                    current_block = hcl.blocks.last().map(|b| b[0].clone());
                }
                stack.push((ch, *i));
                *i += 1;
            }
            '}' if interp && stack.len() == base => {
                *i += 1;
                return Ok(());
            }
            '}' | ']' | ')' => {
                let want = match ch {
                    '}' => '{',
                    ']' => '[',
                    _ => '(',
                };
                match stack.pop() {
                    Some((open, _)) if open == want => {}
                    Some((open, at)) => {
                        return Err(format!(
                            "line {}: `{ch}` closes the `{open}` of line {}",
                            line_of(c, *i),
                            line_of(c, at)
                        ));
                    }
                    None => return Err(format!("line {}: `{ch}` without an opening bracket", line_of(c, *i))),
                }
                if !interp && stack.is_empty() {
                    current_block = None;
                }
                *i += 1;
            }
            c0 if c0.is_ascii_alphabetic() || c0 == '_' => {
                let (word, end) = ident_at(c, *i).unwrap();
                let prev_dot = *i > 0 && c[*i - 1] == '.';
                *i = end;
                if !prev_dot && (word == "var" || word == "local") && c.get(*i) == Some(&'.') {
                    if let Some((name, end)) = ident_at(c, *i + 1) {
                        if word == "var" { &mut hcl.var_refs } else { &mut hcl.local_refs }.insert(name);
                        *i = end;
                    }
                } else if !interp && stack.is_empty() {
                    header.push(word);
                } else if !interp && stack.len() == 1 && current_block.as_deref() == Some("locals") {
                    let mut j = *i;
                    while j < c.len() && (c[j] == ' ' || c[j] == '\t') {
                        j += 1;
                    }
                    if c.get(j) == Some(&'=') && c.get(j + 1) != Some(&'=') {
                        hcl.locals.insert(word);
                    }
                }
            }
            _ => *i += 1,
        }
    }
    if interp {
        return Err("unterminated ${ interpolation".into());
    }
    if let Some((open, at)) = stack.last() {
        return Err(format!("line {}: `{open}` is never closed", line_of(c, *at)));
    }
    if !header.is_empty() {
        return Err(format!("trailing tokens at the top level: {header:?}"));
    }
    Ok(())
}

fn skip_line(c: &[char], i: &mut usize) {
    while *i < c.len() && c[*i] != '\n' {
        *i += 1;
    }
}

/// A quoted string starting at `"`; returns its literal text (interpolations scanned as code).
fn scan_string(c: &[char], i: &mut usize, hcl: &mut Hcl) -> Result<String, String> {
    let start = *i;
    *i += 1;
    let mut s = String::new();
    while *i < c.len() {
        match c[*i] {
            '"' => {
                *i += 1;
                return Ok(s);
            }
            '\n' => break,
            '\\' => {
                s.push(c.get(*i + 1).copied().unwrap_or('\\'));
                *i += 2;
            }
            '$' | '%' if c.get(*i + 1) == Some(&'{') => {
                if *i > 0 && c[*i - 1] == c[*i] {
                    // `$${` and `%%{` are literal.
                    s.push('{');
                    *i += 2;
                    continue;
                }
                *i += 2;
                scan_code(c, i, true, hcl, &mut Vec::new(), &mut Vec::new())?;
            }
            ch => {
                s.push(ch);
                *i += 1;
            }
        }
    }
    Err(format!("line {}: unterminated string", line_of(c, start)))
}

/// `<<EOF` / `<<-EOF` up to the line holding only the marker.
fn scan_heredoc(c: &[char], i: &mut usize, hcl: &mut Hcl) -> Result<(), String> {
    let start = *i;
    *i += 2;
    if c.get(*i) == Some(&'-') {
        *i += 1;
    }
    let (marker, end) =
        ident_at(c, *i).ok_or_else(|| format!("line {}: heredoc without a marker", line_of(c, start)))?;
    *i = end;
    skip_line(c, i);
    loop {
        if *i >= c.len() {
            return Err(format!("line {}: heredoc {marker} is never closed", line_of(c, start)));
        }
        *i += 1;
        let line_start = *i;
        skip_line(c, i);
        let line: String = c[line_start..*i].iter().collect();
        if line.trim() == marker {
            return Ok(());
        }
        for (pos, _) in line.match_indices("var.") {
            let tail: Vec<char> = line[pos + 4..].chars().collect();
            if let Some((name, _)) = ident_at(&tail, 0) {
                hcl.var_refs.insert(name);
            }
        }
    }
}

/// The structural rules for our template.
fn packer_problems(src: &str) -> Vec<String> {
    let hcl = match scan_hcl(src) {
        Ok(h) => h,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    let has = |kind: &str| hcl.blocks.iter().filter(|b| b[0] == kind).collect::<Vec<_>>();
    if has("packer").is_empty() {
        problems.push("no `packer {` block".into());
    }
    let sources = has("source");
    let ebs: Vec<&Vec<String>> = sources.iter().copied().filter(|b| b.len() == 3 && b[1] == "amazon-ebs").collect();
    if ebs.is_empty() {
        problems.push("no `source \"amazon-ebs\" \"NAME\"` block".into());
    }
    if has("build").is_empty() {
        problems.push("no `build {` block".into());
    }
    for s in &ebs {
        let reference = format!("source.amazon-ebs.{}", s[2]);
        if !hcl.strings.contains(&reference) {
            problems.push(format!("the build does not use {reference}"));
        }
    }
    for b in &hcl.blocks {
        if !["packer", "variable", "locals", "source", "build", "data"].contains(&b[0].as_str()) {
            problems.push(format!("unknown top-level block `{}`", b[0]));
        }
    }
    let declared: BTreeSet<String> =
        hcl.blocks.iter().filter(|b| b[0] == "variable").filter_map(|b| b.get(1).cloned()).collect();
    for v in hcl.var_refs.difference(&declared) {
        problems.push(format!("var.{v} is used but not declared"));
    }
    for v in declared.difference(&hcl.var_refs) {
        problems.push(format!("variable {v} is declared but never used"));
    }
    for l in hcl.local_refs.difference(&hcl.locals) {
        problems.push(format!("local.{l} is used but not declared"));
    }
    problems
}

const REQUIRED_VARS: &[(&str, &str)] =
    &[("caretaker_rpm", "/dev/null"), ("api_version", "v1.0.0"), ("releases_bucket", "example-releases")];

/// `packer validate` of one template file (the required variables given).
fn packer_validate(packer: &Path, template: &Path) -> Output {
    let mut cmd = Command::new(packer);
    cmd.arg("validate");
    for (k, v) in REQUIRED_VARS {
        cmd.arg("-var").arg(format!("{k}={v}"));
    }
    cmd.arg(template).current_dir(template.parent().unwrap()).env("CHECKPOINT_DISABLE", "1");
    cmd.output().expect("run packer")
}

#[test]
fn the_packer_template_is_valid_and_broken_copies_are_caught() {
    let template = repo().join("packer/caretaker.pkr.hcl");
    let src = read("packer/caretaker.pkr.hcl");
    let problems = packer_problems(&src);
    assert!(problems.is_empty(), "packer/caretaker.pkr.hcl:\n  {}", problems.join("\n  "));

    // The scripts it runs exist and are valid shell.
    let scripts: Vec<String> = src
        .lines()
        .filter_map(|l| l.trim().strip_prefix("script"))
        .filter_map(|l| l.split("/scripts/").nth(1))
        .map(|s| s.trim_end_matches('"').to_string())
        .collect();
    assert!(scripts.len() >= 3, "{scripts:?}");
    for s in &scripts {
        let path = repo().join("packer/scripts").join(s);
        let out = Command::new("bash").arg("-n").arg(&path).output().unwrap();
        assert!(out.status.success(), "{}: {}", path.display(), text(&out.stderr));
    }
    let clean = read("packer/scripts/90-clean.sh");
    for must in
        ["truncate -s 0 /etc/machine-id", "/etc/ssh/ssh_host_", "cloud-init clean", "/var/log", "/var/lib/caretaker"]
    {
        assert!(clean.contains(must), "90-clean.sh does not clean {must}");
    }

    // Broken copies: each must fail the structural check (and packer, when there is one).
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
    for s in &scripts {
        std::fs::copy(repo().join("packer/scripts").join(s), dir.path().join("scripts").join(s)).unwrap();
    }
    let last_brace = src.rfind('}').unwrap();
    let broken = [
        ("an unclosed block", format!("{}{}", &src[..last_brace], &src[last_brace + 1..])),
        ("an undeclared variable", src.replacen("var.instance_type", "var.instance_typo", 1)),
        ("an unterminated string", src.replacen("\"t4g.medium\"", "\"t4g.medium", 1)),
        // Packer itself accepts a template without a build; the structural check does not.
        ("no build block", src[..src.find("\nbuild {").unwrap()].to_string()),
        ("a mismatched bracket", src.replacen("[\"amazon\"]", "[\"amazon\"}", 1)),
    ];
    let packer_catches = |what: &str| what != "no build block";
    let packer = which("packer");
    for (what, text_) in &broken {
        assert_ne!(text_, &src, "{what}: the mutation did not apply");
        let found = packer_problems(text_);
        assert!(!found.is_empty(), "the structural check missed {what}");
        println!("structural check on a copy with {what}: {}", found.join("; "));
        if let Some(packer) = packer.as_ref().filter(|_| packer_catches(what)) {
            let copy = dir.path().join("caretaker.pkr.hcl");
            std::fs::write(&copy, text_).unwrap();
            let out = packer_validate(packer, &copy);
            assert!(!out.status.success(), "packer validate passed a copy with {what}");
        }
    }

    match &packer {
        Some(packer) => {
            let version = Command::new(packer).arg("version").output().unwrap();
            let version = text(&version.stdout).trim().to_string();
            let out = packer_validate(packer, &template);
            assert!(
                out.status.success(),
                "{version}: packer validate failed:\n{}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
            let fmt = Command::new(packer).args(["fmt", "-check", "-diff"]).arg(&template).output().unwrap();
            assert!(fmt.status.success(), "packer fmt -check:\n{}", text(&fmt.stdout));
            println!("{version}: packer validate and packer fmt -check pass");
        }
        None => println!("no packer installed (apt-get install packer): only the structural check ran"),
    }
}
