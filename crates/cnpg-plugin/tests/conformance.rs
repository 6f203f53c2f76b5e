//! CNPG-I conformance of the operator-side half, over the wire as CloudNativePG's operator
//! speaks it (`/work/shared/notes/cnpg-i.md`): mutual TLS 1.3 with self-signed certificates
//! pinned on both sides (cert-manager's selfSigned pattern), the method paths written out
//! from the protocol (not taken from our generated code), the per-connection handshake
//! (GetPluginMetadata, GetPluginCapabilities, each service's GetCapabilities, Probe) and every
//! hook with edge inputs. PluginConfigurations come from an in-memory map.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use klio_cnpg_plugin::{Configurations, Plugin, SidecarDefaults, TlsFiles};
use klio_k8s_types::PluginConfiguration;
use klio_proto::cnpgi::identity::v1 as identity;
use klio_proto::cnpgi::operator_lifecycle::v1 as lifecycle;
use klio_proto::cnpgi::reconciler::v1 as reconciler;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Map(HashMap<(String, String), PluginConfiguration>);

impl Configurations for Map {
    async fn get(&self, ns: &str, name: &str) -> Result<Option<PluginConfiguration>, String> {
        Ok(self.0.get(&(ns.to_string(), name.to_string())).cloned())
    }
}

fn configuration(name: &str, spec: Value) -> PluginConfiguration {
    serde_json::from_value(json!({
        "apiVersion": "klio.enterprisedb.io/v1alpha1",
        "kind": "PluginConfiguration",
        "metadata": {"name": name, "namespace": "db"},
        "spec": spec
    }))
    .unwrap()
}

/// A self-signed certificate for `name` (cert-manager's selfSigned issuer makes such).
fn self_signed(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

struct Harness {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    server: (String, String),
    client: (String, String),
    stop: CancellationToken,
}

impl Harness {
    async fn start() -> Harness {
        klio_tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let server = self_signed("klio-plugin");
        let client = self_signed("cnpg-operator");
        write(dir.path(), "server.crt", &server.0);
        write(dir.path(), "server.key", &server.1);
        write(dir.path(), "client.crt", &client.0);
        let mut pcs = HashMap::new();
        for (name, spec) in [
            (
                "pc",
                json!({"serverAddress": "klio.db", "clientSecretName": "c", "serverSecretName": "s",
                       "containers": [{"name": "klio-plugin", "env": [{"name": "A", "value": "1"}]}]}),
            ),
            (
                "bad-read-only",
                json!({"serverAddress": "klio.db", "clientSecretName": "c", "serverSecretName": "s",
                       "mode": "read-only", "tier2": {"enableRecovery": true, "enableBackup": true}}),
            ),
        ] {
            pcs.insert(
                ("db".to_string(), name.to_string()),
                configuration(name, spec),
            );
        }
        let plugin = Plugin::new(
            Map(pcs),
            SidecarDefaults {
                image: "klio:test".into(),
                ..SidecarDefaults::default()
            },
        );
        let addr: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let tls = TlsFiles {
            cert: dir.path().join("server.crt"),
            key: dir.path().join("server.key"),
            client_anchors: vec![
                dir.path().join("client.crt"),
                dir.path().join("absent-ca.crt"),
            ],
        };
        let stop = CancellationToken::new();
        tokio::spawn(klio_cnpg_plugin::serve(addr, tls, plugin, stop.clone()));
        let h = Harness {
            addr,
            dir,
            server,
            client,
            stop,
        };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        h
    }

    /// A channel as the operator opens one: its client certificate, trusting only the
    /// plugin's certificate, server name = the Service name.
    async fn channel_with(
        &self,
        server_cert: &str,
        client: &(String, String),
    ) -> Result<Channel, tonic::transport::Error> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(server_cert))
            .identity(Identity::from_pem(&client.0, &client.1))
            .domain_name("klio-plugin");
        Channel::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await
    }

    async fn channel(&self) -> Channel {
        self.channel_with(&self.server.0, &self.client)
            .await
            .unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// A unary call by its wire path.
async fn call<Req, Resp>(ch: &Channel, path: &'static str, req: Req) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(req), path, codec)
        .await
        .map(tonic::Response::into_inner)
}

async fn probe(ch: &Channel) -> Result<identity::ProbeResponse, tonic::Status> {
    call(
        ch,
        "/cnpgi.identity.v1.Identity/Probe",
        identity::ProbeRequest {},
    )
    .await
}

fn cluster(plugins: Value) -> Value {
    json!({
        "metadata": {"name": "pg", "namespace": "db"},
        "spec": {"instances": 1, "plugins": plugins, "somethingNew": {"x": 1}}
    })
}

fn pod() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "pg-1", "namespace": "db"},
        "spec": {"containers": [{"name": "postgres", "image": "pg:17",
                 "volumeMounts": [{"name": "pgdata", "mountPath": "/var/lib/postgresql/data"}]}],
                 "volumes": [{"name": "pgdata", "persistentVolumeClaim": {"claimName": "pg-1"}}]}
    })
}

async fn hook(
    ch: &Channel,
    op: i32,
    cluster: &Value,
    object: &Value,
) -> Result<Vec<u8>, tonic::Status> {
    let r: lifecycle::OperatorLifecycleResponse = call(
        ch,
        "/cnpgi.operator_lifecycle.v1.OperatorLifecycle/LifecycleHook",
        lifecycle::OperatorLifecycleRequest {
            operation_type: Some(lifecycle::OperatorOperationType { r#type: op }),
            cluster_definition: serde_json::to_vec(cluster).unwrap().into(),
            object_definition: serde_json::to_vec(object).unwrap().into(),
        },
    )
    .await?;
    Ok(r.json_patch.to_vec())
}

fn apply(object: &Value, patch: &[u8]) -> Value {
    let mut out = object.clone();
    if !patch.is_empty() {
        let p: json_patch::Patch = serde_json::from_slice(patch).unwrap();
        json_patch::patch(&mut out, &p).unwrap();
    }
    out
}

const EVALUATE: i32 = 6;
const CREATE: i32 = 3;

#[tokio::test]
async fn handshake_names_the_plugin_and_its_capabilities() {
    let h = Harness::start().await;
    let ch = h.channel().await;
    let meta: identity::GetPluginMetadataResponse = call(
        &ch,
        "/cnpgi.identity.v1.Identity/GetPluginMetadata",
        identity::GetPluginMetadataRequest {},
    )
    .await
    .unwrap();
    assert_eq!(meta.name, "klio.enterprisedb.io");
    assert!(!meta.version.is_empty());
    let caps: identity::GetPluginCapabilitiesResponse = call(
        &ch,
        "/cnpgi.identity.v1.Identity/GetPluginCapabilities",
        identity::GetPluginCapabilitiesRequest {},
    )
    .await
    .unwrap();
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .map(|c| match &c.r#type {
            Some(identity::plugin_capability::Type::Service(s)) => s.r#type,
            None => 0,
        })
        .collect();
    // LIFECYCLE_SERVICE, RECONCILER_HOOKS, INSTANCE_SIDECAR_INJECTION,
    // INSTANCE_JOB_SIDECAR_INJECTION; never WAL (2): the sidecars serve it.
    assert_eq!(types, [4, 5, 8, 9]);
    let lc: lifecycle::OperatorLifecycleCapabilitiesResponse = call(
        &ch,
        "/cnpgi.operator_lifecycle.v1.OperatorLifecycle/GetCapabilities",
        lifecycle::OperatorLifecycleCapabilitiesRequest {},
    )
    .await
    .unwrap();
    let kinds: Vec<(String, String, Vec<i32>)> = lc
        .lifecycle_capabilities
        .iter()
        .map(|c| {
            (
                c.group.clone(),
                c.kind.clone(),
                c.operation_types.iter().map(|o| o.r#type).collect(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (String::new(), "Pod".to_string(), vec![CREATE, EVALUATE]),
            ("batch".to_string(), "Job".to_string(), vec![CREATE])
        ]
    );
    let rc: reconciler::ReconcilerHooksCapabilitiesResult = call(
        &ch,
        "/cnpgi.reconciler.v1.ReconcilerHooks/GetCapabilities",
        reconciler::ReconcilerHooksCapabilitiesRequest {},
    )
    .await
    .unwrap();
    assert_eq!(rc.reconciler_capabilities.len(), 1);
    assert_eq!(rc.reconciler_capabilities[0].kind, 1);
    assert!(probe(&ch).await.unwrap().ready);
}

#[tokio::test]
async fn lifecycle_hook_is_deterministic_lenient_and_idempotent() {
    let h = Harness::start().await;
    let ch = h.channel().await;
    let entry =
        json!([{"name": "klio.enterprisedb.io", "parameters": {"pluginConfigurationRef": "pc"}}]);
    let c = cluster(entry.clone());
    let evaluated = apply(&pod(), &hook(&ch, EVALUATE, &c, &pod()).await.unwrap());
    let names: Vec<&str> = evaluated["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["klio-plugin", "klio-wal"]);
    assert_eq!(
        evaluated["spec"]["initContainers"][0]["restartPolicy"],
        "Always"
    );
    // CREATE runs on the already evaluated pod: nothing more to change.
    assert!(hook(&ch, CREATE, &c, &evaluated).await.unwrap().is_empty());
    // The same answer for EDB's API group, with or without a GVK, with unknown fields.
    let mut edb = c.clone();
    edb["apiVersion"] = json!("postgresql.k8s.enterprisedb.io/v1");
    edb["kind"] = json!("Cluster");
    let mut with_gvk = c.clone();
    with_gvk["apiVersion"] = json!("postgresql.cnpg.io/v1");
    for variant in [edb, with_gvk] {
        assert_eq!(
            apply(&pod(), &hook(&ch, CREATE, &variant, &pod()).await.unwrap()),
            evaluated
        );
    }
    // Clusters that do not enable the plugin are not touched.
    let mut off = entry.clone();
    off[0]["enabled"] = json!(false);
    assert!(
        hook(&ch, CREATE, &cluster(off), &pod())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        hook(&ch, CREATE, &cluster(json!([])), &pod())
            .await
            .unwrap()
            .is_empty()
    );
    // Garbage is refused with a message, and the plugin keeps serving.
    let err = call::<_, lifecycle::OperatorLifecycleResponse>(
        &ch,
        "/cnpgi.operator_lifecycle.v1.OperatorLifecycle/LifecycleHook",
        lifecycle::OperatorLifecycleRequest {
            operation_type: None,
            cluster_definition: b"not json".to_vec().into(),
            object_definition: b"{}".to_vec().into(),
        },
    )
    .await
    .unwrap_err();
    assert!(err.message().contains("not JSON"), "{err}");
    assert!(hook(&ch, CREATE, &c, &evaluated).await.unwrap().is_empty());
}

#[tokio::test]
async fn lifecycle_hook_injects_restore_into_recovery_jobs_only() {
    let h = Harness::start().await;
    let ch = h.channel().await;
    let c = json!({
        "metadata": {"name": "restored", "namespace": "db"},
        "spec": {
            "bootstrap": {"recovery": {"source": "origin"}},
            "externalClusters": [{"name": "origin", "plugin": {"name": "klio.enterprisedb.io", "parameters": {"pluginConfigurationRef": "pc"}}}]
        }
    });
    let job = |role: &str| {
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": format!("restored-1-{role}")},
               "spec": {"template": {"metadata": {"labels": {"cnpg.io/jobRole": role}},
                        "spec": {"containers": [{"name": role, "image": "pg:17"}]}}}})
    };
    let patched = apply(
        &job("full-recovery"),
        &hook(&ch, CREATE, &c, &job("full-recovery")).await.unwrap(),
    );
    assert_eq!(
        patched["spec"]["template"]["spec"]["initContainers"][0]["name"],
        "klio-restore"
    );
    assert!(
        hook(&ch, CREATE, &c, &job("initdb"))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn pre_hook_reports_missing_and_invalid_configurations() {
    let h = Harness::start().await;
    let ch = h.channel().await;
    let pre = |c: Value| {
        let ch = ch.clone();
        async move {
            call::<_, reconciler::ReconcilerHooksResult>(
                &ch,
                "/cnpgi.reconciler.v1.ReconcilerHooks/Pre",
                reconciler::ReconcilerHooksRequest {
                    cluster_definition: serde_json::to_vec(&c).unwrap().into(),
                    resource_definition: serde_json::to_vec(&c).unwrap().into(),
                },
            )
            .await
        }
    };
    let with = |r: &str| {
        cluster(
            json!([{"name": "klio.enterprisedb.io", "parameters": {"pluginConfigurationRef": r}}]),
        )
    };
    assert_eq!(pre(with("pc")).await.unwrap().behavior, 1);
    let missing = pre(with("missing")).await.unwrap_err();
    assert!(
        missing
            .message()
            .contains("PluginConfiguration \"missing\"")
            && missing
                .message()
                .contains("does not exist in namespace \"db\""),
        "{missing}"
    );
    let bad = pre(with("bad-read-only")).await.unwrap_err();
    assert!(bad.message().contains("enableBackup"), "{bad}");
    let no_ref = pre(cluster(json!([{"name": "klio.enterprisedb.io"}])))
        .await
        .unwrap_err();
    assert!(
        no_ref.message().contains("pluginConfigurationRef"),
        "{no_ref}"
    );
    // Nothing is injected for a Cluster whose configuration is missing.
    assert!(hook(&ch, CREATE, &with("missing"), &pod()).await.is_err());
    // Other clusters are not the plugin's business.
    assert_eq!(pre(cluster(json!([]))).await.unwrap().behavior, 1);
}

#[tokio::test]
async fn wrong_client_certificate_is_refused_and_rotation_needs_no_restart() {
    let h = Harness::start().await;
    let stranger = self_signed("cnpg-operator");
    let refused = match h.channel_with(&h.server.0, &stranger).await {
        Err(_) => true,
        Ok(ch) => probe(&ch).await.is_err(),
    };
    assert!(
        refused,
        "a client certificate nobody trusts must be refused"
    );

    // cert-manager renews the plugin's certificate: new connections present the new one.
    let renewed = self_signed("klio-plugin");
    write(h.dir.path(), "server.key", &renewed.1);
    write(h.dir.path(), "server.crt", &renewed.0);
    let ch = h.channel_with(&renewed.0, &h.client).await.unwrap();
    assert!(probe(&ch).await.unwrap().ready);
}
