//! Backups: scheduled, streamed, compressed, encrypted, committed by manifest, retained, verified.

/// The alert emails of backups and drills.
pub mod alerts;
/// The restore firstboot runs on a blank volume: the newest base backup and WAL (or dump).
pub mod at_boot;
/// Physical base backups (pg_basebackup), the start of point-in-time recovery.
pub mod base;
/// The plaintext's digest (XXH3-128; SHA-256 in schema-1 manifests) and why it need not be cryptographic.
pub mod digest;
/// A cluster built from a logical dump (the restore at boot without base backups).
pub mod dump_build;
/// Exact row counts read from pg_dump's stream as it passes.
pub mod dump_scan;
/// The way back: S3 → age → zstd → a sink, hashed.
pub mod fetch;
/// One writer per backup prefix: a lease object in S3.
pub mod lease;
/// What jobs create beside the live data, recorded so that a killed job leaves nothing behind.
pub mod leftovers;
/// Migration from an external PostgreSQL: copy, prove equal, then swap.
pub mod migrate;
/// Point-in-time restore: base backup + WAL into a new data directory, verified, swapped in.
pub mod pitr;
/// PostgreSQL: one snapshot for the dump and exact row counts.
pub mod postgres;
/// Redis: a fresh, successful BGSAVE and its RDB file.
pub mod redis;
/// Restores from backups: load into something new, verify, then swap.
pub mod restore;
/// Restore points with the exact row counts they hold (what a PITR drill compares).
pub mod restore_point;
/// Which backups to keep.
pub mod retention;
/// Room for a second copy: checked before, watched during a load.
pub mod room;
/// One backup end to end, the manifest, listing.
pub mod run;
/// Seals (MACs) on what caretaker writes beside a backup.
pub mod seal;
/// plaintext → zstd → age → S3 multipart, bounded memory, no disk.
pub mod stream;
/// Swapping a verified database in for the live one.
pub mod swap;
/// pg_restore as a role without superuser.
pub mod unprivileged;
/// Restore drills; loading a backup into a new database, checked.
pub mod verify;
/// Point-in-time recovery: the WAL archive, its chain and its window.
pub mod wal;
