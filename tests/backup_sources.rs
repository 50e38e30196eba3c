//! The two backup sources against real servers started for the test: PostgreSQL (initdb in a
//! temporary folder, run as the postgres OS user, reached over its socket by peer authentication)
//! and Redis (run as `nobody`, so a folder it may not write makes BGSAVE fail for real).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caretaker::backup::postgres::{Snapshot, compare_counts, pg_dump_args, row_counts};
use caretaker::backup::redis::{RedisBackupError, bgsave};
use caretaker::pg::PgTarget;

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> =
        std::fs::read_dir("/usr/lib/postgresql").expect("PostgreSQL installed").flatten().map(|e| e.path()).collect();
    versions.sort();
    versions.last().expect("a PostgreSQL version").join("bin").join(name)
}

fn chown_to(path: &Path, user: &str) {
    let out = Command::new("chown").args(["-R", &format!("{user}:"), &path.to_string_lossy()]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// A PostgreSQL server in a temp dir, killed on drop.
struct Pg {
    child: Child,
    target: PgTarget,
    _dir: tempfile::TempDir,
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups", "--"]).arg(program);
    c
}

fn start_pg() -> Pg {
    let dir = tempfile::Builder::new().prefix("caretaker-pg").tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    let sock = dir.path().join("sock");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&sock).unwrap();
    chown_to(dir.path(), "postgres");
    let out = as_postgres(&pg_bin("initdb"))
        .args(["-D", &data.to_string_lossy(), "--auth-local=peer", "-E", "UTF8"])
        .output()
        .unwrap();
    assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
    let port = caretaker_testkit::ports::free_port();
    let child = as_postgres(&pg_bin("postgres"))
        .args([
            "-D",
            &data.to_string_lossy(),
            "-k",
            &sock.to_string_lossy(),
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let target = PgTarget { socket_dir: sock.clone(), port, user: "postgres".into(), bin_dir: None };
    let end = Instant::now() + Duration::from_secs(30);
    while !sock.join(format!(".s.PGSQL.{port}")).exists() {
        assert!(Instant::now() < end, "postgres did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    Pg { child, target, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_counts_and_the_dump_come_from_one_snapshot() {
    let pg = start_pg();
    let admin = pg.target.connect("postgres", Duration::from_secs(10)).await.unwrap();
    admin
        .batch_execute(
            "CREATE TABLE cities(id serial primary key, name text); INSERT INTO cities(name) SELECT 'c' || g FROM generate_series(1, 500) g;
             CREATE SCHEMA zmanim; CREATE TABLE zmanim.times(id int); INSERT INTO zmanim.times SELECT generate_series(1, 42);",
        )
        .await
        .unwrap();

    // A failed query says what the server said (not tokio_postgres's bare "db error").
    let e = caretaker::pg::PgError::Query(admin.batch_execute("SELECT * FROM no_such_table").await.unwrap_err());
    assert_eq!(e.to_string(), "query failed: ERROR 42P01: relation \"no_such_table\" does not exist");

    let snap = Snapshot::export(&pg.target, "postgres").await.unwrap();
    let counts = row_counts(&pg.target, "postgres", Some(&snap.id), 2).await.unwrap();
    assert_eq!(counts.get("public.cities"), Some(&500));
    assert_eq!(counts.get("zmanim.times"), Some(&42));

    // Writes after the snapshot are not in it: neither in the counts nor in the dump.
    admin
        .batch_execute("INSERT INTO cities(name) VALUES ('late'); DELETE FROM zmanim.times WHERE id <= 2;")
        .await
        .unwrap();

    let args = pg_dump_args(&pg.target, "postgres", &snap.id);
    let dump = as_postgres(&pg_bin("pg_dump")).args(&args).output().unwrap();
    assert!(dump.status.success(), "pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
    let expected = counts;
    snap.end().await.unwrap();

    // Restore the dump into a new database and count again: equal to the snapshot's counts.
    admin.batch_execute("CREATE DATABASE restored").await.unwrap();
    let mut restore = as_postgres(&pg_bin("pg_restore"))
        .args([
            &format!("--host={}", pg.target.socket_dir.display()),
            &format!("--port={}", pg.target.port),
            "--dbname=restored",
            "--no-owner",
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    restore.stdin.take().unwrap().write_all(&dump.stdout).unwrap();
    let out = restore.wait_with_output().unwrap();
    assert!(out.status.success(), "pg_restore: {}", String::from_utf8_lossy(&out.stderr));
    let actual = row_counts(&pg.target, "restored", None, 2).await.unwrap();
    assert_eq!(compare_counts(&expected, &actual), vec![], "restored copy differs from the snapshot");
    let live = row_counts(&pg.target, "postgres", None, 2).await.unwrap();
    assert_eq!(compare_counts(&expected, &live).len(), 2, "the live database moved on");
}

/// The parallel counters import the exported snapshot: rows committed after the export, while
/// the counting runs, are not counted (without the import they would be).
#[tokio::test(flavor = "current_thread")]
async fn parallel_counts_see_the_exported_snapshot_only() {
    let pg = start_pg();
    let admin = pg.target.connect("postgres", Duration::from_secs(10)).await.unwrap();
    let mut sql = String::new();
    for t in 0..5 {
        sql.push_str(&format!(
            "CREATE TABLE t{t}(id int); INSERT INTO t{t} SELECT generate_series(1, {});",
            100 * (t + 1)
        ));
    }
    admin.batch_execute(&sql).await.unwrap();
    let exporter = pg.target.connect("postgres", Duration::from_secs(10)).await.unwrap();
    exporter.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY").await.unwrap();
    let id: String = exporter.query_one("SELECT pg_export_snapshot()", &[]).await.unwrap().get(0);

    admin
        .batch_execute("INSERT INTO t0 VALUES (0); DELETE FROM t4 WHERE id <= 10; CREATE TABLE late(id int);")
        .await
        .unwrap();

    for workers in [1, 2, 3] {
        let counts = row_counts(&pg.target, "postgres", Some(&id), workers).await.unwrap();
        let expected: Vec<(String, i64)> = (0..5).map(|t| (format!("public.t{t}"), 100 * (t + 1))).collect();
        assert_eq!(counts.into_iter().collect::<Vec<_>>(), expected, "{workers} workers");
    }
    let now = row_counts(&pg.target, "postgres", None, 2).await.unwrap();
    assert_eq!((now["public.t0"], now["public.t4"], now["public.late"]), (101, 490, 0), "outside the snapshot");
    exporter.batch_execute("COMMIT").await.unwrap();
}

/// A Redis server run as `nobody` in `dir` with its default save points (so a failed BGSAVE makes
/// it refuse writes, as in production), killed on drop.
struct Redis {
    child: Child,
    url: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis(dir: &Path) -> Redis {
    chown_to(dir, "nobody");
    let port = caretaker_testkit::ports::free_port();
    let child = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", "redis-server"])
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir.to_string_lossy(),
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    caretaker_testkit::ports::wait_for_tcp(("127.0.0.1", port), Duration::from_secs(10)).unwrap();
    Redis { child, url: format!("redis://127.0.0.1:{port}") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bgsave_waits_for_a_fresh_successful_save_and_reports_a_failed_one() {
    let dir = tempfile::Builder::new().prefix("caretaker-redis").tempdir_in("/tmp").unwrap();
    let redis = start_redis(dir.path());
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_tokio_connection().await.unwrap();
    for i in 0..25 {
        let _: () = redis::cmd("SET").arg(format!("k{i}")).arg(i).query_async(&mut conn).await.unwrap();
    }
    let saved = bgsave(&redis.url, Duration::from_secs(20)).await.unwrap();
    assert_eq!(saved.dbsize, 25);
    assert_eq!(saved.rdb_path, dir.path().join("dump.rdb"));
    assert!(std::fs::read(&saved.rdb_path).unwrap().starts_with(b"REDIS"));
    // A second save right away is told apart from the first (LASTSAVE has 1 s resolution).
    let again = bgsave(&redis.url, Duration::from_secs(20)).await.unwrap();
    assert!(again.lastsave > saved.lastsave);

    // Redis may no longer write its folder: BGSAVE fails and Redis refuses writes.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o500)).unwrap();
    let err = bgsave(&redis.url, Duration::from_secs(20)).await.unwrap_err();
    assert!(matches!(err, RedisBackupError::BgsaveFailedRefusingWrites { .. }), "{err}");
    assert!(err.to_string().contains("REFUSES WRITES"), "{err}");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}
