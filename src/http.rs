//! A small HTTP/1.1 client for plain-http endpoints on the box: IMDS (169.254.169.254) and health
//! probes on loopback. AWS APIs go through the SDKs, not this.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Bodies larger than this are cut off (IMDS documents and health answers are small).
pub const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{method} {url}: {reason}")]
    Transport { method: Method, url: String, reason: String },
    #[error("{method} {url}: no answer within {timeout:?}")]
    Timeout { method: Method, url: String, timeout: Duration },
    #[error("{method} {url}: invalid request: {reason}")]
    Invalid { method: Method, url: String, reason: String },
}

/// An answer: status and a (bounded) body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Response {
    /// The body as text, cut to `max` characters (for error messages and logs).
    pub fn body_excerpt(&self, max: usize) -> String {
        let s = String::from_utf8_lossy(&self.body);
        let s = s.trim();
        if s.chars().count() > max { format!("{}…", s.chars().take(max).collect::<String>()) } else { s.to_string() }
    }
}

/// A pooled client (cheap to clone).
#[derive(Clone)]
pub struct Client {
    inner: HyperClient<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("http::Client")
    }
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        let inner = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(2)
            .build(connector);
        Client { inner }
    }

    /// Sends one request and reads the whole answer, all within `timeout`.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let invalid = |reason: String| HttpError::Invalid { method: method.clone(), url: url.to_string(), reason };
        let mut builder = Request::builder().method(method.clone()).uri(url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let request = builder.body(Full::new(Bytes::new())).map_err(|e| invalid(e.to_string()))?;
        let work = async {
            let response = self.inner.request(request).await.map_err(|e| HttpError::Transport {
                method: method.clone(),
                url: url.to_string(),
                reason: error_chain(&e),
            })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY).collect().await.map_err(|e| {
                HttpError::Transport { method: method.clone(), url: url.to_string(), reason: e.to_string() }
            })?;
            Ok(Response { status, body: body.to_bytes() })
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(HttpError::Timeout { method, url: url.to_string(), timeout }),
        }
    }
}

/// "a: b: c" from an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
