//! Request metrics of tonic servers (the Klio server's services, the sidecars' CNPG-I
//! services).

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

/// A tower layer counting and timing every gRPC request of a tonic server, by path and
/// final status (read from the trailers, so streams count when they end):
/// `klio_rpc_requests_total{service,method,code}` and `klio_rpc_duration_seconds`.
#[derive(Clone)]
pub struct RpcMetricsLayer(Metrics);

impl RpcMetricsLayer {
    /// The instruments, on the global meter provider under `scope`.
    pub fn new(scope: &'static str) -> RpcMetricsLayer {
        let meter = opentelemetry::global::meter(scope);
        RpcMetricsLayer(Metrics(Arc::new(Instruments {
            requests: meter
                .u64_counter("klio_rpc_requests")
                .with_description("gRPC requests served, by service, method and status code")
                .build(),
            duration: meter
                .f64_histogram("klio_rpc_duration_seconds")
                .with_description(
                    "gRPC request duration (for streams: until the last message), by service and method",
                )
                .with_unit("s")
                .with_boundaries(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0,
                ])
                .build(),
        })))
    }
}

struct Instruments {
    requests: Counter<u64>,
    duration: Histogram<f64>,
}

#[derive(Clone)]
struct Metrics(Arc<Instruments>);

impl Metrics {
    /// A request to `path` (`/package.Service/Method`) ended with gRPC `code` after
    /// `elapsed`.
    fn rpc(&self, path: &str, code: &str, elapsed: Duration) {
        let (service, method) = split_path(path);
        let (service, method) = (
            KeyValue::new("service", service),
            KeyValue::new("method", method),
        );
        self.0.requests.add(
            1,
            &[
                service.clone(),
                method.clone(),
                KeyValue::new("code", code.to_string()),
            ],
        );
        self.0
            .duration
            .record(elapsed.as_secs_f64(), &[service, method]);
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service [`RpcMetricsLayer`] makes.
#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Metrics,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: http_body::Body + Unpin + Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let done = Done {
            path: req.uri().path().to_string(),
            started: Instant::now(),
            metrics: self.metrics.clone(),
            code: None,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            let (parts, body) = response.into_parts();
            let mut done = done;
            // A trailers-only answer (most errors) carries the status in its headers.
            done.code = parts.headers.get("grpc-status").map(grpc_code);
            Ok(http::Response::from_parts(
                parts,
                MeteredBody {
                    inner: body,
                    done: Some(done),
                },
            ))
        })
    }
}

/// What is recorded when a response ends.
struct Done {
    path: String,
    started: Instant,
    metrics: Metrics,
    code: Option<String>,
}

impl Done {
    fn record(self, code: Option<String>) {
        let code = code.or(self.code).unwrap_or_else(|| "Ok".to_string());
        self.metrics.rpc(&self.path, &code, self.started.elapsed());
    }
}

/// The name of a `grpc-status` value (`Ok`, `InvalidArgument`...).
fn grpc_code(v: &http::HeaderValue) -> String {
    const NAMES: [&str; 17] = [
        "Ok",
        "Cancelled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    let n = v
        .to_str()
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(2);
    NAMES.get(n).copied().unwrap_or("Unknown").to_string()
}

/// A response body that records its request when the last frame (the trailers) passes,
/// or when it is dropped unfinished (the client went away: `Cancelled`).
pub struct MeteredBody<B> {
    inner: B,
    done: Option<Done>,
}

impl<B: http_body::Body + Unpin> http_body::Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(done) = this.done.take()
                {
                    done.record(trailers.get("grpc-status").map(grpc_code));
                }
            }
            std::task::Poll::Ready(Some(Err(_))) => {
                if let Some(done) = this.done.take() {
                    done.record(Some("Internal".to_string()));
                }
            }
            std::task::Poll::Ready(None) => {
                if let Some(done) = this.done.take() {
                    done.record(None);
                }
            }
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let code = done.code.clone().unwrap_or_else(|| "Cancelled".to_string());
            done.record(Some(code));
        }
    }
}

/// `/klio.backup.v1.BackupService/Commit` -> (`klio.backup.v1.BackupService`, `Commit`).
fn split_path(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    // Only well-formed names become label values: a client cannot invent series.
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
    };
    if ok(service) && ok(method) {
        (service.to_string(), method.to_string())
    } else {
        ("unknown".to_string(), "unknown".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_become_bounded_labels() {
        assert_eq!(
            split_path("/klio.backup.v1.BackupService/Commit"),
            ("klio.backup.v1.BackupService".into(), "Commit".into())
        );
        for bad in ["/x/y z", "/", "/a", &format!("/{}/m", "s".repeat(65))] {
            assert_eq!(
                split_path(bad),
                ("unknown".into(), "unknown".into()),
                "{bad}"
            );
        }
    }
}
