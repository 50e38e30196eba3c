//! The WAL tip against a real PostgreSQL and moto's S3: a writer commits numbered rows at a
//! steady rate; the "box" (PostgreSQL and the tip) is killed without warning; a restore to the
//! latest point from S3 alone holds every row committed more than a few seconds before the kill
//! although `archive_timeout` never closed a segment. On the way: the receiver's connection is
//! killed and it comes back with no gap; chunks of archived segments are deleted; with the tip
//! dead, pg_wal does not grow (no slot holds WAL back).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use caretaker::aws::s3::S3;
use caretaker::backup::pitr::{self, Target, Tools};
use caretaker::backup::run::{self, Kind};
use caretaker::backup::wal::archive::Archive;
use caretaker::backup::wal::server::{WalServer, serve};
use caretaker::backup::wal::tip::{self, Tip, TipSettings};
use caretaker::config::AwsConfig;
use caretaker::pg::PgTarget;
use caretaker_testkit::moto::Moto;
use caretaker_testkit::pg::{Cluster, bin_dir};
use caretaker_testkit::wait_until;

const CARETAKER: &str = env!("CARGO_BIN_EXE_caretaker");

async fn s3_at(endpoint: &str) -> S3 {
    let aws = AwsConfig { s3_endpoint: Some(endpoint.into()), ..AwsConfig::default() };
    let creds = aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test");
    let sdk = caretaker::aws::sdk::sdk_config_with_credentials("us-east-1", creds).await;
    let client = caretaker::aws::sdk::s3_client(&sdk, &aws);
    client.create_bucket().bucket("backups").send().await.expect("create bucket");
    S3::new(client)
}

fn room(parent: &Path, name: &str) -> PathBuf {
    let d = parent.join(name);
    std::fs::create_dir_all(&d).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn tip_chunks(keys: &[String]) -> Vec<&String> {
    keys.iter().filter(|k| k.starts_with("caretaker/wal-tip/")).collect()
}

/// Commits rows `from..` one per transaction at `per_second` until `stop`; (id, commit acked at).
async fn writer(
    target: PgTarget,
    from: i32,
    per_second: u32,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<(i32, SystemTime)> {
    let c = target.connect("app", Duration::from_secs(10)).await.unwrap();
    let mut acked = Vec::new();
    let period = Duration::from_secs(1) / per_second;
    let mut next = tokio::time::Instant::now();
    let mut id = from;
    while !stop.is_cancelled() {
        // A commit the server never acknowledged (it was killed) is not counted.
        if c.execute("INSERT INTO rows(id) VALUES ($1)", &[&id]).await.is_err() {
            break;
        }
        acked.push((id, SystemTime::now()));
        id += 1;
        next += period;
        tokio::time::sleep_until(next).await;
    }
    acked
}

/// Starts the restored cluster under `dir` and returns (count, max id) of its rows.
fn rows_in(dir: &Path) -> (i64, i64) {
    let mut c = Cluster::at(16, dir);
    c.start();
    let o = caretaker_testkit::pg::as_postgres(&c.bin("psql"))
        .args(["-h", &c.socket_dir.to_string_lossy(), "-p", &c.port.to_string(), "-d", "app", "-XqtA"])
        .args(["-c", "SELECT count(*) || '|' || coalesce(max(id), 0) FROM rows"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    c.stop();
    let line = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let (n, m) = line.split_once('|').unwrap();
    (n.parse().unwrap(), m.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_box_loses_only_seconds_of_commits() {
    let moto = Moto::start().unwrap();
    let s3 = s3_at(&moto.endpoint()).await;
    let env = tempfile::tempdir().unwrap();
    std::fs::write(env.path().join("caretaker.env"), "BACKUP_PASSPHRASE=\"correct horse battery staple\"\n").unwrap();
    let mut cfg = caretaker::config::Config::default();
    cfg.backup.bucket = Some("backups".into());
    cfg.backup.database = "app".into();
    cfg.secrets.env_dir = env.path().to_path_buf();
    let mut pg = Cluster::init(16);
    let socket = pg.dir.join("wal.sock");
    let archive = Archive::for_config(&cfg, s3.clone()).unwrap();
    let pg_uid = nix::unistd::User::from_name("postgres").unwrap().unwrap().uid.as_raw();
    let server = Arc::new(WalServer::new(archive, &pg.data, vec![0, pg_uid]));
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(serve(server.clone(), socket.clone(), cancel.clone()));
    // archive_timeout far beyond the test: whole segments alone would lose every row below.
    pg.set("archive_mode=on")
        .set(&format!("archive_command={CARETAKER} wal push --socket {} %p", socket.display()))
        .set("archive_timeout=3600")
        .set("max_wal_size=64MB")
        .set("min_wal_size=32MB");
    pg.start();
    cfg.services.postgres.socket_dir = pg.socket_dir.clone();
    cfg.services.postgres.port = pg.port;
    cfg.services.postgres.data_dir = pg.data.clone();
    cfg.services.postgres.bin_dir = Some(bin_dir(16));
    pg.sql("CREATE DATABASE app");
    let target = PgTarget::new(&cfg.services.postgres);
    let c = target.connect("app", Duration::from_secs(10)).await.unwrap();
    c.batch_execute("CREATE TABLE rows(id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())").await.unwrap();
    run::backup(&cfg, &s3, Kind::Base, "i-test", |_| {}).await.unwrap();

    // The tip, as the daemon runs it.
    let state = Arc::new(Tip::default());
    let tip_cancel = tokio_util::sync::CancellationToken::new();
    let settings = TipSettings { interval: Duration::from_secs(1) };
    let mut tip_task = tokio::spawn(tip::run(
        server.shared_archive(),
        target.clone(),
        settings.clone(),
        Default::default(),
        state.clone(),
        tip_cancel.clone(),
    ));
    let t0 = Instant::now();
    while !state.status().streaming {
        assert!(t0.elapsed() < Duration::from_secs(30), "the tip never streamed: {:?}", state.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pg.sql("SELECT count(*) FROM pg_replication_slots"), "0", "the tip holds no slot");
    assert_eq!(pg.sql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'caretaker-wal-tip'"), "1");

    // 1. The receiver's connection killed mid-load: it comes back, and nothing is missing later.
    let stop = tokio_util::sync::CancellationToken::new();
    let writing = tokio::spawn(writer(target.clone(), 1, 200, stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE application_name = 'caretaker-wal-tip'");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let st = state.status();
    assert!(st.streaming && st.chunks >= 3, "the tip is back and storing: {st:?}");
    assert!(st.lag_seconds < 5.0, "the live RPO while streaming: {st:?}");

    // 2. A whole segment archived: its chunks go.
    let sessions = state.status().sessions;
    pg.sql("SELECT pg_switch_wal()");
    let old_segment = st.stored.clone().unwrap();
    let t0 = Instant::now();
    loop {
        let keys = s3.list_keys("backups", "caretaker/wal-tip/").await.unwrap();
        let status = state.status();
        if status.deleted > 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "chunks of {old_segment}'s archived segment stay: {keys:?} {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The switch streamed the zeros PostgreSQL fills a switched segment's rest with: stored
    // like any WAL, and the tip goes on into the next segment.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = state.status();
    assert!(status.streaming && status.sessions == sessions, "the tip after a segment switch: {status:?}");
    // 3. caretaker dies (the tip aborted): PostgreSQL keeps no WAL for it. Ten segments written
    //    and checkpointed: pg_wal recycles them (a slot would hold every one).
    tip_task.abort();
    let _ = (&mut tip_task).await;
    for _ in 0..10 {
        pg.sql("SELECT pg_switch_wal()");
        c.batch_execute("INSERT INTO rows(id) SELECT -g FROM generate_series(1, 10) g; DELETE FROM rows WHERE id < 0")
            .await
            .unwrap();
    }
    wait_until(
        "the switched segments archived",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || pg.sql("SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'") == "0",
        || pg.log(),
    );
    pg.sql("CHECKPOINT");
    pg.sql("CHECKPOINT");
    let segments: usize = pg.sql("SELECT count(*) FROM pg_ls_waldir() WHERE name ~ '^[0-9A-F]{24}$'").parse().unwrap();
    assert!(segments <= 8, "pg_wal holds {segments} segments with the tip dead");
    assert_eq!(pg.sql("SELECT count(*) FROM pg_replication_slots"), "0");

    // 4. The daemon back: the tip starts over at the current segment.
    let mut tip_task = tokio::spawn(tip::run(
        server.shared_archive(),
        target.clone(),
        settings.clone(),
        Default::default(),
        state.clone(),
        tip_cancel.clone(),
    ));
    // Long enough that whole segments alone (the last switch was above) would lose > 10 s.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(state.status().streaming, "{:?}", state.status());

    // 5. The box dies: PostgreSQL SIGKILLed, the tip aborted (nothing flushed on the way out).
    let kill_at = SystemTime::now();
    pg.kill();
    tip_task.abort();
    let _ = (&mut tip_task).await;
    stop.cancel();
    let acked = writing.await.unwrap();
    assert!(acked.len() > 2000, "the writer committed {} rows", acked.len());
    let keys = s3.list_keys("backups", "caretaker/").await.unwrap();
    assert!(!tip_chunks(&keys).is_empty(), "{keys:?}");

    // 6. From S3 alone: base backup + archive + tip, into a new directory.
    let archive = Archive::for_config(&cfg, s3.clone()).unwrap();
    let plan = pitr::plan(&cfg, &s3, &archive, Target::Latest).await.unwrap();
    let dir = room(&pg.dir, "restored");
    let tools = Tools { server_bin: bin_dir(16), caretaker: CARETAKER.into() };
    let built = pitr::build(&cfg, &s3, archive, &plan, &dir.join("data"), &tools, &|l| eprintln!("{l}")).await.unwrap();
    let restored = *built.row_counts.get("public.rows").unwrap();
    assert!(built.tip_segments >= 1, "the unfinished segment came from the tip: {built:?}");
    assert_eq!(rows_in(&dir), (restored, restored), "the restored rows are 1..=N, no gap");
    // What is missing was committed in the last seconds before the kill.
    let lost = acked.iter().filter(|(id, _)| i64::from(*id) > restored).count();
    let newest_kept = acked.iter().find(|(id, _)| i64::from(*id) == restored).map(|r| r.1);
    let window = newest_kept.map(|t| kill_at.duration_since(t).unwrap_or_default());
    eprintln!(
        "tip: {} rows committed, {restored} restored, {lost} lost; the newest restored commit was {window:?} before the kill",
        acked.len()
    );
    assert!(
        window.is_some_and(|w| w < Duration::from_secs(10)),
        "commits older than 10 s before the kill are lost: {window:?} ({lost} rows)"
    );
    cancel.cancel();
}
