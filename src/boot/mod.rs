//! `caretaker firstboot`: the data volume and the secrets, on every boot.

/// The services' folders on the volume, and initdb.
pub mod datadirs;
/// The whole boot sequence.
pub mod firstboot;
/// NVMe identity of EBS volumes.
pub mod nvme;
/// Is a device blank? Signatures, blkid, zeros.
pub mod probe;
/// Recovery at boot: whether a blank volume gets the newest backup.
pub mod recovery;
/// SSM parameters into per-service env files under /run.
pub mod secrets;
/// Find, check, format-if-blank, mount and grow the data volume.
pub mod volume;
