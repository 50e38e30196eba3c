//! Free TCP ports on loopback, waiting for a listener, a tiny blocking HTTP/1.1 client, and
//! running a closure inside another process's network namespace.
//!
//! The HTTP client is deliberately small (one request per connection, `Connection: close`): it is
//! meant for talking to the fakes in this crate and to moto from plain `#[test]`s. It is blocking;
//! from a `#[tokio::test]` call it via `tokio::task::spawn_blocking` if the runtime must stay free.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr of a bound listener").port()
}

/// Wait until something accepts TCP connections at `addr`, polling every 50 ms, for at most `timeout`.
pub fn wait_for_tcp(addr: impl ToSocketAddrs, timeout: Duration) -> anyhow::Result<()> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs().context("resolving the address to wait for")?.collect();
    if addrs.is_empty() {
        bail!("the address to wait for resolved to nothing");
    }
    let deadline = Instant::now() + timeout;
    loop {
        for a in &addrs {
            if TcpStream::connect_timeout(a, Duration::from_millis(500)).is_ok() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("nothing accepted TCP connections at {addrs:?} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run `f` on a fresh thread that has joined the network namespace of process `pid`
/// (`/proc/PID/ns/net`), and return its result. Sockets made inside `f` live in that namespace.
/// Needs CAP_SYS_ADMIN (root). The namespace of the calling thread is untouched.
pub fn in_netns<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::spawn(move || -> anyhow::Result<T> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into the network namespace of PID {pid}"))?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread running inside the network namespace of PID {pid} panicked"))?
}

/// An HTTP response read by [`http`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One blocking HTTP/1.1 request to `url` (`http://HOST:PORT/PATH?QUERY` only, no TLS).
/// Connect, read and write time out after 30 s. A `Content-Length` is added for any body on
/// methods other than GET/HEAD, and for an empty body on POST/PUT.
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> anyhow::Result<HttpResponse> {
    let rest = url.strip_prefix("http://").with_context(|| format!("only http:// URLs are supported: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority_with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = authority_with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {authority}"))?
        .next()
        .with_context(|| format!("{authority} resolved to nothing"))?;
    let timeout = Duration::from_secs(30);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;

    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    let has_length = headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-length"));
    if !has_length && (!body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH")) {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).with_context(|| format!("sending {method} {url}"))?;
    stream.write_all(body).with_context(|| format!("sending the body of {method} {url}"))?;
    stream.flush()?;

    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).with_context(|| format!("reading the answer to {method} {url}"))?;
    parse_response(&raw, method == "HEAD").with_context(|| format!("parsing the answer to {method} {url}"))
}

/// `GET url` with no extra headers.
pub fn http_get(url: &str) -> anyhow::Result<HttpResponse> {
    http("GET", url, &[], b"")
}

fn parse_response(raw: &[u8], head: bool) -> anyhow::Result<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers in the response")?;
    let head_text = std::str::from_utf8(&raw[..end]).context("response headers are not UTF-8")?;
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().context("empty response")?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let length = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse::<usize>().ok());
    let body = if head {
        Vec::new()
    } else if chunked {
        dechunk(rest)?
    } else if let Some(len) = length {
        if rest.len() < len {
            bail!("body cut short: {} of {len} bytes", rest.len());
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { status, headers, body })
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").context("chunk size line not terminated")?;
        let size_text = std::str::from_utf8(&data[..line_end])?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).with_context(|| format!("bad chunk size {size_text:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("chunk cut short");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_and_sized() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(r.body, b"abcde");
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nnoXX", false).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"no"[..]));
    }
}
