//! The plaintext's digest: what a restore compares the decrypted, decompressed stream with.
//!
//! It checks caretaker's own pipeline and zstd, not an attacker: authenticity comes from the
//! sealed manifest, which records the stored object's SHA-256 and its age header's hash, and from
//! age, which authenticates every 64 KiB of the payload under the file key that header wraps (see
//! `stream::age_prefix_len`). A forged plaintext digest needs a forged seal, and then any digest
//! would do. What is left for this digest to catch is an accident between the bytes the producer
//! wrote and the bytes a restore hands on — a chunk lost or repeated between threads, a compressor
//! or decompressor bug — and for that a 128-bit non-cryptographic hash is as good as SHA-256:
//! XXH3-128 runs at ~6 GB/s on one core where SHA-256 (with SHA-NI) runs at 1.4 GB/s, and on the
//! one-vCPU box every pass over a GiB is CPU the API loses. Manifests of schema 1 (before
//! XXH3) recorded SHA-256; they are still checked with SHA-256.

use sha2::{Digest as _, Sha256};
use xxhash_rust::xxh3::Xxh3;

/// Which digest a manifest records for the plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainDigest {
    /// Schema 1: `plain_sha256`.
    Sha256,
    /// Schema 2: `plain_xxh3_128`.
    Xxh3_128,
}

impl PlainDigest {
    /// The digest new backups record.
    pub const CURRENT: PlainDigest = PlainDigest::Xxh3_128;

    pub fn name(self) -> &'static str {
        match self {
            PlainDigest::Sha256 => "sha256",
            PlainDigest::Xxh3_128 => "xxh3-128",
        }
    }

    /// Hex digits in the digest.
    pub fn hex_len(self) -> usize {
        match self {
            PlainDigest::Sha256 => 64,
            PlainDigest::Xxh3_128 => 32,
        }
    }

    pub fn hasher(self) -> PlainHasher {
        match self {
            PlainDigest::Sha256 => PlainHasher::Sha256(Sha256::new()),
            PlainDigest::Xxh3_128 => PlainHasher::Xxh3(Box::new(Xxh3::new())),
        }
    }
}

/// A running [`PlainDigest`].
pub enum PlainHasher {
    Sha256(Sha256),
    Xxh3(Box<Xxh3>),
}

impl PlainHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            PlainHasher::Sha256(h) => h.update(bytes),
            PlainHasher::Xxh3(h) => h.update(bytes),
        }
    }

    /// The digest in lowercase hex.
    pub fn finish(self) -> String {
        match self {
            PlainHasher::Sha256(h) => hex::encode(h.finalize()),
            PlainHasher::Xxh3(h) => format!("{:032x}", h.digest128()),
        }
    }
}

/// Whether `s` is a digest of `kind`: lowercase hex of the right length.
pub fn well_formed(kind: PlainDigest, s: &str) -> bool {
    s.len() == kind.hex_len() && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// XXH3-128 of `bytes` in hex (what a schema-2 manifest's `plain_xxh3_128` holds).
pub fn xxh3_128_hex(bytes: &[u8]) -> String {
    let mut h = PlainDigest::Xxh3_128.hasher();
    h.update(bytes);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_one_shot_and_the_reference_values() {
        // XXH3-128 of "" is 99aa06d3014798d86001c324468d497f (xxHash's reference).
        assert_eq!(xxh3_128_hex(b""), "99aa06d3014798d86001c324468d497f");
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
        for kind in [PlainDigest::Sha256, PlainDigest::Xxh3_128] {
            let mut h = kind.hasher();
            for c in data.chunks(65_537) {
                h.update(c);
            }
            let streamed = h.finish();
            let one_shot = match kind {
                PlainDigest::Sha256 => hex::encode(Sha256::digest(&data)),
                PlainDigest::Xxh3_128 => format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&data)),
            };
            assert_eq!(streamed, one_shot, "{}", kind.name());
            assert!(well_formed(kind, &streamed));
        }
        assert!(!well_formed(PlainDigest::Xxh3_128, "99AA06D3014798D86001C324468D497F"));
        assert!(!well_formed(PlainDigest::Xxh3_128, ""));
    }
}
