//! Sealing what caretaker writes beside a backup (`manifest.json`, `verify.json`) with a MAC only
//! holders of the box's backup secret can make, so that whoever can write the bucket cannot forge
//! a backup, pass one off as verified, or steer retention.
//!
//! The seal is HMAC-SHA256 over the document's canonical JSON (compact, keys sorted, without the
//! `seal` member), stored in the document as `"seal": {"alg", "key", "mac"}`. The key is derived by
//! HKDF-SHA256 (salt `caretaker seal v1`) from, in order of preference: the env variable
//! `backup.seal-key-var` (for a box that holds only the public recipient), else each configured age
//! identity, else the passphrase. Every key this box has is tried when opening (so rotating in a
//! new identity leaves older backups readable); the first seals. `key` is a short fingerprint of
//! the key that sealed, so an operator can see which secret a document needs.
//!
//! The documents stay plain JSON: an operator restores with stock tools (`aws s3 cp`, `age -d`,
//! `zstd -d`, `pg_restore`) without caring about seals, and can check one with `jq -cS 'del(.seal)'`
//! and `openssl dgst -sha256 -mac HMAC` (README, "Security model").

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::Config;

/// Why this box has no key to seal with (names the variable and file; never a value).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SealError(String);

const SALT: &[u8] = b"caretaker seal v1";
const ALG: &str = "hmac-sha256";
/// A seal key variable holds at least this many characters.
pub const MIN_KEY_CHARS: usize = 32;

/// The keys this box can seal and open with (the first seals).
pub struct SealKeys {
    keys: Vec<[u8; 32]>,
}

impl std::fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Fingerprints only: never the keys.
        f.debug_list().entries(self.keys.iter().map(fingerprint)).finish()
    }
}

/// HKDF-SHA256 of `secret` into a MAC key.
fn derive(secret: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(Some(SALT), secret)
        .expand(b"manifest mac", &mut key)
        .expect("32 bytes is a valid length");
    key
}

fn fingerprint(key: &[u8; 32]) -> String {
    hex::encode(&Sha256::digest(key)[..6])
}

fn mac(key: &[u8; 32], canonical: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(canonical);
    m
}

/// The bytes the MAC covers: the document without `seal`, compact, keys sorted (serde_json's map
/// is ordered by key).
fn canonical(doc: &serde_json::Value) -> Vec<u8> {
    let mut doc = doc.clone();
    if let Some(o) = doc.as_object_mut() {
        o.remove("seal");
    }
    serde_json::to_vec(&doc).expect("a JSON value serializes")
}

impl SealKeys {
    /// Keys from secrets (tests, and the configuration reader below).
    pub fn from_secrets<'a>(secrets: impl IntoIterator<Item = &'a [u8]>) -> SealKeys {
        SealKeys { keys: secrets.into_iter().map(derive).collect() }
    }

    /// This box's keys, read from `backup.passphrase-file`'s env file: the seal key variable,
    /// the age identities (with recipients) or the passphrase (without). None at all is an error
    /// that names what to set; a value is never echoed.
    pub fn for_config(cfg: &Config) -> Result<SealKeys, SealError> {
        let b = &cfg.backup;
        let file = cfg.secrets.env_dir.join(format!("{}.env", b.passphrase_file));
        let read = |var: &str| crate::envfile::read_env_var(&file, var).ok().flatten();
        let mut secrets: Vec<Vec<u8>> = Vec::new();
        if let Some(k) = read(&b.seal_key_var) {
            if k.expose().trim().chars().count() < MIN_KEY_CHARS {
                return Err(SealError(format!(
                    "{} in {} is shorter than {MIN_KEY_CHARS} characters: it cannot seal backups (make one with \
                     `openssl rand -hex 32`)",
                    b.seal_key_var,
                    file.display()
                )));
            }
            secrets.push(k.expose().trim().as_bytes().to_vec());
        }
        if b.recipients.is_empty() {
            secrets.extend(read(&b.passphrase_var).map(|p| p.expose().as_bytes().to_vec()));
        } else if let Some(ids) = read(&b.identity_var) {
            secrets
                .extend(ids.expose().split([',', ' ', '\n']).filter(|s| !s.is_empty()).map(|s| s.as_bytes().to_vec()));
        }
        if secrets.is_empty() {
            let var = if b.recipients.is_empty() { &b.passphrase_var } else { &b.identity_var };
            return Err(SealError(format!(
                "no key to seal and check backups with: put {} (or {var}) in {}",
                b.seal_key_var,
                file.display()
            )));
        }
        Ok(SealKeys::from_secrets(secrets.iter().map(Vec::as_slice)))
    }

    /// `doc` with its seal, as pretty JSON and a final newline.
    pub fn seal(&self, doc: &impl serde::Serialize) -> Vec<u8> {
        let mut value = serde_json::to_value(doc).expect("a document serializes");
        let key = &self.keys[0];
        let tag = hex::encode(mac(key, &canonical(&value)).finalize().into_bytes());
        if let Some(o) = value.as_object_mut() {
            o.insert("seal".into(), serde_json::json!({ "alg": ALG, "key": fingerprint(key), "mac": tag }));
        }
        let mut out = serde_json::to_vec_pretty(&value).expect("a JSON value serializes");
        out.push(b'\n');
        out
    }

    /// The seal (hex MAC by the first key) of `doc`, for documents that travel outside JSON
    /// files (a WAL object's metadata).
    pub fn mac_hex(&self, doc: &serde_json::Value) -> String {
        hex::encode(mac(&self.keys[0], &canonical(doc)).finalize().into_bytes())
    }

    /// Whether one of this box's keys made `tag` (hex) for `doc`.
    pub fn verifies(&self, doc: &serde_json::Value, tag: &str) -> bool {
        let Ok(tag) = hex::decode(tag) else { return false };
        let body = canonical(doc);
        self.keys.iter().any(|k| mac(k, &body).verify_slice(&tag).is_ok())
    }

    /// The document in `bytes` when one of this box's keys sealed it; why not otherwise.
    pub fn open(&self, bytes: &[u8]) -> Result<serde_json::Value, String> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let seal = &value["seal"];
        if seal.is_null() {
            return Err("it carries no seal".into());
        }
        if seal["alg"] != ALG {
            return Err(format!("its seal is not {ALG}"));
        }
        let tag = seal["mac"].as_str().and_then(|t| hex::decode(t).ok()).ok_or("its seal's mac is not hex")?;
        let body = canonical(&value);
        if self.keys.iter().any(|k| mac(k, &body).verify_slice(&tag).is_ok()) {
            Ok(value)
        } else {
            Err(format!(
                "its seal does not verify with this box's keys (sealed by key {}, this box has {:?})",
                seal["key"].as_str().unwrap_or("?").escape_debug(),
                self
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_document_opens_and_any_change_breaks_the_seal() {
        let keys = SealKeys::from_secrets([b"passphrase one".as_slice()]);
        let sealed = keys.seal(&serde_json::json!({ "id": "x", "n": 1, "nested": { "b": 2, "a": [1, 2] } }));
        let doc = keys.open(&sealed).unwrap();
        assert_eq!(doc["nested"]["a"][1], 2);
        // Reformatting does not matter; any change of content does.
        let compact = serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(&sealed).unwrap()).unwrap();
        assert!(keys.open(&compact).is_ok());
        let changed = String::from_utf8(sealed.clone()).unwrap().replace("\"n\": 1", "\"n\": 2");
        assert!(keys.open(changed.as_bytes()).unwrap_err().contains("does not verify"));
        let mut added: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
        added["extra"] = serde_json::json!(true);
        assert!(keys.open(&serde_json::to_vec(&added).unwrap()).is_err());
        // Another key, or no seal at all, does not open it.
        let other = SealKeys::from_secrets([b"passphrase two".as_slice()]);
        assert!(other.open(&sealed).unwrap_err().contains("does not verify"));
        assert!(keys.open(br#"{"id": "x"}"#).unwrap_err().contains("no seal"));
        // A box with the new key first and the old one second opens both.
        let rotated = SealKeys::from_secrets([b"passphrase two".as_slice(), b"passphrase one".as_slice()]);
        assert!(rotated.open(&sealed).is_ok());
        assert!(!format!("{rotated:?}").contains("passphrase"));
    }

    fn config_with(env: &str, recipients: bool) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("caretaker.env"), env).unwrap();
        let mut cfg = Config::default();
        cfg.secrets.env_dir = dir.path().to_path_buf();
        if recipients {
            cfg.backup.recipients = vec!["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p".into()];
        }
        (dir, cfg)
    }

    #[test]
    fn the_keys_come_from_the_env_file_and_a_bad_one_is_named_never_echoed() {
        // No key at all: the error names what to set and where.
        let (_d, cfg) = config_with("OTHER=1\n", true);
        let e = SealKeys::for_config(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("BACKUP_SEAL_KEY") && e.contains("BACKUP_AGE_IDENTITY") && e.contains("caretaker.env"),
            "{e}"
        );
        // A seal key too short to be one: refused, its value not in the message.
        let (_d, cfg) = config_with("BACKUP_SEAL_KEY=hunter2-short\n", true);
        let e = SealKeys::for_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("shorter than 32") && !e.contains("hunter2"), "{e}");
        // The passphrase seals when there are no recipients; the seal key wins over it, and a box
        // with both opens what either sealed.
        let (_d, cfg) = config_with("BACKUP_PASSPHRASE=\"correct horse\"\n", false);
        let by_pass = SealKeys::for_config(&cfg).unwrap().seal(&serde_json::json!({ "a": 1 }));
        let key = "k".repeat(32);
        let (_d, cfg) = config_with(&format!("BACKUP_PASSPHRASE=\"correct horse\"\nBACKUP_SEAL_KEY={key}\n"), false);
        let both = SealKeys::for_config(&cfg).unwrap();
        assert!(both.open(&by_pass).is_ok());
        let by_key = both.seal(&serde_json::json!({ "a": 1 }));
        assert!(SealKeys::from_secrets([key.as_bytes()]).open(&by_key).is_ok(), "the seal key seals first");
        // Recipients: every identity in the variable is a key.
        let (_d, cfg) = config_with("BACKUP_AGE_IDENTITY=\"AGE-SECRET-KEY-NEW,AGE-SECRET-KEY-OLD\"\n", true);
        let ids = SealKeys::for_config(&cfg).unwrap();
        let old = SealKeys::from_secrets([b"AGE-SECRET-KEY-OLD".as_slice()]).seal(&serde_json::json!({ "a": 1 }));
        assert!(ids.open(&old).is_ok());
    }
}
