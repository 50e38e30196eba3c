//! An IMDSv2 fake that behaves like EC2's instance metadata service with "IMDSv2 required":
//!
//! - `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: 1..=21600` → 200 and a
//!   fresh token; a missing or bad TTL → 400; a PUT carrying `X-Forwarded-For` → 403.
//! - every GET needs `X-aws-ec2-metadata-token` holding a live token, else 401. Tokens expire
//!   after their TTL in real time.
//! - metadata under `/latest/` and any dated version (`/2021-07-15/`, `/YYYY-MM-DD/`, `/1.0/`):
//!   `meta-data/{instance-id,instance-type,ami-id,local-ipv4,hostname,local-hostname,mac,...}`,
//!   `meta-data/placement/{region,availability-zone}`, `meta-data/block-device-mapping/[NAME]`,
//!   `meta-data/services/{domain,partition}`, `dynamic/instance-identity/document`; folders list
//!   their entries one a line. Unknown paths → 404 with the real service's HTML-ish body.
//! - faults steered at run time: a delay on every answer, 500 for the next N requests (or all),
//!   expire all tokens now. Counters in [`ImdsStats`].
//!
//! Control endpoints (no token needed, never delayed or failed), served on the same listener so a
//! fake running inside a container's network namespace can be steered over HTTP:
//! `POST /_fake/delay?ms=N`, `POST /_fake/fail?count=N|all`, `POST /_fake/clear`,
//! `POST /_fake/expire-tokens`, `GET /_fake/stats` (JSON [`ImdsStats`]).
//!
//! In process: [`FakeImds::start`] (its own thread and tokio runtime, so it works from plain
//! `#[test]`s and from `#[tokio::test]`s alike). As a process: the `imds-fake` binary.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

/// The longest token TTL the real service accepts (6 hours).
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21600;
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

/// What the fake instance looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsConfig {
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
    pub instance_type: String,
    pub account_id: String,
    pub image_id: String,
    /// Served as `meta-data/local-ipv4` and `privateIp`; the hostnames derive from it.
    pub local_ipv4: String,
    /// `meta-data/block-device-mapping/NAME` → device, e.g. `("ebs1", "sdf")`.
    pub block_devices: Vec<(String, String)>,
}

impl Default for ImdsConfig {
    /// A plausible Graviton box in eu-west-1.
    fn default() -> Self {
        ImdsConfig {
            instance_id: "i-0123456789abcdef0".into(),
            region: "eu-west-1".into(),
            availability_zone: "eu-west-1a".into(),
            instance_type: "m7g.medium".into(),
            account_id: "123456789012".into(),
            image_id: "ami-0abcdef1234567890".into(),
            local_ipv4: "10.0.1.23".into(),
            block_devices: vec![
                ("ami".into(), "/dev/xvda".into()),
                ("root".into(), "/dev/xvda".into()),
                ("ebs1".into(), "sdf".into()),
            ],
        }
    }
}

impl ImdsConfig {
    /// `arm64` for Graviton families (a `g` after the generation digit: m7g, c6gn, t4g, x2gd),
    /// else `x86_64`.
    pub fn architecture(&self) -> &'static str {
        let family = self.instance_type.split('.').next().unwrap_or("");
        let after_digit = family.trim_start_matches(|c: char| c.is_ascii_alphabetic());
        let suffix = after_digit.trim_start_matches(|c: char| c.is_ascii_digit());
        if suffix.contains('g') { "arm64" } else { "x86_64" }
    }

    /// `dynamic/instance-identity/document`, formatted the way the real service formats it.
    pub fn identity_document(&self) -> String {
        let s = |v: &str| serde_json::Value::String(v.to_string()).to_string();
        let fields: Vec<(&str, String)> = vec![
            ("accountId", s(&self.account_id)),
            ("architecture", s(self.architecture())),
            ("availabilityZone", s(&self.availability_zone)),
            ("billingProducts", "null".into()),
            ("devpayProductCodes", "null".into()),
            ("marketplaceProductCodes", "null".into()),
            ("imageId", s(&self.image_id)),
            ("instanceId", s(&self.instance_id)),
            ("instanceType", s(&self.instance_type)),
            ("kernelId", "null".into()),
            ("pendingTime", s("2024-05-01T09:00:00Z")),
            ("privateIp", s(&self.local_ipv4)),
            ("ramdiskId", "null".into()),
            ("region", s(&self.region)),
            ("version", s("2017-09-30")),
        ];
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("  \"{k}\" : {v}")).collect();
        format!("{{\n{}\n}}", body.join(",\n"))
    }

    fn hostname(&self) -> String {
        let ip = self.local_ipv4.replace('.', "-");
        if self.region == "us-east-1" {
            format!("ip-{ip}.ec2.internal")
        } else {
            format!("ip-{ip}.{}.compute.internal", self.region)
        }
    }

    /// Every leaf under a version root, as (relative path, body).
    fn leaves(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = vec![
            ("meta-data/ami-id".into(), self.image_id.clone()),
            ("meta-data/ami-launch-index".into(), "0".into()),
            ("meta-data/hostname".into(), self.hostname()),
            ("meta-data/instance-id".into(), self.instance_id.clone()),
            ("meta-data/instance-type".into(), self.instance_type.clone()),
            ("meta-data/local-hostname".into(), self.hostname()),
            ("meta-data/local-ipv4".into(), self.local_ipv4.clone()),
            ("meta-data/mac".into(), "06:12:34:56:78:9a".into()),
            ("meta-data/placement/availability-zone".into(), self.availability_zone.clone()),
            ("meta-data/placement/region".into(), self.region.clone()),
            ("meta-data/services/domain".into(), "amazonaws.com".into()),
            ("meta-data/services/partition".into(), "aws".into()),
            ("dynamic/instance-identity/document".into(), self.identity_document()),
        ];
        for (name, dev) in &self.block_devices {
            v.push((format!("meta-data/block-device-mapping/{name}"), dev.clone()));
        }
        v
    }
}

/// Counters since start (or since the last [`ImdsControl::reset_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImdsStats {
    /// Tokens handed out (PUT /latest/api/token → 200).
    pub token_puts: u64,
    /// Token PUTs refused: bad or missing TTL (400), `X-Forwarded-For` (403).
    pub token_puts_rejected: u64,
    /// GETs answered 200.
    pub gets_ok: u64,
    /// GETs with a live token for a path that does not exist (404).
    pub gets_not_found: u64,
    /// GETs without a token header (401).
    pub gets_without_token: u64,
    /// GETs with an unknown or expired token (401).
    pub gets_bad_token: u64,
    /// Requests answered 500 by the injected fault.
    pub served_500: u64,
}

#[derive(Debug, Default)]
struct State {
    tokens: HashMap<String, Instant>,
    delay: Duration,
    /// `u32::MAX` = fail until cleared.
    fail_remaining: u32,
    stats: ImdsStats,
}

struct Inner {
    config: ImdsConfig,
    leaves: HashMap<String, String>,
    state: Mutex<State>,
}

/// A cloneable handle on the fake's state: faults and stats. [`FakeImds`] derefs to this.
#[derive(Clone)]
pub struct ImdsControl {
    inner: Arc<Inner>,
}

impl ImdsControl {
    pub fn new(config: ImdsConfig) -> ImdsControl {
        let leaves = config.leaves().into_iter().collect();
        ImdsControl { inner: Arc::new(Inner { config, leaves, state: Mutex::new(State::default()) }) }
    }

    pub fn config(&self) -> &ImdsConfig {
        &self.inner.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delay every answer (not the control endpoints) by `d`. `Duration::ZERO` turns it off.
    pub fn set_delay(&self, d: Duration) {
        self.state().delay = d;
    }

    /// Answer 500 to the next `n` requests; `u32::MAX` = every request until [`Self::clear_faults`].
    pub fn fail_next(&self, n: u32) {
        self.state().fail_remaining = n;
    }

    /// No delay, no 500s.
    pub fn clear_faults(&self) {
        let mut s = self.state();
        s.delay = Duration::ZERO;
        s.fail_remaining = 0;
    }

    /// Every token handed out so far stops working now.
    pub fn expire_tokens(&self) {
        self.state().tokens.clear();
    }

    pub fn stats(&self) -> ImdsStats {
        self.state().stats.clone()
    }

    pub fn reset_stats(&self) {
        self.state().stats = ImdsStats::default();
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if let Some(cmd) = path.strip_prefix("/_fake/") {
            return self.control_endpoint(req.method(), cmd, req.uri().query().unwrap_or(""));
        }

        let delay = self.state().delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        {
            let mut s = self.state();
            if s.fail_remaining > 0 {
                if s.fail_remaining != u32::MAX {
                    s.fail_remaining -= 1;
                }
                s.stats.served_500 += 1;
                return error_page(StatusCode::INTERNAL_SERVER_ERROR);
            }
        }

        let method = req.method().clone();
        if path == "/latest/api/token" && method == Method::PUT {
            return self.put_token(&req);
        }
        if method != Method::GET && method != Method::HEAD {
            let mut r = error_page(StatusCode::METHOD_NOT_ALLOWED);
            r.headers_mut().insert("allow", "GET, HEAD".parse().expect("static header"));
            return r;
        }

        let remaining = {
            let mut s = self.state();
            let now = Instant::now();
            s.tokens.retain(|_, exp| *exp > now);
            match req.headers().get(TOKEN_HEADER) {
                None => {
                    s.stats.gets_without_token += 1;
                    return error_page(StatusCode::UNAUTHORIZED);
                }
                Some(tok) => match tok.to_str().ok().and_then(|t| s.tokens.get(t.trim()).copied()) {
                    Some(exp) => exp.saturating_duration_since(now),
                    None => {
                        s.stats.gets_bad_token += 1;
                        return error_page(StatusCode::UNAUTHORIZED);
                    }
                },
            }
        };

        match self.lookup(&path) {
            Some(body) => {
                self.state().stats.gets_ok += 1;
                let mut r = text(StatusCode::OK, body);
                r.headers_mut()
                    .insert(TTL_HEADER, remaining.as_secs().to_string().parse().expect("digits are a valid header"));
                r
            }
            None => {
                self.state().stats.gets_not_found += 1;
                error_page(StatusCode::NOT_FOUND)
            }
        }
    }

    fn put_token(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let reject = |status| {
            self.state().stats.token_puts_rejected += 1;
            error_page(status)
        };
        if req.headers().contains_key("x-forwarded-for") {
            return reject(StatusCode::FORBIDDEN);
        }
        let ttl = req
            .headers()
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|t| (1..=MAX_TOKEN_TTL_SECONDS).contains(t));
        let Some(ttl) = ttl else {
            return reject(StatusCode::BAD_REQUEST);
        };
        let token = new_token();
        {
            let mut s = self.state();
            s.tokens.insert(token.clone(), Instant::now() + Duration::from_secs(ttl.into()));
            s.stats.token_puts += 1;
        }
        let mut r = text(StatusCode::OK, token);
        r.headers_mut().insert(TTL_HEADER, ttl.to_string().parse().expect("digits are a valid header"));
        r
    }

    /// The body for a metadata path, if it exists.
    fn lookup(&self, path: &str) -> Option<String> {
        let path = path.strip_prefix('/')?;
        if path.is_empty() {
            return Some(["1.0", "2021-01-03", "2021-07-15", "latest"].join("\n"));
        }
        let (version, rel) = path.split_once('/').unwrap_or((path, ""));
        if !is_version(version) {
            return None;
        }
        if let Some(body) = self.inner.leaves.get(rel) {
            return Some(body.clone());
        }
        // A folder: list its entries, sub-folders with a trailing slash.
        let dir = rel.trim_end_matches('/');
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        let entries: BTreeSet<String> = self
            .inner
            .leaves
            .keys()
            .filter_map(|k| k.strip_prefix(prefix.as_str()))
            .map(|rest| match rest.split_once('/') {
                Some((first, _)) => format!("{first}/"),
                None => rest.to_string(),
            })
            .collect();
        if entries.is_empty() { None } else { Some(entries.into_iter().collect::<Vec<_>>().join("\n")) }
    }

    fn control_endpoint(&self, method: &Method, cmd: &str, query: &str) -> Response<Full<Bytes>> {
        let param = |name: &str| {
            query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let bad = |msg: &str| text(StatusCode::BAD_REQUEST, format!("{msg}\n"));
        let ok = || text(StatusCode::OK, "ok\n".to_string());
        match (method.as_str(), cmd) {
            ("GET", "stats") => {
                let mut r = text(StatusCode::OK, serde_json::to_string(&self.stats()).expect("stats serialize"));
                r.headers_mut().insert("content-type", "application/json".parse().expect("static header"));
                r
            }
            ("POST", "delay") => match param("ms").and_then(|v| v.parse::<u64>().ok()) {
                Some(ms) => {
                    self.set_delay(Duration::from_millis(ms));
                    ok()
                }
                None => bad("want ?ms=N"),
            },
            ("POST", "fail") => match param("count").as_deref() {
                Some("all") => {
                    self.fail_next(u32::MAX);
                    ok()
                }
                Some(n) => match n.parse::<u32>() {
                    Ok(n) => {
                        self.fail_next(n);
                        ok()
                    }
                    Err(_) => bad("want ?count=N or ?count=all"),
                },
                None => bad("want ?count=N or ?count=all"),
            },
            ("POST", "clear") => {
                self.clear_faults();
                ok()
            }
            ("POST", "expire-tokens") => {
                self.expire_tokens();
                ok()
            }
            ("POST", "reset-stats") => {
                self.reset_stats();
                ok()
            }
            _ => text(StatusCode::NOT_FOUND, "unknown control endpoint\n".to_string()),
        }
    }
}

fn is_version(v: &str) -> bool {
    if v == "latest" || v == "1.0" {
        return true;
    }
    let b = v.as_bytes();
    b.len() == 10 && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert("content-type", "text/plain".parse().expect("static header"));
    h.insert("server", "EC2ws".parse().expect("static header"));
    r
}

/// The real service's error body.
fn error_page(status: StatusCode) -> Response<Full<Bytes>> {
    let title = format!("{} - {}", status.as_u16(), status.canonical_reason().unwrap_or("Error"));
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n\
         <!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\
         \t\"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
         <html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n \
         <head>\n  <title>{title}</title>\n </head>\n <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    );
    let mut r = text(status, body);
    r.headers_mut().insert("content-type", "text/html".parse().expect("static header"));
    r
}

/// 56 characters of base64, like the real tokens; unpredictable enough for a fake.
fn new_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut bytes = Vec::with_capacity(42);
    for i in 0..6u64 {
        let mut h = std::hash::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u64(i);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        bytes.extend_from_slice(&h.finish().to_le_bytes());
    }
    bytes.truncate(42);
    base64(&bytes)
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Serve the fake on `listener` until `shutdown` completes. Connections still open then are dropped
/// with the runtime.
pub async fn serve(
    listener: tokio::net::TcpListener,
    control: ImdsControl,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off rather than spin.
                    eprintln!("imds fake: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let control = control.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let control = control.clone();
                async move { Ok::<_, Infallible>(control.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The fake running in this process, on its own thread and runtime, bound to 127.0.0.1:0.
/// Stops on drop. Derefs to [`ImdsControl`] for faults and stats.
pub struct FakeImds {
    control: ImdsControl,
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeImds {
    pub fn start(config: ImdsConfig) -> anyhow::Result<FakeImds> {
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("binding 127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let control = ImdsControl::new(config);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let ctl = control.clone();
        let thread = std::thread::Builder::new().name(format!("imds-fake-{}", addr.port())).spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return eprintln!("imds fake: {e}"),
                };
                let _ = serve(listener, ctl, async {
                    let _ = rx.await;
                })
                .await;
            });
        })?;
        Ok(FakeImds { control, addr, shutdown: Some(tx), thread: Some(thread) })
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that outlives borrows of `self` (e.g. to move into a task).
    pub fn control(&self) -> ImdsControl {
        self.control.clone()
    }
}

impl std::ops::Deref for FakeImds {
    type Target = ImdsControl;
    fn deref(&self) -> &ImdsControl {
        &self.control
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architecture_and_base64() {
        let mut c = ImdsConfig::default();
        assert_eq!(c.architecture(), "arm64");
        for (t, a) in [("c6gn.large", "arm64"), ("t4g.nano", "arm64"), ("g5.xlarge", "x86_64"), ("m6i.large", "x86_64")]
        {
            c.instance_type = t.into();
            assert_eq!(c.architecture(), a, "{t}");
        }
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(new_token().len(), 56);
        assert_ne!(new_token(), new_token());
    }

    #[test]
    fn versions() {
        assert!(is_version("latest") && is_version("2021-07-15") && is_version("1.0"));
        assert!(!is_version("2021-7-15") && !is_version("meta-data"));
    }
}
