//! The releases bucket: every S3 call of the release module is in here, through [`crate::aws::s3::S3`].

use std::time::Duration;

use crate::aws::s3::ByteStream;
use bytes::Bytes;

use super::{UpdateError, compare_versions, validate_version};
use crate::aws::s3::{S3, S3Error};

/// Small objects (LATEST, SHA256SUMS, the signature) larger than this are refused, not read.
const SMALL_LIMIT: usize = 64 << 10;
/// A download that receives nothing for this long is abandoned.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Store<'a> {
    pub s3: &'a S3,
    pub bucket: &'a str,
    pub app: &'a str,
    pub artifact: &'a str,
}

/// One chunk of a download, or why there is none.
pub enum Chunk {
    Data(Bytes),
    End,
    Failed(String),
}

/// An artifact being downloaded.
pub struct Download {
    body: ByteStream,
    /// The size S3 announced, when it did.
    pub length: Option<u64>,
}

impl Download {
    pub async fn next(&mut self) -> Chunk {
        match tokio::time::timeout(STALL_TIMEOUT, self.body.next()).await {
            Err(_) => Chunk::Failed(format!("nothing received for {STALL_TIMEOUT:?}")),
            Ok(None) => Chunk::End,
            Ok(Some(Ok(b))) => Chunk::Data(b),
            Ok(Some(Err(e))) => Chunk::Failed(crate::http::error_chain(&e)),
        }
    }
}

impl Store<'_> {
    pub fn key(&self, version: &str, name: &str) -> String {
        format!("{}/{version}/{name}", self.app)
    }

    pub fn latest_key(&self) -> String {
        format!("{}/LATEST", self.app)
    }

    /// A small object, `None` when missing; refused when larger than [`SMALL_LIMIT`].
    pub async fn small(&self, key: &str) -> Result<Option<Vec<u8>>, UpdateError> {
        let Some(mut body) = self.s3.get_stream(self.bucket, key).await? else { return Ok(None) };
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| S3Error {
                operation: "GetObject",
                bucket: self.bucket.into(),
                key: key.into(),
                message: crate::http::error_chain(&e),
            })?;
            out.extend_from_slice(&chunk);
            if out.len() > SMALL_LIMIT {
                return Err(S3Error {
                    operation: "GetObject",
                    bucket: self.bucket.into(),
                    key: key.into(),
                    message: format!("larger than {SMALL_LIMIT} bytes; this should be a small text file"),
                }
                .into());
            }
        }
        Ok(Some(out))
    }

    /// Valid versions that have a folder under `APP/`, oldest first.
    pub async fn versions(&self) -> Result<Vec<String>, UpdateError> {
        let prefix = format!("{}/", self.app);
        let keys = self.s3.list_keys(self.bucket, &prefix).await?;
        let mut versions: Vec<String> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix)?.split_once('/').map(|(v, _)| v.to_string()))
            .filter(|v| validate_version(v).is_ok())
            .collect();
        versions.sort_by(|a, b| compare_versions(a, b));
        versions.dedup();
        Ok(versions)
    }

    /// The artifact's body, `None` when the object is missing.
    pub async fn artifact(&self, version: &str) -> Result<Option<Download>, UpdateError> {
        let key = self.key(version, self.artifact);
        let Some(body) = self.s3.get_stream(self.bucket, &key).await? else { return Ok(None) };
        let length = body.size_hint().1;
        Ok(Some(Download { body, length }))
    }
}
