//! A server TLS configuration rebuilt when its files change, so renewed certificates (cert-
//! manager renews them every 60 to 90 days), a new client CA or a new revocation list take
//! effect for new handshakes without a restart.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use rustls::ServerConfig;

use crate::{ConfigProvider, Error};

/// Size and modification time of each file (`None`: unreadable).
type Stamp = Vec<Option<(SystemTime, u64)>>;

type Build = dyn Fn() -> Result<Arc<ServerConfig>, Error> + Send + Sync;

/// Rebuilds the configuration when a file's size or modification time changes; keeps the
/// last good one (and says why) while a rotation is half-written or broken.
pub struct FileReloader {
    files: Vec<PathBuf>,
    build: Box<Build>,
    /// What the configuration is for, in log messages.
    what: String,
    current: Mutex<(Stamp, Arc<ServerConfig>)>,
}

fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

impl FileReloader {
    /// Builds the configuration once (a bad file stops the start) and watches `files`, from
    /// which `build` reads it.
    pub fn new(
        what: &str,
        files: Vec<PathBuf>,
        build: impl Fn() -> Result<Arc<ServerConfig>, Error> + Send + Sync + 'static,
    ) -> Result<Arc<FileReloader>, Error> {
        let s = stamp(&files);
        let first = build()?;
        Ok(Arc::new(FileReloader {
            files,
            build: Box::new(build),
            what: what.to_string(),
            current: Mutex::new((s, first)),
        }))
    }

    /// The configuration for the next handshake.
    pub fn get(&self) -> Arc<ServerConfig> {
        let s = stamp(&self.files);
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.0 == s {
            return current.1.clone();
        }
        match (self.build)() {
            Ok(c) => {
                tracing::info!(what = %self.what, "certificate files changed; new handshakes use them");
                *current = (s, c.clone());
                c
            }
            Err(e) => {
                tracing::error!(what = %self.what, error = %e, "cannot load the changed certificate files; keeping the previous ones");
                // Remembered, so a broken file is reported once, not at every handshake.
                current.0 = s;
                current.1.clone()
            }
        }
    }

    /// A provider for [`crate::tls_incoming_reloading`].
    pub fn provider(self: &Arc<Self>) -> ConfigProvider {
        let me = self.clone();
        Arc::new(move || Some(me.get()))
    }
}
