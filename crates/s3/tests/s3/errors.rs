//! Failures told precisely: a missing bucket, refused credentials, an unreachable endpoint,
//! a server that goes away.

use std::time::Instant;

use klio_repository::{Error, ObjectStore};
use klio_s3::{S3Config, S3Error, S3Store, s3_error};
use klio_test_support::free_port;

use crate::moto::{Moto, MotoOptions, S3Peer, credentials, open, runtime};
use crate::versitygw::{Versity, on_both_servers};

fn open_err(cfg: &S3Config, rt: &tokio::runtime::Runtime) -> Error {
    S3Store::open_with_credentials(cfg, rt.handle().clone(), &credentials()).unwrap_err()
}

fn missing_bucket_is_a_clear_error_naming_it(server: &dyn S3Peer) {
    server.create_bucket("other");
    let rt = runtime();
    let cfg = server.config("no-such-bucket", "p");
    let endpoint = cfg.endpoint.clone().unwrap();
    let err = open_err(&cfg, &rt);
    let text = err.to_string();
    match s3_error(&err) {
        Some(S3Error::BucketNotFound {
            bucket,
            endpoint: named,
        }) => {
            assert_eq!(bucket, "no-such-bucket");
            assert_eq!(*named, endpoint);
        }
        other => panic!("{other:?}: {text}"),
    }
    assert!(!s3_error(&err).unwrap().is_retryable());
    assert!(
        text.contains("bucket \"no-such-bucket\" does not exist")
            && text.contains(&endpoint)
            && text.contains("\nHINT: create the bucket"),
        "{text}"
    );
    eprintln!("{text}");
}

#[test]
fn bucket_deleted_after_open_is_reported_by_every_operation() {
    let moto = Moto::start();
    moto.create_bucket("gone");
    let rt = runtime();
    let s = open(&moto, &rt, "gone", "p");
    assert_eq!(moto.raw_request("DELETE", "/gone", b""), 204);
    let is_missing_bucket = |e: Error| matches!(s3_error(&e), Some(S3Error::BucketNotFound { .. }));
    assert!(is_missing_bucket(s.put("k", b"x").unwrap_err()));
    assert!(is_missing_bucket(s.get("k").unwrap_err()));
    assert!(is_missing_bucket(s.get_range("k", 0, 1).unwrap_err()));
    assert!(is_missing_bucket(s.list("").unwrap_err()));
}

#[test]
fn refused_credentials_are_access_denied_naming_the_bucket() {
    // moto checks credentials after the request that creates the bucket; it knows no keys.
    let moto = Moto::start_with(MotoOptions {
        unauthenticated_requests: Some(1),
        ..MotoOptions::default()
    });
    moto.create_bucket("locked");
    let rt = runtime();
    let err = open_err(&moto.config("locked", ""), &rt);
    let text = err.to_string();
    match s3_error(&err) {
        Some(S3Error::AccessDenied { bucket, code, .. }) => {
            assert_eq!(bucket, "locked");
            assert_eq!(code, "InvalidAccessKeyId");
        }
        other => panic!("{other:?}: {text}"),
    }
    assert!(
        text.contains("access to bucket \"locked\"")
            && text.contains(&moto.endpoint())
            && text.contains("\nHINT: check the S3 credentials"),
        "{text}"
    );
    eprintln!("{text}");
}

#[test]
fn unreachable_endpoint_fails_within_seconds_naming_it() {
    // Nothing listens on a port just found free.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let cfg = S3Config {
        bucket: "klio".into(),
        prefix: String::new(),
        endpoint: Some(endpoint.clone()),
        region: Some("us-east-1".into()),
        ca_bundle: None,
    };
    let rt = runtime();
    let started = Instant::now();
    let err = open_err(&cfg, &rt);
    let took = started.elapsed();
    let text = err.to_string();
    match s3_error(&err) {
        Some(e @ S3Error::Unreachable { endpoint: e2, .. }) => {
            assert_eq!(*e2, endpoint);
            assert!(e.is_retryable());
        }
        other => panic!("{other:?}: {text}"),
    }
    assert!(err.is_retryable());
    assert!(
        text.contains(&format!(
            "S3 endpoint \"{endpoint}\" of bucket \"klio\" is unreachable"
        )) && text.contains("\nHINT: check the endpoint URL"),
        "{text}"
    );
    eprintln!("after {took:?}: {text}");
}

#[test]
fn operations_fail_within_seconds_when_the_server_goes_away() {
    let mut moto = Moto::start();
    moto.create_bucket("klio");
    let rt = runtime();
    let s = open(&moto, &rt, "klio", "p");
    s.put("wal/1", b"x").unwrap();
    moto.kill();
    let started = Instant::now();
    let err = s.put("wal/2", b"y").unwrap_err();
    eprintln!("put failed after {:?}", started.elapsed());
    let text = err.to_string();
    assert!(
        matches!(s3_error(&err), Some(S3Error::Unreachable { .. })),
        "{text}"
    );
    assert!(
        text.starts_with("could not write object \"wal/2\" in repository \"s3://klio/p\": "),
        "{text}"
    );
    assert!(matches!(
        s3_error(&s.get("wal/1").unwrap_err()),
        Some(S3Error::Unreachable { .. })
    ));
}

#[test]
fn invalid_configuration_is_refused_naming_the_option() {
    let rt = runtime();
    let base = S3Config {
        bucket: "klio".into(),
        endpoint: Some("http://127.0.0.1:9".into()),
        ..S3Config::default()
    };
    for (cfg, option) in [
        (
            S3Config {
                bucket: String::new(),
                ..base.clone()
            },
            "bucket",
        ),
        (
            S3Config {
                prefix: "a/../b".into(),
                ..base.clone()
            },
            "prefix",
        ),
        (
            S3Config {
                endpoint: Some("minio:9000".into()),
                ..base.clone()
            },
            "endpoint",
        ),
    ] {
        match open_err(&cfg, &rt) {
            Error::InvalidOption { option: o, reason } => {
                assert_eq!(o, option, "{reason}");
            }
            other => panic!("{cfg:?}: {other}"),
        }
    }
}

on_both_servers!(missing_bucket_is_a_clear_error_naming_it);

#[test]
fn wrong_secret_is_access_denied_on_versitygw() {
    // versitygw checks every signature: a wrong secret is refused at open.
    let server = Versity::start();
    server.create_bucket("locked");
    let rt = runtime();
    let err = S3Store::open_with_credentials(
        &server.config("locked", ""),
        rt.handle().clone(),
        &klio_s3::S3Credentials {
            secret_access_key: "not the secret".to_string(),
            ..credentials()
        },
    )
    .unwrap_err();
    let text = err.to_string();
    match s3_error(&err) {
        Some(S3Error::AccessDenied { bucket, code, .. }) => {
            assert_eq!(bucket, "locked");
            assert_eq!(code, "SignatureDoesNotMatch");
        }
        other => panic!("{other:?}: {text}"),
    }
    assert!(text.contains("\nHINT: check the S3 credentials"), "{text}");
}

/// A proxy in front of `port` that renames the `if-none-match` request header, as a server
/// that ignores conditional writes would; returns its port.
fn strip_conditions_proxy(port: u16) -> u16 {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(("127.0.0.1", port)) else {
                return;
            };
            let (mut client_r, mut server_w) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = client_r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    // Same length, so Content-Length and framing are unchanged.
                    let mut chunk = buf[..n].to_vec();
                    while let Some(at) = chunk
                        .windows(13)
                        .position(|w| w.eq_ignore_ascii_case(b"if-none-match"))
                    {
                        chunk[at..at + 13].copy_from_slice(b"x-ignored-cnd");
                    }
                    if server_w.write_all(&chunk).is_err() {
                        break;
                    }
                }
                let _ = server_w.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    proxy_port
}

#[test]
fn a_server_that_ignores_conditional_writes_is_refused_by_the_check() {
    let moto = Moto::start();
    moto.create_bucket("klio");
    let rt = runtime();
    // Moto honours the condition: the check passes and leaves nothing behind.
    let s = open(&moto, &rt, "klio", "write-check");
    s.check_create_only("k1").unwrap();
    assert!(s.list("").unwrap().is_empty());

    let mut cfg = moto.config("klio", "write-check");
    cfg.endpoint = Some(format!(
        "http://127.0.0.1:{}",
        strip_conditions_proxy(moto.port())
    ));
    let s = S3Store::open_with_credentials(&cfg, rt.handle().clone(), &credentials()).unwrap();
    let err = s.check_create_only("k2").unwrap_err();
    let text = err.to_string();
    match s3_error(&err) {
        Some(S3Error::Unsupported { feature, .. }) => {
            assert!(feature.contains("If-None-Match"), "{feature}");
        }
        other => panic!("{other:?}: {text}"),
    }
    assert!(
        text.contains("does not support conditional writes"),
        "{text}"
    );
    assert!(
        s.list("").unwrap().is_empty(),
        "the check removes its object"
    );
}
