//! Where the WAL tip's chunks live in S3 (`PREFIX/wal-tip/SYSID/SEGMENT/START-END.zst.age`),
//! and reading a key back: pure names, shared by the tip and retention.

use super::name::{Segment, WalFile};

/// The S3 folder of the tip.
pub fn folder(prefix: &str) -> String {
    format!("{prefix}/wal-tip/")
}

pub(super) fn segment_folder(prefix: &str, sysid: u64, s: Segment, segment_size: u64) -> String {
    format!("{}{sysid}/{}/", folder(prefix), s.file_name(segment_size))
}

/// Where the chunk `[start, end)` of the cluster `sysid`'s segment `s` lives.
pub fn chunk_key(prefix: &str, sysid: u64, s: Segment, start: u64, end: u64, segment_size: u64) -> String {
    format!("{}{start:08X}-{end:08X}.zst.age", segment_folder(prefix, sysid, s, segment_size))
}

/// The name a chunk's seal is bound to.
pub(super) fn chunk_name(s: Segment, start: u64, end: u64, segment_size: u64) -> String {
    format!("{}.tip.{start:08X}-{end:08X}", s.file_name(segment_size))
}

/// The cluster, segment and offsets a key under [`folder`] names (None for anything else).
pub fn parse_chunk_key(prefix: &str, key: &str, segment_size: u64) -> Option<(u64, Segment, u64, u64)> {
    let rest = key.strip_prefix(&folder(prefix))?;
    let (sysid, rest) = rest.split_once('/')?;
    if sysid.is_empty() || sysid.len() > 20 || !sysid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let sysid: u64 = sysid.parse().ok()?;
    let (seg, file) = rest.split_once('/')?;
    let WalFile::Segment(s) = WalFile::parse(seg, segment_size).ok()? else { return None };
    let (a, b) = file.strip_suffix(".zst.age")?.split_once('-')?;
    let hex = |t: &str| {
        (t.len() == 8 && t.bytes().all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c)))
            .then(|| u64::from_str_radix(t, 16).ok())
            .flatten()
    };
    let (start, end) = (hex(a)?, hex(b)?);
    (start < end && end <= segment_size).then_some((sysid, s, start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn chunk_keys_round_trip_and_nothing_else_parses() {
        let s = Segment { timeline: 2, number: 5 };
        let k = chunk_key("pre", 7_411_000_000_000_000_123, s, 0x2000, 0x4A10, SEG);
        assert_eq!(k, "pre/wal-tip/7411000000000000123/000000020000000000000005/00002000-00004A10.zst.age");
        assert_eq!(parse_chunk_key("pre", &k, SEG), Some((7_411_000_000_000_000_123, s, 0x2000, 0x4A10)));
        for bad in [
            "pre/wal-tip/7/000000020000000000000005/00004A10-00002000.zst.age", // end before start
            "pre/wal-tip/7/000000020000000000000005/00000000-01000001.zst.age", // past the segment
            "pre/wal-tip/7/000000020000000000000005/0000000-00000010.zst.age",
            "pre/wal-tip/7/000000020000000000000005/00000000-0000001a.zst.age",
            "pre/wal-tip/7/../000000020000000000000005/00000000-00000010.zst.age",
            "pre/wal-tip/7/000000020000000000000005/x/00000000-00000010.zst.age",
            "pre/wal-tip/000000020000000000000005/00000000-00000010.zst.age", // no cluster
            "pre/wal-tip/-7/000000020000000000000005/00000000-00000010.zst.age",
            "pre/wal-tip/99999999999999999999/000000020000000000000005/00000000-00000010.zst.age",
            "other/wal-tip/7/000000020000000000000005/00000000-00000010.zst.age",
        ] {
            assert_eq!(parse_chunk_key("pre", bad, SEG), None, "{bad}");
        }
    }
}
