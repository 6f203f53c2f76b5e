//! The gRPC services CloudNativePG's operator calls: `Identity`, `OperatorLifecycle` and
//! `ReconcilerHooks`, over one [`Plugin`] that looks PluginConfigurations up through
//! [`Configurations`] (the Kubernetes API in production, a map in unit tests).
//!
//! CloudNativePG does not interpret gRPC codes: any error stops the reconcile with the
//! message in the Cluster's status, so every refusal says what is wrong and what to do.

use std::future::Future;
use std::sync::Arc;

use klio_k8s_types::{Mode, PluginConfiguration, PluginConfigurationSpec};
use klio_proto::cnpgi::identity::v1 as identity;
use klio_proto::cnpgi::operator_lifecycle::v1 as lifecycle;
use klio_proto::cnpgi::reconciler::v1 as reconciler;
use serde_json::Value;
use tonic::{Request, Response, Status};

use crate::PLUGIN_NAME;
use crate::cluster::{Cluster, configuration_ref};
use crate::lifecycle::{SidecarDefaults, json_patch, mutate_job, mutate_pod};
use crate::sidecar::ArchiveNames;

/// Where PluginConfigurations come from.
pub trait Configurations: Send + Sync + 'static {
    /// The PluginConfiguration `name` of `namespace`; `Ok(None)` when it does not exist.
    fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<PluginConfiguration>, String>> + Send;
}

/// [`Configurations`] through the Kubernetes API.
pub struct KubeConfigurations(pub kube::Client);

impl Configurations for KubeConfigurations {
    async fn get(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<PluginConfiguration>, String> {
        let api: kube::Api<PluginConfiguration> = kube::Api::namespaced(self.0.clone(), namespace);
        api.get_opt(name).await.map_err(|e| {
            format!("read PluginConfiguration \"{name}\" in namespace \"{namespace}\": {e}")
        })
    }
}

/// The operator-side half of the plugin (a cheap handle: clones share one state).
pub struct Plugin<C>(Arc<Inner<C>>);

struct Inner<C> {
    configurations: C,
    defaults: SidecarDefaults,
}

impl<C> Clone for Plugin<C> {
    fn clone(&self) -> Self {
        Plugin(self.0.clone())
    }
}

impl<C: Configurations> Plugin<C> {
    pub fn new(configurations: C, defaults: SidecarDefaults) -> Self {
        Plugin(Arc::new(Inner {
            configurations,
            defaults,
        }))
    }

    /// The PluginConfiguration a plugin entry of `cluster` names, checked.
    async fn configuration(
        &self,
        cluster: &Cluster<'_>,
        entry: &Value,
    ) -> Result<(String, PluginConfigurationSpec), Status> {
        let name = configuration_ref(entry).map_err(Status::failed_precondition)?;
        let namespace = cluster.namespace();
        let pc = self
            .0
            .configurations
            .get(namespace, name)
            .await
            .map_err(Status::unavailable)?
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "PluginConfiguration \"{name}\" (parameters.pluginConfigurationRef of Cluster \"{}\") does not exist in namespace \"{namespace}\": create it",
                    cluster.name()
                ))
            })?;
        check(name, &pc.spec).map_err(Status::failed_precondition)?;
        Ok((name.to_string(), pc.spec))
    }
}

impl<C: Configurations> Plugin<C> {
    /// The archive names of `cluster`: its own (`own`'s clusterName, else the Cluster's name),
    /// and those of its recovery and replica sources when they are this plugin (their
    /// PluginConfiguration's clusterName, else the external cluster's name).
    async fn archive_names(
        &self,
        cluster: &Cluster<'_>,
        own: Option<&PluginConfigurationSpec>,
    ) -> Result<ArchiveNames, Status> {
        let mut names = ArchiveNames {
            own: own
                .and_then(|s| s.cluster_name.clone())
                .unwrap_or_else(|| cluster.name().to_string()),
            recovery_source: None,
            replica_source: None,
        };
        for (source, slot) in [
            (cluster.recovery_source(), &mut names.recovery_source),
            (cluster.replica_source(), &mut names.replica_source),
        ] {
            let Some((external, entry)) = source else {
                continue;
            };
            let (_, spec) = self.configuration(cluster, entry).await?;
            *slot = Some(spec.cluster_name.unwrap_or_else(|| external.to_string()));
        }
        Ok(names)
    }
}

/// The mode rules of the seed, checked again here (the API server checks them on write, but
/// a PluginConfiguration may predate its CRD's rules).
pub fn check(name: &str, spec: &PluginConfigurationSpec) -> Result<(), String> {
    if spec.mode == Mode::ReadOnly {
        let t2 = spec.tier2.as_ref();
        if spec.tier1.is_some() {
            return Err(format!(
                "PluginConfiguration \"{name}\" is read-only and has spec.tier1: remove it"
            ));
        }
        if t2.is_some_and(|t| t.enable_backup) {
            return Err(format!(
                "PluginConfiguration \"{name}\" is read-only and has spec.tier2.enableBackup: true: set it to false"
            ));
        }
        if !t2.is_some_and(|t| t.enable_recovery) {
            return Err(format!(
                "PluginConfiguration \"{name}\" is read-only and needs spec.tier2.enableRecovery: true"
            ));
        }
    }
    Ok(())
}

/// `GetPluginMetadata`'s answer, the same on both halves (CloudNativePG matches the name).
pub fn plugin_metadata() -> identity::GetPluginMetadataResponse {
    identity::GetPluginMetadataResponse {
        name: PLUGIN_NAME.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        display_name: "Klio".to_string(),
        description: "Backups and WAL streaming to a Klio server".to_string(),
        license: "Apache-2.0".to_string(),
        maturity: "alpha".to_string(),
        ..Default::default()
    }
}

/// `GetPluginCapabilities`' answer listing `types`.
pub fn plugin_capabilities(
    types: &[identity::plugin_capability::service::Type],
) -> identity::GetPluginCapabilitiesResponse {
    let capabilities = types
        .iter()
        .map(|t| identity::PluginCapability {
            r#type: Some(identity::plugin_capability::Type::Service(
                identity::plugin_capability::Service { r#type: *t as i32 },
            )),
        })
        .collect();
    identity::GetPluginCapabilitiesResponse { capabilities }
}

fn parse_cluster(bytes: &[u8]) -> Result<Value, Status> {
    Cluster::parse(bytes).map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl<C: Configurations> identity::identity_server::Identity for Plugin<C> {
    async fn get_plugin_metadata(
        &self,
        _: Request<identity::GetPluginMetadataRequest>,
    ) -> Result<Response<identity::GetPluginMetadataResponse>, Status> {
        Ok(Response::new(plugin_metadata()))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<identity::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<identity::GetPluginCapabilitiesResponse>, Status> {
        use identity::plugin_capability::service::Type;
        Ok(Response::new(plugin_capabilities(&[
            Type::LifecycleService,
            Type::ReconcilerHooks,
            Type::InstanceSidecarInjection,
            Type::InstanceJobSidecarInjection,
        ])))
    }

    async fn probe(
        &self,
        _: Request<identity::ProbeRequest>,
    ) -> Result<Response<identity::ProbeResponse>, Status> {
        Ok(Response::new(identity::ProbeResponse { ready: true }))
    }
}

#[tonic::async_trait]
impl<C: Configurations> lifecycle::operator_lifecycle_server::OperatorLifecycle for Plugin<C> {
    async fn get_capabilities(
        &self,
        _: Request<lifecycle::OperatorLifecycleCapabilitiesRequest>,
    ) -> Result<Response<lifecycle::OperatorLifecycleCapabilitiesResponse>, Status> {
        use lifecycle::operator_operation_type::Type;
        let ops = |types: &[Type]| {
            types
                .iter()
                .map(|t| lifecycle::OperatorOperationType { r#type: *t as i32 })
                .collect()
        };
        // No PATCH or UPDATE: the operator patches pods often, and the sidecars are set
        // when the pod is created.
        Ok(Response::new(
            lifecycle::OperatorLifecycleCapabilitiesResponse {
                lifecycle_capabilities: vec![
                    lifecycle::OperatorLifecycleCapabilities {
                        group: String::new(),
                        kind: "Pod".to_string(),
                        operation_types: ops(&[Type::Create, Type::Evaluate]),
                    },
                    lifecycle::OperatorLifecycleCapabilities {
                        group: "batch".to_string(),
                        kind: "Job".to_string(),
                        operation_types: ops(&[Type::Create]),
                    },
                ],
            },
        ))
    }

    async fn lifecycle_hook(
        &self,
        request: Request<lifecycle::OperatorLifecycleRequest>,
    ) -> Result<Response<lifecycle::OperatorLifecycleResponse>, Status> {
        let r = request.into_inner();
        let cluster_json = parse_cluster(&r.cluster_definition)?;
        let cluster = Cluster(&cluster_json);
        let object: Value = serde_json::from_slice(&r.object_definition).map_err(|e| {
            Status::invalid_argument(format!("the object definition is not JSON: {e}"))
        })?;
        let changed = match object["kind"].as_str() {
            Some("Pod") => match cluster.instance_plugin() {
                None => None,
                Some(entry) => {
                    let (name, spec) = self.configuration(&cluster, entry).await?;
                    let names = self.archive_names(&cluster, Some(&spec)).await?;
                    Some(
                        mutate_pod(&object, &name, &spec, &names, &self.0.defaults)
                            .map_err(|e| Status::invalid_argument(e.to_string()))?,
                    )
                }
            },
            Some("Job") => match cluster.recovery_plugin() {
                Some(entry)
                    if crate::lifecycle::job_role(&object)
                        .is_some_and(crate::lifecycle::is_recovery_role) =>
                {
                    // The Job connects as the recovery source's PluginConfiguration says; the
                    // new cluster's own archive name comes from its own plugin entry.
                    let (name, spec) = self.configuration(&cluster, entry).await?;
                    let own = match cluster.instance_plugin() {
                        Some(e) => Some(self.configuration(&cluster, e).await?.1),
                        None => None,
                    };
                    let names = self.archive_names(&cluster, own.as_ref()).await?;
                    mutate_job(&object, &name, &spec, &names, &self.0.defaults)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?
                }
                _ => None,
            },
            _ => None,
        };
        let json_patch = changed.map(|c| json_patch(&object, &c)).unwrap_or_default();
        Ok(Response::new(lifecycle::OperatorLifecycleResponse {
            json_patch: json_patch.into(),
        }))
    }
}

#[tonic::async_trait]
impl<C: Configurations> reconciler::reconciler_hooks_server::ReconcilerHooks for Plugin<C> {
    async fn get_capabilities(
        &self,
        _: Request<reconciler::ReconcilerHooksCapabilitiesRequest>,
    ) -> Result<Response<reconciler::ReconcilerHooksCapabilitiesResult>, Status> {
        Ok(Response::new(
            reconciler::ReconcilerHooksCapabilitiesResult {
                reconciler_capabilities: vec![reconciler::ReconcilerHooksCapability {
                    kind: reconciler::reconciler_hooks_capability::Kind::Cluster as i32,
                }],
            },
        ))
    }

    /// Before a Cluster is reconciled: every PluginConfiguration it names through this
    /// plugin exists and obeys the mode rules, else the reconcile stops with the reason.
    async fn pre(
        &self,
        request: Request<reconciler::ReconcilerHooksRequest>,
    ) -> Result<Response<reconciler::ReconcilerHooksResult>, Status> {
        let r = request.into_inner();
        let cluster_json = parse_cluster(&r.cluster_definition)?;
        let cluster = Cluster(&cluster_json);
        for entry in [cluster.instance_plugin(), cluster.recovery_plugin()]
            .into_iter()
            .flatten()
        {
            self.configuration(&cluster, entry).await?;
        }
        Ok(Response::new(continue_result()))
    }

    async fn post(
        &self,
        _: Request<reconciler::ReconcilerHooksRequest>,
    ) -> Result<Response<reconciler::ReconcilerHooksResult>, Status> {
        Ok(Response::new(continue_result()))
    }
}

fn continue_result() -> reconciler::ReconcilerHooksResult {
    reconciler::ReconcilerHooksResult {
        behavior: reconciler::reconciler_hooks_result::Behavior::Continue as i32,
        requeue_after: 0,
    }
}
