//! Logs, metrics, traces and profiles of Klio's processes (the server, the sidecars, the
//! command-line tools).
//!
//! - **Logs** ([`LogFormat`]): text, or one JSON object per line; filtered by `KLIO_LOG`.
//! - **Metrics**: instruments of the OpenTelemetry API (`opentelemetry::global::meter`),
//!   exported as a Prometheus text endpoint ([`Telemetry::serve`], `/metrics`) and, when the
//!   standard `OTEL_EXPORTER_OTLP_*ENDPOINT` variables say where, over OTLP (gRPC).
//! - **Traces**: `tracing` spans, exported over OTLP the same way (backup, restore, relay,
//!   WAL fetch carry the cluster and backup id as attributes).
//! - **Profiles**: `/debug/pprof/profile?seconds=N` (CPU) and `/debug/pprof/heap` (live
//!   sampled allocations, jemalloc) on the same endpoint when asked for, in the pprof format
//!   (`go tool pprof`).
//!
//! OTLP follows the OpenTelemetry SDK's variables: `OTEL_SDK_DISABLED`,
//! `OTEL_METRICS_EXPORTER`/`OTEL_TRACES_EXPORTER` (`none` turns one off),
//! `OTEL_EXPORTER_OTLP_ENDPOINT` and the per-signal endpoints, headers and timeouts,
//! `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`.

mod logs;
mod profile;
mod rpc;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use logs::LogFormat;
pub use profile::MAX_SECONDS as MAX_PROFILE_SECONDS;
pub use rpc::{MeteredBody, RpcMetrics, RpcMetricsLayer};

/// The metrics endpoint's options, shared by the server and the sidecars.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MetricsArgs {
    /// Address of the HTTP endpoint serving Prometheus metrics at /metrics (e.g.
    /// 0.0.0.0:9187); none by default. OTLP export is configured by the OTEL_* variables
    #[arg(long, env = "KLIO_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Also serve CPU and heap profiles at /debug/pprof/profile?seconds=N and
    /// /debug/pprof/heap on the metrics endpoint (pprof format); troubleshooting only
    #[arg(long, env = "KLIO_PPROF")]
    pub pprof: bool,
}

/// The archive lag in seconds, as both ends of a WAL stream report it: the time since the
/// archive was last known to hold everything the primary had written (`complete_at`), and
/// 0 while it does (a connected stream with `lag_bytes` 0) or before it ever did.
pub fn archive_lag_seconds(
    connected: bool,
    lag_bytes: u64,
    complete_at: Option<std::time::SystemTime>,
    now: std::time::SystemTime,
) -> f64 {
    match complete_at {
        Some(t) if !(connected && lag_bytes == 0) => {
            now.duration_since(t).unwrap_or_default().as_secs_f64()
        }
        _ => 0.0,
    }
}

/// Registers an observable gauge on `meter`; `observe` reports its values (with their
/// labels) at each collection. `unit` is the UCUM unit OTLP carries ("" for none); the
/// Prometheus names already end with it.
pub fn gauge(
    meter: &opentelemetry::metrics::Meter,
    name: &'static str,
    help: &'static str,
    unit: &'static str,
    observe: impl Fn(&dyn opentelemetry::metrics::AsyncInstrument<f64>) + Send + Sync + 'static,
) {
    let mut b = meter
        .f64_observable_gauge(name)
        .with_description(help)
        .with_callback(observe);
    if !unit.is_empty() {
        b = b.with_unit(unit);
    }
    b.build();
}

/// The process's telemetry: keep it alive while the process runs, and call
/// [`Telemetry::shutdown`] at the end so that buffered spans and metrics are sent.
pub struct Telemetry {
    registry: prometheus::Registry,
    meters: SdkMeterProvider,
    tracer: Option<SdkTracerProvider>,
}

/// Whether OTLP export of `signal` ("METRICS" or "TRACES") is asked for by the standard
/// variables: an endpoint is set, and neither the SDK nor that exporter is turned off.
fn otlp_enabled(signal: &str) -> bool {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return false;
    }
    if var(&format!("OTEL_{signal}_EXPORTER")).is_some_and(|v| v.eq_ignore_ascii_case("none")) {
        return false;
    }
    var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || var(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")).is_some()
}

/// Sets up logging, metrics and traces for the process `service` (its default
/// `service.name`). Call it once, inside the Tokio runtime (the OTLP exporters need it).
pub fn init(service: &'static str, format: LogFormat) -> anyhow::Result<Telemetry> {
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let resource = resource.build();

    let registry = prometheus::Registry::new();
    let prometheus = opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .scope_info_enabled(false)
        .without_units()
        .build()
        .context("set up the Prometheus exporter")?;
    let mut meters = SdkMeterProvider::builder()
        .with_resource(resource.clone())
        .with_reader(prometheus);
    if otlp_enabled("METRICS") {
        let exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()
            .context("set up the OTLP metric exporter (OTEL_EXPORTER_OTLP_* variables)")?;
        meters = meters.with_periodic_exporter(exporter);
    }
    let meters = meters.build();
    opentelemetry::global::set_meter_provider(meters.clone());

    let tracer = if otlp_enabled("TRACES") {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .context("set up the OTLP span exporter (OTEL_EXPORTER_OTLP_* variables)")?;
        Some(
            SdkTracerProvider::builder()
                .with_resource(resource)
                .with_batch_exporter(exporter)
                .build(),
        )
    } else {
        None
    };

    let filter = EnvFilter::try_from_env("KLIO_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let output = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .fmt_fields(logs::json_fields())
            .event_format(logs::JsonLines)
            .boxed(),
    };
    let spans = tracer
        .as_ref()
        .map(|t| tracing_opentelemetry::layer().with_tracer(t.tracer("klio")));
    tracing_subscriber::registry()
        .with(output.with_filter(filter))
        .with(spans)
        .try_init()
        .context("set up logging")?;
    Ok(Telemetry {
        registry,
        meters,
        tracer,
    })
}

impl Telemetry {
    /// The current metrics in the Prometheus text format.
    pub fn prometheus_text(&self) -> String {
        render(&self.registry)
    }

    /// Binds `args.metrics_listen` (when set) and serves `/metrics` there, and the CPU
    /// profile with `args.pprof`, until `cancel`. Binding errors are returned at once.
    pub async fn serve(
        &self,
        args: &MetricsArgs,
        cancel: CancellationToken,
    ) -> anyhow::Result<Option<SocketAddr>> {
        let Some(addr) = args.metrics_listen else {
            return Ok(None);
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen on {addr} (--metrics-listen)"))?;
        let bound = listener.local_addr()?;
        let mut app = axum::Router::new().route("/metrics", get(metrics));
        if args.pprof {
            // Allocations are sampled from now on (jemalloc, one per 512 KiB on average).
            if let Err(e) = klio_heap_profile::activate().await {
                tracing::warn!(error = %format!("{e:#}"), "heap profiles are not available");
            }
            app = app
                .route("/debug/pprof/profile", get(cpu_profile))
                .route("/debug/pprof/heap", get(heap_profile));
        }
        let app = app.with_state(self.registry.clone());
        tracing::info!(address = %bound, pprof = args.pprof, "serving metrics");
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(cancel.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "the metrics endpoint stopped");
            }
        });
        Ok(Some(bound))
    }

    /// Sends what is buffered (spans, the last metrics) and stops the exporters.
    pub fn shutdown(self) {
        if let Some(t) = self.tracer
            && let Err(e) = t.shutdown()
        {
            tracing::debug!(error = %e, "span exporter shutdown");
        }
        if let Err(e) = self.meters.shutdown() {
            tracing::debug!(error = %e, "metric exporter shutdown");
        }
    }
}

fn render(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder as _;
    let mut out = Vec::new();
    // Encoding our own registry's families cannot fail but for I/O on a Vec.
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

async fn metrics(State(registry): State<prometheus::Registry>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(&registry),
    )
        .into_response()
}

async fn heap_profile() -> Response {
    match klio_heap_profile::pprof().await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (header::CONTENT_DISPOSITION, "attachment; filename=\"heap\""),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")).into_response(),
    }
}

#[derive(serde::Deserialize)]
struct ProfileQuery {
    seconds: Option<u64>,
}

async fn cpu_profile(Query(q): Query<ProfileQuery>) -> Response {
    let seconds = q.seconds.unwrap_or(30);
    if !(1..=profile::MAX_SECONDS).contains(&seconds) {
        return (
            StatusCode::BAD_REQUEST,
            format!("seconds must be 1 to {}\n", profile::MAX_SECONDS),
        )
            .into_response();
    }
    let taken =
        tokio::task::spawn_blocking(move || profile::cpu_profile(Duration::from_secs(seconds)))
            .await;
    match taken {
        Ok(Ok(bytes)) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"profile\"",
                ),
            ],
            bytes,
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
