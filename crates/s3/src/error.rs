//! What went wrong talking to S3, told so that a person can act on it.
//!
//! [`S3Error`] is this crate's error: every failed request is classified once, in
//! [`classify`], into a missing bucket, denied access, unusable credentials, an untrusted
//! certificate, an unreachable endpoint, or another failed request. The store hands it to its
//! callers inside [`klio_repository::Error::Io`] (the trait's error type), from which
//! [`s3_error`] gets it back.

use std::error::Error as StdError;
use std::io;

use object_store::client::{HttpError, HttpErrorKind};

/// S3 error codes (the `<Code>` of an error response) that mean the credentials or the
/// permissions are wrong.
const ACCESS_CODES: &[&str] = &[
    "AccessDenied",
    "AllAccessDisabled",
    "AccountProblem",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
    "TokenRefreshRequired",
];

/// A failed S3 request, classified.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum S3Error {
    #[error(
        "bucket \"{bucket}\" does not exist at S3 endpoint \"{endpoint}\"\nHINT: create the bucket, or correct the bucket name, the endpoint or the region"
    )]
    BucketNotFound { bucket: String, endpoint: String },
    #[error(
        "access to bucket \"{bucket}\" at S3 endpoint \"{endpoint}\" was denied: {code}\nHINT: check the S3 credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the role of the web identity, pod or instance) and the bucket's policy"
    )]
    AccessDenied {
        bucket: String,
        endpoint: String,
        /// The S3 error code (`InvalidAccessKeyId`, `SignatureDoesNotMatch`, `AccessDenied`
        /// ...) or the HTTP status when the response had no body.
        code: String,
    },
    #[error(
        "could not obtain S3 credentials for bucket \"{bucket}\": {detail}\nHINT: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or configure a web identity (IRSA), EKS pod identity, container or instance role"
    )]
    Credentials { bucket: String, detail: String },
    #[error(
        "the TLS certificate of S3 endpoint \"{endpoint}\" is not trusted: {detail}\nHINT: {hint}"
    )]
    CertificateNotTrusted {
        endpoint: String,
        detail: String,
        hint: &'static str,
    },
    #[error(
        "TLS handshake with S3 endpoint \"{endpoint}\" failed: {detail}\nHINT: check that the endpoint's scheme (http:// or https://) matches the server"
    )]
    Tls { endpoint: String, detail: String },
    #[error(
        "S3 endpoint \"{endpoint}\" of bucket \"{bucket}\" is unreachable: {detail}\nHINT: check the endpoint URL, and that the server runs and can be reached from here"
    )]
    Unreachable {
        bucket: String,
        endpoint: String,
        detail: String,
    },
    #[error(
        "the connection to S3 endpoint \"{endpoint}\" of bucket \"{bucket}\" broke: {detail}\nHINT: the request can be retried; if every request fails so, check that the endpoint's scheme (http:// or https://) matches the server"
    )]
    ConnectionBroken {
        bucket: String,
        endpoint: String,
        detail: String,
    },
    #[error(
        "another write of the same object in bucket \"{bucket}\" was in progress and the object does not exist yet\nHINT: the write can be retried"
    )]
    ConcurrentWrite { bucket: String },
    #[error(
        "S3 endpoint \"{endpoint}\" does not support {feature}, which Klio needs to write objects without replacing them\nHINT: use a server that supports it (AWS S3 does)"
    )]
    Unsupported {
        endpoint: String,
        feature: &'static str,
    },
    #[error("S3 request to bucket \"{bucket}\" at endpoint \"{endpoint}\" failed: {detail}")]
    Request {
        bucket: String,
        endpoint: String,
        detail: String,
    },
}

impl S3Error {
    /// Whether retrying later could succeed without someone changing the configuration,
    /// the credentials or the bucket.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            S3Error::Unreachable { .. }
                | S3Error::ConnectionBroken { .. }
                | S3Error::ConcurrentWrite { .. }
                | S3Error::Request { .. }
        )
    }

    fn io_kind(&self) -> io::ErrorKind {
        match self {
            S3Error::BucketNotFound { .. } => io::ErrorKind::NotFound,
            S3Error::AccessDenied { .. } | S3Error::Credentials { .. } => {
                io::ErrorKind::PermissionDenied
            }
            S3Error::CertificateNotTrusted { .. } | S3Error::Tls { .. } => {
                io::ErrorKind::InvalidData
            }
            S3Error::Unreachable { .. } => io::ErrorKind::NotConnected,
            S3Error::ConnectionBroken { .. } => io::ErrorKind::ConnectionReset,
            S3Error::Unsupported { .. } => io::ErrorKind::Unsupported,
            S3Error::ConcurrentWrite { .. } | S3Error::Request { .. } => io::ErrorKind::Other,
        }
    }

    /// The repository error for this failure while doing `action` on `key`.
    pub(crate) fn into_repository(
        self,
        action: &'static str,
        location: &str,
        key: &str,
    ) -> klio_repository::Error {
        klio_repository::Error::Io {
            action,
            location: location.to_string(),
            key: key.to_string(),
            source: io::Error::new(self.io_kind(), self),
        }
    }
}

/// The [`S3Error`] inside a repository error returned by [`S3Store`](crate::S3Store), if any.
pub fn s3_error(e: &klio_repository::Error) -> Option<&S3Error> {
    match e {
        klio_repository::Error::Io { source, .. } => source.get_ref()?.downcast_ref::<S3Error>(),
        _ => None,
    }
}

/// Where a request went, for messages.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    pub(crate) bucket: &'a str,
    pub(crate) endpoint: &'a str,
}

fn chain<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(e), |e: &&'a (dyn StdError + 'static)| (*e).source())
}

/// The rustls error behind `e`: `e` itself, or the error inside a (possibly nested)
/// `io::Error`, whose `source` skips the error it wraps.
fn rustls_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let mut io = e.downcast_ref::<io::Error>()?;
    loop {
        let inner = io.get_ref()?;
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        io = inner.downcast_ref::<io::Error>()?;
    }
}

/// The `<Code>` of an S3 error response quoted in `text`.
fn s3_code(text: &str) -> Option<&str> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    Some(&text[start..start + len])
}

/// Whether `e` says that the bucket does not exist (S3 error code `NoSuchBucket`).
pub(crate) fn is_no_such_bucket(e: &object_store::Error) -> bool {
    s3_code(&e.to_string()) == Some("NoSuchBucket")
}

/// Whether `e` says that the server does not implement the request (S3 error code
/// `NotImplemented`, or object_store refusing an operation the configuration disables).
pub(crate) fn is_not_implemented(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotImplemented { .. })
        || s3_code(&e.to_string()) == Some("NotImplemented")
}

fn certificate_hint(e: &rustls::CertificateError) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        C::UnknownIssuer | C::BadSignature | C::UnhandledCriticalExtension => {
            "give the PEM file of the CA that signed the server's certificate as the CA bundle, or install that CA in the system's trust store"
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "use an endpoint host name that the server's certificate names, or reissue the certificate with that name"
        }
        C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
            "renew the server's certificate, and check the clocks of this machine and of the server"
        }
        _ => "check the server's certificate and the CA bundle",
    }
}

/// The innermost message of `e`: the root cause, without the wrapping.
fn root_cause(e: &(dyn StdError + 'static)) -> String {
    chain(e).last().map(|e| e.to_string()).unwrap_or_default()
}

/// Classifies a failed object_store call.
pub(crate) fn classify(e: &object_store::Error, target: Target<'_>) -> S3Error {
    let bucket = target.bucket.to_string();
    let endpoint = target.endpoint.to_string();
    let top: &(dyn StdError + 'static) = e;

    // TLS first: a failed handshake is also a connect error.
    if let Some(tls) = chain(top).find_map(rustls_error) {
        return match tls {
            rustls::Error::InvalidCertificate(cert) => S3Error::CertificateNotTrusted {
                endpoint,
                detail: tls.to_string(),
                hint: certificate_hint(cert),
            },
            other => S3Error::Tls {
                endpoint,
                detail: other.to_string(),
            },
        };
    }

    let text = e.to_string();
    match s3_code(&text) {
        Some("NoSuchBucket") => return S3Error::BucketNotFound { bucket, endpoint },
        Some(code) if ACCESS_CODES.contains(&code) => {
            return S3Error::AccessDenied {
                bucket,
                endpoint,
                code: code.to_string(),
            };
        }
        _ => {}
    }
    match e {
        object_store::Error::PermissionDenied { .. } => {
            return S3Error::AccessDenied {
                bucket,
                endpoint,
                code: "HTTP status 403 Forbidden".to_string(),
            };
        }
        object_store::Error::Unauthenticated { .. } => {
            return S3Error::AccessDenied {
                bucket,
                endpoint,
                code: "HTTP status 401 Unauthorized".to_string(),
            };
        }
        _ => {}
    }

    let transport = chain(top).find_map(|e| e.downcast_ref::<HttpError>());
    if let Some(http) = transport {
        match http.kind() {
            HttpErrorKind::Connect | HttpErrorKind::Timeout => {
                return S3Error::Unreachable {
                    bucket,
                    endpoint,
                    detail: root_cause(top),
                };
            }
            HttpErrorKind::Request | HttpErrorKind::Interrupted => {
                return S3Error::ConnectionBroken {
                    bucket,
                    endpoint,
                    detail: root_cause(top),
                };
            }
            _ => {}
        }
    }
    S3Error::Request {
        bucket,
        endpoint,
        detail: text,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn s3_code_finds_the_code_of_an_error_response() {
        let body = "Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?>\
                    <Error><Code>NoSuchBucket</Code><Message>m</Message></Error>";
        assert_eq!(s3_code(body), Some("NoSuchBucket"));
        assert_eq!(s3_code("no body"), None);
        assert_eq!(s3_code("<Code>unterminated"), None);
    }

    #[test]
    fn not_implemented_is_recognised_in_both_forms() {
        let refused = object_store::Error::NotImplemented {
            operation: "put_opts".into(),
            implementer: "S3".into(),
        };
        assert!(is_not_implemented(&refused));
        let answered = object_store::Error::Generic {
            store: "S3",
            source: "Server returned non-2xx status code: 501 Not Implemented: \
                     <Error><Code>NotImplemented</Code></Error>"
                .into(),
        };
        assert!(is_not_implemented(&answered));
        let other = object_store::Error::Generic {
            store: "S3",
            source: "<Error><Code>InternalError</Code></Error>".into(),
        };
        assert!(!is_not_implemented(&other));
        let target = Target {
            bucket: "b",
            endpoint: "https://e",
        };
        assert!(matches!(classify(&other, target), S3Error::Request { .. }));
    }

    #[test]
    fn s3_error_is_found_inside_a_repository_error() {
        let e = S3Error::BucketNotFound {
            bucket: "b".into(),
            endpoint: "http://e".into(),
        }
        .into_repository("open bucket", "s3://b", "b");
        let inner = s3_error(&e).unwrap();
        assert!(matches!(inner, S3Error::BucketNotFound { .. }));
        assert!(!inner.is_retryable());
        let text = e.to_string();
        assert!(
            text.starts_with("could not open bucket \"b\" in repository \"s3://b\": bucket \"b\" does not exist at S3 endpoint \"http://e\"\nHINT: "),
            "{text}"
        );
        let other = klio_repository::Error::ObjectNotFound {
            location: "s3://b".into(),
            key: "k".into(),
        };
        assert!(s3_error(&other).is_none());
    }
}
