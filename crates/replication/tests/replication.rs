//! Component tests against real PostgreSQL clusters started by klio-test-support.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use klio_pg::{Lsn, SegmentSize, TimeLineId, TimelineHistory, WalFileName};
use klio_replication::{
    Error, Host, ReplicationConfig, ReplicationConnection, ReplicationStream, StreamMessage,
};
use klio_test_support::{Auth, ChildGuard, PgCluster, PgOptions, free_port, wait_until_async};

const TIMEOUT: Duration = Duration::from_secs(60);

fn options(auth: &Auth) -> PgOptions {
    PgOptions::default().with_auth(auth.clone())
}

fn config(dsn: &str) -> anyhow::Result<ReplicationConfig> {
    Ok(ReplicationConfig::from_dsn(dsn, "klio-test")?)
}

async fn connect(pg: &PgCluster) -> anyhow::Result<ReplicationConnection> {
    Ok(ReplicationConnection::connect(&config(&pg.dsn())?).await?)
}

/// The next stream message, failing after [`TIMEOUT`].
async fn next(stream: &mut ReplicationStream) -> anyhow::Result<StreamMessage> {
    Ok(tokio::time::timeout(TIMEOUT, stream.next_message())
        .await
        .context("no stream message in time")??)
}

fn slot_restart_lsn(pg: &PgCluster, slot: &str) -> anyhow::Result<Option<Lsn>> {
    let text = pg.psql(&format!(
        "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
    ))?;
    Ok(if text.is_empty() {
        None
    } else {
        Some(text.parse()?)
    })
}

async fn identify_show_and_slots(auth: Auth) -> anyhow::Result<()> {
    let pg = PgCluster::start(options(&auth))?;
    let system_id = pg.psql("SELECT system_identifier FROM pg_control_system()")?;
    for dsn in [pg.dsn(), pg.socket_dsn()] {
        let cfg = config(&dsn)?;
        let mut conn = ReplicationConnection::connect(&cfg).await?;
        let id = conn.identify_system().await?;
        assert_eq!(id.system_id.to_string(), system_id);
        assert_eq!(id.timeline, TimeLineId(1));
        assert!(id.xlogpos > Lsn(0x0100_0000), "{}", id.xlogpos);
        assert_eq!(conn.wal_segment_size().await?, SegmentSize::DEFAULT);
        assert_eq!(conn.show("wal_segment_size").await?, "16MB");
        assert_eq!(conn.show("wal_level").await?, "replica");
        assert!(
            matches!(conn.show("no_such_setting").await, Err(Error::Server { code, .. }) if code == "42704")
        );
        // The connection stays usable after an error.
        assert_eq!(conn.identify_system().await?.system_id, id.system_id);
    }
    assert!(matches!(config(&pg.socket_dsn())?.host, Host::Unix(_)));

    let mut conn = connect(&pg).await?;
    assert_eq!(conn.read_replication_slot("klio_slot").await?, None);
    conn.create_physical_slot("klio_slot").await?;
    let info = conn
        .read_replication_slot("klio_slot")
        .await?
        .context("slot exists")?;
    let restart_lsn = info.restart_lsn.context("RESERVE_WAL sets restart_lsn")?;
    assert_eq!(info.restart_tli, Some(TimeLineId(1)));
    assert_eq!(slot_restart_lsn(&pg, "klio_slot")?, Some(restart_lsn));
    match conn.create_physical_slot("klio_slot").await {
        Err(Error::SlotExists { slot }) => assert_eq!(slot, "klio_slot"),
        other => bail!("expected SlotExists, got {other:?}"),
    }
    assert!(conn.read_replication_slot("klio_slot").await?.is_some());
    Ok(())
}

#[tokio::test]
async fn identify_show_and_slots_trust() -> anyhow::Result<()> {
    identify_show_and_slots(Auth::Trust).await
}

#[tokio::test]
async fn identify_show_and_slots_scram() -> anyhow::Result<()> {
    identify_show_and_slots(Auth::scram("scram secret")).await
}

/// Compares received WAL with the segment files in the cluster's `pg_wal`.
fn assert_matches_pg_wal(
    pg: &PgCluster,
    size: SegmentSize,
    chunks: &[(Lsn, Bytes)],
) -> anyhow::Result<()> {
    let mut files: HashMap<u64, Vec<u8>> = HashMap::new();
    for (start, data) in chunks {
        let mut offset = 0usize;
        while offset < data.len() {
            let lsn = start.plus(offset as u64);
            let segno = lsn.segment_no(size);
            let name = WalFileName::segment(TimeLineId(1), segno, size).to_string();
            let file = match files.entry(segno.0) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(
                    std::fs::read(pg.wal_dir().join(&name))
                        .with_context(|| format!("read {name}"))?,
                ),
            };
            let in_segment = usize::try_from(lsn.segment_offset(size))?;
            let n = (data.len() - offset).min(file.len() - in_segment);
            ensure!(
                data[offset..offset + n] == file[in_segment..in_segment + n],
                "WAL at {lsn} ({n} bytes) differs from {name} at offset {in_segment}"
            );
            offset += n;
        }
    }
    Ok(())
}

async fn stream_segment_and_confirm(auth: Auth) -> anyhow::Result<()> {
    let pg = PgCluster::start(options(&auth))?;
    let mut conn = connect(&pg).await?;
    conn.create_physical_slot("stream_slot").await?;
    let restart = conn
        .read_replication_slot("stream_slot")
        .await?
        .and_then(|s| s.restart_lsn)
        .context("restart_lsn")?;
    let size = conn.wal_segment_size().await?;
    let start = restart.segment_start(size);
    let segment_end = start.plus(size.bytes());
    let mut stream = conn
        .start_physical(Some("stream_slot"), start, TimeLineId(1))
        .await?;

    // Generate WAL while receiving, so that reads wait for the network.
    let mut generate = pg.client_command("psql");
    generate.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &pg.socket_dsn()]);
    for i in 0..10 {
        generate.args(["-c", &format!("CREATE TABLE t{i} AS SELECT g, repeat('x', 100) AS pad FROM generate_series(1, 5000) g")]);
    }
    generate.args(["-c", "SELECT pg_switch_wal()"]);
    let mut generate = ChildGuard::spawn(generate.stdout(Stdio::null()))?;
    let active = pg.psql("SELECT application_name FROM pg_stat_replication")?;
    assert_eq!(active, "klio-test");

    let mut chunks = Vec::new();
    let mut next_lsn = start;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut cancelled = 0u32;
    while next_lsn < segment_end {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "segment not received in time"
        );
        // Race a short timer so that reads are often cancelled midway: no byte may be lost.
        let first = tokio::select! {
            message = stream.next_message() => message?,
            () = tokio::time::sleep(Duration::from_micros(200)) => {
                cancelled += 1;
                continue;
            }
        };
        let mut batch = vec![first];
        while let Some(message) = stream.try_next_buffered()? {
            batch.push(message);
        }
        for message in batch {
            match message {
                StreamMessage::XLogData {
                    start,
                    wal_end,
                    data,
                } => {
                    ensure!(
                        start == next_lsn,
                        "XLogData at {start}, expected {next_lsn}"
                    );
                    ensure!(wal_end >= start, "wal_end {wal_end} before {start}");
                    next_lsn = start.plus(data.len() as u64);
                    chunks.push((start, data));
                }
                StreamMessage::Keepalive { .. } => {}
                StreamMessage::EndOfStream => bail!("unexpected end of stream"),
            }
        }
    }
    ensure!(generate.wait()?.success(), "psql generating WAL failed");
    assert_matches_pg_wal(&pg, size, &chunks)?;
    eprintln!(
        "received {} chunks, {cancelled} reads cancelled",
        chunks.len()
    );

    // Confirming the segment moves the slot.
    stream
        .send_status(segment_end, segment_end, segment_end, false)
        .await?;
    wait_until_async(
        TIMEOUT,
        Duration::from_millis(50),
        "restart_lsn to advance",
        || async { Ok(slot_restart_lsn(&pg, "stream_slot")?.is_some_and(|l| l >= segment_end)) },
    )
    .await?;

    // A status update asking for a reply gets a keepalive.
    stream
        .send_status(segment_end, segment_end, segment_end, true)
        .await?;
    loop {
        match next(&mut stream).await? {
            StreamMessage::Keepalive { wal_end, .. } => {
                assert!(wal_end >= segment_end);
                break;
            }
            StreamMessage::XLogData { .. } => {}
            StreamMessage::EndOfStream => bail!("unexpected end of stream"),
        }
    }

    // Ending streaming from our side gives the connection back.
    let (next_timeline, mut conn) = stream.finish_timeline().await?;
    assert_eq!(next_timeline, None);
    assert_eq!(conn.identify_system().await?.timeline, TimeLineId(1));
    Ok(())
}

#[tokio::test]
async fn stream_segment_matches_pg_wal_and_confirm_moves_slot_trust() -> anyhow::Result<()> {
    stream_segment_and_confirm(Auth::Trust).await
}

#[tokio::test]
async fn stream_segment_matches_pg_wal_and_confirm_moves_slot_scram() -> anyhow::Result<()> {
    stream_segment_and_confirm(Auth::scram("pw")).await
}

#[tokio::test]
async fn connect_with_bad_credentials_is_auth_error() -> anyhow::Result<()> {
    let pg = PgCluster::start(options(&Auth::scram("right")))?;
    let mut cfg = config(&pg.dsn())?;
    cfg.password = Some("wrong".into());
    match ReplicationConnection::connect(&cfg).await {
        Err(e @ Error::Auth { .. }) => {
            assert_eq!(e.code(), Some("28P01"));
            assert!(!e.is_retryable());
            assert!(
                e.to_string().contains("password authentication failed"),
                "{e}"
            );
        }
        other => bail!("expected an authentication error, got {other:?}"),
    }
    cfg.password = None;
    assert!(matches!(
        ReplicationConnection::connect(&cfg).await,
        Err(Error::Auth { code: None, .. })
    ));
    cfg.user = "nobody".into();
    cfg.password = Some("right".into());
    assert!(matches!(
        ReplicationConnection::connect(&cfg).await,
        Err(Error::Auth { .. })
    ));

    // Nothing listens on a fresh port: a retryable I/O error.
    let refused = config(&format!(
        "host=127.0.0.1 port={} user=postgres",
        free_port()
    ))?;
    match ReplicationConnection::connect(&refused).await {
        Err(e @ Error::Io { .. }) => assert!(e.is_retryable()),
        other => bail!("expected an I/O error, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn connect_with_md5_and_cleartext_methods_authenticates() -> anyhow::Result<()> {
    for auth in [
        Auth::Md5 {
            password: "md5 pw".into(),
        },
        Auth::Password {
            password: "clear".into(),
        },
    ] {
        let pg = PgCluster::start(options(&auth))?;
        let mut conn = connect(&pg).await.with_context(|| format!("{auth:?}"))?;
        assert_eq!(conn.identify_system().await?.timeline, TimeLineId(1));
    }
    Ok(())
}

#[tokio::test]
async fn start_physical_from_removed_wal_is_wal_removed() -> anyhow::Result<()> {
    let pg = PgCluster::start(PgOptions::default().with_conf("wal_keep_size = 0"))?;
    for _ in 0..3 {
        pg.psql("CREATE TABLE IF NOT EXISTS t (i int); INSERT INTO t VALUES (1); SELECT pg_switch_wal(); CHECKPOINT;")?;
    }
    let conn = connect(&pg).await?;
    // PostgreSQL 15 enters COPY mode, then fails when it cannot open the segment.
    let streamed = async {
        let mut stream = conn
            .start_physical(None, Lsn(0x0100_0000), TimeLineId(1))
            .await?;
        stream.next_message().await
    };
    match tokio::time::timeout(TIMEOUT, streamed).await? {
        Err(e) => assert!(e.is_wal_removed(), "{e}"),
        Ok(other) => bail!("expected an error, got {other:?}"),
    }
    Ok(())
}

/// Reads a stream until `EndOfStream`, returning where the WAL received ended.
async fn read_to_end(stream: &mut ReplicationStream, mut end: Lsn) -> anyhow::Result<Lsn> {
    loop {
        match next(stream).await? {
            StreamMessage::XLogData { start, data, .. } => end = start.plus(data.len() as u64),
            StreamMessage::Keepalive {
                wal_end,
                reply_requested,
            } => {
                if reply_requested {
                    stream.send_status(end, end, end, false).await?;
                }
                let _ = wal_end;
            }
            StreamMessage::EndOfStream => return Ok(end),
        }
    }
}

#[tokio::test]
async fn promoted_standby_ends_timeline_1_and_names_timeline_2() -> anyhow::Result<()> {
    let primary = PgCluster::start(PgOptions::default())?;
    primary.psql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i")?;
    let standby = PgCluster::standby_of(&primary, PgOptions::default())?;
    primary.psql("INSERT INTO t SELECT generate_series(1001, 2000)")?;
    let target: Lsn = primary.psql("SELECT pg_current_wal_lsn()")?.parse()?;
    wait_until_async(
        TIMEOUT,
        Duration::from_millis(50),
        "standby to replay",
        || async {
            Ok(standby
                .psql("SELECT pg_last_wal_replay_lsn()")?
                .parse::<Lsn>()?
                >= target)
        },
    )
    .await?;

    // Cascading: stream timeline 1 from the standby while it is promoted.
    let mut conn = connect(&standby).await?;
    let size = conn.wal_segment_size().await?;
    let id = conn.identify_system().await?;
    assert_eq!(id.timeline, TimeLineId(1));
    let from = id.xlogpos.segment_start(size);
    let mut during = conn.start_physical(None, from, TimeLineId(1)).await?;
    let received = match next(&mut during).await? {
        StreamMessage::XLogData { start, data, .. } => {
            assert_eq!(start, from);
            start.plus(data.len() as u64)
        }
        other => bail!("expected XLogData, got {other:?}"),
    };

    standby.promote()?;
    standby.wait_for_recovery_end(TIMEOUT)?;

    let mut conn = connect(&standby).await?;
    assert_eq!(conn.identify_system().await?.timeline, TimeLineId(2));
    let (name, content) = conn.timeline_history(TimeLineId(2)).await?;
    assert_eq!(name, "00000002.history");
    let history = TimelineHistory::parse(std::str::from_utf8(&content)?)?;
    let switchpoint = history
        .switchpoint_of(TimeLineId(1))
        .context("timeline 1 in history")?;

    let ended_at = read_to_end(&mut during, received).await?;
    assert_eq!(ended_at, switchpoint);
    let (next_timeline, _) = during.finish_timeline().await?;
    assert_eq!(next_timeline, Some((TimeLineId(2), switchpoint)));

    // After promotion: timeline 1 from the segment start streams up to the switchpoint.
    let start = switchpoint.segment_start(size);
    let mut stream = conn.start_physical(None, start, TimeLineId(1)).await?;
    assert_eq!(read_to_end(&mut stream, start).await?, switchpoint);
    assert!(matches!(
        stream.next_message().await?,
        StreamMessage::EndOfStream
    ));
    assert_eq!(stream.try_next_buffered()?, None);
    let (next_timeline, conn) = stream.finish_timeline().await?;
    assert_eq!(next_timeline, Some((TimeLineId(2), switchpoint)));

    // Exactly at the switchpoint the server skips streaming and names the next timeline.
    let mut stream = conn
        .start_physical(None, switchpoint, TimeLineId(1))
        .await?;
    assert!(matches!(
        next(&mut stream).await?,
        StreamMessage::EndOfStream
    ));
    let (next_timeline, conn) = stream.finish_timeline().await?;
    assert_eq!(next_timeline, Some((TimeLineId(2), switchpoint)));

    // The handed-back connection streams timeline 2 from the switchpoint.
    let mut stream = conn
        .start_physical(None, switchpoint, TimeLineId(2))
        .await?;
    standby.psql("INSERT INTO t VALUES (0)")?;
    loop {
        match next(&mut stream).await? {
            StreamMessage::XLogData { start, .. } => {
                assert_eq!(start, switchpoint);
                break;
            }
            StreamMessage::Keepalive { .. } => {}
            StreamMessage::EndOfStream => bail!("timeline 2 is the current timeline"),
        }
    }
    Ok(())
}
