//! The WAL socket: PostgreSQL's `archive_command` and `restore_command` are thin clients
//! (`caretaker wal push|fetch`, see [`super::client`]) that hand a file to, or ask one of, the
//! process holding the S3 client and the keys — the daemon, or a restore job.
//!
//! Why not a process per segment that talks to S3 itself: the command runs as the postgres user,
//! and that user must not reach the instance role (caretaker-imds-guard denies IMDS to every
//! non-root user) nor read the backup keys. The socket also saves each segment a process that
//! builds an S3 client and fetches credentials.
//!
//! Wire: one request line (JSON, ≤ 4 KiB) then, for a push, exactly `bytes` bytes; one answer
//! line then, for a fetch that found the file, exactly `bytes` bytes. Only root and the
//! PostgreSQL user may connect (peer credentials); the client never names a path, only a WAL
//! file name, which is parsed strictly.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::archive::{Archive, Pushed, WalError};
use super::name::{Segment, WalFile};

/// The socket's default path.
pub const DEFAULT_SOCKET: &str = "/run/caretaker/wal.sock";
const MAX_LINE: usize = 4096;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Push { name: String, bytes: u64 },
    Fetch { name: String },
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<Pushed>,
    /// Fetch: whether the archive has the file (false only when it does not: never on an error).
    #[serde(default)]
    pub found: bool,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// What a restore may fetch: the segments the chain check found (a missing one inside this range
/// is an error, never "not found": that would end recovery early) and where the archive ends.
#[derive(Debug, Clone, Default)]
pub struct FetchPlan {
    pub required: BTreeSet<Segment>,
    /// The system identifier every fetched segment must carry.
    pub system_identifier: u64,
}

/// Counters for status and alerts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalStats {
    pub archived: u64,
    pub already_archived: u64,
    pub failed: u64,
    pub fetched: u64,
    /// Segments recovery got from the WAL tip (past the archive's end).
    pub tip_segments: u64,
    /// The newest segment of the restore's plan handed out (progress: how far replay is).
    #[serde(skip)]
    pub newest_planned_fetched: Option<Segment>,
    pub last_archived: Option<String>,
    pub last_archived_at: Option<String>,
    pub last_failure: Option<String>,
    pub last_failure_at: Option<String>,
}

/// A prefetched segment: on its way (waiters are woken when it lands or fails), or here.
enum Slot {
    Pending(Arc<tokio::sync::Notify>),
    Ready(Vec<u8>),
}

/// Memory for segments fetched ahead of replay: 4 segments of the default 16 MiB, fetched in
/// parallel (pgBackRest's `archive-get-queue-max` is 128 MiB, but on disk; this is the restore's
/// RAM on a 4 GiB box); never fewer than 2 ahead.
const PREFETCH_BYTES: u64 = 64 << 20;

/// The server's state.
pub struct WalServer {
    archive: Arc<Archive>,
    /// PostgreSQL's data directory: the system identifier is read from its `global/pg_control`.
    data_dir: PathBuf,
    allowed_uids: Vec<u32>,
    plan: Mutex<Option<FetchPlan>>,
    /// Segments fetched ahead of replay (plaintext) or on their way, at most `prefetch` of them.
    cache: Mutex<HashMap<Segment, Slot>>,
    prefetch: usize,
    stats: Mutex<WalStats>,
    /// Called with every transient or lasting push failure (alerts).
    on_failure: Box<dyn Fn(&WalError) + Send + Sync>,
    /// Closed while another instance holds the backup prefix's lease: pushes are refused.
    gate: crate::backup::lease::Gate,
}

impl WalServer {
    pub fn new(archive: Archive, data_dir: &Path, allowed_uids: Vec<u32>) -> WalServer {
        let prefetch = (PREFETCH_BYTES / archive.segment_size.max(1)).clamp(2, 64) as usize;
        WalServer {
            archive: Arc::new(archive),
            data_dir: data_dir.to_path_buf(),
            allowed_uids,
            plan: Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            prefetch,
            stats: Mutex::new(WalStats::default()),
            on_failure: Box::new(|_| {}),
            gate: Default::default(),
        }
    }

    /// Pushes wait for `gate` (see [`crate::backup::lease::Gate`]).
    pub fn with_lease_gate(mut self, gate: crate::backup::lease::Gate) -> WalServer {
        self.gate = gate;
        self
    }

    fn closed(&self) -> Option<WalError> {
        let why = self.gate.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        Some(WalError::Setup(format!(
            "not archiving: {why}; PostgreSQL keeps the WAL until this box holds the prefix again"
        )))
    }

    pub fn with_failure_hook(mut self, f: impl Fn(&WalError) + Send + Sync + 'static) -> WalServer {
        self.on_failure = Box::new(f);
        self
    }

    pub fn set_plan(&self, plan: Option<FetchPlan>) {
        *self.plan.lock().expect("plan lock") = plan;
        self.cache.lock().expect("cache lock").clear();
    }

    pub fn stats(&self) -> WalStats {
        self.stats.lock().expect("stats lock").clone()
    }

    /// How many segments have landed ahead of replay (waiting to be asked for).
    pub fn prefetched(&self) -> usize {
        self.cache.lock().expect("cache lock").values().filter(|s| matches!(s, Slot::Ready(_))).count()
    }

    /// How many segments the prefetch window holds.
    pub fn prefetch_window(&self) -> usize {
        self.prefetch
    }

    pub fn archive(&self) -> &Archive {
        &self.archive
    }

    /// The archive, shared (the WAL tip stores into the same one).
    pub fn shared_archive(&self) -> Arc<Archive> {
        self.archive.clone()
    }

    fn system_identifier(&self) -> Result<u64, WalError> {
        let path = self.data_dir.join("global/pg_control");
        let bytes =
            std::fs::read(&path).map_err(|e| WalError::Setup(format!("cannot read {}: {e}", path.display())))?;
        super::header::control_system_identifier(&bytes).map_err(WalError::Setup)
    }

    /// Pushes one file (the daemon's own sweeps).
    pub async fn push(&self, name: &str, plain: Vec<u8>) -> Result<Pushed, WalError> {
        if let Some(e) = self.closed() {
            return self.record(name, Err(e));
        }
        let r = match self.system_identifier() {
            Ok(sysid) => self.archive.push(name, plain, sysid).await,
            Err(e) => Err(e),
        };
        self.record(name, r)
    }

    /// Pushes the `bytes` bytes of `name` read from `body` (the socket's push), streamed.
    pub async fn push_from(
        &self,
        name: &str,
        bytes: u64,
        body: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Result<Pushed, WalError> {
        if let Some(e) = self.closed() {
            return self.record(name, Err(e));
        }
        let r = match self.system_identifier() {
            Ok(sysid) => self.archive.push_from(name, bytes, body, sysid).await,
            Err(e) => Err(e),
        };
        self.record(name, r)
    }

    fn record(&self, name: &str, r: Result<Pushed, WalError>) -> Result<Pushed, WalError> {
        let mut s = self.stats.lock().expect("stats lock");
        match &r {
            Ok(p) => {
                if *p == Pushed::Archived {
                    s.archived += 1
                } else {
                    s.already_archived += 1
                }
                s.last_archived = Some(name.to_string());
                s.last_archived_at = Some(crate::units::now_rfc3339());
            }
            Err(e) => {
                s.failed += 1;
                s.last_failure = Some(e.to_string());
                s.last_failure_at = Some(crate::units::now_rfc3339());
                drop(s);
                (self.on_failure)(e);
            }
        }
        r
    }

    /// Fetches one file for recovery: Ok(None) only when the archive does not have it and it is
    /// not a segment the plan requires. Transient S3 errors are retried for up to `retry_for`.
    /// A segment of the plan comes from the prefetch window (waiting for it when it is on its way),
    /// and asking for it moves the window on.
    pub async fn fetch(self: &Arc<Self>, name: &str, retry_for: Duration) -> Result<Option<Vec<u8>>, WalError> {
        let file = self.archive.parse(name)?;
        let plan = self.plan.lock().expect("plan lock").clone();
        if let (WalFile::Segment(s), Some(plan)) = (&file, &plan)
            && plan.required.contains(s)
        {
            self.prefetch_from(*s, plan);
            if let Some(hit) = self.wait_prefetched(*s).await {
                let mut stats = self.stats.lock().expect("stats lock");
                stats.fetched += 1;
                stats.newest_planned_fetched = stats.newest_planned_fetched.max(Some(*s));
                return Ok(Some(hit));
            }
        }
        // Not in the plan, or its prefetch failed: fetched here, with retries and their errors.
        let sysid = plan.as_ref().map(|p| p.system_identifier);
        let mut r = fetch_retrying(&self.archive, name, sysid, retry_for).await?;
        if let (None, WalFile::Segment(s)) = (&r, &file) {
            // Past the archive's end: the tip's chunks of the unfinished segment, if any.
            // Only for a restore's plan, which names the cluster whose chunks may be replayed.
            let tip = match sysid {
                Some(id) => tip_retrying(&self.archive, *s, id, retry_for).await?,
                None => None,
            };
            if let Some((bytes, held)) = tip {
                info!(
                    segment = name,
                    "recovery gets {name} from the WAL tip: {} of its {} (the rest zeros)",
                    crate::units::human_bytes(held),
                    crate::units::human_bytes(self.archive.segment_size)
                );
                self.stats.lock().expect("stats lock").tip_segments += 1;
                r = Some(bytes);
            }
        }
        if let (None, Some(plan), WalFile::Segment(s)) = (&r, &plan, &file) {
            if plan.required.contains(s) {
                return Err(WalError::Foreign {
                    name: name.into(),
                    why: "the chain check found it, but it is gone from the archive now: recovery stops here rather \
                          than end early"
                        .into(),
                });
            }
        }
        if r.is_some() {
            let mut stats = self.stats.lock().expect("stats lock");
            stats.fetched += 1;
            if let (Some(plan), WalFile::Segment(s)) = (&plan, &file)
                && plan.required.contains(s)
            {
                stats.newest_planned_fetched = stats.newest_planned_fetched.max(Some(*s));
            }
        }
        Ok(r)
    }

    /// Takes `s` out of the prefetch window once it has landed; None when it is not there or its
    /// fetch failed (the caller fetches it itself and reports the error).
    async fn wait_prefetched(&self, s: Segment) -> Option<Vec<u8>> {
        loop {
            let notified = {
                let mut cache = self.cache.lock().expect("cache lock");
                match cache.remove(&s) {
                    Some(Slot::Ready(bytes)) => return Some(bytes),
                    None => return None,
                    Some(Slot::Pending(n)) => {
                        let n2 = n.clone();
                        cache.insert(s, Slot::Pending(n));
                        // Registered under the lock: the landing's notify_waiters cannot be missed.
                        let mut notified = Box::pin(n2.notified_owned());
                        notified.as_mut().enable();
                        notified
                    }
                }
            };
            notified.await;
        }
    }

    /// Makes the window `s`, `s + 1`, … (`prefetch` segments of the plan) fetched or on its way;
    /// drops what replay has passed.
    fn prefetch_from(self: &Arc<Self>, s: Segment, plan: &FetchPlan) {
        let mut cache = self.cache.lock().expect("cache lock");
        cache.retain(|k, _| *k >= s);
        let mut next = s;
        for _ in 0..self.prefetch {
            if !plan.required.contains(&next) {
                break;
            }
            if !cache.contains_key(&next) {
                let notify = Arc::new(tokio::sync::Notify::new());
                cache.insert(next, Slot::Pending(notify.clone()));
                let (me, name, sysid, seg) =
                    (self.clone(), next.file_name(self.archive.segment_size), plan.system_identifier, next);
                tokio::spawn(async move {
                    let got = me.archive.fetch(&name, Some(sysid)).await;
                    {
                        let mut cache = me.cache.lock().expect("cache lock");
                        // Only into its own slot: one dropped meanwhile (replay moved on, a new
                        // plan) stays dropped.
                        if let Some(Slot::Pending(n)) = cache.get(&seg)
                            && Arc::ptr_eq(n, &notify)
                        {
                            match got {
                                Ok(Some(bytes)) => cache.insert(seg, Slot::Ready(bytes)),
                                _ => cache.remove(&seg),
                            };
                        }
                    }
                    notify.notify_waiters();
                });
            }
            next = next.next();
        }
    }
}

async fn tip_retrying(
    archive: &Archive,
    s: Segment,
    sysid: u64,
    retry_for: Duration,
) -> Result<Option<(Vec<u8>, u64)>, WalError> {
    let end = tokio::time::Instant::now() + retry_for;
    let mut wait = Duration::from_millis(200);
    loop {
        match super::tip::fetch_segment(archive, s, sysid).await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() + wait < end => {
                warn!("{e}; retrying in {} ms", wait.as_millis());
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            r => return r,
        }
    }
}

async fn fetch_retrying(
    archive: &Archive,
    name: &str,
    sysid: Option<u64>,
    retry_for: Duration,
) -> Result<Option<Vec<u8>>, WalError> {
    let end = tokio::time::Instant::now() + retry_for;
    let mut wait = Duration::from_millis(200);
    loop {
        match archive.fetch(name, sysid).await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() + wait < end => {
                warn!("{e}; retrying in {} ms", wait.as_millis());
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            r => return r,
        }
    }
}

/// Listens on `path` (replacing a stale socket) until `cancel`.
pub async fn serve(server: Arc<WalServer>, path: PathBuf, cancel: CancellationToken) -> Result<(), std::io::Error> {
    let path = path.as_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    // Anyone may connect; the peer's uid decides (root and PostgreSQL's user only).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    info!(socket = %path.display(), "WAL socket listening");
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => { warn!("WAL socket: accept: {e}"); tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            },
        };
        let server = server.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(&server, stream).await {
                warn!("WAL socket: {e}");
            }
        });
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

async fn answer(w: &mut (impl AsyncWriteExt + Unpin), a: &Answer, body: Option<&[u8]>) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(a).expect("an answer serializes");
    line.push(b'\n');
    w.write_all(&line).await?;
    if let Some(b) = body {
        w.write_all(b).await?;
    }
    w.flush().await
}

async fn handle(server: &Arc<WalServer>, stream: UnixStream) -> Result<(), String> {
    let uid = stream.peer_cred().map_err(|e| format!("peer credentials: {e}"))?.uid();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut line).await.map_err(|e| e.to_string())?;
    // Refused after the request line (so the client reads the answer, not a broken pipe), before
    // anything else is read or done.
    if !server.allowed_uids.contains(&uid) {
        let a = Answer { error: format!("uid {uid} may not use the WAL socket"), ..Default::default() };
        let _ = answer(&mut w, &a, None).await;
        return Err(format!("refused a client with uid {uid}"));
    }
    let req: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            let a = Answer { error: format!("not a request: {e}"), ..Default::default() };
            let _ = answer(&mut w, &a, None).await;
            return Err("a malformed request".into());
        }
    };
    match req {
        Request::Push { name, bytes } => {
            let max = server.archive.segment_size.max(super::archive::MAX_TEXT_FILE as u64);
            if bytes > max {
                let a = Answer { error: format!("{bytes} bytes is more than a WAL file holds"), ..Default::default() };
                return answer(&mut w, &a, None).await.map_err(|e| e.to_string());
            }
            // Whatever the push did not read (it refused after the header, it failed) is read
            // and dropped before the answer: the client is still writing, and reads the answer
            // only once it is done.
            let mut body = (&mut r).take(bytes);
            let pushed = server.push_from(&name, bytes, &mut body).await;
            let _ = tokio::io::copy(&mut body, &mut tokio::io::sink()).await;
            let a = match pushed {
                Ok(p) => Answer { ok: true, pushed: Some(p), ..Default::default() },
                Err(e) => Answer { error: e.to_string(), ..Default::default() },
            };
            answer(&mut w, &a, None).await.map_err(|e| e.to_string())
        }
        Request::Fetch { name } => match server.fetch(&name, Duration::from_secs(60)).await {
            Ok(Some(bytes)) => {
                let a = Answer { ok: true, found: true, bytes: bytes.len() as u64, ..Default::default() };
                answer(&mut w, &a, Some(&bytes)).await.map_err(|e| e.to_string())
            }
            Ok(None) => {
                answer(&mut w, &Answer { ok: true, ..Default::default() }, None).await.map_err(|e| e.to_string())
            }
            Err(e) => {
                let a = Answer { error: e.to_string(), ..Default::default() };
                answer(&mut w, &a, None).await.map_err(|e| e.to_string())
            }
        },
    }
}
