//! Reading PEM files and decoding certificates and private keys from them, with errors
//! that name what was being loaded and from which file.

use std::path::Path;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::Error;

/// Reads a whole (small) file; `what` describes it in the error ("CA certificate").
pub(crate) fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::read(what, path, e))
}

/// Decodes every `CERTIFICATE` block of `pem`; there must be at least one.
pub(crate) fn parse_certs(
    pem: &[u8],
    what: &'static str,
    path: Option<&Path>,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| Error::load(what, path, format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::load(
            what,
            path,
            "no \"CERTIFICATE\" PEM block found\nHINT: the file must hold PEM text starting with \"-----BEGIN CERTIFICATE-----\"",
        ));
    }
    Ok(certs)
}

/// Decodes every `X509 CRL` block of `pem`; there must be at least one.
pub(crate) fn parse_crls(
    pem: &[u8],
    what: &'static str,
    path: Option<&Path>,
) -> Result<Vec<CertificateRevocationListDer<'static>>, Error> {
    let crls = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, pem::Error>>()
        .map_err(|e| Error::load(what, path, format!("malformed PEM: {e}")))?;
    if crls.is_empty() {
        return Err(Error::load(
            what,
            path,
            "no \"X509 CRL\" PEM block found\nHINT: the file must hold PEM text starting with \"-----BEGIN X509 CRL-----\"",
        ));
    }
    Ok(crls)
}

/// Decodes the first private key of `pem` (PKCS#8, SEC1 or PKCS#1).
pub(crate) fn parse_key(
    pem: &[u8],
    what: &'static str,
    path: Option<&Path>,
) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        pem::Error::NoItemsFound => Error::load(
            what,
            path,
            "no private key PEM block found\nHINT: the file must hold PEM text starting with \"-----BEGIN PRIVATE KEY-----\", \"-----BEGIN EC PRIVATE KEY-----\" or \"-----BEGIN RSA PRIVATE KEY-----\"",
        ),
        other => Error::load(what, path, format!("malformed PEM: {other}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn parse_certs_without_blocks_names_file_and_hints() {
        let path = PathBuf::from("/etc/klio/server.crt");
        let err = parse_certs(b"hello", "server certificate", Some(&path))
            .expect_err("no certificate in input");
        let msg = err.to_string();
        assert!(msg.starts_with("could not load server certificate from file \"/etc/klio/server.crt\": no \"CERTIFICATE\" PEM block found"), "{msg}");
        assert!(msg.contains("\nHINT: "), "{msg}");
    }

    #[test]
    fn parse_key_without_blocks_is_rejected() {
        let err = parse_key(
            b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
            "server private key",
            None,
        )
        .expect_err("no key in input");
        assert!(
            err.to_string()
                .starts_with("could not load server private key: no private key PEM block found"),
            "{err}"
        );
    }
}
