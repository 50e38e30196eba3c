//! Redis's side of a backup: a fresh, successful BGSAVE, then the RDB file it wrote.
//!
//! BGSAVE is asked for, then we wait until LASTSAVE has advanced past the time we asked, no save is
//! in progress and the last status is ok. A failed BGSAVE fails the backup with Redis's reason — and
//! says loudly when Redis now refuses writes because of it (stop-writes-on-bgsave-error).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

#[derive(Debug, thiserror::Error)]
pub enum RedisBackupError {
    #[error("redis at {url}: {source}")]
    Redis { url: String, source: redis::RedisError },
    #[error(
        "BGSAVE failed ({reason}); Redis now REFUSES WRITES until a save succeeds — check free space and permissions of {dir}"
    )]
    BgsaveFailedRefusingWrites { reason: String, dir: String },
    #[error("BGSAVE failed ({reason}); check free space and permissions of {dir}")]
    BgsaveFailed { reason: String, dir: String },
    #[error("BGSAVE did not finish within {0:?}")]
    Timeout(Duration),
}

/// What a finished BGSAVE left behind.
#[derive(Debug, Clone)]
pub struct Saved {
    pub rdb_path: PathBuf,
    pub dbsize: i64,
    pub lastsave: i64,
    pub redis_version: String,
}

fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')).map(|v| v.trim().to_string()))
}

async fn query<T: redis::FromRedisValue>(
    conn: &mut MultiplexedConnection,
    url: &str,
    cmd: &mut redis::Cmd,
) -> Result<T, RedisBackupError> {
    cmd.query_async(conn).await.map_err(|source| RedisBackupError::Redis { url: shown(url), source })
}

/// `url` as messages show it: a password in it is replaced (errors reach logs, status and emails).
fn shown(url: &str) -> String {
    crate::config::redact_url_password(url).unwrap_or_else(|| url.to_string())
}

/// Runs BGSAVE and waits for it to succeed.
pub async fn bgsave(url: &str, timeout: Duration) -> Result<Saved, RedisBackupError> {
    let err = |source| RedisBackupError::Redis { url: shown(url), source };
    let client = redis::Client::open(url).map_err(err)?;
    let mut conn = client.get_multiplexed_tokio_connection().await.map_err(err)?;
    let dir: Vec<String> = query(&mut conn, url, redis::cmd("CONFIG").arg("GET").arg("dir")).await?;
    let file: Vec<String> = query(&mut conn, url, redis::cmd("CONFIG").arg("GET").arg("dbfilename")).await?;
    let dir = dir.get(1).cloned().unwrap_or_default();
    let rdb_path = PathBuf::from(&dir).join(file.get(1).map(String::as_str).unwrap_or("dump.rdb"));
    let before: i64 = query(&mut conn, url, &mut redis::cmd("LASTSAVE")).await?;
    // LASTSAVE has one-second resolution: if the previous save happened this very second, ours
    // could not be told apart from it, so start it in the next second.
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    if before >= now {
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // A save already running (e.g. Redis's own schedule) is waited for, then ours is asked for.
    let started = Instant::now();
    loop {
        match redis::cmd("BGSAVE").query_async::<String>(&mut conn).await {
            Ok(_) => break,
            Err(e) if e.to_string().contains("in progress") && started.elapsed() < timeout => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) if e.to_string().contains("MISCONF") => {
                return Err(RedisBackupError::BgsaveFailedRefusingWrites { reason: e.to_string(), dir });
            }
            Err(e) => return Err(err(e)),
        }
    }
    loop {
        let info: String = query(&mut conn, url, redis::cmd("INFO").arg("persistence")).await?;
        let in_progress = info_field(&info, "rdb_bgsave_in_progress").as_deref() == Some("1");
        let status = info_field(&info, "rdb_last_bgsave_status").unwrap_or_default();
        let last: i64 = query(&mut conn, url, &mut redis::cmd("LASTSAVE")).await?;
        if !in_progress && status == "err" {
            let refusing = redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .is_err_and(|e| e.to_string().contains("MISCONF"));
            let reason = "the last BGSAVE status is err; see Redis's log".to_string();
            return Err(if refusing {
                RedisBackupError::BgsaveFailedRefusingWrites { reason, dir }
            } else {
                RedisBackupError::BgsaveFailed { reason, dir }
            });
        }
        if !in_progress && status == "ok" && last > before {
            let dbsize: i64 = query(&mut conn, url, &mut redis::cmd("DBSIZE")).await?;
            let server: String = query(&mut conn, url, redis::cmd("INFO").arg("server")).await?;
            return Ok(Saved {
                rdb_path,
                dbsize,
                lastsave: last,
                redis_version: info_field(&server, "redis_version").unwrap_or_default(),
            });
        }
        if started.elapsed() > timeout {
            return Err(RedisBackupError::Timeout(timeout));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_password_in_the_url_never_reaches_the_message() {
        let e = bgsave("redis://:s3cret-pw@127.0.0.1:1/", Duration::from_secs(2)).await.unwrap_err().to_string();
        assert!(!e.contains("s3cret-pw"), "{e}");
        assert!(e.contains("<redacted>"), "{e}");
    }

    #[test]
    fn info_fields() {
        let info = "# Persistence\r\nrdb_bgsave_in_progress:0\r\nrdb_last_bgsave_status:ok\r\n";
        assert_eq!(info_field(info, "rdb_bgsave_in_progress").as_deref(), Some("0"));
        assert_eq!(info_field(info, "rdb_last_bgsave_status").as_deref(), Some("ok"));
        assert_eq!(info_field(info, "nope"), None);
    }
}
