//! Point-in-time recovery's WAL side: archiving every segment to S3 (only once S3 holds it does
//! PostgreSQL hear "archived"), fetching them back for recovery, the chain and its window.

/// The S3 archive: put once, get checked, list.
pub mod archive;
/// The window and the chain: which segments a restore needs, and whether they are all there.
pub mod chain;
/// `caretaker wal push|fetch`: PostgreSQL's archive and restore commands.
pub mod client;
/// What a segment's first page says about itself.
pub mod header;
/// Watching archiving: backlog, lag, pg_wal, the chain.
pub mod monitor;
/// WAL file names, segments and LSNs.
pub mod name;
/// One archived file as one sealed S3 object.
pub mod object;
/// The socket PostgreSQL's commands talk to.
pub mod server;
/// The unfinished segment, streamed from PostgreSQL and stored in S3 every second or so.
pub mod tip;
/// The WAL tip's chunk keys.
pub mod tip_key;
