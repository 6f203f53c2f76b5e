//! Real services for Klio's component and end-to-end tests.
//!
//! Tests run in parallel in separate processes (cargo nextest), so everything here gets its
//! own port (bound to 127.0.0.1:0, retried when PostgreSQL finds it taken) and its own
//! directories, and cleans up on drop.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, every PostgreSQL binary is
//! run as the `postgres` OS user (uid/gid from `/etc/passwd`) and every directory handed to it
//! is owned by that user.
//!
//! Principal items:
//! - [`PgCluster`]: a PostgreSQL cluster. [`PgCluster::start`] runs `initdb -k` and starts it
//!   with [`PgOptions`] (authentication [`Auth`], extra `postgresql.conf` lines);
//!   [`PgCluster::standby_of`] makes a streaming hot standby; [`PgCluster::from_data_dir`]
//!   starts a restored data directory. Control: `stop`, `start_again` (the constructor holds the
//!   name `start`), `restart`, `kill9`, `promote`, `reload`, `append_conf`,
//!   `wait_for_recovery_end`. Clients: `dsn`, `socket_dsn`, `psql`, `connect`
//!   (`tokio_postgres`), `pgbench_init`, `pgbench`, `basebackup`, `table_checksums`,
//!   `log_contents`.
//! - [`PgReceiveWal`]: `pg_receivewal` as a reference receiver, with
//!   [`PgReceiveWal::wait_for_segment`].
//! - [`ScratchDir`] / [`scratch_dir`]: temporary directories the `postgres` user can use.
//! - [`ChildGuard`]: a child process killed and reaped on drop (for `klio` processes).
//! - [`PgMajor`]: the PostgreSQL major a cluster runs ([`PgOptions::with_major`]; 15 unless
//!   a test asks for 16, 17 or 18, which `scripts/install-pg-majors.sh` installs under
//!   [`DEFAULT_PG_MAJORS_DIR`]). A test asking for a major that is not installed fails,
//!   naming the script; it is never skipped.
//! - [`pg_bin`], [`postgres_command`]: PostgreSQL 15 binaries (directory overridable with
//!   `KLIO_PG_BIN`, default [`DEFAULT_PG_BIN`]) run as the right user.
//! - [`K8sTestEnv`]: a real Kubernetes control plane (etcd, kube-apiserver,
//!   kube-controller-manager on loopback) from `scripts/k8s-testenv.sh`, shared by the tests of
//!   a test binary ([`K8sTestEnv::shared`]); `kubectl` helpers and fresh namespaces. Missing
//!   binaries fail the test, naming `scripts/k8s-testenv.sh build`.
//! - [`CnpgOperator`]: the real CloudNativePG operator (v1.30, `cnpg-manager` from
//!   `scripts/k8s-testenv.sh build`) against a [`K8sTestEnv`]; installs CloudNativePG's CRDs,
//!   dials CNPG-I plugins through a [`ConnectProxy`] whose routes the test sets
//!   ([`CnpgOperator::route`]). [`mark_job_succeeded`] stands in for the kubelet and the Job
//!   controller; [`wait_for_object`] waits for what the operator creates;
//!   [`self_signed_tls`] makes certificates for plugin Secrets.
//! - [`ConnectProxy`]: an HTTP `CONNECT` proxy on loopback mapping `host:port` names to
//!   loopback addresses, refusing everything else.
//! - [`NetNs`], [`InstanceManagerCache`]: a network namespace of the test's own, and
//!   CloudNativePG's instance-manager cache (the Cluster JSON on `localhost:8010`) inside it,
//!   for running `manager wal-restore` and the PostgreSQL that calls it
//!   ([`PgOptions::in_netns`]).
//! - [`free_port`], [`wait_until`], [`wait_until_async`].
//!
//! Cluster defaults: data checksums, C locale, UTF8, `wal_level = replica`,
//! `max_wal_senders = 10`, `max_replication_slots = 10`, `listen_addresses = '127.0.0.1'`,
//! the socket in `<scratch>/sock`, `fsync = on`, `wal_keep_size = '2GB'`,
//! `shared_buffers = '128MB'`, the log in `<scratch>/postgres.log` (printed when a test panics).
//! Those settings live in `klio_test.conf` in the data directory, included from the end of
//! `postgresql.conf`. `initdb` and `pg_basebackup` run with `--no-sync` to keep tests fast.
//!
//! ```no_run
//! use klio_test_support::{Auth, PgCluster, PgOptions};
//! # fn main() -> anyhow::Result<()> {
//! let primary = PgCluster::start(PgOptions::default().with_auth(Auth::scram("secret")))?;
//! primary.psql("CREATE TABLE t AS SELECT generate_series(1, 10) AS i")?;
//! let standby = PgCluster::standby_of(&primary, PgOptions::default())?;
//! standby.promote()?;
//! assert!(!standby.is_in_recovery()?);
//! # Ok(())
//! # }
//! ```
//!
//! Environment: `KLIO_PG_BIN` (PostgreSQL 15 binaries), `KLIO_PG_MAJORS_DIR` (where 16 and
//! later are installed), `KLIO_PG_<major>_BIN` (one major's binaries), `KLIO_TEST_TMPDIR` (where scratch directories go),
//! `KLIO_KEEP_SCRATCH=1` (keep scratch directories for inspection).

mod cluster;
mod cnpg;
mod connect_proxy;
mod k8s;
mod major;
mod netns;
mod process;
mod receivewal;
mod scratch;
mod services;
mod wait;

pub use cluster::{Auth, PgCluster, PgOptions, free_port};
pub use cnpg::{
    CnpgOperator, PluginTls, cnpg_dir, mark_job_succeeded, plugin_tls_secrets, self_signed_tls,
    wait_for_object,
};
pub use connect_proxy::ConnectProxy;
pub use k8s::{K8sTestEnv, k8s_testenv_script, klio_chart_dir};
pub use major::{DEFAULT_PG_MAJORS_DIR, PgMajor};
pub use netns::{INSTANCE_MANAGER_PORT, InstanceManagerCache, NetNs};
pub use process::{ChildGuard, DEFAULT_PG_BIN, pg_bin, postgres_command, running_as_root};
pub use receivewal::PgReceiveWal;
pub use scratch::{ScratchDir, scratch_dir};
pub use services::{
    Moto, NatsServer, Prometheus, VersityGw, go_peer, http_get, nats_server_binary, url_encode,
};
pub use wait::{wait_until, wait_until_async};
