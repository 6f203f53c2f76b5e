//! End-to-end: authorization from client certificates, and clear errors that lose nothing
//! on bad input.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use klio_test_support::{PgCluster, PgOptions, scratch_dir};

/// Streams a little WAL for `cluster` from a fresh PostgreSQL and returns the first
/// complete archived segment's name.
fn archive_some_wal(k: &Klio, cluster: &str, pg: &PgCluster) -> anyhow::Result<String> {
    let _s = k.spawn_streamer(cluster, pg, &format!("streamer-{cluster}"), &[])?;
    pg.psql("CREATE TABLE t AS SELECT generate_series(1, 10000) AS i")?;
    let end = switch_wal(pg)?;
    k.wait_archived(cluster, 1, end, Duration::from_secs(60))
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", k.log(&format!("streamer-{cluster}"))))?;
    let files = k.wal_list(cluster)?;
    let first = files["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .find(|f| f.len() == 24);
    Ok(first.expect("a complete segment").to_string())
}

#[test]
fn certificates_only_reach_their_own_cluster() -> anyhow::Result<()> {
    let k = Klio::start(&["a", "b"])?;
    let pg = PgCluster::start(PgOptions::default())?;
    let seg = archive_some_wal(&k, "a", &pg)?;
    let out = scratch_dir();
    let dest = out.path().join("x");

    // b's certificate cannot read a's archive...
    let mut cmd = klio();
    cmd.arg("wal-get")
        .args(k.client_args_with_cert("a", "client-b"))
        .arg(&seg)
        .arg(&dest);
    let o = cmd.output()?;
    assert_eq!(o.status.code(), Some(200));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("klio@b") && err.contains("\"a\""), "{err}");
    assert!(!dest.exists());
    // ...nor list it, nor stream into it.
    let mut cmd = klio();
    cmd.arg("wal-list")
        .args(k.client_args_with_cert("a", "client-b"));
    let o = cmd.output()?;
    assert!(!o.status.success());
    let pg2 = PgCluster::start(PgOptions::default())?;
    let mut cmd = klio();
    cmd.arg("wal-stream")
        .args(k.client_args_with_cert("a", "client-b"))
        .args(["--pg-dsn", &pg2.dsn()]);
    let o = cmd.output()?;
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("may not access cluster"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The snapshot reader certificate cannot read WAL either.
    let mut cmd = klio();
    cmd.arg("wal-get")
        .args(k.client_args_with_cert("a", "snapshot-reader"))
        .arg(&seg)
        .arg(&dest);
    assert_eq!(cmd.output()?.status.code(), Some(200));

    // A certificate from another CA is refused.
    let other = scratch_dir();
    run_ok(
        klio()
            .args(["pki", "init"])
            .arg(other.path())
            .args(["--cluster", "a"]),
    )?;
    let mut args = k.client_args("a");
    let pos = args.iter().position(|a| a == "--client-cert").unwrap();
    args[pos + 1] = other.path().join("client-a.crt").display().to_string();
    args[pos + 3] = other.path().join("client-a.key").display().to_string();
    let o = klio()
        .arg("wal-get")
        .args(&args)
        .arg(&seg)
        .arg(&dest)
        .output()?;
    assert_eq!(
        o.status.code(),
        Some(200),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Plain TCP gets no gRPC answer: the server speaks TLS only.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", k.port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")?;
    let mut buf = [0u8; 64];
    let n = tcp.read(&mut buf).unwrap_or(0);
    assert!(
        !buf[..n].windows(4).any(|w| w == b"HTTP"),
        "plain HTTP/2 must not be served"
    );

    // (A TLS client without a certificate, or limited to TLS 1.2, is refused in the
    // handshake: covered by klio-tls's tests against the same server configuration.)
    // And the legitimate client still works.
    let o = k.wal_get("a", &seg, &dest, &[])?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Ok(())
}

#[test]
fn corruption_missing_files_unknown_clusters_and_wrong_key_are_clear_errors() -> anyhow::Result<()>
{
    let mut k = Klio::start(&["c", "ghost"])?;
    let pg = PgCluster::start(PgOptions::default())?;
    let seg = archive_some_wal(&k, "c", &pg)?;
    let out = scratch_dir();

    // Missing file: exit 1, as PostgreSQL expects.
    let dest = out.path().join("missing");
    let o = k.wal_get("c", "0000000100000000000000FF", &dest, &[])?;
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!dest.exists());

    // Unknown cluster: an error, not "not found".
    let o = k.wal_get("ghost", &seg, &dest, &[])?;
    assert_eq!(o.status.code(), Some(200));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown cluster \"ghost\""),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Flip one byte of the archived segment: wal-get names it, says corrupt, writes nothing.
    let path = k.data.join("wal/c/00000001").join(&seg);
    let mut bytes = std::fs::read(&path)?;
    let i = bytes.len() / 2;
    bytes[i] ^= 0x20;
    std::fs::write(&path, &bytes)?;
    let dest = out.path().join("corrupt");
    let o = k.wal_get("c", &seg, &dest, &["--prefetch", "0"])?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(200), "{err}");
    assert!(err.contains(&seg) && err.contains("corrupt"), "{err}");
    assert!(!dest.exists());
    // Truncated: same.
    std::fs::write(&path, &bytes[..bytes.len() - 100])?;
    let o = k.wal_get("c", &seg, &dest, &["--prefetch", "0"])?;
    assert_eq!(o.status.code(), Some(200));
    assert!(!dest.exists());

    // Another database claiming the same cluster name is refused by name.
    let impostor = PgCluster::start(PgOptions::default())?;
    let mut cmd = klio();
    cmd.arg("wal-stream")
        .args(k.client_args("c"))
        .args(["--pg-dsn", &impostor.dsn()]);
    let o = cmd.output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("database system"), "{err}");

    // Wrong encryption key: the server refuses to start and says why; the key file is untouched.
    k.kill_server()?;
    let keys_before = std::fs::read(k.data.join("keys.json"))?;
    std::fs::write(&k.key_file, "another key entirely")?;
    let o = k.server_command().output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("encryption key") && err.contains("keys.json"),
        "{err}"
    );
    assert_eq!(std::fs::read(k.data.join("keys.json"))?, keys_before);
    Ok(())
}

/// The slot is dropped while the streamer is down; PostgreSQL still has the WAL: the
/// streamer recreates the slot and continues without a gap.
#[test]
fn dropped_slot_is_recreated_without_gap() -> anyhow::Result<()> {
    let k = Klio::start(&["s"])?;
    let pg = PgCluster::start(PgOptions::default())?;
    archive_some_wal(&k, "s", &pg)?;
    // The walsender of the killed streamer may take a moment to notice.
    klio_test_support::wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        "the replication slot to be dropped",
        || Ok(pg.psql("SELECT pg_drop_replication_slot('klio')").is_ok()),
    )?;
    pg.psql("CREATE TABLE more AS SELECT generate_series(1, 50000) AS i")?;
    let end = switch_wal(&pg)?;
    let _s = k.spawn_streamer("s", &pg, "again", &[])?;
    k.wait_archived("s", 1, end, Duration::from_secs(60))
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", k.log("again")))?;
    assert!(
        k.log("again").contains("slot is missing"),
        "{}",
        k.log("again")
    );
    let files: Vec<String> = k.archived_files("s")?.into_iter().collect();
    let segnos: Vec<u64> = files
        .iter()
        .filter(|f| f.len() == 24)
        .map(|f| u64::from_str_radix(&f[16..], 16).unwrap())
        .collect();
    for w in segnos.windows(2) {
        assert_eq!(w[1], w[0] + 1, "hole in {files:?}");
    }
    Ok(())
}
