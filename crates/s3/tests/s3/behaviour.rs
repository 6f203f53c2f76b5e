//! The ObjectStore contract on S3: the same scenario the repository crate runs against its
//! local and memory stores, plus what only S3 has (prefixes in a shared bucket, pages of
//! listings, large objects, the runtime). Each test runs against moto and versitygw.

use std::time::{Duration, Instant};

use klio_repository::{Error, ObjectStore};

use crate::moto::{S3Peer, open, runtime};
use crate::versitygw::on_both_servers;

fn store_with_prefix_behaves_like_the_local_and_memory_stores(server: &dyn S3Peer) {
    server.create_bucket("klio");
    let rt = runtime();
    let s = open(server, &rt, "klio", "team-a/cluster1");
    assert_eq!(s.location(), "s3://klio/team-a/cluster1");
    klio_repository::testing::exercise_store(&s);

    // The objects live under "<prefix>/" in the bucket.
    let whole = open(server, &rt, "klio", "");
    assert_eq!(whole.location(), "s3://klio");
    assert_eq!(
        whole.list("").unwrap(),
        vec![
            "team-a/cluster1/index/i1".to_string(),
            "team-a/cluster1/packs/ab/abc".to_string(),
            "team-a/cluster1/packs/ac/acd".to_string(),
        ]
    );
}

fn store_without_prefix_behaves_like_the_local_and_memory_stores(server: &dyn S3Peer) {
    server.create_bucket("klio-root");
    let rt = runtime();
    let s = open(server, &rt, "klio-root", "");
    klio_repository::testing::exercise_store(&s);
    // A trailing slash in the configured prefix is the same prefix.
    let slashed = open(server, &rt, "klio-root", "packs/");
    assert_eq!(slashed.location(), "s3://klio-root/packs");
    assert_eq!(slashed.list("").unwrap(), vec!["ab/abc", "ac/acd"]);
}

fn put_is_create_only_and_keeps_the_first_content(server: &dyn S3Peer) {
    server.create_bucket("klio");
    let rt = runtime();
    let s = open(server, &rt, "klio", "p");
    let first = vec![1u8; 100_000];
    s.put("config", &first).unwrap();
    s.put("config", b"second, shorter").unwrap();
    s.put("config", &[]).unwrap();
    assert_eq!(s.get("config").unwrap().unwrap(), first);
    // Through another handle too: nothing is cached.
    let other = open(server, &rt, "klio", "p");
    other.put("config", b"third").unwrap();
    assert_eq!(other.get("config").unwrap().unwrap(), first);
}

fn missing_objects_are_none_for_get_and_object_not_found_for_get_range(server: &dyn S3Peer) {
    server.create_bucket("klio");
    let rt = runtime();
    let s = open(server, &rt, "klio", "p");
    assert_eq!(s.get("packs/00/missing").unwrap(), None);
    assert!(!s.exists("packs/00/missing").unwrap());
    for (offset, len) in [(0, 1), (0, 0), (100, 10)] {
        match s.get_range("packs/00/missing", offset, len).unwrap_err() {
            Error::ObjectNotFound { location, key } => {
                assert_eq!(location, "s3://klio/p");
                assert_eq!(key, "packs/00/missing");
            }
            other => panic!("({offset}, {len}): {other}"),
        }
    }
    s.delete("packs/00/missing").unwrap();
}

fn get_range_beyond_the_end_is_a_short_object_error(server: &dyn S3Peer) {
    server.create_bucket("klio");
    let rt = runtime();
    let s = open(server, &rt, "klio", "");
    s.put("packs/01/p", b"0123456789").unwrap();
    assert_eq!(s.get_range("packs/01/p", 0, 10).unwrap(), b"0123456789");
    assert_eq!(s.get_range("packs/01/p", 9, 1).unwrap(), b"9");
    assert_eq!(s.get_range("packs/01/p", 10, 0).unwrap(), b"");
    // ending after the end, starting at it, starting after it, offset + len overflowing
    for (offset, len) in [(8, 3), (0, 11), (10, 1), (11, 0), (500, 4), (u64::MAX, 2)] {
        match s.get_range("packs/01/p", offset, len).unwrap_err() {
            Error::ShortObject {
                key,
                offset: o,
                len: l,
                size,
            } => {
                assert_eq!((key.as_str(), o, l, size), ("packs/01/p", offset, len, 10));
            }
            other => panic!("({offset}, {len}): {other}"),
        }
    }
    // An empty object has no byte to read.
    s.put("packs/01/empty", b"").unwrap();
    assert_eq!(s.get_range("packs/01/empty", 0, 0).unwrap(), b"");
    assert!(matches!(
        s.get_range("packs/01/empty", 0, 1).unwrap_err(),
        Error::ShortObject { size: 0, .. }
    ));
}

fn invalid_keys_are_refused(server: &dyn S3Peer) {
    server.create_bucket("klio");
    let rt = runtime();
    let s = open(server, &rt, "klio", "p");
    for bad in [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a//b",
        "a/./b",
        "a/",
        ".hidden",
        "a/.x.klio-tmp",
        "a b",
        "a\\b",
        "ä",
        "a?b",
        "a%2Fb",
    ] {
        let err = s.put(bad, b"x").unwrap_err();
        assert!(matches!(err, Error::InvalidKey { .. }), "{bad}: {err}");
        assert!(s.get(bad).is_err() && s.exists(bad).is_err(), "{bad}");
        assert!(
            s.delete(bad).is_err() && s.get_range(bad, 0, 1).is_err(),
            "{bad}"
        );
    }
    assert!(s.list("../").is_err());
    assert!(s.list("/").is_err());
    assert!(s.list("a b").is_err());
    assert!(open(server, &rt, "klio", "").list("").unwrap().is_empty());
}

fn prefixes_that_share_a_beginning_do_not_see_each_other(server: &dyn S3Peer) {
    server.create_bucket("klio");
    let rt = runtime();
    let a = open(server, &rt, "klio", "c1");
    let ab = open(server, &rt, "klio", "c10");
    a.put("config", b"a").unwrap();
    ab.put("config", b"ab").unwrap();
    ab.put("index/i", b"ab").unwrap();
    assert_eq!(a.list("").unwrap(), vec!["config"]);
    assert_eq!(ab.list("").unwrap(), vec!["config", "index/i"]);
    assert_eq!(a.get("config").unwrap().unwrap(), b"a");
    assert!(!a.exists("index/i").unwrap());
}

fn listing_reads_every_page(server: &dyn S3Peer) {
    // S3 returns at most 1000 keys per request.
    const KEYS: usize = 1234;
    server.create_bucket("klio");
    let rt = runtime();
    let s = open(server, &rt, "klio", "p");
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let s = &s;
            scope.spawn(move || {
                for i in (t..KEYS).step_by(4) {
                    s.put(&format!("index/{i:05}"), b"x").unwrap();
                }
            });
        }
    });
    s.put("other/x", b"x").unwrap();
    eprintln!("{KEYS} puts took {:?}", started.elapsed());
    let keys = s.list("index/").unwrap();
    let expected: Vec<String> = (0..KEYS).map(|i| format!("index/{i:05}")).collect();
    assert_eq!(keys, expected);
    assert_eq!(s.list("").unwrap().len(), KEYS + 1);
    assert_eq!(s.list("index/012").unwrap().len(), 34);
}

fn pack_sized_objects_roundtrip_in_one_put(server: &dyn S3Peer) {
    server.create_bucket("klio");
    let rt = runtime();
    let s = open(server, &rt, "klio", "p");
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let started = Instant::now();
    s.put("packs/aa/big", &data).unwrap();
    eprintln!("32 MiB put took {:?}", started.elapsed());
    let end = data.len() as u64;
    assert_eq!(
        s.get_range("packs/aa/big", end - 4096, 4096).unwrap(),
        &data[data.len() - 4096..]
    );
    assert_eq!(
        s.get_range("packs/aa/big", 12_345_678, 8192).unwrap(),
        &data[12_345_678..12_345_678 + 8192]
    );
    assert!(s.get("packs/aa/big").unwrap().unwrap() == data);
}

fn calls_from_blocking_threads_of_the_runtime_work(server: &dyn S3Peer) {
    server.create_bucket("klio");
    let rt = runtime();
    let s = std::sync::Arc::new(open(server, &rt, "klio", "p"));
    let got = rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let s = s.clone();
                tokio::task::spawn_blocking(move || {
                    let key = format!("wal/{i:02}");
                    s.put(&key, key.as_bytes()).unwrap();
                    s.get(&key).unwrap().unwrap()
                })
            })
            .collect();
        let mut got = Vec::new();
        for t in tasks {
            got.push(
                tokio::time::timeout(Duration::from_secs(60), t)
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        got
    });
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g, format!("wal/{i:02}").as_bytes());
    }

    // A current-thread runtime works while its own block_on drives it.
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg = server.config("klio", "p");
    let handle = current.handle().clone();
    let listed = current.block_on(async move {
        let task = tokio::task::spawn_blocking(move || {
            let s =
                klio_s3::S3Store::open_with_credentials(&cfg, handle, &crate::moto::credentials())
                    .unwrap();
            s.list("wal/").unwrap()
        });
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap()
            .unwrap()
    });
    assert_eq!(listed.len(), 8);
}

on_both_servers!(
    store_with_prefix_behaves_like_the_local_and_memory_stores,
    store_without_prefix_behaves_like_the_local_and_memory_stores,
    put_is_create_only_and_keeps_the_first_content,
    missing_objects_are_none_for_get_and_object_not_found_for_get_range,
    get_range_beyond_the_end_is_a_short_object_error,
    invalid_keys_are_refused,
    prefixes_that_share_a_beginning_do_not_see_each_other,
    listing_reads_every_page,
    pack_sized_objects_roundtrip_in_one_put,
    calls_from_blocking_threads_of_the_runtime_work,
);
