//! One backup, end to end: producer → stream → (producer exited 0?) → complete → manifest, last.
//! A backup exists only when its manifest exists (safety rule 3); anything else is aborted.

use std::collections::BTreeMap;
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::digest::PlainDigest;
use super::postgres::{Snapshot, count_workers, pg_dump_args};
use super::seal::SealKeys;
use super::stream::{Encryption, StreamConfig, upload};
use crate::aws::s3::S3;
use crate::config::Config;
use tracing::{info, warn};

/// Object layout: `PREFIX/KIND/YYYY/MM/DD/ID/{data.zst.age, manifest.json}`.
pub const DATA: &str = "data.zst.age";
pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Postgres,
    Redis,
    /// A physical base backup of the PostgreSQL cluster (`pg_basebackup` tar), the start of
    /// point-in-time recovery with the WAL archive.
    Base,
}

impl Kind {
    /// Every kind, in backup order.
    pub const ALL: [Kind; 2] = [Kind::Postgres, Kind::Redis];

    /// `all`, `postgres`, `redis` or `base` as the kinds they name; `None` for anything else.
    /// `all` is postgres and redis, and base when WAL archiving is on (`with_base`).
    pub fn parse_set(s: &str) -> Option<Vec<Kind>> {
        match s {
            "all" => Some(Self::ALL.to_vec()),
            k => Kind::parse(k).map(|k| vec![k]),
        }
    }

    /// The kinds a run of everything covers under `cfg`.
    pub fn all_for(cfg: &Config) -> Vec<Kind> {
        let mut v = Self::ALL.to_vec();
        if cfg.backup.wal_archive {
            v.push(Kind::Base);
        }
        v
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Postgres => "postgres",
            Kind::Redis => "redis",
            Kind::Base => "base",
        }
    }
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "postgres" => Some(Kind::Postgres),
            "redis" => Some(Kind::Redis),
            "base" => Some(Kind::Base),
            _ => None,
        }
    }
}

/// `manifest.json`, written last and sealed (`super::seal`). Never holds a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub id: String,
    pub kind: Kind,
    pub instance_id: String,
    pub started_at: String,
    pub finished_at: String,
    pub duration_ms: u64,
    pub caretaker_version: String,
    pub producer: String,
    pub producer_version: String,
    pub producer_exit_status: i32,
    pub plain_bytes: u64,
    /// Schema 1: the plaintext's SHA-256. Empty from schema 2 on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plain_sha256: String,
    /// Schema 2: the plaintext's XXH3-128 (`super::digest`: why it need not be cryptographic).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plain_xxh3_128: String,
    pub stored_bytes: u64,
    pub stored_sha256: String,
    /// SHA-256 of the stored object's age header and nonce: checked before any plaintext is
    /// released (see `stream::age_prefix_len`).
    #[serde(default)]
    pub header_sha256: String,
    pub parts: usize,
    pub compression: serde_json::Value,
    pub encryption: serde_json::Value,
    /// postgres: `{"database": …, "row_counts": {table: n}}`; redis: `{"dbsize": n}`.
    pub details: serde_json::Value,
}

/// The manifest schema this caretaker writes (2: the plaintext digest is XXH3-128) and the
/// newest it reads (a newer one is refused by name, never half-read).
pub const MANIFEST_SCHEMA: u32 = 2;

impl Manifest {
    /// Which digest of the plaintext this manifest records, and the digest.
    pub fn plain_digest(&self) -> (PlainDigest, &str) {
        if self.schema >= 2 {
            (PlainDigest::Xxh3_128, &self.plain_xxh3_128)
        } else {
            (PlainDigest::Sha256, &self.plain_sha256)
        }
    }
}

/// `20261122T030000Z-a1b2c3`: sorts by time, to the millisecond — the suffix's top 10 bits are
/// the millisecond within the second (two backups of one second, e.g. a scheduled one and one
/// by hand, must list in the order they were taken: "the newest" is what a restore at boot
/// picks), the low 14 random.
pub fn new_id(now: SystemTime) -> String {
    let t = crate::units::compact_stamp(now);
    let millis = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_millis()).unwrap_or(0);
    let random =
        crate::calendar::random_delay(std::time::Duration::from_secs(1 << 14), "id").as_millis() as u32 & 0x3fff;
    let salt = (millis << 14) | random;
    format!("{t}-{salt:06x}")
}

/// Whether `id` has the shape [`new_id`] gives (it also names S3 keys and databases).
pub fn valid_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() == 23
        && b[..8].iter().all(u8::is_ascii_digit)
        && b[8] == b'T'
        && b[9..15].iter().all(u8::is_ascii_digit)
        && b[15] == b'Z'
        && b[16] == b'-'
        && b[17..].iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

/// `PREFIX/KIND/YYYY/MM/DD/ID/`.
/// Callers pass ids that passed [`valid_id`]; anything else gets a folder that holds nothing
/// (never a panic: an id may come from an object someone else put in the bucket).
pub fn folder(prefix: &str, kind: Kind, id: &str) -> String {
    let part =
        |r: std::ops::Range<usize>| id.get(r).filter(|p| p.bytes().all(|b| b.is_ascii_digit())).unwrap_or("invalid");
    let (y, m, d) = (part(0..4), part(4..6), part(6..8));
    format!("{prefix}/{}/{y}/{m}/{d}/{id}/", kind.as_str())
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backups are not configured: set backup.bucket")]
    NoBucket,
    #[error("no encryption key: set backup.recipients or put {var} in {file}")]
    NoKey { file: String, var: String },
    #[error("{0}")]
    Setup(String),
    #[error("the producer {producer} failed ({status}): {stderr}; the upload was aborted, earlier backups are intact")]
    Producer { producer: String, status: String, stderr: String },
    #[error("{0}; the upload was aborted, earlier backups are intact")]
    Stream(#[from] super::stream::StreamError),
    #[error("{0}")]
    S3(#[from] crate::aws::s3::S3Error),
    #[error("{0}")]
    Seal(#[from] super::seal::SealError),
}

/// The stream settings from the configuration (the passphrase read from its env file).
pub fn stream_config(cfg: &Config) -> Result<StreamConfig, BackupError> {
    let b = &cfg.backup;
    let encryption = if !b.recipients.is_empty() {
        let r: Result<Vec<_>, _> = b.recipients.iter().map(|r| r.parse::<age::x25519::Recipient>()).collect();
        Encryption::Recipients(r.map_err(|e| BackupError::Setup(format!("backup.recipients: {e}")))?)
    } else {
        let file = cfg.secrets.env_dir.join(format!("{}.env", b.passphrase_file));
        let no_key = || BackupError::NoKey { file: file.display().to_string(), var: b.passphrase_var.clone() };
        let pass = crate::envfile::read_env_var(&file, &b.passphrase_var).map_err(|_| no_key())?.ok_or_else(no_key)?;
        Encryption::Passphrase(age::secrecy::SecretString::from(pass.expose().to_string()))
    };
    Ok(StreamConfig {
        part_size: b.part_size as usize,
        parts_in_flight: b.parts_in_flight,
        zstd_level: b.zstd_level,
        encryption,
        priority: cfg.jobs.priority(),
    })
}

async fn tool_version(program: &std::path::Path) -> String {
    match tokio::process::Command::new(program).arg("--version").output().await {
        Ok(o) => String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_string(),
        Err(_) => String::new(),
    }
}

/// Takes one backup of `kind`; returns its manifest once it exists.
pub async fn backup(
    cfg: &Config,
    s3: &S3,
    kind: Kind,
    instance_id: &str,
    progress: impl Fn(String) + Send + Sync + 'static,
) -> Result<Manifest, BackupError> {
    let bucket = cfg.backup.bucket.clone().ok_or(BackupError::NoBucket)?;
    let stream_cfg = stream_config(cfg)?;
    // No key to seal the manifest with: refused before anything is uploaded.
    let keys = SealKeys::for_config(cfg)?;
    let started = SystemTime::now();
    let clock = Instant::now();
    let id = new_id(started);
    let folder = folder(&cfg.backup.prefix, kind, &id);
    let data_key = format!("{folder}{DATA}");
    let progress = std::sync::Arc::new(progress);
    let p = progress.clone();
    let on_part = move |read: u64, stored: u64, parts: usize| {
        p(format!(
            "{kind}: {} read, {} stored in {parts} parts, {}",
            crate::units::human_bytes(read),
            crate::units::human_bytes(stored),
            crate::units::human_rate(read, clock.elapsed()),
            kind = kind.as_str()
        ))
    };

    let (producer, producer_version, status, pending, details) = match kind {
        Kind::Postgres => {
            let target = crate::pg::PgTarget::new(&cfg.services.postgres);
            let db = &cfg.backup.database;
            progress(format!("postgres: exporting a snapshot of {db}"));
            let snapshot =
                Snapshot::export(&target, db).await.map_err(|e| BackupError::Setup(format!("postgres: {e}")))?;
            // How much room a restore of this backup will need (see backup::room).
            let (database_bytes, owner) = database_size_and_owner(&target, db).await.unzip();
            // pg_dump and the backend serving it run at `[jobs] nice`: on one vCPU the API's
            // queries come first. The backend is found by the application name given here.
            let app = format!("caretaker-backup-{id}");
            let mut cmd = target.tool("pg_dump").map_err(|e| BackupError::Setup(e.to_string()))?;
            cmd.args(pg_dump_args(&target, db, &snapshot.id)).env("PGAPPNAME", &app);
            crate::priority::child_at(&mut cmd, cfg.jobs.priority());
            let mut child = cmd.spawn().map_err(|e| BackupError::Setup(format!("cannot run pg_dump: {e}")))?;
            progress(format!("postgres: pg_dump of {db} streaming to s3://{bucket}/{data_key}"));
            let stdout = child.stdout.take().expect("piped");
            crate::fsutil::grow_pipe(&stdout);
            let err_task = crate::pg::collect_stderr(child.stderr.take());
            // The exact row counts come from the dump's own COPY text as it passes (one read of
            // the database, not two); what the stream cannot answer is counted in the same
            // snapshot afterwards, which stays open until then.
            let scan = std::sync::Arc::new(std::sync::Mutex::new(super::dump_scan::DumpScan::default()));
            let scanned = super::stream::Watched { inner: stdout, scan: scan.clone() };
            let uploading = upload(s3, &bucket, &data_key, scanned, stream_cfg.clone(), on_part);
            let pending =
                super::postgres::while_lowered(&target, "pg_dump", &app, cfg.jobs.priority(), uploading).await;
            let status = child.wait().await.map_err(|e| BackupError::Setup(format!("waiting for pg_dump: {e}")))?;
            let stderr = err_task.await.unwrap_or_default();
            let pending = match pending {
                Ok(p) => p,
                Err(e) => {
                    let _ = snapshot.end().await;
                    return Err(e.into());
                }
            };
            if !status.success() {
                let _ = snapshot.end().await;
                let _ = pending.abort().await;
                return Err(BackupError::Producer { producer: "pg_dump".into(), status: status.to_string(), stderr });
            }
            let scanned = std::mem::take(&mut *scan.lock().unwrap_or_else(|p| p.into_inner())).finish();
            let counts = match scanned {
                Ok(dumped) => super::postgres::counts_with_dump(&target, db, &snapshot.id, &dumped).await.map(|c| {
                    info!(
                        from_dump = c.from_dump,
                        by_sql = ?c.by_sql,
                        "row counts of {db}: {} table(s) from the dump's stream, {} with count(*)",
                        c.from_dump,
                        c.by_sql.len()
                    );
                    c.counts
                }),
                Err(why) => {
                    warn!("row counts of {db}: the dump's stream could not be read ({why}); counting with SQL instead");
                    progress(format!("postgres: counting rows of {db} with SQL"));
                    super::postgres::row_counts(&target, db, Some(&snapshot.id), count_workers()).await
                }
            };
            let _ = snapshot.end().await;
            let counts = match counts {
                Ok(c) => c,
                Err(e) => {
                    let _ = pending.abort().await;
                    return Err(BackupError::Setup(format!("postgres: counting rows in the snapshot: {e}")));
                }
            };
            let details = serde_json::json!({
                "database": db, "row_counts": counts, "database_bytes": database_bytes, "owner": owner
            });
            ("pg_dump".to_string(), tool_version(&target.tool_path("pg_dump")).await, status, pending, details)
        }
        Kind::Redis => {
            progress("redis: BGSAVE".into());
            let saved = super::redis::bgsave(&cfg.services.redis.url, std::time::Duration::from_secs(600))
                .await
                .map_err(|e| BackupError::Setup(format!("redis: {e}")))?;
            let file = tokio::fs::File::open(&saved.rdb_path)
                .await
                .map_err(|e| BackupError::Setup(format!("cannot read {}: {e}", saved.rdb_path.display())))?;
            progress(format!("redis: streaming {} to s3://{bucket}/{data_key}", saved.rdb_path.display()));
            let pending = upload(s3, &bucket, &data_key, file, stream_cfg.clone(), on_part).await?;
            let details =
                serde_json::json!({ "dbsize": saved.dbsize, "lastsave": saved.lastsave, "rdb": saved.rdb_path });
            let status = std::process::ExitStatus::default();
            (format!("redis {}", saved.redis_version), saved.redis_version.clone(), status, pending, details)
        }
        Kind::Base => {
            let target = crate::pg::PgTarget::new(&cfg.services.postgres);
            let facts = super::base::before(&target).await.map_err(BackupError::Setup)?;
            // pg_basebackup and the WAL sender reading the cluster for it run at `[jobs]`'s
            // priority, as a dump does.
            let app = format!("caretaker-base-{id}");
            let mut cmd = target.tool("pg_basebackup").map_err(|e| BackupError::Setup(e.to_string()))?;
            cmd.args(super::base::args(&target, &id)).env("PGAPPNAME", &app);
            crate::priority::child_at(&mut cmd, cfg.jobs.priority());
            let mut child = cmd.spawn().map_err(|e| BackupError::Setup(format!("cannot run pg_basebackup: {e}")))?;
            progress(format!("base: pg_basebackup streaming to s3://{bucket}/{data_key}"));
            let stdout = child.stdout.take().expect("piped");
            crate::fsutil::grow_pipe(&stdout);
            let err_task = crate::pg::collect_stderr(child.stderr.take());
            let scan = std::sync::Arc::new(std::sync::Mutex::new(super::base::TarScan::default()));
            let watched = super::stream::Watched { inner: stdout, scan: scan.clone() };
            let uploading = upload(s3, &bucket, &data_key, watched, stream_cfg.clone(), on_part);
            let pending =
                super::postgres::while_lowered(&target, "pg_basebackup", &app, cfg.jobs.priority(), uploading).await;
            let status =
                child.wait().await.map_err(|e| BackupError::Setup(format!("waiting for pg_basebackup: {e}")))?;
            let stderr = err_task.await.unwrap_or_default();
            let pending = pending?;
            if !status.success() {
                let _ = pending.abort().await;
                return Err(BackupError::Producer {
                    producer: "pg_basebackup".into(),
                    status: status.to_string(),
                    stderr,
                });
            }
            let tar = scan.lock().map(|s| s.facts.clone()).unwrap_or_default();
            let details = match super::base::details(&facts, &tar) {
                Ok(d) => d,
                Err(e) => {
                    let _ = pending.abort().await;
                    return Err(BackupError::Setup(format!("base: {e}")));
                }
            };
            let version = tool_version(&target.tool_path("pg_basebackup")).await;
            ("pg_basebackup".to_string(), version, status, pending, details)
        }
    };
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        id: id.clone(),
        kind,
        instance_id: instance_id.to_string(),
        started_at: crate::units::rfc3339(started),
        finished_at: crate::units::now_rfc3339(),
        duration_ms: clock.elapsed().as_millis() as u64,
        caretaker_version: crate::VERSION.into(),
        producer,
        producer_version,
        producer_exit_status: status.code().unwrap_or(0),
        plain_bytes: pending.plain_bytes,
        plain_sha256: String::new(),
        plain_xxh3_128: pending.plain_digest.clone(),
        stored_bytes: pending.stored_bytes,
        stored_sha256: pending.stored_sha256.clone(),
        header_sha256: pending.header_sha256.clone(),
        parts: pending.parts(),
        compression: serde_json::json!({ "algorithm": "zstd", "level": stream_cfg.zstd_level }),
        encryption: stream_cfg.encryption.describe(),
        details,
    };
    // S3 assembles the parts into the object here, after the last byte went up: its time, said
    // apart (on AWS well under a second; an emulator on the same machine may copy every byte).
    let assembling = Instant::now();
    pending.complete().await?;
    let assembled = assembling.elapsed();
    s3.put_object(&bucket, &format!("{folder}{MANIFEST}"), keys.seal(&manifest)).await?;
    progress(format!(
        "{}: backup {id} complete: {} → {} stored in {:.2} s ({:.2} s of it S3 assembling {} parts), {}",
        kind.as_str(),
        crate::units::human_bytes(manifest.plain_bytes),
        crate::units::human_bytes(manifest.stored_bytes),
        clock.elapsed().as_secs_f64(),
        assembled.as_secs_f64(),
        manifest.parts,
        crate::units::human_rate(manifest.plain_bytes, clock.elapsed())
    ));
    Ok(manifest)
}

/// `pg_database_size` of `db` and its owner (None when PostgreSQL does not say).
async fn database_size_and_owner(target: &crate::pg::PgTarget, db: &str) -> Option<(u64, String)> {
    let client = target.connect(db, std::time::Duration::from_secs(10)).await.ok()?;
    let row = client
        .query_one(
            "SELECT pg_database_size(current_database()), pg_get_userbyid(datdba)::text FROM pg_database
             WHERE datname = current_database()",
            &[],
        )
        .await
        .ok()?;
    Some((u64::try_from(row.get::<_, i64>(0)).ok()?, row.get(1)))
}

/// The S3 client for backups: region from the configuration, else from firstboot's instance.env.
pub async fn s3_for(cfg: &Config) -> Result<S3, BackupError> {
    let region = crate::aws::region::local(&cfg.aws).map_err(|e| BackupError::Setup(e.to_string()))?;
    let sdk = crate::aws::sdk::sdk_config(&cfg.aws, &region.name).await;
    Ok(S3::new(crate::aws::sdk::s3_client(&sdk, &cfg.aws))
        .with_unsigned_parts(crate::aws::s3::tls_endpoint(cfg.aws.s3_endpoint.as_deref())))
}

/// This instance's id (from firstboot's instance.env), or the host name.
pub fn instance_id() -> String {
    crate::envfile::instance_var("INSTANCE_ID")
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_default()
}

/// Every backup (manifest) of `kind` under the prefix, oldest first. Data without a manifest is
/// not a backup and is not listed; nor is a manifest that is not sealed by this box's keys, not
/// where caretaker writes it, or not about the backup its key names (see [`listing`]).
pub async fn list(cfg: &Config, s3: &S3, kind: Kind) -> Result<Vec<Manifest>, BackupError> {
    Ok(listing(cfg, s3, kind).await?.backups)
}

/// An object under the backup prefix that looks like a manifest but is not one caretaker wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub key: String,
    pub why: String,
}

/// The backups of a kind, and what was ignored.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub backups: Vec<Manifest>,
    pub ignored: Vec<Ignored>,
}

/// [`list`], with every ignored object and why (each also logged as a warning).
pub async fn listing(cfg: &Config, s3: &S3, kind: Kind) -> Result<Listing, BackupError> {
    listing_with(cfg, s3, kind, &SealKeys::for_config(cfg)?).await
}

/// [`listing`] with keys already read.
async fn listing_with(cfg: &Config, s3: &S3, kind: Kind, keys: &SealKeys) -> Result<Listing, BackupError> {
    let bucket = cfg.backup.bucket.clone().ok_or(BackupError::NoBucket)?;
    let prefix = format!("{}/{}/", cfg.backup.prefix, kind.as_str());
    let mut out = Listing::default();
    for key in s3.list_keys(&bucket, &prefix).await? {
        if !key.ends_with(&format!("/{MANIFEST}")) {
            continue;
        }
        let checked = match expected_id(&cfg.backup.prefix, kind, &key) {
            Err(why) => Err(why),
            Ok(id) => match s3.get_small(&bucket, &key, MANIFEST_MAX).await {
                Ok(Some(bytes)) => accept(keys, kind, &id, &bytes),
                Ok(None) => continue,
                Err(e) => Err(e.to_string()),
            },
        };
        match checked {
            Ok(m) => out.backups.push(m),
            Err(why) => {
                tracing::warn!("ignoring s3://{bucket}/{key}: {why} (not a backup caretaker wrote there)");
                out.ignored.push(Ignored { key, why });
            }
        }
    }
    out.backups.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// A manifest is at most this large (row counts of some thousand tables fit many times over).
pub const MANIFEST_MAX: usize = 4 << 20;

/// The id a manifest key names, when the key is exactly where caretaker writes manifests:
/// `PREFIX/KIND/YYYY/MM/DD/ID/manifest.json` with a valid id.
pub fn expected_id(prefix: &str, kind: Kind, key: &str) -> Result<String, String> {
    let id = key.strip_suffix(&format!("/{MANIFEST}")).and_then(|f| f.rsplit('/').next()).unwrap_or_default();
    if !valid_id(id) {
        return Err(format!("`{}` is not a backup id", id.escape_debug()));
    }
    if format!("{}{MANIFEST}", folder(prefix, kind, id)) != key {
        return Err(format!("a manifest of {id} belongs at {}{MANIFEST}", folder(prefix, kind, id)));
    }
    Ok(id.to_string())
}

/// The manifest in `bytes`, when one of `keys` sealed it and it says it is backup `id` of `kind`.
pub fn accept(keys: &SealKeys, kind: Kind, id: &str, bytes: &[u8]) -> Result<Manifest, String> {
    let doc = keys.open(bytes)?;
    let m: Manifest = serde_json::from_value(doc).map_err(|e| format!("not a manifest: {e}"))?;
    if m.id != id || m.kind != kind {
        return Err(format!("it says it is {} backup {}", m.kind.as_str(), m.id.escape_debug()));
    }
    if m.schema == 0 || m.schema > MANIFEST_SCHEMA {
        return Err(format!(
            "its schema is {}; this caretaker reads schemas 1 to {MANIFEST_SCHEMA} (a newer caretaker wrote it: upgrade to restore it)",
            m.schema
        ));
    }
    if m.header_sha256.len() != 64 {
        return Err("it records no age header hash".into());
    }
    let (kind, digest) = m.plain_digest();
    if !super::digest::well_formed(kind, digest) {
        return Err(format!("it records no {} of the plaintext", kind.name()));
    }
    Ok(m)
}

/// Whether `bytes` is a drill report sealed by `keys` saying that exactly backup `m` verified.
pub fn verified_by(keys: &SealKeys, m: &Manifest, bytes: &[u8]) -> bool {
    let Ok(doc) = keys.open(bytes) else { return false };
    doc["ok"] == true
        && doc["id"] == m.id.as_str()
        && doc["kind"] == m.kind.as_str()
        && doc["fetched"]["stored_sha256"] == m.stored_sha256.as_str()
}

/// `verify.json`, stored beside a backup by a restore drill.
pub const VERIFY: &str = "verify.json";

/// The newest backup of a kind and the newest one that passed its drill (for the metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct Newest {
    pub kind: Kind,
    /// When the newest backup finished, and its stored bytes.
    pub newest: Option<(SystemTime, u64)>,
    /// When the newest verified backup finished.
    pub newest_verified: Option<SystemTime>,
    /// When the oldest backup finished.
    pub oldest: Option<SystemTime>,
}

/// [`Newest`] of every kind: one listing per kind, and drill reports read from the newest backup
/// down until one verified (at most 60: an older verified backup counts as none).
pub async fn newest(cfg: &Config, s3: &S3) -> Result<Vec<Newest>, BackupError> {
    let bucket = cfg.backup.bucket.clone().ok_or(BackupError::NoBucket)?;
    let keys = SealKeys::for_config(cfg)?;
    let finished = |m: &Manifest| humantime::parse_rfc3339(&m.finished_at).ok();
    let mut out = Vec::new();
    for kind in Kind::all_for(cfg) {
        let backups = listing_with(cfg, s3, kind, &keys).await?.backups;
        let newest = backups.last().and_then(|m| Some((finished(m)?, m.stored_bytes)));
        let mut newest_verified = None;
        for m in backups.iter().rev().take(60) {
            let key = format!("{}{VERIFY}", folder(&cfg.backup.prefix, kind, &m.id));
            if let Ok(Some(bytes)) = s3.get_small(&bucket, &key, MANIFEST_MAX).await
                && verified_by(&keys, m, &bytes)
            {
                newest_verified = finished(m);
                break;
            }
        }
        let oldest = backups.first().and_then(finished);
        out.push(Newest { kind, newest, newest_verified, oldest });
    }
    Ok(out)
}

/// What pruning did (or, dry, would do): per backup, kept or deleted and why.
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    pub kind: Kind,
    pub decisions: Vec<super::retention::Decision>,
    pub dry_run: bool,
    /// Objects under the prefix that are not backups caretaker wrote: never deleted, never counted.
    pub ignored: Vec<Ignored>,
    /// Base backups: WAL files older than every kept base backup's start (and than the newest
    /// verified one's), deleted (or, dry, to delete).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wal_deleted: Vec<String>,
}

/// Applies retention to every kind: deletes what the plan does not keep — the manifest first (so
/// the backup stops existing), then the rest of its folder. Only sealed backups are planned: an
/// object someone else put in the prefix is never deleted, and a drill report counts only when
/// sealed and about exactly that backup.
pub async fn prune(cfg: &Config, s3: &S3, dry_run: bool) -> Result<Vec<PruneReport>, BackupError> {
    let bucket = cfg.backup.bucket.clone().ok_or(BackupError::NoBucket)?;
    let keys = SealKeys::for_config(cfg)?;
    let mut reports = Vec::new();
    for kind in Kind::all_for(cfg) {
        let Listing { backups: manifests, ignored } = listing_with(cfg, s3, kind, &keys).await?;
        let mut refs = Vec::new();
        for m in &manifests {
            let folder = folder(&cfg.backup.prefix, kind, &m.id);
            let verified = match s3.get_small(&bucket, &format!("{folder}{VERIFY}"), MANIFEST_MAX).await {
                Ok(Some(bytes)) => verified_by(&keys, m, &bytes),
                // Missing, oversized or unreadable: not verified (it only keeps fewer backups safe).
                _ => false,
            };
            let started = humantime::parse_rfc3339(&m.started_at).unwrap_or(SystemTime::UNIX_EPOCH);
            refs.push(super::retention::BackupRef { id: m.id.clone(), started, verified });
        }
        let decisions = super::retention::plan(&refs, cfg.backup.keep_daily, cfg.backup.keep_weekly);
        if !dry_run {
            for d in decisions.iter().filter(|d| !d.keep) {
                let folder = folder(&cfg.backup.prefix, kind, &d.id);
                s3.delete_object(&bucket, &format!("{folder}{MANIFEST}")).await?;
                for key in s3.list_keys(&bucket, &folder).await? {
                    s3.delete_object(&bucket, &key).await?;
                }
            }
        }
        let wal_deleted =
            if kind == Kind::Base { prune_wal(cfg, s3, &manifests, &refs, &decisions, dry_run).await? } else { vec![] };
        reports.push(PruneReport { kind, decisions, dry_run, ignored, wal_deleted });
    }
    Ok(reports)
}

/// WAL retention, by position, never by name or time: a WAL file goes only when its segment
/// number is below the start of every kept base backup and of the newest verified one (so WAL is
/// deleted only once a newer backup exists and passed its drill). `.history` files are kept always.
async fn prune_wal(
    cfg: &Config,
    s3: &S3,
    manifests: &[Manifest],
    refs: &[super::retention::BackupRef],
    decisions: &[super::retention::Decision],
    dry_run: bool,
) -> Result<Vec<String>, BackupError> {
    use super::wal::name::{self as walname, WalFile};
    let bucket = cfg.backup.bucket.clone().ok_or(BackupError::NoBucket)?;
    let start_of = |id: &str| {
        let m = manifests.iter().find(|m| m.id == id)?;
        let d: super::base::BaseDetails = serde_json::from_value(m.details.clone()).ok()?;
        Some(d.start_lsn.0 / d.segment_size.max(1 << 20))
    };
    let kept: Vec<Option<u64>> = decisions.iter().filter(|d| d.keep).map(|d| start_of(&d.id)).collect();
    let newest_verified = refs.iter().filter(|r| r.verified).max_by_key(|r| r.started).and_then(|r| start_of(&r.id));
    // No kept backup, one whose start is unreadable, or none verified: nothing is deleted.
    let (Some(verified), false, false) = (newest_verified, kept.is_empty(), kept.iter().any(Option::is_none)) else {
        return Ok(vec![]);
    };
    let cutoff = kept.iter().flatten().copied().min().unwrap_or(0).min(verified);
    let segment_size = walname::DEFAULT_SEGMENT_SIZE;
    let mut deleted = Vec::new();
    for key in s3.list_keys(&bucket, &walname::folder(&cfg.backup.prefix)).await? {
        let Some(file) = walname::from_key(&cfg.backup.prefix, &key, segment_size) else { continue };
        let number = match &file {
            WalFile::Segment(s) | WalFile::Partial(s) | WalFile::BackupLabel(s, _) => s.number,
            WalFile::History(_) => continue,
        };
        if number < cutoff {
            if !dry_run {
                s3.delete_object(&bucket, &key).await?;
            }
            deleted.push(file.file_name(segment_size));
        }
    }
    // The WAL tip's chunks by the same rule (those of archived segments went already; what is
    // left is the tail of a timeline or cluster that never archived it whole).
    let mut tips = std::collections::BTreeSet::new();
    for key in s3.list_keys(&bucket, &super::wal::tip_key::folder(&cfg.backup.prefix)).await? {
        let Some((_, s, _, _)) = super::wal::tip_key::parse_chunk_key(&cfg.backup.prefix, &key, segment_size) else {
            continue;
        };
        if s.number < cutoff {
            if !dry_run {
                s3.delete_object(&bucket, &key).await?;
            }
            tips.insert(format!("{}.tip", s.file_name(segment_size)));
        }
    }
    deleted.extend(tips);
    Ok(deleted)
}

/// The row counts of a postgres manifest.
pub fn row_counts(m: &Manifest) -> BTreeMap<String, i64> {
    serde_json::from_value(m.details["row_counts"].clone()).unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_place_in_folders() {
        let a = new_id(humantime::parse_rfc3339("2026-11-22T03:00:00Z").unwrap());
        let b = new_id(humantime::parse_rfc3339("2026-11-22T03:00:01Z").unwrap());
        assert!(a < b, "{a} {b}");
        assert!(a.starts_with("20261122T030000Z-") && a.len() == 23, "{a}");
        assert_eq!(folder("caretaker", Kind::Postgres, &a), format!("caretaker/postgres/2026/11/22/{a}/"));
        // Within one second, by the millisecond (whatever the random bits).
        let t = humantime::parse_rfc3339("2026-11-22T03:00:00Z").unwrap();
        for ms in [0u64, 1, 15, 16, 499, 998] {
            for _ in 0..20 {
                let earlier = new_id(t + std::time::Duration::from_millis(ms));
                let later = new_id(t + std::time::Duration::from_millis(ms + 1));
                assert!(earlier < later && valid_id(&earlier) && valid_id(&later), "{earlier} {later}");
            }
        }
        assert!(valid_id(&new_id(t + std::time::Duration::from_millis(999))));
    }

    pub(crate) fn manifest(schema: u32, id: &str) -> Manifest {
        Manifest {
            schema,
            id: id.into(),
            kind: Kind::Postgres,
            instance_id: "i-0".into(),
            started_at: "2026-11-22T03:00:00Z".into(),
            finished_at: "2026-11-22T03:00:01Z".into(),
            duration_ms: 1000,
            caretaker_version: "t".into(),
            producer: "pg_dump".into(),
            producer_version: "16".into(),
            producer_exit_status: 0,
            plain_bytes: 3,
            plain_sha256: String::new(),
            plain_xxh3_128: String::new(),
            stored_bytes: 1,
            stored_sha256: "0".repeat(64),
            header_sha256: "0".repeat(64),
            parts: 1,
            compression: serde_json::json!({}),
            encryption: serde_json::json!({}),
            details: serde_json::json!({}),
        }
    }

    #[test]
    fn manifests_of_both_schemas_are_read_with_their_own_digest_and_newer_ones_refused_by_name() {
        let keys = SealKeys::from_secrets([b"secret".as_slice()]);
        let id = new_id(humantime::parse_rfc3339("2026-11-22T03:00:00Z").unwrap());
        // Schema 1 (before XXH3): SHA-256 of the plaintext.
        let mut old = manifest(1, &id);
        old.plain_sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"abc"));
        let read = accept(&keys, Kind::Postgres, &id, &keys.seal(&old)).unwrap();
        assert_eq!(read.plain_digest(), (PlainDigest::Sha256, old.plain_sha256.as_str()));
        // What this caretaker writes: schema 2, XXH3-128, and no plain_sha256 key at all.
        let mut new = manifest(MANIFEST_SCHEMA, &id);
        new.plain_xxh3_128 = super::super::digest::xxh3_128_hex(b"abc");
        let doc = serde_json::to_value(&new).unwrap();
        assert!(doc.get("plain_sha256").is_none() && doc["plain_xxh3_128"].as_str().unwrap().len() == 32);
        let read = accept(&keys, Kind::Postgres, &id, &keys.seal(&new)).unwrap();
        assert_eq!(read.plain_digest(), (PlainDigest::Xxh3_128, new.plain_xxh3_128.as_str()));
        // A schema-2 manifest with only a SHA-256 (or none) names no digest this schema checks.
        let mut wrong = manifest(2, &id);
        wrong.plain_sha256 = old.plain_sha256.clone();
        let err = accept(&keys, Kind::Postgres, &id, &keys.seal(&wrong)).unwrap_err();
        assert!(err.contains("no xxh3-128 of the plaintext"), "{err}");
        let err = accept(&keys, Kind::Postgres, &id, &keys.seal(&manifest(1, &id))).unwrap_err();
        assert!(err.contains("no sha256 of the plaintext"), "{err}");
        // A newer caretaker's manifest is refused, saying so, whatever else it holds.
        let mut newer = new.clone();
        newer.schema = MANIFEST_SCHEMA + 1;
        let err = accept(&keys, Kind::Postgres, &id, &keys.seal(&newer)).unwrap_err();
        assert!(err.contains("schema is 3") && err.contains("newer caretaker"), "{err}");
        let err = accept(&keys, Kind::Postgres, &id, &keys.seal(&manifest(0, &id))).unwrap_err();
        assert!(err.contains("schema is 0"), "{err}");
    }
}
