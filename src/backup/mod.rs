//! Backups: scheduled, streamed, compressed, encrypted, committed by manifest, retained, verified.

/// The alert emails of backups and drills.
pub mod alerts;
/// The way back: S3 → age → zstd → a sink, hashed.
pub mod fetch;
/// PostgreSQL: one snapshot for the dump and exact row counts.
pub mod postgres;
/// Redis: a fresh, successful BGSAVE and its RDB file.
pub mod redis;
/// Which backups to keep.
pub mod retention;
/// One backup end to end, the manifest, listing.
pub mod run;
/// Calendar expressions for backups and drills.
pub mod schedule;
/// The daemon's schedule of backups, retention and drills.
pub mod scheduler;
/// plaintext → zstd → age → S3 multipart, bounded memory, no disk.
pub mod stream;
/// Restore drills; loading a backup into a new database, checked.
pub mod verify;
