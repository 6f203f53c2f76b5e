//! The `Server` controller: one reconcile per `Server`, around the pure builders of
//! [`crate::render`], [`crate::secrets`] and [`crate::status`].
//!
//! A reconcile reads the referenced Secrets, applies (server-side apply, field manager
//! [`MANAGER`]) the claims, the Service and — when every Secret is there — the StatefulSet, then
//! writes the status only if it changed. Applying an unchanged object is a no-op for the API
//! server, so a reconcile of an unchanged `Server` writes nothing.
//!
//! Errors are classified once: a refusal by the API server (validation, an immutable field, a
//! forbidden request) is a `Degraded` condition with its message and a retry in a minute; a
//! transport or server error is returned to the controller, which retries in seconds.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service};
use klio_k8s_types::Server;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::render::{self, Rendered};
use crate::secrets;
use crate::status::{self, CONDITION_DEGRADED, Problem};

/// The field manager of every apply, and the events' reporting controller.
pub const MANAGER: &str = "klio-operator";
/// The label selecting what the operator created (to watch only that).
const MANAGED: &str = "app.kubernetes.io/managed-by=klio-operator";
/// Periodic resync of a healthy `Server`.
const RESYNC: Duration = Duration::from_secs(300);
/// Retry of a `Server` the API server refused something for.
const RETRY_REFUSED: Duration = Duration::from_secs(60);
/// Retry after a transport or server error.
const RETRY_ERROR: Duration = Duration::from_secs(10);

/// A reconcile that could not finish; the controller retries it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Render(#[from] render::RenderError),
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
}

/// Runs the controller over `namespace` (all when `None`) until `shutdown` fires.
pub async fn run(
    client: Client,
    namespace: Option<&str>,
    identity: &str,
    shutdown: CancellationToken,
) {
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let managed = || watcher::Config::default().labels(MANAGED);
    let controller = Controller::new(
        api::<Server>(&client, namespace),
        watcher::Config::default(),
    );
    let store = controller.store();
    // Secrets by metadata only: their content is read per reconcile, only the referenced ones.
    let secret_changes = watcher(
        api::<PartialObjectMeta<Secret>>(&client, namespace),
        watcher::Config::default(),
    )
    .touched_objects();
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.to_string(),
                instance: Some(identity.to_string()),
            },
        ),
        client: client.clone(),
    });
    controller
        .owns(api::<StatefulSet>(&client, namespace), managed())
        .owns(api::<Service>(&client, namespace), managed())
        .watches_stream(secret_changes, move |secret: PartialObjectMeta<Secret>| {
            let (ns, name) = (secret.namespace(), secret.name_any());
            store
                .state()
                .into_iter()
                .filter(|s| s.namespace() == ns && secrets::references(s, &name))
                .map(|s| ObjectRef::from_obj(&*s))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((server, _)) => tracing::debug!(server = %server, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

fn error_policy(server: Arc<Server>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(server = %server.name_any(), error = %error, "reconcile failed; retrying");
    Action::requeue(RETRY_ERROR)
}

/// What an apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Created,
    Updated,
    Unchanged,
}

/// The outcome of applying one object.
enum Applied<K> {
    Done(K, Change),
    /// The API server refused it, or it belongs to someone else: a condition, not a retry.
    Refused(Problem),
}

/// Applies `obj` unless an object of that name exists whose controller is not `owner_uid`.
async fn apply<K>(api: &Api<K>, obj: &K, owner_uid: Option<&str>) -> Result<Applied<K>, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let name = obj.meta().name.clone().unwrap_or_default();
    let before = api
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("read {kind} \"{name}\"")))?;
    if let (Some(uid), Some(existing)) = (owner_uid, &before) {
        let owned = existing
            .owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && o.uid == uid);
        if !owned {
            return Ok(Applied::Refused(Problem {
                reason: "NameConflict",
                message: format!(
                    "{kind} \"{name}\" already exists and is not controlled by this Server: rename or delete it"
                ),
            }));
        }
    }
    let params = PatchParams::apply(MANAGER).force();
    match api.patch(&name, &params, &Patch::Apply(obj)).await {
        Ok(after) => {
            let change = match &before {
                None => Change::Created,
                Some(b) if b.resource_version() != after.resource_version() => Change::Updated,
                Some(_) => Change::Unchanged,
            };
            Ok(Applied::Done(after, change))
        }
        Err(kube::Error::Api(status))
            if (400..500).contains(&status.code) && status.code != 429 =>
        {
            Ok(Applied::Refused(Problem {
                reason: "ApplyFailed",
                message: format!("apply {kind} \"{name}\": {}", status.message),
            }))
        }
        Err(e) => Err(kube_err(format!("apply {kind} \"{name}\""))(e)),
    }
}

async fn reconcile(server: Arc<Server>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = server.name_any();
    let namespace = server.namespace().unwrap_or_default();
    let client = &ctx.client;
    let uid = server.meta().uid.clone().unwrap_or_default();

    let uses = secrets::uses(&server);
    let secret_api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let mut found = BTreeMap::new();
    for u in &uses {
        if found.contains_key(&u.secret) {
            continue;
        }
        if let Some(s) = secret_api
            .get_opt(&u.secret)
            .await
            .map_err(kube_err(format!("read Secret \"{}\"", u.secret)))?
        {
            found.insert(u.secret.clone(), s);
        }
    }
    let mut problems = Vec::new();
    let hash = secrets::hash(&uses, &found).map_err(|missing| {
        let text: Vec<String> = missing.iter().map(ToString::to_string).collect();
        problems.push(Problem {
            reason: "SecretMissing",
            message: format!(
                "{}: create it (e.g. with cert-manager) or fix the reference",
                text.join(", ")
            ),
        });
    });
    let Rendered {
        statefulset,
        service,
        claims,
    } = render::render(&server, hash.as_deref().unwrap_or_default())?;

    let mut changes = Vec::new();
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    for claim in &claims {
        note(
            &mut changes,
            &mut problems,
            claim,
            apply(&pvc_api, claim, None).await?,
        );
    }
    let svc_api: Api<Service> = Api::namespaced(client.clone(), &namespace);
    note(
        &mut changes,
        &mut problems,
        &service,
        apply(&svc_api, &service, Some(&uid)).await?,
    );
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let sts_name = render::statefulset_name(&name);
    // Without its Secrets the pod could not start: a running server is left as it is.
    let current = if hash.is_ok() {
        match apply(&sts_api, &statefulset, Some(&uid)).await? {
            Applied::Done(sts, change) => {
                changes.push(("StatefulSet".to_string(), sts_name.clone(), change));
                Some(sts)
            }
            Applied::Refused(p) => {
                problems.push(p);
                None
            }
        }
    } else {
        sts_api
            .get_opt(&sts_name)
            .await
            .map_err(kube_err(format!("read StatefulSet \"{sts_name}\"")))?
            .filter(|s| s.owner_references().iter().any(|o| o.uid == uid))
    };

    let reference = server.object_ref(&());
    for (kind, object, change) in &changes {
        let reason = match change {
            Change::Created => "Created",
            Change::Updated => "Updated",
            Change::Unchanged => continue,
        };
        publish(
            &ctx,
            &reference,
            EventType::Normal,
            reason,
            format!("{reason} {kind} \"{object}\""),
        )
        .await;
    }

    let pod = format!("{sts_name}-0");
    let previous = server.status.as_ref();
    let status = status::compute(
        server.meta().generation,
        &pod,
        current.as_ref(),
        &problems,
        previous,
    );
    if previous != Some(&status) {
        let was_degraded = previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == CONDITION_DEGRADED))
            .map(|c| (c.status.clone(), c.reason.clone()));
        if let Some(d) = status
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_DEGRADED)
            && d.status == "True"
            && was_degraded != Some((d.status.clone(), d.reason.clone()))
        {
            publish(
                &ctx,
                &reference,
                EventType::Warning,
                &d.reason,
                d.message.clone(),
            )
            .await;
        }
        let api: Api<Server> = Api::namespaced(client.clone(), &namespace);
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await
        .map_err(kube_err(format!("update the status of Server \"{name}\"")))?;
    }
    Ok(Action::requeue(if problems.is_empty() {
        RESYNC
    } else {
        RETRY_REFUSED
    }))
}

/// Records the outcome of applying `obj`.
fn note<K: Resource<DynamicType = ()>>(
    changes: &mut Vec<(String, String, Change)>,
    problems: &mut Vec<Problem>,
    obj: &K,
    applied: Applied<K>,
) {
    match applied {
        Applied::Done(_, change) => {
            let name = obj.meta().name.clone().unwrap_or_default();
            changes.push((K::kind(&()).to_string(), name, change));
        }
        Applied::Refused(p) => problems.push(p),
    }
}

async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, "cannot record an event");
    }
}
