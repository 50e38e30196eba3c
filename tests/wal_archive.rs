//! WAL archiving against a real PostgreSQL (archive_command = `caretaker wal push` through the
//! WAL socket) and moto's S3: acknowledged only once S3 holds a segment, checked against the
//! cluster, never overwritten, fetched back only when sealed and intact, bounded in time, and
//! nothing skipped across an S3 outage.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use caretaker::aws::s3::S3;
use caretaker::backup::wal::archive::Archive;
use caretaker::backup::wal::chain;
use caretaker::backup::wal::server::{WalServer, serve};
use caretaker::config::AwsConfig;
use caretaker_testkit::moto::Moto;
use caretaker_testkit::pg::Cluster;
use caretaker_testkit::proxy::{BLACK_HOLE, DOWN, Proxy, UP};
use caretaker_testkit::wait_until;

const CARETAKER: &str = env!("CARGO_BIN_EXE_caretaker");

async fn s3_at(endpoint: &str, create: Option<&str>) -> S3 {
    let aws = AwsConfig { s3_endpoint: Some(endpoint.into()), ..AwsConfig::default() };
    let creds = aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test");
    let sdk = caretaker::aws::sdk::sdk_config_with_credentials("us-east-1", creds).await;
    let client = caretaker::aws::sdk::s3_client(&sdk, &aws);
    if let Some(b) = create {
        client.create_bucket().bucket(b).send().await.expect("create bucket");
    }
    S3::new(client)
}

fn config(env_dir: &Path) -> caretaker::config::Config {
    std::fs::write(env_dir.join("caretaker.env"), "BACKUP_PASSPHRASE=\"correct horse battery staple\"\n").unwrap();
    let mut cfg = caretaker::config::Config::default();
    cfg.backup.bucket = Some("backups".into());
    cfg.secrets.env_dir = env_dir.to_path_buf();
    cfg
}

fn postgres_uid() -> u32 {
    nix::unistd::User::from_name("postgres").unwrap().unwrap().uid.as_raw()
}

fn caretaker_as(user: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([&format!("--reuid={user}"), "--regid=nogroup", "--clear-groups", "--", CARETAKER])
        .args(args)
        .output()
        .unwrap()
}

fn archiver(pg: &Cluster) -> (i64, String, i64) {
    let line = pg.sql("SELECT archived_count, coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver");
    let f: Vec<&str> = line.split('|').collect();
    (f[0].parse().unwrap(), f[1].to_string(), f[2].parse().unwrap())
}

fn ready_files(pg: &Cluster) -> usize {
    std::fs::read_dir(pg.data.join("pg_wal/archive_status"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ready"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_are_archived_once_checked_never_overwritten_and_survive_an_outage() {
    let moto = Moto::start().unwrap();
    let proxy = Proxy::start(moto.port());
    let direct = s3_at(&moto.endpoint(), Some("backups")).await;
    let env = tempfile::tempdir().unwrap();
    let cfg = config(env.path());
    let mut archive =
        Archive::for_config(&cfg, s3_at(&format!("http://127.0.0.1:{}", proxy.port), None).await).unwrap();
    archive.deadline = Duration::from_secs(4);

    let mut pg = Cluster::init(15);
    let socket = pg.dir.join("wal.sock");
    let gate = caretaker::backup::lease::Gate::default();
    let server = Arc::new(WalServer::new(archive, &pg.data, vec![0, postgres_uid()]).with_lease_gate(gate.clone()));
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(serve(server.clone(), socket.clone(), cancel.clone()));
    wait_until("the socket", Duration::from_secs(5), Duration::from_millis(20), || socket.exists(), String::new);
    pg.set("archive_mode=on")
        .set(&format!("archive_command={CARETAKER} wal push --socket {} %p", socket.display()))
        .set("wal_keep_size=1GB");
    pg.start();

    pg.sql("CREATE TABLE t(id int); INSERT INTO t SELECT generate_series(1, 100000)");
    for _ in 0..3 {
        pg.sql("INSERT INTO t VALUES (0); SELECT pg_switch_wal()");
    }
    wait_until(
        "three segments archived",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || archiver(&pg).0 >= 3,
        || pg.log(),
    );
    let (_, last, failed) = archiver(&pg);
    assert_eq!(failed, 0, "{}", pg.log());

    // What PostgreSQL was told is archived is in S3, sealed, and comes back byte for byte.
    let original = std::fs::read(pg.data.join("pg_wal").join(&last)).unwrap();
    let dest = pg.dir.join("fetched");
    let sock = socket.to_string_lossy().to_string();
    let out = caretaker_as("postgres", &["wal", "fetch", &last, &dest.to_string_lossy(), "--socket", &sock]);
    assert!(out.status.success(), "{out:?}");
    assert!(std::fs::read(&dest).unwrap() == original, "the fetched segment differs from pg_wal's");
    let keys = direct.list_keys("backups", "caretaker/wal/").await.unwrap();
    assert!(keys.contains(&format!("caretaker/wal/{last}.zst.age")), "{keys:?}");
    let stored = direct.get_object("backups", &format!("caretaker/wal/{last}.zst.age")).await.unwrap().unwrap();
    assert!(stored.starts_with(b"age-encryption.org/v1"), "stored encrypted");

    // Another instance holds the backup prefix's lease: pushes are refused (PostgreSQL keeps the
    // WAL), and go through again once this box holds it.
    let path = pg.data.join("pg_wal").join(&last);
    *gate.lock().unwrap() = Some("the backup prefix is held by instance i-0other".into());
    let out = caretaker_as("postgres", &["wal", "push", &path.to_string_lossy(), "--socket", &sock]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not archiving") && err.contains("i-0other"), "{err}");
    *gate.lock().unwrap() = None;

    // The same file again: a success. The same name with other content: refused, the archived
    // object unchanged.
    let out = caretaker_as("postgres", &["wal", "push", &path.to_string_lossy(), "--socket", &sock]);
    assert!(out.status.success(), "{out:?}");
    let altered_dir = pg.dir.join("altered");
    std::fs::create_dir_all(&altered_dir).unwrap();
    let mut altered = original.clone();
    altered[1 << 20] ^= 0xff;
    std::fs::write(altered_dir.join(&last), &altered).unwrap();
    std::process::Command::new("chown").args(["-R", "postgres:", &altered_dir.to_string_lossy()]).status().unwrap();
    let out = caretaker_as("postgres", &["wal", "push", &altered_dir.join(&last).to_string_lossy(), "--socket", &sock]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("different file under this name") && err.contains("not overwritten"), "{err}");
    assert_eq!(direct.get_object("backups", &format!("caretaker/wal/{last}.zst.age")).await.unwrap().unwrap(), stored);

    // A segment of another cluster under this cluster's next name: refused before any upload.
    let mut other = Cluster::init(15);
    other.start();
    other.sql("SELECT pg_switch_wal()");
    let theirs = other.sql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let next = caretaker::backup::wal::name::WalFile::parse(&theirs, 16 << 20).unwrap();
    let foreign_dir = pg.dir.join("foreign");
    std::fs::create_dir_all(&foreign_dir).unwrap();
    std::fs::copy(other.data.join("pg_wal").join(&theirs), foreign_dir.join(&theirs)).unwrap();
    std::process::Command::new("chown").args(["-R", "postgres:", &foreign_dir.to_string_lossy()]).status().unwrap();
    let out =
        caretaker_as("postgres", &["wal", "push", &foreign_dir.join(&theirs).to_string_lossy(), "--socket", &sock]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("system identifier"), "{next:?} {err}");
    other.stop();

    // Only root and the PostgreSQL user may use the socket.
    let out = caretaker_as("nobody", &["wal", "fetch", &last, "/tmp/x", "--socket", &sock]);
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not use the WAL socket"), "{out:?}");

    // Not in the archive: 1 (the end of the archive). A bad name: 126.
    let out = caretaker_as("postgres", &["wal", "fetch", "0000000100000000000000FE", "/tmp/x", "--socket", &sock]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = caretaker_as("postgres", &["wal", "fetch", "../../etc/passwd", "/tmp/x", "--socket", &sock]);
    assert_eq!(out.status.code(), Some(126), "{out:?}");

    // S3 down: archiving fails, PostgreSQL keeps the files; back up: it resumes, nothing skipped.
    proxy.set(DOWN);
    let before = archiver(&pg);
    for _ in 0..3 {
        pg.sql("INSERT INTO t VALUES (1); SELECT pg_switch_wal()");
    }
    wait_until(
        "a failed attempt",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || archiver(&pg).2 > before.2,
        || pg.log(),
    );
    assert!(ready_files(&pg) >= 1, "PostgreSQL keeps what was not acknowledged");
    assert!(archiver(&pg).0 == before.0, "nothing is acknowledged while S3 is down");
    // A black hole: the command gives up at its deadline instead of hanging.
    proxy.set(BLACK_HOLE);
    let t = std::time::Instant::now();
    let out = caretaker_as("postgres", &["wal", "push", &path.to_string_lossy(), "--socket", &sock]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not answer within 4 s"), "{out:?}");
    assert!(t.elapsed() < Duration::from_secs(60));
    proxy.set(UP);
    wait_until(
        "the backlog archived",
        Duration::from_secs(120),
        Duration::from_millis(300),
        || ready_files(&pg) == 0,
        || pg.log(),
    );
    let files = server.archive().list().await.unwrap();
    let c = chain::check(&files, &Default::default(), 1, "0/1000028".parse().unwrap(), 16 << 20).unwrap();
    assert_eq!(c.gap, None, "{files:?}");
    assert!(c.last.number >= 6, "{c:?}");
    let stats = server.stats();
    assert!(stats.failed >= 1 && stats.archived >= 6, "{stats:?}");

    // Recovery's prefetch: asking for the first segment of a plan fetches the next ones ahead,
    // so that they are served (byte for byte) while S3 is unreachable.
    let segs: Vec<_> = c.segments.iter().copied().take(server.prefetch_window()).collect();
    assert!(segs.len() >= 4, "{segs:?}");
    let sysid = caretaker::backup::wal::header::control_system_identifier(
        &std::fs::read(pg.data.join("global/pg_control")).unwrap(),
    )
    .unwrap();
    server.set_plan(Some(caretaker::backup::wal::server::FetchPlan {
        required: c.segments.clone(),
        system_identifier: sysid,
    }));
    let name_of = |s: &caretaker::backup::wal::name::Segment| s.file_name(16 << 20);
    let first = server.fetch(&name_of(&segs[0]), Duration::from_secs(5)).await.unwrap().unwrap();
    assert!(first == std::fs::read(pg.data.join("pg_wal").join(name_of(&segs[0]))).unwrap());
    wait_until(
        "the rest of the plan prefetched",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || server.prefetched() == segs.len() - 1,
        || format!("{} prefetched", server.prefetched()),
    );
    proxy.set(DOWN);
    for s in &segs[1..] {
        let got = server.fetch(&name_of(s), Duration::from_secs(1)).await.unwrap().expect("served from the window");
        assert!(got == std::fs::read(pg.data.join("pg_wal").join(name_of(s))).unwrap(), "{s:?} differs");
    }
    assert_eq!(server.prefetched(), 0, "each is handed out once");
    // Past the window and S3 down: an error, never "not found" (that would end recovery early).
    let past = server.fetch(&name_of(&segs[0]), Duration::from_secs(1)).await;
    assert!(past.is_err(), "{:?}", past.map(|o| o.map(|b| b.len())));
    proxy.set(UP);
    server.set_plan(None);

    // A damaged object in S3: a fetch refuses it with 126, naming it.
    direct.put_object("backups", &format!("caretaker/wal/{last}.zst.age"), b"garbage".to_vec()).await.unwrap();
    let out = caretaker_as("postgres", &["wal", "fetch", &last, "/tmp/x", "--socket", &sock]);
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&last) && err.contains("cannot be used"), "{err}");
    cancel.cancel();
}
