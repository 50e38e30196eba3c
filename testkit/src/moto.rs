//! moto's server (pinned 5.2.x, installed in `<repo>/.venv` by `./dev/test`) on a free port,
//! killed by PID on drop.
//!
//! Clients need dummy credentials and the endpoint; [`Moto::aws_env`] gives them:
//! `AWS_ACCESS_KEY_ID=testing`, `AWS_SECRET_ACCESS_KEY=testing`, `AWS_REGION=eu-west-1`
//! (and `AWS_DEFAULT_REGION`, for the aws CLI), `AWS_ENDPOINT_URL=<endpoint>`. moto accepts any
//! signature. Use path-style S3 addressing.
//!
//! Known moto quirks (5.2.x): SES refuses to send from an unverified address (MessageRejected), so
//! verify the sender first; `GET /moto-api/data.json` answers 500 while the same server holds S3
//! multipart parts, so give SES tests their own `Moto`. moto keeps everything in memory.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::ports::{HttpResponse, free_port, http, in_netns};

/// How long moto gets to start answering HTTP.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The access keys moto takes, as `caretaker.service` gets them in lab boxes.
pub const TEST_CREDENTIALS: &[(&str, &str)] = &[("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")];

/// A moto server process. Dropping it kills the process (SIGKILL by PID) and reaps it.
pub struct Moto {
    child: Child,
    port: u16,
    netns_pid: Option<u32>,
    log: PathBuf,
}

/// One mail moto's SES accepted (`SendEmail`, or `SendRawEmail` with `raw` set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SentEmail {
    pub id: String,
    pub source: String,
    /// To, then Cc, then Bcc for `SendEmail`; the envelope destinations for raw mail.
    pub destinations: Vec<String>,
    /// For raw mail: the `Subject:` header (unfolded), empty when absent.
    pub subject: String,
    /// For raw mail: everything after the header block.
    pub body: String,
    /// The whole message for `SendRawEmail`; `None` for `SendEmail`.
    pub raw: Option<String>,
}

/// `<repo>/.venv/bin/moto_server`.
pub fn moto_server_path() -> PathBuf {
    crate::repo_root().join(".venv/bin/moto_server")
}

fn not_installed() -> anyhow::Error {
    anyhow::anyhow!(
        "moto is not installed in {}: run ./dev/test (it installs it)",
        crate::repo_root().join(".venv").display()
    )
}

/// The moto version in the venv, from its `moto-X.Y.Z.dist-info` folder.
fn installed_version(venv: &Path) -> Option<String> {
    for lib in std::fs::read_dir(venv.join("lib")).ok()?.flatten() {
        let Ok(entries) = std::fs::read_dir(lib.path().join("site-packages")) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(v) = name.strip_prefix("moto-").and_then(|r| r.strip_suffix(".dist-info")) {
                return Some(v.to_string());
            }
        }
    }
    None
}

impl Moto {
    /// moto on 127.0.0.1:<free port> in this network namespace.
    pub fn start() -> anyhow::Result<Moto> {
        Self::start_with(None)
    }

    /// moto on 127.0.0.1:<port free there> inside the network namespace of process `pid`
    /// (e.g. a container's init). The process itself joins the namespace (setns before exec; needs
    /// root), so [`Self::pid`] is moto's own PID. Readiness checks, [`Self::sent_emails`] and
    /// [`Self::reset`] go through that namespace too; [`Self::endpoint`] is valid inside it.
    pub fn start_in_netns(pid: u32) -> anyhow::Result<Moto> {
        Self::start_with(Some(pid))
    }

    /// [`Self::start`] for `None`, [`Self::start_in_netns`] for `Some(pid)`.
    pub fn start_with(netns_pid: Option<u32>) -> anyhow::Result<Moto> {
        let server = moto_server_path();
        if !server.exists() {
            return Err(not_installed());
        }
        let venv = crate::repo_root().join(".venv");
        match installed_version(&venv) {
            Some(v) if v.starts_with("5.2.") => {}
            Some(v) => {
                bail!("moto {v} is installed in {}, want 5.2.x: run ./dev/test (it installs it)", venv.display())
            }
            None => return Err(not_installed()),
        }

        let mut last_err = None;
        for _attempt in 0..3 {
            let port = match netns_pid {
                None => free_port(),
                Some(pid) => in_netns(pid, free_port)?,
            };
            match Self::spawn_once(&server, port, netns_pid) {
                Ok(m) => return Ok(m),
                // Someone took the port between free_port() and moto's bind: try another.
                Err(e) if format!("{e:#}").contains("Address already in use") => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.expect("three failed attempts leave an error"))
    }

    fn spawn_once(server: &Path, port: u16, netns_pid: Option<u32>) -> anyhow::Result<Moto> {
        let log = std::env::temp_dir().join(format!("caretaker-moto-{}-{port}.log", std::process::id()));
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(server);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .env("PYTHONUNBUFFERED", "1");
        if let Some(pid) = netns_pid {
            let path = format!("/proc/{pid}/ns/net");
            let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns(2) is async-signal-safe; the fd was opened before fork.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd.spawn().with_context(|| format!("starting {}", server.display()))?;
        // From here on, Drop kills the process whatever happens.
        let mut moto = Moto { child, port, netns_pid, log };

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = moto.child.try_wait()? {
                bail!("moto_server exited ({status}) before answering; its log:\n{}", moto.log_tail());
            }
            if moto.request("GET", "/moto-api/", &[], b"").is_ok() {
                return Ok(moto);
            }
            if Instant::now() >= deadline {
                bail!(
                    "moto_server did not answer on port {port} within {START_TIMEOUT:?}; its log:\n{}",
                    moto.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `http://127.0.0.1:PORT` (inside the namespace for [`Self::start_in_netns`]).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// moto's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where moto's stdout and stderr go (deleted on drop unless the thread is panicking).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Environment for AWS clients (SDKs, aws CLI) talking to this moto with dummy credentials.
    pub fn aws_env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
            ("AWS_REGION", "eu-west-1".to_string()),
            ("AWS_DEFAULT_REGION", "eu-west-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// One HTTP request to moto (through its network namespace if it has one).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<HttpResponse> {
        let url = format!("{}{path}", self.endpoint());
        match self.netns_pid {
            None => http(method, &url, headers, body),
            Some(pid) => {
                let method = method.to_string();
                let headers: Vec<(String, String)> =
                    headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                let body = body.to_vec();
                in_netns(pid, move || {
                    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    http(&method, &url, &h, &body)
                })?
            }
        }
    }

    /// A query-protocol call (a form-encoded `Action=…` body) to `service` (its SigV4 name, e.g.
    /// `monitoring` for CloudWatch) in `region`, which picks moto's backend; the answer's body.
    pub fn query(&self, service: &str, region: &str, body: &str) -> anyhow::Result<String> {
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=testing/20260101/{region}/{service}/aws4_request, SignedHeaders=host, Signature=0"
        );
        let r = self.request(
            "POST",
            "/",
            &[("Content-Type", "application/x-www-form-urlencoded"), ("Authorization", &auth)],
            body.as_bytes(),
        )?;
        anyhow::ensure!(r.status == 200, "{service} {body}: {} {}", r.status, r.text());
        Ok(r.text())
    }

    /// The `Authorization` header of an S3 request moto accepts (us-east-1, the test keys).
    pub fn s3_auth() -> (&'static str, &'static str) {
        (
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0",
        )
    }

    /// Creates bucket `name` (us-east-1); fails unless moto answers 200.
    pub fn create_bucket(&self, name: &str) -> anyhow::Result<()> {
        let r = self.request("PUT", &format!("/{name}"), &[Self::s3_auth()], b"")?;
        anyhow::ensure!(r.status == 200, "create bucket {name}: HTTP {}: {}", r.status, r.text());
        Ok(())
    }

    /// A JSON-protocol AWS call (`X-Amz-Target: TARGET`) to `service` in `region`, signed the way
    /// moto accepts (its credential scope picks the region); fails unless moto answers 200.
    pub fn aws_json(&self, region: &str, service: &str, target: &str, body: &serde_json::Value) -> anyhow::Result<()> {
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=testing/20260101/{region}/{service}/aws4_request, SignedHeaders=host, Signature=0"
        );
        let headers =
            [("Content-Type", "application/x-amz-json-1.1"), ("X-Amz-Target", target), ("Authorization", &auth)];
        let r = self.request("POST", "/", &headers, body.to_string().as_bytes())?;
        anyhow::ensure!(r.status == 200, "{target}: HTTP {}: {}", r.status, r.text());
        Ok(())
    }

    /// Puts SSM parameter `name` (a SecureString when `secure`) in `region`, overwriting it.
    pub fn put_parameter(&self, region: &str, name: &str, value: &str, secure: bool) -> anyhow::Result<()> {
        let body = serde_json::json!({
            "Name": name, "Value": value, "Type": if secure { "SecureString" } else { "String" }, "Overwrite": true
        });
        self.aws_json(region, "ssm", "AmazonSSM.PutParameter", &body)
    }

    /// Every mail moto's SES has accepted: `SendEmail` ones first, then raw ones (each in order).
    pub fn sent_emails(&self) -> anyhow::Result<Vec<SentEmail>> {
        let r = self.request("GET", "/moto-api/data.json", &[], b"")?;
        if r.status != 200 {
            bail!(
                "GET /moto-api/data.json answered {} (moto answers 500 here while it holds S3 multipart parts: \
                 give SES tests their own Moto): {}",
                r.status,
                r.text().chars().take(500).collect::<String>()
            );
        }
        let data: serde_json::Value = serde_json::from_slice(&r.body).context("moto's data.json is not JSON")?;
        Ok(parse_sent_emails(&data))
    }

    /// Forget all state (`POST /moto-api/reset`).
    pub fn reset(&self) -> anyhow::Result<()> {
        let r = self.request("POST", "/moto-api/reset", &[], b"")?;
        if r.status != 200 {
            bail!("POST /moto-api/reset answered {}: {}", r.status, r.text());
        }
        Ok(())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        // Only if it has not been reaped yet, so the PID cannot belong to someone else.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("moto's log is kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

fn str_field(v: &serde_json::Value, key: &str) -> String {
    v.get(key).and_then(|s| s.as_str()).unwrap_or_default().to_string()
}

fn parse_sent_emails(data: &serde_json::Value) -> Vec<SentEmail> {
    let ses = &data["ses"];
    let mut out = Vec::new();
    for m in ses["Message"].as_array().into_iter().flatten() {
        let d = &m["destinations"];
        let mut destinations = Vec::new();
        for key in ["ToAddresses", "CcAddresses", "BccAddresses"] {
            destinations.extend(strings(&d[key]));
        }
        out.push(SentEmail {
            id: str_field(m, "id"),
            source: str_field(m, "source"),
            destinations,
            subject: str_field(m, "subject"),
            body: str_field(m, "body"),
            raw: None,
        });
    }
    for m in ses["RawMessage"].as_array().into_iter().flatten() {
        let raw = str_field(m, "raw_data");
        let (subject, body) = split_raw(&raw);
        out.push(SentEmail {
            id: str_field(m, "id"),
            source: str_field(m, "source"),
            destinations: strings(&m["destinations"]),
            subject,
            body,
            raw: Some(raw),
        });
    }
    out
}

/// (Subject header unfolded, body) of an RFC 5322 message.
fn split_raw(raw: &str) -> (String, String) {
    let (head, body) = match (raw.find("\r\n\r\n"), raw.find("\n\n")) {
        (Some(a), Some(b)) if b < a => (&raw[..b], &raw[b + 2..]),
        (Some(a), _) => (&raw[..a], &raw[a + 4..]),
        (None, Some(b)) => (&raw[..b], &raw[b + 2..]),
        (None, None) => (raw, ""),
    };
    let mut subject: Option<String> = None;
    let mut in_subject = false;
    for line in head.lines() {
        if in_subject && line.starts_with([' ', '\t']) {
            if let Some(s) = subject.as_mut() {
                s.push(' ');
                s.push_str(line.trim());
            }
            continue;
        }
        in_subject = false;
        if subject.is_none()
            && let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("subject")
        {
            subject = Some(value.trim().to_string());
            in_subject = true;
        }
    }
    (subject.unwrap_or_default(), body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_split() {
        let (s, b) = split_raw("From: a@x\r\nSubject: hello\r\n  there\r\nTo: b@x\r\n\r\nbody\r\n");
        assert_eq!((s.as_str(), b.as_str()), ("hello there", "body\r\n"));
    }
}
