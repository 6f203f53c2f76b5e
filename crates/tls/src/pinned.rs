//! A client-certificate verifier that also accepts a certificate pinned byte for byte, as Go's
//! TLS stack does for a leaf found in its root pool. CloudNativePG's operator authenticates to
//! plugins with a self-signed certificate that may carry `CA:TRUE` (what `openssl req -x509`
//! makes); webpki refuses a CA certificate as an end entity, so pinning is needed to accept
//! what CloudNativePG itself accepts. Anything not pinned goes through the chain check.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

#[derive(Debug)]
pub(crate) struct PinnedOrChained {
    pub(crate) pinned: Vec<CertificateDer<'static>>,
    pub(crate) chained: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for PinnedOrChained {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: Go clients send their certificate only if its issuer is listed.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|p| p.as_ref() == end_entity.as_ref())
        {
            let (_, cert) =
                x509_parser::parse_x509_certificate(end_entity.as_ref()).map_err(|_| {
                    rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
                })?;
            let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
            let validity = cert.validity();
            if now < validity.not_before.timestamp() {
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidYet,
                ));
            }
            if now > validity.not_after.timestamp() {
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Expired,
                ));
            }
            return Ok(ClientCertVerified::assertion());
        }
        self.chained
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chained.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chained.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chained.supported_verify_schemes()
    }
}
