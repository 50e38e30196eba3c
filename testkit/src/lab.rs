//! The lab: throw-away boxes with a real systemd as PID 1, booted with systemd-nspawn over a tmpfs
//! overlay of the host root. The work is done by `dev/lab` (so a human can boot the same box by
//! hand); this module runs it and drives the box from outside with `nsenter` or its bus socket.
//!
//! A [`LabBox`] is torn down when dropped, also when the test panics. Boxes left by a run that was
//! killed are torn down by `dev/lab gc`, which [`LabBox::start`] runs once per process.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Where `dev/lab` keeps one state dir per box.
pub const LAB_DIR: &str = "/run/caretaker-lab";

/// PATH (and nothing else from the test's environment but HOME and LANG) for commands run inside.
const INSIDE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How to boot a box.
#[derive(Debug, Clone)]
pub struct BoxOptions {
    /// Backing files and their sizes (`truncate -s` syntax: "64M", "2G"); each is created if
    /// missing, attached to a loop device and passed into the box under the same /dev/loopN.
    pub volumes: Vec<(PathBuf, String)>,
    /// Start PostgreSQL (a fresh cluster) and Redis and wait until they answer. Without it both
    /// are left stopped (the cluster is still recreated, so it is clean).
    pub services: bool,
    /// The caretaker config to put at /etc/caretaker/caretaker.toml
    /// (default: tests/lab/caretaker.toml when it exists).
    pub config: Option<PathBuf>,
    /// Also install the repo's drop-in folders (`systemd/*.d`), which make the data services
    /// require caretaker-firstboot.service.
    pub dropins: bool,
}

impl Default for BoxOptions {
    fn default() -> Self {
        BoxOptions { volumes: Vec::new(), services: true, config: None, dropins: false }
    }
}

/// A booted box. Dropping it powers it off and removes every trace (mounts, loop devices, state).
#[derive(Debug)]
pub struct LabBox {
    name: String,
    pid1: u32,
    volumes: Vec<PathBuf>,
    down: bool,
}

static BOX_COUNTER: AtomicU32 = AtomicU32::new(0);
static GC: Once = Once::new();

fn lab_script() -> PathBuf {
    crate::repo_root().join("dev/lab")
}

/// A valid machine/host name: `ct-{prefix}-{pid}-{counter}`, [a-z0-9-], at most 63 characters;
/// the prefix is what gets shortened.
fn box_name(prefix: &str, pid: u32, counter: u32) -> String {
    let suffix = format!("-{pid}-{counter}");
    let room = 63 - "ct-".len() - suffix.len();
    let mut p: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' })
        .collect();
    p.truncate(room);
    let p = p.trim_matches('-');
    let p = if p.is_empty() { "box" } else { p };
    format!("ct-{p}{suffix}")
}

/// Tear down every box whose owner process is gone (left by killed runs).
pub fn gc() -> anyhow::Result<()> {
    let out = Command::new(lab_script()).arg("gc").stdin(Stdio::null()).output().context("running dev/lab gc")?;
    if !out.status.success() {
        bail!("dev/lab gc failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file())).unwrap_or(false)
        || ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().any(|d| Path::new(d).join(program).is_file())
}

fn overlay_supported() -> bool {
    let has = || {
        fs::read_to_string("/proc/filesystems")
            .map(|f| f.lines().any(|l| l.trim_end().ends_with("\toverlay")))
            .unwrap_or(false)
    };
    if has() {
        return true;
    }
    // Built as a module that is not loaded yet.
    let _ = Command::new("modprobe").arg("overlay").stdout(Stdio::null()).stderr(Stdio::null()).status();
    has()
}

/// Fails (never skips) with a message naming everything the lab needs and this machine lacks.
pub fn require_root_and_tools() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if effective_uid() != Some(0) {
        missing.push(
            "root (the lab mounts, makes loop devices and runs systemd-nspawn; run the tests as root)".to_string(),
        );
    }
    for (tool, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("systemd-id128", "systemd"),
        ("nsenter", "util-linux"),
        ("losetup", "mount"),
        ("mountpoint", "util-linux"),
        ("setsid", "util-linux"),
        ("pgrep", "procps"),
    ] {
        if !in_path(tool) {
            missing.push(format!("{tool} (apt-get install {package})"));
        }
    }
    if !overlay_supported() {
        missing.push("overlay filesystem support in the kernel (overlay missing from /proc/filesystems)".to_string());
    }
    if !Path::new("/dev/loop-control").exists() {
        missing.push("loop device support (/dev/loop-control)".to_string());
    }
    let script = lab_script();
    if fs::metadata(&script).map(|m| m.permissions().mode() & 0o111 == 0).unwrap_or(true) {
        missing.push(format!("an executable {}", script.display()));
    }
    if !missing.is_empty() {
        bail!("the lab cannot run here; missing:\n  - {}", missing.join("\n  - "));
    }
    Ok(())
}

impl LabBox {
    /// Boot a box named `ct-{prefix}-{pid}-{counter}` and wait until its systemd runs (and, with
    /// `opts.services`, PostgreSQL and Redis answer). The error carries dev/lab's stderr.
    pub fn start(prefix: &str, opts: BoxOptions) -> anyhow::Result<LabBox> {
        require_root_and_tools()?;
        let mut gc_result = Ok(());
        GC.call_once(|| gc_result = gc());
        gc_result?;

        let name = box_name(prefix, std::process::id(), BOX_COUNTER.fetch_add(1, Ordering::SeqCst));
        let mut cmd = Command::new(lab_script());
        cmd.arg("up").arg(&name).arg("--owner").arg(std::process::id().to_string());
        for (file, size) in &opts.volumes {
            let mut v = file.clone().into_os_string();
            v.push(":");
            v.push(size);
            cmd.arg("--volume").arg(v);
        }
        if !opts.services {
            cmd.arg("--no-services");
        }
        if opts.dropins {
            cmd.arg("--dropins");
        }
        if let Some(config) = &opts.config {
            cmd.arg("--config").arg(config);
        }
        let out = cmd.stdin(Stdio::null()).output().context("running dev/lab up")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            // dev/lab tears a failed box down itself; make sure.
            let _ = Command::new(lab_script()).args(["down", &name]).output();
            bail!("dev/lab up {name} failed ({}):\n{stderr}", out.status);
        }
        let mut pid1 = None;
        let mut volumes = Vec::new();
        for line in stdout.lines() {
            if let Some(p) = line.strip_prefix("pid1=") {
                pid1 = p.trim().parse::<u32>().ok();
            } else if let Some(v) = line.strip_prefix("volume=") {
                volumes.push(PathBuf::from(v.trim()));
            }
        }
        let mut lab_box = LabBox { name, pid1: 0, volumes, down: false };
        match pid1 {
            Some(p) => lab_box.pid1 = p,
            None => bail!("dev/lab up {} printed no pid1= line:\n{stdout}\n{stderr}", lab_box.name),
        }
        Ok(lab_box)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The box's systemd, as a host PID.
    pub fn pid1(&self) -> u32 {
        self.pid1
    }

    /// The loop devices passed in with [`BoxOptions::volumes`] (same /dev/loopN inside).
    pub fn volumes(&self) -> &[PathBuf] {
        &self.volumes
    }

    /// The box's root file system as seen from the host.
    pub fn root(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid1))
    }

    /// The box's system bus, usable from the host (zbus, busctl --address, DBUS_SYSTEM_BUS_ADDRESS).
    pub fn bus_address(&self) -> String {
        format!("unix:path=/proc/{}/root/run/dbus/system_bus_socket", self.pid1)
    }

    /// The box's state dir on the host (dev/lab's bookkeeping, console.log).
    pub fn state_dir(&self) -> PathBuf {
        Path::new(LAB_DIR).join(&self.name)
    }

    /// The host PID of the box's systemd-nspawn process, while the box exists.
    pub fn nspawn_pid(&self) -> Option<u32> {
        fs::read_to_string(self.state_dir().join("nspawn.pid")).ok()?.trim().parse().ok()
    }

    /// A command run in all the box's namespaces, with a clean environment (PATH, HOME, LANG).
    pub fn command<S: AsRef<OsStr>>(&self, argv: &[S]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid1.to_string(), "-a", "--"])
            .args(argv)
            .env_clear()
            .env("PATH", INSIDE_PATH)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null());
        cmd
    }

    /// Run argv inside the box and collect its output.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.command(argv).output().unwrap_or_else(|e| panic!("cannot run nsenter for box {}: {e}", self.name))
    }

    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }

    /// Run a shell script inside; panic with its output unless it exits 0. Returns stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            panic!(
                "in box {}: `{script}` failed ({})\n--- stdout\n{stdout}\n--- stderr\n{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        stdout
    }

    /// `nsenter -t PID1 -n -- program`: a host process (host files, host environment) that
    /// listens and connects inside the box's private network.
    pub fn netns_command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.pid1.to_string(), "-n", "--", program]);
        cmd
    }

    /// The ids of the backups of `kind` that `caretaker backup list` shows in the box, oldest first.
    pub fn backup_ids(&self, kind: &str) -> Vec<String> {
        let list = self.sh_ok(&format!(
            "AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing caretaker backup list --json --kind {kind}"
        ));
        let manifests: Vec<serde_json::Value> = serde_json::from_str(&list).expect("backup list --json");
        manifests.iter().filter_map(|m| m["id"].as_str().map(str::to_string)).collect()
    }

    /// Points caretaker's backups at moto's S3 (`s3-endpoint`, region us-east-1, bucket `backups`
    /// for the age `recipient`), with `extra` TOML after the `[backup]` keys, in a drop-in, and
    /// gives caretaker.service moto's test keys.
    pub fn configure_backups(&self, s3_endpoint: &str, recipient: Option<&str>, extra: &str) -> anyhow::Result<()> {
        let recipients =
            recipient.map(|r| format!("database = \"zmanim\"\nrecipients = [\"{r}\"]\n")).unwrap_or_default();
        let config = format!(
            "[aws]\nregion = \"us-east-1\"\ns3-endpoint = \"{s3_endpoint}\"\n[backup]\nbucket = \"backups\"\n{recipients}{extra}"
        );
        self.write_file("/etc/caretaker/caretaker.d/50-backup.toml", config.as_bytes(), 0o644)?;
        self.set_unit_env("caretaker.service", crate::moto::TEST_CREDENTIALS)
    }

    /// SES on a moto of its own in the box's network (moto cannot list sent emails while it holds
    /// multipart parts), the sender verified, caretaker configured to mail through it by a drop-in
    /// (restart caretaker to pick it up).
    pub fn ses(&self) -> anyhow::Result<crate::moto::Moto> {
        let ses = crate::moto::Moto::start_in_netns(self.pid1)?;
        let r = ses.request(
            "POST",
            "/",
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                (
                    "Authorization",
                    "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ses/aws4_request, SignedHeaders=host, Signature=0",
                ),
            ],
            b"Action=VerifyEmailIdentity&EmailAddress=caretaker%40example.com&Version=2010-12-01",
        )?;
        anyhow::ensure!(r.status == 200, "VerifyEmailIdentity: {}", r.text());
        let notify = format!(
            "[aws]\nses-endpoint = \"{}\"\n[notify]\nsender = \"caretaker@example.com\"\nrecipients = [\"ops@example.com\"]\n",
            ses.endpoint()
        );
        self.write_file("/etc/caretaker/caretaker.d/60-notify.toml", notify.as_bytes(), 0o644)?;
        Ok(ses)
    }

    /// Gives `unit` extra environment through a runtime drop-in and reloads systemd (for example
    /// the dummy AWS credentials the emulators accept).
    pub fn set_unit_env(&self, unit: &str, vars: &[(&str, &str)]) -> anyhow::Result<()> {
        let line: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let body = format!("[Service]\nEnvironment={}\n", line.join(" "));
        self.write_file(&format!("/run/systemd/system/{unit}.d/50-lab-env.conf"), body.as_bytes(), 0o644)?;
        let out = self.exec(&["systemctl", "daemon-reload"]);
        anyhow::ensure!(out.status.success(), "daemon-reload failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// The unit's journal inside the box (messages only).
    pub fn journal(&self, unit: &str) -> String {
        String::from_utf8_lossy(&self.exec(&["journalctl", "-u", unit, "--no-pager", "-o", "cat"]).stdout).into_owned()
    }

    fn active_state(&self, unit: &str) -> String {
        let out = self.exec(&["systemctl", "show", "-p", "ActiveState", "--value", unit]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Wait until the unit's ActiveState is `active_state` (e.g. "active", "failed", "inactive").
    pub fn wait_unit_state(&self, unit: &str, active_state: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.active_state(unit);
            if state == active_state {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let status = self.exec(&["systemctl", "--no-pager", "-l", "status", unit]);
                bail!(
                    "box {}: {unit} is {state:?}, not {active_state:?}, after {timeout:?}\n{}\n--- journal\n{}",
                    self.name,
                    String::from_utf8_lossy(&status.stdout),
                    tail(&self.journal(unit), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Write a file inside the box (parents created, `mode` set), through /proc/PID1/root.
    /// Symlinks on the way are resolved as the box sees them.
    pub fn write_file(&self, path_inside: &str, contents: &[u8], mode: u32) -> anyhow::Result<()> {
        let root = self.root();
        let path = resolve_inside(&root, Path::new(path_inside))?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("box {}: mkdir -p {}", self.name, parent.display()))?;
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("box {}: opening {path_inside}", self.name))?;
        f.write_all(contents).with_context(|| format!("box {}: writing {path_inside}", self.name))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("box {}: chmod {mode:o} {path_inside}", self.name))?;
        Ok(())
    }

    /// Tear the box down now and report failure (Drop can only print it).
    pub fn down(mut self) -> anyhow::Result<()> {
        self.down = true;
        run_down(&self.name)
    }
}

fn run_down(name: &str) -> anyhow::Result<()> {
    let out = Command::new(lab_script())
        .args(["down", name])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running dev/lab down {name}"))?;
    if !out.status.success() {
        bail!("dev/lab down {name} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Drop for LabBox {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        self.down = true;
        if let Err(e) = run_down(&self.name) {
            let _ = writeln!(std::io::stderr(), "lab: {e:#}");
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Resolve `path` (absolute, as the box sees it) under `root`, following symlinks the way the
/// box would: absolute targets restart at the box's root, not the host's. The last component
/// need not exist.
fn resolve_inside(root: &Path, path: &Path) -> anyhow::Result<PathBuf> {
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| if let Component::Normal(s) = c { Some(s.to_owned()) } else { None })
        .collect();
    if !path.is_absolute() {
        bail!("{} is not an absolute path", path.display());
    }
    if path.components().any(|c| c == Component::ParentDir) {
        bail!("{}: '..' is not allowed", path.display());
    }
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        let candidate = resolved.iter().fold(root.to_path_buf(), |p, c| p.join(c)).join(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    bail!("{}: too many levels of symbolic links", path.display());
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(s) => pending.push(s.to_owned()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ if part == ".." => {
                resolved.pop();
            }
            _ => resolved.push(part),
        }
    }
    Ok(resolved.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// The IMDSv2 fake (the `imds-fake` binary, built by `cargo build --workspace`) listening on
/// 127.0.0.1:`port` inside a box's network namespace; killed on drop.
pub struct BoxImds(std::process::Child);

impl BoxImds {
    pub fn start(b: &LabBox, port: u16) -> BoxImds {
        Self::start_with(b, port, &[])
    }

    /// [`BoxImds::start`] with more `imds-fake` arguments (`--instance-id i-…`, …).
    pub fn start_with(b: &LabBox, port: u16, args: &[&str]) -> BoxImds {
        use std::io::BufRead;
        let bin = crate::repo_root().join("target/debug/imds-fake");
        let mut child = b
            .netns_command(&bin.to_string_lossy())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start imds-fake (built by cargo build --workspace)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("listening on"), "imds-fake: {line}");
        BoxImds(child)
    }
}

impl Drop for BoxImds {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_machine_names() {
        assert_eq!(box_name("smoke", 123, 0), "ct-smoke-123-0");
        assert_eq!(box_name("Two_Boxes", 1, 2), "ct-two-boxes-1-2");
        let long = box_name(&"x".repeat(200), 4_194_304, 4_000_000_000);
        assert!(long.len() <= 63, "{long}");
        assert!(long.ends_with("-4194304-4000000000"));
        assert_eq!(box_name("--", 1, 1), "ct-box-1-1");
        assert!(long.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let dir = std::env::temp_dir().join(format!("lab-resolve-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("run/real")).unwrap();
        fs::create_dir_all(dir.join("var")).unwrap();
        std::os::unix::fs::symlink("/run", dir.join("var/run")).unwrap();
        std::os::unix::fs::symlink("real", dir.join("run/rel")).unwrap();
        std::os::unix::fs::symlink("../run/real", dir.join("var/up")).unwrap();
        assert_eq!(resolve_inside(&dir, Path::new("/var/run/x")).unwrap(), dir.join("run/x"));
        assert_eq!(resolve_inside(&dir, Path::new("/var/run/rel/y")).unwrap(), dir.join("run/real/y"));
        assert_eq!(resolve_inside(&dir, Path::new("/var/up/z")).unwrap(), dir.join("run/real/z"));
        assert!(resolve_inside(&dir, Path::new("relative")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
