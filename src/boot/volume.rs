//! The data volume: found, checked, formatted only when blank, mounted, grown, and marked.
//!
//! Safety rule 1: a device with any filesystem, partition table, LVM, RAID or LUKS signature — or
//! with data in its first or last MiB — is never formatted. A known filesystem (xfs, ext4) is
//! mounted as it is; anything else is refused with what was found and what to do. Safety rule 2:
//! when the volume is missing, firstboot fails, so nothing that writes data starts on the root disk.
//!
//! This is plain sequential boot work: blocking calls, run from `spawn_blocking` by firstboot.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::nvme;
use super::probe::{self, Verdict};
use crate::config::{Filesystem, VolumeConfig, VolumeSelector};

/// Label given to ext4 filesystems caretaker makes.
pub const LABEL: &str = "caretaker-data";
/// XFS labels hold at most 12 bytes, so XFS gets the short form.
pub const LABEL_XFS: &str = "caretaker";
/// The marker file at the root of the mounted volume.
pub const MARKER: &str = ".caretaker-volume";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "no data volume matching {selector} appeared within {waited:?} (seen: {seen}). Nothing was started on the root disk. Attach the volume (or fix volume.device) and reboot or run `caretaker firstboot` again."
    )]
    NotFound { selector: String, waited: Duration, seen: String },
    #[error(
        "refusing to use {}: found {}. caretaker formats only blank volumes and mounts only xfs or ext4. Nothing was changed. If this is the right volume, inspect it (`blkid -p {}`, `wipefs {}`) and make an xfs or ext4 filesystem on it yourself; if not, attach the right one.",
        device.display(), found.join("; "), device.display(), device.display()
    )]
    Refused { device: PathBuf, found: Vec<String> },
    #[error("refusing to use {}: it holds the root filesystem", device.display())]
    RootDisk { device: PathBuf },
    #[error("{} is not a block device", device.display())]
    NotBlock { device: PathBuf },
    #[error("{action} {}: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("{} is already mounted from {other}; refusing to mount {} over it", mount_point.display(), device.display())]
    MountPointBusy { mount_point: PathBuf, other: String, device: PathBuf },
    #[error("{} is already mounted at {other}; unmount it first", device.display())]
    DeviceBusy { device: PathBuf, other: String },
    #[error(
        "the volume's marker says it is {marker_volume}, but this is {this_volume}: a swapped or cloned volume. It was unmounted and nothing was started. If this volume is really meant to hold the data, remove {MARKER} from it."
    )]
    MarkerMismatch { marker_volume: String, this_volume: String },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VolumeError + 'a {
    move |source| VolumeError::Io { action, path: path.to_path_buf(), source }
}

/// Runs a command; its stderr goes into the error.
fn run(program: &str, args: &[&str]) -> Result<String, VolumeError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program).args(args).stdin(std::process::Stdio::null()).output().map_err(|e| {
        VolumeError::Command { command: command.clone(), status: "not run".into(), stderr: e.to_string() }
    })?;
    if !out.status.success() {
        return Err(VolumeError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The device found for the configured selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub device: PathBuf,
    /// Known when matched through EBS identity.
    pub volume_id: Option<String>,
}

/// The `major:minor` of the block device holding `/`, and of its whole disk.
fn root_devices() -> Vec<u64> {
    let mut out = Vec::new();
    if let Ok(m) = std::fs::metadata("/") {
        let dev = m.dev();
        out.push(dev);
        let (maj, min) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
        // /sys/dev/block/M:m/.. is the whole disk when the root is a partition.
        let part = PathBuf::from(format!("/sys/dev/block/{maj}:{min}"));
        if part.join("partition").exists()
            && let Ok(devnum) = std::fs::read_to_string(part.join("../dev"))
            && let Some((a, b)) = devnum.trim().split_once(':')
            && let (Ok(a), Ok(b)) = (a.parse(), b.parse())
        {
            out.push(nix::sys::stat::makedev(a, b));
        }
    }
    out
}

fn check_block(device: &Path) -> Result<u64, VolumeError> {
    let meta = std::fs::metadata(device).map_err(io("stat", device))?;
    if !meta.file_type().is_block_device() {
        return Err(VolumeError::NotBlock { device: device.into() });
    }
    if root_devices().contains(&meta.rdev()) {
        return Err(VolumeError::RootDisk { device: device.into() });
    }
    Ok(meta.rdev())
}

/// One look for the volume; `None` if it is not (yet) there. `seen` collects what was looked at.
fn locate_once(sel: &VolumeSelector, sysfs: &Path, seen: &mut Vec<String>) -> Result<Option<Located>, VolumeError> {
    seen.clear();
    match sel {
        VolumeSelector::Path(p) => {
            if p.exists() {
                check_block(p)?;
                return Ok(Some(Located { device: p.clone(), volume_id: None }));
            }
            seen.push(format!("{} does not exist", p.display()));
        }
        VolumeSelector::VolumeId(id) => {
            for disk in nvme::list_nvme_disks(sysfs).map_err(io("read", sysfs))? {
                seen.push(format!("{} ({}, {})", disk.device.display(), disk.model, disk.serial));
                if disk.model == nvme::EBS_MODEL && nvme::volume_id_from_serial(&disk.serial).as_deref() == Some(id) {
                    check_block(&disk.device)?;
                    return Ok(Some(Located { device: disk.device, volume_id: Some(id.clone()) }));
                }
            }
        }
        VolumeSelector::DeviceName(name) => {
            for disk in nvme::list_nvme_disks(sysfs).map_err(io("read", sysfs))? {
                if disk.model != nvme::EBS_MODEL {
                    seen.push(format!("{} ({}: skipped)", disk.device.display(), disk.model));
                    continue;
                }
                let id = match nvme::identify_controller(&disk.device) {
                    Ok(buf) => nvme::parse_id_ctrl(&buf).ok(),
                    Err(e) => {
                        warn!(device = %disk.device.display(), "cannot read NVMe identity: {e}");
                        None
                    }
                };
                let attach = id.as_ref().and_then(|i| i.ebs_device_name.clone()).unwrap_or_default();
                seen.push(format!("{} ({} as {attach})", disk.device.display(), disk.serial));
                if &attach == name || attach == format!("xvd{}", name.trim_start_matches("sd")) {
                    check_block(&disk.device)?;
                    let volume_id = nvme::volume_id_from_serial(&disk.serial);
                    return Ok(Some(Located { device: disk.device, volume_id }));
                }
            }
            // Xen instances (and some others) expose the attach name directly.
            for candidate in [format!("/dev/{name}"), format!("/dev/xvd{}", name.trim_start_matches("sd"))] {
                let p = PathBuf::from(&candidate);
                if p.exists() {
                    check_block(&p)?;
                    return Ok(Some(Located { device: p, volume_id: None }));
                }
            }
        }
    }
    Ok(None)
}

/// Waits up to `timeout` for the configured volume.
pub fn locate(sel: &VolumeSelector, sysfs: &Path, timeout: Duration) -> Result<Located, VolumeError> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut logged = false;
    loop {
        if let Some(found) = locate_once(sel, sysfs, &mut seen)? {
            return Ok(found);
        }
        if start.elapsed() >= timeout {
            return Err(VolumeError::NotFound {
                selector: sel.to_string(),
                waited: timeout,
                seen: if seen.is_empty() { "no candidate devices".into() } else { seen.join(", ") },
            });
        }
        if !logged {
            info!(volume = %sel, "waiting up to {timeout:?} for the data volume to appear");
            logged = true;
        }
        std::thread::sleep(Duration::from_millis(500).min(timeout.saturating_sub(start.elapsed())));
    }
}

/// What `blkid -p` (low-level probe of the device itself, no cache) says: `TYPE`, `UUID`, `PTTYPE`, ….
pub fn blkid_probe(device: &Path) -> Result<BTreeMap<String, String>, VolumeError> {
    let dev = device.to_string_lossy();
    let out =
        Command::new("blkid").args(["-p", "-o", "export", &dev]).stdin(std::process::Stdio::null()).output().map_err(
            |e| VolumeError::Command {
                command: format!("blkid -p {dev}"),
                status: "not run".into(),
                stderr: e.to_string(),
            },
        )?;
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()),
        // 2: nothing found.
        Some(2) => Ok(BTreeMap::new()),
        _ => Err(VolumeError::Command {
            command: format!("blkid -p -o export {dev}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// What to do with a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It holds an xfs or ext4 filesystem: mount it as it is.
    Mount { fstype: String, uuid: String },
    /// Proven blank: format it.
    Format,
    /// Anything else: refuse.
    Refuse(Vec<String>),
}

/// Decides from our own probe, blkid's, and the zero check. Pure given its inputs.
pub fn decide(verdict: &Verdict, blkid: &BTreeMap<String, String>) -> Decision {
    let fstype = blkid.get("TYPE").map(String::as_str);
    let usage = blkid.get("USAGE").map(String::as_str);
    let has_pt = blkid.contains_key("PTTYPE");
    match (fstype, has_pt) {
        (Some(t @ ("xfs" | "ext4" | "ext3" | "ext2")), false) if usage.is_none_or(|u| u == "filesystem") => {
            // Our own probe must agree: only the filesystem's signature, nothing else.
            let others: Vec<String> = match verdict {
                Verdict::NotBlank(r) => r
                    .iter()
                    .filter(|r| r.contains("signature") && !(r.starts_with("xfs") || r.starts_with("ext2/3/4")))
                    .cloned()
                    .collect(),
                Verdict::Blank => vec![],
            };
            if others.is_empty() {
                Decision::Mount { fstype: t.to_string(), uuid: blkid.get("UUID").cloned().unwrap_or_default() }
            } else {
                let mut found = vec![format!("{t} filesystem together with other signatures")];
                found.extend(others);
                Decision::Refuse(found)
            }
        }
        (None, false) if *verdict == Verdict::Blank => Decision::Format,
        _ => {
            let mut found: Vec<String> = blkid
                .iter()
                .filter(|(k, _)| ["TYPE", "PTTYPE", "USAGE", "VERSION", "LABEL"].contains(&k.as_str()))
                .map(|(k, v)| format!("blkid {k}={v}"))
                .collect();
            if let Verdict::NotBlank(r) = verdict {
                found.extend(r.iter().cloned());
            }
            if found.is_empty() {
                found.push("blkid reports something unrecognised".into());
            }
            Decision::Refuse(found)
        }
    }
}

/// Probes `device` and decides.
/// The size of the device in bytes.
fn device_size(device: &Path) -> Result<u64, VolumeError> {
    let mut f = std::fs::File::open(device).map_err(io("open", device))?;
    f.seek(SeekFrom::End(0)).map_err(io("size of", device))
}

pub fn examine(device: &Path) -> Result<Decision, VolumeError> {
    let mut f = File::open(device).map_err(io("open", device))?;
    let size = f.seek(SeekFrom::End(0)).map_err(io("size of", device))?;
    let verdict = probe::inspect(&mut f, size).map_err(io("read", device))?;
    let blkid = blkid_probe(device)?;
    Ok(decide(&verdict, &blkid))
}

fn mounts() -> Result<Vec<crate::mountinfo::Mount>, VolumeError> {
    crate::mountinfo::read().map_err(io("read", Path::new("/proc/self/mountinfo")))
}

/// What firstboot did with the volume.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeOutcome {
    pub device: PathBuf,
    pub volume_id: Option<String>,
    pub fstype: String,
    pub uuid: String,
    pub formatted: bool,
    pub mounted_now: bool,
    /// Filesystem size before and after growing, when it grew.
    pub grown: Option<(u64, u64)>,
    pub marker_changed: bool,
}

fn fs_size(mount_point: &Path) -> Result<u64, VolumeError> {
    let st = nix::sys::statvfs::statvfs(mount_point).map_err(|e| VolumeError::Io {
        action: "statvfs",
        path: mount_point.into(),
        source: e.into(),
    })?;
    Ok(st.blocks() * st.fragment_size())
}

/// Finds, checks, formats-if-blank, mounts, grows and marks the data volume. Idempotent: on a
/// mounted, marked volume it changes nothing.
pub fn prepare(
    cfg: &VolumeConfig,
    sysfs: &Path,
    state_dir: &Path,
    instance_id: &str,
) -> Result<VolumeOutcome, VolumeError> {
    let located = locate(&cfg.device, sysfs, cfg.attach_timeout.get())?;
    let device = located.device.clone();
    let rdev = check_block(&device)?;
    info!(device = %device.display(), volume_id = located.volume_id.as_deref().unwrap_or("-"), "data volume found: {}", device.display());

    let mp = &cfg.mount_point;
    let table = mounts()?;
    let here = table.iter().find(|m| &m.mount_point == mp);
    let elsewhere = table.iter().find(|m| m.devnum == rdev && &m.mount_point != mp);
    if let Some(m) = elsewhere {
        return Err(VolumeError::DeviceBusy { device, other: m.mount_point.display().to_string() });
    }
    let (mut formatted, mut mounted_now) = (false, false);
    let (fstype, uuid) = match here {
        Some(m) if m.devnum == rdev => {
            let b = blkid_probe(&device)?;
            (b.get("TYPE").cloned().unwrap_or_default(), b.get("UUID").cloned().unwrap_or_default())
        }
        Some(m) => {
            return Err(VolumeError::MountPointBusy { mount_point: mp.clone(), other: m.source.clone(), device });
        }
        None => {
            let size = device_size(&device)?;
            let id = DeviceId { path: &device, rdev, volume_id: located.volume_id.as_deref(), size };
            let intent = FormatIntent::read(state_dir);
            let interrupted = intent.as_ref().is_some_and(|i| i.is_for(&id));
            let (fstype, uuid) = match examine(&device)? {
                Decision::Refuse(found) if interrupted => {
                    warn!(device = %device.display(), "{}: an earlier run was interrupted while formatting it (it was proven blank then; now: {}): formatting again", device.display(), found.join("; "));
                    formatted = true;
                    format(&id, cfg.filesystem, state_dir, true)?
                }
                Decision::Refuse(found) => return Err(VolumeError::Refused { device, found }),
                Decision::Mount { fstype, uuid } => {
                    info!(device = %device.display(), fstype, uuid, "{}: existing {fstype} filesystem {uuid}: mounting it as it is", device.display());
                    (fstype, uuid)
                }
                Decision::Format => {
                    info!(device = %device.display(), filesystem = ?cfg.filesystem, "{} is blank (no signature, zeros everywhere it was sampled): formatting it as {:?}", device.display(), cfg.filesystem);
                    formatted = true;
                    format(&id, cfg.filesystem, state_dir, false)?
                }
            };
            std::fs::create_dir_all(mp).map_err(io("create", mp))?;
            let mounted = run(
                "mount",
                &["-t", &fstype, "-o", &cfg.mount_options, &device.to_string_lossy(), &mp.to_string_lossy()],
            );
            let (fstype, uuid) = match mounted {
                Ok(_) => (fstype, uuid),
                // mkfs killed after writing a valid-looking superblock: the mount fails.
                Err(e) if interrupted && !formatted => {
                    warn!(device = %device.display(), "{}: mount failed after an interrupted format ({e}): formatting again", device.display());
                    formatted = true;
                    let again = format(&id, cfg.filesystem, state_dir, true)?;
                    run(
                        "mount",
                        &["-t", &again.0, "-o", &cfg.mount_options, &device.to_string_lossy(), &mp.to_string_lossy()],
                    )?;
                    again
                }
                Err(e) => return Err(e),
            };
            FormatIntent::clear(state_dir);
            mounted_now = true;
            (fstype, uuid)
        }
    };

    let marker_changed = match update_marker(mp, located.volume_id.as_deref(), &uuid, instance_id, formatted) {
        Ok(changed) => changed,
        Err(e) => {
            if mounted_now {
                let _ = run("umount", &[&mp.to_string_lossy()]);
            }
            return Err(e);
        }
    };

    let before = fs_size(mp)?;
    match fstype.as_str() {
        "xfs" => run("xfs_growfs", &["-d", &mp.to_string_lossy()]).map(|_| ())?,
        "ext4" | "ext3" | "ext2" => run("resize2fs", &[&device.to_string_lossy()]).map(|_| ())?,
        _ => {}
    }
    let after = fs_size(mp)?;
    let grown = (after > before).then_some((before, after));
    if let Some((b, a)) = grown {
        info!(
            before = b,
            after = a,
            "filesystem grown to fill the volume: {} → {}",
            crate::units::human_bytes(b),
            crate::units::human_bytes(a)
        );
    }
    Ok(VolumeOutcome {
        device,
        volume_id: located.volume_id,
        fstype,
        uuid,
        formatted,
        mounted_now,
        grown,
        marker_changed,
    })
}

/// Written (on the root disk) just before mkfs and removed once the new filesystem is mounted: if
/// a run is killed while formatting, the next run knows the half-made filesystem is its own work
/// on a device it had proven blank, and formats again instead of refusing the device forever.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FormatIntent {
    device: PathBuf,
    rdev: u64,
    started_at: String,
    /// The EBS volume id (NVMe serial) and the size: a path and device number alone are reused
    /// by another volume attached in the same slot, which must never count as "ours, half-made".
    #[serde(default)]
    volume_id: Option<String>,
    #[serde(default)]
    size: u64,
}

/// Which device a format intent is about.
struct DeviceId<'a> {
    path: &'a Path,
    rdev: u64,
    volume_id: Option<&'a str>,
    size: u64,
}

impl FormatIntent {
    /// Whether this intent was written for exactly `d` (and `d` has a size: an intent from an
    /// older version without one never matches).
    fn is_for(&self, d: &DeviceId<'_>) -> bool {
        self.rdev == d.rdev
            && self.device == d.path
            && self.volume_id.as_deref() == d.volume_id
            && self.size == d.size
            && self.size > 0
    }
}

impl FormatIntent {
    const FILE: &'static str = "format-intent.json";

    fn read(state_dir: &Path) -> Option<FormatIntent> {
        serde_json::from_slice(&std::fs::read(state_dir.join(Self::FILE)).ok()?).ok()
    }

    fn write(state_dir: &Path, d: &DeviceId<'_>) -> Result<(), VolumeError> {
        std::fs::create_dir_all(state_dir).map_err(io("create", state_dir))?;
        let intent = FormatIntent {
            device: d.path.to_path_buf(),
            rdev: d.rdev,
            started_at: crate::units::now_rfc3339(),
            volume_id: d.volume_id.map(str::to_string),
            size: d.size,
        };
        crate::fsutil::write_atomic(
            &state_dir.join(Self::FILE),
            &serde_json::to_vec(&intent).expect("json"),
            0o600,
            None,
        )
        .map_err(|e| VolumeError::Io { action: "write", path: e.path, source: e.source })
    }

    fn clear(state_dir: &Path) {
        let _ = std::fs::remove_file(state_dir.join(Self::FILE));
    }
}

/// Makes the filesystem. `again` (force) only for a device this code proved blank in an earlier,
/// interrupted run; otherwise no force flag: mkfs.xfs itself refuses a device with a signature.
fn format(d: &DeviceId<'_>, fs: Filesystem, state_dir: &Path, again: bool) -> Result<(String, String), VolumeError> {
    let device = d.path;
    FormatIntent::write(state_dir, d)?;
    let dev = device.to_string_lossy();
    match (fs, again) {
        (Filesystem::Xfs, false) => run("mkfs.xfs", &["-q", "-L", LABEL_XFS, &dev])?,
        (Filesystem::Xfs, true) => run("mkfs.xfs", &["-q", "-f", "-L", LABEL_XFS, &dev])?,
        // -F only to skip the whole-device question; the device was proven blank.
        (Filesystem::Ext4, _) => run("mkfs.ext4", &["-q", "-F", "-L", LABEL, &dev])?,
    };
    let b = blkid_probe(device)?;
    Ok((b.get("TYPE").cloned().unwrap_or_default(), b.get("UUID").cloned().unwrap_or_default()))
}

/// `/data/.caretaker-volume`: which volume this is and who mounted it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    pub schema: u32,
    /// The EBS volume id, when known.
    pub volume_id: Option<String>,
    pub filesystem_uuid: String,
    /// When caretaker first formatted (or first adopted) the volume, RFC 3339.
    pub first_formatted_at: String,
    /// Instances that mounted it, oldest first.
    pub instances: Vec<String>,
    /// The boot (`/proc/sys/kernel/random/boot_id`) that last formatted it: recovery at boot
    /// restores only onto a volume this very boot formatted, or one known never to have held a
    /// cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatted_boot: Option<String>,
    /// Whether a PostgreSQL cluster was ever on it (initialised or restored by caretaker, or found
    /// there). Unknown (`None`) on volumes marked before caretaker recorded it: taken as "maybe".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_cluster: Option<bool>,
}

/// This boot's id (the kernel's random boot id), or "" when it cannot be read.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The marker on the volume mounted at `mp`, if it is there and readable.
pub fn read_marker(mp: &Path) -> Option<Marker> {
    serde_json::from_slice(&std::fs::read(mp.join(MARKER)).ok()?).ok()
}

/// Records on the marker that a PostgreSQL cluster is on the volume (idempotent).
pub fn mark_held_cluster(mp: &Path) -> Result<(), VolumeError> {
    let path = mp.join(MARKER);
    let Some(mut marker) = read_marker(mp) else { return Ok(()) };
    if marker.held_cluster == Some(true) {
        return Ok(());
    }
    marker.held_cluster = Some(true);
    write_marker(&path, &marker)
}

fn write_marker(path: &Path, marker: &Marker) -> Result<(), VolumeError> {
    let mut text = serde_json::to_vec_pretty(marker).expect("marker serializes");
    text.push(b'\n');
    crate::fsutil::write_atomic(path, &text, 0o644, None).map_err(|e| VolumeError::Io {
        action: "write",
        path: e.path,
        source: e.source,
    })
}

/// Reads, checks and updates the marker; returns whether it was written.
fn update_marker(
    mp: &Path,
    volume_id: Option<&str>,
    uuid: &str,
    instance_id: &str,
    formatted: bool,
) -> Result<bool, VolumeError> {
    let path = mp.join(MARKER);
    let existing: Option<Marker> = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                warn!(marker = %path.display(), "unreadable marker ({e}); writing a new one");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(VolumeError::Io { action: "read", path, source: e }),
    };
    if let (Some(m), Some(this)) = (&existing, volume_id)
        && let Some(theirs) = &m.volume_id
        && theirs != this
    {
        return Err(VolumeError::MarkerMismatch { marker_volume: theirs.clone(), this_volume: this.to_string() });
    }
    let mut marker = existing.clone().unwrap_or_else(|| Marker {
        schema: 1,
        volume_id: volume_id.map(str::to_string),
        filesystem_uuid: uuid.to_string(),
        first_formatted_at: crate::units::now_rfc3339(),
        instances: vec![],
        formatted_boot: None,
        held_cluster: None,
    });
    if formatted {
        marker.filesystem_uuid = uuid.to_string();
        marker.formatted_boot = Some(boot_id());
        marker.held_cluster = Some(false);
    }
    if marker.volume_id.is_none() {
        marker.volume_id = volume_id.map(str::to_string);
    }
    if !instance_id.is_empty() && !marker.instances.iter().any(|i| i == instance_id) {
        marker.instances.push(instance_id.to_string());
    }
    if existing.as_ref() == Some(&marker) {
        return Ok(false);
    }
    write_marker(&path, &marker)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn blank_only_when_everyone_agrees() {
        assert_eq!(decide(&Verdict::Blank, &b(&[])), Decision::Format);
        assert!(matches!(
            decide(&Verdict::NotBlank(vec!["non-zero data at byte 5 (first MiB)".into()]), &b(&[])),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            decide(&Verdict::Blank, &b(&[("TYPE", "zfs_member"), ("USAGE", "filesystem")])),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn known_filesystems_are_mounted_not_formatted() {
        let v = Verdict::NotBlank(vec!["xfs signature at byte 0".into(), "non-zero data at byte 0 (first MiB)".into()]);
        assert_eq!(
            decide(&v, &b(&[("TYPE", "xfs"), ("UUID", "u-1"), ("USAGE", "filesystem")])),
            Decision::Mount { fstype: "xfs".into(), uuid: "u-1".into() }
        );
    }

    #[test]
    fn partition_tables_luks_and_raid_are_refused() {
        for blkid in [
            b(&[("PTTYPE", "gpt")]),
            b(&[("TYPE", "crypto_LUKS"), ("USAGE", "crypto")]),
            b(&[("TYPE", "linux_raid_member"), ("USAGE", "raid")]),
            b(&[("TYPE", "LVM2_member"), ("USAGE", "raid")]),
            b(&[("TYPE", "ext4"), ("PTTYPE", "dos")]),
        ] {
            match decide(&Verdict::NotBlank(vec!["x".into()]), &blkid) {
                Decision::Refuse(found) => assert!(!found.is_empty()),
                d => panic!("{blkid:?} → {d:?}"),
            }
        }
        // An ext4 with a LUKS header in it too is not "just ext4".
        let v = Verdict::NotBlank(vec!["ext2/3/4 signature at byte 1080".into(), "LUKS signature at byte 0".into()]);
        assert!(matches!(decide(&v, &b(&[("TYPE", "ext4")])), Decision::Refuse(_)));
    }

    #[test]
    fn marker_is_written_once_and_refuses_another_volume() {
        let dir = tempfile::tempdir().unwrap();
        assert!(update_marker(dir.path(), Some("vol-0aaaaaaaaaaaaaaaa"), "uuid-1", "i-1", true).unwrap());
        assert!(!update_marker(dir.path(), Some("vol-0aaaaaaaaaaaaaaaa"), "uuid-1", "i-1", false).unwrap());
        assert!(update_marker(dir.path(), Some("vol-0aaaaaaaaaaaaaaaa"), "uuid-1", "i-2", false).unwrap());
        let m: Marker = serde_json::from_slice(&std::fs::read(dir.path().join(MARKER)).unwrap()).unwrap();
        assert_eq!(m.instances, vec!["i-1", "i-2"]);
        let e = update_marker(dir.path(), Some("vol-0bbbbbbbbbbbbbbbb"), "uuid-1", "i-3", false).unwrap_err();
        assert!(matches!(e, VolumeError::MarkerMismatch { .. }), "{e}");
    }

    #[test]
    fn a_format_intent_is_for_the_same_volume_only() {
        let intent = |volume_id: Option<&str>, size| FormatIntent {
            device: "/dev/nvme1n1".into(),
            rdev: 42,
            started_at: String::new(),
            volume_id: volume_id.map(str::to_string),
            size,
        };
        let dev = |volume_id, size| DeviceId { path: Path::new("/dev/nvme1n1"), rdev: 42, volume_id, size };
        let ours = intent(Some("vol-0aaaaaaaaaaaaaaaa"), 10 << 30);
        assert!(ours.is_for(&dev(Some("vol-0aaaaaaaaaaaaaaaa"), 10 << 30)));
        // Another volume attached in the same slot (same path and device number): never "ours".
        assert!(!ours.is_for(&dev(Some("vol-0bbbbbbbbbbbbbbbb"), 10 << 30)));
        assert!(!ours.is_for(&dev(Some("vol-0aaaaaaaaaaaaaaaa"), 20 << 30)));
        // An intent written before the id and size were recorded never matches.
        let old: FormatIntent =
            serde_json::from_str(r#"{"device": "/dev/nvme1n1", "rdev": 42, "started_at": ""}"#).unwrap();
        assert!(!old.is_for(&dev(None, 0)));
    }
}
