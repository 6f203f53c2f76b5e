//! Tier 2 storage: Klio's backup repository and WAL archive in S3 and S3-compatible servers.
//!
//! Principal types:
//! - [`S3Store`]: implements the repository's synchronous [`klio_repository::ObjectStore`]
//!   on object_store's `AmazonS3`. Writes are create-only (`If-None-Match: *`), as with the
//!   local store; every call blocks on a tokio runtime handle (call it from blocking
//!   threads);
//! - [`S3Config`]: bucket, key prefix, endpoint, region and CA bundle, with
//!   [`S3Credentials`] for static keys given by configuration;
//! - [`S3Error`]: a failure told precisely (missing bucket, denied access, untrusted
//!   certificate, unreachable endpoint ...), carried inside [`klio_repository::Error::Io`]
//!   and found again with [`s3_error`].
//!
//! Credentials come from the environment as the AWS tools read it
//! (`AmazonS3Builder::from_env`): `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`
//! (+ `AWS_SESSION_TOKEN`), a web identity (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`,
//! IRSA), EKS pod identity and container credentials (`AWS_CONTAINER_CREDENTIALS_*`), and
//! finally the instance metadata service. Other `AWS_*` settings of the environment (region,
//! endpoint, proxy, client timeouts) apply too; the fields of [`S3Config`] override them.
//!
//! Requests are retried briefly ([`MAX_RETRIES`] times, backoff up to [`MAX_BACKOFF`], none
//! after [`RETRY_TIMEOUT`]): an unreachable endpoint fails in seconds and the caller's work
//! queue retries later.

mod config;
mod error;
mod store;

pub use config::{
    CONNECT_TIMEOUT, MAX_BACKOFF, MAX_RETRIES, READ_TIMEOUT, REQUEST_TIMEOUT, RETRY_TIMEOUT,
    S3Config, S3Credentials,
};
pub use error::{S3Error, s3_error};
pub use store::S3Store;
