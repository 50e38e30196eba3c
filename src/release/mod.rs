//! Releases of the API binary: fetched from the releases bucket, verified, switched in atomically,
//! health-gated, rolled back by themselves.
//!
//! In the bucket (`[release]`): `APP/VERSION/ARTIFACT`, `APP/VERSION/SHA256SUMS` (sha256sum lines
//! `HASH  NAME`), optionally `APP/VERSION/SHA256SUMS.sig` (Ed25519 over the app, the version and the
//! SHA256SUMS bytes: `verify::signed_message`; required when `release.public-key` is set) and `APP/LATEST` (the newest version string).
//!
//! On disk (`services.api.install-dir`, /opt/zmanim):
//! ```text
//! releases/VERSION/ARTIFACT                 the executable, mode 0755
//! releases/VERSION/.verified                {version, sha256, time}: written last, so a release
//!                                           without it is incomplete
//! releases/VERSION/.ARTIFACT.partial-PID    a download in progress
//! current -> releases/VERSION               what the API unit runs (replaced by rename)
//! .caretaker-update.json                    {from, to, phase}: written before a switch, so a
//!                                           daemon killed mid-update can put things back
//! ```
//!
//! [`update::update`] is the procedure; [`layout::reconcile`] repairs what a crash left.

/// The install folder: releases, markers, the `current` link, the state file, pruning, reconcile.
pub mod layout;
/// The releases bucket (the only S3 calls of this module).
mod store;
/// The update procedure: fetch, verify, switch, restart, health gate, roll back.
pub mod update;
/// SHA256SUMS and Ed25519 signatures (no I/O).
pub mod verify;

use std::cmp::Ordering;
use std::path::PathBuf;

pub use layout::{Reconciled, reconcile};
pub use update::{Outcome, Target, UpdateRequest, update};

/// Versions are at most this long.
pub const MAX_VERSION_LEN: usize = 64;

/// The pattern every version must match (and the SSM document's `Version` allowedPattern, which
/// adds the literal `latest`): `v?N(.N(.N)?)?` with an optional `-prerelease` and `+build`, each
/// dot-separated identifiers of letters, digits and `-`. So `v1.2.3`, `1.2.3-rc.1`, `v2`; never `/`,
/// `..`, spaces or anything a shell would act on. At most [`MAX_VERSION_LEN`] characters.
pub const VERSION_PATTERN: &str =
    r"^v?[0-9]{1,9}(\.[0-9]{1,9}){0,2}(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$";

/// Checks a version string against [`VERSION_PATTERN`] (hand-written, same language). Called
/// before any request or path is made from it.
pub fn validate_version(v: &str) -> Result<(), UpdateError> {
    let bad = || UpdateError::InvalidVersion(v.to_string());
    if v.is_empty() || v.len() > MAX_VERSION_LEN {
        return Err(bad());
    }
    let rest = v.strip_prefix('v').unwrap_or(v);
    let (core, build) = match rest.split_once('+') {
        Some((c, b)) => (c, Some(b)),
        None => (rest, None),
    };
    let (numbers, pre) = match core.split_once('-') {
        Some((n, p)) => (n, Some(p)),
        None => (core, None),
    };
    let parts: Vec<&str> = numbers.split('.').collect();
    let numbers_ok =
        parts.len() <= 3 && parts.iter().all(|p| (1..=9).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    let idents_ok =
        |s: &str| s.split('.').all(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if numbers_ok && pre.is_none_or(idents_ok) && build.is_none_or(idents_ok) { Ok(()) } else { Err(bad()) }
}

/// Orders versions the way people read them: numeric parts as numbers, a pre-release before its
/// release (`1.2.3-rc.1` < `1.2.3`), build metadata ignored except as a last tie-break; the `v` is
/// ignored. Meant for valid versions; anything else sorts by text.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (Vec<u64>, Option<&str>, &str) {
        let v = v.strip_prefix('v').unwrap_or(v);
        let (core, build) = v.split_once('+').unwrap_or((v, ""));
        let (nums, pre) = match core.split_once('-') {
            Some((n, p)) => (n, Some(p)),
            None => (core, None),
        };
        (nums.split('.').map(|n| n.parse().unwrap_or(0)).collect(), pre, build)
    }
    fn cmp_ident(a: &str, b: &str) -> Ordering {
        match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            (Ok(_), Err(_)) => Ordering::Less,
            (Err(_), Ok(_)) => Ordering::Greater,
            (Err(_), Err(_)) => a.cmp(b),
        }
    }
    let (na, pa, ba) = split(a);
    let (nb, pb, bb) = split(b);
    let width = na.len().max(nb.len());
    let pad = |n: &[u64]| (0..width).map(|i| n.get(i).copied().unwrap_or(0)).collect::<Vec<_>>();
    pad(&na)
        .cmp(&pad(&nb))
        .then_with(|| match (pa, pb) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) => {
                let (xs, ys): (Vec<&str>, Vec<&str>) = (x.split('.').collect(), y.split('.').collect());
                xs.iter().zip(&ys).map(|(p, q)| cmp_ident(p, q)).find(|o| o.is_ne()).unwrap_or(xs.len().cmp(&ys.len()))
            }
        })
        .then_with(|| ba.cmp(bb))
        .then_with(|| a.cmp(b))
}

/// Why an update (or a repair) did not happen. Every variant says what was refused and why; for
/// refusals before the switch nothing on disk or in the running API has changed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(
        "`{0}` is not a release version: expected e.g. v1.2.3, 1.2.3-rc.1 or v2 (digits, letters, `.`, `-`, `+`; at most 64 characters)"
    )]
    InvalidVersion(String),
    #[error("release.bucket is not set: there is nowhere to fetch releases from")]
    NoBucket,
    #[error(
        "refused: {to} is older than the running {from} (a re-published old release may carry a fixed hole); \
         to go back on purpose: caretaker update --version {to} --allow-downgrade"
    )]
    Downgrade { from: String, to: String },
    #[error("refused: the artifact of {version} has {bytes} bytes, more than release.max-artifact-bytes ({max})")]
    TooLarge { version: String, bytes: u64, max: u64 },
    #[error("release.public-key: {0}")]
    BadKey(String),
    #[error("no release {version} in s3://{bucket}/{app}/; available: {}", list_or_none(available))]
    NoSuchVersion { bucket: String, app: String, version: String, available: Vec<String> },
    #[error("s3://{bucket}/{app}/LATEST {problem}; available: {}", list_or_none(available))]
    NoLatest { bucket: String, app: String, problem: String, available: Vec<String> },
    #[error("release {version} is incomplete: {what}")]
    Incomplete { version: String, what: String },
    #[error("release {version} is not signed (no s3://{bucket}/{key}) and release.public-key is set: refused")]
    Unsigned { version: String, bucket: String, key: String },
    #[error(
        "release {version}: the signature over SHA256SUMS does not verify with release.public-key ({reason}): refused"
    )]
    BadSignature { version: String, reason: String },
    #[error(
        "release {version}: SHA-256 mismatch for {artifact}: SHA256SUMS says {expected}, the download is {actual}: refused"
    )]
    HashMismatch { version: String, artifact: String, expected: String, actual: String },
    #[error("release {version}: download of s3://{bucket}/{key} failed after {bytes} bytes: {reason}")]
    Download { version: String, bucket: String, key: String, bytes: u64, reason: String },
    #[error(transparent)]
    S3(#[from] crate::aws::s3::S3Error),
    #[error(transparent)]
    Fs(#[from] crate::fsutil::FsError),
    #[error("{} is not a symbolic link: move it away (caretaker only replaces a `current` link)", .0.display())]
    CurrentNotALink(PathBuf),
    #[error(
        "{version} failed its health gate ({reason}) and there is no earlier release to roll back to: current still points at {version}"
    )]
    GateFailedNoPrevious { version: String, reason: String },
    #[error(
        "{to} failed its health gate ({reason}); switched back to {from}, but {from} is not healthy either: {rollback_reason}"
    )]
    RollbackUnhealthy { from: String, to: String, reason: String, rollback_reason: String },
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() { "none".into() } else { v.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_accepted_and_refused() {
        for ok in ["v1", "v2", "1.2.3", "v1.2.3", "1.2.3-rc.1", "v10.0.0+build.7", "1.2-beta-2", "0.0.1-x.y.z+abc"] {
            assert!(validate_version(ok).is_ok(), "{ok}");
        }
        let long = format!("v1.2.3-{}", "a".repeat(60));
        for bad in [
            "",
            "v",
            "latest",
            "vv1",
            "V1",
            "1.2.3.4",
            "1..2",
            "../v1",
            "v1/..",
            "v1/x",
            "1.2.3; rm -rf /",
            "$(id)",
            "`id`",
            "v1\n",
            "v1 ",
            " v1",
            "1.2.3-",
            "1.2.3-rc..1",
            "1.2.3+",
            "-1",
            "--latest",
            "1.2.3-rc_1",
            "1234567890",
            &long,
        ] {
            assert!(validate_version(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn versions_order_as_people_read_them() {
        let mut v = vec!["v10", "v2", "1.2.3", "1.2.3-rc.2", "1.2.3-rc.10", "v1.2.4", "1.2.3-alpha", "v1"];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(v, ["v1", "1.2.3-alpha", "1.2.3-rc.2", "1.2.3-rc.10", "1.2.3", "v1.2.4", "v2", "v10"]);
    }
}
