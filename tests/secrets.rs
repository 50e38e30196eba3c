//! SSM parameters into env files, against moto's SSM (paging, decryption, paths) and against a tiny
//! scripted SSM endpoint for the failures moto cannot produce (throttling, access denied).
//!
//! Every value here carries `SECRETMARK`, so "no value leaked" is one `contains` away.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_ssm::config::Credentials;
use aws_sdk_ssm::types::ParameterType;
use bytes::Bytes;
use caretaker::aws::sdk::{sdk_config_with_credentials, ssm_client};
use caretaker::aws::ssm::{SsmClient, SsmError};
use caretaker::boot::secrets::{FileOutcome, SecretsError, write_env_files};
use caretaker::config::{AwsConfig, EnvFileConfig, SecretsConfig};
use caretaker_testkit::moto::Moto;
use http_body_util::Full;

const MARK: &str = "SECRETMARK";
const REGION: &str = "eu-west-1";

async fn client_for(endpoint: &str) -> aws_sdk_ssm::Client {
    let sdk = sdk_config_with_credentials(REGION, Credentials::new("testing", "testing", None, None, "test")).await;
    let aws = AwsConfig { ssm_endpoint: Some(endpoint.to_string()), ..AwsConfig::default() };
    ssm_client(&sdk, &aws)
}

/// The 25 parameters under /zmanim/prod/: (relative name, type, value).
fn fixture() -> Vec<(String, ParameterType, String)> {
    let mut v = vec![
        (
            "db-password".to_string(),
            ParameterType::SecureString,
            format!("{MARK}-db \"quoted\" $dollar `tick` back\\slash\nline2"),
        ),
        ("clerk-secret-key".into(), ParameterType::SecureString, format!("{MARK}-sk_live_123")),
        (
            "config".into(),
            ParameterType::String,
            format!("# app settings\nLOG_LEVEL={MARK}-debug\n\nPORT={MARK}-8080\n"),
        ),
        ("features".into(), ParameterType::SecureString, format!(r#"{{"FEATURE_X": "{MARK}-on", "FLAG": true}}"#)),
        ("nested/api-token".into(), ParameterType::SecureString, format!("{MARK}-token")),
    ];
    for i in 0..20 {
        let kind = if i % 2 == 0 { ParameterType::String } else { ParameterType::SecureString };
        v.push((format!("w-{i:02}"), kind, format!("{MARK}-worker-{i}")));
    }
    v
}

async fn put(ssm: &aws_sdk_ssm::Client, name: &str, kind: ParameterType, value: &str) {
    ssm.put_parameter().name(name).r#type(kind).value(value).overwrite(true).send().await.expect("PutParameter");
}

fn secrets_config(env_dir: &Path) -> SecretsConfig {
    let api = EnvFileConfig {
        name: "zmanim-api".into(),
        group: None,
        vars: BTreeMap::from([
            ("CLERK_SECRET_KEY".into(), "clerk-secret-key".into()),
            ("DB_PASSWORD".into(), "db-password".into()),
            ("API_TOKEN".into(), "nested/api-token".into()),
            ("SENTRY_DSN".into(), "sentry-dsn".into()),
        ]),
        templates: BTreeMap::from([(
            "DATABASE_URL".into(),
            "postgres://zmanim:{db-password}@127.0.0.1:5432/zmanim".into(),
        )]),
        expand: vec!["config".into(), "features".into()],
        optional: vec!["sentry-dsn".into()],
    };
    let worker = EnvFileConfig {
        name: "worker".into(),
        vars: (0..20).map(|i| (format!("W_{i:02}"), format!("w-{i:02}"))).collect(),
        ..EnvFileConfig::default()
    };
    SecretsConfig { ssm_path: "/zmanim/prod/".into(), env_dir: env_dir.to_path_buf(), files: vec![api, worker] }
}

const API_ENV: &str = r#"# Written by caretaker from SSM parameters under /zmanim/prod/; replaced at every boot, do not edit.
API_TOKEN="SECRETMARK-token"
CLERK_SECRET_KEY="SECRETMARK-sk_live_123"
DB_PASSWORD="SECRETMARK-db \"quoted\" \$dollar \`tick\` back\\slash
line2"
DATABASE_URL="postgres://zmanim:SECRETMARK-db \"quoted\" \$dollar \`tick\` back\\slash
line2@127.0.0.1:5432/zmanim"
LOG_LEVEL="SECRETMARK-debug"
PORT="SECRETMARK-8080"
FEATURE_X="SECRETMARK-on"
FLAG="true"
"#;

fn worker_env() -> String {
    let mut s =
        "# Written by caretaker from SSM parameters under /zmanim/prod/; replaced at every boot, do not edit.\n"
            .to_string();
    for i in 0..20 {
        s.push_str(&format!("W_{i:02}=\"{MARK}-worker-{i}\"\n"));
    }
    s
}

/// moto with the fixture, plus parameters on neighbouring paths that must never be read.
async fn moto_with_fixture() -> (Moto, aws_sdk_ssm::Client) {
    let moto = Moto::start().expect("moto starts");
    let ssm = client_for(&moto.endpoint()).await;
    for (name, kind, value) in fixture() {
        put(&ssm, &format!("/zmanim/prod/{name}"), kind, &value).await;
    }
    put(&ssm, "/zmanim/production/leak", ParameterType::SecureString, &format!("{MARK}-LEAK-1")).await;
    put(&ssm, "/zmanim/staging/db-password", ParameterType::SecureString, &format!("{MARK}-LEAK-2")).await;
    (moto, ssm)
}

fn assert_no_secrets(what: &str, text: &str) {
    assert!(!text.contains(MARK), "{what} shows a value: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_five_parameters_over_three_pages_into_exact_files() {
    let (_moto, raw) = moto_with_fixture().await;
    // The premise of the decryption check: without WithDecryption moto hands back the ciphertext stand-in.
    let undecrypted = raw.get_parameter().name("/zmanim/prod/clerk-secret-key").send().await.unwrap();
    assert!(undecrypted.parameter().and_then(|p| p.value()).unwrap().starts_with("kms:"));

    let ssm = SsmClient::new(raw.clone());
    let params = ssm.get_parameters_by_path("/zmanim/prod/").await.unwrap();
    assert_eq!(params.len(), 25);
    assert!(params.iter().all(|p| p.name.starts_with("/zmanim/prod/")), "{params:?}");
    let by_name: BTreeMap<_, _> = params.iter().map(|p| (p.name.as_str(), p.value.expose())).collect();
    for (name, _, value) in fixture() {
        assert_eq!(by_name[format!("/zmanim/prod/{name}").as_str()], value, "{name} (decrypted?)");
    }
    assert_no_secrets("Debug of the parameters", &format!("{params:?} {params:#?}"));

    let tmp = tempfile::tempdir().unwrap();
    let env_dir = tmp.path().join("run/caretaker/env");
    let cfg = secrets_config(&env_dir);
    let report = write_env_files(&cfg, &ssm).await.unwrap();
    assert_eq!(report.parameters_read, 25);
    assert_eq!(report.pages, [10, 10, 5], "{report:?}");
    assert!(report.unused_parameters.is_empty(), "{report:?}");
    assert_eq!((report.written(), report.unchanged()), (2, 0));
    let api = &report.files[0];
    assert_eq!(
        api.vars,
        ["API_TOKEN", "CLERK_SECRET_KEY", "DB_PASSWORD", "DATABASE_URL", "LOG_LEVEL", "PORT", "FEATURE_X", "FLAG"]
    );
    assert_eq!(api.omitted, ["/zmanim/prod/sentry-dsn"]);
    assert_no_secrets("the report", &format!("{report:?} {report}"));

    let api_path = env_dir.join("zmanim-api.env");
    let worker_path = env_dir.join("worker.env");
    assert_eq!(std::fs::read_to_string(&api_path).unwrap(), API_ENV);
    assert_eq!(std::fs::read_to_string(&worker_path).unwrap(), worker_env());
    for p in [&api_path, &worker_path] {
        let m = std::fs::metadata(p).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600, "{}", p.display());
        assert_eq!(m.uid(), nix::unistd::geteuid().as_raw());
    }
    assert_eq!(std::fs::metadata(&env_dir).unwrap().mode() & 0o7777, 0o755);
    let names: Vec<_> = std::fs::read_dir(&env_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "only the two files, no leftovers: {names:?}");

    // Idempotent: a second run touches nothing.
    let inode = std::fs::metadata(&api_path).unwrap().ino();
    let again = write_env_files(&cfg, &ssm).await.unwrap();
    assert_eq!((again.written(), again.unchanged()), (0, 2));
    assert!(again.files.iter().all(|f| f.outcome == FileOutcome::Unchanged));
    assert_eq!(std::fs::metadata(&api_path).unwrap().ino(), inode, "rewritten although unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_required_parameter_fails_closed() {
    let (_moto, raw) = moto_with_fixture().await;
    let ssm = SsmClient::new(raw.clone());
    let tmp = tempfile::tempdir().unwrap();
    let env_dir = tmp.path().join("env");
    let cfg = secrets_config(&env_dir);
    write_env_files(&cfg, &ssm).await.unwrap();
    let api_path = env_dir.join("zmanim-api.env");
    let before = std::fs::read(&api_path).unwrap();
    let inode = std::fs::metadata(&api_path).unwrap().ino();

    // The api file would change, but the worker's file cannot be made: nothing may be written.
    put(&raw, "/zmanim/prod/clerk-secret-key", ParameterType::SecureString, &format!("{MARK}-rotated")).await;
    raw.delete_parameter().name("/zmanim/prod/w-07").send().await.unwrap();
    let mut cfg2 = cfg.clone();
    cfg2.files.push(EnvFileConfig {
        name: "new-service".into(),
        vars: BTreeMap::from([("A".into(), "db-password".into())]),
        ..EnvFileConfig::default()
    });
    let err = write_env_files(&cfg2, &ssm).await.unwrap_err();
    let SecretsError::Missing { missing } = &err else { panic!("{err}") };
    assert_eq!(missing.len(), 1, "{err}");
    assert_eq!(missing[0].parameter, "/zmanim/prod/w-07");
    assert_eq!(missing[0].file, env_dir.join("worker.env"));
    let msg = err.to_string();
    assert!(msg.contains("/zmanim/prod/w-07") && msg.contains("worker.env"), "{msg}");
    assert_no_secrets("the error", &format!("{msg} {err:?}"));

    assert_eq!(std::fs::read(&api_path).unwrap(), before, "a file changed although the step failed");
    assert_eq!(std::fs::metadata(&api_path).unwrap().ino(), inode);
    assert!(!env_dir.join("new-service.env").exists());
    assert_eq!(std::fs::read_dir(&env_dir).unwrap().count(), 2, "no new or temporary files");

    // An optional parameter may go missing without failing the step.
    raw.delete_parameter().name("/zmanim/prod/features").send().await.unwrap();
    let mut cfg3 = cfg.clone();
    cfg3.files.truncate(1);
    cfg3.files[0].optional.push("features".into());
    let report = write_env_files(&cfg3, &ssm).await.unwrap();
    let text = std::fs::read_to_string(&api_path).unwrap();
    assert!(text.contains(&format!("CLERK_SECRET_KEY=\"{MARK}-rotated\"")) && !text.contains("FEATURE_X"), "{text}");
    assert_eq!(report.files[0].omitted, ["/zmanim/prod/features", "/zmanim/prod/sentry-dsn"]);
    assert!(report.unused_parameters.iter().any(|n| n.starts_with("/zmanim/prod/w-")), "{report:?}");
}

// A scripted SSM endpoint: the n-th request (from 0) gets `script(n)`.

type Script = dyn Fn(usize) -> (u16, String) + Send + Sync;

struct FakeSsm {
    url: String,
    requests: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

async fn fake_ssm(script: Arc<Script>) -> FakeSsm {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (script, counter) = (script.clone(), counter.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    let (status, body) = script(counter.fetch_add(1, Ordering::SeqCst));
                    async move {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/x-amz-json-1.1")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    FakeSsm { url, requests, _task: task }
}

/// An SsmClient at `url` with the SDK's own retries off, so only ours are counted.
async fn scripted_client(url: &str) -> SsmClient {
    let sdk = client_for(url).await;
    let conf = sdk.config().to_builder().retry_config(aws_sdk_ssm::config::retry::RetryConfig::disabled()).build();
    SsmClient::new(aws_sdk_ssm::Client::from_conf(conf))
        .with_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .with_deadline(Duration::from_secs(5))
}

fn throttled() -> (u16, String) {
    (400, r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#.into())
}

fn one_page() -> (u16, String) {
    let body = format!(
        r#"{{"Parameters":[{{"Name":"/zmanim/prod/a","Type":"SecureString","Value":"{MARK}-a","Version":1}}]}}"#
    );
    (200, body)
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried() {
    let fake = fake_ssm(Arc::new(|n| match n {
        0 | 1 => throttled(),
        2 => (500, r#"{"__type":"InternalServerError","message":"oops"}"#.into()),
        _ => one_page(),
    }))
    .await;
    let listing = scripted_client(&fake.url).await.read_path("/zmanim/prod/").await.unwrap();
    assert_eq!(listing.retries, 3);
    assert_eq!(listing.pages, [1]);
    assert_eq!(listing.parameters[0].value.expose(), format!("{MARK}-a"));
    assert_eq!(fake.requests.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn endless_throttling_stops_at_the_deadline() {
    let fake = fake_ssm(Arc::new(|_| throttled())).await;
    let ssm = scripted_client(&fake.url).await.with_deadline(Duration::from_millis(600));
    let started = Instant::now();
    let err = ssm.get_parameters_by_path("/zmanim/prod/").await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    let SsmError::Deadline { calls, .. } = &err else { panic!("{err}") };
    assert!(*calls > 2, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("/zmanim/prod/") && msg.contains("GetParametersByPath") && msg.contains("throttled"), "{msg}");
}

#[tokio::test]
async fn access_denied_names_the_permission_and_is_not_retried() {
    let fake = fake_ssm(Arc::new(|_| {
        (
            400,
            r#"{"__type":"AccessDeniedException","Message":"User: arn:aws:sts::123456789012:assumed-role/box/i-0abc is not authorized to perform: ssm:GetParametersByPath on resource: arn:aws:ssm:eu-west-1:123456789012:parameter/zmanim/prod because no identity-based policy allows the ssm:GetParametersByPath action"}"#
                .into(),
        )
    }))
    .await;
    let err = scripted_client(&fake.url).await.get_parameters_by_path("/zmanim/prod/").await.unwrap_err();
    assert!(matches!(err, SsmError::AccessDenied { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("the instance role may not read /zmanim/prod/: add ssm:GetParametersByPath on arn:aws:ssm:eu-west-1:123456789012:parameter/zmanim/prod and arn:aws:ssm:eu-west-1:123456789012:parameter/zmanim/prod/*"),
        "{msg}"
    );
    assert_eq!(fake.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_group_file_is_0640_and_owned_by_that_group() {
    let fake = fake_ssm(Arc::new(|_| one_page())).await;
    let ssm = scripted_client(&fake.url).await;
    let group = ["daemon", "adm"]
        .into_iter()
        .find_map(|g| nix::unistd::Group::from_name(g).ok().flatten())
        .or_else(|| nix::unistd::Group::from_gid(nix::unistd::getegid()).ok().flatten())
        .expect("some group");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SecretsConfig {
        ssm_path: "/zmanim/prod/".into(),
        env_dir: tmp.path().join("env"),
        files: vec![EnvFileConfig {
            name: "api".into(),
            group: Some(group.name.clone()),
            vars: BTreeMap::from([("A".into(), "a".into())]),
            ..EnvFileConfig::default()
        }],
    };
    let report = write_env_files(&cfg, &ssm).await.unwrap();
    assert_eq!(report.files[0].mode, 0o640);
    let m = std::fs::metadata(tmp.path().join("env/api.env")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.gid()), (0o640, group.gid.as_raw()));
    assert_eq!(write_env_files(&cfg, &ssm).await.unwrap().unchanged(), 1);
}

/// What we write is what a real systemd (252, in a lab box) puts into a service's environment.
#[test]
fn values_round_trip_through_a_real_systemd() {
    use caretaker::aws::ssm::{Parameter, ParameterKind, SecretString};
    use caretaker_testkit::lab::{BoxOptions, LabBox};

    let values = [
        "plain",
        "with \"double\" and 'single' quotes",
        "dollar $HOME ${PATH} $$ and %h %n",
        "back`tick` and \\backslash\\ and trailing \\",
        "line1\nline2\n\nline4\n",
        "  leading and trailing spaces  ",
        "\\\n backslash before newline",
        "# not a comment; nor this",
        "tab\there, unicode ✓ שלום",
        "\\\"$`",
        "=",
    ];
    let mut file = EnvFileConfig { name: "roundtrip".into(), ..EnvFileConfig::default() };
    let mut params = Vec::new();
    for (i, v) in values.iter().enumerate() {
        file.vars.insert(format!("RT_{i:02}"), format!("p{i}"));
        params.push(Parameter {
            name: format!("/zmanim/prod/p{i}"),
            value: SecretString::new(*v),
            kind: ParameterKind::SecureString,
        });
    }
    let cfg = SecretsConfig { ssm_path: "/zmanim/prod/".into(), env_dir: "/run/rt".into(), files: vec![file] };
    let rendered = caretaker::boot::secrets::render(&cfg, &params).unwrap();

    caretaker_testkit::lab::require_root_and_tools().expect("the lab needs root and systemd-nspawn");
    let b = LabBox::start("secrets", BoxOptions { services: false, ..Default::default() }).expect("lab box boots");
    b.write_file("/run/rt/roundtrip.env", rendered[0].contents.expose().as_bytes(), 0o600).unwrap();
    let out = b.sh_ok("systemd-run --wait --pipe --quiet -p EnvironmentFile=/run/rt/roundtrip.env /usr/bin/env -0");
    let got: BTreeMap<&str, &str> =
        out.split('\0').filter_map(|kv| kv.split_once('=')).filter(|(k, _)| k.starts_with("RT_")).collect();
    assert_eq!(got.len(), values.len(), "{got:?}");
    for (i, v) in values.iter().enumerate() {
        assert_eq!(got[format!("RT_{i:02}").as_str()], *v, "value {i}");
    }
    b.down().unwrap();
}
