//! The crate's one error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while generating the development PKI, loading TLS
/// material, building TLS configurations, connecting, or reading a principal.
///
/// Messages follow PostgreSQL's style: lowercase, no trailing period, identifiers and
/// paths quoted, and a `HINT:` line when there is something the user can do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("could not read {what} file \"{}\": {source}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file could not be written (durably).
    #[error("could not write file \"{}\": {source}", path.display())]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A directory could not be created.
    #[error("could not create directory \"{}\": {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// PEM or DER input (from a file when `path` is set) is malformed or holds nothing
    /// of the expected kind.
    #[error("could not load {what}{}: {reason}", in_file(path.as_deref()))]
    Load {
        what: &'static str,
        path: Option<PathBuf>,
        reason: String,
    },

    /// rustls refused the material for a TLS configuration (for example a private key
    /// that does not belong to the certificate).
    #[error("could not build the {side} TLS configuration: {source}")]
    TlsConfig {
        side: &'static str,
        #[source]
        source: rustls::Error,
    },

    /// The client CA could not be turned into a client certificate verifier.
    #[error("could not build the client certificate verifier: {source}")]
    ClientVerifier {
        #[source]
        source: rustls::server::VerifierBuilderError,
    },

    /// A cluster name does not have the Kubernetes-like form Klio requires.
    #[error(
        "invalid cluster name \"{name}\": {reason}\nHINT: a cluster name has at most 63 characters: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
    )]
    InvalidClusterName { name: String, reason: &'static str },

    /// A certificate's subject common name is not of the form `<user>@<cluster>`.
    #[error(
        "certificate common name \"{common_name}\" is not a Klio principal: {reason}\nHINT: Klio client certificates have a common name of the form \"<user>@<cluster>\", such as \"klio@main\""
    )]
    InvalidPrincipal {
        common_name: String,
        reason: &'static str,
    },

    /// A DER certificate could not be parsed or lacks what Klio needs from it.
    #[error("invalid certificate: {reason}")]
    Certificate { reason: String },

    /// Key or certificate generation failed.
    #[error("could not generate {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },

    /// An extra server name for the development server certificate is not a valid DNS
    /// name or IP address.
    #[error("invalid server certificate name \"{name}\": {reason}")]
    InvalidSubjectAltName { name: String, reason: String },

    /// The CA certificate exists but its key does not; Klio never replaces a CA silently.
    #[error(
        "CA certificate \"{}\" exists but its private key \"{}\" is missing\nHINT: restore the key, or move the directory aside to create a new CA (every certificate must then be reissued)",
        cert.display(),
        key.display()
    )]
    CaKeyMissing { cert: PathBuf, key: PathBuf },

    /// The CA key on disk does not belong to the CA certificate on disk.
    #[error(
        "CA private key \"{}\" does not belong to CA certificate \"{}\"\nHINT: restore the matching pair, or move the directory aside to create a new CA",
        key.display(),
        cert.display()
    )]
    CaKeyMismatch { cert: PathBuf, key: PathBuf },

    /// A file name stem for [`crate::issue_client_cert`] is not a plain, safe name.
    #[error("invalid certificate file name \"{stem}\": {reason}")]
    InvalidFileStem { stem: String, reason: &'static str },

    /// The name the client expects in the server certificate is not a DNS name or IP
    /// address.
    #[error("invalid server name \"{name}\": {reason}")]
    InvalidServerName { name: String, reason: String },

    /// `host:port` does not form a valid endpoint URI.
    #[error("invalid server address \"{addr}\": {reason}")]
    InvalidAddress { addr: String, reason: String },

    /// Connecting (TCP, TLS or HTTP/2) to a Klio server failed.
    #[error(
        "could not connect to the Klio server at {addr}: {reason}\nHINT: is `klio server` running and listening on {addr}?"
    )]
    Connect { addr: String, reason: String },
}

impl Error {
    /// Whether trying the same operation again later may succeed (a server that is not
    /// up yet); everything else needs a change of input or configuration first.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Connect { .. })
    }

    pub(crate) fn read(what: &'static str, path: &Path, source: std::io::Error) -> Error {
        Error::ReadFile {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn write(path: &Path, source: std::io::Error) -> Error {
        Error::WriteFile {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn load(
        what: &'static str,
        path: Option<&Path>,
        reason: impl Into<String>,
    ) -> Error {
        Error::Load {
            what,
            path: path.map(Path::to_path_buf),
            reason: reason.into(),
        }
    }

    pub(crate) fn generate(what: impl Into<String>, source: rcgen::Error) -> Error {
        Error::Generate {
            what: what.into(),
            source,
        }
    }
}

fn in_file(path: Option<&Path>) -> String {
    match path {
        Some(p) => format!(" from file \"{}\"", p.display()),
        None => String::new(),
    }
}

/// Renders an error and its chain of sources on one line, `outer: inner: innermost`,
/// skipping sources whose text the outer message already contains.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
