//! The WAL archive in S3: put a file (only once, only after its header matched the cluster), get
//! one back (only when its seal and hashes hold), list what is there.

use std::time::Duration;

use super::header;
use super::name::{WalFile, folder, from_key, key};
use super::object::{Description, Encoder, decode, encode};
use crate::aws::s3::{Put, S3, S3Error};
use crate::backup::fetch::{Decryption, FetchError};
use crate::backup::run::BackupError;
use crate::backup::seal::SealKeys;
use crate::backup::stream::Encryption;
use crate::config::Config;

/// A streamed push reads and encodes a segment this much at a time.
const PUSH_CHUNK: usize = 256 << 10;

/// History and backup label files are small text files; anything larger is not one.
pub const MAX_TEXT_FILE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Not a file this cluster should archive (a bad name, a header from elsewhere): refused.
    #[error("{name}: refused: {why}")]
    Refused { name: String, why: String },
    /// The archive already holds different content under this name: never overwritten.
    #[error(
        "{name}: the archive already holds a different {what} under this name (stored sha256 {theirs}, this one {ours}); \
         it was not overwritten — two clusters may be archiving into one prefix"
    )]
    Conflict { name: String, what: &'static str, theirs: String, ours: String },
    /// The object under this name was not written by this deployment or was altered.
    #[error("{name}: the archived object cannot be used: {why}")]
    Foreign { name: String, why: String },
    #[error("{0}")]
    S3(#[from] S3Error),
    #[error("{0}")]
    Fetch(#[from] FetchError),
    #[error("{name}: S3 did not answer within {secs} s")]
    Deadline { name: String, secs: u64 },
    #[error("{0}")]
    Setup(String),
}

impl WalError {
    /// Whether trying again later may succeed (S3 errors, deadlines) — as opposed to a refusal
    /// or a conflict, which stay until someone acts.
    pub fn is_transient(&self) -> bool {
        matches!(self, WalError::S3(_) | WalError::Deadline { .. })
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pushed {
    /// Stored now.
    Archived,
    /// The archive held the same content already.
    AlreadyArchived,
}

/// One deployment's WAL archive.
pub struct Archive {
    pub s3: S3,
    pub bucket: String,
    pub prefix: String,
    pub encryption: Encryption,
    /// None on a box that holds only the public recipient (it archives but cannot restore).
    pub decryption: Option<Decryption>,
    pub keys: SealKeys,
    pub zstd_level: i32,
    pub segment_size: u64,
    /// Every call to S3 is bounded by this: archive_command and restore_command never hang.
    pub deadline: Duration,
}

impl Archive {
    /// The archive of this configuration's backup bucket and prefix, with its keys. A box without
    /// the identity or passphrase archives but cannot fetch.
    pub fn for_config(cfg: &Config, s3: S3) -> Result<Archive, BackupError> {
        let bucket = cfg.backup.bucket.clone().ok_or(BackupError::NoBucket)?;
        let stream = crate::backup::run::stream_config(cfg)?;
        Ok(Archive {
            s3,
            bucket,
            prefix: cfg.backup.prefix.clone(),
            encryption: stream.encryption,
            decryption: crate::backup::fetch::decryption(cfg).ok(),
            keys: SealKeys::for_config(cfg)?,
            zstd_level: cfg.backup.zstd_level,
            segment_size: super::name::DEFAULT_SEGMENT_SIZE,
            deadline: Duration::from_secs(60),
        })
    }

    pub fn parse(&self, name: &str) -> Result<WalFile, WalError> {
        WalFile::parse(name, self.segment_size).map_err(|why| WalError::Refused { name: safe(name), why })
    }

    async fn bounded<T>(&self, name: &str, f: impl Future<Output = Result<T, WalError>>) -> Result<T, WalError> {
        tokio::time::timeout(self.deadline, f)
            .await
            .map_err(|_| WalError::Deadline { name: name.to_string(), secs: self.deadline.as_secs() })?
    }

    /// Archives `plain` as `name` of the cluster `system_identifier`: Ok only once S3 holds it.
    pub async fn push(&self, name: &str, plain: Vec<u8>, system_identifier: u64) -> Result<Pushed, WalError> {
        let file = self.parse(name)?;
        let refused = |why: String| WalError::Refused { name: name.to_string(), why };
        match &file {
            WalFile::Segment(s) | WalFile::Partial(s) => {
                header::check(&plain, *s, self.segment_size, system_identifier).map_err(refused)?
            }
            WalFile::History(_) | WalFile::BackupLabel(..) => {
                if plain.len() > MAX_TEXT_FILE || std::str::from_utf8(&plain).is_err() {
                    return Err(refused(format!("{} bytes that are not a text file", plain.len())));
                }
            }
        }
        // Compression and encryption on a blocking thread: the daemon's loop keeps answering.
        let (enc, level, owned) = (self.encryption.clone(), self.zstd_level, name.to_string());
        let (stored, description) =
            tokio::task::spawn_blocking(move || encode(&owned, &plain, &enc, level, system_identifier))
                .await
                .map_err(|e| WalError::Setup(format!("{name}: the encoder thread failed: {e}")))?
                .map_err(|e| WalError::Setup(format!("{name}: compressing/encrypting: {e}")))?;
        self.store(name, &file, stored, &description).await
    }

    /// Archives the segment `name` of `bytes` bytes read from `body`, streamed: its header is
    /// checked on the first piece, before anything is stored, and the plaintext is never held
    /// whole (compressed and encrypted as it arrives, on a blocking thread). Files other than
    /// segments are small: read whole and [`Self::push`]ed.
    pub async fn push_from(
        &self,
        name: &str,
        bytes: u64,
        body: &mut (impl tokio::io::AsyncRead + Unpin),
        system_identifier: u64,
    ) -> Result<Pushed, WalError> {
        use tokio::io::AsyncReadExt;
        let file = self.parse(name)?;
        let reading = |e: std::io::Error| WalError::Setup(format!("reading {name}: {e}"));
        let (WalFile::Segment(s) | WalFile::Partial(s)) = file else {
            if bytes > MAX_TEXT_FILE as u64 {
                return Err(WalError::Refused { name: name.into(), why: format!("{bytes} bytes is not a text file") });
            }
            let mut plain = vec![0u8; bytes as usize];
            body.read_exact(&mut plain).await.map_err(reading)?;
            return self.push(name, plain, system_identifier).await;
        };
        let chunk = PUSH_CHUNK.min(bytes as usize);
        let mut first = vec![0u8; chunk];
        body.read_exact(&mut first).await.map_err(reading)?;
        header::check_start(&first, bytes, s, self.segment_size, system_identifier)
            .map_err(|why| WalError::Refused { name: name.to_string(), why })?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
        let (enc, level, owned) = (self.encryption.clone(), self.zstd_level, name.to_string());
        let encoder = tokio::task::spawn_blocking(move || {
            let mut e = Encoder::new(&owned, &enc, level, system_identifier, bytes / 3)?;
            while let Some(piece) = rx.blocking_recv() {
                e.write(&piece)?;
            }
            Ok::<_, String>(e)
        });
        let mut sent = 0u64;
        let mut piece = first;
        loop {
            sent += piece.len() as u64;
            if tx.send(piece).await.is_err() {
                break; // the encoder failed: its error is below
            }
            if sent == bytes {
                break;
            }
            let mut next = vec![0u8; PUSH_CHUNK.min((bytes - sent) as usize)];
            if let Err(e) = body.read_exact(&mut next).await {
                drop(tx);
                let _ = encoder.await;
                return Err(reading(e));
            }
            piece = next;
        }
        drop(tx);
        let e = encoder
            .await
            .map_err(|e| WalError::Setup(format!("{name}: the encoder thread failed: {e}")))?
            .map_err(|e| WalError::Setup(format!("{name}: compressing/encrypting: {e}")))?;
        let (stored, description) = tokio::task::spawn_blocking(move || e.finish())
            .await
            .map_err(|e| WalError::Setup(format!("{name}: the encoder thread failed: {e}")))?
            .map_err(|e| WalError::Setup(format!("{name}: compressing/encrypting: {e}")))?;
        if description.plain_bytes != bytes {
            return Err(WalError::Setup(format!("{name}: {} of {bytes} bytes encoded", description.plain_bytes)));
        }
        self.store(name, &file, stored, &description).await
    }

    /// Puts `stored` under `name`'s key only if the key is new; an existing object with the same
    /// plaintext is a success, with other content a conflict (never overwritten).
    async fn store(
        &self,
        name: &str,
        file: &WalFile,
        stored: Vec<u8>,
        description: &super::object::Description,
    ) -> Result<Pushed, WalError> {
        let key = key(&self.prefix, file, self.segment_size);
        let metadata = description.metadata(&self.keys);
        self.bounded(name, async {
            // A retry of a push whose answer was lost finds its own object: same plaintext, success.
            if self.s3.head_metadata(&self.bucket, &key).await?.is_none() {
                match self.s3.put_new(&self.bucket, &key, stored, &metadata).await? {
                    Put::Created => return Ok(Pushed::Archived),
                    Put::Exists => {}
                }
            }
            let theirs = self.s3.head_metadata(&self.bucket, &key).await?.unwrap_or_default();
            let what = if file.is_history() { "timeline history" } else { "file" };
            match Description::open(name, &theirs, &self.keys) {
                Ok(d) if d.plain_sha256 == description.plain_sha256 => Ok(Pushed::AlreadyArchived),
                Ok(d) => Err(WalError::Conflict {
                    name: name.into(),
                    what,
                    theirs: d.plain_sha256,
                    ours: description.plain_sha256.clone(),
                }),
                Err(why) => Err(WalError::Conflict {
                    name: name.into(),
                    what,
                    theirs: format!("unknown: {why}"),
                    ours: description.plain_sha256.clone(),
                }),
            }
        })
        .await
    }

    /// The plaintext of `name` (None when the archive has no such file), checked: seal, hashes,
    /// and for segments the header against `system_identifier` when given.
    pub async fn fetch(&self, name: &str, system_identifier: Option<u64>) -> Result<Option<Vec<u8>>, WalError> {
        let file = self.parse(name)?;
        let decryption = self.decryption.as_ref().ok_or_else(|| {
            WalError::Setup("this box has no identity or passphrase to decrypt the WAL archive with".into())
        })?;
        let key = key(&self.prefix, &file, self.segment_size);
        let max_stored = (self.segment_size + self.segment_size / 8 + (64 << 10)) as usize;
        let Some((stored, metadata)) = self
            .bounded(name, async { Ok(self.s3.get_small_with_metadata(&self.bucket, &key, max_stored).await?) })
            .await?
        else {
            return Ok(None);
        };
        let foreign = |why: String| WalError::Foreign { name: name.to_string(), why };
        let d = Description::open(name, &metadata, &self.keys).map_err(foreign)?;
        let max_plain = match file {
            WalFile::Segment(_) | WalFile::Partial(_) => self.segment_size,
            _ => MAX_TEXT_FILE as u64,
        };
        let (dec, opened) = (decryption.clone(), d.clone());
        let plain = tokio::task::spawn_blocking(move || decode(&stored, &opened, &dec, max_plain))
            .await
            .map_err(|e| WalError::Setup(format!("{name}: the decoder thread failed: {e}")))?
            .map_err(|e| foreign(e.to_string()))?;
        if let WalFile::Segment(s) | WalFile::Partial(s) = file {
            let sysid = system_identifier.unwrap_or(d.system_identifier);
            header::check(&plain, s, self.segment_size, sysid).map_err(foreign)?;
        }
        Ok(Some(plain))
    }

    /// Every file in the archive (keys that name none are left out).
    pub async fn list(&self) -> Result<Vec<WalFile>, WalError> {
        let keys = self.s3.list_keys(&self.bucket, &folder(&self.prefix)).await?;
        let mut files: Vec<WalFile> =
            keys.iter().filter_map(|k| from_key(&self.prefix, k, self.segment_size)).collect();
        files.sort();
        Ok(files)
    }

    /// The sealed description of `name`, when the archive holds it.
    pub async fn describe(&self, file: &WalFile) -> Result<Option<Description>, WalError> {
        let name = file.file_name(self.segment_size);
        let key = key(&self.prefix, file, self.segment_size);
        let Some(meta) = self.bounded(&name, async { Ok(self.s3.head_metadata(&self.bucket, &key).await?) }).await?
        else {
            return Ok(None);
        };
        Description::open(&name, &meta, &self.keys).map(Some).map_err(|why| WalError::Foreign { name, why })
    }
}

/// A name as it may appear in a message: printable, bounded.
fn safe(name: &str) -> String {
    name.chars().take(64).flat_map(char::escape_debug).collect()
}
