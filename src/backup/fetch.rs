//! The way back: S3 → age → zstd → a sink (pg_restore's stdin, a file, or nothing for a hash-only
//! check), in bounded memory and hashing as it goes: SHA-256 of the stored bytes and the
//! plaintext's digest (`super::digest`: XXH3-128, or SHA-256 for schema-1 manifests), compared
//! with the manifest by [`check`].
//!
//! ```text
//! download task ──stored chunks (bounded)──▶ decoder thread: sha256(stored), age, zstd, xxh3(plain)
//!                                             ──plain chunks (bounded)──▶ the sink
//! ```
//! age authenticates every 64 KiB chunk, so an altered byte fails the stream at that chunk, before
//! the sink has seen anything after it; the hashes catch the rest (a different but valid object).

use std::io::{self, Read};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::digest::PlainDigest;
use super::run::{BackupError, Manifest};
use crate::aws::s3::{S3, S3Error};
use crate::config::Config;
use crate::priority::Priority;

const CHUNK: usize = 256 << 10;

/// How a stored object is decrypted.
#[derive(Clone)]
pub enum Decryption {
    /// age X25519 identities (`AGE-SECRET-KEY-1…`), matching the recipients backups are made for.
    Identities(Vec<age::x25519::Identity>),
    /// The backup passphrase.
    Passphrase(age::secrecy::SecretString),
}

/// The decryption for this configuration: with `backup.recipients`, the identity in
/// `backup.identity-var` of the env file `backup.passphrase-file`; else the passphrase.
pub fn decryption(cfg: &Config) -> Result<Decryption, BackupError> {
    let b = &cfg.backup;
    let file = cfg.secrets.env_dir.join(format!("{}.env", b.passphrase_file));
    let read = |var: &str| {
        let no_key = || BackupError::NoKey { file: file.display().to_string(), var: var.to_string() };
        crate::envfile::read_env_var(&file, var).map_err(|_| no_key())?.ok_or_else(no_key)
    };
    if b.recipients.is_empty() {
        let pass = read(&b.passphrase_var)?;
        return Ok(Decryption::Passphrase(age::secrecy::SecretString::from(pass.expose().to_string())));
    }
    let text = read(&b.identity_var)?;
    let identities: Result<Vec<age::x25519::Identity>, _> = text
        .expose()
        .split([',', ' ', '\n'])
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<age::x25519::Identity>())
        .collect();
    match identities {
        Ok(ids) if !ids.is_empty() => Ok(Decryption::Identities(ids)),
        // Never echo the value: it is a secret key.
        _ => Err(BackupError::Setup(format!(
            "{} in {} is not an age identity (AGE-SECRET-KEY-1…): cannot decrypt backups",
            b.identity_var,
            file.display()
        ))),
    }
}

/// What went through.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fetched {
    pub stored_bytes: u64,
    pub stored_sha256: String,
    pub plain_bytes: u64,
    /// The plaintext's digest, of the kind the manifest records (`Manifest::plain_digest`).
    pub plain_digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("s3://{bucket}/{key} does not exist")]
    NotFound { bucket: String, key: String },
    #[error("{0}")]
    S3(#[from] S3Error),
    #[error("cannot decrypt: {0} (is the right identity or passphrase configured?)")]
    Key(String),
    #[error("the stored object is damaged or was altered: {0}")]
    Damaged(String),
    #[error("writing the restored data: {0}")]
    Sink(io::Error),
    /// The decoder thread could not start, or panicked.
    #[error("decoding: {0}")]
    Thread(String),
}

/// age's errors in caretaker's own words. Never through age's `Display`: that goes through its
/// message catalogue, which a debug build reads from the build machine's disk at run time (under
/// the service's sandbox that read fails, and the first failure poisons every later message).
pub fn decrypt_error(e: age::DecryptError) -> FetchError {
    use age::DecryptError as E;
    match e {
        E::InvalidHeader => FetchError::Damaged("the age header is invalid".into()),
        E::UnknownFormat => FetchError::Damaged("the age header names an unknown format (from a newer age?)".into()),
        E::InvalidMac => FetchError::Damaged("the age header's MAC does not verify".into()),
        E::Io(e) => FetchError::Damaged(format!("reading the age header: {}", io_error(&e))),
        E::NoMatchingKeys => {
            FetchError::Key("no matching key: the backup was encrypted for another identity or passphrase".into())
        }
        E::DecryptionFailed | E::KeyDecryptionFailed => {
            FetchError::Key("the file key did not decrypt: wrong passphrase or identity".into())
        }
        E::ExcessiveWork { required, target } => FetchError::Key(format!(
            "the passphrase's work factor 2^{required} is above the limit 2^{target} caretaker accepts"
        )),
    }
}

/// An I/O error by its kind, plus its text only when it is one of ours (std's own messages are
/// plain; age's come from its catalogue).
fn io_error(e: &io::Error) -> String {
    match e.get_ref() {
        Some(inner) if inner.to_string().starts_with("download failed") || inner.is::<HeaderMismatch>() => {
            inner.to_string()
        }
        _ => format!("{:?}", e.kind()),
    }
}

/// Stored bytes from the download task, read synchronously by the decoder thread.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    buf: Bytes,
    hash: Sha256,
    total: u64,
    /// The SHA-256 the age header and nonce must have; `None` once checked.
    expect_header: Option<String>,
}

/// An age header longer than this is not one caretaker wrote.
const HEADER_MAX: usize = 1 << 20;

impl ChannelReader {
    fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        match self.rx.blocking_recv() {
            None => Ok(None),
            Some(Ok(b)) => {
                self.hash.update(&b);
                self.total += b.len() as u64;
                Ok(Some(b))
            }
            Some(Err(e)) => Err(io::Error::other(format!("download failed: {e}"))),
        }
    }

    /// Reads the age header and nonce whole and compares their hash with the manifest's before
    /// age sees a byte: what follows is then bound to the file key that header wraps.
    fn check_header(&mut self, expected: &str) -> io::Result<()> {
        let mut head = BytesMut::new();
        let len = loop {
            if let Some(len) = super::stream::age_prefix_len(&head) {
                break len;
            }
            if head.len() > HEADER_MAX {
                return Err(io::Error::other(HeaderMismatch("no age header in its first MiB")));
            }
            match self.next_chunk()? {
                Some(b) => head.extend_from_slice(&b),
                None => return Err(io::Error::other(HeaderMismatch("it ends before its age header does"))),
            }
        };
        if hex::encode(Sha256::digest(&head[..len])) != expected {
            return Err(io::Error::other(HeaderMismatch("its age header is not the one its manifest records")));
        }
        self.buf = head.freeze();
        Ok(())
    }
}

/// The stored object is not the one the manifest was sealed over.
#[derive(Debug)]
struct HeaderMismatch(&'static str);

impl std::fmt::Display for HeaderMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the stored object was replaced: {}", self.0)
    }
}

impl std::error::Error for HeaderMismatch {}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(expected) = self.expect_header.take() {
            self.check_header(&expected)?;
        }
        while self.buf.is_empty() {
            match self.next_chunk()? {
                None => return Ok(0),
                Some(b) => self.buf = b,
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        let _ = self.buf.split_to(n);
        Ok(n)
    }
}

/// The plaintext of the age stream `reader` (its header read and checked here).
pub(in crate::backup) fn open_age<R: Read>(
    reader: R,
    decryption: &Decryption,
) -> Result<age::stream::StreamReader<R>, FetchError> {
    let decryptor = age::Decryptor::new(reader).map_err(decrypt_error)?;
    match decryption {
        Decryption::Identities(ids) => {
            decryptor.decrypt(ids.iter().map(|i| i as &dyn age::Identity)).map_err(decrypt_error)
        }
        Decryption::Passphrase(p) => {
            let mut id = age::scrypt::Identity::new(p.clone());
            id.set_max_work_factor(super::stream::SCRYPT_LOG_N);
            decryptor.decrypt(std::iter::once(&id as &dyn age::Identity)).map_err(decrypt_error)
        }
    }
}

/// What the sealed manifest says of an object before it is read: its age header's hash (checked
/// before any plaintext is released) and which digest of the plaintext to compute.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub header_sha256: &'a str,
    pub plain: PlainDigest,
}

impl<'a> Expect<'a> {
    pub fn of(m: &'a Manifest) -> Self {
        Expect { header_sha256: &m.header_sha256, plain: m.plain_digest().0 }
    }
}

/// Streams `s3://bucket/key` through decryption and decompression into `sink`; `progress` gets
/// (stored bytes, plaintext bytes) as it goes. The sink is flushed and shut down at the end.
/// Nothing reaches the sink unless the object's age header hashes to `expect.header_sha256` (from
/// the sealed manifest). The decoder runs at normal priority (what recovers the box); see
/// [`fetch_into_at`].
pub async fn fetch_into<W>(
    s3: &S3,
    bucket: &str,
    key: &str,
    expect: Expect<'_>,
    decryption: Decryption,
    sink: W,
    progress: impl Fn(u64, u64) + Send,
) -> Result<Fetched, FetchError>
where
    W: AsyncWrite + Unpin,
{
    fetch_into_at(Priority::NORMAL, s3, bucket, key, expect, decryption, sink, progress).await
}

/// [`fetch_into`] with the decoder thread (decryption, decompression, digests: most of the CPU)
/// at `priority` — a drill's, `[jobs]`'s.
#[allow(clippy::too_many_arguments)] // fetch_into's seven, and the priority
pub async fn fetch_into_at<W>(
    priority: Priority,
    s3: &S3,
    bucket: &str,
    key: &str,
    expect: Expect<'_>,
    decryption: Decryption,
    mut sink: W,
    progress: impl Fn(u64, u64) + Send,
) -> Result<Fetched, FetchError>
where
    W: AsyncWrite + Unpin,
{
    let mut body = s3
        .get_stream(bucket, key)
        .await?
        .ok_or_else(|| FetchError::NotFound { bucket: bucket.into(), key: key.into() })?;
    let (in_tx, in_rx) = mpsc::channel::<Result<Bytes, String>>(8);
    let expected_header = expect.header_sha256.to_string();
    let plain_digest = expect.plain;
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(4);

    let download = tokio::spawn(async move {
        loop {
            match body.next().await {
                None => return,
                Some(Ok(b)) => {
                    if in_tx.send(Ok(b)).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    let _ = in_tx.send(Err(e.to_string())).await;
                    return;
                }
            }
        }
    });

    let decoding = move || -> Result<Fetched, FetchError> {
        let mut reader = ChannelReader {
            rx: in_rx,
            buf: Bytes::new(),
            hash: Sha256::new(),
            total: 0,
            expect_header: Some(expected_header),
        };
        let plain_out = {
            let decrypted = open_age(&mut reader, &decryption)?;
            let mut z = zstd::stream::read::Decoder::new(decrypted).map_err(|e| FetchError::Damaged(e.to_string()))?;
            let mut plain = plain_digest.hasher();
            let mut plain_bytes = 0u64;
            let mut buf = BytesMut::new();
            loop {
                // Read needs initialised memory: one zero-fill per chunk, small next to zstd.
                buf.resize(CHUNK, 0);
                let n = z.read(&mut buf).map_err(|e| FetchError::Damaged(e.to_string()))?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                let chunk = buf.split().freeze();
                plain.update(&chunk);
                plain_bytes += n as u64;
                if out_tx.blocking_send(chunk).is_err() {
                    // The sink side stopped (its error is reported there).
                    return Err(FetchError::Sink(io::Error::other("the consumer stopped reading")));
                }
            }
            (plain_bytes, plain.finish())
        };
        // Whatever follows the end of the age stream still counts for the stored hash.
        io::copy(&mut reader, &mut io::sink()).map_err(|e| FetchError::Damaged(e.to_string()))?;
        Ok(Fetched {
            stored_bytes: reader.total,
            stored_sha256: hex::encode(reader.hash.finalize()),
            plain_bytes: plain_out.0,
            plain_digest: plain_out.1,
        })
    };
    let decoder = match crate::priority::spawn_thread_at(priority, "backup-decode", decoding) {
        Ok(t) => t,
        Err(e) => {
            download.abort();
            return Err(FetchError::Thread(format!("cannot start the decoder thread: {e}")));
        }
    };

    let mut written = 0u64;
    let mut sink_error = None;
    while let Some(chunk) = out_rx.recv().await {
        if let Err(e) = sink.write_all(&chunk).await {
            sink_error = Some(e);
            break;
        }
        written += chunk.len() as u64;
        progress(0, written);
    }
    drop(out_rx);
    let decoded = decoder.join().await.map_err(FetchError::Thread);
    download.abort();
    if let Some(e) = sink_error {
        return Err(FetchError::Sink(e));
    }
    let fetched = decoded??;
    sink.shutdown().await.map_err(FetchError::Sink)?;
    progress(fetched.stored_bytes, fetched.plain_bytes);
    Ok(fetched)
}

/// What does not match between the manifest and what was read (empty: everything matches).
pub fn check(m: &Manifest, f: &Fetched) -> Vec<String> {
    let mut problems = Vec::new();
    if f.stored_sha256 != m.stored_sha256 || f.stored_bytes != m.stored_bytes {
        problems.push(format!(
            "stored object: {} bytes, sha256 {} — the manifest says {} bytes, sha256 {}",
            f.stored_bytes, f.stored_sha256, m.stored_bytes, m.stored_sha256
        ));
    }
    let (kind, digest) = m.plain_digest();
    if f.plain_digest != digest || f.plain_bytes != m.plain_bytes {
        problems.push(format!(
            "restored data: {} bytes, {name} {} — the manifest says {} bytes, {name} {digest}",
            f.plain_bytes,
            f.plain_digest,
            m.plain_bytes,
            name = kind.name()
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plaintext_is_checked_with_the_digest_its_manifest_records() {
        let mut m = crate::backup::run::tests::manifest(2, "x");
        m.plain_xxh3_128 = crate::backup::digest::xxh3_128_hex(b"abc");
        let mut f = Fetched {
            stored_bytes: m.stored_bytes,
            stored_sha256: m.stored_sha256.clone(),
            plain_bytes: 3,
            plain_digest: m.plain_xxh3_128.clone(),
        };
        assert!(check(&m, &f).is_empty());
        f.plain_digest = crate::backup::digest::xxh3_128_hex(b"abd");
        let problems = check(&m, &f);
        assert!(problems.len() == 1 && problems[0].contains("restored data") && problems[0].contains("xxh3-128"));
        // Schema 1: SHA-256, even if a (stray) XXH3 is there too.
        m.schema = 1;
        m.plain_sha256 = hex::encode(Sha256::digest(b"abc"));
        assert_eq!(check(&m, &f).len(), 1, "the xxh3 field is not what schema 1 checks");
        f.plain_digest = m.plain_sha256.clone();
        assert!(check(&m, &f).is_empty());
        f.plain_bytes = 4;
        assert!(check(&m, &f)[0].contains("sha256"));
    }
}
