//! One writer per backup prefix: `PREFIX/lease.json`, sealed like manifests, taken and renewed
//! with conditional writes (`If-None-Match: *` to create, `If-Match: ETAG` to renew or take over),
//! so that of two instances racing for it exactly one wins. A lease not renewed for its time to
//! live belongs to nobody (its instance is gone); a live one held by another instance is named,
//! and the caller stops: two boxes never both restore or archive into one prefix.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::seal::SealKeys;
use crate::aws::s3::{Put, S3};
use crate::units::rfc3339;

pub const LEASE: &str = "lease.json";

/// Whether this box may write into the prefix: `Some(why)` while another instance holds the
/// lease (the WAL server then refuses pushes, so PostgreSQL keeps its WAL).
pub type Gate = std::sync::Arc<std::sync::Mutex<Option<String>>>;
const LEASE_MAX: usize = 64 << 10;

/// What the lease object says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The instance holding it.
    pub holder: String,
    /// When it was taken and last renewed (RFC 3339).
    pub acquired_at: String,
    pub renewed_at: String,
    /// Seconds after `renewed_at` it is no one's.
    pub ttl_seconds: u64,
}

impl Lease {
    fn renewed(&self) -> SystemTime {
        humantime::parse_rfc3339(&self.renewed_at).unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Whether it ran out at `now` (its holder stopped renewing it).
    pub fn expired(&self, now: SystemTime) -> bool {
        now.duration_since(self.renewed()).unwrap_or_default() > Duration::from_secs(self.ttl_seconds)
    }
}

/// How the lease was had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// There was none.
    Taken,
    /// It was ours already (renewed).
    Renewed,
    /// Another instance's, run out: taken over.
    TakenOver(Lease),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "the backup prefix is held by instance {} (renewed {}, {} s ago): another box is running on these backups; \
         stop it (or wait {} s after it stopped)",
        .0.holder, .0.renewed_at, .1, .0.ttl_seconds
    )]
    Busy(Lease, u64),
    #[error("s3://{0} is not a lease this deployment's keys sealed ({1}): not taken over; check who writes the bucket")]
    Foreign(String, String),
    #[error("{0}")]
    S3(String),
}

/// Takes or renews the lease of `prefix` for `holder`.
pub async fn acquire(
    s3: &S3,
    bucket: &str,
    prefix: &str,
    keys: &SealKeys,
    holder: &str,
    ttl: Duration,
) -> Result<Held, LeaseError> {
    let key = format!("{prefix}/{LEASE}");
    let s3err = |e: crate::aws::s3::S3Error| LeaseError::S3(e.to_string());
    for _ in 0..5 {
        let now = SystemTime::now();
        let mut mine = Lease {
            holder: holder.to_string(),
            acquired_at: rfc3339(now),
            renewed_at: rfc3339(now),
            ttl_seconds: ttl.as_secs(),
        };
        match s3.get_small_with_etag(bucket, &key, LEASE_MAX).await.map_err(s3err)? {
            None => {
                if s3.put_new(bucket, &key, keys.seal(&mine), &[]).await.map_err(s3err)? == Put::Created {
                    return Ok(Held::Taken);
                }
            }
            Some((bytes, etag)) => {
                let theirs: Lease = keys
                    .open(&bytes)
                    .and_then(|v| serde_json::from_value(v).map_err(|e| e.to_string()))
                    .map_err(|why| LeaseError::Foreign(format!("{bucket}/{key}"), why))?;
                let outcome = if theirs.holder == holder {
                    mine.acquired_at = theirs.acquired_at.clone();
                    Held::Renewed
                } else if theirs.expired(now) {
                    Held::TakenOver(theirs.clone())
                } else {
                    let age = now.duration_since(theirs.renewed()).unwrap_or_default().as_secs();
                    return Err(LeaseError::Busy(theirs, age));
                };
                if s3.put_if_match(bucket, &key, keys.seal(&mine), &etag).await.map_err(s3err)? == Put::Created {
                    return Ok(outcome);
                }
            }
        }
        // Someone wrote it between our read and our write: read again.
    }
    Err(LeaseError::S3(format!("s3://{bucket}/{key} kept changing under five attempts to take it")))
}
