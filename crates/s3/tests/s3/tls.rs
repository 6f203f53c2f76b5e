//! S3 over TLS with a private CA: trusted through the CA bundle, refused clearly without it.

use std::time::Instant;

use klio_repository::{Error, ObjectStore};
use klio_s3::{S3Config, S3Error, S3Store, s3_error};

use crate::moto::{Moto, credentials, runtime};

#[test]
fn tls_endpoint_works_with_the_ca_bundle() {
    let moto = Moto::start_tls();
    moto.create_bucket("secure");
    let rt = runtime();
    let cfg = moto.config("secure", "p");
    assert!(cfg.endpoint.as_deref().unwrap().starts_with("https://"));
    let s = S3Store::open_with_credentials(&cfg, rt.handle().clone(), &credentials())
        .unwrap_or_else(|e| panic!("{e}\n{}", moto.log()));
    s.put("index/a", b"over tls").unwrap();
    assert_eq!(s.get("index/a").unwrap().unwrap(), b"over tls");
    assert_eq!(s.list("").unwrap(), vec!["index/a"]);
}

#[test]
fn tls_endpoint_without_the_ca_bundle_is_certificate_not_trusted() {
    let moto = Moto::start_tls();
    moto.create_bucket("secure");
    let rt = runtime();
    let cfg = S3Config {
        ca_bundle: None,
        ..moto.config("secure", "p")
    };
    let started = Instant::now();
    let err =
        S3Store::open_with_credentials(&cfg, rt.handle().clone(), &credentials()).unwrap_err();
    let took = started.elapsed();
    let text = err.to_string();
    match s3_error(&err) {
        Some(e @ S3Error::CertificateNotTrusted { endpoint, .. }) => {
            assert_eq!(*endpoint, moto.endpoint());
            assert!(!e.is_retryable());
        }
        other => panic!("{other:?}: {text}"),
    }
    assert!(
        text.contains(&format!(
            "the TLS certificate of S3 endpoint \"{}\" is not trusted",
            moto.endpoint()
        )) && text.contains("\nHINT: give the PEM file of the CA"),
        "{text}"
    );
    eprintln!("after {took:?}: {text}");
}

#[test]
fn plain_http_to_a_tls_endpoint_and_tls_to_a_plain_one_fail_clearly() {
    let moto = Moto::start();
    moto.create_bucket("plain");
    let rt = runtime();
    let cfg = S3Config {
        endpoint: Some(format!("https://127.0.0.1:{}", moto.port())),
        ..moto.config("plain", "")
    };
    let err =
        S3Store::open_with_credentials(&cfg, rt.handle().clone(), &credentials()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(s3_error(&err), Some(S3Error::Tls { .. })),
        "{:?}: {text}",
        s3_error(&err)
    );
    eprintln!("{text}");

    let tls = Moto::start_tls();
    tls.create_bucket("secure");
    let cfg = S3Config {
        endpoint: Some(format!("http://127.0.0.1:{}", tls.port())),
        ..tls.config("secure", "")
    };
    let started = Instant::now();
    let err =
        S3Store::open_with_credentials(&cfg, rt.handle().clone(), &credentials()).unwrap_err();
    let took = started.elapsed();
    let text = err.to_string();
    assert!(
        matches!(s3_error(&err), Some(S3Error::ConnectionBroken { .. })),
        "{text}"
    );
    assert!(text.contains("check that the endpoint's scheme"), "{text}");
    eprintln!("after {took:?}: {text}");
}

#[test]
fn ca_bundle_that_is_missing_or_not_pem_is_refused() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let cfg = |path| S3Config {
        bucket: "klio".into(),
        endpoint: Some("https://127.0.0.1:9".into()),
        ca_bundle: Some(path),
        ..S3Config::default()
    };
    match S3Store::open_with_credentials(&cfg(not_pem), rt.handle().clone(), &credentials())
        .unwrap_err()
    {
        Error::InvalidOption { option, reason } => {
            assert_eq!(option, "ca_bundle");
            assert!(reason.contains("ca.pem"), "{reason}");
        }
        other => panic!("{other}"),
    }
    let missing = dir.path().join("missing.pem");
    match S3Store::open_with_credentials(&cfg(missing), rt.handle().clone(), &credentials())
        .unwrap_err()
    {
        Error::Io { action, key, .. } => {
            assert_eq!(action, "read CA bundle");
            assert!(key.ends_with("missing.pem"), "{key}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn store_reports_its_location_and_endpoint() {
    let moto = Moto::start_tls();
    moto.create_bucket("secure");
    let rt = runtime();
    let s = S3Store::open_with_credentials(
        &moto.config("secure", "a/b"),
        rt.handle().clone(),
        &credentials(),
    )
    .unwrap();
    assert_eq!(s.location(), "s3://secure/a/b");
    assert_eq!(s.bucket(), "secure");
    assert_eq!(s.endpoint(), moto.endpoint());
}
