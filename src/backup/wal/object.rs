//! One archived WAL file as one S3 object: `zstd → age` of the whole file, put only if the key is
//! new, with its description in the object's metadata — sizes, SHA-256 of the plaintext, of the
//! stored bytes and of the age header, the cluster's system identifier, when it was archived — and
//! a seal (HMAC, `backup::seal`) over that description and the file's name. An object whose seal
//! does not verify, or that does not match its description, is never replayed.

use std::collections::HashMap;
use std::io::{Read, Write};

use sha2::{Digest, Sha256};

use crate::backup::fetch::{Decryption, FetchError, open_age};
use crate::backup::seal::SealKeys;
use crate::backup::stream::{Encryption, age_prefix_len};

/// The metadata keys (S3 lower-cases them).
const FIELDS: [&str; 7] = [
    "plain-bytes",
    "plain-sha256",
    "stored-bytes",
    "stored-sha256",
    "header-sha256",
    "system-identifier",
    "archived-at",
];
const SEAL: &str = "seal";

/// What the metadata of an archived file says, once its seal verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Description {
    pub name: String,
    pub plain_bytes: u64,
    pub plain_sha256: String,
    pub stored_bytes: u64,
    pub stored_sha256: String,
    pub header_sha256: String,
    /// The cluster it came from (0 for history and backup label files).
    pub system_identifier: u64,
    /// RFC 3339, when it was archived.
    pub archived_at: String,
}

impl Description {
    fn doc(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "plain-bytes": self.plain_bytes.to_string(),
            "plain-sha256": self.plain_sha256,
            "stored-bytes": self.stored_bytes.to_string(),
            "stored-sha256": self.stored_sha256,
            "header-sha256": self.header_sha256,
            "system-identifier": self.system_identifier.to_string(),
            "archived-at": self.archived_at,
        })
    }

    /// The object metadata, sealed.
    pub fn metadata(&self, keys: &SealKeys) -> Vec<(&'static str, String)> {
        let doc = self.doc();
        let mut m: Vec<(&'static str, String)> =
            FIELDS.iter().map(|f| (*f, doc[*f].as_str().unwrap_or_default().to_string())).collect();
        m.push((SEAL, keys.mac_hex(&doc)));
        m
    }

    /// The description in `metadata` of the object holding `name`, when one of this box's keys
    /// sealed it for that name; why not otherwise.
    pub fn open(name: &str, metadata: &HashMap<String, String>, keys: &SealKeys) -> Result<Description, String> {
        let get = |f: &str| {
            metadata.get(f).cloned().ok_or_else(|| format!("its metadata has no {f}: not archived by caretaker"))
        };
        let num = |f: &str| get(f)?.parse::<u64>().map_err(|_| format!("its metadata's {f} is not a number"));
        let d = Description {
            name: name.to_string(),
            plain_bytes: num("plain-bytes")?,
            plain_sha256: get("plain-sha256")?,
            stored_bytes: num("stored-bytes")?,
            stored_sha256: get("stored-sha256")?,
            header_sha256: get("header-sha256")?,
            system_identifier: num("system-identifier")?,
            archived_at: get("archived-at")?,
        };
        if !keys.verifies(&d.doc(), &get(SEAL)?) {
            return Err(
                "its seal does not verify with this box's keys (not archived by this deployment, or altered)".into()
            );
        }
        Ok(d)
    }
}

/// `plain`, compressed and encrypted, and its description (unsealed).
pub fn encode(
    name: &str,
    plain: &[u8],
    encryption: &Encryption,
    zstd_level: i32,
    system_identifier: u64,
) -> Result<(Vec<u8>, Description), String> {
    let mut e = Encoder::new(name, encryption, zstd_level, system_identifier, plain.len() as u64 / 3)?;
    e.write(plain)?;
    e.finish()
}

/// [`encode`] a piece at a time: the plaintext passes through and is never held whole (a
/// segment is 16 MiB; what is kept is its compressed, encrypted form).
pub struct Encoder {
    name: String,
    system_identifier: u64,
    sha: Sha256,
    plain_bytes: u64,
    z: zstd::stream::write::Encoder<'static, age::stream::StreamWriter<Vec<u8>>>,
}

impl Encoder {
    pub fn new(
        name: &str,
        encryption: &Encryption,
        zstd_level: i32,
        system_identifier: u64,
        expected_stored: u64,
    ) -> Result<Encoder, String> {
        let stored = Vec::with_capacity(expected_stored.min(64 << 20) as usize + 4096);
        let age_out = encryption.encryptor()?.wrap_output(stored).map_err(|e| e.to_string())?;
        let z = zstd::stream::write::Encoder::new(age_out, zstd_level).map_err(|e| e.to_string())?;
        Ok(Encoder { name: name.to_string(), system_identifier, sha: Sha256::new(), plain_bytes: 0, z })
    }

    pub fn write(&mut self, plain: &[u8]) -> Result<(), String> {
        self.sha.update(plain);
        self.plain_bytes += plain.len() as u64;
        self.z.write_all(plain).map_err(|e| e.to_string())
    }

    /// The stored bytes and their description (unsealed).
    pub fn finish(self) -> Result<(Vec<u8>, Description), String> {
        let stored = self.z.finish().map_err(|e| e.to_string())?.finish().map_err(|e| e.to_string())?;
        let header_len = age_prefix_len(&stored).ok_or("the age header is not where it should be")?;
        let d = Description {
            name: self.name,
            plain_bytes: self.plain_bytes,
            plain_sha256: hex::encode(self.sha.finalize()),
            stored_bytes: stored.len() as u64,
            stored_sha256: hex::encode(Sha256::digest(&stored)),
            header_sha256: hex::encode(Sha256::digest(&stored[..header_len])),
            system_identifier: self.system_identifier,
            archived_at: crate::units::now_rfc3339(),
        };
        Ok((stored, d))
    }
}

/// The plaintext of `stored`, checked against its (opened) description; at most `max_plain`
/// bytes are ever produced.
pub fn decode(stored: &[u8], d: &Description, decryption: &Decryption, max_plain: u64) -> Result<Vec<u8>, FetchError> {
    if stored.len() as u64 != d.stored_bytes || hex::encode(Sha256::digest(stored)) != d.stored_sha256 {
        return Err(FetchError::Damaged(format!(
            "{}: the stored object ({} bytes) is not the one that was archived ({} bytes, sha256 {})",
            d.name,
            stored.len(),
            d.stored_bytes,
            d.stored_sha256
        )));
    }
    let header_len = age_prefix_len(stored).ok_or_else(|| FetchError::Damaged(format!("{}: no age header", d.name)))?;
    if hex::encode(Sha256::digest(&stored[..header_len])) != d.header_sha256 {
        return Err(FetchError::Damaged(format!("{}: its age header is not the one that was archived", d.name)));
    }
    let decrypted = open_age(stored, decryption)?;
    let z = zstd::stream::read::Decoder::new(decrypted).map_err(|e| FetchError::Damaged(e.to_string()))?;
    let mut plain = Vec::with_capacity(d.plain_bytes.min(max_plain) as usize);
    z.take(max_plain + 1).read_to_end(&mut plain).map_err(|e| FetchError::Damaged(format!("{}: {e}", d.name)))?;
    if plain.len() as u64 != d.plain_bytes || hex::encode(Sha256::digest(&plain)) != d.plain_sha256 {
        return Err(FetchError::Damaged(format!(
            "{}: the decrypted file ({} bytes) is not the one that was archived ({} bytes, sha256 {})",
            d.name,
            plain.len(),
            d.plain_bytes,
            d.plain_sha256
        )));
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SealKeys {
        SealKeys::from_secrets([b"a passphrase for tests".as_slice()])
    }

    #[test]
    fn an_object_encoded_in_pieces_is_the_same_file() {
        let pass = age::secrecy::SecretString::from("a passphrase for tests".to_string());
        let (enc, dec) = (Encryption::Passphrase(pass.clone()), Decryption::Passphrase(pass));
        let plain: Vec<u8> = (0..300_000u32).flat_map(|i| (i % 253).to_le_bytes()).collect();
        let (_, whole) = encode("000000010000000000000003", &plain, &enc, 3, 7).unwrap();
        let mut e = Encoder::new("000000010000000000000003", &enc, 3, 7, 0).unwrap();
        for piece in plain.chunks(77_777) {
            e.write(piece).unwrap();
        }
        let (stored, d) = e.finish().unwrap();
        assert_eq!((d.plain_bytes, &d.plain_sha256), (plain.len() as u64, &whole.plain_sha256));
        assert_eq!(decode(&stored, &d, &dec, 16 << 20).unwrap(), plain);
    }

    #[test]
    fn an_object_round_trips_and_its_description_is_bound_to_its_name_and_bytes() {
        let pass = age::secrecy::SecretString::from("a passphrase for tests".to_string());
        let enc = Encryption::Passphrase(pass.clone());
        let dec = Decryption::Passphrase(pass);
        let plain: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let (stored, d) = encode("000000010000000000000003", &plain, &enc, 3, 7).unwrap();
        assert!(stored.len() < plain.len() / 2, "compressed: {}", stored.len());
        let meta: HashMap<String, String> = d.metadata(&keys()).into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let opened = Description::open("000000010000000000000003", &meta, &keys()).unwrap();
        assert_eq!(opened, d);
        assert_eq!(decode(&stored, &opened, &dec, 16 << 20).unwrap(), plain);
        // Under another name, with another key, with an edited field: refused.
        assert!(Description::open("000000010000000000000004", &meta, &keys()).unwrap_err().contains("seal"));
        let other = SealKeys::from_secrets([b"someone else".as_slice()]);
        assert!(Description::open("000000010000000000000003", &meta, &other).is_err());
        let mut edited = meta.clone();
        edited.insert("plain-bytes".into(), "1".into());
        assert!(Description::open("000000010000000000000003", &edited, &keys()).is_err());
        assert!(Description::open("x", &HashMap::new(), &keys()).unwrap_err().contains("not archived by caretaker"));
        // Altered bytes, or more plaintext than allowed: refused, named.
        let mut bad = stored.clone();
        let n = bad.len() - 10;
        bad[n] ^= 1;
        assert!(
            decode(&bad, &opened, &dec, 16 << 20).unwrap_err().to_string().contains("not the one that was archived")
        );
        assert!(decode(&stored, &opened, &dec, 1000).is_err());
    }
}
