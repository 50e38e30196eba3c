//! What makes a download trustworthy: its line in SHA256SUMS, and (when a key is configured) an
//! Ed25519 signature over the SHA256SUMS bytes. Pure functions, no I/O.

use ed25519_dalek::{Signature, VerifyingKey};

pub use crate::config::parse_public_key;

/// Parses a `SHA256SUMS.sig`: the raw 64-byte signature (what `openssl pkeyutl -sign -rawin`
/// writes), or those bytes as 128 hex digits (surrounding whitespace ignored).
pub fn parse_signature(data: &[u8]) -> Result<Signature, String> {
    if let Ok(raw) = <[u8; 64]>::try_from(data) {
        return Ok(Signature::from_bytes(&raw));
    }
    let text = std::str::from_utf8(data).map_err(|_| format!("{} bytes: neither 64 raw bytes nor hex", data.len()))?;
    let bytes = hex::decode(text.trim()).map_err(|_| format!("{} bytes: neither 64 raw bytes nor hex", data.len()))?;
    let raw: [u8; 64] =
        bytes.as_slice().try_into().map_err(|_| format!("{} bytes of hex, a signature has 64", bytes.len()))?;
    Ok(Signature::from_bytes(&raw))
}

/// Checks `signature` (a `SHA256SUMS.sig` file) over `sums` with `key` (strict verification: no
/// malleable or small-order signatures).
pub fn verify_signature(key: &VerifyingKey, sums: &[u8], signature: &[u8]) -> Result<(), String> {
    let sig = parse_signature(signature)?;
    key.verify_strict(sums, &sig).map_err(|_| "signature mismatch".to_string())
}

/// The lowercase hex SHA-256 that SHA256SUMS gives for `name` (lines `HASH  NAME`, or `HASH *NAME`
/// in binary mode; blank lines and `#` comments skipped). `Err` says what is wrong.
pub fn expected_sha256(sums: &[u8], name: &str) -> Result<String, String> {
    let text = std::str::from_utf8(sums).map_err(|_| "SHA256SUMS is not text".to_string())?;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((hash, rest)) = line.split_once(char::is_whitespace) else {
            return Err(format!("SHA256SUMS line {} is not `HASH  NAME`", n + 1));
        };
        let file = rest.trim_start_matches([' ', '\t']);
        let file = file.strip_prefix('*').unwrap_or(file);
        let file = file.strip_prefix("./").unwrap_or(file);
        if file != name {
            continue;
        }
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("SHA256SUMS line {} has no SHA-256 for {name}", n + 1));
        }
        return Ok(hash.to_ascii_lowercase());
    }
    Err(format!("SHA256SUMS has no line for {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    const H: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn sums_lines() {
        let sums = format!("# made by ci\n{}  other\n{H}  zmanim-api\n", "0".repeat(64));
        assert_eq!(expected_sha256(sums.as_bytes(), "zmanim-api").unwrap(), H);
        let upper = format!("{} *./zmanim-api\r\n", H.to_uppercase());
        assert_eq!(expected_sha256(upper.as_bytes(), "zmanim-api").unwrap(), H);
        assert!(expected_sha256(sums.as_bytes(), "zmanim").unwrap_err().contains("no line for zmanim"));
        assert!(expected_sha256(b"abc  zmanim-api\n", "zmanim-api").unwrap_err().contains("no SHA-256"));
        assert!(expected_sha256(b"garbage\n", "zmanim-api").is_err());
    }

    #[test]
    fn signatures_raw_and_hex() {
        let signing = SigningKey::from_bytes(&[7u8; 32]);
        let key_hex = hex::encode(signing.verifying_key().as_bytes());
        let key = parse_public_key(&key_hex).unwrap();
        let sums = format!("{H}  zmanim-api\n");
        let sig = signing.sign(sums.as_bytes()).to_bytes();
        verify_signature(&key, sums.as_bytes(), &sig).unwrap();
        verify_signature(&key, sums.as_bytes(), format!("{}\n", hex::encode(sig)).as_bytes()).unwrap();
        assert!(verify_signature(&key, b"other", &sig).is_err());
        assert!(verify_signature(&key, sums.as_bytes(), b"short").is_err());
        let other = SigningKey::from_bytes(&[8u8; 32]).sign(sums.as_bytes()).to_bytes();
        assert!(verify_signature(&key, sums.as_bytes(), &other).is_err());
        assert!(parse_public_key("abcd").is_err());
        assert!(parse_public_key(&"zz".repeat(32)).is_err());
    }
}
