//! What a WAL segment says about itself, checked against the cluster before it is archived and
//! after it is fetched: a file from another cluster, another timeline or another place in the WAL
//! is never stored under this segment's name (nor replayed as it).
//!
//! A segment starts with `XLogLongPageHeaderData` (little-endian on every platform caretaker runs
//! on): magic u16, info u16, timeline u32, page address u64, remaining length u32, padding to 24,
//! system identifier u64, segment size u32, block size u32.

use super::name::Segment;

const XLP_LONG_HEADER: u16 = 0x0002;
/// The length of the long page header this check reads.
pub const LONG_HEADER_LEN: usize = 40;

/// The fields a segment's first page header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub magic: u16,
    pub timeline: u32,
    pub page_address: u64,
    pub system_identifier: u64,
    pub segment_size: u32,
    pub block_size: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The first page header of `bytes`, or why it is not one.
pub fn read(bytes: &[u8]) -> Result<SegmentHeader, String> {
    if bytes.len() < LONG_HEADER_LEN {
        return Err(format!("{} bytes is too short for a WAL segment", bytes.len()));
    }
    let magic = u16_at(bytes, 0);
    // Every PostgreSQL since 9.x uses 0xD0xx–0xD1xx (15: D110, 16: D113, 17: D116).
    if !(0xD000..=0xD1FF).contains(&magic) {
        return Err(format!("its first page has magic {magic:#06X}, not a WAL page's"));
    }
    if u16_at(bytes, 2) & XLP_LONG_HEADER == 0 {
        return Err("its first page has no long header: it does not start a segment".into());
    }
    Ok(SegmentHeader {
        magic,
        timeline: u32_at(bytes, 4),
        page_address: u64_at(bytes, 8),
        system_identifier: u64_at(bytes, 24),
        segment_size: u32_at(bytes, 32),
        block_size: u32_at(bytes, 36),
    })
}

/// Checks that `bytes` is the segment `expected` of the cluster `system_identifier`, whole.
pub fn check(bytes: &[u8], expected: Segment, segment_size: u64, system_identifier: u64) -> Result<(), String> {
    check_start(bytes, bytes.len() as u64, expected, segment_size, system_identifier)
}

/// [`check`] of a segment of `total` bytes from its beginning `first` (at least its long page
/// header): what a streamed push checks before anything is stored.
pub fn check_start(
    first: &[u8],
    total: u64,
    expected: Segment,
    segment_size: u64,
    system_identifier: u64,
) -> Result<(), String> {
    let h = read(first)?;
    if h.system_identifier != system_identifier {
        return Err(format!(
            "it belongs to the cluster with system identifier {}, not this cluster's {system_identifier}",
            h.system_identifier
        ));
    }
    if u64::from(h.segment_size) != segment_size {
        return Err(format!("its segment size is {} bytes, this cluster's is {segment_size}", h.segment_size));
    }
    if total != segment_size {
        return Err(format!("it is {total} bytes long, a segment is {segment_size}"));
    }
    // A segment's first page was written on the timeline that was current then, which is the
    // file's own or (for the first segment of a new timeline) an ancestor: never a later one.
    if h.timeline > expected.timeline {
        return Err(format!("its first page is from timeline {}, after the file's {}", h.timeline, expected.timeline));
    }
    let start = expected.start(segment_size).0;
    if h.page_address != start {
        return Err(format!(
            "its first page is at {}, not at the segment's start {}",
            super::name::Lsn(h.page_address),
            super::name::Lsn(start)
        ));
    }
    Ok(())
}

/// The system identifier in a `global/pg_control` file (its first 8 bytes).
pub fn control_system_identifier(pg_control: &[u8]) -> Result<u64, String> {
    if pg_control.len() < 16 {
        return Err(format!("pg_control is {} bytes: not a control file", pg_control.len()));
    }
    Ok(u64_at(pg_control, 0))
}

#[cfg(test)]
pub(crate) fn fake_segment(timeline: u32, segment: Segment, segment_size: u64, system_identifier: u64) -> Vec<u8> {
    let mut b = vec![0u8; segment_size as usize];
    b[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    b[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
    b[4..8].copy_from_slice(&timeline.to_le_bytes());
    b[8..16].copy_from_slice(&segment.start(segment_size).0.to_le_bytes());
    b[24..32].copy_from_slice(&system_identifier.to_le_bytes());
    b[32..36].copy_from_slice(&(segment_size as u32).to_le_bytes());
    b[36..40].copy_from_slice(&8192u32.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn a_segment_from_elsewhere_is_named_for_what_is_wrong() {
        let s = Segment { timeline: 2, number: 7 };
        let good = fake_segment(2, s, SEG, 42);
        check(&good, s, SEG, 42).unwrap();
        // The first segment of timeline 2 may start with a page written on timeline 1.
        check(&fake_segment(1, s, SEG, 42), s, SEG, 42).unwrap();
        let e = check(&good, s, SEG, 43).unwrap_err();
        assert!(e.contains("system identifier 42"), "{e}");
        let e = check(&fake_segment(3, s, SEG, 42), s, SEG, 42).unwrap_err();
        assert!(e.contains("timeline 3"), "{e}");
        let e = check(&good, s.next(), SEG, 42).unwrap_err();
        assert!(e.contains("not at the segment's start 0/8000000"), "{e}");
        let e = check(&good[..SEG as usize - 1], s, SEG, 42).unwrap_err();
        assert!(e.contains("bytes long"), "{e}");
        assert!(check(&[0u8; 100], s, SEG, 42).unwrap_err().contains("magic"));
        assert!(check(b"short", s, SEG, 42).unwrap_err().contains("too short"));
        let mut short_header = good.clone();
        short_header[2] = 0;
        assert!(check(&short_header, s, SEG, 42).unwrap_err().contains("long header"));
    }
}
