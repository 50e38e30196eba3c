//! WAL file names and positions: what PostgreSQL hands `archive_command` and asks
//! `restore_command` for. Names are parsed strictly (they become S3 keys and file names): anything
//! else is refused, never passed on.

use std::fmt;

/// The default (and the image's) WAL segment size.
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 << 20;

/// A position in the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl From<Lsn> for String {
    fn from(l: Lsn) -> String {
        l.to_string()
    }
}

impl TryFrom<String> for Lsn {
    type Error = String;
    fn try_from(s: String) -> Result<Lsn, String> {
        s.parse()
    }
}

impl std::str::FromStr for Lsn {
    type Err = String;
    /// `16/B374D848`, as PostgreSQL prints them.
    fn from_str(s: &str) -> Result<Lsn, String> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| format!("{s:?} is not an LSN (like 0/16B3748)"))?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 {
                return Err(format!("{s:?} is not an LSN (like 0/16B3748)"));
            }
            u32::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not an LSN (like 0/16B3748)"))
        };
        Ok(Lsn((u64::from(part(hi)?) << 32) | u64::from(part(lo)?)))
    }
}

/// A segment: its timeline and number (LSN / segment size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    pub timeline: u32,
    pub number: u64,
}

impl Segment {
    /// The segment holding `lsn`.
    pub fn of(timeline: u32, lsn: Lsn, segment_size: u64) -> Segment {
        Segment { timeline, number: lsn.0 / segment_size }
    }

    /// `TTTTTTTTXXXXXXXXYYYYYYYY`.
    pub fn file_name(&self, segment_size: u64) -> String {
        let per_log = 0x1_0000_0000 / segment_size;
        format!("{:08X}{:08X}{:08X}", self.timeline, self.number / per_log, self.number % per_log)
    }

    /// The LSN at which the segment starts.
    pub fn start(&self, segment_size: u64) -> Lsn {
        Lsn(self.number * segment_size)
    }

    pub fn next(&self) -> Segment {
        Segment { timeline: self.timeline, number: self.number + 1 }
    }
}

/// What PostgreSQL archives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalFile {
    /// A whole segment.
    Segment(Segment),
    /// The last, unfinished segment of a timeline that was left at a promotion (`….partial`).
    Partial(Segment),
    /// A timeline history file (`TTTTTTTT.history`): never overwritten.
    History(u32),
    /// A backup history file (`…SEGMENT.OFFSET.backup`), written at the end of a base backup.
    BackupLabel(Segment, u32),
}

fn hex8(s: &str) -> Option<u32> {
    (s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)))
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
}

fn segment_from(name: &str, segment_size: u64) -> Option<Segment> {
    if name.len() != 24 {
        return None;
    }
    let (t, l, s) = (hex8(&name[..8])?, hex8(&name[8..16])?, hex8(&name[16..])?);
    let per_log = 0x1_0000_0000 / segment_size;
    if t == 0 || u64::from(s) >= per_log {
        return None;
    }
    Some(Segment { timeline: t, number: u64::from(l) * per_log + u64::from(s) })
}

impl WalFile {
    /// The file named `name` (a bare name: no folder, no other characters), or why not.
    pub fn parse(name: &str, segment_size: u64) -> Result<WalFile, String> {
        let bad = || {
            format!(
                "{:?} is not a WAL file name (TTTTTTTTXXXXXXXXYYYYYYYY[.partial], TTTTTTTT.history or \
                 ….XXXXXXXX.backup)",
                name.escape_debug().to_string()
            )
        };
        if let Some(seg) = segment_from(name, segment_size) {
            return Ok(WalFile::Segment(seg));
        }
        if let Some(base) = name.strip_suffix(".partial") {
            return segment_from(base, segment_size).map(WalFile::Partial).ok_or_else(bad);
        }
        if let Some(tli) = name.strip_suffix(".history") {
            return hex8(tli).filter(|t| *t > 0).map(WalFile::History).ok_or_else(bad);
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let (seg, off) = rest.split_once('.').ok_or_else(bad)?;
            let seg = segment_from(seg, segment_size).ok_or_else(bad)?;
            return hex8(off).map(|o| WalFile::BackupLabel(seg, o)).ok_or_else(bad);
        }
        Err(bad())
    }

    /// The name PostgreSQL gives this file.
    pub fn file_name(&self, segment_size: u64) -> String {
        match self {
            WalFile::Segment(s) => s.file_name(segment_size),
            WalFile::Partial(s) => format!("{}.partial", s.file_name(segment_size)),
            WalFile::History(t) => format!("{t:08X}.history"),
            WalFile::BackupLabel(s, o) => format!("{}.{o:08X}.backup", s.file_name(segment_size)),
        }
    }

    /// Whether a file of this kind must not exist twice with different content.
    pub fn is_history(&self) -> bool {
        matches!(self, WalFile::History(_))
    }
}

/// The S3 folder of a prefix's WAL.
pub fn folder(prefix: &str) -> String {
    format!("{prefix}/wal/")
}

/// Where `file` lives: `PREFIX/wal/NAME.zst.age`.
pub fn key(prefix: &str, file: &WalFile, segment_size: u64) -> String {
    format!("{}{}.zst.age", folder(prefix), file.file_name(segment_size))
}

/// The file a key under [`folder`] names (None for anything else).
pub fn from_key(prefix: &str, key: &str, segment_size: u64) -> Option<WalFile> {
    let name = key.strip_prefix(&folder(prefix))?.strip_suffix(".zst.age")?;
    WalFile::parse(name, segment_size).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = DEFAULT_SEGMENT_SIZE;

    #[test]
    fn names_round_trip_and_anything_else_is_refused() {
        for name in [
            "000000010000000000000001",
            "0000000A00000003000000FF",
            "000000020000000000000009.partial",
            "00000002.history",
            "000000010000000000000002.00000028.backup",
        ] {
            assert_eq!(WalFile::parse(name, SEG).unwrap().file_name(SEG), name);
        }
        assert_eq!(
            WalFile::parse("0000000A00000003000000FF", SEG).unwrap(),
            WalFile::Segment(Segment { timeline: 10, number: 3 * 256 + 255 })
        );
        for bad in [
            "",
            "../../etc/passwd",
            "pg_wal/000000010000000000000001",
            "00000001000000000000000g",
            "0000000100000000000000001",
            "000000010000000000000100", // segment 0x100 does not exist at 16 MiB
            "000000000000000000000001", // timeline 0
            "00000000.history",
            "000000010000000000000001.tmp",
            "000000010000000000000001\n",
            "0000000100000000000000a1", // lower case is not PostgreSQL's
        ] {
            assert!(WalFile::parse(bad, SEG).is_err(), "{bad:?} was accepted");
        }
        let e = WalFile::parse("x\ny", SEG).unwrap_err();
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn lsns_and_segments() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        let s = Segment::of(1, lsn, SEG);
        assert_eq!(s.file_name(SEG), "0000000100000016000000B3");
        assert_eq!(s.start(SEG), "16/B3000000".parse().unwrap());
        assert_eq!(s.next().file_name(SEG), "0000000100000016000000B4");
        assert_eq!(Segment { timeline: 1, number: 255 }.next().file_name(SEG), "000000010000000100000000");
        assert!("0/".parse::<Lsn>().is_err() && "1".parse::<Lsn>().is_err() && "123456789/0".parse::<Lsn>().is_err());
        // Other segment sizes (initdb --wal-segsize): 64 segments of 64 MiB per log.
        let big = 64 << 20;
        assert_eq!(WalFile::parse("00000001000000000000003F", big).unwrap().file_name(big), "00000001000000000000003F");
        assert!(WalFile::parse("000000010000000000000040", big).is_err());
        let k = key("pre", &WalFile::History(2), SEG);
        assert_eq!(k, "pre/wal/00000002.history.zst.age");
        assert_eq!(from_key("pre", &k, SEG), Some(WalFile::History(2)));
        assert_eq!(from_key("pre", "pre/wal/x.zst.age", SEG), None);
        assert_eq!(from_key("pre", "other/wal/00000002.history.zst.age", SEG), None);
    }
}
