//! Physical base backups: `pg_basebackup -D - -Ft -X none` streamed through the backup stream (no
//! local copy), its WAL coming from the archive. The manifest records where the backup starts
//! and ends in the WAL (from pg_basebackup's own report), its timeline and the cluster's system
//! identifier — what a point-in-time restore picks a backup by and checks the chain from.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::wal::name::Lsn;
use crate::pg::PgTarget;

/// What the server says before the backup starts.
#[derive(Debug, Clone)]
pub struct Facts {
    pub system_identifier: u64,
    pub server_version_num: i32,
    pub segment_size: u64,
}

/// A base backup's part of the manifest (`details`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseDetails {
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub timeline: u32,
    pub system_identifier: String,
    pub server_version_num: i32,
    pub segment_size: u64,
}

impl BaseDetails {
    pub fn system_identifier(&self) -> u64 {
        self.system_identifier.parse().unwrap_or(0)
    }
}

/// The cluster's identity; refuses a base backup when WAL archiving is off (the backup would
/// need WAL nobody kept).
pub async fn before(target: &PgTarget) -> Result<Facts, String> {
    let client = target.connect("postgres", Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT system_identifier::text, current_setting('server_version_num')::int,
                    current_setting('wal_segment_size')::text, current_setting('archive_mode'),
                    current_setting('archive_command')
             FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| format!("asking PostgreSQL for its identity: {e}"))?;
    let (archive_mode, archive_command): (String, String) = (row.get(3), row.get(4));
    if archive_mode == "off" || archive_command.trim().is_empty() {
        return Err(format!(
            "WAL archiving is off (archive_mode = {archive_mode}): a base backup cannot be restored without its WAL; \
             turn on backup.wal-archive"
        ));
    }
    let system_identifier: String = row.get(0);
    let segment: String = row.get(2);
    Ok(Facts {
        system_identifier: system_identifier.parse().map_err(|_| "the system identifier is not a number")?,
        server_version_num: row.get(1),
        segment_size: parse_size(&segment).ok_or_else(|| format!("wal_segment_size {segment:?} is not a size"))?,
    })
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().ok()?;
    Some(match unit.trim() {
        "" | "B" => n,
        "kB" => n << 10,
        "MB" => n << 20,
        "GB" => n << 30,
        _ => return None,
    })
}

/// pg_basebackup's arguments: one tar on stdout, no WAL (the archive has it), a fast checkpoint
/// (the backup starts now, not at the next scheduled checkpoint), its report on stderr.
pub fn args(target: &PgTarget, id: &str) -> Vec<String> {
    vec![
        format!("--host={}", target.socket_dir.display()),
        format!("--port={}", target.port),
        format!("--username={}", target.user),
        "--no-password".into(),
        "--pgdata=-".into(),
        "--format=tar".into(),
        "--wal-method=none".into(),
        "--checkpoint=fast".into(),
        format!("--label=caretaker {id}"),
        "--verbose".into(),
    ]
}

/// What the tar stream says about the backup: `backup_label` (its start) and the end of
/// `backup_manifest` (its WAL range), read as the stream goes by.
#[derive(Debug, Default, Clone)]
pub struct TarFacts {
    pub label: Vec<u8>,
    pub manifest_tail: Vec<u8>,
    pub entries: u64,
}

const TAIL: usize = 64 << 10;

/// A streaming reader of tar headers: sees every byte once, keeps only what [`TarFacts`] needs.
#[derive(Debug, Default)]
pub struct TarScan {
    header: Vec<u8>,
    /// Bytes left in the current entry's data, then its padding.
    data_left: u64,
    pad_left: u64,
    current: Option<&'static str>,
    pub facts: TarFacts,
}

fn tar_size(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // base-256 (GNU) for sizes over 8 GiB
        return Some(field[1..].iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)));
    }
    let text = std::str::from_utf8(field).ok()?.trim_matches(|c: char| c == '\0' || c == ' ');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

impl TarScan {
    pub fn feed(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            if self.data_left > 0 {
                let n = (self.data_left as usize).min(buf.len());
                match self.current {
                    Some("backup_label") if self.facts.label.len() < TAIL => {
                        let room = TAIL - self.facts.label.len();
                        self.facts.label.extend_from_slice(&buf[..n.min(room)]);
                    }
                    Some("backup_manifest") => {
                        self.facts.manifest_tail.extend_from_slice(&buf[..n]);
                        let extra = self.facts.manifest_tail.len().saturating_sub(TAIL);
                        self.facts.manifest_tail.drain(..extra);
                    }
                    _ => {}
                }
                self.data_left -= n as u64;
                buf = &buf[n..];
                continue;
            }
            if self.pad_left > 0 {
                let n = (self.pad_left as usize).min(buf.len());
                self.pad_left -= n as u64;
                buf = &buf[n..];
                continue;
            }
            let n = (512 - self.header.len()).min(buf.len());
            self.header.extend_from_slice(&buf[..n]);
            buf = &buf[n..];
            if self.header.len() == 512 {
                let h = std::mem::take(&mut self.header);
                if h.iter().all(|b| *b == 0) {
                    continue;
                }
                let name_end = h[..100].iter().position(|b| *b == 0).unwrap_or(100);
                let name = &h[..name_end];
                let size = tar_size(&h[124..136]).unwrap_or(0);
                self.current = match name {
                    b"backup_label" | b"./backup_label" => Some("backup_label"),
                    b"backup_manifest" | b"./backup_manifest" => Some("backup_manifest"),
                    _ => None,
                };
                self.facts.entries += 1;
                self.data_left = size;
                self.pad_left = (512 - size % 512) % 512;
            }
        }
    }
}

impl super::stream::Scan for TarScan {
    fn feed(&mut self, bytes: &[u8]) {
        TarScan::feed(self, bytes)
    }
}

/// The manifest details from the tar's `backup_label` ("START WAL LOCATION: 0/2000028 (file …)",
/// "START TIMELINE: 1") and `backup_manifest`'s WAL range ("End-LSN": "0/2000100").
pub fn details(facts: &Facts, tar: &TarFacts) -> Result<serde_json::Value, String> {
    let label = String::from_utf8_lossy(&tar.label);
    let field = |name: &str| label.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let start_lsn: Lsn = field("START WAL LOCATION:")
        .and_then(|v| v.split_whitespace().next())
        .ok_or("the base backup has no backup_label with its start (not a pg_basebackup tar?)")?
        .parse()?;
    let timeline: u32 =
        field("START TIMELINE:").and_then(|v| v.parse().ok()).ok_or("backup_label names no start timeline")?;
    let manifest = String::from_utf8_lossy(&tar.manifest_tail);
    let stop_lsn: Lsn = manifest
        .rsplit("\"End-LSN\"")
        .next()
        .filter(|_| manifest.contains("\"End-LSN\""))
        .and_then(|rest| rest.split('"').nth(1))
        .ok_or("the base backup's backup_manifest has no WAL range (End-LSN)")?
        .parse()?;
    if stop_lsn < start_lsn {
        return Err(format!("the backup ends at {stop_lsn}, before its start {start_lsn}"));
    }
    let d = BaseDetails {
        start_lsn,
        stop_lsn,
        timeline,
        system_identifier: facts.system_identifier.to_string(),
        server_version_num: facts.server_version_num,
        segment_size: facts.segment_size,
    };
    Ok(serde_json::to_value(d).expect("details serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, data: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[156] = b'0';
        h[257..262].copy_from_slice(b"ustar");
        let mut out = h;
        out.extend_from_slice(data);
        out.resize(out.len() + (512 - data.len() % 512) % 512, 0);
        out
    }

    #[test]
    fn the_tar_stream_gives_the_start_and_end_points_whatever_the_chunking() {
        let facts = Facts { system_identifier: 7, server_version_num: 160004, segment_size: 16 << 20 };
        let mut tar = entry(
            "backup_label",
            b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\n\
              BACKUP METHOD: streamed\nSTART TIMELINE: 1\n",
        );
        tar.extend(entry("base/1/1259", &vec![7u8; 9000]));
        tar.extend(entry(
            "backup_manifest",
            b"{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [],\n\"WAL-Ranges\": [\n\
              { \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n\"Manifest-Checksum\": \"x\"}\n",
        ));
        tar.extend(vec![0u8; 1024]);
        for chunk in [1usize, 7, 512, 4096, tar.len()] {
            let mut scan = TarScan::default();
            for c in tar.chunks(chunk) {
                scan.feed(c);
            }
            assert_eq!(scan.facts.entries, 3);
            let d: BaseDetails = serde_json::from_value(details(&facts, &scan.facts).unwrap()).unwrap();
            assert_eq!((d.start_lsn, d.stop_lsn, d.timeline), (Lsn(0x2000028), Lsn(0x2000100), 1));
            assert_eq!(d.system_identifier(), 7);
        }
        assert!(details(&facts, &TarFacts::default()).unwrap_err().contains("backup_label"));
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
    }
}
