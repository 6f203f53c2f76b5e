//! The `Server` status: `observedGeneration` and the conditions `Ready`, `Progressing` and
//! `Degraded`, computed from what the reconcile saw (a pure function).

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use klio_k8s_types::{CONDITION_READY, ResourceStatus};

pub const CONDITION_PROGRESSING: &str = "Progressing";
pub const CONDITION_DEGRADED: &str = "Degraded";

/// Something a person must fix, reported as `Degraded=True`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `SecretMissing`, `ApplyFailed` or `NameConflict`.
    pub reason: &'static str,
    pub message: String,
}

/// The status for `generation`, given the StatefulSet as last applied or read (`None`: there
/// is none) and the problems met. `previous` keeps each condition's `lastTransitionTime` while
/// its status does not change, so an unchanged Server yields an identical status.
pub fn compute(
    generation: Option<i64>,
    pod: &str,
    statefulset: Option<&StatefulSet>,
    problems: &[Problem],
    previous: Option<&ResourceStatus>,
) -> ResourceStatus {
    let observed = generation.unwrap_or_default();
    let degraded = match problems {
        [] => cond(CONDITION_DEGRADED, false, "AsExpected", "nothing to fix"),
        [first, ..] => {
            let text: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
            cond(CONDITION_DEGRADED, true, first.reason, &text.join("; "))
        }
    };
    let sts_status = statefulset.and_then(|s| s.status.clone());
    let rolling = match (statefulset, &sts_status) {
        (None, _) => None,
        (Some(_), None) => Some("the StatefulSet has no status yet".to_string()),
        (Some(sts), Some(st)) => {
            let want = sts.spec.replicas.unwrap_or(1);
            if st.observed_generation < sts.metadata.generation {
                Some("the StatefulSet controller has not seen the latest template yet".into())
            } else if st.updated_replicas.unwrap_or(0) < want
                || st.update_revision.is_some() && st.current_revision != st.update_revision
            {
                Some(format!(
                    "pod \"{pod}\" is being replaced by revision {}",
                    st.update_revision.as_deref().unwrap_or("?")
                ))
            } else {
                None
            }
        }
    };
    let progressing = match (&rolling, statefulset) {
        (Some(why), _) => cond(CONDITION_PROGRESSING, true, "RollingOut", why),
        (None, Some(_)) => cond(
            CONDITION_PROGRESSING,
            false,
            "RolledOut",
            "the pod runs the latest template",
        ),
        (None, None) => cond(
            CONDITION_PROGRESSING,
            false,
            "NoStatefulSet",
            "the StatefulSet is not created until the problems of Degraded are fixed",
        ),
    };
    let ready_pods = sts_status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let ready = if ready_pods >= 1 {
        cond(
            CONDITION_READY,
            true,
            "PodReady",
            &format!("pod \"{pod}\" accepts connections on the base and WAL ports"),
        )
    } else if statefulset.is_none() {
        cond(
            CONDITION_READY,
            false,
            problems.first().map_or("NoStatefulSet", |p| p.reason),
            "no server pod: see the Degraded condition",
        )
    } else {
        cond(
            CONDITION_READY,
            false,
            "PodNotReady",
            &format!("pod \"{pod}\" is not ready: see \"kubectl describe pod {pod}\" and its logs"),
        )
    };
    let mut conditions = vec![ready, progressing, degraded];
    for c in &mut conditions {
        c.observed_generation = Some(observed);
        if let Some(old) = previous
            .and_then(|p| p.conditions.iter().find(|o| o.type_ == c.type_))
            .filter(|o| o.status == c.status)
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
    ResourceStatus {
        observed_generation: Some(observed),
        conditions,
    }
}

fn cond(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: Time(Timestamp::now()),
        observed_generation: None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn sts(generation: i64, observed: i64, ready: i32, revisions: (&str, &str)) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..ObjectMeta::default()
            },
            spec: StatefulSetSpec {
                replicas: Some(1),
                ..StatefulSetSpec::default()
            },
            status: Some(StatefulSetStatus {
                observed_generation: Some(observed),
                ready_replicas: Some(ready),
                updated_replicas: Some(1),
                replicas: 1,
                current_revision: Some(revisions.0.into()),
                update_revision: Some(revisions.1.into()),
                ..StatefulSetStatus::default()
            }),
        }
    }

    fn get<'a>(s: &'a ResourceStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn compute_ready_rolled_out_server_keeps_transition_times() {
        let s = sts(2, 2, 1, ("r1", "r1"));
        let first = compute(Some(3), "x-klio-0", Some(&s), &[], None);
        assert_eq!(get(&first, CONDITION_READY).status, "True");
        assert_eq!(get(&first, CONDITION_PROGRESSING).reason, "RolledOut");
        assert_eq!(get(&first, CONDITION_DEGRADED).status, "False");
        assert_eq!(first.observed_generation, Some(3));
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let again = compute(Some(3), "x-klio-0", Some(&s), &[], Some(&first));
        assert_eq!(
            again, first,
            "an unchanged server yields an identical status"
        );
    }

    #[test]
    fn compute_rollout_and_missing_secret_are_reported() {
        let s = sts(3, 3, 0, ("r1", "r2"));
        let st = compute(Some(1), "x-klio-0", Some(&s), &[], None);
        assert_eq!(get(&st, CONDITION_PROGRESSING).reason, "RollingOut");
        assert_eq!(get(&st, CONDITION_READY).reason, "PodNotReady");
        let problem = Problem {
            reason: "SecretMissing",
            message: "Secret \"t\" (spec.tlsSecretName) does not exist".into(),
        };
        let st = compute(Some(1), "x-klio-0", None, &[problem], None);
        let degraded = get(&st, CONDITION_DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "SecretMissing")
        );
        assert!(degraded.message.contains("spec.tlsSecretName"));
        assert_eq!(get(&st, CONDITION_READY).reason, "SecretMissing");
    }
}
