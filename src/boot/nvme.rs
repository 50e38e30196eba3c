//! Which NVMe device is our EBS data volume? On Nitro instances every EBS volume is an NVMe
//! controller: vendor id 0x1D0F, model "Amazon Elastic Block Store", serial = the volume id without
//! its dash, and the first 32 bytes of the vendor-specific area of the Identify Controller data
//! hold the block-device name requested at attach time (`sdf`, `/dev/sdf`). Instance-store disks
//! share the vendor id but say "Amazon EC2 NVMe Instance Storage". Identity is read from the
//! device (Identify Controller, admin command 0x06) — not from udev symlinks, which may be absent
//! (early boot, containers). Parsers are pure and tested on synthetic 4096-byte buffers.

use std::path::{Path, PathBuf};

pub const AMAZON_VENDOR_ID: u16 = 0x1D0F;
pub const EBS_MODEL: &str = "Amazon Elastic Block Store";
pub const INSTANCE_STORE_MODEL: &str = "Amazon EC2 NVMe Instance Storage";
pub const ID_CTRL_LEN: usize = 4096;
const VS_OFFSET: usize = 3072;

/// What a controller says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerIdentity {
    pub vendor_id: u16,
    pub serial: String,
    pub model: String,
    /// The attach-time device name from the vendor area, normalised to `sdf` form (EBS only).
    pub ebs_device_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// An EBS volume with its id.
    Ebs {
        volume_id: String,
    },
    InstanceStore,
    Other,
}

impl ControllerIdentity {
    pub fn kind(&self) -> Kind {
        if self.vendor_id != AMAZON_VENDOR_ID {
            return Kind::Other;
        }
        if self.model == INSTANCE_STORE_MODEL {
            return Kind::InstanceStore;
        }
        if self.model == EBS_MODEL
            && let Some(volume_id) = volume_id_from_serial(&self.serial)
        {
            return Kind::Ebs { volume_id };
        }
        Kind::Other
    }
}

fn ascii_field(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_matches(|c: char| c == ' ' || c == '\0').to_string()
}

/// `vol0123456789abcdef0` → `vol-0123456789abcdef0` (EBS serials drop the dash).
pub fn volume_id_from_serial(serial: &str) -> Option<String> {
    let s = serial.trim();
    let hex = s.strip_prefix("vol-").or_else(|| s.strip_prefix("vol"))?;
    ((hex.len() == 17 || hex.len() == 8) && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("vol-{}", hex.to_ascii_lowercase()))
}

/// `/dev/sdf`, `sdf`, `xvdf` → `sdf`/`xvdf`.
pub fn normalise_device_name(name: &str) -> String {
    name.trim().trim_start_matches("/dev/").to_string()
}

/// Parses Identify Controller data (NVMe base spec: VID at 0, SN at 4..24, MN at 24..64; the
/// vendor-specific area from byte 3072).
pub fn parse_id_ctrl(buf: &[u8]) -> Result<ControllerIdentity, String> {
    if buf.len() < ID_CTRL_LEN {
        return Err(format!("Identify Controller data is {} bytes, expected {ID_CTRL_LEN}", buf.len()));
    }
    let vendor_id = u16::from_le_bytes([buf[0], buf[1]]);
    let serial = ascii_field(&buf[4..24]);
    let model = ascii_field(&buf[24..64]);
    let ebs_device_name = if vendor_id == AMAZON_VENDOR_ID && model == EBS_MODEL {
        let raw = ascii_field(&buf[VS_OFFSET..VS_OFFSET + 32]);
        let name = normalise_device_name(&raw);
        (!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(name)
    } else {
        None
    };
    Ok(ControllerIdentity { vendor_id, serial, model, ebs_device_name })
}

/// An NVMe namespace block device and its controller, as found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeDisk {
    /// `/dev/nvme1n1`
    pub device: PathBuf,
    /// `nvme1`
    pub controller: String,
    pub serial: String,
    pub model: String,
}

/// Lists NVMe namespaces under a sysfs root (`/sys` normally; a fixture tree in tests):
/// `class/nvme/nvmeX/{serial,model}` and `class/nvme/nvmeX/nvmeXnY` (or `block/nvmeXnY`).
pub fn list_nvme_disks(sysfs: &Path) -> std::io::Result<Vec<NvmeDisk>> {
    let mut out = Vec::new();
    let class = sysfs.join("class/nvme");
    let entries = match std::fs::read_dir(&class) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let ctrl = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).map(|s| s.trim().to_string()).unwrap_or_default();
        let (serial, model) = (read("serial"), read("model"));
        let mut namespaces: Vec<String> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| is_namespace_name(n) && n.starts_with(&format!("{ctrl}n")))
            .collect();
        namespaces.sort();
        namespaces.dedup();
        for ns in namespaces {
            out.push(NvmeDisk {
                device: PathBuf::from("/dev").join(&ns),
                controller: ctrl.clone(),
                serial: serial.clone(),
                model: model.clone(),
            });
        }
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(out)
}

/// `nvme1n1` (not `nvme1n1p1`, not `nvme1c1n1` paths).
fn is_namespace_name(n: &str) -> bool {
    let Some(rest) = n.strip_prefix("nvme") else { return false };
    let Some((c, ns)) = rest.split_once('n') else { return false };
    !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) && !ns.is_empty() && ns.bytes().all(|b| b.is_ascii_digit())
}

/// Reads Identify Controller data from an NVMe block device or controller node with the admin
/// passthrough ioctl (needs CAP_SYS_ADMIN).
#[cfg(target_os = "linux")]
pub fn identify_controller(device: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;

    #[repr(C)]
    #[derive(Default)]
    struct NvmeAdminCmd {
        opcode: u8,
        flags: u8,
        rsvd1: u16,
        nsid: u32,
        cdw2: u32,
        cdw3: u32,
        metadata: u64,
        addr: u64,
        metadata_len: u32,
        data_len: u32,
        cdw10: u32,
        cdw11: u32,
        cdw12: u32,
        cdw13: u32,
        cdw14: u32,
        cdw15: u32,
        timeout_ms: u32,
        result: u32,
    }
    nix::ioctl_readwrite!(nvme_admin_cmd, b'N', 0x41, NvmeAdminCmd);

    let file = std::fs::File::open(device)?;
    let mut buf = vec![0u8; ID_CTRL_LEN];
    let mut cmd = NvmeAdminCmd {
        opcode: 0x06,
        addr: buf.as_mut_ptr() as u64,
        data_len: ID_CTRL_LEN as u32,
        cdw10: 1, // CNS 1: Identify Controller
        ..Default::default()
    };
    // SAFETY: `cmd` is a properly laid out nvme_admin_cmd whose data pointer refers to `buf`,
    // which lives (and is not moved) until the ioctl returns, and is `data_len` bytes long.
    unsafe { nvme_admin_cmd(file.as_raw_fd(), &mut cmd) }.map_err(std::io::Error::from)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic Identify Controller buffer.
    pub fn id_ctrl(vid: u16, serial: &str, model: &str, vs_name: &str) -> Vec<u8> {
        let mut b = vec![0u8; ID_CTRL_LEN];
        b[0..2].copy_from_slice(&vid.to_le_bytes());
        let mut field = |off: usize, len: usize, s: &str| {
            let mut v = s.as_bytes().to_vec();
            v.resize(len, b' ');
            b[off..off + len].copy_from_slice(&v);
        };
        field(4, 20, serial);
        field(24, 40, model);
        let mut vs = vs_name.as_bytes().to_vec();
        vs.resize(32, b' ');
        b[VS_OFFSET..VS_OFFSET + 32].copy_from_slice(&vs);
        b
    }

    #[test]
    fn ebs_volume_is_recognised_with_its_attach_name() {
        let buf = id_ctrl(0x1D0F, "vol0123456789abcdef0", EBS_MODEL, "sdf");
        let id = parse_id_ctrl(&buf).unwrap();
        assert_eq!(id.kind(), Kind::Ebs { volume_id: "vol-0123456789abcdef0".into() });
        assert_eq!(id.ebs_device_name.as_deref(), Some("sdf"));
        let buf = id_ctrl(0x1D0F, "vol0123456789abcdef0", EBS_MODEL, "/dev/xvdg");
        assert_eq!(parse_id_ctrl(&buf).unwrap().ebs_device_name.as_deref(), Some("xvdg"));
    }

    #[test]
    fn instance_store_and_others_are_not_ebs() {
        let buf = id_ctrl(0x1D0F, "AWS1234567890ABCDEF", INSTANCE_STORE_MODEL, "ephemeral0");
        let id = parse_id_ctrl(&buf).unwrap();
        assert_eq!(id.kind(), Kind::InstanceStore);
        assert_eq!(id.ebs_device_name, None);
        let buf = id_ctrl(0x1B36, "vol0123456789abcdef0", "QEMU NVMe Ctrl", "sdf");
        assert_eq!(parse_id_ctrl(&buf).unwrap().kind(), Kind::Other);
    }

    #[test]
    fn short_buffers_are_refused() {
        assert!(parse_id_ctrl(&[0u8; 100]).is_err());
    }

    #[test]
    fn serials_map_to_volume_ids() {
        assert_eq!(volume_id_from_serial("vol0abc1234").as_deref(), Some("vol-0abc1234"));
        assert_eq!(volume_id_from_serial("vol-0123456789abcdef0").as_deref(), Some("vol-0123456789abcdef0"));
        assert_eq!(volume_id_from_serial("AWS123"), None);
        assert_eq!(volume_id_from_serial("volXYZ"), None);
    }

    #[test]
    fn sysfs_fixture_tree_lists_namespaces() {
        let root = tempfile::tempdir().unwrap();
        let mk = |ctrl: &str, serial: &str, model: &str, nss: &[&str]| {
            let d = root.path().join("class/nvme").join(ctrl);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("serial"), format!("{serial}\n")).unwrap();
            std::fs::write(d.join("model"), format!("{model}                 \n")).unwrap();
            for ns in nss {
                std::fs::create_dir_all(d.join(ns)).unwrap();
            }
            std::fs::create_dir_all(d.join("power")).unwrap();
        };
        mk("nvme0", "vol0aaaaaaaaaaaaaaaa", EBS_MODEL, &["nvme0n1"]);
        mk("nvme1", "vol0123456789abcdef0", EBS_MODEL, &["nvme1n1"]);
        mk("nvme2", "AWS99", INSTANCE_STORE_MODEL, &["nvme2n1"]);
        let disks = list_nvme_disks(root.path()).unwrap();
        assert_eq!(disks.len(), 3, "{disks:?}");
        assert_eq!(disks[1].device, Path::new("/dev/nvme1n1"));
        assert_eq!(disks[1].serial, "vol0123456789abcdef0");
        assert_eq!(disks[2].model, INSTANCE_STORE_MODEL);
        assert!(list_nvme_disks(&root.path().join("nope")).unwrap().is_empty());
    }
}
