//! Health probes, one per kind of service, each bounded by its own timeout:
//! PostgreSQL `SELECT 1` over the unix socket; Redis `PING` plus `INFO persistence` (a failed
//! last BGSAVE or AOF write means Redis refuses writes: degraded); the API by `GET` of its health
//! path (200, and optionally a JSON field with an expected value). And the health gate that
//! updates and restores pass before they count as done.

use std::time::{Duration, Instant};

use hyper::Method;
use serde::{Deserialize, Serialize};

use crate::config::{Config, ServiceKind, ServicesConfig};
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
    /// The probe of a service, from its configuration.
    pub fn for_service(s: &ServicesConfig, kind: ServiceKind) -> Probe {
        match kind {
            ServiceKind::Postgres => Probe::Postgres(PgTarget::new(&s.postgres)),
            ServiceKind::Redis => Probe::Redis { url: s.redis.url.clone() },
            ServiceKind::Api => Probe::Http {
                url: s.api.health_url.clone(),
                expect_json: s.api.health_json_field.clone().zip(s.api.health_json_value.clone()),
                client: Box::new(http::Client::new()),
            },
        }
    }

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

/// The health gate: `consecutive` healthy probes in a row within `timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    pub consecutive: u32,
    pub timeout: Duration,
    /// Upper bound for one probe.
    pub probe_timeout: Duration,
}

impl Gate {
    pub fn from_config(cfg: &Config) -> Self {
        Gate {
            consecutive: cfg.release.health_gate_consecutive.max(1),
            timeout: cfg.release.health_gate_timeout.get(),
            probe_timeout: cfg.supervise.probe_timeout.get(),
        }
    }

    /// Time between probes: the needed streak fits twice into the timeout, between 0.2 s and 1 s.
    pub fn interval(&self) -> Duration {
        (self.timeout / (2 * self.consecutive)).clamp(Duration::from_millis(200), Duration::from_secs(1))
    }

    /// Probes until `consecutive` healthy answers in a row (Ok) or the timeout (Err: why).
    pub async fn run(&self, probe: &Probe) -> Result<(), String> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut streak = 0;
        let mut last_problem = String::from("no probe answered");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let result = probe.run(self.probe_timeout.min(left.max(Duration::from_millis(100)))).await;
            match result.health {
                Health::Healthy => {
                    streak += 1;
                    if streak >= self.consecutive {
                        return Ok(());
                    }
                }
                Health::Degraded(problem) | Health::Unhealthy(problem) => {
                    streak = 0;
                    last_problem = problem;
                }
            }
            let next = Instant::now() + self.interval();
            if next >= deadline {
                return Err(format!(
                    "not {} healthy probes in a row within {}s (last problem: {last_problem})",
                    self.consecutive,
                    self.timeout.as_secs_f64()
                ));
            }
            tokio::time::sleep_until(next.into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_interval_fits_the_streak_twice_within_bounds() {
        let gate =
            |k, t| Gate { consecutive: k, timeout: Duration::from_secs(t), probe_timeout: Duration::from_secs(5) };
        assert_eq!(gate(3, 60).interval(), Duration::from_secs(1));
        assert_eq!(gate(3, 3).interval(), Duration::from_millis(500));
        assert_eq!(gate(10, 1).interval(), Duration::from_millis(200));
    }

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
