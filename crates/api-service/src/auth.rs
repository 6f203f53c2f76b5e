//! Delegated authentication and authorization, as every aggregated API server does them.
//!
//! Authentication: the request must come over a connection whose client certificate chains
//! to the front-proxy CA that kube-apiserver publishes in
//! `kube-system/extension-apiserver-authentication` (checked in the TLS handshake) and whose
//! common name is one of the allowed names published there; the user, groups, extra and
//! UID are then taken from the request headers that ConfigMap names. Authorization: a
//! `SubjectAccessReview` per request, decisions cached briefly.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderMap;
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

/// The ConfigMap kube-apiserver publishes its front-proxy settings in.
pub const AUTH_CONFIGMAP: (&str, &str) = ("kube-system", "extension-apiserver-authentication");

/// The front-proxy settings from [`AUTH_CONFIGMAP`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontProxy {
    /// PEM of the CA(s) that sign the front proxy's client certificate.
    pub ca_pem: String,
    /// Common names the certificate may have (empty: any the CA signed).
    pub allowed_names: Vec<String>,
    pub username_headers: Vec<String>,
    pub uid_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_prefixes: Vec<String>,
}

fn string_list(data: &BTreeMap<String, String>, key: &str) -> Result<Vec<String>, String> {
    match data.get(key) {
        None => Ok(Vec::new()),
        Some(v) if v.trim().is_empty() => Ok(Vec::new()),
        Some(v) => serde_json::from_str::<Vec<String>>(v)
            .map_err(|e| format!("{key} is not a JSON list of strings: {e}")),
    }
}

impl FrontProxy {
    /// Reads the settings from the ConfigMap's data; an error names the key at fault.
    pub fn from_configmap(data: &BTreeMap<String, String>) -> Result<FrontProxy, String> {
        let ca_pem = data
            .get("requestheader-client-ca-file")
            .filter(|v| !v.trim().is_empty())
            .cloned()
            .ok_or_else(|| {
                "it has no requestheader-client-ca-file: kube-apiserver runs without \
                 --requestheader-client-ca-file, so the API aggregation layer is not configured"
                    .to_string()
            })?;
        let fp = FrontProxy {
            ca_pem,
            allowed_names: string_list(data, "requestheader-allowed-names")?,
            username_headers: string_list(data, "requestheader-username-headers")?,
            uid_headers: string_list(data, "requestheader-uid-headers")?,
            group_headers: string_list(data, "requestheader-group-headers")?,
            extra_prefixes: string_list(data, "requestheader-extra-headers-prefix")?,
        };
        if fp.username_headers.is_empty() {
            return Err("requestheader-username-headers is empty".into());
        }
        Ok(fp)
    }
}

/// Who a request is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct User {
    pub name: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Decodes `%XX` escapes (extra keys are escaped by the front proxy).
fn unescape(s: &str) -> String {
    crate::percent_decode(s)
}

/// The most header values a request may carry as groups or extra (hostile-input bound).
const MAX_IDENTITY_VALUES: usize = 256;

/// The user of a request that came with a front-proxy certificate whose common name is
/// `peer_cn` (`None`: no client certificate). The error is the reason for a `401`.
pub fn authenticate(
    fp: &FrontProxy,
    peer_cn: Option<&str>,
    headers: &HeaderMap,
) -> Result<User, String> {
    let cn = peer_cn.ok_or(
        "no client certificate: only the Kubernetes API server (its front-proxy client \
         certificate) may call this service; use kubectl",
    )?;
    if !fp.allowed_names.is_empty() && !fp.allowed_names.iter().any(|n| n == cn) {
        return Err(format!(
            "client certificate \"{cn}\" is not one of requestheader-allowed-names ({})",
            fp.allowed_names.join(", ")
        ));
    }
    let value = |h: &http::HeaderValue| h.to_str().ok().map(str::to_string);
    let name = fp
        .username_headers
        .iter()
        .flat_map(|h| headers.get_all(h.as_str()))
        .filter_map(value)
        .find(|v| !v.is_empty())
        .ok_or("the request names no user (front-proxy user header missing)")?;
    let uid = fp
        .uid_headers
        .iter()
        .flat_map(|h| headers.get_all(h.as_str()))
        .filter_map(value)
        .find(|v| !v.is_empty());
    let mut groups: Vec<String> = fp
        .group_headers
        .iter()
        .flat_map(|h| headers.get_all(h.as_str()))
        .filter_map(value)
        .take(MAX_IDENTITY_VALUES)
        .collect();
    // Every authenticated user is in system:authenticated, as kube-apiserver has it (the
    // aggregator's own calls name no group; discovery is granted to that group).
    if !groups.iter().any(|g| g == "system:authenticated") {
        groups.push("system:authenticated".to_string());
    }
    let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut count = 0;
    for (h, v) in headers {
        let lower = h.as_str().to_ascii_lowercase();
        for prefix in &fp.extra_prefixes {
            let p = prefix.to_ascii_lowercase();
            if let Some(key) = lower.strip_prefix(&p)
                && !key.is_empty()
                && let Some(v) = value(v)
            {
                count += 1;
                if count > MAX_IDENTITY_VALUES {
                    return Err("too many front-proxy extra headers".into());
                }
                extra.entry(unescape(key)).or_default().push(v);
            }
        }
    }
    Ok(User {
        name,
        uid,
        groups,
        extra,
    })
}

/// What a request asks to do, for a SubjectAccessReview.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Attributes {
    Resource {
        verb: String,
        group: String,
        version: String,
        resource: String,
        namespace: String,
        name: String,
    },
    NonResource {
        verb: String,
        path: String,
    },
}

/// The answer of a SubjectAccessReview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

/// How long an allow or a deny is remembered (kube's defaults for delegated authorization).
const ALLOW_TTL: Duration = Duration::from_secs(10);
const DENY_TTL: Duration = Duration::from_secs(10);
/// Most decisions remembered.
const MAX_CACHED: usize = 4096;
/// The longest a SubjectAccessReview may take.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Authorizes requests with SubjectAccessReviews against the Kubernetes API server.
pub struct Authorizer {
    client: kube::Client,
    cache: Mutex<HashMap<(User, Attributes), (Decision, Instant)>>,
}

impl Authorizer {
    pub fn new(client: kube::Client) -> Authorizer {
        Authorizer {
            client,
            cache: Mutex::default(),
        }
    }

    /// Whether `user` may do `attrs`; an error when the API server cannot answer.
    pub async fn authorize(&self, user: &User, attrs: &Attributes) -> Result<Decision, String> {
        // Members of system:masters may do anything, as in kube-apiserver itself (the
        // aggregator's availability check calls as such a user).
        if user.groups.iter().any(|g| g == "system:masters") {
            return Ok(Decision {
                allowed: true,
                reason: "system:masters".into(),
            });
        }
        let key = (user.clone(), attrs.clone());
        {
            let cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((d, until)) = cache.get(&key)
                && Instant::now() < *until
            {
                return Ok(d.clone());
            }
        }
        let decision = tokio::time::timeout(REVIEW_TIMEOUT, self.review(user, attrs))
            .await
            .map_err(|_| {
                format!(
                    "the SubjectAccessReview did not complete within {} s",
                    REVIEW_TIMEOUT.as_secs()
                )
            })??;
        let ttl = if decision.allowed {
            ALLOW_TTL
        } else {
            DENY_TTL
        };
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() >= MAX_CACHED {
            let now = Instant::now();
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, (decision.clone(), Instant::now() + ttl));
        Ok(decision)
    }

    async fn review(&self, user: &User, attrs: &Attributes) -> Result<Decision, String> {
        let mut spec = SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: user.uid.clone(),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            ..SubjectAccessReviewSpec::default()
        };
        match attrs {
            Attributes::Resource {
                verb,
                group,
                version,
                resource,
                namespace,
                name,
            } => {
                spec.resource_attributes = Some(ResourceAttributes {
                    verb: Some(verb.clone()),
                    group: Some(group.clone()),
                    version: Some(version.clone()),
                    resource: Some(resource.clone()),
                    namespace: (!namespace.is_empty()).then(|| namespace.clone()),
                    name: (!name.is_empty()).then(|| name.clone()),
                    ..ResourceAttributes::default()
                });
            }
            Attributes::NonResource { verb, path } => {
                spec.non_resource_attributes = Some(NonResourceAttributes {
                    verb: Some(verb.clone()),
                    path: Some(path.clone()),
                });
            }
        }
        let review = SubjectAccessReview {
            spec,
            ..SubjectAccessReview::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("the SubjectAccessReview failed: {e}"))?;
        let status = answer.status.unwrap_or_default();
        let mut reason = status.reason.unwrap_or_default();
        if let Some(e) = status.evaluation_error.filter(|e| !e.is_empty()) {
            reason = if reason.is_empty() {
                e
            } else {
                format!("{reason}; {e}")
            };
        }
        Ok(Decision {
            allowed: status.allowed && !status.denied.unwrap_or(false),
            reason,
        })
    }
}

/// The common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn front_proxy() -> FrontProxy {
        let data: BTreeMap<String, String> = [
            (
                "requestheader-client-ca-file",
                "-----BEGIN CERTIFICATE-----\n...",
            ),
            ("requestheader-allowed-names", "[\"front-proxy-client\"]"),
            ("requestheader-username-headers", "[\"X-Remote-User\"]"),
            ("requestheader-group-headers", "[\"X-Remote-Group\"]"),
            (
                "requestheader-extra-headers-prefix",
                "[\"X-Remote-Extra-\"]",
            ),
            ("requestheader-uid-headers", "[\"X-Remote-Uid\"]"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        FrontProxy::from_configmap(&data).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn identity_comes_from_the_headers_of_an_allowed_certificate() {
        let fp = front_proxy();
        let h = headers(&[
            ("x-remote-user", "alice"),
            ("x-remote-group", "dba"),
            ("x-remote-group", "system:authenticated"),
            ("x-remote-uid", "42"),
            ("x-remote-extra-scopes%2Fa", "x"),
            ("x-remote-extra-scopes%2Fa", "y"),
        ]);
        let u = authenticate(&fp, Some("front-proxy-client"), &h).unwrap();
        assert_eq!(u.name, "alice");
        assert_eq!(u.uid.as_deref(), Some("42"));
        assert_eq!(u.groups, ["dba", "system:authenticated"]);
        assert_eq!(u.extra["scopes/a"], ["x", "y"]);

        let u = authenticate(
            &fp,
            Some("front-proxy-client"),
            &headers(&[("x-remote-user", "bob")]),
        )
        .unwrap();
        assert_eq!(u.groups, ["system:authenticated"]);

        let e = authenticate(&fp, None, &h).unwrap_err();
        assert!(e.starts_with("no client certificate"), "{e}");
        let e = authenticate(&fp, Some("someone-else"), &h).unwrap_err();
        assert!(e.contains("not one of requestheader-allowed-names"), "{e}");
        let e = authenticate(&fp, Some("front-proxy-client"), &headers(&[])).unwrap_err();
        assert!(e.contains("names no user"), "{e}");
    }

    #[test]
    fn configmap_errors_name_the_key() {
        let mut data = BTreeMap::new();
        let e = FrontProxy::from_configmap(&data).unwrap_err();
        assert!(e.contains("requestheader-client-ca-file"), "{e}");
        data.insert(
            "requestheader-client-ca-file".to_string(),
            "pem".to_string(),
        );
        data.insert("requestheader-allowed-names".to_string(), "{".to_string());
        let e = FrontProxy::from_configmap(&data).unwrap_err();
        assert!(e.starts_with("requestheader-allowed-names"), "{e}");
        data.insert("requestheader-allowed-names".to_string(), "[]".to_string());
        let e = FrontProxy::from_configmap(&data).unwrap_err();
        assert!(e.contains("requestheader-username-headers"), "{e}");
    }

    #[test]
    fn unescape_decodes_percent_escapes_only_when_complete() {
        assert_eq!(unescape("a%2Fb"), "a/b");
        assert_eq!(unescape("a%2"), "a%2");
        assert_eq!(unescape("%zz"), "%zz");
    }
}
