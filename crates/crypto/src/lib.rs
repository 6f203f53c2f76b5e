//! Keys and sealed objects: how Klio encrypts, compresses and authenticates what it stores.
//!
//! Principal types:
//! - [`Passphrase`]: the user's encryption key (redacted in `Debug`);
//! - [`KeyEnvelope`]: the on-disk key file, a random [`MasterKey`] wrapped with AES-256-GCM
//!   under a key derived from the passphrase with PBKDF2-HMAC-SHA256;
//! - [`ObjectHeader`] and [`FrameCipher`]: the sealed-object format, a header followed by
//!   independently authenticated frames (see `docs/formats/sealed-object.md`);
//! - [`seal_object`] / [`open_object`]: whole-object helpers on top of them.
//!
//! Everything here is synchronous and free of I/O except [`KeyEnvelope::load_or_create`].

mod envelope;
mod sealed;

pub use envelope::{KeyEnvelope, MasterKey, PBKDF2_ITERATIONS, Passphrase};
pub use sealed::{
    FRAME_HEADER_LEN, FrameCipher, FrameIter, FrameRead, MAX_FRAME_PLAINTEXT, ObjectHeader,
    ObjectKind, OpenedFrame, RawFrame, SealedSummary, decompress_payload, open_object, seal_object,
};

/// Errors of sealing, opening and key handling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the encryption key does not open the key file \"{path}\"\nHINT: the server was started with a different encryption key than the one this data directory was created with"
    )]
    WrongKey { path: String },
    #[error("key file \"{path}\" is invalid: {reason}")]
    BadKeyFile { path: String, reason: String },
    #[error("object \"{name}\" is corrupt: {reason}")]
    Corrupt { name: String, reason: String },
    #[error("could not {action} \"{path}\": {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("the encryption key is empty\nHINT: provide a key of at least 16 characters")]
    EmptyPassphrase,
    #[error(
        "the encryption key has {len} bytes, fewer than the {min} a new key file needs\nHINT: use a longer key, e.g. `head -c 32 /dev/urandom | base64`"
    )]
    WeakPassphrase { len: usize, min: usize },
}

impl Error {
    pub(crate) fn corrupt(name: &str, reason: impl Into<String>) -> Error {
        Error::Corrupt {
            name: name.to_string(),
            reason: reason.into(),
        }
    }
}

/// Fills a buffer with cryptographically secure random bytes.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // aws-lc's RNG only fails if the operating system's entropy source is broken; there is
    // nothing sensible to continue with then.
    aws_lc_rs::rand::fill(&mut b).expect("system random number generator failed");
    b
}
