//! Observability end to end, with a real Prometheus (built from its Go module), a real
//! PostgreSQL 15 under pgbench, moto for Tier 2 and the `go tool pprof` reader:
//!
//! - Prometheus scrapes the server and a streaming `klio wal-stream`; PromQL returns the
//!   archive lag of both, the last backup time after a backup, the relay lag once Tier 2
//!   has caught up; Klio's alerting rules load (`promtool check rules`) and the archive-lag
//!   alert fires once the streamer is stopped;
//! - the CPU and heap profile endpoints serve profiles `go tool pprof -top` reads;
//! - `klio status` exits 0 when all is well, 1 with the reason once the streamer is stopped
//!   and once the Tier 2 relay fails;
//! - `--log-format json` writes one JSON object per line, with the cluster as a field;
//! - OTLP export reaches a receiver that decodes the protobuf: the server's metrics and the
//!   `klio.backup` span of `klio backup`, with the cluster and backup id as attributes.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use common::*;
use klio_test_support::{
    Moto, PgCluster, PgOptions, Prometheus, free_port, go_peer, http_get, scratch_dir,
};
use serde_json::Value;

const CLUSTER: &str = "obs";
const BUCKET: &str = "klio-obs";

/// The value of the single series `promql` returns, if any.
fn one_value(p: &Prometheus, promql: &str) -> anyhow::Result<Option<f64>> {
    let r = p.query(promql).map_err(anyhow::Error::msg)?;
    Ok(r.first().map(|(_, v)| *v))
}

/// Klio's alerting rules with the archive-lag alert's threshold and duration shortened so
/// that a test sees it fire in seconds (the expression itself is the shipped one).
fn accelerated_rules() -> anyhow::Result<String> {
    let path = klio_test_support::klio_chart_dir().join("files/prometheus-rules.yaml");
    let text = std::fs::read_to_string(&path)?;
    let start = text
        .find("alert: KlioWalArchiveLagging")
        .context("no KlioWalArchiveLagging rule")?;
    let end = text[start..]
        .find("- alert:")
        .map_or(text.len(), |i| start + i);
    let rule = text[start..end]
        .replace(
            "(klio_wal_archive_lag_seconds) > 300",
            "(klio_wal_archive_lag_seconds) > 3",
        )
        .replace("for: 2m", "for: 1s");
    ensure!(
        rule.contains("> 3\n") && rule.contains("for: 1s"),
        "the KlioWalArchiveLagging rule changed shape: {rule}"
    );
    Ok(format!("{}{rule}{}", &text[..start], &text[end..]))
}

/// Writes `profile` to `file` and returns what `go tool pprof -top` prints of it.
fn pprof_top(file: &std::path::Path, profile: &[u8]) -> anyhow::Result<String> {
    std::fs::write(file, profile)?;
    let out = std::process::Command::new("go")
        .env(
            "PATH",
            format!(
                "/usr/local/go/bin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .args(["tool", "pprof", "-top"])
        .arg(file)
        .output()
        .context("run go tool pprof (the Go toolchain is needed)")?;
    let text = output_text(&out);
    ensure!(out.status.success(), "go tool pprof -top failed: {text}");
    Ok(text)
}

fn status(k: &Klio) -> anyhow::Result<(i32, Value)> {
    let out = k
        .client_command(&["status", "--json", "--min-free-percent", "0"], CLUSTER)
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("klio status --json: {}", output_text(&out)))?;
    Ok((out.status.code().unwrap_or(-1), v))
}

#[test]
fn prometheus_scrapes_server_and_streamer_alerts_fire_and_status_tells() -> anyhow::Result<()> {
    let scratch = scratch_dir();
    let rules = scratch.path().join("rules.yaml");
    std::fs::write(&rules, accelerated_rules()?)?;
    // The shipped rules load as they are.
    let chart_rules = klio_test_support::klio_chart_dir().join("files/prometheus-rules.yaml");
    for file in [&chart_rules, &rules] {
        let out = std::process::Command::new(go_peer("promtool"))
            .args(["check", "rules"])
            .arg(file)
            .output()?;
        ensure!(
            out.status.success(),
            "promtool check rules: {}",
            output_text(&out)
        );
    }

    let mut moto = Moto::start(&scratch.path().join("moto.log"));
    moto.create_bucket(BUCKET);
    let key2 = tier2_key(
        &scratch,
        "tier2.key",
        "the tier 2 passphrase, long enough\n",
    );
    let (server_metrics, streamer_metrics) = (free_port(), free_port());
    let mut flags = tier2_flags(&moto.endpoint(), BUCKET, &key2);
    flags.extend(
        [
            "--metrics-listen",
            &format!("127.0.0.1:{server_metrics}"),
            "--pprof",
            "--log-format",
            "json",
        ]
        .map(String::from),
    );
    let k = Klio::start_with(&[CLUSTER], flags)?;
    let pg = PgCluster::start(PgOptions::default())?;
    pg.pgbench_init(1)?;
    let mut streamer = k.spawn_streamer(
        CLUSTER,
        &pg,
        "streamer",
        &[
            "--tier2-backup",
            "--metrics-listen",
            &format!("127.0.0.1:{streamer_metrics}"),
        ],
    )?;
    k.wait_archived(CLUSTER, 1, klio_pg::Lsn(1), Duration::from_secs(60))
        .map_err(|e| with_logs(e, &k, "streamer"))?;

    let prom_dir = scratch.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir)?;
    let prom = Prometheus::start(
        &prom_dir,
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: klio-server\n    static_configs:\n      - targets: ['127.0.0.1:{server_metrics}']\n  - job_name: klio-wal\n    static_configs:\n      - targets: ['127.0.0.1:{streamer_metrics}']\n",
            rules.display()
        ),
    );

    // Under pgbench load: the archive lag from both sides, and a CPU profile.
    std::thread::scope(|s| -> anyhow::Result<()> {
        let load = s.spawn(|| pg.pgbench(&["-n", "-T", "15", "-c", "2"]));
        let server_lag = eventually(Duration::from_secs(60), "the server's archive lag", || {
            one_value(
                &prom,
                &format!("klio_wal_archive_lag_bytes{{cluster=\"{CLUSTER}\"}}"),
            )
        })?;
        let streamer_lag = eventually(
            Duration::from_secs(60),
            "the streamer's archive lag",
            || {
                one_value(
                    &prom,
                    &format!("klio_streamer_archive_lag_bytes{{cluster=\"{CLUSTER}\"}}"),
                )
            },
        )?;
        let connected = one_value(
            &prom,
            &format!("klio_wal_stream_connected{{cluster=\"{CLUSTER}\"}}"),
        )?;
        eprintln!("archive lag under load: server {server_lag} B, streamer {streamer_lag} B");
        ensure!(
            connected == Some(1.0),
            "stream not connected: {connected:?}"
        );
        let received = eventually(Duration::from_secs(30), "WAL received", || {
            Ok(one_value(
                &prom,
                &format!("klio_wal_received_bytes_total{{cluster=\"{CLUSTER}\"}}"),
            )?
            .filter(|v| *v > 0.0))
        })?;
        eprintln!("WAL received: {received} B");

        let (code, profile) = http_get(server_metrics, "/debug/pprof/profile?seconds=3")?;
        ensure!(code == 200, "profile: HTTP {code}");
        let text = pprof_top(&scratch.path().join("cpu.pprof"), &profile)?;
        ensure!(
            text.contains("Type: cpu") && text.contains("Duration: 3"),
            "go tool pprof -top: {text}"
        );
        eprintln!("{}", tail(&text, 12));
        // The heap profile (jemalloc's sampled live allocations).
        let (code, heap) = http_get(server_metrics, "/debug/pprof/heap")?;
        ensure!(
            code == 200,
            "heap profile: HTTP {code}: {}",
            String::from_utf8_lossy(&heap)
        );
        let text = pprof_top(&scratch.path().join("heap.pprof"), &heap)?;
        ensure!(
            text.contains("Type: inuse_space"),
            "go tool pprof -top of the heap profile: {text}"
        );
        load.join().unwrap()?;
        Ok(())
    })?;

    // A backup: its end time reaches Prometheus (the server refreshes every 15 s).
    let backup = k.backup(CLUSTER, &pg, &["--tier2-backup"])?;
    let stopped = time::OffsetDateTime::parse(
        backup["stopped_at"].as_str().context("no stopped_at")?,
        &time::format_description::well_known::Rfc3339,
    )?
    .unix_timestamp() as f64;
    let last = eventually(Duration::from_secs(90), "the last backup time", || {
        Ok(one_value(
            &prom,
            &format!(
                "klio_backup_last_success_timestamp_seconds{{cluster=\"{CLUSTER}\",tier=\"1\"}}"
            ),
        )?
        .filter(|t| (*t - stopped).abs() < 2.0))
    })?;
    eprintln!("last backup ended at {last} (backup says {stopped})");
    // Tier 2 catches up: no relay lag, files relayed.
    switch_wal(&pg)?;
    eventually(Duration::from_secs(90), "Tier 2 caught up", || {
        let lag = one_value(
            &prom,
            &format!("klio_tier2_relay_lag_files{{cluster=\"{CLUSTER}\"}}"),
        )?;
        let relayed = one_value(
            &prom,
            &format!("klio_tier2_relayed_wal_files_total{{cluster=\"{CLUSTER}\"}}"),
        )?;
        Ok((lag == Some(0.0) && relayed.is_some_and(|r| r > 0.0)).then_some(()))
    })?;
    let (code, s) = eventually(Duration::from_secs(60), "a healthy status", || {
        let (code, s) = status(&k)?;
        Ok((code == 0).then_some((code, s)))
    })
    .map_err(|e| {
        let detail = status(&k).map(|(_, s)| s.to_string()).unwrap_or_default();
        e.context(detail)
    })?;
    ensure!(
        code == 0 && s["problems"].as_array().is_some_and(Vec::is_empty),
        "{s}"
    );
    ensure!(s["backups"]["tier1"]["count"] == 1, "{s}");

    // The streamer stops: status says so, and the archive-lag alert fires.
    streamer.kill()?;
    pg.pgbench(&["-n", "-t", "200", "-c", "1"])?;
    let (code, s) = status(&k)?;
    let problems = s["problems"].to_string();
    ensure!(
        code == 1 && problems.contains("streamer is not connected"),
        "status after the streamer stopped: {code} {s}"
    );
    eventually(
        Duration::from_secs(60),
        "the KlioWalArchiveLagging alert",
        || {
            let alerts = prom.api("alerts").map_err(anyhow::Error::msg)?;
            Ok(alerts["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| {
                    a["labels"]["alertname"] == "KlioWalArchiveLagging"
                        && a["labels"]["cluster"] == CLUSTER
                        && a["state"] == "firing"
                })
                .cloned())
        },
    )
    .map_err(|e| e.context(prom.log()))?;

    // Tier 2 goes away while new WAL arrives: the relay fails, and status says so.
    moto.kill();
    let _streamer = k.spawn_streamer(CLUSTER, &pg, "streamer", &["--tier2-backup"])?;
    pg.pgbench(&["-n", "-t", "200", "-c", "1"])?;
    switch_wal(&pg)?;
    let s = eventually(
        Duration::from_secs(90),
        "a failing relay in klio status",
        || {
            let (code, s) = status(&k)?;
            Ok((code == 1 && s["problems"].to_string().contains("relay is failing")).then_some(s))
        },
    )?;
    eprintln!("problems: {}", s["problems"]);

    // JSON logs: every line an object; the stream's lines carry the cluster.
    let log = k.server_log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.starts_with("---")).collect();
    ensure!(!lines.is_empty(), "no server log");
    let mut with_cluster = 0;
    for l in &lines {
        let v: Value = serde_json::from_str(l).with_context(|| format!("not JSON: {l}"))?;
        ensure!(
            v["level"].is_string() && v["ts"].is_string() && v["msg"].is_string(),
            "{l}"
        );
        if v["cluster"] == CLUSTER {
            with_cluster += 1;
        }
    }
    ensure!(with_cluster > 0, "no log line names the cluster:\n{log}");
    ensure!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a redirected log"
    );
    Ok(())
}

/// What the OTLP receiver got: metric names, and spans with their attributes.
#[derive(Default)]
struct Received {
    metrics: BTreeSet<String>,
    /// (span name, attributes as key=value).
    spans: Vec<(String, BTreeSet<String>)>,
}

mod otlp {
    use super::*;
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;

    #[derive(Clone)]
    pub struct Receiver(pub Arc<Mutex<Received>>);

    #[tonic::async_trait]
    impl MetricsService for Receiver {
        async fn export(
            &self,
            request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            let mut got = self.0.lock().unwrap();
            for rm in request.into_inner().resource_metrics {
                for sm in rm.scope_metrics {
                    for m in sm.metrics {
                        got.metrics.insert(m.name);
                    }
                }
            }
            Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
        }
    }

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut got = self.0.lock().unwrap();
            for rs in request.into_inner().resource_spans {
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        let attrs = span
                            .attributes
                            .iter()
                            .map(|kv| {
                                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                    Some(Any::StringValue(s)) => s.clone(),
                                    Some(other) => format!("{other:?}"),
                                    None => String::new(),
                                };
                                format!("{}={v}", kv.key)
                            })
                            .collect();
                        got.spans.push((span.name, attrs));
                    }
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    /// Serves OTLP/gRPC on 127.0.0.1:`port` until the runtime stops.
    pub fn serve(rt: &tokio::runtime::Runtime, port: u16, got: Arc<Mutex<Received>>) {
        let r = Receiver(got);
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(MetricsServiceServer::new(r.clone()))
                .add_service(TraceServiceServer::new(r))
                .serve(([127, 0, 0, 1], port).into())
                .await
                .unwrap();
        });
    }
}

#[test]
fn otlp_export_reaches_a_receiver_with_metrics_and_spans() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let got = Arc::new(Mutex::new(Received::default()));
    let port = free_port();
    otlp::serve(&rt, port, got.clone());
    let endpoint = format!("http://127.0.0.1:{port}");

    let mut k = Klio::start_with(&[CLUSTER], Vec::new())?;
    k.server_env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()),
        ("OTEL_METRIC_EXPORT_INTERVAL".into(), "1000".into()),
    ];
    k.kill_server()?;
    k.start_server()?;
    let pg = PgCluster::start(PgOptions::default())?;
    let mut streamer = k.spawn_streamer(CLUSTER, &pg, "streamer", &[])?;
    k.wait_archived(CLUSTER, 1, klio_pg::Lsn(1), Duration::from_secs(60))
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    let mut cmd = k.backup_command(CLUSTER, &pg, &[]);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    let out = run_ok(&mut cmd)?;
    let backup: Value = serde_json::from_slice(&out.stdout)?;
    let id = backup["backup_id"]
        .as_str()
        .context("no backup_id")?
        .to_string();

    eventually(
        Duration::from_secs(30),
        "metrics and spans over OTLP",
        || {
            let got = got.lock().unwrap();
            let metrics_ok = [
                "klio_rpc_requests",
                "klio_wal_stream_connected",
                "klio_wal_received_bytes",
            ]
            .iter()
            .all(|m| got.metrics.contains(*m));
            let span_ok = got.spans.iter().any(|(name, attrs)| {
                name == "klio.backup"
                    && attrs.contains(&format!("cluster={CLUSTER}"))
                    && attrs.contains(&format!("backup_id={id}"))
            });
            if metrics_ok && span_ok {
                return Ok(Some(()));
            }
            Err(anyhow::anyhow!(
                "metrics {:?}; spans {:?}",
                got.metrics,
                got.spans.iter().map(|(n, _)| n).collect::<Vec<_>>()
            ))
        },
    )?;
    streamer.kill()?;
    Ok(())
}

/// Runs Debian's headless Chromium on `args` (a new profile, no network chatter).
fn chromium(profile: &std::path::Path, args: &[String]) -> anyhow::Result<std::process::Output> {
    let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|b| std::path::Path::new(b).exists())
        .context("Chromium not found at /usr/bin/chromium\nHINT: apt-get install -y chromium (scripts/test.sh does)")?;
    let out = std::process::Command::new("timeout")
        .arg("120")
        .arg(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()?;
    Ok(out)
}

#[test]
fn report_renders_in_headless_chromium() -> anyhow::Result<()> {
    let k = Klio::start(&[CLUSTER])?;
    let pg = PgCluster::start(PgOptions::default())?;
    pg.pgbench_init(1)?;
    let mut streamer = k.spawn_streamer(CLUSTER, &pg, "streamer", &[])?;
    k.wait_archived(CLUSTER, 1, klio_pg::Lsn(1), Duration::from_secs(60))
        .map_err(|e| with_logs(e, &k, "streamer"))?;
    let first = k.backup(CLUSTER, &pg, &[])?;
    pg.pgbench(&["-n", "-t", "300", "-c", "2"])?;
    let second = k.backup(CLUSTER, &pg, &[])?;
    let out_dir = k.dir.path().join("report");
    let out = run_ok(
        k.client_command(&["report"], CLUSTER)
            .arg("--out")
            .arg(&out_dir),
    )?;
    let index = out_dir.join("index.html");
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == index.display().to_string(),
        "klio report printed {}",
        output_text(&out)
    );
    let html = std::fs::read_to_string(&index)?;
    // The recovery window and five charts.
    ensure!(html.matches("<svg").count() == 6, "charts missing:\n{html}");
    let data: Value = serde_json::from_slice(&std::fs::read(out_dir.join("report.json"))?)?;
    ensure!(
        data["backups"].as_array().map(Vec::len) == Some(2),
        "{data}"
    );
    // The second backup found most blocks stored already.
    ensure!(
        data["backups"][1]["dedup_ratio"]
            .as_f64()
            .unwrap_or_default()
            > 0.5,
        "{}",
        data["backups"][1]
    );

    let profile = k.dir.path().join("chromium");
    let url = format!("file://{}", index.display());
    let dom = chromium(&profile, &["--dump-dom".to_string(), url.clone()])?;
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    for id in [&first["backup_id"], &second["backup_id"]] {
        let id = id.as_str().unwrap_or_default();
        ensure!(
            dom_text.contains(id),
            "Chromium's DOM lacks backup {id}: {}",
            output_text(&dom)
        );
    }
    ensure!(dom_text.contains("What each backup cost") && dom_text.matches("<svg").count() == 6);
    let shot = k.dir.path().join("report.png");
    let taken = chromium(
        &profile,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=900,2400".to_string(),
            url,
        ],
    )?;
    let png =
        std::fs::read(&shot).with_context(|| format!("no screenshot: {}", output_text(&taken)))?;
    ensure!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "screenshot of {} bytes",
        png.len()
    );
    if let Ok(dir) = std::env::var("KLIO_TEST_ARTIFACTS") {
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(&shot, std::path::Path::new(&dir).join("klio-report.png"))?;
    }
    eprintln!("screenshot: {} bytes", png.len());
    streamer.kill()?;
    Ok(())
}
