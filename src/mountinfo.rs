//! `/proc/self/mountinfo`, parsed once for everyone who asks what is mounted where.

use std::path::{Path, PathBuf};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `st_dev` of the mounted filesystem (major:minor).
    pub devnum: u64,
    pub mount_point: PathBuf,
    pub fstype: String,
    /// The mount source (a device path for block filesystems).
    pub source: String,
}

/// Octal escapes (`\040` for a space, `\134` for a backslash) in mountinfo fields.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; lines that do not have its shape are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let (maj, min) = f.get(2)?.split_once(':')?;
            let sep = f.iter().position(|x| *x == "-")?;
            Some(Mount {
                devnum: nix::sys::stat::makedev(maj.parse().ok()?, min.parse().ok()?),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                fstype: f.get(sep + 1)?.to_string(),
                source: f.get(sep + 2).map(|s| unescape(s)).unwrap_or_default(),
            })
        })
        .collect()
}

/// This process's mounts.
pub fn read() -> std::io::Result<Vec<Mount>> {
    read_from(Path::new("/proc/self/mountinfo"))
}

/// The mounts listed in `path` (a mountinfo file).
pub fn read_from(path: &Path) -> std::io::Result<Vec<Mount>> {
    Ok(parse(&std::fs::read_to_string(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_parsed_with_escapes() {
        let text = "36 35 98:0 / /data rw,noatime shared:1 - xfs /dev/nvme1n1 rw,attr2\n\
                    37 35 98:1 / /mnt/with\\040space rw - ext4 /dev/loop3 rw\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0],
            Mount {
                devnum: nix::sys::stat::makedev(98, 0),
                mount_point: "/data".into(),
                fstype: "xfs".into(),
                source: "/dev/nvme1n1".into()
            }
        );
        assert_eq!(m[1].mount_point, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("a\\134b\\011c"), "a\\b\tc");
    }
}
