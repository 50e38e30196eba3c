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
        |_, _| {},
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
        upload(&s3, "backups", "caretaker/redis/y/data.zst.age", out, cfg(Encryption::Passphrase(pass)), |_, _| {})
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
        |_, _| {},
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
    let moto = Moto::start().unwrap();
    let s3 = bucket(&moto, "backups").await;
    let mut cfg = caretaker::config::Config::default();
    cfg.backup.bucket = Some("backups".into());
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
