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
