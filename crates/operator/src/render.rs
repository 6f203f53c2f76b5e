//! The desired objects of a `Server`, as pure functions: the spec (and the hash of the secrets
//! it references) in, the StatefulSet, Service and PersistentVolumeClaims out. No API calls.
//!
//! Layout of the server pod (one container, [`CONTAINER`], running `klio server`):
//!
//! | volume | from | mounted at | flag |
//! |---|---|---|---|
//! | `data` | claim `<name>-klio-data` (`tier1.data`) | `/data` | `--data-dir` |
//! | `cache` | claim `<name>-klio-cache` (`tier1.cache`) | `/cache/tier1` | `--cache-dir` |
//! | `tier2-cache` | claim `<name>-klio-tier2-cache` (`tier2.cache`) | `/cache/tier2` | `--tier2-cache-dir` |
//! | `queue` | claim `<name>-klio-queue` (`queue`) | `/queue` | `--queue-dir` |
//! | `tls` | Secret `tlsSecretName` (`tls.crt`, `tls.key`) | `/etc/klio/tls` | `--tls-cert`, `--tls-key` |
//! | `client-ca` | Secret `caSecretName` (`ca.crt`) | `/etc/klio/client-ca` | `--client-ca` |
//! | `tier1-key` | `tier1.encryptionKey` | `/etc/klio/tier1-key` | `--encryption-key-file` |
//! | `tier2-key` | `tier2.encryptionKey` | `/etc/klio/tier2-key` | `--tier2-encryption-key-file` |
//! | `s3-ca` | `tier2.s3.customCaBundle` | `/etc/klio/s3-ca` | `--tier2-s3-ca-bundle` |
//! | `tmp` | emptyDir | `/tmp` | (the root file system is read-only) |
//!
//! S3 credentials, when given, are the environment variables `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY` from their Secrets; otherwise the server uses the pod's ambient
//! credentials (IRSA or Pod Identity through `template.spec.serviceAccountName`).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, KeyToPath,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretKeySelector as CoreSecretKeySelector, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use klio_k8s_types::{Mode, SecretKeySelector, Server};
use kube::Resource;

/// The pod label that selects a server's pod: `klio.enterprisedb.io/klio-server=<name>`.
pub const LABEL_SERVER: &str = "klio.enterprisedb.io/klio-server";
/// The pod-template annotation holding the hash of the referenced secrets' content: a change
/// rolls the pod (certificate rotation, a new S3 credential).
pub const ANNOTATION_SECRETS_HASH: &str = "klio.enterprisedb.io/secrets-hash";
/// The server container's name. Template containers named `server`, `base` or `wal` (the
/// seed's two containers) customize it.
pub const CONTAINER: &str = "server";
/// Names of template containers merged into [`CONTAINER`].
pub const MERGED_CONTAINERS: [&str; 3] = [CONTAINER, "base", "wal"];
/// The base-backup port.
pub const BASE_PORT: i32 = 51515;
/// The WAL port.
pub const WAL_PORT: i32 = 52000;
/// The metrics port (Prometheus `/metrics`), named `metrics` for PodMonitors.
pub const METRICS_PORT: i32 = 9090;
/// The user and group the server runs as unless the template says otherwise (distroless
/// `nonroot`).
pub const DEFAULT_UID: i64 = 65532;

const TLS_DIR: &str = "/etc/klio/tls";
const CLIENT_CA_DIR: &str = "/etc/klio/client-ca";
const TIER1_KEY_DIR: &str = "/etc/klio/tier1-key";
const TIER2_KEY_DIR: &str = "/etc/klio/tier2-key";
const S3_CA_DIR: &str = "/etc/klio/s3-ca";
const KEY_FILE: &str = "encryption-key";
const S3_CA_FILE: &str = "ca.crt";

/// Why a `Server` cannot be rendered (it lacks what every stored object has).
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("the Server has no {0}")]
    MissingMetadata(&'static str),
}

/// Everything the operator applies for one `Server`.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub statefulset: StatefulSet,
    pub service: Service,
    /// Created from the templates and never deleted by the operator (no owner reference):
    /// backups outlive their server.
    pub claims: Vec<PersistentVolumeClaim>,
}

/// `<name>-klio`, the StatefulSet (its pod is `<name>-klio-0`).
pub fn statefulset_name(server: &str) -> String {
    format!("{server}-klio")
}

/// One claim of the server pod.
struct Claim {
    volume: &'static str,
    mount: &'static str,
    spec: PersistentVolumeClaimSpec,
}

/// The claims of `server` in a fixed order: data, cache, queue, tier2-cache.
fn claims(server: &Server) -> Vec<Claim> {
    let spec = &server.spec;
    let mut out = Vec::new();
    if let Some(t1) = &spec.tier1 {
        out.push(Claim {
            volume: "data",
            mount: "/data",
            spec: t1.data.pvc_template.clone(),
        });
        out.push(Claim {
            volume: "cache",
            mount: "/cache/tier1",
            spec: t1.cache.pvc_template.clone(),
        });
    }
    if let Some(q) = &spec.queue {
        out.push(Claim {
            volume: "queue",
            mount: "/queue",
            spec: q.pvc_template.clone(),
        });
    }
    if let Some(t2) = &spec.tier2 {
        out.push(Claim {
            volume: "tier2-cache",
            mount: "/cache/tier2",
            spec: t2.cache.pvc_template.clone(),
        });
    }
    out
}

/// The claim name of a volume: `<name>-klio-<volume>`.
pub fn claim_name(server: &str, volume: &str) -> String {
    format!("{server}-klio-{volume}")
}

/// The labels of every object the operator creates for `name`.
pub fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_SERVER.to_string(), name.to_string()),
        ("app.kubernetes.io/name".to_string(), "klio".to_string()),
        ("app.kubernetes.io/instance".to_string(), name.to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            "server".to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "klio-operator".to_string(),
        ),
    ])
}

/// The desired objects of `server`. `secrets_hash` goes into the pod template's
/// [`ANNOTATION_SECRETS_HASH`].
pub fn render(server: &Server, secrets_hash: &str) -> Result<Rendered, RenderError> {
    let name = server
        .metadata
        .name
        .clone()
        .ok_or(RenderError::MissingMetadata("metadata.name"))?;
    let namespace = server
        .metadata
        .namespace
        .clone()
        .ok_or(RenderError::MissingMetadata("metadata.namespace"))?;
    let owner = server
        .controller_owner_ref(&())
        .ok_or(RenderError::MissingMetadata("metadata.uid"))?;
    let claims = claims(server);
    let meta = |object_name: String, owner: Option<&OwnerReference>| ObjectMeta {
        name: Some(object_name),
        namespace: Some(namespace.clone()),
        labels: Some(labels(&name)),
        owner_references: owner.map(|o| vec![o.clone()]),
        ..ObjectMeta::default()
    };
    let selector = BTreeMap::from([(LABEL_SERVER.to_string(), name.clone())]);

    let service = Service {
        metadata: meta(name.clone(), Some(&owner)),
        spec: Some(ServiceSpec {
            selector: Some(selector.clone()),
            ports: Some(vec![
                service_port("base", BASE_PORT),
                service_port("wal", WAL_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };

    let statefulset = StatefulSet {
        metadata: meta(statefulset_name(&name), Some(&owner)),
        spec: StatefulSetSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            service_name: Some(name.clone()),
            template: pod_template(server, &name, &claims, secrets_hash),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    };

    let claims = claims
        .into_iter()
        .map(|c| PersistentVolumeClaim {
            metadata: meta(claim_name(&name, c.volume), None),
            spec: Some(c.spec),
            ..PersistentVolumeClaim::default()
        })
        .collect();
    Ok(Rendered {
        statefulset,
        service,
        claims,
    })
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    }
}

/// The pod template: the user's `template` with Klio's container, volumes, labels and
/// annotations merged in (Klio's required values win, the user's other values are kept).
fn pod_template(
    server: &Server,
    name: &str,
    claims: &[Claim],
    secrets_hash: &str,
) -> PodTemplateSpec {
    let user = server.spec.template.clone().unwrap_or_default();
    let mut metadata = user.metadata.unwrap_or_default();
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(labels(name));
    metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(
            ANNOTATION_SECRETS_HASH.to_string(),
            secrets_hash.to_string(),
        );
    // Fields the API server would reject on a pod template, should a user write them.
    metadata.name = None;
    metadata.namespace = None;

    let mut spec = user.spec.unwrap_or_default();
    let (volumes, mounts) = volumes(server, name, claims);

    let mut klio = klio_container(server, mounts);
    let (custom, others): (Vec<Container>, Vec<Container>) = std::mem::take(&mut spec.containers)
        .into_iter()
        .partition(|c| MERGED_CONTAINERS.contains(&c.name.as_str()));
    merge_customizations(&mut klio, &custom);
    spec.containers = std::iter::once(klio).chain(others).collect();

    let ours: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    let mut all: Vec<Volume> = spec
        .volumes
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|v| !ours.contains(&v.name.as_str()))
        .collect();
    all.extend(volumes);
    spec.volumes = Some(all);

    let mut pull_secrets = spec.image_pull_secrets.take().unwrap_or_default();
    for s in &server.spec.image_pull_secrets {
        if !pull_secrets.iter().any(|p| p.name == s.name) {
            pull_secrets.push(k8s_openapi::api::core::v1::LocalObjectReference {
                name: s.name.clone(),
            });
        }
    }
    spec.image_pull_secrets = (!pull_secrets.is_empty()).then_some(pull_secrets);
    spec.security_context
        .get_or_insert_with(|| PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(DEFAULT_UID),
            run_as_group: Some(DEFAULT_UID),
            fs_group: Some(DEFAULT_UID),
            fs_group_change_policy: Some("OnRootMismatch".to_string()),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        });
    // The server never calls the Kubernetes API; IRSA and Pod Identity mount their own token.
    spec.automount_service_account_token.get_or_insert(false);
    // Time for the server to finish its queue tasks and close its files.
    spec.termination_grace_period_seconds.get_or_insert(60);

    PodTemplateSpec {
        metadata: Some(metadata),
        spec: Some(spec),
    }
}

/// Klio's volumes and the server container's mounts of them.
fn volumes(server: &Server, name: &str, claims: &[Claim]) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut add = |volume: Volume, path: &str, read_only: bool| {
        mounts.push(VolumeMount {
            name: volume.name.clone(),
            mount_path: path.to_string(),
            read_only: read_only.then_some(true),
            ..VolumeMount::default()
        });
        volumes.push(volume);
    };
    for c in claims {
        add(
            Volume {
                name: c.volume.to_string(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim_name(name, c.volume),
                    read_only: None,
                }),
                ..Volume::default()
            },
            c.mount,
            false,
        );
    }
    let spec = &server.spec;
    add(
        secret_volume(
            "tls",
            &spec.tls_secret_name,
            &[("tls.crt", "tls.crt"), ("tls.key", "tls.key")],
        ),
        TLS_DIR,
        true,
    );
    add(
        secret_volume("client-ca", &spec.ca_secret_name, &[("ca.crt", "ca.crt")]),
        CLIENT_CA_DIR,
        true,
    );
    if let Some(t1) = &spec.tier1 {
        let key = &t1.encryption_key;
        add(
            secret_volume("tier1-key", &key.name, &[(&key.key, KEY_FILE)]),
            TIER1_KEY_DIR,
            true,
        );
    }
    if let Some(t2) = &spec.tier2 {
        let key = &t2.encryption_key;
        add(
            secret_volume("tier2-key", &key.name, &[(&key.key, KEY_FILE)]),
            TIER2_KEY_DIR,
            true,
        );
        if let Some(ca) = &t2.s3.custom_ca_bundle {
            add(
                secret_volume("s3-ca", &ca.name, &[(&ca.key, S3_CA_FILE)]),
                S3_CA_DIR,
                true,
            );
        }
    }
    add(
        Volume {
            name: "tmp".to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        "/tmp",
        false,
    );
    (volumes, mounts)
}

fn secret_volume(volume: &str, secret: &str, items: &[(&str, &str)]) -> Volume {
    Volume {
        name: volume.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            items: Some(
                items
                    .iter()
                    .map(|(key, path)| KeyToPath {
                        key: key.to_string(),
                        path: path.to_string(),
                        ..KeyToPath::default()
                    })
                    .collect(),
            ),
            // Readable by the server's group (fsGroup), nobody else.
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// The `klio server` arguments of `server`; every file they name is mounted (see the table
/// of this module).
pub fn server_args(server: &Server) -> Vec<String> {
    let spec = &server.spec;
    let mut args: Vec<String> = vec!["server".into(), "--mode".into(), spec.mode.as_str().into()];
    let mut flag = |f: &str, v: &str| {
        args.push(f.to_string());
        args.push(v.to_string());
    };
    flag("--tls-cert", &format!("{TLS_DIR}/tls.crt"));
    flag("--tls-key", &format!("{TLS_DIR}/tls.key"));
    flag("--client-ca", &format!("{CLIENT_CA_DIR}/ca.crt"));
    flag("--base-listen", &format!("0.0.0.0:{BASE_PORT}"));
    flag("--wal-listen", &format!("0.0.0.0:{WAL_PORT}"));
    flag("--metrics-listen", &format!("0.0.0.0:{METRICS_PORT}"));
    if spec.mode == Mode::Standard {
        if spec.tier1.is_some() {
            flag("--data-dir", "/data");
            flag("--cache-dir", "/cache/tier1");
            flag(
                "--encryption-key-file",
                &format!("{TIER1_KEY_DIR}/{KEY_FILE}"),
            );
        }
        if spec.queue.is_some() {
            flag("--queue-dir", "/queue");
        }
    }
    if let Some(t2) = &spec.tier2 {
        let s3 = &t2.s3;
        flag("--tier2-s3-bucket", &s3.bucket_name);
        if let Some(p) = &s3.prefix {
            flag("--tier2-s3-prefix", p);
        }
        if let Some(e) = &s3.endpoint {
            flag("--tier2-s3-endpoint", e);
        }
        if let Some(r) = &s3.region {
            flag("--tier2-s3-region", r);
        }
        if s3.custom_ca_bundle.is_some() {
            flag("--tier2-s3-ca-bundle", &format!("{S3_CA_DIR}/{S3_CA_FILE}"));
        }
        flag(
            "--tier2-encryption-key-file",
            &format!("{TIER2_KEY_DIR}/{KEY_FILE}"),
        );
        flag("--tier2-cache-dir", "/cache/tier2");
    }
    args
}

fn secret_env(name: &str, from: &SecretKeySelector) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(CoreSecretKeySelector {
                name: from.name.clone(),
                key: from.key.clone(),
                optional: None,
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn tcp_probe(port: &str, period: i32, failures: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String(port.to_string()),
            host: None,
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// Klio's container with its required values only.
fn klio_container(server: &Server, mounts: Vec<VolumeMount>) -> Container {
    let spec = &server.spec;
    let mut env = Vec::new();
    if let Some(t2) = &spec.tier2
        && let (Some(id), Some(secret)) = (&t2.s3.access_key_id, &t2.s3.secret_access_key)
    {
        env.push(secret_env("AWS_ACCESS_KEY_ID", id));
        env.push(secret_env("AWS_SECRET_ACCESS_KEY", secret));
    }
    Container {
        name: CONTAINER.to_string(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        args: Some(server_args(server)),
        ports: Some(vec![
            container_port("base", BASE_PORT),
            container_port("wal", WAL_PORT),
            container_port("metrics", METRICS_PORT),
        ]),
        env: Some(env),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: port,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }
}

/// Merges the template's customizations (containers named `server`, `base`, `wal`) into
/// Klio's container, then fills what nobody set with Klio's defaults.
///
/// Klio's values win for the name, image, command, args, ports, its own env variables (the S3
/// credentials) and mounts; the user's win for everything else (resources, probes, security
/// context, `KLIO_LOG`, extra env, envFrom and mounts). `resources` of several customizations are added up: the seed's `base`
/// and `wal` containers run as one process here.
fn merge_customizations(klio: &mut Container, custom: &[Container]) {
    for user in custom {
        let env = klio.env.get_or_insert_with(Vec::new);
        for e in user.env.iter().flatten() {
            if !env.iter().any(|k| k.name == e.name) {
                env.push(e.clone());
            }
        }
        if let Some(from) = &user.env_from {
            klio.env_from
                .get_or_insert_with(Vec::new)
                .extend(from.clone());
        }
        let mounts = klio.volume_mounts.get_or_insert_with(Vec::new);
        for m in user.volume_mounts.iter().flatten() {
            if !mounts.iter().any(|k| k.mount_path == m.mount_path) {
                mounts.push(m.clone());
            }
        }
        if let Some(r) = &user.resources {
            klio.resources = Some(match klio.resources.take() {
                None => r.clone(),
                Some(mine) => add_resources(&mine, r),
            });
        }
        if klio.image_pull_policy.is_none() {
            klio.image_pull_policy = user.image_pull_policy.clone();
        }
        macro_rules! user_wins {
            ($($field:ident),*) => {$(
                if user.$field.is_some() {
                    klio.$field = user.$field.clone();
                }
            )*};
        }
        user_wins!(
            security_context,
            liveness_probe,
            readiness_probe,
            startup_probe,
            lifecycle,
            termination_message_path,
            termination_message_policy,
            working_dir,
            volume_devices,
            resize_policy,
            restart_policy
        );
    }
    // The log filter is a default the template may change.
    let env = klio.env.get_or_insert_with(Vec::new);
    if !env.iter().any(|e| e.name == "KLIO_LOG") {
        env.insert(
            0,
            EnvVar {
                name: "KLIO_LOG".to_string(),
                value: Some("info".to_string()),
                ..EnvVar::default()
            },
        );
    }
    klio.security_context
        .get_or_insert_with(|| SecurityContext {
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                add: None,
            }),
            ..SecurityContext::default()
        });
    // The server listens once it has opened its repository, which can take long on a first
    // start with a large one (the block index cache is built): the startup probe allows an hour.
    klio.startup_probe
        .get_or_insert_with(|| tcp_probe("base", 10, 360));
    klio.liveness_probe
        .get_or_insert_with(|| tcp_probe("base", 20, 3));
    klio.readiness_probe
        .get_or_insert_with(|| tcp_probe("base", 10, 1));
}

/// `a + b`, per resource name, for requests and limits (claims kept from both).
fn add_resources(a: &ResourceRequirements, b: &ResourceRequirements) -> ResourceRequirements {
    let sum = |x: &Option<BTreeMap<String, Quantity>>, y: &Option<BTreeMap<String, Quantity>>| {
        let mut out = x.clone().unwrap_or_default();
        for (k, v) in y.iter().flatten() {
            let total = match out.get(k) {
                Some(mine) => add_quantities(mine, v),
                None => v.clone(),
            };
            out.insert(k.clone(), total);
        }
        (!out.is_empty()).then_some(out)
    };
    let mut claims = a.claims.clone().unwrap_or_default();
    claims.extend(b.claims.clone().unwrap_or_default());
    ResourceRequirements {
        requests: sum(&a.requests, &b.requests),
        limits: sum(&a.limits, &b.limits),
        claims: (!claims.is_empty()).then_some(claims),
    }
}

/// The sum of two quantities, written in thousandths (`1500m`) or as a plain integer. A
/// quantity that cannot be parsed leaves the first one as it is.
fn add_quantities(a: &Quantity, b: &Quantity) -> Quantity {
    match (parse_milli(&a.0), parse_milli(&b.0)) {
        (Some(x), Some(y)) => {
            let total = x.saturating_add(y);
            if total % 1000 == 0 {
                Quantity((total / 1000).to_string())
            } else {
                Quantity(format!("{total}m"))
            }
        }
        _ => a.clone(),
    }
}

/// A Kubernetes quantity in thousandths of its unit (`500m` → 500, `1Gi` → 1073741824000),
/// for the forms resource requests use: an integer or decimal with an optional binary or
/// decimal suffix. `None` for anything else (exponents, overflow).
fn parse_milli(s: &str) -> Option<i128> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let factor: i128 = match suffix {
        "m" => 1,
        "" => 1000,
        "k" => 1000 * 1000,
        "M" => 1000 * 1000_i128.pow(2),
        "G" => 1000 * 1000_i128.pow(3),
        "T" => 1000 * 1000_i128.pow(4),
        "P" => 1000 * 1000_i128.pow(5),
        "Ki" => 1000 * 1024,
        "Mi" => 1000 * 1024_i128.pow(2),
        "Gi" => 1000 * 1024_i128.pow(3),
        "Ti" => 1000 * 1024_i128.pow(4),
        "Pi" => 1000 * 1024_i128.pow(5),
        _ => return None,
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() || int.len() > 20 || frac.len() > 9 {
        return None;
    }
    let int: i128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac_value: i128 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    let scale = 10_i128.pow(frac.len() as u32);
    let whole = int.checked_mul(factor)?;
    // Fractions below a thousandth of the unit round up, as Kubernetes does.
    let part = (frac_value.checked_mul(factor)? + scale - 1) / scale;
    whole.checked_add(part)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn seed(file: &str) -> Server {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../k8s-types/tests/data")
            .join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut s: Server = serde_yaml::from_str(&text).unwrap();
        s.metadata.namespace = Some("ns".into());
        s.metadata.uid = Some("uid-1".into());
        s
    }

    fn container(r: &Rendered) -> &Container {
        &r.statefulset
            .spec
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
    }

    fn arg<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
        args.iter()
            .position(|a| a == flag)
            .map(|i| args[i + 1].as_str())
    }

    #[test]
    fn render_standard_seed_mounts_every_file_its_args_name() {
        let server = seed("server.yaml");
        let r = render(&server, "h1").unwrap();
        let sts = &r.statefulset;
        assert_eq!(sts.metadata.name.as_deref(), Some("my-server-klio"));
        let owner = &sts.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("Server", Some(true))
        );
        let names: Vec<_> = r
            .claims
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "my-server-klio-data",
                "my-server-klio-cache",
                "my-server-klio-queue",
                "my-server-klio-tier2-cache"
            ]
        );
        assert!(
            r.claims
                .iter()
                .all(|c| c.metadata.owner_references.is_none())
        );
        let c = container(&r);
        let args = c.args.as_ref().unwrap();
        assert_eq!(args[0], "server");
        assert_eq!(arg(args, "--mode"), Some("standard"));
        assert_eq!(arg(args, "--tier2-s3-bucket"), Some("klio-bucket"));
        assert_eq!(
            arg(args, "--tier2-s3-endpoint"),
            Some("https://rustfs:9000")
        );
        // Every absolute path in the args lies under one of the container's mounts.
        let mounts = c.volume_mounts.as_ref().unwrap();
        for path in args.iter().filter(|a| a.starts_with('/')) {
            assert!(
                mounts.iter().any(|m| path.starts_with(&m.mount_path)),
                "{path} is not mounted"
            );
        }
        let env = c.env.as_ref().unwrap();
        let key = env.iter().find(|e| e.name == "AWS_ACCESS_KEY_ID").unwrap();
        let from = key
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (from.name.as_str(), from.key.as_str()),
            ("rustfs", "RUSTFS_ACCESS_KEY")
        );
        let annotations = sts.spec.template.metadata.as_ref().unwrap();
        assert_eq!(
            annotations.annotations.as_ref().unwrap()[ANNOTATION_SECRETS_HASH],
            "h1"
        );
    }

    #[test]
    fn render_read_only_seed_has_tier2_only() {
        let r = render(&seed("server-read-only.yaml"), "h").unwrap();
        assert_eq!(r.claims.len(), 1);
        let args = container(&r).args.clone().unwrap();
        assert_eq!(arg(&args, "--mode"), Some("read-only"));
        assert_eq!(arg(&args, "--data-dir"), None);
        assert_eq!(arg(&args, "--queue-dir"), None);
        assert_eq!(arg(&args, "--tier2-cache-dir"), Some("/cache/tier2"));
    }

    #[test]
    fn render_template_customizations_merge_into_the_server_container() {
        let mut server = seed("server.yaml");
        let template: PodTemplateSpec = serde_json::from_value(serde_json::json!({
            "metadata": {"labels": {"team": "dba", LABEL_SERVER: "spoofed"}},
            "spec": {
                "serviceAccountName": "klio-s3-access",
                "containers": [
                    {"name": "base", "image": "evil", "args": ["sh"],
                     "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
                     "env": [{"name": "KLIO_LOG", "value": "debug"}, {"name": "X", "value": "1"},
                             {"name": "AWS_ACCESS_KEY_ID", "value": "mine"}]},
                    {"name": "wal", "resources": {"requests": {"cpu": "1.5", "memory": "512Mi"}}},
                    {"name": "exporter", "image": "exporter:1"}
                ],
                "volumes": [{"name": "tls", "emptyDir": {}}, {"name": "extra", "emptyDir": {}}]
            }
        }))
        .unwrap();
        server.spec.template = Some(template);
        let r = render(&server, "h").unwrap();
        let pod = r.statefulset.spec.template.clone();
        let labels = pod.metadata.unwrap().labels.unwrap();
        assert_eq!(labels["team"], "dba");
        assert_eq!(labels[LABEL_SERVER], "my-server");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("klio-s3-access"));
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, [CONTAINER, "exporter"]);
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("localhost/klio:test"));
        assert_eq!(c.args.as_ref().unwrap()[0], "server");
        let env = c.env.as_ref().unwrap();
        let log = env.iter().find(|e| e.name == "KLIO_LOG").unwrap();
        assert_eq!(
            log.value.as_deref(),
            Some("debug"),
            "the log filter is the user's"
        );
        let key = env.iter().find(|e| e.name == "AWS_ACCESS_KEY_ID").unwrap();
        assert!(key.value_from.is_some(), "Klio's credentials win");
        assert_eq!(
            env.iter().filter(|e| e.name == "AWS_ACCESS_KEY_ID").count(),
            1
        );
        assert!(env.iter().any(|e| e.name == "X"));
        let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(requests["cpu"].0, "2");
        assert_eq!(requests["memory"].0, "1610612736");
        let volumes = spec.volumes.unwrap();
        let tls = volumes.iter().find(|v| v.name == "tls").unwrap();
        assert!(tls.secret.is_some(), "Klio's volume wins by name");
        assert!(volumes.iter().any(|v| v.name == "extra"));
    }

    #[test]
    fn render_irsa_seed_uses_the_service_account_and_no_static_keys() {
        let mut server = seed("server.yaml");
        let fragment: serde_yaml::Value = serde_yaml::from_str(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../k8s-types/tests/data/server-irsa-fragment.yaml"),
            )
            .unwrap(),
        )
        .unwrap();
        server.spec.template =
            Some(serde_yaml::from_value(fragment["spec"]["template"].clone()).unwrap());
        let t2 = server.spec.tier2.as_mut().unwrap();
        t2.s3 = serde_yaml::from_value(fragment["spec"]["tier2"]["s3"].clone()).unwrap();
        let r = render(&server, "h").unwrap();
        let spec = r.statefulset.spec.template.spec.clone().unwrap();
        assert_eq!(spec.service_account_name.as_deref(), Some("klio-s3-access"));
        let env = container(&r).env.clone().unwrap();
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["KLIO_LOG"]);
    }

    #[test]
    fn parse_milli_reads_resource_quantities() {
        assert_eq!(parse_milli("500m"), Some(500));
        assert_eq!(parse_milli("2"), Some(2000));
        assert_eq!(parse_milli("1.5"), Some(1500));
        assert_eq!(parse_milli("1Ki"), Some(1_024_000));
        assert_eq!(parse_milli("0.1m"), Some(1));
        assert_eq!(parse_milli("1e3"), None);
        assert_eq!(parse_milli(""), None);
        assert_eq!(parse_milli("."), None);
        assert_eq!(parse_milli("99999999999999999999999Pi"), None);
    }
}
