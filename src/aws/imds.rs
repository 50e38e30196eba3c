//! IMDSv2 client. A session token is PUT first and sent with every read; it is cached and renewed
//! before it expires, and a 401 (the token was revoked or expired early) gets one fresh token and
//! one retry. There is deliberately no IMDSv1 fallback: a box whose IMDS refuses tokens is
//! misconfigured and we say so. Every operation retries transient failures (connection refused,
//! timeouts, 5xx — IMDS can lag early in boot) with Fibonacci backoff, all bounded by one overall
//! deadline fixed when the client is made. 404 means "absent" and is not an error.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::debug;

use crate::http::{self, HttpError};

/// The only path that hands out tokens.
pub const TOKEN_PATH: &str = "/latest/api/token";
/// Reads use a pinned metadata schema version, so AWS changing `latest` cannot change our answers.
pub const SCHEMA: &str = "2021-07-15";
const TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// Renew a cached token when less than this is left of it.
const RENEW_MARGIN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    #[error("IMDS {method} {path} answered {status}: {body}")]
    Response { method: Method, path: String, status: u16, body: String },
    #[error(
        "IMDS gave no usable answer for {path} within {deadline:?} (last problem: {last}); is the instance metadata service enabled with a hop limit that reaches this process?"
    )]
    Deadline { path: String, deadline: Duration, last: String },
    #[error("IMDS {path}: unexpected answer: {reason}")]
    BadAnswer { path: String, reason: String },
    #[error("IMDS {path}: not present on this instance")]
    Missing { path: String },
}

/// What one attempt at a request came to.
enum Attempt {
    Done(Option<String>),
    /// Try again after a backoff.
    Retry(String),
    /// Try again at once (new token after a 401).
    RetryNow(String),
    Fatal(ImdsError),
}

struct Token {
    value: String,
    expires: Instant,
}

pub struct ImdsClient {
    base: String,
    http: http::Client,
    token: Mutex<Option<Token>>,
    token_ttl: Duration,
    attempt_timeout: Duration,
    deadline: Instant,
    deadline_len: Duration,
}

impl ImdsClient {
    /// `base` is e.g. `http://169.254.169.254`; all work of this client must finish within `deadline`.
    pub fn new(base: &str, deadline: Duration) -> Self {
        ImdsClient {
            base: base.trim_end_matches('/').to_string(),
            http: http::Client::new(),
            token: Mutex::new(None),
            token_ttl: Duration::from_secs(21600),
            attempt_timeout: Duration::from_secs(2),
            deadline: Instant::now() + deadline,
            deadline_len: deadline,
        }
    }

    /// Token lifetime to ask for (1 s – 6 h).
    pub fn with_token_ttl(mut self, ttl: Duration) -> Self {
        self.token_ttl = ttl.clamp(Duration::from_secs(1), Duration::from_secs(21600));
        self
    }

    pub fn with_attempt_timeout(mut self, t: Duration) -> Self {
        self.attempt_timeout = t;
        self
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Reads `path` (relative to the pinned schema, e.g. `meta-data/instance-id`). `None` when IMDS
    /// says 404.
    pub async fn get(&self, path: &str) -> Result<Option<String>, ImdsError> {
        let mut backoff = (Duration::from_millis(250), Duration::from_millis(250));
        let mut renewed = false;
        loop {
            let last = match self.attempt(path, &mut renewed).await {
                Attempt::Done(v) => return Ok(v),
                Attempt::Fatal(e) => return Err(e),
                Attempt::RetryNow(reason) => {
                    debug!(path, "IMDS: {reason}; retrying with a new token");
                    if self.remaining().is_zero() {
                        reason
                    } else {
                        continue;
                    }
                }
                Attempt::Retry(reason) => reason,
            };
            let delay = backoff.0;
            if self.remaining() <= delay {
                return Err(ImdsError::Deadline { path: path.to_string(), deadline: self.deadline_len, last });
            }
            debug!(path, delay_ms = delay.as_millis() as u64, "IMDS: {last}; retrying");
            tokio::time::sleep(delay).await;
            backoff = (backoff.1, (backoff.0 + backoff.1).min(Duration::from_secs(5)));
        }
    }

    /// Like [`get`](Self::get), but absence is an error.
    pub async fn get_required(&self, path: &str) -> Result<String, ImdsError> {
        self.get(path).await?.ok_or_else(|| ImdsError::Missing { path: path.to_string() })
    }

    async fn attempt(&self, path: &str, renewed: &mut bool) -> Attempt {
        let timeout = self.attempt_timeout.min(self.remaining()).max(Duration::from_millis(1));
        let token = match self.token(timeout).await {
            Ok(t) => t,
            Err(a) => return a,
        };
        let url = format!("{}/{SCHEMA}/{path}", self.base);
        let response = match self.http.send(Method::GET, &url, &[(TOKEN_HEADER, &token)], timeout).await {
            Ok(r) => r,
            Err(e) => return Attempt::Retry(transport_reason(&e)),
        };
        match response.status {
            StatusCode::OK => match String::from_utf8(response.body.to_vec()) {
                Ok(s) => Attempt::Done(Some(s)),
                Err(_) => Attempt::Fatal(ImdsError::BadAnswer { path: path.into(), reason: "not UTF-8".into() }),
            },
            StatusCode::NOT_FOUND => Attempt::Done(None),
            StatusCode::UNAUTHORIZED => {
                *self.token.lock().await = None;
                if *renewed {
                    Attempt::Fatal(ImdsError::Response {
                        method: Method::GET,
                        path: path.into(),
                        status: 401,
                        body: "token refused twice in a row".into(),
                    })
                } else {
                    *renewed = true;
                    Attempt::RetryNow("token refused (401)".into())
                }
            }
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Attempt::Retry(format!("GET {path} answered {}", s.as_u16()))
            }
            s => Attempt::Fatal(ImdsError::Response {
                method: Method::GET,
                path: path.into(),
                status: s.as_u16(),
                body: response.body_excerpt(200),
            }),
        }
    }

    /// A valid token: the cached one, or a fresh one.
    async fn token(&self, timeout: Duration) -> Result<String, Attempt> {
        let mut guard = self.token.lock().await;
        if let Some(t) = guard.as_ref()
            && t.expires > Instant::now() + RENEW_MARGIN.min(self.token_ttl / 2)
        {
            return Ok(t.value.clone());
        }
        let url = format!("{}{TOKEN_PATH}", self.base);
        let ttl = self.token_ttl.as_secs().to_string();
        let asked = Instant::now();
        let response = self
            .http
            .send(Method::PUT, &url, &[(TTL_HEADER, &ttl)], timeout)
            .await
            .map_err(|e| Attempt::Retry(format!("token: {}", transport_reason(&e))))?;
        match response.status {
            StatusCode::OK => {
                let value = String::from_utf8_lossy(&response.body).trim().to_string();
                if value.is_empty() || value.len() > 4096 || value.contains(['\r', '\n']) {
                    return Err(Attempt::Fatal(ImdsError::BadAnswer {
                        path: TOKEN_PATH.into(),
                        reason: "the token is empty or malformed".into(),
                    }));
                }
                *guard = Some(Token { value: value.clone(), expires: asked + self.token_ttl });
                Ok(value)
            }
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Err(Attempt::Retry(format!("token PUT answered {}", s.as_u16())))
            }
            s => Err(Attempt::Fatal(ImdsError::Response {
                method: Method::PUT,
                path: TOKEN_PATH.into(),
                status: s.as_u16(),
                body: response.body_excerpt(200),
            })),
        }
    }

    /// The instance identity document: the authoritative source of id, region and zone.
    pub async fn identity_document(&self) -> Result<IdentityDocument, ImdsError> {
        let path = "dynamic/instance-identity/document";
        let text = self.get_required(path).await?;
        let doc: IdentityDocument = serde_json::from_str(&text).map_err(|e| ImdsError::BadAnswer {
            path: path.into(),
            reason: format!("not an identity document: {e}"),
        })?;
        doc.validate().map_err(|reason| ImdsError::BadAnswer { path: path.into(), reason })?;
        Ok(doc)
    }

    /// Block-device mapping names and devices, e.g. `("ebs1", "sdf")`.
    pub async fn block_device_mapping(&self) -> Result<Vec<(String, String)>, ImdsError> {
        let base = "meta-data/block-device-mapping/";
        let Some(list) = self.get(base).await? else { return Ok(vec![]) };
        let mut out = Vec::new();
        for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(ImdsError::BadAnswer { path: base.into(), reason: format!("odd mapping name `{name}`") });
            }
            if let Some(dev) = self.get(&format!("{base}{name}")).await? {
                out.push((name.to_string(), dev.trim().to_string()));
            }
        }
        Ok(out)
    }

    /// Everything boot needs, read and checked.
    pub async fn instance_info(&self) -> Result<InstanceInfo, ImdsError> {
        let doc = self.identity_document().await?;
        let block_devices = self.block_device_mapping().await?;
        Ok(InstanceInfo { identity: doc, block_devices })
    }
}

fn transport_reason(e: &HttpError) -> String {
    match e {
        HttpError::Transport { reason, .. } => reason.clone(),
        HttpError::Timeout { timeout, .. } => format!("no answer within {timeout:?}"),
        HttpError::Invalid { reason, .. } => reason.clone(),
    }
}

/// `GET dynamic/instance-identity/document`, the fields we use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityDocument {
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
    #[serde(default)]
    pub instance_type: String,
    #[serde(default)]
    pub account_id: String,
    #[serde(default)]
    pub image_id: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub private_ip: Option<String>,
}

impl IdentityDocument {
    fn validate(&self) -> Result<(), String> {
        let id = self.instance_id.strip_prefix("i-").unwrap_or("");
        if !(8..=17).contains(&id.len()) || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("instanceId `{}` is not an instance id", self.instance_id));
        }
        let token_ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !token_ok(&self.region) {
            return Err(format!("region `{}` is not a region name", self.region));
        }
        if !token_ok(&self.availability_zone) || !self.availability_zone.starts_with(&self.region) {
            return Err(format!("availabilityZone `{}` is not in region {}", self.availability_zone, self.region));
        }
        for (name, v) in [
            ("instanceType", &self.instance_type),
            ("accountId", &self.account_id),
            ("imageId", &self.image_id),
            ("architecture", &self.architecture),
        ] {
            if v.len() > 64 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                return Err(format!("{name} `{}` has unexpected characters", v.escape_debug()));
            }
        }
        // Every field lands in instance.env, which other units read as an EnvironmentFile.
        if let Some(ip) = &self.private_ip
            && ip.parse::<std::net::IpAddr>().is_err()
        {
            return Err(format!("privateIp `{}` is not an IP address", ip.escape_debug()));
        }
        Ok(())
    }
}

/// What boot learns from IMDS.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceInfo {
    pub identity: IdentityDocument,
    pub block_devices: Vec<(String, String)>,
}

impl InstanceInfo {
    /// `KEY=VALUE` lines for `/run/caretaker/instance.env` (values are checked: no quoting needed).
    pub fn env_file(&self) -> String {
        let d = &self.identity;
        let mut s = String::new();
        for (k, v) in [
            ("INSTANCE_ID", d.instance_id.as_str()),
            ("REGION", &d.region),
            ("AWS_REGION", &d.region),
            ("AVAILABILITY_ZONE", &d.availability_zone),
            ("INSTANCE_TYPE", &d.instance_type),
            ("ACCOUNT_ID", &d.account_id),
            ("IMAGE_ID", &d.image_id),
            ("ARCHITECTURE", &d.architecture),
            ("PRIVATE_IP", d.private_ip.as_deref().unwrap_or("")),
        ] {
            s.push_str(k);
            s.push('=');
            s.push_str(v);
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> IdentityDocument {
        IdentityDocument {
            instance_id: "i-0123456789abcdef0".into(),
            region: "eu-west-1".into(),
            availability_zone: "eu-west-1a".into(),
            instance_type: "m7g.medium".into(),
            account_id: "123456789012".into(),
            image_id: "ami-0abc".into(),
            architecture: "arm64".into(),
            private_ip: Some("10.0.0.5".into()),
        }
    }

    #[test]
    fn identity_document_is_checked() {
        assert!(doc().validate().is_ok());
        let mut d = doc();
        d.instance_id = "i-XYZ".into();
        assert!(d.validate().unwrap_err().contains("instanceId"));
        let mut d = doc();
        d.availability_zone = "us-east-1a".into();
        assert!(d.validate().unwrap_err().contains("not in region"));
        let mut d = doc();
        d.instance_type = "m7g\nEVIL=1".into();
        assert!(d.validate().is_err());
        let mut d = doc();
        d.private_ip = Some("10.0.0.5\nAWS_REGION=us-gov-west-1".into());
        assert!(d.validate().unwrap_err().contains("privateIp"), "a value that would add a line to instance.env");
    }

    #[test]
    fn env_file_has_one_line_per_key() {
        let info = InstanceInfo { identity: doc(), block_devices: vec![] };
        let env = info.env_file();
        assert!(env.contains("INSTANCE_ID=i-0123456789abcdef0\n"));
        assert!(env.contains("AVAILABILITY_ZONE=eu-west-1a\n"));
        assert_eq!(env.lines().count(), 9);
    }

    #[test]
    fn parses_a_real_identity_document() {
        let text = r#"{"accountId":"123456789012","architecture":"arm64","availabilityZone":"eu-west-1a","billingProducts":null,"devpayProductCodes":null,"marketplaceProductCodes":null,"imageId":"ami-0abcdef1234567890","instanceId":"i-0123456789abcdef0","instanceType":"m7g.medium","kernelId":null,"pendingTime":"2026-11-01T10:00:00Z","privateIp":"10.0.0.5","ramdiskId":null,"region":"eu-west-1","version":"2017-09-30"}"#;
        let d: IdentityDocument = serde_json::from_str(text).unwrap();
        assert_eq!(d.instance_id, "i-0123456789abcdef0");
        assert!(d.validate().is_ok());
    }
}
