//! The data volume: mounted, room left, its marker.

use std::path::Path;

use super::Check;
use crate::boot::volume::{MARKER, Marker};

/// The data volume is mounted, has room, and its marker belongs to it (and to this instance).
pub(super) fn check_volume(mount_point: &Path, min_free_percent: u64, instance_id: Option<&str>) -> Vec<Check> {
    let mp = mount_point.display();
    let mounts = crate::mountinfo::read().unwrap_or_default();
    // The last mount at a path is the one that is seen.
    let Some(m) = mounts.iter().rev().find(|m| m.mount_point == mount_point) else {
        return vec![
            Check::fail(
                "volume",
                format!("{mp} is not mounted: the data volume is missing"),
                "PostgreSQL, Redis and the API must not run without it. Attach the EBS volume (volume.device), then `systemctl restart caretaker-firstboot` mounts it; `journalctl -u caretaker-firstboot -b` says what went wrong at boot",
            ),
            Check::skip("marker", format!("{mp} is not mounted")),
        ];
    };
    let mut checks = Vec::new();
    match nix::sys::statvfs::statvfs(mount_point) {
        Ok(s) => {
            // u64 on the 64-bit Linux targets (x86_64 for the lab, aarch64 for Graviton).
            let unit = s.fragment_size();
            let total = s.blocks() * unit;
            let free = s.blocks_available() * unit;
            let percent = (free * 100).checked_div(total).unwrap_or(0);
            let detail = format!(
                "{} ({}) at {mp}: {} free of {} ({percent}%)",
                m.source,
                m.fstype,
                crate::units::human_bytes(free),
                crate::units::human_bytes(total)
            );
            if percent < min_free_percent {
                checks.push(Check::fail(
                    "volume",
                    detail,
                    format!(
                        "less than {min_free_percent}% free: grow the EBS volume (`aws ec2 modify-volume --size …`), then `caretaker firstboot` grows the filesystem; or free space (old WAL, logs)"
                    ),
                ));
            } else {
                checks.push(Check::ok("volume", detail));
            }
        }
        Err(e) => checks.push(Check::fail("volume", format!("statvfs {mp}: {e}"), "check the mount (`findmnt {mp}`)")),
    }

    let marker_path = mount_point.join(MARKER);
    let marker: Marker = match std::fs::read(&marker_path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                checks.push(Check::fail(
                    "marker",
                    format!("{} is unreadable: {e}", marker_path.display()),
                    "`caretaker firstboot` writes a new one",
                ));
                return checks;
            }
        },
        Err(e) => {
            checks.push(Check::fail(
                "marker",
                format!("{}: {e}", marker_path.display()),
                "this volume was not prepared by caretaker on this boot: `systemctl restart caretaker-firstboot`",
            ));
            return checks;
        }
    };
    let uuid = crate::boot::volume::blkid_probe(Path::new(&m.source)).ok().and_then(|b| b.get("UUID").cloned());
    let volume = marker.volume_id.as_deref().unwrap_or("(no volume id)");
    match uuid {
        Some(u) if u != marker.filesystem_uuid => checks.push(Check::fail(
            "marker",
            format!("{} names filesystem {}, but {} is {u}", marker_path.display(), marker.filesystem_uuid, m.source),
            "a copied marker or a cloned volume: if this volume really holds the data, remove the marker and `systemctl restart caretaker-firstboot`",
        )),
        _ => match instance_id {
            Some(i) if !marker.instances.iter().any(|x| x == i) => checks.push(Check::fail(
                "marker",
                format!("volume {volume}: this instance {i} is not in the marker (it lists {})", marker.instances.join(", ")),
                "caretaker-firstboot did not run on this instance: `systemctl restart caretaker-firstboot`",
            )),
            _ => checks.push(Check::ok(
                "marker",
                format!(
                    "volume {volume}, filesystem {}, first formatted {}, {} instance(s)",
                    marker.filesystem_uuid,
                    marker.first_formatted_at,
                    marker.instances.len()
                ),
            )),
        },
    }
    checks
}
