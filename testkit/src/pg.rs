//! A throw-away PostgreSQL cluster for tests: initdb in a temporary folder, run as the postgres OS
//! user, reached over its own socket folder by peer authentication, killed on drop. Versions: 15
//! from Debian, 16 and 17 from the npm registry (`dev/setup` puts them under .tools/postgresql/).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The versions the suite tests against.
pub const VERSIONS: [u32; 3] = [15, 16, 17];

/// The `bin/` folder of PostgreSQL `version`.
pub fn bin_dir(version: u32) -> PathBuf {
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin"));
    if debian.join("postgres").exists() {
        return debian;
    }
    let local = crate::repo_root().join(format!(".tools/postgresql/{version}/bin"));
    assert!(
        local.join("postgres").exists(),
        "PostgreSQL {version} is not installed ({} missing): run dev/setup",
        local.display()
    );
    local
}

/// A command running `program` as the postgres OS user.
pub fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups", "--"]).arg(program);
    c
}

fn chown_to_postgres(path: &Path) {
    let out = Command::new("chown").args(["-R", "postgres:", &path.to_string_lossy()]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// One cluster.
pub struct Cluster {
    pub version: u32,
    pub dir: PathBuf,
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub settings: Vec<String>,
    child: Option<Child>,
    _tmp: Option<tempfile_like::TempDir>,
}

mod tempfile_like {
    /// A folder removed on drop.
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Cluster {
    /// initdb a new cluster of `version` (not started).
    pub fn init(version: u32) -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "caretaker-pg{version}-{}-{}",
            std::process::id(),
            crate::ports::free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Cluster::at(version, &dir);
        std::fs::create_dir_all(&c.socket_dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        chown_to_postgres(&dir);
        let out = as_postgres(&bin_dir(version).join("initdb"))
            .args(["-D", &c.data.to_string_lossy(), "--auth-local=peer", "-E", "UTF8", "--locale=C", "-U", "postgres"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        c._tmp = Some(tempfile_like::TempDir(dir));
        c
    }

    /// A cluster whose data directory is `dir/data` (made by someone else: a restore), not removed
    /// on drop.
    pub fn at(version: u32, dir: &Path) -> Cluster {
        Cluster {
            version,
            dir: dir.to_path_buf(),
            data: dir.join("data"),
            socket_dir: dir.join("sock"),
            port: crate::ports::free_port(),
            settings: vec![],
            child: None,
            _tmp: None,
        }
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        bin_dir(self.version).join(name)
    }

    /// Adds `-c name=value` for the next start.
    pub fn set(&mut self, setting: &str) -> &mut Self {
        self.settings.push(setting.to_string());
        self
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&mut self) {
        std::fs::create_dir_all(&self.socket_dir).unwrap();
        chown_to_postgres(&self.socket_dir);
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        let mut cmd = as_postgres(&self.bin("postgres"));
        cmd.args(["-D", &self.data.to_string_lossy(), "-k", &self.socket_dir.to_string_lossy()]).args([
            "-p",
            &self.port.to_string(),
            "-c",
            "listen_addresses=",
        ]);
        for s in &self.settings {
            cmd.args(["-c", s]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = as_postgres(&self.bin("pg_isready"))
                .args(["-h", &self.socket_dir.to_string_lossy(), "-p", &self.port.to_string()])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ready {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("postgres exited ({status}): {}", self.log());
            }
            assert!(Instant::now() < end, "postgres did not become ready: {}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the server to exit by itself (e.g. after recovery with a shutdown target).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fast shutdown (SIGINT), waited for.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGINT);
            let _ = c.wait();
        }
    }

    /// SIGKILL, no shutdown at all.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// psql -c SQL as postgres (tuples only, unaligned); panics with stderr on failure.
    pub fn sql(&self, sql: &str) -> String {
        let out = self.psql(sql);
        assert!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn psql(&self, sql: &str) -> Output {
        as_postgres(&self.bin("psql"))
            .args(["-h", &self.socket_dir.to_string_lossy(), "-p", &self.port.to_string(), "-d", "postgres"])
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill();
    }
}
