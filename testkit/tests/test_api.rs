//! The stand-in Zmanim API: health, version labels (flag, env, trailer), unhealthy modes,
//! socket activation, signals.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use caretaker_testkit::ports::{HttpResponse, http_get};

const BIN: &str = env!("CARGO_BIN_EXE_test-api");

/// A scratch folder, removed on drop.
struct Scratch(PathBuf);
impl Scratch {
    fn new() -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "caretaker-test-api-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running test-api: killed (by PID) and reaped on drop.
struct Api {
    child: Child,
    base: String,
}
impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
impl Api {
    fn get(&self, path: &str) -> HttpResponse {
        http_get(&format!("{}{path}", self.base)).unwrap()
    }

    fn health(&self) -> (u16, serde_json::Value) {
        let r = self.get("/health");
        assert_eq!(r.header("content-type"), Some("application/json"));
        (r.status, serde_json::from_slice(&r.body).unwrap())
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "test-api did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigterm(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    }
}

/// A command for `program` with a clean test-api environment and its own control dir.
fn command(program: &Path, control_dir: &Path) -> Command {
    let mut cmd = Command::new(program);
    for var in [
        "TEST_API_VERSION",
        "TEST_API_FAIL_HEALTH",
        "TEST_API_EXIT_AFTER_MS",
        "TEST_API_DATABASE_URL",
        "TEST_API_DB_POOL",
        "TEST_API_LISTEN",
        "LISTEN_PID",
        "LISTEN_FDS",
        "NOTIFY_SOCKET",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("TEST_API_CONTROL_DIR", control_dir).stdin(Stdio::null()).stdout(Stdio::piped());
    cmd
}

/// Spawn (retrying ETXTBSY: a freshly written copy may still be open in a child forked meanwhile)
/// and wait for the `listening on ADDR` line.
fn start(mut cmd: Command) -> Api {
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("spawning test-api: {e}"),
        }
    };
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Api { child, base: format!("http://{addr}") }
}

fn start_with(args: &[&str], env: &[(&str, &str)], control_dir: &Path) -> Api {
    let mut cmd = command(Path::new(BIN), control_dir);
    cmd.args(["--listen", "127.0.0.1:0"]).args(args).envs(env.iter().copied());
    start(cmd)
}

/// A copy of the binary with `trailer` appended, as the release tests do.
fn copy_with_trailer(dir: &Path, name: &str, trailer: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::copy(BIN, &path).unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(trailer.as_bytes()).unwrap();
    f.sync_all().unwrap();
    path
}

#[test]
fn health_ping_and_404() {
    let dir = Scratch::new();
    let api = start_with(&["--version-label", "1.2.3"], &[], &dir.0);
    let (status, body) = api.health();
    assert_eq!(status, 200);
    assert_eq!(body, serde_json::json!({"status": "ok", "version": "1.2.3"}));
    let r = api.get("/api/ping");
    assert_eq!((r.status, r.text().as_str()), (200, "pong"));
    assert_eq!(api.get("/nope").status, 404);

    let api = start_with(&[], &[], &dir.0);
    assert_eq!(api.health().1["version"], "dev");
    let api = start_with(&[], &[("TEST_API_VERSION", "from-env")], &dir.0);
    assert_eq!(api.health().1["version"], "from-env");
    let api = start_with(&["--version-label", "flag"], &[("TEST_API_VERSION", "from-env")], &dir.0);
    assert_eq!(api.health().1["version"], "flag");
}

#[test]
fn trailer_sets_version_and_failure() {
    let dir = Scratch::new();
    let v2 = copy_with_trailer(&dir.0, "test-api-v2", "\nTEST_API_VERSION=v2.0.1\n");
    let mut cmd = command(&v2, &dir.0);
    cmd.args(["--listen", "127.0.0.1:0"]);
    let api = start(cmd);
    assert_eq!(api.health(), (200, serde_json::json!({"status": "ok", "version": "v2.0.1"})));

    // The environment beats the trailer.
    let mut cmd = command(&v2, &dir.0);
    cmd.args(["--listen", "127.0.0.1:0"]).env("TEST_API_VERSION", "env");
    assert_eq!(start(cmd).health().1["version"], "env");

    let bad = copy_with_trailer(&dir.0, "test-api-bad", "\nTEST_API_VERSION=v3-bad\nTEST_API_FAIL_HEALTH=1\n");
    let mut cmd = command(&bad, &dir.0);
    cmd.args(["--listen", "127.0.0.1:0"]);
    let api = start(cmd);
    assert_eq!(api.health(), (500, serde_json::json!({"status": "unhealthy", "version": "v3-bad"})));
    assert_eq!(api.get("/api/ping").status, 200);
}

#[test]
fn fail_health_flag_and_env() {
    let dir = Scratch::new();
    assert_eq!(start_with(&["--fail-health"], &[], &dir.0).health().0, 500);
    assert_eq!(start_with(&[], &[("TEST_API_FAIL_HEALTH", "1")], &dir.0).health().0, 500);
    assert_eq!(start_with(&[], &[("TEST_API_FAIL_HEALTH", "0")], &dir.0).health().0, 200);
}

#[test]
fn control_file_toggles_health() {
    let dir = Scratch::new();
    let api = start_with(&[], &[], &dir.0);
    assert_eq!(api.health().0, 200);
    std::fs::write(dir.0.join("unhealthy"), "").unwrap();
    assert_eq!(api.health().0, 500);
    assert_eq!(api.health().0, 500);
    std::fs::remove_file(dir.0.join("unhealthy")).unwrap();
    assert_eq!(api.health().0, 200);
}

#[test]
fn exit_after_ms_dies_with_1() {
    let dir = Scratch::new();
    let mut api = start_with(&[], &[("TEST_API_EXIT_AFTER_MS", "300")], &dir.0);
    let status = api.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(1));
}

#[test]
fn sigterm_exits_0() {
    let dir = Scratch::new();
    let mut api = start_with(&[], &[], &dir.0);
    assert_eq!(api.health().0, 200);
    api.sigterm();
    let status = api.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{status}");
}

/// Spawn through `sh` so LISTEN_PID can be the PID that ends up exec'ing test-api, with `listener`
/// at fd 3, as systemd does.
fn socket_activated(listener: &std::net::TcpListener, listen_pid: &str, extra: &[&str], dir: &Path) -> Api {
    let mut cmd = command(Path::new("/bin/sh"), dir);
    let script = format!("export LISTEN_PID={listen_pid} LISTEN_FDS=1 LISTEN_FDNAMES=http; exec \"$0\" \"$@\"");
    cmd.args(["-c", &script, BIN]).args(extra);
    let fd = listener.as_raw_fd();
    // SAFETY: only dup2/fcntl, which are async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                nix::fcntl::fcntl(3, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
            } else {
                nix::unistd::dup2(fd, 3)?;
            }
            Ok(())
        });
    }
    start(cmd)
}

#[test]
fn socket_activation_uses_fd_3() {
    let dir = Scratch::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let api = socket_activated(&listener, "$$", &["--version-label", "activated"], &dir.0);
    drop(listener);
    assert_eq!(api.base, format!("http://{addr}"));
    let r = http_get(&format!("http://{addr}/health")).unwrap();
    assert_eq!((r.status, r.text()), (200, r#"{"status":"ok","version":"activated"}"#.to_string()));

    // LISTEN_PID for someone else: fd 3 is not ours, fall back to --listen.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let api = socket_activated(&listener, "1", &["--listen", "127.0.0.1:0"], &dir.0);
    assert_ne!(api.base, format!("http://{addr}"));
    assert_eq!(api.health().0, 200);
}

/// `/api/zmanim` on a real PostgreSQL: the indexed query's rows as JSON, a 400 for a bad id, a 503
/// naming the database while it is down, and a fresh connection once it is back. Without
/// `TEST_API_DATABASE_URL` the path does not exist.
#[test]
fn zmanim_reads_postgresql_and_survives_its_restart() {
    use caretaker_testkit::pg::Cluster;
    let dir = Scratch::new();
    let plain = start_with(&[], &[], &dir.0);
    assert_eq!(plain.get("/api/zmanim?id=1").status, 404);

    let mut pg = Cluster::init(16);
    pg.set("listen_addresses=127.0.0.1");
    pg.start();
    pg.sql(
        "create table cities(id int primary key, name text not null);
         insert into cities select g, 'City ' || g from generate_series(1, 10) g;
         create table zmanim(id bigint primary key, city int not null references cities, day date not null,
                             sunrise time, sunset time, note text);
         insert into zmanim select g, 1 + g % 10, '2026-01-01'::date + g, '06:00', '19:00',
                case when g % 2 = 0 then 'line one\nline \"two\"' end from generate_series(1, 100) g;",
    );
    let url = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", pg.port);
    let api = start_with(&[], &[("TEST_API_DATABASE_URL", &url), ("TEST_API_DB_POOL", "2")], &dir.0);
    for _ in 0..3 {
        let r = api.get("/api/zmanim?id=10");
        assert_eq!(r.status, 200, "{}", r.text());
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let rows = body["zmanim"].as_array().unwrap();
        assert_eq!(rows.len(), 30);
        assert_eq!(rows[0]["id"], 10);
        assert_eq!(rows[0]["city"], "City 1");
        assert_eq!(rows[0]["note"], "line one\nline \"two\"");
        assert_eq!(rows[1]["note"], serde_json::Value::Null);
        assert_eq!(rows[29]["id"], 39);
    }
    assert_eq!(api.get("/api/zmanim?id=95").status, 200);
    assert_eq!(api.get("/api/zmanim?id=ten").status, 400);
    assert_eq!(api.get("/api/zmanim").status, 400);

    pg.stop();
    let r = api.get("/api/zmanim?id=1");
    assert_eq!(r.status, 503);
    assert!(r.text().starts_with("database: "), "{}", r.text());
    pg.start();
    for _ in 0..2 {
        let r = api.get("/api/zmanim?id=1");
        assert_eq!(r.status, 200, "after the restart (both pool connections): {}", r.text());
    }
}
