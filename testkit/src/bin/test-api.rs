//! A small stand-in for the Zmanim HTTP API, for tests and the demo.
//!
//! - Listens on an inherited socket (systemd socket activation: `LISTEN_PID` = own PID,
//!   `LISTEN_FDS` >= 1, fd 3), else `--listen ADDR`, else `$TEST_API_LISTEN`, else 127.0.0.1:8080.
//!   Prints `listening on ADDR`; sends `READY=1` to `$NOTIFY_SOCKET` when set.
//! - `GET /health` → 200 `{"status":"ok","version":"<VERSION>"}`; `GET /api/ping` → 200 `pong`;
//!   anything else 404.
//! - VERSION: `--version-label X`, else `$TEST_API_VERSION`, else a trailer appended to the
//!   executable (last lines of the file: `\nTEST_API_VERSION=<label>\n`), else `dev`.
//!   So `cp test-api v2 && printf '\nTEST_API_VERSION=v2\n' >> v2` makes a distinct release.
//! - Unhealthy: `--fail-health`, `TEST_API_FAIL_HEALTH=1` (env or trailer line) → /health is 500
//!   for ever; while `$TEST_API_CONTROL_DIR/unhealthy` exists (default dir /run/test-api) → 500.
//!   `TEST_API_EXIT_AFTER_MS=N` (env or trailer) → exits 1 after N ms.
//! - `GET /api/zmanim?id=N` (only when `$TEST_API_DATABASE_URL` is set, a libpq-style URL or
//!   key=value string): one indexed query on bench/lib/pgbox.sh's Zmanim-like schema — the 30
//!   zmanim rows from id N joined with their cities — answered as JSON, over a pool of
//!   `$TEST_API_DB_POOL` connections (default 4), connected lazily and reconnected after an error.
//!   A database error is a 503 naming it: what a real API's load balancer would count.
//! - Exits 0 on SIGTERM (and SIGINT).

use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};

const USAGE: &str = "usage: test-api [--listen ADDR] [--version-label X] [--fail-health]";

struct Settings {
    version: String,
    fail_health: bool,
    control_dir: PathBuf,
    db: Option<Db>,
}

/// A small pool: connection `i` serves every request whose turn lands on it (round robin);
/// tokio-postgres pipelines the queries that share a connection.
struct Db {
    url: String,
    conns: Vec<tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>>,
    next: std::sync::atomic::AtomicUsize,
}

const ZMANIM_QUERY: &str = "select z.id, c.name, z.day::text, z.sunrise::text, z.sunset::text, z.note \
     from zmanim z join cities c on c.id = z.city where z.id >= $1 and z.id < $1 + 30 order by z.id";

impl Db {
    async fn client(&self) -> anyhow::Result<(usize, Arc<tokio_postgres::Client>)> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.conns.len();
        let mut slot = self.conns[i].lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok((i, c.clone()));
        }
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.context("connecting")?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("test-api: database connection: {e}");
            }
        });
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok((i, client))
    }

    async fn zmanim(&self, from: i64) -> anyhow::Result<String> {
        let (i, client) = self.client().await?;
        let rows = match client.query(ZMANIM_QUERY, &[&from]).await {
            Ok(rows) => rows,
            Err(e) => {
                *self.conns[i].lock().await = None;
                return Err(e.into());
            }
        };
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.get::<_, i64>(0), "city": r.get::<_, String>(1), "day": r.get::<_, String>(2),
                    "sunrise": r.get::<_, Option<String>>(3), "sunset": r.get::<_, Option<String>>(4),
                    "note": r.get::<_, Option<String>>(5),
                })
            })
            .collect();
        Ok(serde_json::json!({ "zmanim": rows }).to_string())
    }
}

/// `KEY=VALUE` lines at the very end of `buf` (after its last non-matching line), in file order.
/// Keys are `TEST_API_[A-Z0-9_]+`, values printable ASCII without spaces.
fn parse_trailer(buf: &[u8]) -> Vec<(String, String)> {
    let Some(body) = buf.strip_suffix(b"\n") else { return Vec::new() };
    let mut out = Vec::new();
    let mut segments = body.rsplit(|b| *b == b'\n').peekable();
    while let Some(line) = segments.next() {
        if segments.peek().is_none() {
            // The first segment has no newline before it: the end of the binary, not a trailer.
            break;
        }
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = std::str::from_utf8(line).ok().and_then(|l| l.split_once('=')) else { break };
        let key_ok = key.strip_prefix("TEST_API_").is_some_and(|k| {
            !k.is_empty() && k.bytes().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
        });
        let value_ok = !value.is_empty() && value.bytes().all(|c| c.is_ascii_graphic());
        if !(key_ok && value_ok) {
            break;
        }
        out.push((key.to_string(), value.to_string()));
    }
    out.reverse();
    out
}

fn read_trailer() -> Vec<(String, String)> {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open("/proc/self/exe")?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(8192)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(buf)
    };
    read().map(|b| parse_trailer(&b)).unwrap_or_default()
}

fn truthy(v: &str) -> bool {
    matches!(v.trim(), "1" | "true" | "yes" | "on")
}

fn listener() -> anyhow::Result<std::net::TcpListener> {
    let activated = std::env::var("LISTEN_PID").ok().and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id())
        && std::env::var("LISTEN_FDS").ok().and_then(|n| n.trim().parse::<u32>().ok()).is_some_and(|n| n >= 1);
    if activated {
        use std::os::fd::FromRawFd;
        // SAFETY: systemd's protocol hands us fd 3 as an open listening socket we now own.
        let l = unsafe { std::net::TcpListener::from_raw_fd(3) };
        l.local_addr().context("fd 3 from socket activation is not a TCP socket")?;
        return Ok(l);
    }
    let mut listen = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--listen" {
            listen = args.next();
        } else if let Some(v) = a.strip_prefix("--listen=") {
            listen = Some(v.to_string());
        }
    }
    let addr = listen.or_else(|| std::env::var("TEST_API_LISTEN").ok()).unwrap_or_else(|| "127.0.0.1:8080".to_string());
    std::net::TcpListener::bind(&addr).with_context(|| format!("binding {addr}"))
}

fn settings() -> anyhow::Result<Settings> {
    let trailer = read_trailer();
    let from_trailer = |key: &str| trailer.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let mut version = None;
    let mut fail_health = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--version-label" => version = Some(args.next().context("--version-label needs a value")?),
            "--fail-health" => fail_health = true,
            "--listen" => {
                args.next();
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ if a.starts_with("--listen=") => {}
            _ if a.starts_with("--version-label=") => version = Some(a["--version-label=".len()..].to_string()),
            _ => bail!("unknown argument {a:?}\n{USAGE}"),
        }
    }
    let version = version
        .or_else(|| std::env::var("TEST_API_VERSION").ok().filter(|v| !v.is_empty()))
        .or_else(|| from_trailer("TEST_API_VERSION"))
        .unwrap_or_else(|| "dev".to_string());
    fail_health = fail_health
        || std::env::var("TEST_API_FAIL_HEALTH").is_ok_and(|v| truthy(&v))
        || from_trailer("TEST_API_FAIL_HEALTH").is_some_and(|v| truthy(&v));
    if let Some(ms) = std::env::var("TEST_API_EXIT_AFTER_MS").ok().or_else(|| from_trailer("TEST_API_EXIT_AFTER_MS")) {
        let ms: u64 = ms.trim().parse().with_context(|| format!("TEST_API_EXIT_AFTER_MS={ms:?} is not a number"))?;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            eprintln!("test-api: exiting after {ms} ms as TEST_API_EXIT_AFTER_MS asks");
            std::process::exit(1);
        });
    }
    let control_dir = std::env::var_os("TEST_API_CONTROL_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/test-api"));
    let db = match std::env::var("TEST_API_DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        None => None,
        Some(url) => {
            let pool = std::env::var("TEST_API_DB_POOL").unwrap_or_else(|_| "4".to_string());
            let pool: usize = pool
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=64).contains(n))
                .with_context(|| format!("TEST_API_DB_POOL={pool:?} is not a number from 1 to 64"))?;
            let conns = (0..pool).map(|_| tokio::sync::Mutex::new(None)).collect();
            Some(Db { url, conns, next: Default::default() })
        }
    };
    Ok(Settings { version, fail_health, control_dir, db })
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static(content_type));
    r
}

fn handle(req: &Request<hyper::body::Incoming>, s: &Settings) -> Response<Full<Bytes>> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match req.uri().path() {
        "/health" if get => {
            let healthy = !s.fail_health && !s.control_dir.join("unhealthy").exists();
            let (status, word) =
                if healthy { (StatusCode::OK, "ok") } else { (StatusCode::INTERNAL_SERVER_ERROR, "unhealthy") };
            let body = serde_json::json!({ "status": word, "version": s.version }).to_string();
            respond(status, "application/json", body)
        }
        "/api/ping" if get => respond(StatusCode::OK, "text/plain", "pong".to_string()),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
    }
}

async fn zmanim(db: &Db, query: Option<&str>) -> Response<Full<Bytes>> {
    let from = query.unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("id=")).and_then(|v| v.parse::<i64>().ok());
    let Some(from) = from else {
        return respond(StatusCode::BAD_REQUEST, "text/plain", "want ?id=N (a number)\n".to_string());
    };
    match db.zmanim(from).await {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("database: {e:#}\n")),
    }
}

fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let send = || -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(b"READY=1", &addr)?;
        } else {
            sock.send_to(b"READY=1", &path)?;
        }
        Ok(())
    };
    if let Err(e) = send() {
        eprintln!("test-api: telling systemd READY=1: {e}");
    }
}

fn main() -> anyhow::Result<()> {
    let settings = Arc::new(settings()?);
    let std_listener = listener()?;
    std_listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut out = std::io::stdout();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        eprintln!("test-api: version {}", settings.version);
        out.flush()?;
        notify_ready();
        loop {
            let (stream, _) = tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("test-api: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let settings = settings.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let settings = settings.clone();
                    async move {
                        if req.uri().path() == "/api/zmanim"
                            && let Some(db) = settings.db.as_ref()
                        {
                            return Ok::<_, Infallible>(zmanim(db, req.uri().query()).await);
                        }
                        Ok::<_, Infallible>(handle(&req, &settings))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::parse_trailer;

    #[test]
    fn trailer() {
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        assert_eq!(parse_trailer(b"\x7fELF\x00junk\nTEST_API_VERSION=v2\n"), vec![kv("TEST_API_VERSION", "v2")]);
        assert_eq!(
            parse_trailer(b"junk\nTEST_API_VERSION=v2\n\nTEST_API_FAIL_HEALTH=1\n"),
            vec![kv("TEST_API_VERSION", "v2"), kv("TEST_API_FAIL_HEALTH", "1")]
        );
        assert!(parse_trailer(b"TEST_API_VERSION=v2\n").is_empty());
        assert!(parse_trailer(b"junk\nTEST_API_VERSION=v2").is_empty());
        assert!(parse_trailer(b"junk\nTEST_API_VERSION=has space\n").is_empty());
    }
}
