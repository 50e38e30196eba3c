//! The update core against moto's S3 and real API processes: releases of the stand-in test API
//! (`target/debug/test-api` with a version trailer) are published to a bucket, `update` fetches,
//! verifies, switches and health-gates them, and the "restart" in these tests kills the running
//! test-api and starts `INSTALL_DIR/current/zmanim-api` on the same port, as systemd would.
//!
//! Faults: a wrong hash, a missing or bad signature, a missing version, a download cut midway by a
//! proxy, a release that fails its health gate, a crash between switch and gate (reconcile).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use caretaker::aws::s3::S3;
use caretaker::config::{AwsConfig, Config, Seconds};
use caretaker::health::Probe;
use caretaker::notify::{Alerts, Mailer};
use caretaker::release::layout::{Install, Phase, State};
use caretaker::release::{Outcome, Target, UpdateError, UpdateRequest, reconcile, update, validate_version};
use caretaker_testkit::moto::Moto;
use caretaker_testkit::ports::{free_port, http_get};
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BUCKET: &str = "releases";
const APP: &str = "zmanim-api";

/// `target/debug/test-api`, next to this test's own `deps/` folder.
fn test_api_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let path = exe.parent().and_then(Path::parent).map(|d| d.join("test-api")).expect("target/debug");
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: build the stand-in API first: cargo build --workspace (or -p caretaker-testkit --bin test-api)",
                path.display()
            )
        })
    })
}

/// A release of the test API labelled `label`, optionally failing its health check.
fn artifact(label: &str, fail_health: bool) -> Vec<u8> {
    let mut bytes = test_api_bytes().to_vec();
    bytes.extend_from_slice(format!("\nTEST_API_VERSION={label}\n").as_bytes());
    if fail_health {
        bytes.extend_from_slice(b"TEST_API_FAIL_HEALTH=1\n");
    }
    bytes
}

async fn s3_at(endpoint: &str) -> (S3, aws_sdk_s3::Client) {
    let aws = AwsConfig { s3_endpoint: Some(endpoint.into()), ..AwsConfig::default() };
    let creds = aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test");
    let sdk = caretaker::aws::sdk::sdk_config_with_credentials("us-east-1", creds).await;
    let client = caretaker::aws::sdk::s3_client(&sdk, &aws);
    (S3::new(client.clone()), client)
}

async fn bucket(moto: &Moto) -> S3 {
    let (s3, client) = s3_at(&moto.endpoint()).await;
    client.create_bucket().bucket(BUCKET).send().await.expect("create bucket");
    s3
}

/// How a release is published.
#[derive(Clone, Copy)]
enum Sig<'a> {
    None,
    With(&'a SigningKey),
}

/// Publishes `bytes` as `version`; `sums_for` is what SHA256SUMS hashes (the bytes themselves,
/// unless a test wants a wrong hash).
async fn publish_with(s3: &S3, version: &str, bytes: Vec<u8>, sums_for: &[u8], sig: Sig<'_>) {
    let sums = format!("{}  {APP}\n{}  {APP}.sbom.json\n", hex::encode(Sha256::digest(sums_for)), "0".repeat(64));
    if let Sig::With(key) = sig {
        let message = caretaker::release::verify::signed_message(APP, version, sums.as_bytes());
        let signature = key.sign(&message).to_bytes().to_vec();
        s3.put_object(BUCKET, &format!("{APP}/{version}/SHA256SUMS.sig"), signature).await.unwrap();
    }
    s3.put_object(BUCKET, &format!("{APP}/{version}/SHA256SUMS"), sums.into_bytes()).await.unwrap();
    s3.put_object(BUCKET, &format!("{APP}/{version}/{APP}"), bytes).await.unwrap();
}

async fn publish(s3: &S3, version: &str, fail_health: bool) {
    let bytes = artifact(version, fail_health);
    publish_with(s3, version, bytes.clone(), &bytes, Sig::None).await;
}

/// The API as systemd would run it: one test-api process started from `INSTALL_DIR/current`.
struct Api {
    port: u16,
    install_dir: PathBuf,
    control_dir: PathBuf,
    child: Arc<Mutex<Option<Child>>>,
    restarts: Arc<AtomicUsize>,
    _tmp: tempfile::TempDir,
}

impl Api {
    fn new() -> Api {
        let tmp = tempfile::tempdir().unwrap();
        let install_dir = tmp.path().join("opt/zmanim");
        let control_dir = tmp.path().join("control");
        std::fs::create_dir_all(&install_dir).unwrap();
        std::fs::create_dir_all(&control_dir).unwrap();
        Api {
            port: free_port(),
            install_dir,
            control_dir,
            child: Arc::new(Mutex::new(None)),
            restarts: Arc::new(AtomicUsize::new(0)),
            _tmp: tmp,
        }
    }

    fn config(&self) -> Config {
        let mut c = Config::default();
        c.services.api.install_dir = self.install_dir.clone();
        c.services.api.health_url = format!("http://127.0.0.1:{}/health", self.port);
        c.release.bucket = Some(BUCKET.into());
        c.release.health_gate_consecutive = 3;
        c.release.health_gate_timeout = Seconds::from_secs(5);
        c.supervise.probe_timeout = Seconds::from_secs(2);
        c
    }

    fn probe(&self) -> Probe {
        Probe::Http {
            url: format!("http://127.0.0.1:{}/health", self.port),
            expect_json: Some(("status".into(), "ok".into())),
            client: Box::new(caretaker::http::Client::new()),
        }
    }

    /// The restart callback: stop the running process (by its PID), start `current`'s executable.
    fn restart(&self) -> impl FnMut() -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>> + Send {
        let (child, restarts) = (self.child.clone(), self.restarts.clone());
        let (exe, port, control) = (self.install_dir.join("current").join(APP), self.port, self.control_dir.clone());
        move || {
            let (child, restarts, exe, control) = (child.clone(), restarts.clone(), exe.clone(), control.clone());
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    restarts.fetch_add(1, Ordering::SeqCst);
                    let mut slot = child.lock().unwrap();
                    if let Some(mut old) = slot.take() {
                        let _ = old.kill();
                        let _ = old.wait();
                    }
                    *slot = Some(spawn_api(&exe, port, &control)?);
                    Ok(())
                })
                .await?
            })
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    fn restarts(&self) -> usize {
        self.restarts.load(Ordering::SeqCst)
    }

    /// `GET /health`: status and the version it reports.
    fn health(&self) -> (u16, String) {
        let r = http_get(&format!("http://127.0.0.1:{}/health", self.port)).expect("the API answers");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        (r.status, v["version"].as_str().unwrap_or_default().to_string())
    }

    fn install(&self) -> Install {
        Install::new(&self.install_dir, APP)
    }

    fn current_target(&self) -> PathBuf {
        std::fs::read_link(self.install_dir.join("current")).unwrap()
    }

    /// Every file under the install folder (relative), to show that nothing changed.
    fn tree(&self) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    walk(base, &p, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.install_dir, &self.install_dir, &mut out);
        out.sort();
        out
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_api(exe: &Path, port: u16, control: &Path) -> anyhow::Result<Child> {
    let mut tries = 0;
    loop {
        let spawned = Command::new(exe)
            .env("TEST_API_LISTEN", format!("127.0.0.1:{port}"))
            .env("TEST_API_CONTROL_DIR", control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match spawned {
            Ok(c) => return Ok(c),
            // Another test thread's fork may briefly hold a just-written executable open.
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(anyhow::anyhow!("starting {}: {e}", exe.display())),
        }
    }
}

fn to(version: &str) -> UpdateRequest {
    UpdateRequest { target: Target::Version(version.into()), dry_run: false, allow_downgrade: false }
}

/// moto with v1 and v2 published and a test API already updated to v1.
async fn on_v1_with_v2_published() -> (Moto, S3, Api, Config) {
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto).await;
    publish(&s3, "v1", false).await;
    publish(&s3, "v2", false).await;
    let api = Api::new();
    let cfg = api.config();
    run(&api, &cfg, &s3, &to("v1")).await.unwrap();
    (moto, s3, api, cfg)
}

async fn run(api: &Api, cfg: &Config, s3: &S3, request: &UpdateRequest) -> Result<Outcome, UpdateError> {
    run_with(api, cfg, s3, request, None).await
}

async fn run_with(
    api: &Api,
    cfg: &Config,
    s3: &S3,
    request: &UpdateRequest,
    alerts: Option<&Alerts>,
) -> Result<Outcome, UpdateError> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let result =
        update(cfg, s3, request, api.restart(), &api.probe(), alerts, move |l| sink.lock().unwrap().push(l)).await;
    eprintln!("update {request:?}:\n  {}\n  => {result:?}", lines.lock().unwrap().join("\n  "));
    result
}

fn no_partials(dir: &Path) -> bool {
    let mut found = Vec::new();
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".partial-") || name.starts_with("current.new-") {
                found.push(e.path());
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), found);
            }
        }
    }
    walk(dir, &mut found);
    assert!(found.is_empty(), "leftovers: {found:?}");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_to_v2_then_a_no_op_then_a_broken_v3_rolls_back_with_one_email() {
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto).await;
    for (v, broken) in [("v1", false), ("v2", false), ("v3", true)] {
        publish(&s3, v, broken).await;
    }
    let api = Api::new();
    let cfg = api.config();

    // Email through moto's SES.
    let aws = AwsConfig { ses_endpoint: Some(moto.endpoint()), ..AwsConfig::default() };
    let creds = aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test");
    let sdk = caretaker::aws::sdk::sdk_config_with_credentials("us-east-1", creds).await;
    let ses = caretaker::aws::sdk::ses_client(&sdk, &aws);
    ses.verify_email_identity().email_address("caretaker@example.com").send().await.unwrap();
    let mailer = Mailer {
        ses: caretaker::aws::ses::SesClient::new(ses),
        from: "caretaker@example.com".into(),
        to: vec!["ops@example.com".into()],
    };
    let alerts = Alerts::new(Some(mailer), "[caretaker]", "test-box", 12).with_retry(Duration::from_millis(200));

    let first = run(&api, &cfg, &s3, &to("v1")).await.unwrap();
    assert_eq!(first, Outcome::Updated { from: None, to: "v1".into(), pruned: vec![] });
    assert_eq!(api.health(), (200, "v1".into()));

    let second = run_with(&api, &cfg, &s3, &to("v2"), Some(&alerts)).await.unwrap();
    assert_eq!(second, Outcome::Updated { from: Some("v1".into()), to: "v2".into(), pruned: vec![] });
    assert_eq!(api.health(), (200, "v2".into()));
    assert_eq!(api.current_target(), Path::new("releases/v2"));
    assert!(api.install_dir.join("releases/v1").join(APP).is_file(), "v1 is kept");
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(api.install_dir.join("releases/v2/.verified")).unwrap()).unwrap();
    assert_eq!(marker["version"], "v2");
    assert_eq!(marker["sha256"], hex::encode(Sha256::digest(artifact("v2", false))));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(api.install_dir.join("releases/v2").join(APP)).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o755);

    // The same version again: a successful no-op, the API untouched.
    let (pid, restarts) = (api.pid(), api.restarts());
    let again = run(&api, &cfg, &s3, &to("v2")).await.unwrap();
    assert_eq!(again, Outcome::AlreadyRunning { version: "v2".into() });
    assert!(again.is_success());
    assert_eq!((api.pid(), api.restarts()), (pid, restarts));

    // A release that fails its health check: rolled back to v2, which is healthy again.
    let started = Instant::now();
    let third = run_with(&api, &cfg, &s3, &to("v3"), Some(&alerts)).await.unwrap();
    let Outcome::RolledBack { from, to: attempted, reason } = &third else { panic!("{third:?}") };
    assert_eq!((from.as_str(), attempted.as_str()), ("v2", "v3"));
    assert!(reason.contains("v3 failed its health gate"), "{reason}");
    assert!(!third.is_success());
    assert!(third.summary().starts_with("rolled back to v2: "), "{}", third.summary());
    assert_eq!(api.health(), (200, "v2".into()));
    assert_eq!(api.current_target(), Path::new("releases/v2"));
    assert_eq!(api.restarts(), restarts + 2, "one restart onto v3, one back");
    assert!(api.install_dir.join("releases/v3").join(APP).is_file(), "the failed release stays for inspection");
    assert!(started.elapsed() < Duration::from_secs(30));
    let state = api.install().read_state().unwrap();
    assert_eq!((state.phase, state.from.as_deref(), state.to.as_str()), (Phase::RolledBack, Some("v2"), "v3"));

    // One email, saying what happened.
    let deadline = Instant::now() + Duration::from_secs(20);
    let emails = loop {
        let sent = moto.sent_emails().unwrap();
        if !sent.is_empty() || Instant::now() > deadline {
            break sent;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(moto.sent_emails().unwrap().len(), 1, "{emails:?}");
    assert!(alerts.is_open("update"));
    assert!(no_partials(&api.install_dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_hash_is_refused_and_nothing_changes() {
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto).await;
    publish(&s3, "v1", false).await;
    publish_with(&s3, "v2", artifact("v2", false), b"something else", Sig::None).await;
    let api = Api::new();
    let cfg = api.config();
    run(&api, &cfg, &s3, &to("v1")).await.unwrap();
    let (pid, restarts, tree) = (api.pid(), api.restarts(), api.tree());

    let err = run(&api, &cfg, &s3, &to("v2")).await.unwrap_err();
    assert!(matches!(err, UpdateError::HashMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("SHA-256 mismatch") && msg.contains("refused"), "{msg}");
    assert_eq!((api.pid(), api.restarts()), (pid, restarts), "the running API is untouched");
    assert_eq!(api.tree(), tree, "nothing on disk changed");
    assert_eq!(api.health(), (200, "v1".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_configured_unsigned_and_badly_signed_releases_are_refused() {
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto).await;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed)).unwrap();
    let key = SigningKey::from_bytes(&seed);
    let other = SigningKey::from_bytes(&[9u8; 32]);
    for (v, sig) in [("v1", Sig::With(&key)), ("v2", Sig::None), ("v3", Sig::With(&other)), ("v4", Sig::With(&key))] {
        let bytes = artifact(v, false);
        publish_with(&s3, v, bytes.clone(), &bytes, sig).await;
    }
    let api = Api::new();
    let mut cfg = api.config();
    cfg.release.public_key = Some(hex::encode(key.verifying_key().as_bytes()));
    run(&api, &cfg, &s3, &to("v1")).await.unwrap();
    let (pid, restarts, tree) = (api.pid(), api.restarts(), api.tree());

    let unsigned = run(&api, &cfg, &s3, &to("v2")).await.unwrap_err();
    assert!(matches!(unsigned, UpdateError::Unsigned { .. }), "{unsigned}");
    assert!(unsigned.to_string().contains("not signed"), "{unsigned}");
    let bad = run(&api, &cfg, &s3, &to("v3")).await.unwrap_err();
    assert!(matches!(bad, UpdateError::BadSignature { .. }), "{bad}");
    assert!(bad.to_string().contains("does not verify"), "{bad}");
    assert_eq!((api.pid(), api.restarts()), (pid, restarts));
    assert_eq!(api.tree(), tree);
    assert_eq!(api.health(), (200, "v1".into()));

    // A tampered SHA256SUMS (signed before a change) is refused the same way.
    let sums = format!("{}  {APP}\n", hex::encode(Sha256::digest(artifact("v4", false))));
    let sig = key.sign(b"another text").to_bytes().to_vec();
    s3.put_object(BUCKET, &format!("{APP}/v4/SHA256SUMS"), sums.into_bytes()).await.unwrap();
    s3.put_object(BUCKET, &format!("{APP}/v4/SHA256SUMS.sig"), sig).await.unwrap();
    assert!(matches!(run(&api, &cfg, &s3, &to("v4")).await, Err(UpdateError::BadSignature { .. })));

    // A signed release copied under a newer version's name (v1's files as v5) is refused: the
    // version is part of what is signed.
    for file in ["SHA256SUMS", "SHA256SUMS.sig", APP] {
        let body = s3.get_object(BUCKET, &format!("{APP}/v1/{file}")).await.unwrap().unwrap();
        s3.put_object(BUCKET, &format!("{APP}/v5/{file}"), body).await.unwrap();
    }
    let renamed = run(&api, &cfg, &s3, &to("v5")).await.unwrap_err();
    assert!(matches!(renamed, UpdateError::BadSignature { .. }), "{renamed}");
    assert!(renamed.to_string().contains("the version `v5`"), "{renamed}");

    // Without the key the unsigned release is fine.
    cfg.release.public_key = None;
    let ok = run(&api, &cfg, &s3, &to("v2")).await.unwrap();
    assert_eq!(ok, Outcome::Updated { from: Some("v1".into()), to: "v2".into(), pruned: vec![] });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_version_is_refused_listing_the_available_ones_and_latest_is_followed() {
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto).await;
    for v in ["v1", "v2", "v10"] {
        publish(&s3, v, false).await;
    }
    let api = Api::new();
    let cfg = api.config();
    let err = run(&api, &cfg, &s3, &to("v9")).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, UpdateError::NoSuchVersion { .. }), "{msg}");
    assert!(msg.contains("no release v9") && msg.contains("available: v1, v2, v10"), "{msg}");
    assert_eq!(api.restarts(), 0);
    assert!(api.tree().is_empty() || api.tree() == ["releases"], "{:?}", api.tree());

    let latest = UpdateRequest { target: Target::Latest, dry_run: false, allow_downgrade: false };
    let err = run(&api, &cfg, &s3, &latest).await.unwrap_err();
    assert!(err.to_string().contains("LATEST does not exist"), "{err}");
    s3.put_object(BUCKET, &format!("{APP}/LATEST"), b"$(id)\n".to_vec()).await.unwrap();
    let err = run(&api, &cfg, &s3, &latest).await.unwrap_err();
    assert!(err.to_string().contains("not a release version"), "{err}");
    s3.put_object(BUCKET, &format!("{APP}/LATEST"), b"v2\n".to_vec()).await.unwrap();
    let ok = run(&api, &cfg, &s3, &latest).await.unwrap();
    assert_eq!(ok, Outcome::Updated { from: None, to: "v2".into(), pruned: vec![] });
    assert_eq!(api.health(), (200, "v2".into()));
}

/// A TCP proxy in front of moto that forwards requests whole but passes only `cut_after` bytes of
/// answers per connection, then closes it; counts connections.
struct Proxy {
    port: u16,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy(upstream: Option<u16>, cut_after: usize) -> Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let Some(up_port) = upstream else { continue };
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", up_port)).await else { return };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                let mut sent = 0usize;
                let mut buf = vec![0u8; 16 << 10];
                while sent < cut_after {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n.min(cut_after - sent),
                    };
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
                up.abort();
                let _ = cw.shutdown().await;
            });
        }
    });
    Proxy { port, connections, task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_midway_leaves_no_temporary_file_and_switches_nothing() {
    let (moto, _s3, api, cfg) = on_v1_with_v2_published().await;
    let (pid, restarts, tree) = (api.pid(), api.restarts(), api.tree());

    let cut = proxy(Some(moto.port()), 1 << 20).await;
    let (through_proxy, _) = s3_at(&format!("http://127.0.0.1:{}", cut.port)).await;
    let err = run(&api, &cfg, &through_proxy, &to("v2")).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, UpdateError::Download { .. }), "{msg}");
    assert!(msg.contains("download of s3://releases/zmanim-api/v2/zmanim-api failed after"), "{msg}");
    assert!(no_partials(&api.install_dir));
    assert_eq!(api.tree(), tree, "no temporary file, no release folder");
    assert_eq!((api.pid(), api.restarts()), (pid, restarts));
    assert_eq!(api.current_target(), Path::new("releases/v1"));
    assert_eq!(api.health(), (200, "v1".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_versions_are_rejected_before_any_request() {
    let counter = proxy(None, 0).await;
    let (s3, _) = s3_at(&format!("http://127.0.0.1:{}", counter.port)).await;
    let api = Api::new();
    let cfg = api.config();
    for v in ["1.2.3; rm -rf /", "$(id)", "`id`", "v1\n", "../v1", "v1/../../etc", "v 1", "latest", "", "-v1"] {
        let err = run(&api, &cfg, &s3, &to(v)).await.unwrap_err();
        assert!(matches!(err, UpdateError::InvalidVersion(_)), "{v:?}: {err}");
        assert!(err.to_string().contains("is not a release version"), "{err}");
    }
    let long = format!("v1.2.3-{}", "a".repeat(70));
    assert!(matches!(run(&api, &cfg, &s3, &to(&long)).await, Err(UpdateError::InvalidVersion(_))));
    assert_eq!(counter.connections.load(Ordering::SeqCst), 0, "no request was made");
    assert_eq!(api.restarts(), 0);
    assert!(api.tree().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_repairs_an_unverified_current_and_an_update_cut_between_switch_and_gate() {
    let (_moto, s3, api, cfg) = on_v1_with_v2_published().await;
    run(&api, &cfg, &s3, &to("v2")).await.unwrap();
    let install = api.install();

    // Killed after the switch to a (verified, broken) v3 but before its gate.
    std::fs::create_dir_all(install.release_dir("v3")).unwrap();
    std::fs::write(install.artifact_path("v3"), artifact("v3", true)).unwrap();
    std::fs::set_permissions(install.artifact_path("v3"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    install.write_marker("v3", &hex::encode(Sha256::digest(artifact("v3", true)))).unwrap();
    install
        .write_state(&State { from: Some("v2".into()), to: "v3".into(), phase: Phase::Switching, reason: None })
        .unwrap();
    install.switch("v3").unwrap();
    (api.restart())().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.health().0, 500, "v3 is running and unhealthy");
    let r = reconcile(&api.install_dir).unwrap();
    assert_eq!(r.current.as_deref(), Some("v2"), "{r:?}");
    assert!(r.restart_api, "{r:?}");
    (api.restart())().await.unwrap();
    let gate = caretaker::health::Gate::from_config(&cfg);
    gate.run(&api.probe()).await.unwrap();
    assert_eq!(api.health(), (200, "v2".into()));
    assert_eq!(install.read_state().unwrap().phase, Phase::RolledBack);

    // Killed between the rename and the marker of a v4 that current already points at, with
    // leftovers of the switch and of a download.
    std::fs::create_dir_all(install.release_dir("v4")).unwrap();
    std::fs::write(install.artifact_path("v4"), artifact("v4", false)).unwrap();
    std::fs::write(install.release_dir("v4").join(format!(".{APP}.partial-999999999")), b"half").unwrap();
    std::fs::create_dir_all(install.release_dir("v5")).unwrap();
    std::fs::write(install.release_dir("v5").join(format!(".{APP}.partial-999999998")), b"half").unwrap();
    std::os::unix::fs::symlink("releases/v1", api.install_dir.join("current.new-999999997")).unwrap();
    install.write_state(&State { from: Some("v2".into()), to: "v4".into(), phase: Phase::Done, reason: None }).unwrap();
    install.switch("v4").unwrap();
    let r = reconcile(&api.install_dir).unwrap();
    assert_eq!(r.current.as_deref(), Some("v2"), "{r:?}");
    assert!(r.restart_api);
    assert_eq!(r.repairs.len(), 5, "{:#?}", r.repairs);
    assert!(r.repairs.iter().any(|l| l == "pointed current at v2 (it pointed at v4)"), "{:#?}", r.repairs);
    assert!(no_partials(&api.install_dir));
    assert!(!install.release_dir("v5").exists(), "an empty release folder is removed");
    assert!(install.artifact_path("v4").exists(), "an unverified release is left for the operator");
    assert_eq!(api.current_target(), Path::new("releases/v2"));

    // Nothing more to do.
    let r = reconcile(&api.install_dir).unwrap();
    assert!(r.repairs.is_empty() && !r.restart_api, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_the_last_releases_and_never_current_or_previous() {
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto).await;
    for v in ["v1", "v2", "v4", "v5"] {
        publish(&s3, v, false).await;
    }
    let api = Api::new();
    let mut cfg = api.config();
    cfg.release.keep = 1;
    let mut pruned = Vec::new();
    for v in ["v1", "v2", "v4", "v5"] {
        match run(&api, &cfg, &s3, &to(v)).await.unwrap() {
            Outcome::Updated { pruned: p, .. } => pruned.push(p),
            other => panic!("{other:?}"),
        }
    }
    let none: Vec<String> = vec![];
    assert_eq!(pruned, [none.clone(), none, vec!["v1".to_string()], vec!["v2".to_string()]]);
    let left: Vec<String> = api.tree().into_iter().filter(|p| p.matches('/').count() == 1).collect();
    assert_eq!(left, ["releases/v4", "releases/v5"], "current and previous stay even with keep = 1");
    assert_eq!(api.health(), (200, "v5".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_verifies_and_leaves_everything_as_it_was() {
    let (_moto, s3, api, cfg) = on_v1_with_v2_published().await;
    publish_with(&s3, "v3", artifact("v3", false), b"wrong", Sig::None).await;
    let (pid, restarts, tree) = (api.pid(), api.restarts(), api.tree());
    let dry = |v: &str| UpdateRequest { target: Target::Version(v.into()), dry_run: true, allow_downgrade: false };

    let out = run(&api, &cfg, &s3, &dry("v2")).await.unwrap();
    assert_eq!(out, Outcome::DryRun { from: Some("v1".into()), to: "v2".into() });
    assert!(out.is_success());
    assert_eq!(api.tree(), tree, "the download is removed again");
    assert!(matches!(run(&api, &cfg, &s3, &dry("v3")).await, Err(UpdateError::HashMismatch { .. })));
    assert_eq!(api.tree(), tree);
    assert_eq!(run(&api, &cfg, &s3, &dry("v1")).await.unwrap(), Outcome::AlreadyRunning { version: "v1".into() });
    assert_eq!((api.pid(), api.restarts()), (pid, restarts));

    // A release already on disk stays there after a dry run of it.
    run(&api, &cfg, &s3, &to("v2")).await.unwrap();
    let tree = api.tree();
    assert_eq!(
        run(&api, &cfg, &s3, &dry("v1")).await.unwrap(),
        Outcome::DryRun { from: Some("v2".into()), to: "v1".into() }
    );
    assert_eq!(api.tree(), tree);
}

/// The SSM document's allowedPattern accepts exactly what `validate_version` accepts, plus `latest`.
#[test]
fn the_ssm_documents_pattern_agrees_with_validate_version() {
    let doc = caretaker_testkit::ssmdoc::Document::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/ssm/caretaker-update.json"),
    )
    .unwrap();
    let samples = [
        "v1",
        "v2",
        "v10",
        "1.2.3",
        "v1.2.3",
        "1.2",
        "1.2.3-rc.1",
        "1.2.3-rc-1",
        "v1.0.0+build.5",
        "1.0.0-a.b+c.d",
        "latest",
        "",
        "v",
        "V1",
        "vv1",
        "1.2.3.4",
        "1..2",
        "1.2.3-",
        "1.2.3-rc..1",
        "1.2.3+",
        "-1",
        "--latest",
        "1.2.3; rm -rf /",
        "$(id)",
        "`id`",
        "v1\n",
        "v1 ",
        "../v1",
        "v1/x",
        "1.2.3-rc_1",
        "1234567890",
        "latest; id",
        "v1|id",
        "v1'",
    ];
    for v in samples {
        let doc_ok = doc.resolve(&[("Version", v)]).is_ok();
        let ours = v == "latest" || validate_version(v).is_ok();
        assert_eq!(doc_ok, ours, "{v:?}: document {doc_ok}, validate_version {ours}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_release_is_refused_unless_asked_for() {
    let (_moto, s3, api, cfg) = on_v1_with_v2_published().await;
    run(&api, &cfg, &s3, &to("v2")).await.unwrap();
    let (pid, restarts) = (api.pid(), api.restarts());
    // Whoever can write the bucket re-publishes v1 (signed once, with a hole fixed since) as latest.
    let err = run(&api, &cfg, &s3, &to("v1")).await.unwrap_err();
    assert!(matches!(err, UpdateError::Downgrade { .. }), "{err}");
    assert!(err.to_string().contains("--allow-downgrade"), "{err}");
    assert_eq!(api.current_target(), Path::new("releases/v2"));
    assert_eq!((api.pid(), api.restarts()), (pid, restarts));
    let back = UpdateRequest { target: Target::Version("v1".into()), dry_run: false, allow_downgrade: true };
    run(&api, &cfg, &s3, &back).await.unwrap();
    assert_eq!(api.current_target(), Path::new("releases/v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_over_the_size_limit_is_refused_and_nothing_is_left_on_disk() {
    let (_moto, s3, api, mut cfg) = on_v1_with_v2_published().await;
    let tree = api.tree();
    cfg.release.max_artifact_bytes = 4096;
    let err = run(&api, &cfg, &s3, &to("v2")).await.unwrap_err();
    assert!(matches!(err, UpdateError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("release.max-artifact-bytes"), "{err}");
    assert!(no_partials(&api.install_dir));
    assert_eq!(api.tree(), tree, "no release folder, no partial file");
    assert_eq!(api.current_target(), Path::new("releases/v1"));
}
