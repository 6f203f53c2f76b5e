//! `klio report --out DIR`: a self-contained HTML page (inline SVG charts, no script, no
//! external resource) about one cluster: its backups over time (duration, stored and new
//! bytes, dedup and compression ratios), the WAL written per hour between backups, the
//! recovery window per tier, and what each backup really cost in storage. `report.json`
//! beside it holds the same figures.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use klio_proto::backup::v1 as pb;
use serde_json::{Value, json};

use crate::backup::backup_client;
use crate::client::{ClientArgs, status_error};
use crate::restore::{BackupInfo, list_backups};

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Directory to write index.html and report.json into (created if missing)
    #[arg(long)]
    pub out: PathBuf,
}

/// One backup's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub backup_id: String,
    pub started_at: f64,
    pub stopped_at: f64,
    pub duration_seconds: f64,
    pub logical_bytes: u64,
    /// Compressed, encrypted bytes the backup added to the repository: what it cost.
    pub new_bytes: u64,
    /// The same blocks before compression.
    pub new_plain_bytes: u64,
    /// Share of the data directory already stored (deduplicated): 1 - new plain / logical.
    pub dedup_ratio: f64,
    /// Plain / stored size of the new blocks.
    pub compression_ratio: f64,
    pub start_lsn: u64,
    pub tiers: String,
}

fn time_of(v: &Value) -> Option<f64> {
    let t =
        time::OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

/// The table of backups (those whose metadata has the times), oldest first.
pub fn rows(backups: &[BackupInfo]) -> Vec<Row> {
    backups
        .iter()
        .filter_map(|b| {
            let m = &b.metadata;
            let started_at = time_of(&m["started_at"])?;
            let stopped_at = time_of(&m["stopped_at"])?;
            let logical = m["logical_size"].as_u64().unwrap_or_default();
            let new_bytes = m["bytes_new"].as_u64().unwrap_or_default();
            let new_plain = m["plain_bytes_new"].as_u64().unwrap_or_default();
            let tiers = match (b.in_tier1, b.in_tier2) {
                (true, true) => "1, 2",
                (true, false) => "1",
                (false, true) => "2",
                (false, false) => "-",
            };
            Some(Row {
                backup_id: b.id.clone(),
                started_at,
                stopped_at,
                duration_seconds: (stopped_at - started_at).max(0.0),
                logical_bytes: logical,
                new_bytes,
                new_plain_bytes: new_plain,
                dedup_ratio: if logical > 0 {
                    (1.0 - new_plain as f64 / logical as f64).clamp(0.0, 1.0)
                } else {
                    0.0
                },
                compression_ratio: if new_bytes > 0 {
                    new_plain as f64 / new_bytes as f64
                } else {
                    0.0
                },
                start_lsn: m["start_lsn"]
                    .as_str()
                    .and_then(|s| s.parse::<klio_pg::Lsn>().ok())
                    .map_or(0, |l| l.0),
                tiers: tiers.to_string(),
            })
        })
        .collect()
}

/// WAL bytes per hour between consecutive backups (from their start LSNs and times), and
/// from the newest backup to the archive's end now.
pub fn wal_per_hour(rows: &[Row], end: Option<(f64, u64)>) -> Vec<(f64, f64, f64)> {
    let mut points: Vec<(f64, u64)> = rows.iter().map(|r| (r.started_at, r.start_lsn)).collect();
    points.extend(end);
    points
        .windows(2)
        .filter_map(|w| {
            let ((t0, l0), (t1, l1)) = (w[0], w[1]);
            let hours = (t1 - t0) / 3600.0;
            (hours > 0.0 && l1 >= l0).then(|| (t0, t1, (l1 - l0) as f64 / hours))
        })
        .collect()
}

pub async fn run(a: ReportArgs) -> anyhow::Result<()> {
    let cluster = a.client.cluster.clone();
    let mut c = backup_client(&a.client).await?;
    let backups = list_backups(&mut c, &cluster, a.client.tier2_recovery).await?;
    let status = c
        .cluster_status(pb::ClusterStatusRequest {
            cluster: cluster.clone(),
        })
        .await
        .map_err(|s| status_error("read the cluster's status", s))?
        .into_inner();
    let status: Value =
        serde_json::from_slice(&status.status_json).context("the server's status")?;
    let rows = rows(&backups);
    let now = status["server_time"].as_f64().unwrap_or_default();
    let end = status["wal"]["archive_end_lsn"]
        .as_str()
        .and_then(|s| s.parse::<klio_pg::Lsn>().ok())
        .map(|l| (now, l.0));
    let wal = wal_per_hour(&rows, end);
    std::fs::create_dir_all(&a.out).with_context(|| format!("create \"{}\"", a.out.display()))?;
    let html = render(&cluster, &rows, &wal, &status);
    let index = a.out.join("index.html");
    std::fs::write(&index, html).with_context(|| format!("write \"{}\"", index.display()))?;
    let data = json!({"cluster": cluster, "backups": rows, "wal_per_hour": wal.iter().map(|(a, b, v)| json!({"from": a, "to": b, "bytes_per_hour": v})).collect::<Vec<_>>(), "status": status});
    std::fs::write(a.out.join("report.json"), serde_json::to_vec_pretty(&data)?)?;
    println!("{}", index.display());
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn date(t: f64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t as i64)
        .ok()
        .and_then(|d| {
            d.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]"
            ))
            .ok()
        })
        .unwrap_or_else(|| "-".to_string())
}

fn bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

/// How a chart's values read.
#[derive(Clone, Copy)]
enum Unit {
    Seconds,
    Bytes,
    BytesPerHour,
    Ratio,
    Factor,
}

impl Unit {
    fn show(self, v: f64) -> String {
        match self {
            Unit::Seconds if v < 10.0 => format!("{v:.1} s"),
            Unit::Seconds => format!("{v:.0} s"),
            Unit::Bytes => bytes(v),
            Unit::BytesPerHour => format!("{}/h", bytes(v)),
            Unit::Ratio => format!("{:.0}%", v * 100.0),
            Unit::Factor => format!("{v:.1}x"),
        }
    }
}

const W: f64 = 760.0;
const H: f64 = 220.0;
const LEFT: f64 = 80.0;
const BOTTOM: f64 = 30.0;
const COLORS: [&str; 3] = ["#2a6fdb", "#e07b39", "#3a9d5d"];

/// A chart of series of (time, value) points as bars (one series) or lines.
fn chart(title: &str, unit: Unit, series: &[(&str, Vec<(f64, f64)>)], bars: bool) -> String {
    let mut svg = String::new();
    let points: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let _ = write!(
        svg,
        "<figure><figcaption>{}</figcaption><svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\">",
        esc(title),
        esc(title)
    );
    if points.is_empty() {
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" class=\"empty\">no data yet</text></svg></figure>",
            W / 2.0 - 40.0,
            H / 2.0
        );
        return svg;
    }
    let (mut x0, mut x1) = points.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(*x), b.max(*x))
    });
    if x1 - x0 < 1.0 {
        x0 -= 1800.0;
        x1 += 1800.0;
    }
    let ymax = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
    let plot_w = W - LEFT - 20.0;
    let plot_h = H - BOTTOM - 20.0;
    let x = |t: f64| LEFT + (t - x0) / (x1 - x0) * plot_w;
    let y = |v: f64| 10.0 + plot_h - v / ymax * plot_h;
    // Axes and grid.
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" class=\"grid\"/><text x=\"{}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"end\">{}</text>",
            W - 20.0,
            LEFT - 6.0,
            y(v) + 4.0,
            esc(&unit.show(v)),
            y = y(v)
        );
    }
    for (i, t) in [x0, (x0 + x1) / 2.0, x1].iter().enumerate() {
        let anchor = ["start", "middle", "end"][i];
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" class=\"tick\" text-anchor=\"{anchor}\">{}</text>",
            x(*t),
            H - 8.0,
            esc(&date(*t))
        );
    }
    for (si, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[si % COLORS.len()];
        if bars {
            let width = (plot_w / (pts.len() as f64 * 1.5)).clamp(2.0, 30.0);
            for (t, v) in pts {
                let _ = write!(
                    svg,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{width:.1}\" height=\"{:.1}\" fill=\"{color}\"><title>{}: {}</title></rect>",
                    x(*t) - width / 2.0,
                    y(*v),
                    (y(0.0) - y(*v)).max(0.0),
                    esc(&date(*t)),
                    esc(&unit.show(*v))
                );
            }
        } else {
            let path: Vec<String> = pts
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
                .collect();
            let _ = write!(
                svg,
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
                path.join(" ")
            );
            for (t, v) in pts {
                let _ = write!(
                    svg,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"><title>{}: {}</title></circle>",
                    x(*t),
                    y(*v),
                    esc(&date(*t)),
                    esc(&unit.show(*v))
                );
            }
        }
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" class=\"legend\" fill=\"{color}\">{}</text>",
            LEFT + 10.0 + 160.0 * si as f64,
            18,
            esc(name)
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// Each tier's recovery window as a bar on a common time axis.
fn windows(status: &Value) -> String {
    let tiers: Vec<(&str, f64, f64)> = ["tier1", "tier2"]
        .iter()
        .filter_map(|t| {
            let w = &status["recovery_window"][t];
            Some((
                if *t == "tier1" { "Tier 1" } else { "Tier 2" },
                w["from"].as_f64()?,
                w["to"].as_f64()?,
            ))
        })
        .collect();
    let mut svg = String::from(
        "<figure><figcaption>Recovery window per tier (a restore can reach any point in a bar)</figcaption>",
    );
    if tiers.is_empty() {
        svg.push_str("<p class=\"empty\">no recovery window yet: no complete backup</p></figure>");
        return svg;
    }
    let x0 = tiers.iter().map(|t| t.1).fold(f64::MAX, f64::min);
    let x1 = tiers
        .iter()
        .map(|t| t.2)
        .fold(f64::MIN, f64::max)
        .max(x0 + 1.0);
    let h = 40.0 * tiers.len() as f64 + 30.0;
    let plot_w = W - LEFT - 20.0;
    let x = |t: f64| LEFT + (t - x0) / (x1 - x0) * plot_w;
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {h}\" width=\"{W}\" height=\"{h}\" role=\"img\" aria-label=\"recovery window\">"
    );
    for (i, (name, from, to)) in tiers.iter().enumerate() {
        let yy = 10.0 + 40.0 * i as f64;
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"end\">{name}</text><rect x=\"{:.1}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"24\" fill=\"{}\"><title>{name}: {} .. {}</title></rect>",
            LEFT - 6.0,
            yy + 16.0,
            x(*from),
            (x(*to) - x(*from)).max(2.0),
            COLORS[i],
            esc(&date(*from)),
            esc(&date(*to))
        );
    }
    for (i, t) in [x0, x1].iter().enumerate() {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" class=\"tick\" text-anchor=\"{}\">{}</text>",
            x(*t),
            h - 6.0,
            ["start", "end"][i],
            esc(&date(*t))
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// The page.
pub fn render(cluster: &str, rows: &[Row], wal: &[(f64, f64, f64)], status: &Value) -> String {
    let series = |f: fn(&Row) -> f64| {
        rows.iter()
            .map(|r| (r.started_at, f(r)))
            .collect::<Vec<_>>()
    };
    let total_new: u64 = rows.iter().map(|r| r.new_bytes).sum();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Klio report: {c}</title><style>\
    body{{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:820px}}\
    h1{{font-size:22px}}figure{{margin:18px 0}}figcaption{{font-weight:600;margin-bottom:4px}}\
    .grid{{stroke:#ddd}}.tick{{font-size:11px;fill:#555}}.legend{{font-size:12px}}.empty{{color:#888;fill:#888}}\
    table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}\
    th{{background:#f3f3f3}}td:first-child{{text-align:left}}\
    </style></head><body><h1>Klio report: cluster {c}</h1><p>{n} backups; {stored} added to the repository in total; generated {gen}.</p>",
        c = esc(cluster),
        n = rows.len(),
        stored = esc(&bytes(total_new as f64)),
        gen = esc(&date(status["server_time"].as_f64().unwrap_or_default())),
    );
    html.push_str(&windows(status));
    html.push_str(&chart(
        "Backup duration",
        Unit::Seconds,
        &[("duration", series(|r| r.duration_seconds))],
        true,
    ));
    html.push_str(&chart(
        "Size of each backup and what it added",
        Unit::Bytes,
        &[
            ("logical size", series(|r| r.logical_bytes as f64)),
            ("new, stored", series(|r| r.new_bytes as f64)),
            (
                "new, before compression",
                series(|r| r.new_plain_bytes as f64),
            ),
        ],
        false,
    ));
    html.push_str(&chart(
        "Deduplication: share of the data directory already stored",
        Unit::Ratio,
        &[("deduplicated", series(|r| r.dedup_ratio))],
        false,
    ));
    html.push_str(&chart(
        "Compression of the new blocks (plain size / stored size)",
        Unit::Factor,
        &[("compression", series(|r| r.compression_ratio))],
        false,
    ));
    let wal_points: Vec<(f64, f64)> = wal.iter().map(|(a, b, v)| ((a + b) / 2.0, *v)).collect();
    html.push_str(&chart(
        "WAL written per hour (average between backups)",
        Unit::BytesPerHour,
        &[("WAL", wal_points)],
        true,
    ));
    html.push_str("<h2>What each backup cost</h2><table><tr><th>backup</th><th>started</th><th>duration</th><th>logical</th><th>new (stored)</th><th>new (plain)</th><th>deduplicated</th><th>compression</th><th>tiers</th></tr>");
    for r in rows {
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{:.1} s</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}%</td><td>{:.2}x</td><td>{}</td></tr>",
            esc(&r.backup_id),
            esc(&date(r.started_at)),
            r.duration_seconds,
            esc(&bytes(r.logical_bytes as f64)),
            esc(&bytes(r.new_bytes as f64)),
            esc(&bytes(r.new_plain_bytes as f64)),
            r.dedup_ratio * 100.0,
            r.compression_ratio,
            esc(&r.tiers)
        );
    }
    html.push_str("</table><p>New (stored): the compressed, encrypted bytes the backup added to the repository, which is what keeping it costs beyond the backups before it.</p></body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, start: &str, stop: &str, lsn: &str, logical: u64, new: u64) -> BackupInfo {
        BackupInfo {
            id: id.into(),
            metadata: json!({"started_at": start, "stopped_at": stop, "start_lsn": lsn,
                "logical_size": logical, "bytes_new": new, "plain_bytes_new": new * 3}),
            in_tier1: true,
            in_tier2: false,
        }
    }

    #[test]
    fn figures_and_page() {
        let b = [
            info(
                "backup-a<",
                "2026-01-01T00:00:00Z",
                "2026-01-01T00:01:40Z",
                "0/1000000",
                1000,
                300,
            ),
            info(
                "backup-b",
                "2026-01-01T02:00:00Z",
                "2026-01-01T02:00:10Z",
                "0/3000000",
                1000,
                10,
            ),
        ];
        let r = rows(&b);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].duration_seconds, 100.0);
        assert!((r[1].dedup_ratio - 0.97).abs() < 1e-9);
        assert!((r[1].compression_ratio - 3.0).abs() < 1e-9);
        let wal = wal_per_hour(&r, None);
        assert_eq!(wal.len(), 1);
        assert!((wal[0].2 - f64::from(0x2000000) / 2.0).abs() < 1e-6);
        let page = render("pg", &r, &wal, &json!({"server_time": 1.8e9}));
        assert!(page.contains("backup-a&lt;") && !page.contains("backup-a<"));
        assert_eq!(page.matches("<svg").count(), 5);
    }
}
