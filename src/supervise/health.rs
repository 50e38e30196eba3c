//! Health probes, one per kind of service, each bounded by its own timeout:
//! PostgreSQL `SELECT 1` over the unix socket; Redis `PING` plus `INFO persistence` (a failed
//! last BGSAVE or AOF write means Redis refuses writes: degraded); the API by `GET` of its health
//! path (200, and optionally a JSON field with an expected value).

use std::time::{Duration, Instant};

use hyper::Method;
use serde::{Deserialize, Serialize};

use crate::http;
use crate::pg::PgTarget;

/// A probe's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "health", content = "reason", rename_all = "lowercase")]
pub enum Health {
    Healthy,
    /// Up but not doing its job fully (Redis refusing writes).
    Degraded(String),
    Unhealthy(String),
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

/// A verdict and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    #[serde(flatten)]
    pub health: Health,
    pub latency_ms: u64,
}

/// How to probe one service.
#[derive(Debug, Clone)]
pub enum Probe {
    Postgres(PgTarget),
    Redis { url: String },
    Http { url: String, expect_json: Option<(String, String)>, client: Box<http::Client> },
}

impl Probe {
    /// Runs the probe, never longer than `timeout`.
    pub async fn run(&self, timeout: Duration) -> ProbeResult {
        let started = Instant::now();
        let health = match tokio::time::timeout(timeout, self.check(timeout)).await {
            Ok(h) => h,
            Err(_) => Health::Unhealthy(format!("no answer within {timeout:?}")),
        };
        ProbeResult { health, latency_ms: started.elapsed().as_millis() as u64 }
    }

    async fn check(&self, timeout: Duration) -> Health {
        match self {
            Probe::Postgres(target) => match target.connect("postgres", timeout).await {
                Ok(client) => match client.query_one("SELECT 1", &[]).await {
                    Ok(_) => Health::Healthy,
                    Err(e) => Health::Unhealthy(format!("SELECT 1 failed: {e}")),
                },
                Err(e) => Health::Unhealthy(e.to_string()),
            },
            Probe::Redis { url } => redis_check(url).await,
            Probe::Http { url, expect_json, client } => {
                match client.send(Method::GET, url, &[("User-Agent", "caretaker-probe")], timeout).await {
                    Ok(r) if r.status == hyper::StatusCode::OK => match expect_json {
                        None => Health::Healthy,
                        Some((field, want)) => json_field_check(&r.body, field, want),
                    },
                    Ok(r) => {
                        Health::Unhealthy(format!("GET {url} answered {}: {}", r.status.as_u16(), r.body_excerpt(120)))
                    }
                    Err(e) => Health::Unhealthy(e.to_string()),
                }
            }
        }
    }
}

fn json_field_check(body: &[u8], field: &str, want: &str) -> Health {
    let v: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Health::Unhealthy(format!("health answer is not JSON: {e}")),
    };
    let got = v.pointer(&format!("/{}", field.replace('.', "/")));
    let got_s = match got {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => return Health::Unhealthy(format!("health answer lacks `{field}`")),
    };
    if got_s == want {
        Health::Healthy
    } else {
        Health::Unhealthy(format!("`{field}` is `{got_s}`, expected `{want}`"))
    }
}

async fn redis_check(url: &str) -> Health {
    let client = match redis::Client::open(url) {
        Ok(c) => c,
        Err(e) => return Health::Unhealthy(format!("bad redis url: {e}")),
    };
    let mut conn = match client.get_multiplexed_tokio_connection().await {
        Ok(c) => c,
        Err(e) => return Health::Unhealthy(format!("cannot connect: {e}")),
    };
    let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    match pong {
        Ok(p) if p == "PONG" => {}
        Ok(p) => return Health::Unhealthy(format!("PING answered {p}")),
        // Redis 7 answers even PING with MISCONF while it refuses writes.
        Err(e) if e.to_string().contains("MISCONF") => {
            return Health::Degraded(
                "it refuses writes (MISCONF): the last BGSAVE failed; check disk space and permissions of its dir"
                    .into(),
            );
        }
        Err(e) => return Health::Unhealthy(format!("PING failed: {e}")),
    }
    let info: redis::RedisResult<String> = redis::cmd("INFO").arg("persistence").query_async(&mut conn).await;
    match info {
        Ok(text) => persistence_health(&text),
        Err(e) => Health::Unhealthy(format!("INFO persistence failed: {e}")),
    }
}

/// Reads `INFO persistence`: a failed last BGSAVE (or AOF write) makes Redis refuse writes
/// (MISCONF, with the default stop-writes-on-bgsave-error yes).
pub fn persistence_health(info: &str) -> Health {
    let field = |name: &str| {
        info.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')).map(|v| v.trim().to_string()))
    };
    let mut problems = Vec::new();
    if field("rdb_last_bgsave_status").as_deref() == Some("err") {
        problems.push("the last BGSAVE failed (Redis refuses writes until a save succeeds; check disk space and permissions of its dir)".to_string());
    }
    if field("aof_last_write_status").as_deref() == Some("err") {
        problems.push("the last AOF write failed".to_string());
    }
    if problems.is_empty() { Health::Healthy } else { Health::Degraded(problems.join("; ")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_persistence() {
        let ok = "# Persistence\r\nloading:0\r\nrdb_last_bgsave_status:ok\r\naof_last_write_status:ok\r\n";
        assert_eq!(persistence_health(ok), Health::Healthy);
        let bad = "# Persistence\r\nrdb_last_bgsave_status:err\r\naof_last_write_status:ok\r\n";
        assert!(matches!(persistence_health(bad), Health::Degraded(r) if r.contains("BGSAVE")));
    }

    #[test]
    fn json_field() {
        assert_eq!(json_field_check(br#"{"status":"ok"}"#, "status", "ok"), Health::Healthy);
        assert!(!json_field_check(br#"{"status":"starting"}"#, "status", "ok").is_healthy());
        assert!(!json_field_check(b"nope", "status", "ok").is_healthy());
        assert_eq!(json_field_check(br#"{"db":{"up":true}}"#, "db.up", "true"), Health::Healthy);
    }
}
