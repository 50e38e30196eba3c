//! Exact row counts read from pg_dump's own stream as it passes on its way to S3, so that a
//! backup reads the database once, not twice (issue: one vCPU, gp3 EBS).
//!
//! A custom-format, uncompressed archive written to a pipe is, in order (PostgreSQL's
//! `pg_backup_archiver.c` `WriteHead`/`WriteToc` and `pg_backup_custom.c`): a header, the table
//! of contents (each entry's dump id, tag, description, namespace …), then one block per entry
//! with data, in TOC order. A `TABLE DATA` block is `BLK_DATA`, the entry's dump id, then chunks
//! (a length, that many bytes; a zero length ends the block) holding the table's `COPY … TO
//! stdout` text: one line per row (pg_dump writes each row as its own chunk), newlines inside
//! values escaped as `\n`, then the terminator `\.` and two empty lines. So a block's newlines
//! less those three are exactly the table's rows in the dump's snapshot; a block that does not end
//! in the terminator is not counted. Large objects (`BLK_BLOBS`) are skipped.
//!
//! Integers are a sign byte then `intSize` little-endian bytes; strings an integer length (-1:
//! NULL) then the bytes. The scanner is incremental (bytes arrive in any split), never allocates
//! more than a few KiB (only short strings are kept: tags, descriptions, namespaces) and never
//! fails the backup: anything it does not recognise (another archive version, compression, a
//! malformed stream) ends the scan with a reason, and the caller counts with SQL instead.

use std::collections::HashMap;

/// Archive versions whose layout this scanner knows: 1.14 (PostgreSQL 14–15), 1.15 (16: the
/// compression algorithm in the header), 1.16 (17: each TOC entry's relkind).
const VERSIONS: std::ops::RangeInclusive<(u8, u8)> = (1, 14)..=(1, 16);
/// Block types (`pg_backup_archiver.h`).
const BLK_DATA: u8 = 1;
const BLK_BLOBS: u8 = 3;
/// Strings longer than this are skipped, not kept (identifiers are at most 63 bytes).
const KEEP_MAX: usize = 1024;
/// A TOC with more entries than this is not a dump this scanner believes.
const TOC_MAX: i64 = 50_000_000;
/// How pg_dump ends every table's COPY text in the archive (`dumpTableData_copy`).
const TERMINATOR: &[u8] = b"\\.\n\n\n";

/// What a finished scan found: rows per `TABLE DATA` entry, keyed `schema.table`.
pub type DumpCounts = HashMap<String, u64>;

/// The next item the stream holds.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// `n` raw bytes, kept.
    Raw(usize),
    /// An integer.
    Int,
    /// A string (its length first); kept if short.
    Str,
    /// The body of a kept string.
    StrBody(usize),
    /// `n` bytes passed over.
    Skip(usize),
    /// `n` bytes of COPY text whose newlines are rows.
    Count(usize),
}

/// Where in the archive's grammar the current item is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pos {
    Head,
    Compression,
    HeadInts(u8),
    HeadStrs(u8),
    TocCount,
    Entry(u8),
    Deps,
    Offset,
    Block,
    DataId,
    ChunkLen,
    Chunk,
    BlobsId,
    BlobOid,
    BlobChunkLen,
    BlobChunk,
    Failed,
}

/// The fields of one TOC entry in order, `Relkind` only from 1.16.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Field {
    DumpId,
    HadDumper,
    TableOid,
    Oid,
    Tag,
    Desc,
    Section,
    Defn,
    DropStmt,
    CopyStmt,
    Namespace,
    Tablespace,
    TableAm,
    Relkind,
    Owner,
    WithOids,
}

const FIELDS: [Field; 16] = [
    Field::DumpId,
    Field::HadDumper,
    Field::TableOid,
    Field::Oid,
    Field::Tag,
    Field::Desc,
    Field::Section,
    Field::Defn,
    Field::DropStmt,
    Field::CopyStmt,
    Field::Namespace,
    Field::Tablespace,
    Field::TableAm,
    Field::Relkind,
    Field::Owner,
    Field::WithOids,
];

/// One completed item.
enum Val<'a> {
    Bytes(&'a [u8]),
    Int(i64),
    /// A kept string; `None` for NULL.
    Str(Option<&'a [u8]>),
    /// A string too long to keep (skipped), or skipped/counted bytes.
    Passed,
}

#[derive(Default)]
struct Entry {
    dump_id: i64,
    had_dumper: bool,
    tag: Option<String>,
    desc: Option<String>,
    namespace: Option<String>,
}

/// The incremental scanner: [`DumpScan::feed`] every byte of the stream, then
/// [`DumpScan::finish`].
pub struct DumpScan {
    pos: Pos,
    op: Op,
    buf: Vec<u8>,
    version: (u8, u8),
    int_size: usize,
    off_size: usize,
    toc_left: i64,
    entry: Entry,
    /// dump id → `schema.table` of each `TABLE DATA` entry that has data.
    tables: HashMap<i64, String>,
    /// dump id → rows seen in its block.
    rows: HashMap<i64, u64>,
    current: i64,
    /// The last bytes of the current data block.
    tail: Vec<u8>,
    error: Option<String>,
    bytes: u64,
}

impl Default for DumpScan {
    fn default() -> Self {
        DumpScan {
            pos: Pos::Head,
            op: Op::Raw(11),
            buf: Vec::with_capacity(64),
            version: (0, 0),
            int_size: 4,
            off_size: 8,
            toc_left: 0,
            entry: Entry::default(),
            tables: HashMap::new(),
            rows: HashMap::new(),
            current: 0,
            tail: Vec::with_capacity(16),
            error: None,
            bytes: 0,
        }
    }
}

impl DumpScan {
    /// Passes the next bytes of the stream through the scanner.
    pub fn feed(&mut self, mut data: &[u8]) {
        self.bytes += data.len() as u64;
        while !data.is_empty() && self.pos != Pos::Failed {
            match self.op {
                Op::Skip(n) | Op::Count(n) => {
                    let take = n.min(data.len());
                    if let Op::Count(_) = self.op {
                        let piece = &data[..take];
                        let rows = piece.iter().filter(|&&b| b == b'\n').count() as u64;
                        *self.rows.entry(self.current).or_default() += rows;
                        self.tail.extend_from_slice(&piece[piece.len().saturating_sub(TERMINATOR.len())..]);
                        let excess = self.tail.len().saturating_sub(TERMINATOR.len());
                        self.tail.drain(..excess);
                    }
                    data = &data[take..];
                    if take == n {
                        self.advance(Val::Passed);
                    } else {
                        self.op = match self.op {
                            Op::Skip(_) => Op::Skip(n - take),
                            _ => Op::Count(n - take),
                        };
                    }
                }
                Op::Raw(n) | Op::StrBody(n) => {
                    let take = (n - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.buf.len() == n {
                        let buf = std::mem::take(&mut self.buf);
                        match self.op {
                            Op::Raw(_) => self.advance(Val::Bytes(&buf)),
                            _ => self.advance(Val::Str(Some(&buf))),
                        }
                        self.buf = buf;
                        self.buf.clear();
                    }
                }
                Op::Int | Op::Str => {
                    let n = 1 + self.int_size;
                    let take = (n - self.buf.len()).min(data.len());
                    self.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.buf.len() == n {
                        let mut v: i64 = 0;
                        for (i, b) in self.buf[1..].iter().enumerate() {
                            v |= (*b as i64) << (8 * i);
                        }
                        if self.buf[0] != 0 {
                            v = -v;
                        }
                        self.buf.clear();
                        if let Op::Str = self.op {
                            match v {
                                -1 => self.advance(Val::Str(None)),
                                0 => self.advance(Val::Str(Some(&[]))),
                                n if n < -1 => self.fail(format!("a string of length {n}")),
                                n if n as usize > KEEP_MAX => {
                                    self.op = Op::Skip(n as usize);
                                }
                                n => self.op = Op::StrBody(n as usize),
                            }
                        } else {
                            self.advance(Val::Int(v));
                        }
                    }
                }
            }
        }
    }

    fn fail(&mut self, why: String) {
        if self.error.is_none() {
            self.error = Some(format!("{why} at byte {} of the dump", self.bytes));
        }
        self.pos = Pos::Failed;
    }

    /// The item at `self.pos` is complete: take its value, choose the next item.
    fn advance(&mut self, v: Val) {
        use Pos::*;
        match (self.pos, v) {
            (Head, Val::Bytes(b)) => {
                if &b[..5] != b"PGDMP" {
                    return self.fail("not a pg_dump archive (no PGDMP magic)".into());
                }
                self.version = (b[5], b[6]);
                if !VERSIONS.contains(&self.version) {
                    return self.fail(format!("archive version {}.{} is not one this scanner knows", b[5], b[6]));
                }
                (self.int_size, self.off_size) = (b[8] as usize, b[9] as usize);
                if !(1..=8).contains(&self.int_size) || !(1..=8).contains(&self.off_size) {
                    return self.fail(format!("integer size {} / offset size {}", b[8], b[9]));
                }
                if b[10] != 1 {
                    return self.fail(format!("archive format {} is not custom (1)", b[10]));
                }
                self.pos = Compression;
                self.op = if self.version >= (1, 15) { Op::Raw(1) } else { Op::Int };
            }
            (Compression, Val::Bytes(b)) if b[0] == 0 => self.next(HeadInts(0), Op::Int),
            (Compression, Val::Int(0)) => self.next(HeadInts(0), Op::Int),
            (Compression, _) => self.fail("the archive is compressed".into()),
            (HeadInts(k), Val::Int(_)) if k < 6 => self.next(HeadInts(k + 1), Op::Int),
            (HeadInts(_), Val::Int(_)) => self.next(HeadStrs(0), Op::Str),
            (HeadStrs(k), _) if k < 2 => self.next(HeadStrs(k + 1), Op::Str),
            (HeadStrs(_), _) => self.next(TocCount, Op::Int),
            (TocCount, Val::Int(n)) => {
                if !(0..=TOC_MAX).contains(&n) {
                    return self.fail(format!("a table of contents of {n} entries"));
                }
                self.toc_left = n;
                self.start_entry();
            }
            (Entry(i), v) => {
                let field = FIELDS[i as usize];
                let text = |s: Option<&[u8]>| s.map(|s| String::from_utf8_lossy(s).into_owned());
                match (field, v) {
                    (Field::DumpId, Val::Int(n)) => self.entry.dump_id = n,
                    (Field::HadDumper, Val::Int(n)) => self.entry.had_dumper = n != 0,
                    (Field::Tag, Val::Str(s)) => self.entry.tag = text(s),
                    (Field::Desc, Val::Str(s)) => self.entry.desc = text(s),
                    (Field::Namespace, Val::Str(s)) => self.entry.namespace = text(s),
                    (Field::Section | Field::Relkind, Val::Int(_)) => {}
                    (Field::DumpId | Field::HadDumper | Field::Section | Field::Relkind, _) => {
                        return self.fail(format!("TOC field {field:?} is not an integer"));
                    }
                    _ => {}
                }
                let mut next = i as usize + 1;
                if FIELDS.get(next) == Some(&Field::Relkind) && self.version < (1, 16) {
                    next += 1;
                }
                match FIELDS.get(next) {
                    Some(f) => {
                        let op = match f {
                            Field::DumpId | Field::HadDumper | Field::Section | Field::Relkind => Op::Int,
                            _ => Op::Str,
                        };
                        self.next(Entry(next as u8), op)
                    }
                    None => self.next(Deps, Op::Str),
                }
            }
            (Deps, Val::Str(None)) => self.next(Offset, Op::Raw(1 + self.off_size)),
            (Deps, _) => self.next(Deps, Op::Str),
            (Offset, Val::Bytes(_)) => {
                let e = std::mem::take(&mut self.entry);
                if e.desc.as_deref() == Some("TABLE DATA") && e.had_dumper {
                    match (e.namespace, e.tag) {
                        (Some(ns), Some(tag)) => {
                            self.tables.insert(e.dump_id, format!("{ns}.{tag}"));
                        }
                        _ => return self.fail(format!("TABLE DATA entry {} without its table's name", e.dump_id)),
                    }
                }
                self.toc_left -= 1;
                self.start_entry();
            }
            (Block, Val::Bytes(b)) => match b[0] {
                BLK_DATA => self.next(DataId, Op::Int),
                BLK_BLOBS => self.next(BlobsId, Op::Int),
                t => self.fail(format!("block type {t}")),
            },
            (DataId, Val::Int(id)) => {
                if !self.tables.contains_key(&id) || self.rows.contains_key(&id) {
                    return self.fail(format!("a data block for dump id {id}, which is no TABLE DATA entry"));
                }
                self.current = id;
                self.rows.insert(id, 0);
                self.next(ChunkLen, Op::Int)
            }
            (ChunkLen, Val::Int(0)) => {
                // pg_dump ends each table's COPY text with "\\.\n\n\n": three newlines that are
                // no rows.
                let rows = self.rows.entry(self.current).or_default();
                if self.tail != TERMINATOR || *rows < 3 {
                    let table = self.tables.get(&self.current).cloned().unwrap_or_default();
                    return self.fail(format!("the data of {table} does not end in COPY's terminator"));
                }
                *rows -= 3;
                self.tail.clear();
                self.next(Block, Op::Raw(1))
            }
            (ChunkLen, Val::Int(n)) if n > 0 => self.next(Chunk, Op::Count(n as usize)),
            (Chunk, Val::Passed) => self.next(ChunkLen, Op::Int),
            (BlobsId, Val::Int(_)) => self.next(BlobOid, Op::Int),
            (BlobOid, Val::Int(0)) => self.next(Block, Op::Raw(1)),
            (BlobOid, Val::Int(_)) => self.next(BlobChunkLen, Op::Int),
            (BlobChunkLen, Val::Int(0)) => self.next(BlobOid, Op::Int),
            (BlobChunkLen, Val::Int(n)) if n > 0 => self.next(BlobChunk, Op::Skip(n as usize)),
            (BlobChunk, Val::Passed) => self.next(BlobChunkLen, Op::Int),
            (pos, _) => self.fail(format!("an unexpected item at {pos:?}")),
        }
    }

    fn next(&mut self, pos: Pos, op: Op) {
        self.pos = pos;
        self.op = op;
    }

    fn start_entry(&mut self) {
        if self.toc_left == 0 {
            self.next(Pos::Block, Op::Raw(1));
        } else {
            self.next(Pos::Entry(0), Op::Int);
        }
    }

    /// Rows per table, or why the stream could not be read: it ended inside an item, an entry
    /// has no data block, or the scan failed earlier.
    pub fn finish(self) -> Result<DumpCounts, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.pos != Pos::Block || !self.buf.is_empty() {
            return Err(format!("the dump ended inside an item ({:?}) after {} bytes", self.pos, self.bytes));
        }
        let mut out = DumpCounts::new();
        for (id, table) in self.tables {
            let Some(n) = self.rows.get(&id) else {
                return Err(format!("no data block for {table}"));
            };
            *out.entry(table).or_default() += n;
        }
        Ok(out)
    }
}

impl super::stream::Scan for DumpScan {
    fn feed(&mut self, bytes: &[u8]) {
        DumpScan::feed(self, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small archive in pg_dump's layout (version 1.`minor`).
    struct Writer(Vec<u8>);
    impl Writer {
        fn int(&mut self, v: i64) -> &mut Self {
            self.0.push(u8::from(v < 0));
            self.0.extend_from_slice(&(v.unsigned_abs() as u32).to_le_bytes());
            self
        }
        fn str(&mut self, s: Option<&str>) -> &mut Self {
            match s {
                None => self.int(-1),
                Some(s) => {
                    self.int(s.len() as i64);
                    self.0.extend_from_slice(s.as_bytes());
                    self
                }
            }
        }
    }

    fn archive(minor: u8, blob: bool) -> Vec<u8> {
        let mut w = Writer(b"PGDMP".to_vec());
        w.0.extend_from_slice(&[1, minor, 0, 4, 8, 1]);
        if minor >= 15 {
            w.0.push(0);
        } else {
            w.int(0);
        }
        for v in [5, 4, 3, 2, 1, 126, 0] {
            w.int(v);
        }
        w.str(Some("zmanim")).str(Some("16.4")).str(Some("16.4"));
        let entries: &[(i64, bool, &str, &str)] =
            &[(1, false, "cities", "TABLE"), (2, true, "cities", "TABLE DATA"), (3, true, "empty", "TABLE DATA")];
        w.int(entries.len() as i64 + i64::from(blob));
        let entry = |w: &mut Writer, id: i64, dumper: bool, tag: &str, desc: &str| {
            w.int(id).int(i64::from(dumper)).str(Some("1259")).str(Some("16384")).str(Some(tag)).str(Some(desc));
            w.int(2).str(Some(&"x".repeat(5000))).str(Some("")).str(Some("COPY …")).str(Some("public"));
            w.str(None).str(Some("heap"));
            if minor >= 16 {
                w.int(114);
            }
            w.str(Some("postgres")).str(Some("false")).str(Some("1")).str(None);
            w.0.push(2);
            w.0.extend_from_slice(&[0; 8]);
        };
        for &(id, dumper, tag, desc) in entries {
            entry(&mut w, id, dumper, tag, desc);
        }
        if blob {
            entry(&mut w, 9, true, "BLOBS", "BLOBS");
        }
        // cities: three rows over two chunks, one with an escaped newline in a value.
        w.0.push(BLK_DATA);
        w.int(2);
        let rows = ["1\tJerusalem\\nold city\t\\N\n2\tSafed\t\n", "3\t\\.\tx\n", "\\.\n\n\n"];
        for r in rows {
            w.int(r.len() as i64);
            w.0.extend_from_slice(r.as_bytes());
        }
        w.int(0);
        if blob {
            w.0.push(BLK_BLOBS);
            w.int(9).int(16500).int(3);
            w.0.extend_from_slice(b"a\nb");
            w.int(0).int(0);
        }
        w.0.push(BLK_DATA);
        w.int(3).int(5);
        w.0.extend_from_slice(TERMINATOR);
        w.int(0);
        w.0
    }

    fn scan_in_pieces(bytes: &[u8], piece: usize) -> Result<DumpCounts, String> {
        let mut s = DumpScan::default();
        for c in bytes.chunks(piece) {
            s.feed(c);
        }
        s.finish()
    }

    #[test]
    fn rows_per_table_in_every_version_and_any_split() {
        for minor in [14, 15, 16] {
            let bytes = archive(minor, minor == 16);
            for piece in [1, 2, 3, 7, 64, 4096, bytes.len()] {
                let counts = scan_in_pieces(&bytes, piece).unwrap_or_else(|e| panic!("1.{minor} by {piece}: {e}"));
                assert_eq!(counts.get("public.cities"), Some(&3), "1.{minor} by {piece}");
                assert_eq!(counts.get("public.empty"), Some(&0), "1.{minor} by {piece}");
                assert_eq!(counts.len(), 2);
            }
        }
    }

    #[test]
    fn anything_unknown_or_cut_short_is_a_reason_not_a_count() {
        let good = archive(15, false);
        let err = |bytes: &[u8]| scan_in_pieces(bytes, 5).unwrap_err();
        assert!(err(&good[..good.len() - 3]).contains("ended inside"), "{}", err(&good[..good.len() - 3]));
        let mut other = good.clone();
        other[6] = 17;
        assert!(err(&other).contains("version 1.17"));
        let mut tar = good.clone();
        tar[10] = 3;
        assert!(err(&tar).contains("not custom"));
        let mut gz = good.clone();
        gz[11] = 1;
        assert!(err(&gz).contains("compressed"));
        assert!(err(b"PGDMX\x01\x0f\x00\x04\x08\x01\x00").contains("magic"));
        // A data block for an id the TOC never named.
        let mut stray = good.clone();
        let at = stray.len() - 21;
        assert_eq!(stray[at], BLK_DATA);
        stray[at + 2] = 77;
        assert!(err(&stray).contains("dump id 77"), "{}", err(&stray));
        // A TABLE DATA entry with no block at all.
        let missing = &good[..good.len() - 21];
        assert!(err(missing).contains("no data block for public.empty"), "{}", err(missing));
        // A block without COPY's terminator.
        let mut cut = good.clone();
        let at = cut.len() - 7;
        assert_eq!(cut[at], b'\n');
        cut[at] = b'x';
        assert!(err(&cut).contains("public.empty does not end in COPY's terminator"), "{}", err(&cut));
        // Garbage after a failure is ignored, and the first reason is kept.
        let mut s = DumpScan::default();
        s.feed(&tar);
        s.feed(&[0xff; 100]);
        assert!(s.finish().unwrap_err().contains("not custom"));
    }
}
