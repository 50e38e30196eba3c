//! The backup stream: plaintext → zstd → age → S3 multipart upload, in bounded memory and without
//! touching local disk.
//!
//! ```text
//! reader task: xxh3(plain) ──chunks (bounded)──▶ encoder thread: zstd, age, sha256(stored), cut parts
//!                                                   ──parts (bounded)──▶ uploader: ≤ N UploadPart in flight
//! ```
//! Two passes hash the bytes, each once: the plaintext's XXH3-128 (`super::digest`: a check on
//! the pipeline, ~6 GB/s) in the reader, and the stored bytes' SHA-256 (what the sealed manifest
//! binds) in the encoder. Over TLS the SDK adds only a CRC32 per part (`S3::with_unsigned_parts`).
//! Memory is bounded by `part_size × (parts_in_flight + 2)` plus small chunk buffers, whatever
//! the size of the input. Parts grow (×2 every 1,000 parts) so no stream reaches S3's 10,000-part
//! limit. The upload is left *pending*: the caller completes it only after the producer exited 0
//! ([`PendingUpload::complete`]), and aborts it on any failure — a truncated dump never becomes an
//! object (safety rule 3). Every failure inside the stream aborts the upload itself.

use std::io::{self, Write};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::warn;

use super::digest::PlainDigest;
use crate::aws::s3::{S3, S3Error};

/// S3's smallest part (except the last).
pub const MIN_PART: usize = 5 << 20;
/// S3's most parts in one upload.
pub const MAX_PARTS: usize = 10_000;
const CHUNK: usize = 256 << 10;

/// How the stream encrypts.
#[derive(Clone)]
pub enum Encryption {
    /// age X25519 recipients (`age1…`): decrypt with `age -d -i KEYFILE`.
    Recipients(Vec<age::x25519::Recipient>),
    /// A passphrase (scrypt): decrypt with `age -d` and the passphrase.
    Passphrase(age::secrecy::SecretString),
}

impl Encryption {
    pub(in crate::backup) fn encryptor(&self) -> Result<age::Encryptor, String> {
        match self {
            Encryption::Recipients(r) => {
                age::Encryptor::with_recipients(r.iter().map(|r| r as &dyn age::Recipient)).map_err(|e| e.to_string())
            }
            Encryption::Passphrase(p) => {
                let mut recipient = age::scrypt::Recipient::new(p.clone());
                // 2^15: 32 MiB of scrypt memory for a moment, not age's interactive default (which
                // can take hundreds of MiB). The passphrase is machine-generated and long.
                recipient.set_work_factor(SCRYPT_LOG_N);
                age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// What the manifest records (never a secret).
    pub fn describe(&self) -> serde_json::Value {
        match self {
            Encryption::Recipients(r) => {
                serde_json::json!({ "kind": "x25519", "recipients": r.iter().map(|r| r.to_string()).collect::<Vec<_>>() })
            }
            Encryption::Passphrase(_) => serde_json::json!({ "kind": "passphrase", "scrypt-log-n": SCRYPT_LOG_N }),
        }
    }
}

/// The scrypt work factor (log2 N) of passphrase backups; decryption accepts no more, so a
/// planted object cannot make a drill spend minutes and gigabytes in scrypt.
pub const SCRYPT_LOG_N: u8 = 15;

#[derive(Clone)]
pub struct StreamConfig {
    pub part_size: usize,
    pub parts_in_flight: usize,
    pub zstd_level: i32,
    pub encryption: Encryption,
    /// The encoder thread's priority (`[jobs]`): it does most of a backup's CPU work.
    pub priority: crate::priority::Priority,
}

impl StreamConfig {
    /// The size of part `index` (0-based): the configured size, doubled every 1,000 parts.
    pub fn part_size_for(&self, index: usize) -> usize {
        self.part_size.max(MIN_PART) << (index / 1000).min(20)
    }

    /// The most memory the stream holds in buffers, whatever the input size (for a part index).
    pub fn buffer_bound(&self, index: usize) -> usize {
        self.part_size_for(index) * (self.parts_in_flight + 2) + 9 * CHUNK
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    S3(#[from] S3Error),
    #[error("reading the producer's output: {0}")]
    Read(io::Error),
    #[error("compressing/encrypting: {0}")]
    Encode(String),
    #[error("the stream was cancelled")]
    Cancelled,
}

/// What went up, waiting for the caller's verdict.
pub struct PendingUpload {
    s3: S3,
    pub bucket: String,
    pub key: String,
    upload_id: String,
    etags: Vec<String>,
    pub plain_bytes: u64,
    /// [`super::digest::PlainDigest::CURRENT`] of the plaintext.
    pub plain_digest: String,
    pub stored_bytes: u64,
    pub stored_sha256: String,
    /// SHA-256 of the age header and payload nonce (see [`age_prefix_len`]).
    pub header_sha256: String,
}

impl PendingUpload {
    pub fn parts(&self) -> usize {
        self.etags.len()
    }

    /// Makes the object exist. Only after the producer succeeded.
    pub async fn complete(self) -> Result<(), S3Error> {
        let r = self.s3.complete_multipart(&self.bucket, &self.key, &self.upload_id, &self.etags).await;
        if r.is_err() {
            let _ = self.s3.abort_multipart(&self.bucket, &self.key, &self.upload_id).await;
        }
        r
    }

    /// Throws the parts away.
    pub async fn abort(self) -> Result<(), S3Error> {
        self.s3.abort_multipart(&self.bucket, &self.key, &self.upload_id).await
    }
}

/// Cuts the ciphertext into parts, hashing it in order.
struct PartWriter {
    tx: mpsc::Sender<Bytes>,
    cfg: Arc<StreamConfig>,
    buf: Vec<u8>,
    index: usize,
    hash: Sha256,
    total: u64,
    header_sha256: Option<String>,
}

/// The length of an age file's header plus its 16-byte payload nonce at the start of `stored`,
/// once all of it is there. What follows is authenticated by the file key the header wraps, so a
/// sealed manifest that records this prefix's hash authenticates every plaintext byte as it is
/// decrypted (not only at the end, when the whole-object hash is compared).
pub fn age_prefix_len(stored: &[u8]) -> Option<usize> {
    // The header ends with its MAC line: `--- BASE64\n` (stanza lines start with `-> `).
    let mac_line = stored.windows(5).position(|w| w == b"\n--- ")? + 1;
    let end = mac_line + stored[mac_line..].iter().position(|&b| b == b'\n')? + 1;
    (stored.len() >= end + 16).then_some(end + 16)
}

impl PartWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.index == 0 {
            let len =
                age_prefix_len(&self.buf).ok_or_else(|| io::Error::other("the age header does not fit a part"))?;
            self.header_sha256 = Some(hex::encode(Sha256::digest(&self.buf[..len])));
        }
        let next = self.cfg.part_size_for(self.index + 1);
        let part = std::mem::replace(&mut self.buf, Vec::with_capacity(next));
        self.index += 1;
        self.tx.blocking_send(Bytes::from(part)).map_err(|_| io::Error::other("the uploader stopped"))
    }
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.cfg.part_size_for(self.index) - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        self.hash.update(&data[..n]);
        self.total += n as u64;
        if self.buf.len() == self.cfg.part_size_for(self.index) {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Streams `source` into `s3://bucket/key` and leaves the upload pending. `progress(plaintext
/// bytes read, stored bytes, parts uploaded)` is called as parts finish.
pub async fn upload<R>(
    s3: &S3,
    bucket: &str,
    key: &str,
    mut source: R,
    cfg: StreamConfig,
    progress: impl Fn(u64, u64, usize) + Send + 'static,
) -> Result<PendingUpload, StreamError>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let cfg = Arc::new(cfg);
    let upload_id = s3.create_multipart(bucket, key).await?;
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<Bytes>(4);
    // One finished part waits while N upload and the encoder fills the next: N + 2 parts at most.
    let (part_tx, mut part_rx) = mpsc::channel::<Bytes>(1);

    // Encoder thread: plaintext chunks in, parts out.
    let enc_cfg = cfg.clone();
    let encoding = move || -> Result<(u64, String, String), String> {
        let parts = PartWriter {
            tx: part_tx,
            cfg: enc_cfg.clone(),
            buf: Vec::new(),
            index: 0,
            hash: Sha256::new(),
            total: 0,
            header_sha256: None,
        };
        let age_out = enc_cfg.encryption.encryptor()?.wrap_output(parts).map_err(|e| e.to_string())?;
        let mut z = zstd::stream::write::Encoder::new(age_out, enc_cfg.zstd_level).map_err(|e| e.to_string())?;
        while let Some(chunk) = chunk_rx.blocking_recv() {
            z.write_all(&chunk).map_err(|e| e.to_string())?;
        }
        let age_out = z.finish().map_err(|e| e.to_string())?;
        let mut parts = age_out.finish().map_err(|e| e.to_string())?;
        if !parts.buf.is_empty() || parts.index == 0 {
            parts.send().map_err(|e| e.to_string())?;
        }
        let header = parts.header_sha256.take().unwrap_or_default();
        let stored_sha = hex::encode(parts.hash.finalize());
        Ok((parts.total, stored_sha, header))
    };
    // Its own thread (never reused) at `[jobs]`'s priority: most of a backup's CPU is here.
    let encoder = match crate::priority::spawn_thread_at(cfg.priority, "backup-encode", encoding) {
        Ok(t) => t,
        Err(e) => {
            let _ = s3.abort_multipart(bucket, key, &upload_id).await;
            return Err(StreamError::Encode(format!("cannot start the encoder thread: {e}")));
        }
    };

    // Reader: the producer's output in full chunks (read into uninitialised capacity: no zeroing),
    // hashed (XXH3: ~40 µs a chunk) and handed to the encoder.
    let read_so_far = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let read_counter = read_so_far.clone();
    let reader = tokio::spawn(async move {
        let mut total = 0u64;
        let mut plain = PlainDigest::CURRENT.hasher();
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            let mut eof = false;
            while buf.len() < CHUNK {
                if source.read_buf(&mut buf).await? == 0 {
                    eof = true;
                    break;
                }
            }
            if !buf.is_empty() {
                total += buf.len() as u64;
                read_counter.store(total, std::sync::atomic::Ordering::Relaxed);
                let chunk = buf.split().freeze();
                buf.reserve(CHUNK);
                plain.update(&chunk);
                if chunk_tx.send(chunk).await.is_err() {
                    // The encoder failed: its error is the one reported.
                    return Ok((total, String::new()));
                }
            }
            if eof {
                return Ok::<(u64, String), io::Error>((total, plain.finish()));
            }
        }
    });

    // Uploader: parts out to S3, at most N at once, ETags kept in order.
    let mut etags: Vec<Option<String>> = Vec::new();
    let mut inflight: JoinSet<(usize, Result<String, S3Error>)> = JoinSet::new();
    let mut failure: Option<StreamError> = None;
    let mut stored = 0u64;
    let mut next = 0usize;
    loop {
        tokio::select! {
            part = part_rx.recv(), if inflight.len() < cfg.parts_in_flight.max(1) && failure.is_none() => {
                let Some(part) = part else { break };
                let (s3, b, k, id, n) = (s3.clone(), bucket.to_string(), key.to_string(), upload_id.clone(), next);
                stored += part.len() as u64;
                etags.push(None);
                next += 1;
                inflight.spawn(async move {
                    let mut attempt = 0;
                    loop {
                        attempt += 1;
                        match s3.upload_part(&b, &k, &id, n as i32 + 1, part.clone()).await {
                            Ok(e) => return (n, Ok(e)),
                            Err(e) if attempt < 4 => {
                                warn!("part {} failed (attempt {attempt}), retrying: {e}", n + 1);
                                tokio::time::sleep(std::time::Duration::from_millis(500 << attempt)).await;
                            }
                            Err(e) => return (n, Err(e)),
                        }
                    }
                });
            }
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                match done {
                    Ok((n, Ok(etag))) => etags[n] = Some(etag),
                    Ok((_, Err(e))) => { failure.get_or_insert(StreamError::S3(e)); }
                    Err(e) => { failure.get_or_insert(StreamError::Encode(format!("upload task: {e}"))); }
                }
                let read = read_so_far.load(std::sync::atomic::Ordering::Relaxed);
                progress(read, stored, etags.iter().filter(|e| e.is_some()).count());
            }
            else => break,
        }
        if failure.is_some() {
            break;
        }
    }
    // Drain: on failure stop everything, else wait for the last parts.
    if failure.is_some() {
        inflight.abort_all();
        drop(part_rx);
    }
    while let Some(done) = inflight.join_next().await {
        match done {
            Ok((n, Ok(etag))) => etags[n] = Some(etag),
            Ok((_, Err(e))) => {
                failure.get_or_insert(StreamError::S3(e));
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                failure.get_or_insert(StreamError::Encode(format!("upload task: {e}")));
            }
        }
    }
    let read = reader.await.map_err(|e| StreamError::Encode(e.to_string()));
    let encoded = encoder.join().await.map_err(StreamError::Encode);
    let result = match (failure, read, encoded) {
        (Some(f), _, _) => Err(f),
        (None, Err(e), _) | (None, _, Err(e)) => Err(e),
        (None, Ok(Err(e)), _) => Err(StreamError::Read(e)),
        (None, _, Ok(Err(e))) => Err(StreamError::Encode(e)),
        (None, Ok(Ok((plain_bytes, plain_digest))), Ok(Ok((stored_bytes, stored_sha256, header_sha256)))) => {
            let etags: Option<Vec<String>> = etags.into_iter().collect();
            match etags {
                Some(etags) if etags.len() <= MAX_PARTS => Ok(PendingUpload {
                    s3: s3.clone(),
                    bucket: bucket.into(),
                    key: key.into(),
                    upload_id: upload_id.clone(),
                    etags,
                    plain_bytes,
                    plain_digest,
                    stored_bytes,
                    stored_sha256,
                    header_sha256,
                }),
                _ => Err(StreamError::Encode("a part is missing or there are too many".into())),
            }
        }
    };
    if result.is_err()
        && let Err(e) = s3.abort_multipart(bucket, key, &upload_id).await
    {
        warn!("could not abort the failed upload (a lifecycle rule or the next daemon start will): {e}");
    }
    result
}

/// Something that reads a stream as it passes (a tar's facts, a dump's row counts).
pub trait Scan {
    fn feed(&mut self, bytes: &[u8]);
}

/// A reader that shows every byte it passes to a [`Scan`], shared with whoever reads the result
/// once the stream has ended.
pub struct Watched<R, S> {
    pub inner: R,
    pub scan: Arc<std::sync::Mutex<S>>,
}

impl<R: AsyncRead + Unpin, S: Scan> AsyncRead for Watched<R, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &r {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                self.scan.lock().unwrap_or_else(|p| p.into_inner()).feed(new);
            }
        }
        r
    }
}

/// Aborts the multipart uploads under `prefix` that are not this process's own running ones
/// ([`crate::aws::s3::ours_in_flight`]): what a killed daemon left behind. Returns each
/// aborted key with the abort's outcome.
pub async fn abort_stale_uploads(
    s3: &S3,
    bucket: &str,
    prefix: &str,
) -> Result<Vec<(String, Result<(), S3Error>)>, S3Error> {
    let mut done = Vec::new();
    for (key, id) in s3.list_multipart_uploads(bucket, prefix).await? {
        if crate::aws::s3::ours_in_flight(&id) {
            continue;
        }
        let result = s3.abort_multipart(bucket, &key, &id).await;
        done.push((key, result));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(part: usize, inflight: usize) -> StreamConfig {
        StreamConfig {
            part_size: part,
            parts_in_flight: inflight,
            zstd_level: 3,
            encryption: Encryption::Recipients(vec![age::x25519::Identity::generate().to_public()]),
            priority: crate::priority::Priority::NORMAL,
        }
    }

    #[test]
    fn parts_grow_so_five_tib_fits_in_ten_thousand() {
        let c = cfg(16 << 20, 4);
        let mut total: u128 = 0;
        let mut parts = 0;
        while total < 5u128 << 40 {
            total += c.part_size_for(parts) as u128;
            parts += 1;
        }
        assert!(parts <= MAX_PARTS, "{parts} parts");
        assert_eq!(c.part_size_for(0), 16 << 20);
        assert_eq!(c.part_size_for(1000), 32 << 20);
        assert_eq!(cfg(1, 1).part_size_for(0), MIN_PART, "never below S3's minimum");
        // The default (6 MiB) too: S3's largest object, 5 TiB, in at most 10,000 parts.
        let d = crate::config::BackupConfig::default();
        let c = cfg(d.part_size as usize, d.parts_in_flight);
        let (mut total, mut parts) = (0u128, 0);
        while total < 5u128 << 40 {
            total += c.part_size_for(parts) as u128;
            parts += 1;
        }
        assert!(parts <= MAX_PARTS, "{parts} parts with the default part size");
    }

    #[test]
    fn the_memory_bound_does_not_depend_on_the_input() {
        let c = cfg(8 << 20, 4);
        assert_eq!(c.buffer_bound(0), (8 << 20) * 6 + 9 * CHUNK);
    }
}
