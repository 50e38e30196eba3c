//! SCRAM-SHA-256 password verifiers, computed here so that a password never reaches PostgreSQL:
//! `CREATE ROLE … PASSWORD 'SCRAM-SHA-256$…'` stores the verifier as it is, and a statement that
//! fails and lands in PostgreSQL's log carries the verifier, not the password (RFC 5802, 7677;
//! PostgreSQL's `scram_build_secret`).

use sha2::{Digest, Sha256};

const ITERATIONS: u32 = 4096;

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let inner = Sha256::new().chain_update(k.map(|b| b ^ 0x36)).chain_update(msg).finalize();
    Sha256::new().chain_update(k.map(|b| b ^ 0x5c)).chain_update(inner).finalize().into()
}

/// PBKDF2-HMAC-SHA256 with one 32-byte block (`Hi` of RFC 5802).
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()].concat());
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        out.iter_mut().zip(u).for_each(|(o, x)| *o ^= x);
    }
    out
}

/// (StoredKey, ServerKey) for `password` and `salt`.
fn keys(password: &[u8], salt: &[u8], iterations: u32) -> ([u8; 32], [u8; 32]) {
    let salted = salted_password(password, salt, iterations);
    let client_key = hmac(&salted, b"Client Key");
    (Sha256::digest(client_key).into(), hmac(&salted, b"Server Key"))
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The verifier PostgreSQL stores for `password`, with a fresh random salt; `None` for a password
/// that SASLprep could change (anything but printable ASCII): PostgreSQL would prepare it first.
pub fn verifier(password: &str) -> Option<String> {
    if !password.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return None;
    }
    let mut salt = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").ok()?, &mut salt).ok()?;
    let (stored, server) = keys(password.as_bytes(), &salt, ITERATIONS);
    Some(format!("SCRAM-SHA-256${ITERATIONS}:{}${}:{}", base64(&salt), base64(&stored), base64(&server)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unbase64(s: &str) -> Vec<u8> {
        let a = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in s.bytes().filter(|c| *c != b'=') {
            bits = bits << 6 | a.iter().position(|x| *x == c).unwrap() as u32;
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
            }
        }
        out
    }

    /// RFC 7677, section 3: user "user", password "pencil".
    #[test]
    fn the_rfc_7677_exchange_verifies_with_these_keys() {
        let salt = unbase64("W22ZaJ0SNY7soEsUEjb6gQ==");
        let salted = salted_password(b"pencil", &salt, 4096);
        let client_key = hmac(&salted, b"Client Key");
        let (stored, server) = keys(b"pencil", &salt, 4096);
        let auth = "n=user,r=rOprNGfwEbeRWgbNEkqO,\
                    r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,\
                    c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        assert_eq!(base64(&hmac(&server, auth.as_bytes())), "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
        let signature = hmac(&stored, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(signature).map(|(a, b)| a ^ b).collect();
        assert_eq!(base64(&proof), "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
    }

    #[test]
    fn a_verifier_has_postgres_shape_and_never_the_password() {
        let v = verifier("correct horse battery staple").unwrap();
        assert!(v.starts_with("SCRAM-SHA-256$4096:") && v.matches('$').count() == 2, "{v}");
        assert!(!v.contains("horse"));
        assert_ne!(v, verifier("correct horse battery staple").unwrap(), "a fresh salt each time");
        assert!(verifier("pässword").is_none());
        assert_eq!(base64(b"ab"), "YWI=");
    }
}
