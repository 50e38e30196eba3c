//! Point-in-time recovery against real PostgreSQL 15, 16 and 17 and moto's S3: a base backup
//! streamed from pg_basebackup, WAL archived through the socket, restored to a chosen second
//! (every row committed before it, none after) and to the end of the archive; refused before
//! anything is touched for a target outside the window and for a gap; a corrupted segment stops
//! recovery rather than ending it; a transient S3 outage during replay does not end it early.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use caretaker::aws::s3::S3;
use caretaker::backup::pitr::{self, PitrError, Target, Tools};
use caretaker::backup::run::{self, Kind};
use caretaker::backup::wal::archive::Archive;
use caretaker::backup::wal::server::{WalServer, serve};
use caretaker::config::AwsConfig;
use caretaker::pg::PgTarget;
use caretaker_testkit::moto::Moto;
use caretaker_testkit::pg::{Cluster, bin_dir};
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

fn postgres_uid() -> u32 {
    nix::unistd::User::from_name("postgres").unwrap().unwrap().uid.as_raw()
}

/// A folder PostgreSQL's user may create the restored data directory in.
fn room(parent: &Path, name: &str) -> PathBuf {
    let d = parent.join(name);
    std::fs::create_dir_all(&d).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

struct Rig {
    _moto: Moto,
    direct: S3,
    cfg: caretaker::config::Config,
    pg: Cluster,
    _env: tempfile::TempDir,
    cancel: tokio_util::sync::CancellationToken,
}

impl Rig {
    async fn archive(&self) -> Archive {
        Archive::for_config(&self.cfg, self.direct.clone()).unwrap()
    }
    fn tools(&self) -> Tools {
        Tools { server_bin: bin_dir(self.pg.version), caretaker: CARETAKER.into() }
    }
}

async fn rig(version: u32) -> Rig {
    let moto = Moto::start().unwrap();
    let direct = s3_at(&moto.endpoint(), Some("backups")).await;
    let env = tempfile::tempdir().unwrap();
    std::fs::write(env.path().join("caretaker.env"), "BACKUP_PASSPHRASE=\"correct horse battery staple\"\n").unwrap();
    let mut cfg = caretaker::config::Config::default();
    cfg.backup.bucket = Some("backups".into());
    cfg.backup.database = "app".into();
    cfg.secrets.env_dir = env.path().to_path_buf();
    let mut pg = Cluster::init(version);
    let socket = pg.dir.join("wal.sock");
    let archive = Archive::for_config(&cfg, direct.clone()).unwrap();
    let server = Arc::new(WalServer::new(archive, &pg.data, vec![0, postgres_uid()]));
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(serve(server, socket.clone(), cancel.clone()));
    pg.set("archive_mode=on").set(&format!("archive_command={CARETAKER} wal push --socket {} %p", socket.display()));
    pg.start();
    cfg.services.postgres.socket_dir = pg.socket_dir.clone();
    cfg.services.postgres.port = pg.port;
    cfg.services.postgres.data_dir = pg.data.clone();
    cfg.services.postgres.bin_dir = Some(bin_dir(version));
    pg.sql("CREATE DATABASE app");
    Rig { _moto: moto, direct, cfg, pg, _env: env, cancel }
}

/// Inserts rows `from..=to`, one transaction each; returns (before, after) each commit.
async fn insert_rows(target: &PgTarget, from: i32, to: i32, pause: Duration) -> Vec<(SystemTime, SystemTime)> {
    let c = target.connect("app", Duration::from_secs(10)).await.unwrap();
    let mut times = Vec::new();
    for i in from..=to {
        let before = SystemTime::now();
        c.execute("INSERT INTO rows(id) VALUES ($1)", &[&i]).await.unwrap();
        times.push((before, SystemTime::now()));
        tokio::time::sleep(pause).await;
    }
    times
}

fn archived_through_current(pg: &Cluster) {
    let current = pg.sql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    pg.sql("SELECT pg_switch_wal()");
    wait_until(
        "the current segment archived",
        Duration::from_secs(60),
        Duration::from_millis(200),
        || pg.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver") >= current,
        || pg.log(),
    );
}

/// Starts the cluster restored under `dir` (as the swap would) and counts its rows.
fn rows_in(version: u32, dir: &Path) -> (i64, i64) {
    let mut c = Cluster::at(version, dir);
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

async fn restore_to_a_second_and_to_the_end(version: u32) {
    let r = rig(version).await;
    let target = PgTarget::new(&r.cfg.services.postgres);
    let c = target.connect("app", Duration::from_secs(10)).await.unwrap();
    c.batch_execute("CREATE TABLE rows(id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())").await.unwrap();
    insert_rows(&target, 1, 20, Duration::ZERO).await;
    let base = run::backup(&r.cfg, &r.direct, Kind::Base, "i-test", |_| {}).await.unwrap();
    let d: caretaker::backup::base::BaseDetails = serde_json::from_value(base.details.clone()).unwrap();
    assert_eq!(d.timeline, 1);
    assert!(d.stop_lsn >= d.start_lsn);
    // Right after the backup (its last segment archived before its manifest was written): the
    // window is that one moment, never inverted.
    let w = pitr::window(&r.cfg, &r.direct, &r.archive().await).await.unwrap();
    let (o, n) = (w.oldest.clone().unwrap(), w.newest.clone().unwrap());
    assert!(humantime::parse_rfc3339(&o).unwrap() <= humantime::parse_rfc3339(&n).unwrap(), "{w}");
    let times = insert_rows(&target, 21, 60, Duration::from_millis(40)).await;
    archived_through_current(&r.pg);
    // Between row 40's commit and row 41's.
    let (after_40, before_41) = (times[19].1, times[20].0);
    let at = after_40 + before_41.duration_since(after_40).unwrap() / 2;

    let archive = r.archive().await;
    // Outside the window: refused, the window named, nothing created.
    let e = pitr::plan(&r.cfg, &r.direct, &archive, Target::Time(SystemTime::now() + Duration::from_secs(3600)))
        .await
        .unwrap_err();
    assert!(matches!(e, PitrError::Refused(_)) && e.to_string().contains("the window is"), "{e}");
    let e = pitr::plan(&r.cfg, &r.direct, &archive, Target::Time(SystemTime::UNIX_EPOCH + Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("before the end of the oldest base backup"), "{e}");

    // To the second: rows 1..=40, nothing after.
    let plan = pitr::plan(&r.cfg, &r.direct, &archive, Target::Time(at)).await.unwrap();
    assert_eq!(plan.base.id, base.id);
    let one = room(&r.pg.dir, "one");
    let built = pitr::build(&r.cfg, &r.direct, archive, &plan, &one.join("data"), &r.tools(), &|l| eprintln!("{l}"))
        .await
        .unwrap();
    assert_eq!(built.row_counts.get("public.rows"), Some(&40), "{built:?}");
    assert!(built.stopped.contains("recovery stopping"), "{built:?}");
    assert_eq!(rows_in(version, &one), (40, 40));

    // To the end of the archive: every row.
    let archive = r.archive().await;
    let plan = pitr::plan(&r.cfg, &r.direct, &archive, Target::Latest).await.unwrap();
    let two = room(&r.pg.dir, "two");
    let built = pitr::build(&r.cfg, &r.direct, archive, &plan, &two.join("data"), &r.tools(), &|l| eprintln!("{l}"))
        .await
        .unwrap();
    assert_eq!(built.row_counts.get("public.rows"), Some(&60), "{built:?}");
    assert!(built.timeline >= 2, "a restore promotes onto a new timeline: {built:?}");
    assert_eq!(rows_in(version, &two), (60, 60));

    // A drill's check: a restore point recorded while a writer commits, its row counts taken in
    // the same snapshot; a replay pauses there and finds exactly those counts, then goes on to
    // the end. The scratch cluster sends nothing into the archive.
    let stop = tokio_util::sync::CancellationToken::new();
    let writing = {
        let (target, stop) = (target.clone(), stop.clone());
        tokio::spawn(async move {
            let c = target.connect("app", Duration::from_secs(10)).await.unwrap();
            let mut i = 1000;
            while !stop.is_cancelled() {
                c.execute("INSERT INTO rows(id) VALUES ($1)", &[&i]).await.unwrap();
                i += 1;
            }
            i - 1000
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rp = caretaker::backup::restore_point::record(&r.cfg, &r.direct, &target, false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let written = writing.await.unwrap();
    assert!(written > 10, "the writer committed {written} rows around the restore point");
    let at_point = *rp.counts.get("public.rows").unwrap();
    assert!(at_point > 60 && at_point < 60 + i64::from(written), "{rp:?}");
    archived_through_current(&r.pg);
    let (points, bad) = caretaker::backup::restore_point::list(&r.cfg, &r.direct).await.unwrap();
    assert_eq!((points.len(), bad.len()), (1, 0), "{points:?} {bad:?}");
    assert_eq!(points[0], rp);
    let before = r.direct.list_keys("backups", "caretaker/").await.unwrap();
    let archive = r.archive().await;
    let mut plan = pitr::plan(&r.cfg, &r.direct, &archive, Target::Latest).await.unwrap();
    plan.restore_point = Some(rp.clone());
    let three = room(&r.pg.dir, "three");
    let built = pitr::build(&r.cfg, &r.direct, archive, &plan, &three.join("data"), &r.tools(), &|l| eprintln!("{l}"))
        .await
        .unwrap();
    assert_eq!(built.restore_point.as_deref(), Some(rp.name.as_str()));
    assert_eq!(
        built.row_counts.get("public.rows"),
        Some(&(60 + i64::from(written))),
        "replayed to the end after the point"
    );
    let after = r.direct.list_keys("backups", "caretaker/").await.unwrap();
    assert_eq!(before, after, "the replayed cluster archived nothing");

    // A restore point whose counts were not what was committed there fails the check, named.
    let mut forged = rp.clone();
    forged.counts.insert("public.rows".into(), at_point - 1);
    let archive = r.archive().await;
    let mut plan = pitr::plan(&r.cfg, &r.direct, &archive, Target::Latest).await.unwrap();
    plan.restore_point = Some(forged);
    let four = room(&r.pg.dir, "four");
    let e = pitr::build(&r.cfg, &r.direct, archive, &plan, &four.join("data"), &r.tools(), &|l| eprintln!("{l}"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("public.rows: {} recorded, {at_point} replayed", at_point - 1)), "{e}");
    assert!(!four.join("data").exists());
    r.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_on_postgresql_15() {
    restore_to_a_second_and_to_the_end(15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_on_postgresql_16() {
    restore_to_a_second_and_to_the_end(16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_on_postgresql_17() {
    restore_to_a_second_and_to_the_end(17).await;
}

/// Faults, on 15: an S3 outage while recovery fetches segments does not end it early; a corrupted
/// segment aborts recovery (named) and leaves nothing; a missing one is refused before anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_during_and_before_a_restore_never_end_recovery_early() {
    use caretaker_testkit::proxy::{DOWN, Proxy, UP};
    let r = rig(15).await;
    let target = PgTarget::new(&r.cfg.services.postgres);
    let c = target.connect("app", Duration::from_secs(10)).await.unwrap();
    c.batch_execute("CREATE TABLE rows(id int PRIMARY KEY, pad text)").await.unwrap();
    run::backup(&r.cfg, &r.direct, Kind::Base, "i-test", |_| {}).await.unwrap();
    // Several segments' worth of rows, each segment closed.
    for i in 0..4 {
        c.execute(
            "INSERT INTO rows SELECT g, repeat('x', 200) FROM generate_series($1::int, $1::int + 9999) g",
            &[&(i * 10_000 + 1)],
        )
        .await
        .unwrap();
        r.pg.sql("SELECT pg_switch_wal()");
    }
    archived_through_current(&r.pg);

    // S3 down for a few seconds once the base backup is in place: fetches are retried, recovery
    // replays every row.
    let proxy = Arc::new(Proxy::start(r._moto.port()));
    let through = s3_at(&format!("http://127.0.0.1:{}", proxy.port), None).await;
    let archive = Archive::for_config(&r.cfg, through.clone()).unwrap();
    let plan = pitr::plan(&r.cfg, &r.direct, &archive, Target::Latest).await.unwrap();
    assert!(plan.chain.segments.len() >= 4, "{:?}", plan.chain);
    let one = room(&r.pg.dir, "one");
    let p = proxy.clone();
    let outage = move |line: String| {
        eprintln!("{line}");
        if line.contains("extracted") {
            p.set(DOWN);
            let p = p.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(4));
                p.set(UP);
            });
        }
    };
    let built = pitr::build(&r.cfg, &through, archive, &plan, &one.join("data"), &r.tools(), &outage).await.unwrap();
    assert_eq!(built.row_counts.get("public.rows"), Some(&40_000), "recovery must not end at the outage: {built:?}");

    // A corrupted segment in the middle: recovery stops there, the error names it, the copy is gone.
    let middle: Vec<_> = plan.chain.segments.iter().collect();
    let victim = middle[middle.len() / 2].file_name(16 << 20);
    let key = format!("caretaker/wal/{victim}.zst.age");
    let original = r.direct.get_object("backups", &key).await.unwrap().unwrap();
    let mut damaged = original.clone();
    let n = damaged.len() - 100;
    damaged[n] ^= 0x55;
    r.direct.put_object("backups", &key, damaged).await.unwrap();
    let archive = r.archive().await;
    let plan = pitr::plan(&r.cfg, &r.direct, &archive, Target::Latest).await.unwrap();
    let two = room(&r.pg.dir, "two");
    let e = pitr::build(&r.cfg, &r.direct, archive, &plan, &two.join("data"), &r.tools(), &|l| eprintln!("{l}"))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&victim) && msg.contains("live data is unchanged"), "{msg}");
    assert!(!two.join("data").exists(), "a failed build leaves nothing");

    // The segment missing altogether: refused before anything is created, the gap named.
    r.direct.delete_object("backups", &key).await.unwrap();
    let archive = r.archive().await;
    let e = pitr::plan(&r.cfg, &r.direct, &archive, Target::Latest).await.unwrap_err();
    assert!(matches!(e, PitrError::Refused(_)), "{e}");
    assert!(e.to_string().contains(&format!("{victim} is missing")), "{e}");
    let w = pitr::window(&r.cfg, &r.direct, &archive).await.unwrap();
    assert_eq!(w.gap.as_ref().map(|g| g.0.clone()), Some(victim.clone()), "{w:?}");
    r.cancel.cancel();
}

/// Retention by position: with a newer base backup verified, the older one and every WAL file
/// before the newer one's start go; `.history` stays; the newer backup still restores to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_wal_only_below_the_kept_verified_base_backup() {
    let mut r = rig(15).await;
    let target = PgTarget::new(&r.cfg.services.postgres);
    let c = target.connect("app", Duration::from_secs(10)).await.unwrap();
    c.batch_execute("CREATE TABLE rows(id int PRIMARY KEY)").await.unwrap();
    let first = run::backup(&r.cfg, &r.direct, Kind::Base, "i-test", |_| {}).await.unwrap();
    for i in 0..3 {
        c.execute("INSERT INTO rows SELECT g FROM generate_series($1::int, $1::int + 999) g", &[&(i * 1000 + 1)])
            .await
            .unwrap();
        r.pg.sql("SELECT pg_switch_wal()");
    }
    archived_through_current(&r.pg);
    // Without a verified newer backup nothing goes.
    r.cfg.backup.keep_daily = 1;
    r.cfg.backup.keep_weekly = 0;
    let second = run::backup(&r.cfg, &r.direct, Kind::Base, "i-test", |_| {}).await.unwrap();
    let reports = run::prune(&r.cfg, &r.direct, true).await.unwrap();
    let base = reports.iter().find(|p| p.kind == Kind::Base).unwrap();
    assert!(base.wal_deleted.is_empty(), "nothing verified yet: {:?}", base.wal_deleted);
    // The drill of the newer one: a fresh restore point on the live cluster, the base backup
    // replayed past it (counts compared there) to the archive's end in a scratch directory that
    // is gone afterwards; the scratch cluster (timeline 2) archived nothing.
    let report = caretaker::backup::verify::verify_with(&r.cfg, &r.direct, &second, &r.tools(), &|l| eprintln!("{l}"))
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");
    assert!(report.checks.iter().any(|c| c.contains("held exactly the row counts recorded")), "{report:?}");
    assert_eq!(report.tables.get("public.rows"), Some(&(3000, 3000)), "{report:?}");
    let keys = r.direct.list_keys("backups", "caretaker/").await.unwrap();
    assert!(!keys.iter().any(|k| k.contains("/wal/00000002")), "the drill's cluster archived: {keys:?}");
    assert!(keys.iter().any(|k| k.contains("/restore-points/caretaker-")), "{keys:?}");
    let leftovers: Vec<_> = std::fs::read_dir(&r.pg.dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("drill"))
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Tip chunks left by a lost box (a tail never archived whole): below the cutoff they go too.
    let old_tip = "caretaker/wal-tip/123/000000010000000000000001/00000000-00002000.zst.age";
    let new_tip = "caretaker/wal-tip/123/0000000100000000000000FF/00000000-00002000.zst.age";
    for k in [old_tip, new_tip] {
        r.direct.put_object("backups", k, b"chunk".to_vec()).await.unwrap();
    }
    let reports = run::prune(&r.cfg, &r.direct, false).await.unwrap();
    let keys = r.direct.list_keys("backups", "caretaker/wal-tip/").await.unwrap();
    assert_eq!(keys, vec![new_tip.to_string()], "the chunk below the kept backups goes, the other stays");
    let base = reports.iter().find(|p| p.kind == Kind::Base).unwrap();
    assert!(base.wal_deleted.contains(&"000000010000000000000001.tip".to_string()), "{:?}", base.wal_deleted);
    let d: caretaker::backup::base::BaseDetails = serde_json::from_value(second.details.clone()).unwrap();
    let start = caretaker::backup::wal::name::Segment::of(1, d.start_lsn, 16 << 20);
    assert!(!base.wal_deleted.is_empty());
    assert!(base.wal_deleted.iter().all(|n| n.as_str() < start.file_name(16 << 20).as_str()), "{:?}", base.wal_deleted);
    assert!(base.decisions.iter().any(|d| d.id == first.id && !d.keep), "{:?}", base.decisions);
    let archive = r.archive().await;
    let left = archive.list().await.unwrap();
    assert!(left.iter().any(|f| matches!(f, caretaker::backup::wal::name::WalFile::Segment(s) if *s == start)));
    let plan = pitr::plan(&r.cfg, &r.direct, &archive, Target::Latest).await.unwrap();
    assert_eq!(plan.base.id, second.id);
    let one = room(&r.pg.dir, "one");
    let built = pitr::build(&r.cfg, &r.direct, archive, &plan, &one.join("data"), &r.tools(), &|l| eprintln!("{l}"))
        .await
        .unwrap();
    assert_eq!(built.row_counts.get("public.rows"), Some(&3000));
    r.cancel.cancel();
}
