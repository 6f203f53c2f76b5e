//! Where the bucket is and how to reach it: [`S3Config`], [`S3Credentials`], and the
//! object_store client built from them.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use klio_repository::{Error, validate_key};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, AwsCredential};
use object_store::{
    BackoffConfig, Certificate, ClientOptions, RetryConfig, StaticCredentialProvider,
};

/// Retries of one request after the first attempt.
pub const MAX_RETRIES: usize = 3;
/// Longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// No retry starts later than this after the first attempt, so an unreachable endpoint
/// fails in seconds; the caller's work queue retries later.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit for establishing a connection (TCP and TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit for one read from a connection: a server that stops answering.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit for a whole request, body included: room for a pack of tens of MiB on a slow link.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest accepted key prefix, so that prefix and key stay within S3's 1024 bytes.
const MAX_PREFIX_LEN: usize = 256;
/// Region used when neither the configuration nor the environment names one.
const DEFAULT_REGION: &str = "us-east-1";

/// Where a repository lives in S3 or an S3-compatible server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket; may be empty. Objects live under `"<prefix>/"`.
    pub prefix: String,
    /// URL of an S3-compatible server (`https://minio.example:9000`); `http://` is allowed.
    /// `None` means AWS (or `AWS_ENDPOINT` from the environment).
    pub endpoint: Option<String>,
    /// `None` means `AWS_REGION`/`AWS_DEFAULT_REGION` from the environment, else `us-east-1`.
    pub region: Option<String>,
    /// PEM file of CA certificates trusted in addition to the system's.
    pub ca_bundle: Option<PathBuf>,
}

/// Static credentials, overriding those found in the environment. The secret is not shown
/// by `Debug`.
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

fn invalid(option: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidOption {
        option,
        reason: reason.into(),
    }
}

/// A configuration checked once: bucket, prefix (without slashes at the ends) and endpoint.
pub(crate) struct Checked {
    pub(crate) bucket: String,
    pub(crate) prefix: String,
    pub(crate) endpoint: Option<String>,
}

impl S3Config {
    /// `s3://bucket/prefix`, or `s3://bucket` without a prefix.
    pub fn location(&self) -> String {
        let prefix = self.prefix.trim_end_matches('/');
        if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, prefix)
        }
    }

    pub(crate) fn check(&self) -> Result<Checked, Error> {
        let bucket = &self.bucket;
        let bucket_ok = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_';
        if bucket.is_empty() {
            return Err(invalid("bucket", "the bucket name is empty"));
        }
        if bucket.len() > 255 || !bucket.bytes().all(bucket_ok) {
            return Err(invalid(
                "bucket",
                format!("\"{bucket}\" is not a bucket name: use letters, digits, '.', '-' and '_'"),
            ));
        }

        let prefix = self.prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            if prefix.len() > MAX_PREFIX_LEN {
                return Err(invalid(
                    "prefix",
                    format!("the prefix is longer than {MAX_PREFIX_LEN} bytes"),
                ));
            }
            if let Err(Error::InvalidKey { reason, .. }) = validate_key(prefix) {
                return Err(invalid(
                    "prefix",
                    format!("\"{}\" is not a key prefix: {reason}", self.prefix),
                ));
            }
        }

        let endpoint = match &self.endpoint {
            None => None,
            Some(e) => {
                let e = e.trim_end_matches('/');
                let host = e
                    .strip_prefix("https://")
                    .or_else(|| e.strip_prefix("http://"));
                match host {
                    Some(h) if !h.is_empty() && !h.contains(char::is_whitespace) => {
                        Some(e.to_string())
                    }
                    _ => {
                        return Err(invalid(
                            "endpoint",
                            format!(
                                "\"{e}\" is not an endpoint URL: it must start with https:// or http:// and name a host"
                            ),
                        ));
                    }
                }
            }
        };
        Ok(Checked {
            bucket: bucket.clone(),
            prefix: prefix.to_string(),
            endpoint,
        })
    }
}

/// Client options: short retries and timeouts first, then `AWS_*` client settings from the
/// environment (proxy, timeouts ...), then what the configuration requires.
fn client_options(checked: &Checked, ca_bundle: Option<&[Certificate]>) -> ClientOptions {
    let mut options = ClientOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_read_timeout(READ_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT);
    for (key, value) in std::env::vars() {
        if !key.starts_with("AWS_") {
            continue;
        }
        if let Ok(AmazonS3ConfigKey::Client(k)) = key.to_ascii_lowercase().parse() {
            options = options.with_config(k, value);
        }
    }
    if checked
        .endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"))
    {
        options = options.with_allow_http(true);
    }
    for cert in ca_bundle.unwrap_or_default() {
        options = options.with_root_certificate(cert.clone());
    }
    options
}

/// The retry policy: [`MAX_RETRIES`], [`MAX_BACKOFF`], [`RETRY_TIMEOUT`].
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: MAX_BACKOFF,
            base: 2.0,
        },
        max_retries: MAX_RETRIES,
        retry_timeout: RETRY_TIMEOUT,
    }
}

/// Reads the CA bundle: at least one PEM certificate.
pub(crate) fn read_ca_bundle(cfg: &S3Config) -> Result<Option<Vec<Certificate>>, Error> {
    let Some(path) = &cfg.ca_bundle else {
        return Ok(None);
    };
    let pem = std::fs::read(path).map_err(|source| Error::Io {
        action: "read CA bundle",
        location: cfg.location(),
        key: path.display().to_string(),
        source,
    })?;
    let bad = |reason: String| invalid("ca_bundle", format!("\"{}\" {reason}", path.display()));
    let certs = Certificate::from_pem_bundle(&pem)
        .map_err(|e| bad(format!("is not a PEM certificate bundle: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".to_string()));
    }
    Ok(Some(certs))
}

/// The builder: the environment first (credentials of every kind, region, endpoint), then
/// the configuration and `credentials` on top.
pub(crate) fn builder(
    cfg: &S3Config,
    checked: &Checked,
    ca_bundle: Option<&[Certificate]>,
    credentials: Option<&S3Credentials>,
) -> AmazonS3Builder {
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(&checked.bucket)
        .with_retry(retry_config())
        .with_client_options(client_options(checked, ca_bundle));
    if let Some(e) = &checked.endpoint {
        b = b.with_endpoint(e);
    }
    if let Some(r) = &cfg.region {
        b = b.with_region(r);
    } else if b.get_config_value(&AmazonS3ConfigKey::Region).is_none() {
        b = b.with_region(DEFAULT_REGION);
    }
    if let Some(c) = credentials {
        // Takes precedence over every credential source of the environment.
        b = b.with_credentials(Arc::new(StaticCredentialProvider::new(AwsCredential {
            key_id: c.access_key_id.clone(),
            secret_key: c.secret_access_key.clone(),
            token: c.session_token.clone(),
        })));
    }
    b
}

/// The endpoint named in messages: the configured one, or AWS's for the region.
pub(crate) fn endpoint_for_messages(builder: &AmazonS3Builder) -> String {
    if let Some(e) = builder.get_config_value(&AmazonS3ConfigKey::Endpoint) {
        return e;
    }
    let region = builder
        .get_config_value(&AmazonS3ConfigKey::Region)
        .unwrap_or_else(|| DEFAULT_REGION.to_string());
    format!("https://s3.{region}.amazonaws.com")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cfg(bucket: &str, prefix: &str, endpoint: Option<&str>) -> S3Config {
        S3Config {
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint: endpoint.map(str::to_string),
            ..S3Config::default()
        }
    }

    #[test]
    fn check_accepts_prefixes_and_endpoints() {
        let c = cfg("klio", "team-a/cluster1/", Some("http://127.0.0.1:9000/"))
            .check()
            .unwrap();
        assert_eq!(c.prefix, "team-a/cluster1");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(cfg("klio", "", None).check().unwrap().prefix, "");
        assert_eq!(cfg("klio", "a/b/", None).location(), "s3://klio/a/b");
        assert_eq!(cfg("klio", "", None).location(), "s3://klio");
    }

    #[test]
    fn check_refuses_bad_buckets_prefixes_and_endpoints() {
        for (c, option) in [
            (cfg("", "", None), "bucket"),
            (cfg("a/b", "", None), "bucket"),
            (cfg("b", "/abs", None), "prefix"),
            (cfg("b", "a//b", None), "prefix"),
            (cfg("b", "../x", None), "prefix"),
            (cfg("b", &"p".repeat(300), None), "prefix"),
            (cfg("b", "", Some("127.0.0.1:9000")), "endpoint"),
            (cfg("b", "", Some("ftp://x")), "endpoint"),
            (cfg("b", "", Some("https://")), "endpoint"),
        ] {
            match c.check() {
                Err(Error::InvalidOption { option: o, .. }) => assert_eq!(o, option, "{c:?}"),
                Err(e) => panic!("{c:?}: unexpected error {e}"),
                Ok(_) => panic!("{c:?} was accepted"),
            }
        }
    }

    #[test]
    fn credentials_debug_hides_the_secret() {
        let c = S3Credentials {
            access_key_id: "AKIAEXAMPLE".into(),
            secret_access_key: "very-secret".into(),
            session_token: Some("token-secret".into()),
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("AKIAEXAMPLE"), "{shown}");
        assert!(!shown.contains("secret\""), "{shown}");
        assert!(!shown.contains("very-secret") && !shown.contains("token-secret"));
    }
}
