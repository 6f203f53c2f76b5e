//! [`S3Store`]: the repository's synchronous [`ObjectStore`] on object_store's `AmazonS3`.

use std::future::Future;
use std::ops::Range;

use futures::TryFutureExt;
use klio_repository::{Error, ObjectStore, validate_key};
use object_store::aws::AmazonS3;
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, ObjectStore as _, ObjectStoreExt as _, PutMode, PutOptions, PutPayload,
};
use tokio::runtime::Handle;

use crate::config::{self, S3Config, S3Credentials};
use crate::error::{S3Error, Target, classify, is_no_such_bucket, is_not_implemented};

/// Objects in an S3 bucket (AWS or S3-compatible), under an optional key prefix.
///
/// Same key rules and semantics as the repository's `LocalStore`: keys are checked with
/// [`validate_key`]; [`put`](ObjectStore::put) is create-only (`If-None-Match: *`), so an
/// existing object is kept and the call succeeds; a missing object is `None` for `get`,
/// [`Error::ObjectNotFound`] for `get_range`, and not an error for `delete`.
///
/// # Threads and the runtime
///
/// The trait is synchronous, the S3 client async. Each call runs the request on the tokio
/// runtime given to [`S3Store::open`] with [`Handle::block_on`], blocking the calling thread.
/// Call it from a blocking thread (`tokio::task::spawn_blocking`) or a thread outside the
/// runtime, never from an async task: `block_on` inside a runtime worker panics. A
/// current-thread runtime works only while another thread drives it (its `block_on`), so a
/// multi-thread runtime is the usual choice. The runtime must outlive the store.
///
/// # Failures
///
/// Requests are retried [`MAX_RETRIES`](crate::MAX_RETRIES) times within
/// [`RETRY_TIMEOUT`](crate::RETRY_TIMEOUT), so an unreachable endpoint fails in seconds.
/// Failures are [`Error::Io`] whose source holds an [`S3Error`] (see [`crate::s3_error`]).
pub struct S3Store {
    s3: AmazonS3,
    runtime: Handle,
    bucket: String,
    /// Without slashes at the ends; empty for none.
    prefix: String,
    /// The endpoint, for messages.
    endpoint: String,
    location: String,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.location)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Opens the bucket with the credentials found in the environment (see the crate
    /// documentation), then checks that the bucket can be listed.
    ///
    /// Blocks the calling thread; call it as the trait methods (see [`S3Store`]).
    pub fn open(cfg: &S3Config, runtime: Handle) -> Result<S3Store, Error> {
        S3Store::open_inner(cfg, runtime, None)
    }

    /// [`S3Store::open`] with static credentials, which take precedence over any found in
    /// the environment.
    pub fn open_with_credentials(
        cfg: &S3Config,
        runtime: Handle,
        credentials: &S3Credentials,
    ) -> Result<S3Store, Error> {
        S3Store::open_inner(cfg, runtime, Some(credentials))
    }

    fn open_inner(
        cfg: &S3Config,
        runtime: Handle,
        credentials: Option<&S3Credentials>,
    ) -> Result<S3Store, Error> {
        let checked = cfg.check()?;
        let ca_bundle = config::read_ca_bundle(cfg)?;
        let builder = config::builder(cfg, &checked, ca_bundle.as_deref(), credentials);
        let endpoint = config::endpoint_for_messages(&builder);
        let s3 = builder.build().map_err(|e| Error::InvalidOption {
            option: "S3 client configuration",
            reason: e.to_string(),
        })?;
        let store = S3Store {
            s3,
            runtime,
            bucket: checked.bucket,
            prefix: checked.prefix,
            endpoint,
            location: cfg.location(),
        };
        store.check_bucket()?;
        tracing::info!(location = %store.location, endpoint = %store.endpoint, "opened S3 bucket");
        Ok(store)
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The endpoint requests go to (AWS's regional endpoint when none is configured).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Checks that the server honours create-only writes (`If-None-Match: *`), which
    /// [`put`](ObjectStore::put) relies on to never replace an object: writes `key` twice
    /// with different contents, expects the second write refused and the first content kept,
    /// then deletes `key`. A server that ignores the condition and replaces the object is
    /// [`S3Error::Unsupported`], as is one that does not implement it. Writers call this once
    /// when they open the bucket, with a key of their own (left behind only by a crash).
    pub fn check_create_only(&self, key: &str) -> Result<(), Error> {
        let path = self.path(key)?;
        let create = || PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let unsupported = || {
            S3Error::Unsupported {
                endpoint: self.endpoint.clone(),
                feature: "conditional writes (If-None-Match: *)",
            }
            .into_repository("check create-only writes", &self.location, key)
        };
        let put = |data: &'static [u8]| {
            self.run(
                self.s3
                    .put_opts(&path, PutPayload::from_static(data), create()),
            )
        };
        match put(b"first") {
            Ok(_) => {}
            Err(e) if is_not_implemented(&e) => return Err(unsupported()),
            // Left by an earlier check that crashed: the second write below still tells.
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(e) => return Err(self.fail("check create-only writes", key, &e)),
        }
        let second = put(b"second");
        let kept = self.get(key)?;
        self.delete(key)?;
        match second {
            Err(object_store::Error::AlreadyExists { .. }) if kept.as_deref() == Some(b"first") => {
                Ok(())
            }
            Err(e) if is_not_implemented(&e) => Err(unsupported()),
            Err(object_store::Error::AlreadyExists { .. }) | Ok(_) => Err(unsupported()),
            Err(e) => Err(self.fail("check create-only writes", key, &e)),
        }
    }

    /// Obtains credentials, then lists at most one key under the prefix: the bucket exists,
    /// the endpoint answers, its certificate is trusted and the credentials are accepted.
    fn check_bucket(&self) -> Result<(), Error> {
        let fail = |e: S3Error| e.into_repository("open bucket", &self.location, &self.bucket);
        let s3 = &self.s3;
        let prefix = self.s3_prefix("");
        self.runtime
            .block_on(async {
                s3.credentials()
                    .get_credential()
                    .await
                    .map_err(|e| S3Error::Credentials {
                        bucket: self.bucket.clone(),
                        detail: e.to_string(),
                    })?;
                let opts = PaginatedListOptions {
                    max_keys: Some(1),
                    ..PaginatedListOptions::default()
                };
                s3.list_paginated(prefix.as_deref(), opts)
                    .await
                    .map_err(|e| classify(&e, self.target()))?;
                Ok(())
            })
            .map_err(fail)
    }

    fn target(&self) -> Target<'_> {
        Target {
            bucket: &self.bucket,
            endpoint: &self.endpoint,
        }
    }

    fn fail(&self, action: &'static str, key: &str, e: &object_store::Error) -> Error {
        classify(e, self.target()).into_repository(action, &self.location, key)
    }

    /// The object path of `key`.
    fn path(&self, key: &str) -> Result<Path, Error> {
        validate_key(key)?;
        let full = if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        };
        Path::parse(full).map_err(|_| Error::InvalidKey {
            key: key.to_string(),
            reason: "it is not a valid S3 object name",
        })
    }

    /// The S3 listing prefix for the key prefix `prefix`; `None` lists the whole bucket.
    fn s3_prefix(&self, prefix: &str) -> Option<String> {
        match (self.prefix.is_empty(), prefix.is_empty()) {
            (true, true) => None,
            (true, false) => Some(prefix.to_string()),
            (false, _) => Some(format!("{}/{prefix}", self.prefix)),
        }
    }

    /// The key of an object path under the prefix (`None` for anything else).
    fn key_of<'a>(&self, location: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            Some(location)
        } else {
            location
                .strip_prefix(self.prefix.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
        }
    }

    fn run<F: Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// The size of an existing object, `None` if it does not exist.
    fn size(&self, key: &str, path: &Path) -> Result<Option<u64>, Error> {
        match self.run(self.s3.head(path)) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail("check object", key, &e)),
        }
    }

    fn not_found(&self, key: &str) -> Error {
        Error::ObjectNotFound {
            location: self.location.clone(),
            key: key.to_string(),
        }
    }

    /// The error for a range that does not fit, after a ranged read failed or came back short:
    /// `ShortObject` if the object is too short, `ObjectNotFound` if it is gone, `other`
    /// otherwise.
    fn range_error(&self, key: &str, path: &Path, range: &Range<u64>, other: Error) -> Error {
        let len = (range.end - range.start) as usize;
        match self.size(key, path) {
            Ok(Some(size)) if range.end > size => Error::ShortObject {
                key: key.to_string(),
                offset: range.start,
                len,
                size,
            },
            Ok(None) => self.not_found(key),
            _ => other,
        }
    }
}

/// Checks a listing prefix as the repository's stores do: empty, or a key prefix whose
/// complete components are valid and whose last, partial component uses valid characters.
fn validate_prefix(prefix: &str) -> Result<(), Error> {
    if prefix.is_empty() {
        return Ok(());
    }
    let rewrap = |e: Error| match e {
        Error::InvalidKey { reason, .. } => Error::InvalidKey {
            key: prefix.to_string(),
            reason,
        },
        other => other,
    };
    let (complete, last) = match prefix.rsplit_once('/') {
        Some((complete, last)) => (Some(complete), last),
        None => (None, prefix),
    };
    if let Some(complete) = complete {
        validate_key(complete).map_err(rewrap)?;
    }
    if !last.is_empty() {
        validate_key(last).map_err(rewrap)?;
    }
    Ok(())
}

impl ObjectStore for S3Store {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), Error> {
        let path = self.path(key)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let payload = PutPayload::from(data.to_vec());
        match self.run(self.s3.put_opts(&path, payload, opts)) {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { source, .. }) => {
                // 412 Precondition Failed (object_store reports it as AlreadyExists wrapping
                // the precondition error): the object exists, and is kept.
                let precondition = source
                    .downcast_ref::<object_store::Error>()
                    .is_some_and(|e| {
                        matches!(
                            e,
                            object_store::Error::Precondition { .. }
                                | object_store::Error::NotModified { .. }
                        )
                    });
                // 409 Conflict: another conditional write of the key was in progress; done
                // only if that one has completed.
                if precondition || self.exists(key)? {
                    Ok(())
                } else {
                    Err(S3Error::ConcurrentWrite {
                        bucket: self.bucket.clone(),
                    }
                    .into_repository("write object", &self.location, key))
                }
            }
            Err(e) if is_not_implemented(&e) => Err(S3Error::Unsupported {
                endpoint: self.endpoint.clone(),
                feature: "conditional writes (If-None-Match: *)",
            }
            .into_repository("write object", &self.location, key)),
            Err(e) => Err(self.fail("write object", key, &e)),
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        let path = self.path(key)?;
        let read = self
            .s3
            .get(&path)
            .and_then(|r| async move { r.bytes().await });
        match self.run(read) {
            Ok(bytes) => Ok(Some(Vec::from(bytes))),
            Err(e @ object_store::Error::NotFound { .. }) if !is_no_such_bucket(&e) => Ok(None),
            Err(e) => Err(self.fail("read object", key, &e)),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>, Error> {
        let path = self.path(key)?;
        let short = |size| Error::ShortObject {
            key: key.to_string(),
            offset,
            len,
            size,
        };
        let Some(end) = offset.checked_add(len as u64) else {
            return Err(match self.size(key, &path)? {
                Some(size) => short(size),
                None => self.not_found(key),
            });
        };
        if len == 0 {
            // S3 has no empty range: the object's size says whether the offset is inside.
            return match self.size(key, &path)? {
                Some(size) if offset <= size => Ok(Vec::new()),
                Some(size) => Err(short(size)),
                None => Err(self.not_found(key)),
            };
        }
        let range = offset..end;
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            ..GetOptions::default()
        };
        let read = self.s3.get_opts(&path, opts).and_then(|r| async move {
            let size = r.meta.size;
            Ok((size, r.bytes().await?))
        });
        match self.run(read) {
            Ok((size, bytes)) if bytes.len() == len => {
                tracing::trace!(key, offset, len, size, "read range");
                Ok(Vec::from(bytes))
            }
            // The server returned less: the object ends before the range does.
            Ok((size, _)) => Err(short(size)),
            Err(e @ object_store::Error::NotFound { .. }) if !is_no_such_bucket(&e) => {
                Err(self.not_found(key))
            }
            // A range starting at or after the end is refused (416 InvalidRange); the
            // object's size tells that case from real failures.
            Err(e) => match classify(&e, self.target()) {
                failure @ S3Error::Request { .. } => {
                    let failure = failure.into_repository("read object", &self.location, key);
                    Err(self.range_error(key, &path, &range, failure))
                }
                failure => Err(failure.into_repository("read object", &self.location, key)),
            },
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, Error> {
        validate_prefix(prefix)?;
        let s3_prefix = self.s3_prefix(prefix);
        let mut keys = Vec::new();
        let mut page_token = None;
        loop {
            let opts = PaginatedListOptions {
                page_token: page_token.take(),
                ..PaginatedListOptions::default()
            };
            let page = self
                .run(self.s3.list_paginated(s3_prefix.as_deref(), opts))
                .map_err(|e| self.fail("list objects under", prefix, &e))?;
            for meta in page.result.objects {
                let location = meta.location.as_ref();
                // Objects whose names are not keys (written by other tools) are not
                // repository objects, as LocalStore skips files that are not.
                if let Some(key) = self.key_of(location)
                    && key.starts_with(prefix)
                    && validate_key(key).is_ok()
                {
                    keys.push(key.to_string());
                }
            }
            match page.page_token {
                Some(token) => page_token = Some(token),
                None => break,
            }
        }
        keys.sort();
        Ok(keys)
    }

    fn delete(&self, key: &str) -> Result<(), Error> {
        let path = self.path(key)?;
        match self.run(self.s3.delete(&path)) {
            Ok(()) => Ok(()),
            Err(e @ object_store::Error::NotFound { .. }) if !is_no_such_bucket(&e) => Ok(()),
            Err(e) => Err(self.fail("delete object", key, &e)),
        }
    }

    fn exists(&self, key: &str) -> Result<bool, Error> {
        let path = self.path(key)?;
        Ok(self.size(key, &path)?.is_some())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn validate_prefix_accepts_partial_components() {
        for ok in ["", "packs/", "packs/a", "packs/ab/abc", "index"] {
            validate_prefix(ok).unwrap();
        }
        for bad in ["/", "../", "a//b", "a/./", "a b", ".x"] {
            match validate_prefix(bad) {
                Err(Error::InvalidKey { key, .. }) => assert_eq!(key, bad),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
