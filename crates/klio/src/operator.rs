//! `klio operator`: the Kubernetes operator (see the `klio-operator` crate).

use std::net::SocketAddr;

use clap::Args;
use klio_operator::leader::LeaseSettings;

#[derive(Args, Debug)]
pub struct OperatorArgs {
    /// Reconcile the Servers of this namespace only (default: every namespace)
    #[arg(long, env = "KLIO_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Namespace of the leader-election Lease (the operator's own; the Helm chart passes it).
    /// Without it there is no leader election: run a single replica
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Name of the leader-election Lease
    #[arg(long, env = "KLIO_OPERATOR_LEASE", default_value = "klio-operator")]
    leader_election_lease: String,
    /// Address of the HTTP probes /healthz and /readyz (none when not given)
    #[arg(long, env = "KLIO_OPERATOR_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
}

impl OperatorArgs {
    pub fn into_options(self) -> klio_operator::Options {
        let host = std::env::var("POD_NAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "klio-operator".to_string());
        // Unique per process, so that a restarted replica never mistakes its predecessor's
        // lease for its own.
        let identity = format!("{host}_{:08x}", rand_suffix());
        if self.leader_election_namespace.is_none() {
            tracing::warn!(
                "no --leader-election-namespace: running without leader election (a single replica only)"
            );
        }
        klio_operator::Options {
            namespace: self.namespace,
            lease: self
                .leader_election_namespace
                .map(|ns| LeaseSettings::new(ns, self.leader_election_lease, identity.clone())),
            health_listen: self.health_listen,
            identity,
        }
    }
}

fn rand_suffix() -> u32 {
    let mut b = [0u8; 4];
    // The clock and pid are enough to tell two processes apart should the RNG fail.
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        return t ^ std::process::id();
    }
    u32::from_le_bytes(b)
}
