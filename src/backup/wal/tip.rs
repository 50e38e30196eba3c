//! The WAL tip: the unfinished segment, in S3 within seconds of its commit.
//!
//! `archive_command` stores whole segments only: up to `archive-timeout` of commits live on the
//! box alone. The tip closes that window. The daemon streams WAL from PostgreSQL (the replication
//! protocol, [`crate::replication`]) and every `wal-tip-interval` stores the bytes received since
//! the last chunk as one sealed object, `PREFIX/wal-tip/SYSID/SEGMENT/START-END.zst.age` (the
//! cluster's system identifier: a second cluster writing into the prefix — a new box's blank one,
//! a restored copy — never mixes its chunks with the first's; offsets in the segment, hex; zstd →
//! age, described and sealed like an archived file). A restore asks the
//! archive for a segment first; only a segment the archive does not hold is assembled from its
//! chunks (contiguous from offset 0, padded with zeros to a segment's size: PostgreSQL replays
//! the records it finds and ends recovery at the first empty one, as with pg_receivewal's
//! `.partial` files). Once the archive holds a whole segment, its chunks are deleted.
//!
//! **No replication slot.** A slot makes PostgreSQL keep every segment the slot has not
//! confirmed: a daemon that dies, or cannot reach S3, would fill pg_wal and stop the database.
//! Without one, the archive (whose `archive_command` PostgreSQL waits for) already keeps every
//! whole segment; the tip only ever needs the current one, and starts there after any
//! interruption. What it gives up — bytes of an old segment it fell behind on — the archive has.
//! Losing the tip costs RPO (back to `archive-timeout`), never data, and never disk.
//!
//! What crosses the boundary is checked: the stream must be contiguous from where the tip asked
//! it to start, every WAL page that begins in a chunk must carry its own address and a WAL magic,
//! a segment's first page its cluster's system identifier; a chunk in S3 is used only when its
//! seal (this deployment's keys, bound to its key's segment and offsets) and hashes hold.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::archive::{Archive, WalError};
use super::header;
use super::name::{Lsn, Segment, WalFile};
use super::object::{Description, decode, encode};
use crate::aws::s3::Put;
use crate::pg::PgTarget;
use crate::replication::{Message, ReplError, Replication};

/// The application name the tip's connection carries (`pg_stat_replication`).
pub const APPLICATION: &str = "caretaker-wal-tip";
/// WAL pages are 8 KiB (`XLOG_BLCKSZ`; caretaker refuses segments of other block sizes).
const PAGE: u64 = 8192;
/// Bytes received but not yet in S3 beyond this (S3 slow or down): the tip lets go of them and
/// starts over at the current segment (the archive still gets every whole segment).
const MAX_PENDING: usize = 64 << 20;
/// More chunks than this under one segment is not something the tip wrote.
const MAX_CHUNKS: usize = 20_000;

pub use super::tip_key::{chunk_key, folder, parse_chunk_key};
use super::tip_key::{chunk_name, segment_folder};

/// Checks the WAL bytes `bytes` that start at `at` on `timeline`: every page that begins in
/// them is a WAL page at its own address, of this timeline or an earlier one; a segment's first
/// page also carries the cluster's system identifier and segment size.
pub fn check_pages(
    bytes: &[u8],
    at: u64,
    timeline: u32,
    segment_size: u64,
    system_identifier: u64,
) -> Result<(), String> {
    let mut page = at.div_ceil(PAGE) * PAGE;
    while page + 24 <= at + bytes.len() as u64 {
        let i = (page - at) as usize;
        let h = &bytes[i..];
        let magic = u16::from_le_bytes([h[0], h[1]]);
        // After a segment switch (pg_switch_wal, a base backup, archive_timeout) PostgreSQL
        // fills the rest of the segment with zeros, headers included, and streams them: an
        // all-zero page is the faithful copy of that, never garbage.
        let in_page = h.len().min(PAGE as usize);
        if magic == 0 && h[..in_page].iter().all(|&b| b == 0) {
            page += PAGE;
            continue;
        }
        if !(0xD000..=0xD1FF).contains(&magic) {
            return Err(format!("the page at {} has magic {magic:#06X}, not a WAL page's", Lsn(page)));
        }
        let tli = u32::from_le_bytes(h[4..8].try_into().expect("4"));
        let addr = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        if addr != page {
            return Err(format!("the page at {} says it is at {}", Lsn(page), Lsn(addr)));
        }
        if tli > timeline {
            return Err(format!("the page at {} is from timeline {tli}, after {timeline}", Lsn(page)));
        }
        if page % segment_size == 0 && h.len() >= header::LONG_HEADER_LEN {
            let long = header::read(h)?;
            if long.system_identifier != system_identifier {
                return Err(format!(
                    "the segment at {} belongs to the cluster {}, not {system_identifier}",
                    Lsn(page),
                    long.system_identifier
                ));
            }
            if u64::from(long.segment_size) != segment_size || u64::from(long.block_size) != PAGE {
                return Err(format!("the segment at {} has another segment or page size", Lsn(page)));
            }
        }
        page += PAGE;
    }
    Ok(())
}

/// Stores the chunk `[start, start + plain.len())` of `s`. Ok once S3 holds it (or held the same
/// bytes already).
pub async fn put_chunk(
    archive: &Archive,
    s: Segment,
    start: u64,
    plain: Vec<u8>,
    system_identifier: u64,
) -> Result<(), WalError> {
    let seg = archive.segment_size;
    let end = start + plain.len() as u64;
    let name = chunk_name(s, start, end, seg);
    let key = chunk_key(&archive.prefix, system_identifier, s, start, end, seg);
    let (enc, level, owned) = (archive.encryption.clone(), archive.zstd_level, name.clone());
    let (stored, d) = tokio::task::spawn_blocking(move || encode(&owned, &plain, &enc, level, system_identifier))
        .await
        .map_err(|e| WalError::Setup(format!("{name}: the encoder thread failed: {e}")))?
        .map_err(|e| WalError::Setup(format!("{name}: compressing/encrypting: {e}")))?;
    let metadata = d.metadata(&archive.keys);
    let work = async {
        match archive.s3.put_new(&archive.bucket, &key, stored, &metadata).await? {
            Put::Created => Ok(()),
            Put::Exists => {
                let theirs = archive.s3.head_metadata(&archive.bucket, &key).await?.unwrap_or_default();
                match Description::open(&name, &theirs, &archive.keys) {
                    Ok(t) if t.plain_sha256 == d.plain_sha256 => Ok(()),
                    other => Err(WalError::Conflict {
                        name: name.clone(),
                        what: "WAL tip chunk",
                        theirs: other.map(|t| t.plain_sha256).unwrap_or_else(|e| format!("unknown: {e}")),
                        ours: d.plain_sha256.clone(),
                    }),
                }
            }
        }
    };
    tokio::time::timeout(archive.deadline, work)
        .await
        .map_err(|_| WalError::Deadline { name: key.clone(), secs: archive.deadline.as_secs() })?
}

/// The chunks S3 holds for the cluster `sysid`'s segment `s`: `(start, end, key)`, sorted.
async fn chunks_of(archive: &Archive, sysid: u64, s: Segment) -> Result<Vec<(u64, u64, String)>, WalError> {
    let folder = segment_folder(&archive.prefix, sysid, s, archive.segment_size);
    let keys = archive.s3.list_keys(&archive.bucket, &folder).await?;
    if keys.len() > MAX_CHUNKS {
        return Err(WalError::Foreign {
            name: s.file_name(archive.segment_size),
            why: format!("{} objects under {folder}: not the tip's", keys.len()),
        });
    }
    let mut chunks: Vec<(u64, u64, String)> = keys
        .into_iter()
        .filter_map(|k| parse_chunk_key(&archive.prefix, &k, archive.segment_size).map(|(_, _, a, b)| (a, b, k)))
        .collect();
    chunks.sort();
    Ok(chunks)
}

/// The cluster `id`'s segment `s` as the tip holds it, and how many bytes of it the tip had: its
/// chunks from offset 0 as far as they are contiguous, padded with zeros to a segment (None when
/// the tip has no chunk at offset 0). Every chunk used is checked (seal, hashes, pages, system
/// identifier); a chunk that fails is an error, never skipped.
pub async fn fetch_segment(archive: &Archive, s: Segment, id: u64) -> Result<Option<(Vec<u8>, u64)>, WalError> {
    let seg = archive.segment_size;
    let name = s.file_name(seg);
    let decryption = archive
        .decryption
        .as_ref()
        .ok_or_else(|| WalError::Setup("this box has no identity or passphrase to decrypt the WAL tip with".into()))?;
    let chunks = tokio::time::timeout(archive.deadline, chunks_of(archive, id, s))
        .await
        .map_err(|_| WalError::Deadline { name: name.clone(), secs: archive.deadline.as_secs() })??;
    let mut plain: Vec<u8> = Vec::new();
    loop {
        let pos = plain.len() as u64;
        // The chunk reaching furthest among those that cover `pos`.
        let Some((start, end, key)) = chunks.iter().filter(|(a, b, _)| *a <= pos && pos < *b).max_by_key(|c| c.1)
        else {
            break;
        };
        let cname = chunk_name(s, *start, *end, seg);
        let foreign = |why: String| WalError::Foreign { name: cname.clone(), why };
        let max_stored = ((end - start) + (end - start) / 8 + (64 << 10)) as usize;
        let got = tokio::time::timeout(
            archive.deadline,
            archive.s3.get_small_with_metadata(&archive.bucket, key, max_stored),
        )
        .await
        .map_err(|_| WalError::Deadline { name: cname.clone(), secs: archive.deadline.as_secs() })??;
        let Some((stored, metadata)) = got else {
            // Deleted since the listing: the archive holds the whole segment now.
            return Err(WalError::S3(crate::aws::s3::S3Error {
                operation: "GetObject",
                bucket: archive.bucket.clone(),
                key: key.clone(),
                message: "the chunk was deleted since it was listed (the segment was archived meanwhile); ask again"
                    .into(),
            }));
        };
        let d = Description::open(&cname, &metadata, &archive.keys).map_err(&foreign)?;
        if d.system_identifier != id {
            return Err(foreign(format!("it is of the cluster {}, not {id}", d.system_identifier)));
        }
        let (dec, opened, n) = (decryption.clone(), d.clone(), end - start);
        let bytes = tokio::task::spawn_blocking(move || decode(&stored, &opened, &dec, n))
            .await
            .map_err(|e| WalError::Setup(format!("{cname}: the decoder thread failed: {e}")))?
            .map_err(|e| foreign(e.to_string()))?;
        if bytes.len() as u64 != n {
            return Err(foreign(format!("{} bytes where its name says {n}", bytes.len())));
        }
        check_pages(&bytes, s.start(seg).0 + start, s.timeline, seg, id).map_err(&foreign)?;
        plain.extend_from_slice(&bytes[(pos - start) as usize..]);
    }
    if plain.is_empty() {
        return Ok(None);
    }
    let held = plain.len() as u64;
    header::check_start(&plain, seg, s, seg, id).map_err(|why| WalError::Foreign { name: name.clone(), why })?;
    plain.resize(seg as usize, 0);
    Ok(Some((plain, held)))
}

/// Deletes the tip's chunks of the cluster `sysid`'s segment `s`.
async fn delete_chunks(archive: &Archive, sysid: u64, s: Segment) -> Result<usize, WalError> {
    let chunks = chunks_of(archive, sysid, s).await?;
    for (_, _, key) in &chunks {
        archive.s3.delete_object(&archive.bucket, key).await?;
    }
    Ok(chunks.len())
}

/// The segments the tip holds chunks of, with their clusters (from the keys alone).
pub async fn segments_held(archive: &Archive) -> Result<BTreeSet<(u64, Segment)>, WalError> {
    let keys = archive.s3.list_keys(&archive.bucket, &folder(&archive.prefix)).await?;
    Ok(keys
        .iter()
        .filter_map(|k| parse_chunk_key(&archive.prefix, k, archive.segment_size))
        .map(|c| (c.0, c.1))
        .collect())
}

/// What `caretaker status` and the metrics show of the tip.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TipStatus {
    /// Streaming from PostgreSQL now.
    pub streaming: bool,
    pub timeline: Option<u32>,
    /// How far PostgreSQL has flushed its WAL, as the stream last said.
    pub server_flush: Option<String>,
    /// How far S3 holds it (archive or tip).
    pub stored: Option<String>,
    /// The live RPO: WAL PostgreSQL flushed that S3 does not hold yet, and how long the oldest
    /// of it has waited (0 when S3 holds everything).
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub last_chunk_at: Option<String>,
    /// Time between successive chunks while WAL flows (milliseconds, the last 1000).
    pub interval_p50_ms: Option<u64>,
    pub interval_p99_ms: Option<u64>,
    /// Chunks of whole archived segments deleted.
    pub deleted: u64,
    pub last_error: Option<String>,
    /// Streaming sessions started (1 while nothing went wrong since the daemon started).
    pub sessions: u64,
    /// Since when the tip cannot stream although PostgreSQL accepts connections (RFC 3339).
    pub failing_since: Option<String>,
    #[serde(skip)]
    pub failing_for: Option<Duration>,
}

/// How the tip runs.
#[derive(Debug, Clone)]
pub struct TipSettings {
    pub interval: Duration,
}

/// The tip's shared state: its status, and the segments it holds chunks of.
#[derive(Default)]
pub struct Tip {
    status: Mutex<TipStatus>,
    held: Mutex<BTreeSet<(u64, Segment)>>,
    intervals: Mutex<VecDeque<u64>>,
    failing: Mutex<Option<(Instant, String)>>,
}

impl Tip {
    pub fn status(&self) -> TipStatus {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.failing_for = self.failing.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|f| f.0.elapsed());
        s
    }

    fn update(&self, f: impl FnOnce(&mut TipStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn interval(&self, ms: u64) {
        let mut q = self.intervals.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back(ms);
        if q.len() > 1000 {
            q.pop_front();
        }
        let mut v: Vec<u64> = q.iter().copied().collect();
        v.sort_unstable();
        let pick = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        let (p50, p99) = (pick(0.5), pick(0.99));
        drop(q);
        self.update(|s| {
            s.interval_p50_ms = Some(p50);
            s.interval_p99_ms = Some(p99);
        });
    }
}

/// Streams and stores the tip until `cancel`: reconnects after any failure (1 s, doubling to
/// 30 s), pauses while `gate` is closed (another instance holds the prefix).
pub async fn run(
    archive: Arc<Archive>,
    target: PgTarget,
    settings: TipSettings,
    gate: crate::backup::lease::Gate,
    tip: Arc<Tip>,
    cancel: CancellationToken,
) {
    match segments_held(&archive).await {
        Ok(held) => {
            if !held.is_empty() {
                info!(segments = held.len(), "WAL tip: chunks of earlier segments in S3; deleted once archived");
            }
            tip.held.lock().unwrap_or_else(|p| p.into_inner()).extend(held);
        }
        Err(e) => warn!("WAL tip: cannot list its chunks in S3: {e}"),
    }
    let mut wait = Duration::from_secs(1);
    let mut resume: Option<(u32, u64)> = None;
    let mut last_logged = String::new();
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let closed = gate.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let began = Instant::now();
        let outcome = match closed {
            Some(why) => Err(TipError::Paused(why)),
            None => session(&archive, &target, &settings, &tip, &mut resume, &cancel).await,
        };
        // A session that ran for a while resets the backoff: failures an hour apart each
        // retry after 1 s, not after the 30 s earlier ones grew it to.
        if began.elapsed() >= Duration::from_secs(60) {
            wait = Duration::from_secs(1);
        }
        tip.update(|s| s.streaming = false);
        match outcome {
            Ok(()) => {
                wait = Duration::from_secs(1);
                *tip.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            Err(e) => {
                let text = e.to_string();
                // PostgreSQL not running writes nothing: no RPO at risk, no failure to report.
                let at_risk = !matches!(e, TipError::NotRunning(_) | TipError::Paused(_));
                {
                    let mut f = tip.failing.lock().unwrap_or_else(|p| p.into_inner());
                    if at_risk {
                        f.get_or_insert_with(|| (Instant::now(), crate::units::now_rfc3339()));
                    } else {
                        *f = None;
                    }
                    let since = f.as_ref().map(|f| f.1.clone());
                    tip.update(|s| {
                        s.last_error = Some(text.clone());
                        s.failing_since = since;
                    });
                }
                if text != last_logged {
                    if at_risk {
                        warn!("WAL tip: {text}; streaming again in {} s", wait.as_secs());
                    } else {
                        info!("WAL tip: {text}; waiting");
                    }
                    last_logged = text;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

#[derive(Debug, thiserror::Error)]
enum TipError {
    #[error("PostgreSQL is not accepting connections ({0})")]
    NotRunning(String),
    #[error("paused: {0}")]
    Paused(String),
    #[error("{0}")]
    Stream(#[from] ReplError),
    #[error("{0}")]
    Wal(#[from] WalError),
    #[error("{0}")]
    Refused(String),
}

/// One connection: from `resume` (or the current segment's start) until the stream ends.
async fn session(
    archive: &Arc<Archive>,
    target: &PgTarget,
    settings: &TipSettings,
    tip: &Arc<Tip>,
    resume: &mut Option<(u32, u64)>,
    cancel: &CancellationToken,
) -> Result<(), TipError> {
    let seg = archive.segment_size;
    let mut conn = Replication::connect(&target.socket_path(), &target.user, APPLICATION, Duration::from_secs(10))
        .await
        .map_err(|e| match e {
            ReplError::Connect { ref why, .. } if why.contains("No such file") || why.contains("refused") => {
                TipError::NotRunning(e.to_string())
            }
            ReplError::Server(ref m) if m.contains("57P03") => TipError::NotRunning(e.to_string()),
            e => TipError::Stream(e),
        })?;
    let sys = conn.identify().await?;
    let current_start = sys.flush - sys.flush % seg;
    let start = match *resume {
        Some((tl, at)) if tl == sys.timeline && at >= current_start && at <= sys.flush => at,
        _ => current_start,
    };
    let (mut stream, mut feedback) = conn.start(sys.timeline, start).await?;
    info!(
        timeline = sys.timeline,
        from = %Lsn(start),
        "WAL tip: streaming from PostgreSQL; the unfinished segment goes to S3 every {} ms",
        settings.interval.as_millis()
    );
    tip.update(|s| {
        s.streaming = true;
        s.sessions += 1;
        s.timeline = Some(sys.timeline);
        s.last_error = None;
        s.failing_since = None;
    });
    *tip.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Message, ReplError>>(64);
    let reader = tokio::spawn(async move {
        loop {
            let m = stream.next().await;
            let end = !matches!(m, Ok(Message::Data { .. } | Message::Keepalive { .. }));
            if tx.send(m).await.is_err() || end {
                return;
            }
        }
    });
    let _stop_reader = AbortOnDrop(reader);

    let mut pos = start; // the next byte expected
    let mut stored = start; // S3 holds everything before this
    let mut pending: Vec<u8> = Vec::new(); // [stored, pos)
    let mut server_flush = sys.flush.max(start);
    let mut unstored_since: Option<Instant> = None;
    let mut last_chunk: Option<Instant> = None;
    let mut last_gc = Instant::now();
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let publish = |tip: &Tip, pos: u64, stored: u64, server_flush: u64, since: Option<Instant>| {
        let flush = server_flush.max(pos);
        tip.update(|s| {
            s.server_flush = Some(Lsn(flush).to_string());
            s.stored = Some(Lsn(stored).to_string());
            s.lag_bytes = flush.saturating_sub(stored);
            s.lag_seconds = since.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        });
    };
    loop {
        let mut flush_now = false;
        tokio::select! {
            _ = cancel.cancelled() => flush_now = true,
            m = rx.recv() => match m {
                None => return Err(TipError::Refused("the stream's reader stopped".into())),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::End)) => {
                    info!("WAL tip: PostgreSQL ended the stream (timeline {} ended or shutting down)", sys.timeline);
                    store(archive, tip, sys.timeline, sys.system_identifier, &mut pending, &mut stored, pos, &mut last_chunk).await.ok();
                    *resume = Some((sys.timeline, stored));
                    return Ok(());
                }
                Some(Ok(Message::Keepalive { server_end, reply })) => {
                    server_flush = server_flush.max(server_end);
                    if server_flush > stored && unstored_since.is_none() {
                        unstored_since = Some(Instant::now());
                    }
                    if reply {
                        feedback.report(pos, stored).await?;
                    }
                }
                Some(Ok(Message::Data { start: at, server_end, bytes })) => {
                    if at != pos {
                        return Err(TipError::Refused(format!(
                            "the stream jumped from {} to {}: starting over at the current segment",
                            Lsn(pos),
                            Lsn(at)
                        )));
                    }
                    if unstored_since.is_none() && !bytes.is_empty() {
                        unstored_since = Some(Instant::now());
                    }
                    let mut rest = &bytes[..];
                    while !rest.is_empty() {
                        let room = (seg - pos % seg) as usize;
                        let (piece, after) = rest.split_at(room.min(rest.len()));
                        pending.extend_from_slice(piece);
                        pos += piece.len() as u64;
                        rest = after;
                        if pos % seg == 0 {
                            // A segment ends here: its tail goes now, the next starts fresh.
                            store(archive, tip, sys.timeline, sys.system_identifier, &mut pending, &mut stored, pos, &mut last_chunk).await?;
                        }
                    }
                    server_flush = server_flush.max(server_end).max(pos);
                    if pending.len() > MAX_PENDING {
                        return Err(TipError::Refused(format!(
                            "{} received but not stored: S3 is too slow for the tip; starting over at the current segment",
                            crate::units::human_bytes(pending.len() as u64)
                        )));
                    }
                }
            },
            _ = ticker.tick() => {
                if !pending.is_empty() {
                    if let Err(e) = store(archive, tip, sys.timeline, sys.system_identifier, &mut pending, &mut stored, pos, &mut last_chunk).await {
                        // Kept, tried again next tick; the status says why meanwhile.
                        warn!("WAL tip: {e}");
                        tip.update(|s| s.last_error = Some(e.to_string()));
                    }
                }
                *resume = Some((sys.timeline, stored));
                if stored >= server_flush {
                    unstored_since = None;
                }
                feedback.report(pos, stored).await?;
                publish(tip, pos, stored, server_flush, unstored_since);
                if last_gc.elapsed() >= Duration::from_secs(10) {
                    last_gc = Instant::now();
                    collect(archive, tip, Segment::of(sys.timeline, Lsn(pos), seg)).await;
                }
            }
        }
        if flush_now {
            if !pending.is_empty() {
                let _ = store(
                    archive,
                    tip,
                    sys.timeline,
                    sys.system_identifier,
                    &mut pending,
                    &mut stored,
                    pos,
                    &mut last_chunk,
                )
                .await;
            }
            let _ = feedback.report(pos, stored).await;
            return Ok(());
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stores `pending` (`[stored, pos)`, within one segment) as one chunk.
#[allow(clippy::too_many_arguments)]
async fn store(
    archive: &Archive,
    tip: &Tip,
    timeline: u32,
    system_identifier: u64,
    pending: &mut Vec<u8>,
    stored: &mut u64,
    pos: u64,
    last_chunk: &mut Option<Instant>,
) -> Result<(), TipError> {
    if pending.is_empty() {
        return Ok(());
    }
    let seg = archive.segment_size;
    let s = Segment::of(timeline, Lsn(*stored), seg);
    check_pages(pending, *stored, timeline, seg, system_identifier)
        .map_err(|why| TipError::Refused(format!("PostgreSQL sent WAL that does not check out: {why}")))?;
    let offset = *stored - s.start(seg).0;
    let n = pending.len() as u64;
    put_chunk(archive, s, offset, pending.clone(), system_identifier).await?;
    pending.clear();
    *stored = pos;
    tip.held.lock().unwrap_or_else(|p| p.into_inner()).insert((system_identifier, s));
    if let Some(t) = last_chunk.replace(Instant::now()) {
        tip.interval(t.elapsed().as_millis() as u64);
    }
    tip.update(|st| {
        st.chunks += 1;
        st.chunk_bytes += n;
        st.last_chunk_at = Some(crate::units::now_rfc3339());
    });
    debug!(segment = %s.file_name(seg), offset, bytes = n, "WAL tip: chunk stored");
    Ok(())
}

/// Deletes the chunks of segments before `current` that the archive holds whole, of the same
/// cluster (a segment another cluster archived under the name does not replace them).
async fn collect(archive: &Archive, tip: &Tip, current: Segment) {
    let candidates: Vec<(u64, Segment)> = tip
        .held
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(_, s)| s.number < current.number || (s.number == current.number && s.timeline < current.timeline))
        .copied()
        .collect();
    for (sysid, s) in candidates {
        match archive.describe(&WalFile::Segment(s)).await {
            Ok(Some(d)) if d.system_identifier == sysid => match delete_chunks(archive, sysid, s).await {
                Ok(n) => {
                    tip.held.lock().unwrap_or_else(|p| p.into_inner()).remove(&(sysid, s));
                    tip.update(|st| st.deleted += n as u64);
                    debug!(segment = %s.file_name(archive.segment_size), chunks = n, "WAL tip: archived whole; chunks deleted");
                }
                Err(e) => debug!("WAL tip: deleting chunks: {e}"),
            },
            // Not archived (yet, or never: the tail of an old timeline), or by another cluster: kept.
            Ok(_) => {}
            Err(e) => debug!("WAL tip: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn pages(at: u64, n: usize, timeline: u32, sysid: u64) -> Vec<u8> {
        let mut b = vec![0u8; n * PAGE as usize];
        for i in 0..n {
            let addr = at + i as u64 * PAGE;
            let p = &mut b[i * PAGE as usize..];
            p[0..2].copy_from_slice(&0xD113u16.to_le_bytes());
            p[4..8].copy_from_slice(&timeline.to_le_bytes());
            p[8..16].copy_from_slice(&addr.to_le_bytes());
            if addr % SEG == 0 {
                p[2..4].copy_from_slice(&2u16.to_le_bytes());
                p[24..32].copy_from_slice(&sysid.to_le_bytes());
                p[32..36].copy_from_slice(&(SEG as u32).to_le_bytes());
                p[36..40].copy_from_slice(&(PAGE as u32).to_le_bytes());
            }
        }
        b
    }

    #[test]
    fn pages_are_checked_where_they_begin_in_a_chunk() {
        let b = pages(SEG * 3, 4, 1, 42);
        check_pages(&b, SEG * 3, 1, SEG, 42).unwrap();
        // A chunk starting mid-page checks the pages that begin in it only.
        check_pages(&b[100..], SEG * 3 + 100, 1, SEG, 42).unwrap();
        check_pages(&b[..20], SEG * 3, 1, SEG, 42).unwrap();
        assert!(check_pages(&b, SEG * 3, 1, SEG, 43).unwrap_err().contains("cluster 42"));
        assert!(check_pages(&b, SEG * 3 + PAGE, 1, SEG, 42).unwrap_err().contains("says it is at"));
        assert!(check_pages(&b, SEG * 3, 0, SEG, 42).unwrap_err().contains("timeline 1"));
        // The zeros PostgreSQL writes after a segment switch (headers included) pass, whole or
        // cut mid-page; a page that is not all zeros still needs a WAL header.
        let mut zeros = b.clone();
        zeros[2 * PAGE as usize..].fill(0);
        check_pages(&zeros, SEG * 3, 1, SEG, 42).unwrap();
        check_pages(&zeros[..2 * PAGE as usize + 30], SEG * 3, 1, SEG, 42).unwrap();
        let mut garbage = zeros.clone();
        garbage[3 * PAGE as usize + 500] = 7;
        assert!(check_pages(&garbage, SEG * 3, 1, SEG, 42).unwrap_err().contains("the page at 0/3006000 has magic"));
        garbage[3 * PAGE as usize..].fill(0x5A);
        assert!(check_pages(&garbage, SEG * 3, 1, SEG, 42).unwrap_err().contains("magic 0x5A5A"));
    }
}
