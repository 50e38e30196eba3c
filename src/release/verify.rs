//! What makes a download trustworthy: its line in SHA256SUMS, and (when a key is configured) an
//! Ed25519 signature over [`signed_message`]: the app, the version and the SHA256SUMS bytes — so
//! whoever can write the bucket can neither pass one release off as another version nor move it
//! to another app. Pure functions, no I/O.

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

/// What a release's signature covers:
/// `caretaker release v1\napp APP\nversion VERSION\n` followed by the SHA256SUMS bytes. Made by
/// `{ printf 'caretaker release v1\napp %s\nversion %s\n' APP VERSION; cat SHA256SUMS; } > msg &&
/// openssl pkeyutl -sign -rawin -inkey key.pem -in msg -out SHA256SUMS.sig`.
pub fn signed_message(app: &str, version: &str, sums: &[u8]) -> Vec<u8> {
    let mut m = format!("caretaker release v1\napp {app}\nversion {version}\n").into_bytes();
    m.extend_from_slice(sums);
    m
}

/// Checks `signature` (a `SHA256SUMS.sig` file) over [`signed_message`] with `key` (strict
/// verification: no malleable or small-order signatures).
pub fn verify_signature(
    key: &VerifyingKey,
    app: &str,
    version: &str,
    sums: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    let sig = parse_signature(signature)?;
    key.verify_strict(&signed_message(app, version, sums), &sig).map_err(|_| {
        format!("signature mismatch (it must be over the app `{app}`, the version `{version}` and SHA256SUMS)")
    })
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
        let sig = signing.sign(&signed_message("zmanim", "v2", sums.as_bytes())).to_bytes();
        let check = |app: &str, version: &str, sums: &[u8], sig: &[u8]| verify_signature(&key, app, version, sums, sig);
        check("zmanim", "v2", sums.as_bytes(), &sig).unwrap();
        check("zmanim", "v2", sums.as_bytes(), format!("{}\n", hex::encode(sig)).as_bytes()).unwrap();
        assert!(check("zmanim", "v2", b"other", &sig).is_err());
        assert!(check("zmanim", "v2", sums.as_bytes(), b"short").is_err());
        // The same bytes under another version or app, or signed bare, do not verify.
        assert!(check("zmanim", "v3", sums.as_bytes(), &sig).unwrap_err().contains("the version `v3`"));
        assert!(check("other", "v2", sums.as_bytes(), &sig).is_err());
        let bare = signing.sign(sums.as_bytes()).to_bytes();
        assert!(check("zmanim", "v2", sums.as_bytes(), &bare).is_err());
        let other =
            SigningKey::from_bytes(&[8u8; 32]).sign(&signed_message("zmanim", "v2", sums.as_bytes())).to_bytes();
        assert!(check("zmanim", "v2", sums.as_bytes(), &other).is_err());
        assert!(parse_public_key("abcd").is_err());
        assert!(parse_public_key(&"zz".repeat(32)).is_err());
    }
}
