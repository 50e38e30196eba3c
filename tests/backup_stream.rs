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

/// moto with a `backups` bucket, and a configuration that backs up to it with a passphrase in
/// its env file (the tempdir holds that file).
async fn backups_bucket() -> (Moto, S3, caretaker::config::Config, tempfile::TempDir) {
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto, "backups").await;
    let env = tempfile::tempdir().unwrap();
    std::fs::write(env.path().join("caretaker.env"), "BACKUP_PASSPHRASE=\"correct horse battery staple\"\n").unwrap();
    let mut cfg = caretaker::config::Config::default();
    cfg.backup.bucket = Some("backups".into());
    cfg.secrets.env_dir = env.path().to_path_buf();
    (moto, s3, cfg, env)
}

/// The manifest (or report) as this configuration's box writes it: sealed.
fn sealed(cfg: &caretaker::config::Config, doc: &impl serde::Serialize) -> Vec<u8> {
    caretaker::backup::seal::SealKeys::for_config(cfg).unwrap().seal(doc)
}

fn producer(script: &str) -> tokio::process::Child {
    tokio::process::Command::new("sh").arg("-c").arg(script).stdout(Stdio::piped()).spawn().unwrap()
}

fn cfg(encryption: Encryption) -> StreamConfig {
    StreamConfig {
        part_size: 5 << 20,
        parts_in_flight: 2,
        zstd_level: 3,
        encryption,
        priority: caretaker::priority::Priority::NORMAL,
    }
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
    let (plain_digest, stored_sha, stored_bytes) =
        (pending.plain_digest.clone(), pending.stored_sha256.clone(), pending.stored_bytes);
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
    assert_eq!(caretaker::backup::digest::xxh3_128_hex(&zstd.stdout), plain_digest);
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
    let (_moto, s3, mut cfg, _env) = backups_bucket().await;
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
            plain_sha256: "0".repeat(64),
            plain_xxh3_128: String::new(),
            stored_bytes: 1,
            stored_sha256: format!("{day:064}"),
            header_sha256: "0".repeat(64),
            parts: 1,
            compression: serde_json::json!({}),
            encryption: serde_json::json!({}),
            details: serde_json::json!({}),
        };
        let f = folder("caretaker", Kind::Postgres, &id);
        s3.put_object("backups", &format!("{f}data.zst.age"), b"x".to_vec()).await.unwrap();
        s3.put_object("backups", &format!("{f}manifest.json"), sealed(&cfg, &m)).await.unwrap();
        let report = |ok: bool| serde_json::json!({ "ok": ok, "id": id, "kind": "postgres", "fetched": { "stored_sha256": m.stored_sha256 } });
        match day {
            2 => s3.put_object("backups", &format!("{f}verify.json"), sealed(&cfg, &report(true))).await.unwrap(),
            // Newer "verified" reports that are not: unsealed, or sealed but about another backup.
            5 => s3
                .put_object("backups", &format!("{f}verify.json"), report(true).to_string().into_bytes())
                .await
                .unwrap(),
            6 => {
                let mut other = report(true);
                other["fetched"]["stored_sha256"] = serde_json::json!("0".repeat(64));
                s3.put_object("backups", &format!("{f}verify.json"), sealed(&cfg, &other)).await.unwrap()
            }
            _ => {}
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
    let (_moto, s3, cfg, _env) = backups_bucket().await;
    let started = humantime::parse_rfc3339("2026-11-22T03:00:00Z").unwrap();
    let doc = |id: &str| {
        serde_json::json!({
            "schema": 1, "id": id, "kind": "postgres", "instance_id": "i-0", "started_at": "2026-11-22T03:00:00Z",
            "finished_at": "2026-11-22T03:00:00Z", "duration_ms": 1, "caretaker_version": "t", "producer": "pg_dump",
            "producer_version": "", "producer_exit_status": 0, "plain_bytes": 1, "plain_sha256": "0".repeat(64), "stored_bytes": 1,
            "stored_sha256": "", "header_sha256": "0".repeat(64), "parts": 1, "compression": {}, "encryption": {},
            "details": {}
        })
    };
    let manifest = |id: &str| sealed(&cfg, &doc(id));
    let real = caretaker::backup::run::new_id(started);
    let f = folder("caretaker", Kind::Postgres, &real);
    s3.put_object("backups", &format!("{f}manifest.json"), manifest(&real)).await.unwrap();
    let later = caretaker::backup::run::new_id(started + Duration::from_secs(86400));
    // A short id (it used to panic the job that sliced it), a manifest in the wrong date folder, one
    // that names another backup than its folder, one of the wrong kind, and an oversized one.
    let mut forged: Vec<(String, Vec<u8>)> = vec![
        ("caretaker/postgres/x/manifest.json".into(), manifest("x")),
        (format!("caretaker/postgres/2020/01/01/{later}/manifest.json"), manifest(&later)),
        (format!("{}manifest.json", folder("caretaker", Kind::Postgres, &later)), manifest(&real)),
        (format!("{}manifest.json", folder("caretaker", Kind::Redis, &later)), manifest(&later)),
        (
            format!("{}manifest.json", folder("caretaker", Kind::Postgres, &later)).replace("manifest", "x/manifest"),
            manifest(&later),
        ),
    ];
    // Where caretaker writes them, later than the real one, but not sealed by this box: no seal, a
    // seal by another key, a sealed manifest edited afterwards.
    let at = |days: u64| {
        let id = caretaker::backup::run::new_id(started + Duration::from_secs(days * 86400));
        (format!("{}manifest.json", folder("caretaker", Kind::Postgres, &id)), id)
    };
    let (unsealed, other_key, edited) = (at(3), at(4), at(5));
    forged.push((unsealed.0.clone(), doc(&unsealed.1).to_string().into_bytes()));
    let another_box = caretaker::backup::seal::SealKeys::from_secrets([b"another box".as_slice()]);
    forged.push((other_key.0.clone(), another_box.seal(&doc(&other_key.1))));
    let tampered =
        String::from_utf8(manifest(&edited.1)).unwrap().replace("\"stored_bytes\": 1", "\"stored_bytes\": 2");
    forged.push((edited.0.clone(), tampered.into_bytes()));
    for (key, body) in &forged {
        s3.put_object("backups", key, body.clone()).await.unwrap();
    }
    let big = caretaker::backup::run::new_id(started + Duration::from_secs(2 * 86400));
    let mut huge = manifest(&big);
    huge.extend(std::iter::repeat_n(b' ', 5 << 20));
    s3.put_object("backups", &format!("{}manifest.json", folder("caretaker", Kind::Postgres, &big)), huge)
        .await
        .unwrap();

    let listed = caretaker::backup::run::listing(&cfg, &s3, Kind::Postgres).await.unwrap();
    let ids: Vec<String> = listed.backups.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids, vec![real.clone()], "only the manifest caretaker wrote where it writes them");
    // Each is reported (the redis-kind one where redis backups are listed; plus the oversized one).
    assert_eq!(listed.ignored.len(), forged.len() - 1 + 1, "{:#?}", listed.ignored);
    let why = |key: &str| listed.ignored.iter().find(|i| i.key == key).map(|i| i.why.clone()).unwrap();
    assert!(why(&unsealed.0).contains("no seal"), "{}", why(&unsealed.0));
    assert!(why(&other_key.0).contains("does not verify"), "{}", why(&other_key.0));
    assert!(why(&edited.0).contains("does not verify"), "{}", why(&edited.0));
    let latest = caretaker::backup::verify::find(&cfg, &s3, Kind::Postgres, "latest").await.unwrap();
    assert_eq!(latest.id, real, "`latest` is the newest sealed backup, not the newest object");
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

/// age-encrypts `plain` (no compression: the check fails before zstd would matter).
fn age_encrypt(recipient: &dyn age::Recipient, plain: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = age::Encryptor::with_recipients(std::iter::once(recipient)).unwrap().wrap_output(&mut out).unwrap();
    w.write_all(&zstd::encode_all(plain, 3).unwrap()).unwrap();
    w.finish().unwrap();
    out
}

fn header_sha(stored: &[u8]) -> String {
    hex::encode(Sha256::digest(&stored[..caretaker::backup::stream::age_prefix_len(stored).unwrap()]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_object_releases_no_plaintext_and_a_costly_passphrase_is_refused() {
    use caretaker::backup::digest::PlainDigest;
    use caretaker::backup::fetch::{Decryption, Expect, FetchError, fetch_into};
    fn expect(header_sha256: &str, plain: PlainDigest) -> Expect<'_> {
        Expect { header_sha256, plain }
    }
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto, "backups").await;
    let identity = age::x25519::Identity::generate();
    let key = "caretaker/postgres/x/data.zst.age";
    let out = producer("seq 1 100000").stdout.take().unwrap();
    let pending =
        upload(&s3, "backups", key, out, cfg(Encryption::Recipients(vec![identity.to_public()])), |_, _, _| {})
            .await
            .unwrap();
    let header = pending.header_sha256.clone();
    let pending_digest = pending.plain_digest.clone();
    pending.complete().await.unwrap();
    assert_eq!(header, header_sha(&s3.get_object("backups", key).await.unwrap().unwrap()));
    let ids = || Decryption::Identities(vec![identity.clone()]);
    let mut sink = Vec::new();
    let fetched = fetch_into(&s3, "backups", key, expect(&header, PlainDigest::CURRENT), ids(), &mut sink, |_, _| {})
        .await
        .unwrap();
    assert!(sink.starts_with(b"1\n2\n"));
    assert_eq!(fetched.plain_digest, pending_digest);
    assert_eq!(fetched.plain_digest, caretaker::backup::digest::xxh3_128_hex(&sink));
    // A schema-1 manifest's backup is checked with SHA-256, as it was made.
    let mut again = Vec::new();
    let old = fetch_into(&s3, "backups", key, expect(&header, PlainDigest::Sha256), ids(), &mut again, |_, _| {})
        .await
        .unwrap();
    assert_eq!((old.plain_digest, again), (hex::encode(Sha256::digest(&sink)), sink.clone()));

    // Whoever holds the public recipient replaces the object with another valid one: not one byte
    // of it reaches the sink (pg_restore's stdin, in a restore).
    let forged = age_encrypt(&identity.to_public(), b"COPY x TO PROGRAM 'id';\n");
    s3.put_object("backups", key, forged).await.unwrap();
    let mut sink = Vec::new();
    let err = fetch_into(&s3, "backups", key, expect(&header, PlainDigest::CURRENT), ids(), &mut sink, |_, _| {})
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Damaged(_)) && err.to_string().contains("replaced"), "{err}");
    assert!(sink.is_empty(), "plaintext released: {:?}", String::from_utf8_lossy(&sink));

    // A passphrase object with a higher scrypt work factor than caretaker writes is refused before
    // any scrypt work (2^16 here; up to 2^20 used to be accepted: seconds of CPU and 1 GiB each).
    let pass = age::secrecy::SecretString::from("a passphrase".to_string());
    let mut costly = age::scrypt::Recipient::new(pass.clone());
    costly.set_work_factor(caretaker::backup::stream::SCRYPT_LOG_N + 1);
    let stored = age_encrypt(&costly, b"data");
    s3.put_object("backups", "caretaker/redis/y/data.zst.age", stored.clone()).await.unwrap();
    let err = fetch_into(
        &s3,
        "backups",
        "caretaker/redis/y/data.zst.age",
        expect(&header_sha(&stored), PlainDigest::CURRENT),
        Decryption::Passphrase(pass.clone()),
        Vec::new(),
        |_, _| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::Key(_)) && err.to_string().contains("work factor"), "{err}");
    // What caretaker writes still decrypts.
    let mut usual = age::scrypt::Recipient::new(pass.clone());
    usual.set_work_factor(caretaker::backup::stream::SCRYPT_LOG_N);
    let stored = age_encrypt(&usual, b"data");
    s3.put_object("backups", "caretaker/redis/y/data.zst.age", stored.clone()).await.unwrap();
    let mut sink = Vec::new();
    let key = "caretaker/redis/y/data.zst.age";
    fetch_into(
        &s3,
        "backups",
        key,
        expect(&header_sha(&stored), PlainDigest::CURRENT),
        Decryption::Passphrase(pass),
        &mut sink,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(sink, b"data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_bucket_with_object_lock_backups_upload_and_pruning_only_hides_locked_versions() {
    let moto = Moto::start().unwrap();
    let aws = AwsConfig { s3_endpoint: Some(moto.endpoint()), ..AwsConfig::default() };
    let creds = aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test");
    let sdk = caretaker::aws::sdk::sdk_config_with_credentials("us-east-1", creds).await;
    let client = caretaker::aws::sdk::s3_client(&sdk, &aws);
    client.create_bucket().bucket("locked").send().await.unwrap();
    let s3 = S3::new(client.clone());
    let unprotected = s3.history_protection("locked").await.unwrap();
    assert!(!unprotected.lock_enabled && unprotected.versioning == "never enabled", "{unprotected:?}");
    // What packaging/aws/protect-backup-bucket does (the lab runs the script itself).
    use aws_sdk_s3::types::{
        BucketVersioningStatus, DefaultRetention, ObjectLockConfiguration, ObjectLockEnabled, ObjectLockRetentionMode,
        ObjectLockRule, VersioningConfiguration,
    };
    let versioning = VersioningConfiguration::builder().status(BucketVersioningStatus::Enabled).build();
    client.put_bucket_versioning().bucket("locked").versioning_configuration(versioning).send().await.unwrap();
    let retention = DefaultRetention::builder().mode(ObjectLockRetentionMode::Governance).days(14).build();
    let lock = ObjectLockConfiguration::builder()
        .object_lock_enabled(ObjectLockEnabled::Enabled)
        .rule(ObjectLockRule::builder().default_retention(retention).build())
        .build();
    client.put_object_lock_configuration().bucket("locked").object_lock_configuration(lock).send().await.unwrap();
    let p = s3.history_protection("locked").await.unwrap();
    assert_eq!(
        (p.versioning.as_str(), p.lock_enabled, p.mode.as_deref(), p.days),
        ("Enabled", true, Some("GOVERNANCE"), Some(14))
    );

    // A multipart backup and a manifest upload as usual (the SDK sends the checksums a locked
    // bucket requires) …
    let key = "caretaker/postgres/2026/11/22/x/data.zst.age";
    let out = producer("head -c 6000000 /dev/urandom").stdout.take().unwrap();
    let pass = age::secrecy::SecretString::from("p".to_string());
    let pending = upload(&s3, "locked", key, out, cfg(Encryption::Passphrase(pass)), |_, _, _| {}).await.unwrap();
    pending.complete().await.unwrap();
    s3.put_object("locked", "caretaker/postgres/2026/11/22/x/manifest.json", b"{}".to_vec()).await.unwrap();
    // … and a delete (what retention, or a compromised box, does) only hides them: the locked
    // versions stay, and deleting a version is refused.
    // (moto locks what PutObject stores; it does not apply the default retention to completed
    // multipart uploads, which S3 does: the manifest is the object checked here.)
    let manifest = "caretaker/postgres/2026/11/22/x/manifest.json";
    for k in [key, manifest] {
        s3.delete_object("locked", k).await.unwrap();
        assert!(s3.get_object("locked", k).await.unwrap().is_none(), "deleted: no current version");
        let versions = client.list_object_versions().bucket("locked").prefix(k).send().await.unwrap();
        assert_eq!(versions.versions().len(), 1, "the version stays: {versions:?}");
    }
    let versions = client.list_object_versions().bucket("locked").prefix(manifest).send().await.unwrap();
    let version = versions.versions()[0].version_id().unwrap();
    let destroy = client.delete_object().bucket("locked").key(manifest).version_id(version).send().await;
    assert!(destroy.is_err(), "a locked version was deleted");
}

/// What the SDK puts on the wire for one part, captured by a one-shot HTTP server: always the
/// CRC32 that S3 checks (and Object Lock buckets require); the SHA-256 of the body signed as well
/// only when asked (plain HTTP); with unsigned parts (what caretaker does over TLS) that second,
/// costlier pass over the bytes is gone.
#[tokio::test]
async fn a_part_carries_the_crc32_s3_checks_and_a_signed_sha256_only_when_asked() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn capture(unsigned: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 65536];
            // The headers, then as many bytes as Content-Length announces.
            loop {
                let n = sock.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).to_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text[..end]
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                        .unwrap_or(0);
                    if req.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            sock.write_all(b"HTTP/1.1 200 OK\r\nETag: \"abc\"\r\nContent-Length: 0\r\n\r\n").await.unwrap();
            let end = req.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            String::from_utf8_lossy(&req[..end]).to_lowercase()
        });
        let s3 = s3_at(&endpoint).await.with_unsigned_parts(unsigned);
        let etag = s3.upload_part("b", "k", "upload-1", 1, bytes::Bytes::from(vec![7u8; 64 * 1024])).await.unwrap();
        assert_eq!(etag, "\"abc\"");
        server.await.unwrap()
    }
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(vec![7u8; 64 * 1024]).iter().map(|b| format!("{b:02x}")).collect();
    let signed = capture(false).await;
    assert!(signed.contains(&format!("x-amz-content-sha256: {digest}")), "the body's SHA-256 is signed:\n{signed}");
    assert!(signed.contains("x-amz-checksum-crc32:"), "{signed}");
    let unsigned = capture(true).await;
    assert!(unsigned.contains("x-amz-content-sha256: unsigned-payload"), "no SHA-256 pass for SigV4:\n{unsigned}");
    assert!(unsigned.contains("x-amz-checksum-crc32:"), "S3 still checks every part:\n{unsigned}");

    // An S3 server takes unsigned parts: a multipart upload of two of them reads back whole.
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto, "unsigned").await.with_unsigned_parts(true);
    let id = s3.create_multipart("unsigned", "k").await.unwrap();
    let (a, b) = (vec![1u8; 5 << 20], vec![2u8; 1000]);
    let e1 = s3.upload_part("unsigned", "k", &id, 1, bytes::Bytes::from(a.clone())).await.unwrap();
    let e2 = s3.upload_part("unsigned", "k", &id, 2, bytes::Bytes::from(b.clone())).await.unwrap();
    s3.complete_multipart("unsigned", "k", &id, &[e1, e2]).await.unwrap();
    assert_eq!(s3.get_object("unsigned", "k").await.unwrap().unwrap(), [a, b].concat());
}

/// The daemon's cleaner of stale multipart uploads (left by a killed daemon) runs while jobs may
/// already run: an upload this process created and has not finished is never one of them.
#[tokio::test]
async fn uploads_this_process_is_running_are_never_stale() {
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto, "live").await;
    let running = s3.create_multipart("live", "caretaker/postgres/a/data.zst.age").await.unwrap();
    assert!(caretaker::aws::s3::ours_in_flight(&running));
    // One another process left behind (created with a raw request: not this process's).
    let left =
        moto.request("POST", "/live/caretaker/postgres/b/data.zst.age?uploads", &[Moto::s3_auth()], b"").unwrap();
    assert_eq!(left.status, 200, "{}", left.text());
    assert_eq!(s3.list_multipart_uploads("live", "caretaker/").await.unwrap().len(), 2);
    let aborted = caretaker::backup::stream::abort_stale_uploads(&s3, "live", "caretaker/").await.unwrap();
    let keys: Vec<&str> = aborted
        .iter()
        .map(|(k, r)| {
            assert!(r.is_ok(), "{r:?}");
            k.as_str()
        })
        .collect();
    assert_eq!(keys, ["caretaker/postgres/b/data.zst.age"], "only what another process left");
    let left: Vec<_> = s3.list_multipart_uploads("live", "caretaker/").await.unwrap();
    assert_eq!(left, [("caretaker/postgres/a/data.zst.age".to_string(), running.clone())], "the running one stays");
    // Once finished (completed or aborted) it is no longer this process's to protect.
    s3.abort_multipart("live", "caretaker/postgres/a/data.zst.age", &running).await.unwrap();
    assert!(!caretaker::aws::s3::ours_in_flight(&running));
}
