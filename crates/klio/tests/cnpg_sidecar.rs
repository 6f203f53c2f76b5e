//! The CloudNativePG sidecars as the processes of a pod, next to real PostgreSQL servers and a
//! real Klio server, called the way CloudNativePG calls them:
//!
//! - `Backup.Backup` over the `klio-plugin` socket (on a standby for PostgreSQL 15, the
//!   primary for 17), every result field checked against the catalog;
//! - a recovery Job: `RestoreJobHooks.Restore` over the `klio-restore` socket, then what
//!   CloudNativePG's `instance restore` writes (its `restore_config`, the recovery target,
//!   `recovery.signal`), then a real PostgreSQL replaying through CloudNativePG's own
//!   `manager wal-restore` (v1.30, the same build as the operator tests), which reads the
//!   Cluster from the instance-manager cache on `localhost:8010` inside a network namespace of
//!   the test's own and calls `WAL.Restore` on the socket; the data is that of the target time;
//! - pg_rewind-style calls (`MODE_REWIND`) fill no prefetch spool, recovery calls do;
//! - a read-only PluginConfiguration's sidecar restores WAL and refuses backups;
//! - `klio-wal` on both members of a pair through a switchover: only the primary streams, and
//!   the archive goes on along the new timeline without a gap.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use common::*;
use klio_cnpg_plugin::sidecar::socket_channel;
use klio_pg::Lsn;
use klio_proto::cnpgi::backup::v1 as backup;
use klio_proto::cnpgi::identity::v1 as identity;
use klio_proto::cnpgi::wal::v1 as wal;
use klio_test_support::{
    ChildGuard, InstanceManagerCache, NetNs, PgCluster, PgMajor, PgOptions, ScratchDir, cnpg_dir,
    postgres_command, scratch_dir, wait_until,
};
use serde_json::{Value, json};

const PLUGIN: &str = "klio.enterprisedb.io";

/// CloudNativePG's `restore_command`, as the sidecar returns it in `restore_config`.
const CNPG_RESTORE_CONFIG: &str = "recovery_target_action = 'promote'\nrestore_command = '/controller/manager wal-restore --log-destination /controller/log/postgres.json %f %p'\n";

fn manager() -> PathBuf {
    cnpg_dir().join("bin/cnpg-manager")
}

/// A sidecar process (`klio cnpg-sidecar instance|restore`) run as `postgres`, like the
/// injected container (uid 26), with the environment the lifecycle hook gives it.
struct Sidecar {
    _process: ChildGuard,
    sockets: ScratchDir,
    log: PathBuf,
}

impl Sidecar {
    fn start(k: &Klio, role: &str, env: &[(&str, &str)]) -> anyhow::Result<Sidecar> {
        let sockets = scratch_dir();
        let log = sockets.path().join(format!("{role}.log"));
        let mut cmd = postgres_command(KLIO);
        cmd.args(["cnpg-sidecar", role]);
        for (key, value) in injected_env(k, "pg") {
            cmd.env(key, value);
        }
        cmd.env("KLIO_SOCKET_DIR", sockets.path())
            .env("KLIO_LOG", "info,klio=debug");
        for (key, value) in env {
            cmd.env(key, value);
        }
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let process = ChildGuard::spawn(&mut cmd)?;
        let s = Sidecar {
            _process: process,
            sockets,
            log,
        };
        // The startup probe of the injected container.
        wait_until(
            Duration::from_secs(30),
            Duration::from_millis(100),
            "the sidecar's health check to pass",
            || {
                let out = klio()
                    .args(["cnpg-sidecar", "healthcheck"])
                    .env("KLIO_SOCKET_DIR", s.sockets.path())
                    .output()?;
                Ok(out.status.success())
            },
        )
        .map_err(|e| e.context(s.log_text()))?;
        Ok(s)
    }

    fn socket(&self) -> PathBuf {
        self.sockets.path().join(PLUGIN)
    }

    fn log_text(&self) -> String {
        format!(
            "sidecar log:\n{}",
            tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 40)
        )
    }
}

/// The settings the lifecycle hook injects (`KLIO_*`), for the server of `k` and `cluster`'s
/// certificate; the ports are the test server's.
fn injected_env(k: &Klio, cluster: &str) -> Vec<(String, String)> {
    let pki = |f: &str| k.pki.join(f).display().to_string();
    [
        ("KLIO_SERVER_ADDRESS", "127.0.0.1".to_string()),
        ("KLIO_WAL_PORT", k.port.to_string()),
        ("KLIO_BASE_PORT", k.base_port.to_string()),
        ("KLIO_CLUSTER", cluster.to_string()),
        ("KLIO_CLIENT_CERT", pki(&format!("client-{cluster}.crt"))),
        ("KLIO_CLIENT_KEY", pki(&format!("client-{cluster}.key"))),
        // As injected: the Secret's ca.crt (absent here), then the certificate trusted.
        (
            "KLIO_SERVER_CA",
            format!("{},{}", pki("no-such-ca.crt"), pki("ca.crt")),
        ),
        ("KLIO_MODE", "standard".to_string()),
        ("KLIO_TIER2_BACKUP", "false".to_string()),
        ("KLIO_TIER2_RECOVERY", "false".to_string()),
        ("KLIO_PLUGIN_CONFIGURATION", "pc".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// `klio-wal`: `klio wal-stream` with the injected environment, on `pg`'s unix socket.
fn klio_wal(k: &Klio, pg: &PgCluster, name: &str) -> anyhow::Result<ChildGuard> {
    let mut cmd = postgres_command(KLIO);
    cmd.arg("wal-stream");
    for (key, value) in injected_env(k, "pg") {
        cmd.env(key, value);
    }
    cmd.env("KLIO_PG_DSN", pg.socket_dsn())
        .env("KLIO_LOG", "info,klio=debug")
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(k.dir.path().join(format!("{name}.log")))?,
        );
    ChildGuard::spawn(&mut cmd)
}

fn cluster_json(name: &str, status: Value, extra_spec: Value) -> Value {
    let mut spec = json!({
        "instances": 2,
        "plugins": [{"name": PLUGIN, "parameters": {"pluginConfigurationRef": "pc"}}],
    });
    for (k, v) in extra_spec.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    json!({
        "apiVersion": "postgresql.cnpg.io/v1",
        "kind": "Cluster",
        "metadata": {"name": name, "namespace": "default", "uid": "0f1e2d3c-aaaa-bbbb-cccc-000000000001"},
        "spec": spec,
        "status": status,
    })
}

fn bytes(v: &Value) -> bytes::Bytes {
    serde_json::to_vec(v).unwrap_or_default().into()
}

/// Backs up through `Backup.Backup`, checks every field, and returns the result.
async fn backup_through_the_plugin(
    k: &Klio,
    plugin: &Sidecar,
    from_standby: bool,
) -> anyhow::Result<backup::BackupResult> {
    let channel = socket_channel(&plugin.socket()).await?;
    let mut ident = identity::identity_client::IdentityClient::new(channel.clone());
    let caps = ident
        .get_plugin_capabilities(identity::GetPluginCapabilitiesRequest {})
        .await?
        .into_inner();
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|identity::plugin_capability::Type::Service(s)| s.r#type)
        })
        .collect();
    use identity::plugin_capability::service::Type;
    assert_eq!(types, [Type::WalService as i32, Type::BackupService as i32]);
    let mut walc = wal::wal_client::WalClient::new(channel.clone());
    let wal_caps = walc
        .get_capabilities(wal::WalCapabilitiesRequest {})
        .await?
        .into_inner();
    assert_eq!(
        wal_caps.capabilities.len(),
        1,
        "only RESTORE_WAL: WAL is streamed, never archived through archive_command"
    );

    let mut client = backup::backup_client::BackupClient::new(channel);
    let cluster = cluster_json(
        "pg",
        json!({"currentPrimary": "pg-1", "targetPrimary": "pg-1"}),
        json!({}),
    );
    let backup_cr = json!({"apiVersion": "postgresql.cnpg.io/v1", "kind": "Backup", "metadata": {"name": "nightly", "namespace": "default"}});
    // A parameter Klio does not know is refused with the list of those it takes.
    let err = client
        .backup(backup::BackupRequest {
            cluster_definition: bytes(&cluster),
            backup_definition: bytes(&backup_cr),
            parameters: HashMap::from([("destination".to_string(), "s3://x".to_string())]),
        })
        .await
        .expect_err("an unknown parameter must be refused");
    assert!(
        err.message()
            .contains("unknown backup parameter \"destination\"")
            && err.message().contains("jobs"),
        "{}",
        err.message()
    );
    let t0 = time::OffsetDateTime::now_utc().unix_timestamp();
    let r = client
        .backup(backup::BackupRequest {
            cluster_definition: bytes(&cluster),
            backup_definition: bytes(&backup_cr),
            parameters: HashMap::from([
                ("jobs".to_string(), "3".to_string()),
                ("compressionLevel".to_string(), "3".to_string()),
            ]),
        })
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "Backup.Backup failed: {}\n{}",
                s.message(),
                plugin.log_text()
            )
        })?
        .into_inner();
    let t1 = time::OffsetDateTime::now_utc().unix_timestamp();

    // Every field, against the catalog's own record of the backup.
    let shown = k.backups_show("pg", &r.backup_id)?;
    assert_eq!(r.backup_name, "nightly");
    assert!(
        (t0 - 1..=t1 + 1).contains(&r.started_at)
            && r.started_at <= r.stopped_at
            && r.stopped_at <= t1 + 1,
        "times in Unix seconds: {} .. {} within {t0} .. {t1}",
        r.started_at,
        r.stopped_at
    );
    assert_eq!(r.begin_wal, shown["start_wal"].as_str().unwrap_or_default());
    assert_eq!(r.end_wal, shown["end_wal"].as_str().unwrap_or_default());
    assert_eq!(r.begin_lsn, shown["start_lsn"].as_str().unwrap_or_default());
    assert_eq!(r.end_lsn, shown["end_lsn"].as_str().unwrap_or_default());
    assert_eq!(r.begin_wal.len(), 24);
    assert!(r.end_wal >= r.begin_wal);
    assert!(r.end_lsn.parse::<Lsn>()? >= r.begin_lsn.parse::<Lsn>()?);
    let label = String::from_utf8(r.backup_label_file.to_vec())?;
    assert!(
        label.contains("START WAL LOCATION") && label.contains("START TIMELINE: 1"),
        "{label}"
    );
    assert_eq!(label, shown["backup_label"].as_str().unwrap_or_default());
    assert!(r.tablespace_map_file.is_empty());
    assert!(r.online);
    assert_eq!(r.instance_id, "pg-2");
    let m = &r.metadata;
    assert_eq!(m["timeline"], "1");
    assert_eq!(m["clusterUID"], "0f1e2d3c-aaaa-bbbb-cccc-000000000001");
    assert_eq!(m["pluginName"], PLUGIN);
    assert_eq!(m["backupId"], r.backup_id);
    assert_eq!(m["fromStandby"], from_standby.to_string());
    assert_eq!(shown["from_standby"], from_standby);
    Ok(r)
}

/// The recovery Job of a new cluster `pg-new` recovering `pg` to `target_time`, then a real
/// PostgreSQL replaying through `manager wal-restore`; returns the recovered server.
async fn recover_through_the_job(
    k: &Klio,
    major: PgMajor,
    target_time: &str,
    begin_wal: &str,
    keep: &mut Vec<Box<dyn std::any::Any>>,
) -> anyhow::Result<PgCluster> {
    let ns = NetNs::create()?;
    let new_cluster = cluster_json(
        "pg-new",
        json!({}),
        json!({
            "bootstrap": {"recovery": {"source": "origin", "recoveryTarget": {"targetTime": target_time}}},
            "externalClusters": [{"name": "origin", "plugin": {"name": PLUGIN, "parameters": {"pluginConfigurationRef": "pc"}}}],
        }),
    );
    let cache = InstanceManagerCache::start(&ns, &new_cluster)?;
    let dest = scratch_dir();
    let pgdata = dest.path().join("pgdata");
    let restore = Sidecar::start(
        k,
        "restore",
        &[
            ("KLIO_CLUSTER", "pg-new"),
            ("KLIO_RECOVERY_SOURCE_CLUSTER", "pg"),
            ("PGDATA", &pgdata.display().to_string()),
            ("POD_NAME", "pg-new-1-full-recovery"),
        ],
    )?;
    let channel = socket_channel(&restore.socket()).await?;
    let mut hooks = wal::restore_job_hooks_client::RestoreJobHooksClient::new(channel.clone());
    let r = hooks
        .restore(wal::RestoreRequest {
            cluster_definition: bytes(&new_cluster),
            check_empty_wal_archive: Some(true),
        })
        .await
        .map_err(|s| anyhow::anyhow!("Restore failed: {}\n{}", s.message(), restore.log_text()))?
        .into_inner();
    assert_eq!(r.restore_config, CNPG_RESTORE_CONFIG);
    assert!(pgdata.join("backup_label").is_file() && pgdata.join("PG_VERSION").is_file());
    assert!(
        !pgdata.join("recovery.signal").exists(),
        "CloudNativePG writes the recovery settings itself"
    );

    // pg_rewind asks for exactly one file: no prefetch spool is filled.
    let spool = dest.path().join("klio-wal-spool").join("pg");
    let mut walc = wal::wal_client::WalClient::new(channel);
    let rewind_dest = pgdata.join("pg_wal").join("rewind-probe");
    walc.restore(wal::WalRestoreRequest {
        cluster_definition: bytes(&new_cluster),
        source_wal_name: begin_wal.to_string(),
        destination_file_name: rewind_dest.display().to_string(),
        parameters: HashMap::new(),
        mode: wal::wal_restore_request::Mode::Rewind as i32,
    })
    .await?;
    assert!(rewind_dest.is_file());
    let spooled = |p: &Path| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    assert_eq!(spooled(&spool), 0, "a rewind call must not prefetch");
    std::fs::remove_file(&rewind_dest)?;
    // A path outside PGDATA is refused.
    let err = walc
        .restore(wal::WalRestoreRequest {
            cluster_definition: bytes(&new_cluster),
            source_wal_name: begin_wal.to_string(),
            destination_file_name: "/etc/klio-probe".to_string(),
            parameters: HashMap::new(),
            mode: wal::wal_restore_request::Mode::Recovery as i32,
        })
        .await
        .expect_err("a destination outside PGDATA must be refused");
    assert!(
        err.message().contains("inside the data directory"),
        "{}",
        err.message()
    );

    // CloudNativePG's own command, in the namespace where its instance-manager cache lives:
    // a file the archive has, then one it does not.
    let logs = scratch_dir();
    let wal_restore = |name: &str, dest: &Path| {
        ns.command_as_postgres(manager())
            .env("PLUGIN_SOCKET_DIR", restore.sockets.path())
            .env("PGDATA", &pgdata)
            .env("POD_NAME", "pg-new-1-full-recovery")
            .args(["wal-restore", "--log-destination"])
            .arg(logs.path().join("postgres.json"))
            .arg(name)
            .arg(dest)
            .output()
    };
    let probe = pgdata.join("pg_wal").join("RECOVERYXLOG");
    let out = wal_restore(begin_wal, &probe)?;
    assert!(
        out.status.success(),
        "manager wal-restore {begin_wal} failed: {}\n{}",
        output_text(&out),
        restore.log_text()
    );
    let reference = dest.path().join("reference");
    let got = k.wal_get("pg", begin_wal, &reference, &["--prefetch", "0"])?;
    assert!(got.status.success(), "{}", output_text(&got));
    assert_eq!(std::fs::read(&probe)?, std::fs::read(&reference)?);
    // A recovery call prefetches the next segments, in the background once it has answered.
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "the sidecar to spool the next segments",
        || Ok(spooled(&spool) > 0),
    )?;
    std::fs::remove_file(&probe)?;
    let missing = "0000000100000000000000FE";
    let out = wal_restore(missing, &probe)?;
    assert!(
        !out.status.success(),
        "a file the archive lacks must fail the command"
    );
    assert!(!probe.exists());

    // What `instance restore` appends to custom.conf, with this machine's paths for
    // /controller/manager and its log, and the target CloudNativePG renders.
    let restore_command = format!(
        "env PLUGIN_SOCKET_DIR={} PGDATA={} POD_NAME=pg-new-1-full-recovery {}",
        restore.sockets.path().display(),
        pgdata.display(),
        manager().display()
    );
    let config = r
        .restore_config
        .replace("/controller/manager", &restore_command)
        .replace("/controller/log", &logs.path().display().to_string());
    let mut opts = PgOptions {
        start_timeout: Duration::from_secs(300),
        ..PgOptions::default()
    }
    .with_major(major)
    .in_netns(&ns);
    for line in config.lines().filter(|l| !l.trim().is_empty()) {
        opts = opts.with_conf(line);
    }
    opts = opts
        .with_conf(format!("recovery_target_time = '{target_time}'"))
        .with_conf("recovery_target_inclusive = 'true'");
    std::fs::write(pgdata.join("recovery.signal"), "")?;
    let pg = PgCluster::from_data_path(&pgdata, opts).map_err(|e| e.context(restore.log_text()))?;
    pg.wait_for_recovery_end(Duration::from_secs(300))
        .map_err(|e| {
            e.context(format!(
                "{}\npostgres log:\n{}",
                restore.log_text(),
                tail(&pg.log_contents(), 40)
            ))
        })?;
    keep.push(Box::new(restore));
    keep.push(Box::new(cache));
    keep.push(Box::new(logs));
    keep.push(Box::new(dest));
    keep.push(Box::new(ns));
    Ok(pg)
}

/// The whole journey on `major`: streaming, a backup through the plugin (on a standby when
/// `on_standby`), writes before and after a target time, and a recovery Job to that time.
async fn back_up_and_recover(major: PgMajor, on_standby: bool) -> anyhow::Result<()> {
    let k = Klio::start(&["pg", "pg-new"])?;
    let primary = PgCluster::start(PgOptions::default().with_major(major))?;
    let _wal = klio_wal(&k, &primary, "klio-wal")?;
    primary.psql(
        "CREATE TABLE t (id int PRIMARY KEY, note text);
         INSERT INTO t SELECT g, 'before the backup' FROM generate_series(1, 1000) g",
    )?;
    let standby = if on_standby {
        Some(PgCluster::standby_of(&primary, PgOptions::default())?)
    } else {
        None
    };
    let target = standby.as_ref().unwrap_or(&primary);
    let plugin = Sidecar::start(
        &k,
        "instance",
        &[
            ("KLIO_PG_DSN", &target.socket_dsn()),
            ("PGDATA", &target.data_dir().display().to_string()),
            ("POD_NAME", "pg-2"),
        ],
    )?;
    let b = backup_through_the_plugin(&k, &plugin, on_standby)
        .await
        .map_err(|e| with_logs(e, &k, "klio-wal"))?;

    primary.psql("INSERT INTO t SELECT g, 'kept' FROM generate_series(1001, 2000) g")?;
    let target_time = primary
        .psql("SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")?;
    std::thread::sleep(Duration::from_millis(1100));
    primary
        .psql("INSERT INTO t SELECT g, 'after the target' FROM generate_series(2001, 3000) g")?;
    switch_wal(&primary)?;
    let (tli, lsn) = current_lsn(&primary)?;
    k.wait_archived("pg", tli, lsn, Duration::from_secs(60))?;

    let mut keep = Vec::new();
    let recovered =
        recover_through_the_job(&k, major, &target_time, &b.begin_wal, &mut keep).await?;
    let counts = recovered
        .psql("SELECT count(*), count(*) FILTER (WHERE note = 'after the target') FROM t")?;
    assert_eq!(
        counts, "2000|0",
        "exactly the rows committed before {target_time}"
    );
    assert_eq!(
        recovered.psql("SELECT pg_is_in_recovery()")?,
        "f",
        "promoted"
    );
    drop(recovered);
    drop(keep);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pg15_backup_on_a_standby_and_recovery_job_through_cnpg_wal_restore() -> anyhow::Result<()>
{
    back_up_and_recover(PgMajor::V15, true).await
}

#[tokio::test(flavor = "multi_thread")]
async fn pg17_backup_and_recovery_job_through_cnpg_wal_restore() -> anyhow::Result<()> {
    back_up_and_recover(PgMajor::V17, false).await
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_configuration_restores_wal_and_refuses_backups() -> anyhow::Result<()> {
    let k = Klio::start(&["pg"])?;
    let primary = PgCluster::start(PgOptions::default())?;
    let _wal = klio_wal(&k, &primary, "klio-wal")?;
    switch_wal(&primary)?;
    let (tli, lsn) = current_lsn(&primary)?;
    k.wait_archived("pg", tli, lsn, Duration::from_secs(60))?;
    let first = k
        .archived_files("pg")?
        .into_iter()
        .find(|f| f.len() == 24)
        .context("no segment archived")?;
    let data = scratch_dir();
    let plugin = Sidecar::start(
        &k,
        "instance",
        &[
            ("KLIO_MODE", "read-only"),
            ("KLIO_PG_DSN", &primary.socket_dsn()),
            ("PGDATA", &data.path().display().to_string()),
        ],
    )?;
    let channel = socket_channel(&plugin.socket()).await?;
    let cluster = cluster_json("pg", json!({"currentPrimary": "pg-1"}), json!({}));
    let err = backup::backup_client::BackupClient::new(channel.clone())
        .backup(backup::BackupRequest {
            cluster_definition: bytes(&cluster),
            backup_definition: bytes(&json!({"metadata": {"name": "b"}})),
            parameters: HashMap::new(),
        })
        .await
        .expect_err("a read-only configuration takes no backups");
    assert!(
        err.message()
            .contains("PluginConfiguration \"pc\" is read-only"),
        "{}",
        err.message()
    );
    assert!(k.backups_list("pg")?.is_empty(), "nothing was written");
    let dest = data.path().join("pg_wal");
    mkdir_owned_like(data.path(), &dest)?;
    let mut walc = wal::wal_client::WalClient::new(channel);
    walc.restore(wal::WalRestoreRequest {
        cluster_definition: bytes(&cluster),
        source_wal_name: first.clone(),
        destination_file_name: dest.join("RECOVERYXLOG").display().to_string(),
        parameters: HashMap::new(),
        mode: wal::wal_restore_request::Mode::Recovery as i32,
    })
    .await
    .map_err(|s| anyhow::anyhow!("{}\n{}", s.message(), plugin.log_text()))?;
    assert_eq!(
        std::fs::metadata(dest.join("RECOVERYXLOG"))?.len(),
        16 << 20
    );
    let missing = walc
        .restore(wal::WalRestoreRequest {
            cluster_definition: bytes(&cluster),
            source_wal_name: "00000009000000000000000A".to_string(),
            destination_file_name: dest.join("RECOVERYXLOG").display().to_string(),
            parameters: HashMap::new(),
            mode: wal::wal_restore_request::Mode::Recovery as i32,
        })
        .await
        .expect_err("a missing segment");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn configuration_retention_runs_after_each_backup() -> anyhow::Result<()> {
    let k = Klio::start(&["pg"])?;
    let primary = PgCluster::start(PgOptions::default())?;
    let _wal = klio_wal(&k, &primary, "klio-wal")?;
    primary.psql("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i")?;
    // tier1.retention: {keepLatest: 1}, every other rule disabled.
    let plugin = Sidecar::start(
        &k,
        "instance",
        &[
            ("KLIO_PG_DSN", &primary.socket_dsn()),
            ("PGDATA", &primary.data_dir().display().to_string()),
            (
                "KLIO_RETENTION",
                r#"{"keepLatest":1,"keepHourly":0,"keepDaily":0,"keepWeekly":0,"keepMonthly":0,"keepAnnual":0}"#,
            ),
        ],
    )?;
    let mut client =
        backup::backup_client::BackupClient::new(socket_channel(&plugin.socket()).await?);
    let cluster = cluster_json("pg", json!({"currentPrimary": "pg-1"}), json!({}));
    let mut ids = Vec::new();
    for (name, params) in [
        ("first", vec![]),
        ("kept-by-request", vec![("skipRetention", "true")]),
        ("last", vec![]),
    ] {
        let r = client
            .backup(backup::BackupRequest {
                cluster_definition: bytes(&cluster),
                backup_definition: bytes(&json!({"metadata": {"name": name}})),
                parameters: params
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}\n{}", s.message(), plugin.log_text()))?
            .into_inner();
        ids.push(r.backup_id);
        let listed: Vec<String> = k
            .backups_list("pg")?
            .iter()
            .map(|b| b["backup_id"].as_str().unwrap_or_default().to_string())
            .collect();
        // skipRetention leaves the earlier backup; otherwise only the newest is kept.
        let expected = if name == "kept-by-request" {
            ids.clone()
        } else {
            vec![ids[ids.len() - 1].clone()]
        };
        assert_eq!(listed, expected, "after backup \"{name}\"");
    }
    Ok(())
}

/// Creates `dir` with the owner of `parent` (the sidecar runs as `postgres`).
fn mkdir_owned_like(parent: &Path, dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(dir)?;
    let m = std::fs::metadata(parent)?;
    std::os::unix::fs::chown(dir, Some(m.uid()), Some(m.gid()))?;
    Ok(())
}

/// Segment numbers of `tli` in the archive listing `files`, in order.
fn segments_of(files: &[String], tli: u32) -> Vec<u64> {
    let prefix = format!("{tli:08X}");
    let mut v: Vec<u64> = files
        .iter()
        .filter(|f| f.len() == 24 && f.starts_with(&prefix))
        .filter_map(|f| {
            let hi = u64::from_str_radix(&f[8..16], 16).ok()?;
            let lo = u64::from_str_radix(&f[16..24], 16).ok()?;
            Some(hi * 0x100 + lo)
        })
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn switchover_moves_streaming_to_the_new_primary_without_a_gap() -> anyhow::Result<()> {
    let k = Klio::start(&["pg"])?;
    let mut old = PgCluster::start(PgOptions::default())?;
    let new = PgCluster::standby_of(&old, PgOptions::default())?;
    // klio-wal runs in both pods; only the primary's streams.
    let _wal_old = klio_wal(&k, &old, "wal-old")?;
    let _wal_new = klio_wal(&k, &new, "wal-new")?;
    old.psql(
        "CREATE TABLE t (id int PRIMARY KEY, tl int);
         INSERT INTO t SELECT g, 1 FROM generate_series(1, 500) g",
    )?;
    k.backup("pg", &old, &[])?;
    switch_wal(&old)?;
    let (tli, lsn) = current_lsn(&old)?;
    k.wait_archived("pg", tli, lsn, Duration::from_secs(60))?;
    assert!(
        k.log("wal-new").contains("in recovery"),
        "the standby's klio-wal waits:\n{}",
        tail(&k.log("wal-new"), 20)
    );

    // Switchover as CloudNativePG runs it: the primary shuts down (its WAL reaches the
    // standby and the archive), the standby is promoted, the old primary follows it.
    old.stop()?;
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        "the standby to replay the old primary's last WAL",
        || {
            let replayed: Lsn = new.psql("SELECT pg_last_wal_replay_lsn()")?.parse()?;
            Ok(replayed >= lsn)
        },
    )?;
    new.promote()?;
    new.wait_for_recovery_end(Duration::from_secs(60))?;
    old.append_conf(&format!("primary_conninfo = '{}'", new.dsn()))?;
    std::fs::write(old.data_dir().join("standby.signal"), "")?;
    old.start_again()?;
    new.psql("INSERT INTO t SELECT g, 2 FROM generate_series(501, 1000) g")?;
    switch_wal(&new)?;
    let (tli2, lsn2) = current_lsn(&new)?;
    assert_eq!(tli2, 2);
    k.wait_archived("pg", 2, lsn2, Duration::from_secs(90))
        .map_err(|e| with_logs(e, &k, "wal-new"))?;

    // No gap: timeline 1 from its first segment to the switch, then timeline 2 from the
    // switch segment on, each without a hole; the history file is there.
    let files = k.archived_files("pg")?;
    assert!(files.iter().any(|f| f == "00000002.history"), "{files:?}");
    let (one, two) = (segments_of(&files, 1), segments_of(&files, 2));
    assert!(!one.is_empty() && !two.is_empty(), "{files:?}");
    for run in [&one, &two] {
        assert!(
            run.windows(2).all(|w| w[1] == w[0] + 1),
            "a hole in the archive: {files:?}"
        );
    }
    assert!(
        two[0] <= one[one.len() - 1] + 1,
        "timeline 2 starts at the switch: {files:?}"
    );
    // The old primary, now a standby, streams nothing.
    assert!(old.is_in_recovery()?);
    let log_old = k.log("wal-old");
    assert!(log_old.contains("in recovery"), "{}", tail(&log_old, 20));

    // And it replays: a restore to the end of the archive has both timelines' rows.
    let dirs = scratch_dir();
    let pgdata = dirs.path().join("pgdata");
    restore_ok(&k, "pg", &pgdata, &[])?;
    let restored = start_restored(&pgdata)?;
    assert_eq!(
        restored
            .psql("SELECT count(*) FILTER (WHERE tl = 1), count(*) FILTER (WHERE tl = 2) FROM t")?,
        "500|500"
    );
    Ok(())
}
