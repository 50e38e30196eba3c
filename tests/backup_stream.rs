//! The backup stream against moto's S3: round trip through the stock `age` and `zstd` tools, no
//! plaintext in the stored object, a failed producer leaves nothing behind, S3 down fails in
//! bounded time.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use caretaker::aws::s3::S3;
use caretaker::backup::stream::{Encryption, StreamConfig, upload};
use caretaker::config::AwsConfig;
use caretaker_testkit::moto::Moto;
use sha2::{Digest, Sha256};

const MARKER: &str = "MARKER-PLAINTEXT-a1b2c3";

async fn s3_at(endpoint: &str) -> S3 {
    let aws = AwsConfig { s3_endpoint: Some(endpoint.into()), ..AwsConfig::default() };
    let creds = aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test");
    let sdk = caretaker::aws::sdk::sdk_config_with_credentials("us-east-1", creds).await;
    S3::new(caretaker::aws::sdk::s3_client(&sdk, &aws))
}

async fn bucket(moto: &Moto, name: &str) -> S3 {
    let aws = AwsConfig { s3_endpoint: Some(moto.endpoint()), ..AwsConfig::default() };
    let creds = aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test");
    let sdk = caretaker::aws::sdk::sdk_config_with_credentials("us-east-1", creds).await;
    let client = caretaker::aws::sdk::s3_client(&sdk, &aws);
    client.create_bucket().bucket(name).send().await.expect("create bucket");
    S3::new(client)
}

/// moto with a `backups` bucket, and a configuration that backs up to it.
async fn backups_bucket() -> (Moto, S3, caretaker::config::Config) {
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto, "backups").await;
    let mut cfg = caretaker::config::Config::default();
    cfg.backup.bucket = Some("backups".into());
    (moto, s3, cfg)
}

fn producer(script: &str) -> tokio::process::Child {
    tokio::process::Command::new("sh").arg("-c").arg(script).stdout(Stdio::piped()).spawn().unwrap()
}

fn cfg(encryption: Encryption) -> StreamConfig {
    StreamConfig { part_size: 5 << 20, parts_in_flight: 2, zstd_level: 3, encryption }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_decrypts_with_the_stock_tools_and_stores_no_plaintext() {
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto, "backups").await;
    let identity = age::x25519::Identity::generate();
    let key_file = tempfile::NamedTempFile::new().unwrap();
    use age::secrecy::ExposeSecret;
    writeln!(key_file.as_file(), "{}", identity.to_string().expose_secret()).unwrap();

    // Random bytes (incompressible) and text (compressible): more than two parts either way.
    let mut child = producer(&format!("head -c 9000000 /dev/urandom; seq 1 600000; echo {MARKER}"));
    let out = child.stdout.take().unwrap();
    let pending = upload(
        &s3,
        "backups",
        "caretaker/postgres/x/data.zst.age",
        out,
        cfg(Encryption::Recipients(vec![identity.to_public()])),
        |_, _, _| {},
    )
    .await
    .unwrap();
    assert!(child.wait().await.unwrap().success());
    assert!(pending.parts() >= 2, "{} parts", pending.parts());
    let (plain_sha, stored_sha, stored_bytes) =
        (pending.plain_sha256.clone(), pending.stored_sha256.clone(), pending.stored_bytes);
    pending.complete().await.unwrap();

    let stored = s3.get_object("backups", "caretaker/postgres/x/data.zst.age").await.unwrap().expect("object exists");
    assert_eq!(stored.len() as u64, stored_bytes);
    assert_eq!(hex::encode(Sha256::digest(&stored)), stored_sha);
    assert!(!stored.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()), "plaintext in the stored object");

    // An operator's restore: stock age and zstd.
    let mut age_d = std::process::Command::new("age")
        .args(["-d", "-i"])
        .arg(key_file.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("age");
    let mut age_in = age_d.stdin.take().unwrap();
    let writer = std::thread::spawn(move || age_in.write_all(&stored));
    let zstd =
        std::process::Command::new("zstd").args(["-d", "-c"]).stdin(age_d.stdout.take().unwrap()).output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(age_d.wait().unwrap().success());
    assert!(zstd.status.success());
    assert_eq!(hex::encode(Sha256::digest(&zstd.stdout)), plain_sha);
    assert!(zstd.stdout.ends_with(format!("{MARKER}\n").as_bytes()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_producer_leaves_no_object_and_no_upload() {
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto, "backups").await;
    let pass = age::secrecy::SecretString::from("a long machine-made passphrase 4f9c2e".to_string());
    let mut child = producer("head -c 7000000 /dev/urandom; exit 3");
    let out = child.stdout.take().unwrap();
    let pending =
        upload(&s3, "backups", "caretaker/redis/y/data.zst.age", out, cfg(Encryption::Passphrase(pass)), |_, _, _| {})
            .await
            .unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(3));
    // The caller's rule: producer failed → abort, never complete.
    pending.abort().await.unwrap();
    assert!(s3.get_object("backups", "caretaker/redis/y/data.zst.age").await.unwrap().is_none());
    assert!(s3.list_multipart_uploads("backups", "caretaker/").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unreachable_fails_in_bounded_time_with_a_clear_message() {
    let port = caretaker_testkit::ports::free_port();
    let s3 = s3_at(&format!("http://127.0.0.1:{port}")).await;
    let started = Instant::now();
    let err = upload(
        &s3,
        "backups",
        "k",
        tokio::io::empty(),
        cfg(Encryption::Recipients(vec![age::x25519::Identity::generate().to_public()])),
        |_, _, _| {},
    )
    .await
    .err()
    .expect("must fail");
    assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());
    let msg = err.to_string();
    assert!(msg.contains("CreateMultipartUpload") && msg.contains("s3://backups/k"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_keeps_the_retention_set_and_the_newest_verified_and_deletes_the_rest_whole() {
    use caretaker::backup::run::{Kind, Manifest, folder, list, prune};
    let (_moto, s3, mut cfg) = backups_bucket().await;
    cfg.backup.keep_daily = 3;
    cfg.backup.keep_weekly = 2;
    // One backup a day for 20 days (2026-11-02 is a Monday); only an old one was ever verified.
    let mut ids = Vec::new();
    for day in 0..20u64 {
        let started = humantime::parse_rfc3339("2026-11-02T03:00:00Z").unwrap() + Duration::from_secs(day * 86400);
        let id = caretaker::backup::run::new_id(started);
        let m = Manifest {
            schema: 1,
            id: id.clone(),
            kind: Kind::Postgres,
            instance_id: "i-0".into(),
            started_at: humantime::format_rfc3339_seconds(started).to_string(),
            finished_at: humantime::format_rfc3339_seconds(started).to_string(),
            duration_ms: 1,
            caretaker_version: "test".into(),
            producer: "pg_dump".into(),
            producer_version: String::new(),
            producer_exit_status: 0,
            plain_bytes: 1,
            plain_sha256: String::new(),
            stored_bytes: 1,
            stored_sha256: String::new(),
            parts: 1,
            compression: serde_json::json!({}),
            encryption: serde_json::json!({}),
            details: serde_json::json!({}),
        };
        let f = folder("caretaker", Kind::Postgres, &id);
        s3.put_object("backups", &format!("{f}data.zst.age"), b"x".to_vec()).await.unwrap();
        s3.put_object("backups", &format!("{f}manifest.json"), serde_json::to_vec(&m).unwrap()).await.unwrap();
        if day == 2 {
            s3.put_object("backups", &format!("{f}verify.json"), br#"{"ok": true}"#.to_vec()).await.unwrap();
        }
        ids.push(id);
    }
    let dry = prune(&cfg, &s3, true).await.unwrap();
    assert_eq!(dry[0].decisions.iter().filter(|d| !d.keep).count(), 15);
    assert_eq!(list(&cfg, &s3, Kind::Postgres).await.unwrap().len(), 20, "a dry run deletes nothing");

    prune(&cfg, &s3, false).await.unwrap();
    let left: Vec<String> = list(&cfg, &s3, Kind::Postgres).await.unwrap().into_iter().map(|m| m.id).collect();
    // Days 17, 18, 19 (daily; 19 is also this week's newest), day 13 (last week's newest: Sunday),
    // and day 2 (the newest verified).
    let want: Vec<String> = [2usize, 13, 17, 18, 19].iter().map(|d| ids[*d].clone()).collect();
    assert_eq!(left, want);
    let keys = s3.list_keys("backups", "caretaker/").await.unwrap();
    assert_eq!(keys.iter().filter(|k| k.ends_with("data.zst.age")).count(), 5, "data of pruned backups deleted too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_that_caretaker_did_not_write_where_they_are_are_ignored_and_never_panic() {
    use caretaker::backup::run::{Kind, folder, list, prune};
    let (_moto, s3, cfg) = backups_bucket().await;
    let started = humantime::parse_rfc3339("2026-11-22T03:00:00Z").unwrap();
    let manifest = |id: &str| {
        serde_json::json!({
            "schema": 1, "id": id, "kind": "postgres", "instance_id": "i-0", "started_at": "2026-11-22T03:00:00Z",
            "finished_at": "2026-11-22T03:00:00Z", "duration_ms": 1, "caretaker_version": "t", "producer": "pg_dump",
            "producer_version": "", "producer_exit_status": 0, "plain_bytes": 1, "plain_sha256": "", "stored_bytes": 1,
            "stored_sha256": "", "parts": 1, "compression": {}, "encryption": {}, "details": {}
        })
        .to_string()
        .into_bytes()
    };
    let real = caretaker::backup::run::new_id(started);
    let f = folder("caretaker", Kind::Postgres, &real);
    s3.put_object("backups", &format!("{f}manifest.json"), manifest(&real)).await.unwrap();
    let later = caretaker::backup::run::new_id(started + Duration::from_secs(86400));
    // A short id (it used to panic the job that sliced it), a manifest in the wrong date folder, one
    // that names another backup than its folder, one of the wrong kind, and an oversized one.
    let forged: Vec<(String, Vec<u8>)> = vec![
        ("caretaker/postgres/x/manifest.json".into(), manifest("x")),
        (format!("caretaker/postgres/2020/01/01/{later}/manifest.json"), manifest(&later)),
        (format!("{}manifest.json", folder("caretaker", Kind::Postgres, &later)), manifest(&real)),
        (format!("{}manifest.json", folder("caretaker", Kind::Redis, &later)), manifest(&later)),
        (
            format!("{}manifest.json", folder("caretaker", Kind::Postgres, &later)).replace("manifest", "x/manifest"),
            manifest(&later),
        ),
    ];
    for (key, body) in &forged {
        s3.put_object("backups", key, body.clone()).await.unwrap();
    }
    let big = caretaker::backup::run::new_id(started + Duration::from_secs(2 * 86400));
    let mut huge = manifest(&big);
    huge.extend(std::iter::repeat_n(b' ', 5 << 20));
    s3.put_object("backups", &format!("{}manifest.json", folder("caretaker", Kind::Postgres, &big)), huge)
        .await
        .unwrap();

    let ids: Vec<String> = list(&cfg, &s3, Kind::Postgres).await.unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, vec![real.clone()], "only the manifest caretaker wrote where it writes them");
    assert!(list(&cfg, &s3, Kind::Redis).await.unwrap().is_empty());
    let dry = prune(&cfg, &s3, true).await.unwrap();
    assert!(dry.iter().all(|r| r.decisions.iter().all(|d| d.id == real && d.keep)), "{dry:?}");
}

/// An HTTP/1.1 proxy in front of moto that answers `500` instead of forwarding UploadPart
/// requests for `part`, `failures` times (`usize::MAX`: always). Requests on one connection are
/// sequential (no pipelining), so each is read whole (headers + Content-Length body) and either
/// forwarded or answered; responses stream back as they come.
struct FaultProxy {
    port: u16,
    failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fault_proxy(upstream: u16, part: u32, failures: usize) -> FaultProxy {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = failed.clone();
    let needle = format!("partNumber={part}&");
    let task = tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else { return };
            let (count, needle) = (count.clone(), needle.clone());
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (inject_tx, mut inject_rx) = tokio::sync::mpsc::channel::<()>(1);
                let down = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        tokio::select! {
                            n = sr.read(&mut buf) => match n {
                                Ok(0) | Err(_) => return,
                                Ok(n) => if cw.write_all(&buf[..n]).await.is_err() { return },
                            },
                            Some(()) = inject_rx.recv() => {
                                let _ = cw.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nContent-Length: 80\r\nConnection: close\r\n\r\n<Error><Code>InternalError</Code><Message>injected by the test</Message></Error>").await;
                                let _ = cw.shutdown().await;
                                return;
                            }
                        }
                    }
                });
                let mut pending = Vec::new();
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    // One request: its head, then Content-Length bytes of body.
                    let head_end = loop {
                        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&pending[..head_end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while pending.len() < head_end + len {
                        match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    }
                    let request: Vec<u8> = pending.drain(..head_end + len).collect();
                    let first = head.lines().next().unwrap_or_default().to_string();
                    if first.starts_with("PUT ")
                        && (first.contains(&needle) || first.contains(&format!("partNumber={part} ")))
                        && count.fetch_add(1, Ordering::SeqCst) < failures
                    {
                        let _ = inject_tx.send(()).await;
                        let _ = down.await;
                        return;
                    }
                    if sw.write_all(&request).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    FaultProxy { port, failed, task }
}

fn moto_port(moto: &Moto) -> u16 {
    moto.endpoint().rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_that_keeps_failing_aborts_the_upload_and_a_transient_failure_is_retried() {
    let moto = Moto::start().unwrap();
    let direct = bucket(&moto, "backups").await;
    let recipients = || Encryption::Recipients(vec![age::x25519::Identity::generate().to_public()]);

    // Part 2 fails twice, then goes through: the upload completes.
    let proxy = fault_proxy(moto_port(&moto), 2, 2).await;
    let s3 = s3_at(&format!("http://127.0.0.1:{}", proxy.port)).await;
    let mut child = producer("head -c 14000000 /dev/urandom");
    let out = child.stdout.take().unwrap();
    let pending = upload(&s3, "backups", "caretaker/redis/ok/data.zst.age", out, cfg(recipients()), |_, _, _| {}).await;
    assert!(child.wait().await.unwrap().success());
    let pending = pending.expect("a transient part failure is retried");
    assert!(proxy.failed.load(std::sync::atomic::Ordering::SeqCst) >= 2, "the fault was injected");
    assert!(pending.parts() >= 3);
    pending.complete().await.unwrap();
    drop(proxy);

    // Part 2 always fails: the stream fails, the multipart upload is aborted, no object exists.
    let proxy = fault_proxy(moto_port(&moto), 2, usize::MAX).await;
    let s3 = s3_at(&format!("http://127.0.0.1:{}", proxy.port)).await;
    let mut child = producer("head -c 14000000 /dev/urandom");
    let out = child.stdout.take().unwrap();
    let err = upload(&s3, "backups", "caretaker/redis/bad/data.zst.age", out, cfg(recipients()), |_, _, _| {})
        .await
        .err()
        .expect("a part that never uploads fails the stream");
    let _ = child.wait().await;
    let msg = err.to_string();
    assert!(msg.contains("UploadPart") || msg.contains("part"), "{msg}");
    assert!(direct.get_object("backups", "caretaker/redis/bad/data.zst.age").await.unwrap().is_none());
    assert!(
        direct.list_multipart_uploads("backups", "caretaker/redis/bad/").await.unwrap().is_empty(),
        "the failed upload was aborted"
    );
    assert!(
        direct.get_object("backups", "caretaker/redis/ok/data.zst.age").await.unwrap().is_some(),
        "earlier data intact"
    );
}
