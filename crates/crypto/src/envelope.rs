//! The key envelope: a random master key wrapped under a passphrase-derived key.

use std::fmt;
use std::num::NonZeroU32;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::pbkdf2;
use serde::{Deserialize, Serialize};

use crate::{Error, random_bytes};

/// PBKDF2-HMAC-SHA256 iterations for new key files (OWASP's 2023 figure; ~80 ms here).
pub const PBKDF2_ITERATIONS: u32 = 600_000;
/// The most iterations a key file may ask for: a tampered file must not make opening it
/// take hours.
pub const MAX_PBKDF2_ITERATIONS: u32 = 10_000_000;
/// The shortest passphrase a new key file is created with.
pub const MIN_PASSPHRASE_BYTES: usize = 16;
const FORMAT: &str = "klio-key-envelope/1";
const WRAP_AAD: &[u8] = b"klio master key v1";

/// The user's encryption key. Never printed.
#[derive(Clone)]
pub struct Passphrase(Vec<u8>);

impl Passphrase {
    pub fn new(bytes: Vec<u8>) -> Result<Passphrase, Error> {
        let trimmed_len = bytes
            .iter()
            .rev()
            .skip_while(|b| b.is_ascii_whitespace())
            .count();
        let mut bytes = bytes;
        bytes.truncate(trimmed_len);
        if bytes.is_empty() {
            return Err(Error::EmptyPassphrase);
        }
        Ok(Passphrase(bytes))
    }

    /// Refuses a passphrase too short to protect a new key file (existing key files keep
    /// opening with the passphrase they were made with).
    pub fn check_strength(&self) -> Result<(), Error> {
        if self.0.len() < MIN_PASSPHRASE_BYTES {
            return Err(Error::WeakPassphrase {
                len: self.0.len(),
                min: MIN_PASSPHRASE_BYTES,
            });
        }
        Ok(())
    }

    /// Reads a key file; trailing whitespace (a final newline) is not part of the key.
    pub fn from_file(path: &Path) -> Result<Passphrase, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            action: "read encryption key file",
            path: path.display().to_string(),
            source,
        })?;
        Passphrase::new(bytes)
    }
}

impl Drop for Passphrase {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// The 256-bit key every object key is derived from. Never printed.
#[derive(Clone)]
pub struct MasterKey(pub(crate) [u8; 32]);

impl Drop for MasterKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl MasterKey {
    /// A fresh random key (used when a repository is created, and in tests).
    pub fn generate() -> MasterKey {
        MasterKey(random_bytes())
    }

    /// A short public identifier of this key (BLAKE3-free: HKDF output), to tell keys apart
    /// in logs and metadata without revealing anything.
    pub fn key_id(&self) -> String {
        let prk = aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, b"klio key id")
            .extract(&self.0);
        let mut out = [0u8; 8];
        let okm = prk.expand(&[b"id"], KeyIdLen);
        // expand/fill can only fail for lengths above 255*32 bytes.
        okm.and_then(|okm| okm.fill(&mut out))
            .expect("hkdf expand of 8 bytes");
        hex::encode(out)
    }
}

struct KeyIdLen;
impl aws_lc_rs::hkdf::KeyType for KeyIdLen {
    fn len(&self) -> usize {
        8
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// The key file: JSON with the KDF parameters and the wrapped master key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEnvelope {
    pub format: String,
    pub kdf: String,
    pub iterations: u32,
    /// hex, 32 bytes
    pub salt: String,
    /// hex, 12 bytes
    pub nonce: String,
    /// hex, 32-byte key + 16-byte tag
    pub wrapped_key: String,
    /// public identifier of the master key (see [`MasterKey::key_id`])
    pub key_id: String,
}

fn wrapping_key(
    passphrase: &Passphrase,
    salt: &[u8],
    iterations: u32,
) -> Result<LessSafeKey, String> {
    let iterations = NonZeroU32::new(iterations).ok_or("iterations must be positive")?;
    let mut kek = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        &passphrase.0,
        &mut kek,
    );
    let unbound = UnboundKey::new(&AES_256_GCM, &kek).map_err(|_| "bad key length");
    // The key-encryption key lives on in aws-lc's context (cleansed when dropped) only.
    zeroize::Zeroize::zeroize(&mut kek);
    Ok(LessSafeKey::new(unbound?))
}

impl KeyEnvelope {
    /// Wraps `master` under `passphrase` with fresh salt and nonce.
    pub fn wrap(master: &MasterKey, passphrase: &Passphrase) -> KeyEnvelope {
        KeyEnvelope::wrap_with_iterations(master, passphrase, PBKDF2_ITERATIONS)
    }

    pub fn wrap_with_iterations(
        master: &MasterKey,
        passphrase: &Passphrase,
        iterations: u32,
    ) -> KeyEnvelope {
        let salt: [u8; 32] = random_bytes();
        let nonce: [u8; 12] = random_bytes();
        let key = wrapping_key(passphrase, &salt, iterations).expect("valid fixed parameters");
        let mut buf = master.0.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(WRAP_AAD),
            &mut buf,
        )
        .expect("sealing 32 bytes cannot fail");
        KeyEnvelope {
            format: FORMAT.to_string(),
            kdf: "pbkdf2-hmac-sha256".to_string(),
            iterations,
            salt: hex::encode(salt),
            nonce: hex::encode(nonce),
            wrapped_key: hex::encode(buf),
            key_id: master.key_id(),
        }
    }

    /// Unwraps the master key; `path` only names the file in errors.
    pub fn unwrap(&self, passphrase: &Passphrase, path: &str) -> Result<MasterKey, Error> {
        let bad = |reason: &str| Error::BadKeyFile {
            path: path.to_string(),
            reason: reason.to_string(),
        };
        if self.format != FORMAT {
            return Err(bad(&format!("unknown format \"{}\"", self.format)));
        }
        if self.kdf != "pbkdf2-hmac-sha256" {
            return Err(bad(&format!("unknown key derivation \"{}\"", self.kdf)));
        }
        let salt = hex::decode(&self.salt).map_err(|_| bad("salt is not hex"))?;
        let nonce: [u8; 12] = hex::decode(&self.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| bad("nonce is not 12 hex bytes"))?;
        let mut buf = hex::decode(&self.wrapped_key).map_err(|_| bad("wrapped key is not hex"))?;
        if buf.len() != 48 {
            return Err(bad("wrapped key has the wrong length"));
        }
        if self.iterations > MAX_PBKDF2_ITERATIONS {
            return Err(bad(&format!(
                "it asks for {} key derivation iterations, more than the {MAX_PBKDF2_ITERATIONS} accepted",
                self.iterations
            )));
        }
        let key = wrapping_key(passphrase, &salt, self.iterations).map_err(|r| bad(&r))?;
        let opened = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(WRAP_AAD),
                &mut buf,
            )
            .map(|plain| <[u8; 32]>::try_from(&*plain));
        // The buffer held the plaintext master key: overwritten before it is freed.
        zeroize::Zeroize::zeroize(&mut buf);
        let master = MasterKey(
            opened
                .map_err(|_| Error::WrongKey {
                    path: path.to_string(),
                })?
                .map_err(|_| bad("unwrapped key has the wrong length"))?,
        );
        if master.key_id() != self.key_id {
            return Err(bad("key id does not match the unwrapped key"));
        }
        Ok(master)
    }

    /// Opens the key file at `path`, creating it (with a new random master key) if it does
    /// not exist. A wrong passphrase is an error and the file is left untouched.
    pub fn load_or_create(path: &Path, passphrase: &Passphrase) -> Result<MasterKey, Error> {
        let shown = path.display().to_string();
        match std::fs::read(path) {
            Ok(bytes) => {
                let env: KeyEnvelope =
                    serde_json::from_slice(&bytes).map_err(|e| Error::BadKeyFile {
                        path: shown.clone(),
                        reason: e.to_string(),
                    })?;
                env.unwrap(passphrase, &shown)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                passphrase.check_strength()?;
                let master = MasterKey::generate();
                let env = KeyEnvelope::wrap(&master, passphrase);
                let json = serde_json::to_vec_pretty(&env).expect("envelope serializes");
                klio_durable::write_atomic(path, &json, 0o600).map_err(|source| Error::Io {
                    action: "write key file",
                    path: shown,
                    source,
                })?;
                Ok(master)
            }
            Err(source) => Err(Error::Io {
                action: "read key file",
                path: shown,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(s: &str) -> Passphrase {
        Passphrase::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn envelope_roundtrip_and_wrong_key() {
        let m = MasterKey::generate();
        let env = KeyEnvelope::wrap_with_iterations(&m, &pass("correct horse"), 1000);
        let back = env.unwrap(&pass("correct horse"), "k").unwrap();
        assert_eq!(back.0, m.0);
        let err = env.unwrap(&pass("wrong"), "k").unwrap_err();
        assert!(matches!(err, Error::WrongKey { .. }), "{err}");
    }

    #[test]
    fn envelope_tampered_fails() {
        let m = MasterKey::generate();
        let mut env = KeyEnvelope::wrap_with_iterations(&m, &pass("pw-pw-pw"), 1000);
        let mut raw = hex::decode(&env.wrapped_key).unwrap();
        raw[0] ^= 1;
        env.wrapped_key = hex::encode(raw);
        assert!(env.unwrap(&pass("pw-pw-pw"), "k").is_err());
    }

    #[test]
    fn load_or_create_persists_the_same_master_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys.json");
        assert!(matches!(
            KeyEnvelope::load_or_create(&p, &pass("short")),
            Err(Error::WeakPassphrase { len: 5, .. })
        ));
        assert!(!p.exists(), "no key file is made with a weak passphrase");
        let a = KeyEnvelope::load_or_create(&p, &pass("a secret of some length\n")).unwrap();
        let b = KeyEnvelope::load_or_create(&p, &pass("a secret of some length")).unwrap();
        assert_eq!(a.0, b.0);
        let before = std::fs::read(&p).unwrap();
        assert!(matches!(
            KeyEnvelope::load_or_create(&p, &pass("other")),
            Err(Error::WrongKey { .. })
        ));
        assert_eq!(
            std::fs::read(&p).unwrap(),
            before,
            "a wrong key must not touch the key file"
        );
    }

    #[test]
    fn passphrase_debug_is_redacted_and_empty_rejected() {
        assert_eq!(format!("{:?}", pass("hunter2")), "Passphrase(<redacted>)");
        assert!(Passphrase::new(b"\n".to_vec()).is_err());
    }
}
