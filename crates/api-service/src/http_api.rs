//! The HTTPS side: connections, authentication and authorization of each request, and the
//! Kubernetes API conventions (discovery, lists, gets, watches, tables, Status errors).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::auth::{Attributes, Authorizer, FrontProxy, User, authenticate};
use crate::catalog::{Catalog, Event};
use crate::objects::{
    FieldSelector, IncludeObject, KIND, LabelSelector, RESOURCE, VERSION, labels_of,
    partial_metadata, status, table,
};
use crate::openapi;

type Body = BoxBody<Bytes, Infallible>;

/// Everything a request needs.
pub(crate) struct Api {
    pub group: String,
    pub catalog: Arc<Catalog>,
    pub front_proxy: Arc<RwLock<Option<Arc<FrontProxy>>>>,
    pub authorizer: Authorizer,
    pub stop: CancellationToken,
}

/// The longest a watch stays open without `timeoutSeconds` (kube-apiserver picks 30-60 min).
const DEFAULT_WATCH: Duration = Duration::from_secs(30 * 60);
/// How long a connection may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves HTTPS on `listener` until `stop`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    provider: klio_tls::ConfigProvider,
    api: Arc<Api>,
    stop: CancellationToken,
) {
    let mut incoming = klio_tls::tls_incoming_reloading(listener, provider);
    loop {
        let conn = tokio::select! {
            () = stop.cancelled() => return,
            c = incoming.next() => c,
        };
        let conn = match conn {
            Some(Ok(c)) => c,
            Some(Err(_)) => continue,
            None => return,
        };
        let peer_cn = conn
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| crate::auth::common_name(c).unwrap_or_default());
        let api = api.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(conn);
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                let cn = peer_cn.clone();
                async move { Ok::<_, Infallible>(api.handle(req, cn.as_deref()).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(64 * 1024);
            let conn = builder.serve_connection(io, service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_response(code, &status(code.as_u16(), reason, message, None))
}

/// What a request is for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Apis,
    Group,
    Resources,
    OpenApiV2,
    OpenApiV3Index,
    OpenApiV3,
    /// List (or watch) in one namespace or all (`None`).
    Collection {
        namespace: Option<String>,
        watch: bool,
    },
    /// One object (or a watch of it).
    Object {
        namespace: String,
        name: String,
        watch: bool,
    },
    NotFound,
}

fn route(path: &str, group: &str) -> Route {
    let path = path.trim_end_matches('/');
    match path {
        "/apis" => return Route::Apis,
        "/openapi/v2" => return Route::OpenApiV2,
        "/openapi/v3" => return Route::OpenApiV3Index,
        _ => {}
    }
    if path == format!("/openapi/v3/apis/{group}/{VERSION}") {
        return Route::OpenApiV3;
    }
    let Some(rest) = path.strip_prefix("/apis/") else {
        return Route::NotFound;
    };
    let segs: Vec<&str> = rest.split('/').collect();
    if segs.first() != Some(&group) {
        return Route::NotFound;
    }
    match segs.len() {
        1 => return Route::Group,
        2 if segs[1] == VERSION => return Route::Resources,
        _ if segs[1] != VERSION => return Route::NotFound,
        _ => {}
    }
    let (watch, segs) = match segs[2] {
        "watch" => (true, &segs[3..]),
        _ => (false, &segs[2..]),
    };
    match segs {
        [r] if *r == RESOURCE => Route::Collection {
            namespace: None,
            watch,
        },
        ["namespaces", ns, r] if *r == RESOURCE => Route::Collection {
            namespace: Some((*ns).to_string()),
            watch,
        },
        ["namespaces", ns, r, name] if *r == RESOURCE => Route::Object {
            namespace: (*ns).to_string(),
            name: (*name).to_string(),
            watch,
        },
        _ => Route::NotFound,
    }
}

/// Decodes a query string (`a=b&c=d`, `%XX` and `+`); the last value of a key wins.
fn query(q: Option<&str>) -> HashMap<String, String> {
    let decode = |s: &str| crate::percent_decode(&s.replace('+', " "));
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// What the client wants back, from its Accept header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    Object,
    /// `meta.k8s.io` Table, in this version (v1 or v1beta1).
    Table(&'static str),
    PartialMetadata,
}

fn form(accept: &str) -> Form {
    for media in accept.split(',') {
        let params: Vec<&str> = media.split(';').map(str::trim).collect();
        if !params
            .first()
            .is_some_and(|m| *m == "application/json" || *m == "*/*")
        {
            continue;
        }
        let has = |p: &str| params.contains(&p);
        if has("as=Table") && has("g=meta.k8s.io") {
            if has("v=v1") {
                return Form::Table("meta.k8s.io/v1");
            }
            if has("v=v1beta1") {
                return Form::Table("meta.k8s.io/v1beta1");
            }
            continue;
        }
        if (has("as=PartialObjectMetadataList") || has("as=PartialObjectMetadata"))
            && has("g=meta.k8s.io")
            && has("v=v1")
        {
            return Form::PartialMetadata;
        }
        if params.iter().all(|p| !p.starts_with("as=")) {
            return Form::Object;
        }
    }
    Form::Object
}

impl Api {
    async fn handle(&self, req: Request<Incoming>, peer_cn: Option<&str>) -> Response<Body> {
        let path = req.uri().path().to_string();
        match path.as_str() {
            "/healthz" | "/livez" => return text_ok(),
            "/readyz" => {
                return if self.front_proxy.read().is_ok_and(|f| f.is_some()) {
                    text_ok()
                } else {
                    error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "ServiceUnavailable",
                        "the authentication settings are not loaded yet",
                    )
                };
            }
            _ => {}
        }
        let Some(fp) = self.front_proxy.read().ok().and_then(|f| f.clone()) else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the API service has not loaded kube-system/extension-apiserver-authentication yet",
            );
        };
        let user = match authenticate(&fp, peer_cn, req.headers()) {
            Ok(u) => u,
            Err(reason) => {
                tracing::info!(%path, %reason, "request refused: not authenticated");
                return error(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    &format!("Unauthorized: {reason}"),
                );
            }
        };
        if req.method() != Method::GET {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                &format!(
                    "{RESOURCE}.{} are read-only: backups are made by `klio backup` or CloudNativePG Backups and removed by retention",
                    self.group
                ),
            );
        }
        let q = query(req.uri().query());
        let accept = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let mut r = route(&path, &self.group);
        let wants_watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
        match &mut r {
            Route::Collection { watch, .. } | Route::Object { watch, .. } => *watch |= wants_watch,
            _ => {}
        }
        let attrs = match &r {
            Route::Collection { namespace, watch } => Attributes::Resource {
                verb: if *watch { "watch" } else { "list" }.into(),
                group: self.group.clone(),
                version: VERSION.into(),
                resource: RESOURCE.into(),
                namespace: namespace.clone().unwrap_or_default(),
                name: String::new(),
            },
            Route::Object {
                namespace,
                name,
                watch,
            } => Attributes::Resource {
                verb: if *watch { "watch" } else { "get" }.into(),
                group: self.group.clone(),
                version: VERSION.into(),
                resource: RESOURCE.into(),
                namespace: namespace.clone(),
                name: name.clone(),
            },
            _ => Attributes::NonResource {
                verb: "get".into(),
                path: path.clone(),
            },
        };
        match self.authorizer.authorize(&user, &attrs).await {
            Ok(d) if d.allowed => {}
            Ok(d) => return forbidden(&user, &attrs, &d.reason),
            Err(e) => {
                tracing::warn!(error = %e, "cannot authorize a request");
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    &format!("cannot authorize the request: {e}"),
                );
            }
        }
        let g = &self.group;
        match r {
            Route::Apis => json_response(StatusCode::OK, &openapi::group_list(g)),
            Route::Group => json_response(StatusCode::OK, &openapi::group(g)),
            Route::Resources => json_response(StatusCode::OK, &openapi::resource_list(g)),
            Route::OpenApiV2 => json_response(StatusCode::OK, &openapi::v2(g)),
            Route::OpenApiV3Index => {
                let doc = serde_json::to_vec(&openapi::v3(g)).unwrap_or_default();
                let hash = blake3::hash(&doc).to_hex()[..16].to_string();
                json_response(StatusCode::OK, &openapi::v3_index(g, &hash))
            }
            Route::OpenApiV3 => json_response(StatusCode::OK, &openapi::v3(g)),
            Route::NotFound => error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            ),
            Route::Collection { namespace, watch } => {
                self.collection(namespace, None, watch, &q, &accept).await
            }
            Route::Object {
                namespace,
                name,
                watch: true,
            } => {
                self.collection(Some(namespace), Some(name), true, &q, &accept)
                    .await
            }
            Route::Object {
                namespace, name, ..
            } => self.get(&namespace, &name, &q, &accept).await,
        }
    }

    /// Reads the Klio server unless the client accepts any version (`resourceVersion=0`)
    /// and the catalog was read before.
    async fn current(&self, q: &HashMap<String, String>) -> Result<(), Response<Body>> {
        let any = q.get("resourceVersion").is_some_and(|v| v == "0");
        if any && self.catalog.loaded() {
            return Ok(());
        }
        self.catalog.refresh(Instant::now()).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot read the catalog");
            error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", &e)
        })
    }

    async fn get(
        &self,
        namespace: &str,
        name: &str,
        q: &HashMap<String, String>,
        accept: &str,
    ) -> Response<Body> {
        if let Err(r) = self.current(q).await {
            return r;
        }
        let found = (namespace == self.catalog.namespace())
            .then(|| self.catalog.get(name))
            .flatten();
        let Some(object) = found else {
            return json_response(
                StatusCode::NOT_FOUND,
                &status(
                    404,
                    "NotFound",
                    &format!("{RESOURCE}.{} \"{name}\" not found", self.group),
                    Some(json!({"name": name, "group": self.group, "kind": RESOURCE})),
                ),
            );
        };
        let rv = object["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_string();
        match form(accept) {
            Form::Object => json_response(StatusCode::OK, &object),
            Form::PartialMetadata => json_response(StatusCode::OK, &partial_metadata(&object)),
            Form::Table(v) => {
                let mut t = table(&[&object], &rv, include(q));
                t["apiVersion"] = v.into();
                json_response(StatusCode::OK, &t)
            }
        }
    }

    async fn collection(
        &self,
        namespace: Option<String>,
        name: Option<String>,
        watch: bool,
        q: &HashMap<String, String>,
        accept: &str,
    ) -> Response<Body> {
        let labels = match LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str)) {
            Ok(s) => s,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("unable to parse labelSelector: {e}"),
                );
            }
        };
        let fields = match FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str)) {
            Ok(s) => s,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("unable to parse fieldSelector: {e}"),
                );
            }
        };
        let selected = {
            let namespace = namespace.clone();
            let name = name
                .clone()
                .or_else(|| fields.pinned_name().map(str::to_string));
            move |o: &Value| {
                namespace
                    .as_deref()
                    .is_none_or(|ns| o["metadata"]["namespace"] == ns)
                    && name.as_deref().is_none_or(|n| o["metadata"]["name"] == n)
                    && labels.matches(&labels_of(o))
                    && fields.matches(o)
            }
        };
        let form = form(accept);
        if watch {
            return self.watch(q, form, include(q), selected).await;
        }
        if let Err(r) = self.current(q).await {
            return r;
        }
        let (objects, rv) = self.catalog.snapshot();
        let items: Vec<&Value> = objects.iter().filter(|o| selected(o)).collect();
        match form {
            Form::Table(v) => {
                let mut t = table(&items, &rv, include(q));
                t["apiVersion"] = v.into();
                json_response(StatusCode::OK, &t)
            }
            Form::PartialMetadata => json_response(
                StatusCode::OK,
                &json!({
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": {"resourceVersion": rv},
                    "items": items.iter().map(|o| partial_metadata(o)).collect::<Vec<_>>(),
                }),
            ),
            Form::Object => json_response(
                StatusCode::OK,
                &json!({
                    "kind": format!("{KIND}List"),
                    "apiVersion": format!("{}/{VERSION}", self.group),
                    "metadata": {"resourceVersion": rv},
                    "items": items,
                }),
            ),
        }
    }

    async fn watch(
        &self,
        q: &HashMap<String, String>,
        form: Form,
        include: IncludeObject,
        selected: impl Fn(&Value) -> bool + Send + 'static,
    ) -> Response<Body> {
        if !self.catalog.loaded()
            && let Err(r) = self.current(&HashMap::new()).await
        {
            return r;
        }
        let from = match q.get("resourceVersion").filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => match v.parse::<u64>() {
                Ok(v) => Some(v),
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("resourceVersion {v:?} is not a resource version of this service"),
                    );
                }
            },
        };
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(DEFAULT_WATCH, |s| {
                Duration::from_secs(s.min(DEFAULT_WATCH.as_secs()))
            });
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let frame = move |kind: &str, object: Value| -> Bytes {
            let mut line =
                serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
            line.push(b'\n');
            Bytes::from(line)
        };
        let encode = move |e: &Event| -> Value {
            match form {
                Form::Object => e.object.clone(),
                Form::PartialMetadata => partial_metadata(&e.object),
                Form::Table(v) => {
                    let mut t = table(&[&e.object], &e.rv.to_string(), include);
                    t["apiVersion"] = v.into();
                    t
                }
            }
        };
        match self.catalog.watch(from) {
            Err(forgotten) => {
                let s = status(
                    410,
                    "Expired",
                    &format!(
                        "too old resource version: {} ({forgotten}): list again",
                        from.unwrap_or(0)
                    ),
                    None,
                );
                let _ = tx.try_send(frame("ERROR", s));
            }
            Ok((first, mut live)) => {
                let stop = self.stop.clone();
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + timeout;
                    for e in first {
                        if selected(&e.object)
                            && tx.send(frame(e.kind.as_str(), encode(&e))).await.is_err()
                        {
                            return;
                        }
                    }
                    loop {
                        tokio::select! {
                            e = live.next() => match e {
                                Some(e) => {
                                    if selected(&e.object) && tx.send(frame(e.kind.as_str(), encode(&e))).await.is_err() {
                                        return;
                                    }
                                }
                                // Fell behind: end the watch, the client resumes.
                                None => return,
                            },
                            () = tokio::time::sleep_until(deadline) => return,
                            () = stop.cancelled() => return,
                            () = tx.closed() => return,
                        }
                    }
                });
            }
        }
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok(Frame::data(b)));
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CACHE_CONTROL, "no-cache, private")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap_or_else(|_| Response::new(full(Bytes::new())))
    }
}

fn include(q: &HashMap<String, String>) -> IncludeObject {
    match q.get("includeObject").map(String::as_str) {
        Some("None") => IncludeObject::None,
        Some("Object") => IncludeObject::Object,
        _ => IncludeObject::Metadata,
    }
}

fn text_ok() -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(full("ok"))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// A `403` in kube-apiserver's words, saying that this service's review refused it.
fn forbidden(user: &User, attrs: &Attributes, reason: &str) -> Response<Body> {
    let why = if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    };
    let message = match attrs {
        Attributes::Resource {
            verb,
            group,
            resource,
            namespace,
            name,
            ..
        } => {
            let what = if name.is_empty() {
                format!("{resource}.{group}")
            } else {
                format!("{resource}.{group} \"{name}\"")
            };
            let scope = if namespace.is_empty() {
                "at the cluster scope".to_string()
            } else {
                format!("in the namespace \"{namespace}\"")
            };
            format!(
                "{what} is forbidden: User \"{}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" {scope} (Klio API service's SubjectAccessReview{why})",
                user.name
            )
        }
        Attributes::NonResource { verb, path } => format!(
            "forbidden: User \"{}\" cannot {verb} path \"{path}\" (Klio API service's SubjectAccessReview{why})",
            user.name
        ),
    };
    tracing::info!(user = %user.name, groups = ?user.groups, %message, "request refused");
    error(StatusCode::FORBIDDEN, "Forbidden", &message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: &str = "kliocatalog.enterprisedb.io";

    #[test]
    fn routes() {
        assert_eq!(route("/apis", G), Route::Apis);
        assert_eq!(route("/apis/kliocatalog.enterprisedb.io", G), Route::Group);
        assert_eq!(
            route("/apis/kliocatalog.enterprisedb.io/v1alpha1", G),
            Route::Resources
        );
        assert_eq!(
            route("/apis/kliocatalog.enterprisedb.io/v1", G),
            Route::NotFound
        );
        assert_eq!(
            route("/apis/other.example.com/v1alpha1", G),
            Route::NotFound
        );
        assert_eq!(
            route("/apis/kliocatalog.enterprisedb.io/v1alpha1/kliobackups", G),
            Route::Collection {
                namespace: None,
                watch: false
            }
        );
        assert_eq!(
            route(
                "/apis/kliocatalog.enterprisedb.io/v1alpha1/namespaces/db/kliobackups/",
                G
            ),
            Route::Collection {
                namespace: Some("db".into()),
                watch: false
            }
        );
        assert_eq!(
            route(
                "/apis/kliocatalog.enterprisedb.io/v1alpha1/watch/namespaces/db/kliobackups/a.b",
                G
            ),
            Route::Object {
                namespace: "db".into(),
                name: "a.b".into(),
                watch: true
            }
        );
        assert_eq!(
            route(
                "/apis/kliocatalog.enterprisedb.io/v1alpha1/kliobackups/x",
                G
            ),
            Route::NotFound
        );
        assert_eq!(
            route("/openapi/v3/apis/kliocatalog.enterprisedb.io/v1alpha1", G),
            Route::OpenApiV3
        );
        assert_eq!(route("/api/v1/pods", G), Route::NotFound);
    }

    #[test]
    fn accept_headers() {
        let kubectl = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(form(kubectl), Form::Table("meta.k8s.io/v1"));
        assert_eq!(
            form("application/json;as=Table;v=v1beta1;g=meta.k8s.io"),
            Form::Table("meta.k8s.io/v1beta1")
        );
        assert_eq!(form("application/json"), Form::Object);
        assert_eq!(
            form("application/vnd.kubernetes.protobuf, */*"),
            Form::Object
        );
        assert_eq!(
            form(
                "application/vnd.kubernetes.protobuf;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
            ),
            Form::PartialMetadata
        );
    }

    #[test]
    fn queries_decode() {
        let q = query(Some(
            "labelSelector=klio.enterprisedb.io%2Fcluster%3Dpg&watch=1&x",
        ));
        assert_eq!(q["labelSelector"], "klio.enterprisedb.io/cluster=pg");
        assert_eq!(q["watch"], "1");
        assert_eq!(q["x"], "");
        assert!(query(None).is_empty());
    }
}
