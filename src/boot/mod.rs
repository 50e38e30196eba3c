//! `caretaker firstboot`: the data volume and the secrets, on every boot.

/// NVMe identity of EBS volumes.
pub mod nvme;
/// Is a device blank? Signatures, blkid, zeros.
pub mod probe;
