//! versitygw (a production S3 gateway, posix backend) as the second server of the store's
//! contract tests, and a macro running a test against both servers.

use klio_s3::S3Config;
use klio_test_support::VersityGw;
use tempfile::TempDir;

use crate::moto::{Moto, S3Peer};

/// A running versitygw with its objects in a temporary directory.
pub struct Versity {
    gw: VersityGw,
    _dir: TempDir,
}

impl Versity {
    pub fn start() -> Versity {
        let dir = tempfile::tempdir().unwrap();
        Versity {
            gw: VersityGw::start(dir.path()),
            _dir: dir,
        }
    }
}

impl S3Peer for Versity {
    fn create_bucket(&self, bucket: &str) {
        self.gw.create_bucket(bucket)
    }

    fn config(&self, bucket: &str, prefix: &str) -> S3Config {
        S3Config {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: Some(self.gw.endpoint()),
            region: Some("us-east-1".to_string()),
            ca_bundle: None,
        }
    }

    /// On the posix backend an object is a file: rewritten in place.
    fn overwrite_object(
        &self,
        _rt: &tokio::runtime::Runtime,
        bucket: &str,
        name: &str,
        data: Vec<u8>,
    ) {
        let path = self.gw.bucket_dir(bucket).join(name);
        assert!(path.is_file(), "no object {name} at {}", path.display());
        std::fs::write(path, data).unwrap();
    }

    fn log(&self) -> String {
        self.gw.log()
    }
}

/// The servers a contract test runs against, by name.
pub fn start(server: &str) -> Box<dyn S3Peer> {
    match server {
        "moto" => Box::new(Moto::start()),
        "versitygw" => Box::new(Versity::start()),
        other => unreachable!("no S3 server {other}"),
    }
}

/// For each `fn name(server: &dyn S3Peer)`, a module `name` with one test per server
/// (`name::moto`, `name::versitygw`).
macro_rules! on_both_servers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn moto() {
                super::$name(&*crate::versitygw::start("moto"));
            }
            #[test]
            fn versitygw() {
                super::$name(&*crate::versitygw::start("versitygw"));
            }
        }
    )*};
}
pub(crate) use on_both_servers;
