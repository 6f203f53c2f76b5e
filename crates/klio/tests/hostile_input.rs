//! Hostile input against a real server: what a queue writer, a stolen cluster certificate or a
//! broken client can send must be refused with a precise error, change nothing stored and not
//! exhaust the server.
//!
//! - a NATS task whose cluster climbs out of the relay's directory (`../keys`) is
//!   dead-lettered without running, and the key files are untouched;
//! - `GetBlocks` naming one 1 MiB block 1,500 times is refused before anything is read (the
//!   server's memory stays small), and a repeated id within the answer's budget is read once
//!   and served;
//! - a WAL name with a multibyte character and WAL data ending past the last LSN get
//!   `INVALID_ARGUMENT`, not a panic;
//! - garbage collection spans every cluster: only `admin@klio` may run it; the snapshot
//!   reader may not verify (it reads every block) nor read a cluster's status; `klio` is
//!   no cluster name.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use klio_proto::backup::v1::{self as pb, backup_client::BackupClient};
use klio_proto::wal::v1 as wal;
use klio_queue::{NatsQueue, RetryPolicy, Task, WorkQueue, kinds};
use klio_test_support::{Moto, NatsServer, scratch_dir, wait_until};

/// Peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

#[test]
fn a_queue_task_naming_a_path_is_dead_lettered_and_writes_nothing() -> anyhow::Result<()> {
    let scratch = scratch_dir();
    let moto = Moto::start(&scratch.path().join("moto.log"));
    moto.create_bucket("hostile");
    let key2 = tier2_key(
        &scratch,
        "tier2.key",
        "a tier 2 passphrase of some length\n",
    );
    let nats = NatsServer::start(&scratch.path().join("jetstream"));
    let mut flags = tier2_flags(&moto.endpoint(), "hostile", &key2);
    flags.extend(["--queue-nats-url".to_string(), nats.url()]);
    let mut k = Klio::start_with(&["pg"], flags)?;
    let keys = [
        k.data.join("keys.json"),
        k.data.join("repository").join("keys"),
    ];
    let before: Vec<Option<Vec<u8>>> = keys.iter().map(|p| std::fs::read(p).ok()).collect();
    assert!(
        before[0].is_some(),
        "the server keeps its key file at {:?}",
        keys[0]
    );

    // Anyone who can publish to NATS: tasks whose cluster is a path.
    let rt = tokio::runtime::Runtime::new()?;
    let ids = ["evil-keys", "evil-repository-keys", "evil-kind"];
    rt.block_on(async {
        let q = NatsQueue::connect(&nats.url(), &RetryPolicy::default()).await?;
        for t in [
            Task::new(ids[0], kinds::WAL_RELAY, "../keys", serde_json::json!({})),
            Task::new(
                ids[1],
                kinds::WAL_RELAY,
                "../repository/keys",
                serde_json::json!({}),
            ),
            Task::new(ids[2], "rm-rf", "pg", serde_json::json!({})),
        ] {
            q.enqueue(t).await?;
        }
        anyhow::Ok(())
    })?;
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "the invalid tasks to reach the dead-letter list",
        || {
            let out = admin_queue(&k, &["list-failed", "--json"])?;
            let listed = String::from_utf8_lossy(&out.stdout).into_owned();
            Ok(ids.iter().all(|id| listed.contains(id)))
        },
    )
    .map_err(|e| e.context(tail(&k.server_log(), 40)))?;
    let out = admin_queue(&k, &["list-failed", "--json"])?;
    let failed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let text = failed.to_string();
    assert!(text.contains("cluster name"), "{text}");
    assert!(text.contains("unknown kind"), "{text}");
    let after: Vec<Option<Vec<u8>>> = keys.iter().map(|p| std::fs::read(p).ok()).collect();
    assert_eq!(before, after, "the key files are untouched");
    assert!(
        !k.server_log().contains("could not record relay progress"),
        "the invalid tasks never ran"
    );
    // And the server still starts on its data directory.
    k.kill_server()?;
    k.start_server()?;
    Ok(())
}

#[tokio::test]
async fn get_blocks_repeating_an_id_is_read_once_or_refused_within_budget() -> anyhow::Result<()> {
    let k = Klio::start(&["a"])?;
    let mut c = BackupClient::new(k.grpc_channel(k.base_port, "client-a").await)
        .max_decoding_message_size(klio_proto::limits::MAX_BACKUP_MESSAGE);
    let b = c
        .begin(pb::BeginRequest {
            cluster: "a".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let key: [u8; 32] = b.block_id_key.as_ref().try_into()?;
    // 1 MiB that does not compress.
    let mut data = Vec::with_capacity(1 << 20);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    while data.len() < 1 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let id = *blake3::keyed_hash(&key, &data).as_bytes();
    c.put_blocks(pb::PutBlocksRequest {
        session_id: b.session_id.clone(),
        blocks: vec![pb::Block {
            id: id.to_vec().into(),
            plain_len: data.len() as u32,
            compressed: false,
            data: data.clone().into(),
            ..Default::default()
        }],
    })
    .await?;
    c.commit(pb::CommitRequest {
        session_id: b.session_id,
        metadata_json: b"{}".to_vec().into(),
        files: vec![pb::FileEntry {
            path: "big".into(),
            size: data.len() as u64,
            mode: 0o600,
            kind: pb::file_entry::Kind::File as i32,
            block_ids: id.to_vec().into(),
            ..Default::default()
        }],
    })
    .await?;

    let pid = k.server_pid().expect("the server runs");
    let err = c
        .get_blocks(pb::GetBlocksRequest {
            cluster: "a".into(),
            ids: id.repeat(1500).into(),
            ..Default::default()
        })
        .await
        .expect_err("1,500 MiB cannot be one answer");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("ask for fewer blocks"),
        "{}",
        err.message()
    );
    // Read once, served forty times.
    let got = c
        .get_blocks(pb::GetBlocksRequest {
            cluster: "a".into(),
            ids: id.repeat(40).into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(got.blocks.len(), 40);
    assert!(
        got.blocks
            .iter()
            .all(|b| b.data.as_ref() == data.as_slice())
    );
    let peak = peak_rss_mib(pid);
    assert!(peak < 256, "the server's peak memory is {peak} MiB");
    Ok(())
}

#[tokio::test]
async fn multibyte_wal_names_and_lsn_overflow_are_invalid_arguments() -> anyhow::Result<()> {
    let k = Klio::start(&["a"])?;
    let mut w = wal::wal_client::WalClient::new(k.grpc_channel(k.port, "client-a").await);
    w.hello(wal::HelloRequest {
        cluster: "a".into(),
        system_id: 42,
        segment_size: 16 << 20,
        tier2_backup: false,
    })
    .await?;
    // 22 ASCII characters and one of two bytes: 24 bytes, the length of a segment name.
    let name = "0000000100000000000000é";
    assert_eq!(name.len(), 24);
    let err = w
        .get(wal::GetRequest {
            cluster: "a".into(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .expect_err("not a WAL name");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let start = u64::MAX - (u64::MAX % (16 << 20));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(wal::StreamRequest {
        msg: Some(wal::stream_request::Msg::Open(wal::StreamOpen {
            cluster: "a".into(),
            system_id: 42,
            timeline: 1,
            start_lsn: start,
            tier2_backup: false,
        })),
    })
    .await?;
    tx.send(wal::StreamRequest {
        msg: Some(wal::stream_request::Msg::Data(wal::WalData {
            start_lsn: u64::MAX - 10,
            data: vec![0u8; 100].into(),
            flush_now: true,
            primary_end_lsn: 0,
        })),
    })
    .await?;
    let mut acks = w
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let err = loop {
        match acks.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without refusing the data"),
            Err(e) => break e,
        }
    };
    drop(tx);
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("past the last possible LSN"),
        "{}",
        err.message()
    );
    Ok(())
}

#[test]
fn repository_wide_operations_belong_to_the_administrator() -> anyhow::Result<()> {
    let k = Klio::start(&["a"])?;
    let out = k.client_command(&["gc", "plan", "--json"], "a").output()?;
    assert!(!out.status.success());
    let text = output_text(&out);
    assert!(
        text.contains("may not run garbage collection") && text.contains("admin@klio"),
        "{text}"
    );
    let out = k
        .client_command_with_cert(&["gc", "plan", "--json"], "a", "admin")
        .output()?;
    assert!(out.status.success(), "{}", output_text(&out));
    // The snapshot reader reads the catalog only: not every block, not a cluster's state.
    for command in [&["verify"][..], &["status", "--json"]] {
        let out = k
            .client_command_with_cert(command, "a", "snapshot-reader")
            .output()?;
        assert!(!out.status.success(), "{command:?}");
        assert!(
            output_text(&out).contains("snapshot_reader@klio"),
            "{command:?}: {}",
            output_text(&out)
        );
    }
    // `klio` names Klio's own certificates, never a cluster, even for them.
    let out = k
        .client_command_with_cert(&["backups", "list", "--json"], "klio", "admin")
        .output()?;
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("reserved"),
        "{}",
        output_text(&out)
    );
    Ok(())
}

#[test]
fn garbage_collection_sweeps_stale_temporary_files_and_spares_recent_ones() -> anyhow::Result<()> {
    let k = Klio::start(&["a"])?;
    // A failed write's leftover (two hours old) and a write in progress (now), as the
    // durable writer names them.
    let dir = k.data.join("repository");
    let (stale, recent) = (dir.join(".p.7.1.klio-tmp"), dir.join(".p.7.2.klio-tmp"));
    std::fs::write(&stale, b"half a pack")?;
    std::fs::write(&recent, b"being written")?;
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options()
        .write(true)
        .open(&stale)?
        .set_modified(two_hours_ago)?;
    // A plan removes nothing.
    let out = k
        .client_command_with_cert(&["gc", "plan", "--json"], "a", "admin")
        .output()?;
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(stale.exists());
    let out = k
        .client_command_with_cert(&["gc", "run", "--json"], "a", "admin")
        .output()?;
    assert!(out.status.success(), "{}", output_text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["temp_files_removed"], 1, "{report}");
    assert!(!stale.exists() && recent.exists());
    Ok(())
}

#[test]
fn a_second_server_on_the_same_data_directory_stops_before_touching_it() -> anyhow::Result<()> {
    let k = Klio::start(&["a"])?;
    let out = k.server_command().output()?;
    assert!(!out.status.success());
    let text = output_text(&out);
    assert!(
        text.contains("another Klio server is using the data directory"),
        "{text}"
    );
    // The first one serves on.
    assert!(k.backups_list("a")?.is_empty());
    Ok(())
}

/// A NATS that requires a token over TLS: without the token the server does not start (and
/// says why), with it the queue works; credentials in the URL never show in the server's
/// messages.
#[test]
fn the_nats_queue_is_reached_with_credentials_over_tls_and_never_shows_them() -> anyhow::Result<()>
{
    let scratch = scratch_dir();
    // A CA and a server certificate for 127.0.0.1 (Klio's development PKI will do).
    let pki = scratch.path().join("nats-pki");
    run_ok(klio().args(["pki", "init"]).arg(&pki))?;
    let (crt, key, ca_crt) = (
        pki.join("server.crt"),
        pki.join("server.key"),
        pki.join("ca.crt"),
    );
    let token = "nats-token-0f1e2d3c4b5a";
    let nats = NatsServer::start_with(
        &scratch.path().join("jetstream"),
        &[
            "--tls",
            "--tlscert",
            &crt.display().to_string(),
            "--tlskey",
            &key.display().to_string(),
            "--auth",
            token,
        ],
    );
    let ca = [
        "--queue-nats-ca-file".to_string(),
        ca_crt.display().to_string(),
    ];
    let url = |u: String| vec!["--queue-nats-url".to_string(), u];

    let refused = Klio::start_with(&["pg"], [url(nats.url()), ca.to_vec()].concat())
        .err()
        .expect("no token, no queue");
    let text = format!("{refused:#}").to_lowercase();
    assert!(
        text.contains("nats") && text.contains("authorization"),
        "{text}"
    );

    let token_file = scratch.path().join("nats.token");
    std::fs::write(&token_file, format!("{token}\n"))?;
    let k = Klio::start_with(
        &["pg"],
        [
            url(nats.url()),
            ca.to_vec(),
            vec![
                "--queue-nats-token-file".to_string(),
                token_file.display().to_string(),
            ],
        ]
        .concat(),
    )?;
    let status = queue_status(&k)?;
    assert!(status.to_string().contains("127.0.0.1"), "{status}");
    drop(k);

    // A user and password in the URL work too, and are redacted wherever the URL is shown.
    let password = "nats-password-9a8b7c6d";
    let plain = NatsServer::start_with(
        &scratch.path().join("jetstream-users"),
        &["--user", "klio", "--pass", password],
    );
    let with_secret = plain
        .url()
        .replace("nats://", &format!("nats://klio:{password}@"));
    let k = Klio::start_with(&["pg"], url(with_secret))?;
    let status = queue_status(&k)?.to_string();
    assert!(status.contains("***@127.0.0.1"), "{status}");
    assert!(!status.contains(password), "{status}");
    assert!(
        !k.server_log().contains(password),
        "the server log shows the password"
    );
    Ok(())
}

/// Certificates rotate and revocations apply without a restart: a client certificate added
/// to the CA's revocation list is refused at its next connection; a whole new CA, server
/// certificate and client certificate written over the old files are used by the next
/// handshake.
#[test]
fn revoked_client_certificates_are_refused_and_rotations_need_no_restart() -> anyhow::Result<()> {
    let mut k = Klio::start(&["a", "b"])?;
    let pki = k.pki.clone();
    let revoke = |cert: &str| run_ok(klio().args(["pki", "revoke"]).arg(&pki).arg(pki.join(cert)));
    revoke("snapshot-reader.crt")?;
    let crl = pki.join("crl.pem");
    k.server_extra
        .extend(["--client-crl".to_string(), crl.display().to_string()]);
    k.kill_server()?;
    k.start_server()?;
    assert!(k.backups_list("a")?.is_empty());
    assert!(k.backups_list("b")?.is_empty());

    revoke("client-a.crt")?;
    let err = k.backups_list("a").expect_err("a revoked certificate");
    assert!(format!("{err:#}").contains("could not"), "{err:#}");
    assert!(
        k.backups_list("b")?.is_empty(),
        "b's certificate is not revoked"
    );

    // A new CA and every certificate rotated in place (as cert-manager renews them).
    let fresh = scratch_dir();
    run_ok(
        klio()
            .args(["pki", "init"])
            .arg(fresh.path())
            .args(["--cluster", "b"]),
    )?;
    for f in [
        "ca.crt",
        "server.key",
        "server.crt",
        "client-b.key",
        "client-b.crt",
    ] {
        std::fs::copy(fresh.path().join(f), pki.join(f))?;
    }
    assert!(
        k.backups_list("b")?.is_empty(),
        "the new certificates are used without a restart"
    );
    assert!(k.server_log().contains("certificate files changed"));
    Ok(())
}

#[test]
fn a_new_key_file_needs_a_passphrase_of_sixteen_bytes() -> anyhow::Result<()> {
    let mut k = Klio::start(&["a"])?;
    k.kill_server()?;
    std::fs::remove_dir_all(&k.data)?;
    std::fs::write(&k.key_file, "short\n")?;
    let err = k.start_server().expect_err("a weak passphrase");
    assert!(format!("{err:#}").contains("fewer than the 16"), "{err:#}");
    assert!(!k.data.join("keys.json").exists(), "no key file was made");
    Ok(())
}
