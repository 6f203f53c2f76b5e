//! The real CloudNativePG operator against the test control plane: it reconciles a Cluster
//! into its initdb Job and, once the test marks the Job succeeded, into the instance Pod; and
//! it dials a CNPG-I plugin Service through the fixture's CONNECT proxy.

use std::io::Read;
use std::net::TcpListener;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use klio_test_support::{
    CnpgOperator, K8sTestEnv, mark_job_succeeded, plugin_tls_secrets, scratch_dir, wait_for_object,
    wait_until,
};

/// One operator at a time per control plane: an operator watches every namespace, so two
/// would both reconcile each test's Cluster. (Under nextest each test has its own process and
/// control plane anyway.)
static OPERATOR: Mutex<()> = Mutex::new(());

#[test]
fn cnpg_operator_cluster_creates_initdb_job_then_instance_pod() {
    let _one = OPERATOR.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    let env = K8sTestEnv::shared();
    let operator = CnpgOperator::start(&env, "cnpg-system", &[]);
    eprintln!("control plane and operator up after {:?}", t0.elapsed());

    let ns = env.create_namespace("cnpg-smoke");
    env.apply(&format!(
        "apiVersion: postgresql.cnpg.io/v1
kind: Cluster
metadata:
  name: smoke
  namespace: {ns}
spec:
  instances: 1
  storage:
    size: 1Gi
"
    ));

    let job = wait_for_object(
        &env,
        &operator,
        &["job", "smoke-1-initdb", "-n", &ns],
        Duration::from_secs(90),
    );
    eprintln!("initdb Job after {:?}", t0.elapsed());
    let containers = &job["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers[0]["name"], "initdb", "{job:#}");
    let command = containers[0]["command"].to_string();
    assert!(command.contains("initdb"), "{command}");
    // The PVC it initializes exists (and stays Pending: no provisioner).
    assert!(
        env.get_json(&["pvc", "smoke-1", "-n", &ns]).is_some(),
        "no PVC smoke-1"
    );

    mark_job_succeeded(&env, &ns, "smoke-1-initdb");
    let pod = wait_for_object(
        &env,
        &operator,
        &["pod", "smoke-1", "-n", &ns],
        Duration::from_secs(90),
    );
    eprintln!("instance Pod after {:?}", t0.elapsed());
    assert_eq!(
        pod["metadata"]["labels"]["cnpg.io/cluster"], "smoke",
        "{pod:#}"
    );
    assert_eq!(pod["status"]["phase"], "Pending", "{pod:#}");
    // The Job controller left the status the test wrote.
    let job = env.get_json(&["job", "smoke-1-initdb", "-n", &ns]).unwrap();
    assert_eq!(job["status"]["succeeded"], 1, "{job:#}");
    // No plugin is configured: the operator asked its proxy for nothing.
    assert!(
        operator.proxy().events().is_empty(),
        "{:?}",
        operator.proxy().events()
    );
}

#[test]
fn cnpg_operator_cluster_with_plugin_dials_plugin_service_through_proxy() {
    let _one = OPERATOR.lock().unwrap_or_else(|e| e.into_inner());
    let env = K8sTestEnv::shared();
    // A stand-in for the plugin's gRPC server: records what the operator sends first.
    let plugin = TcpListener::bind("127.0.0.1:0").unwrap();
    let authority = "klio-plugin.cnpg-system.svc:9090";
    let operator = CnpgOperator::start(
        &env,
        "cnpg-system",
        &[(authority, plugin.local_addr().unwrap())],
    );

    let certs = scratch_dir();
    plugin_tls_secrets(&env, "cnpg-system", certs.path(), "klio-plugin");
    env.apply(
        "apiVersion: v1
kind: Service
metadata:
  name: klio-plugin
  namespace: cnpg-system
  labels:
    cnpg.io/pluginName: klio.enterprisedb.io
  annotations:
    cnpg.io/pluginClientSecret: klio-plugin-client-tls
    cnpg.io/pluginServerSecret: klio-plugin-server-tls
    cnpg.io/pluginPort: \"9090\"
spec:
  selector:
    app: klio-plugin
  ports:
  - port: 9090
",
    );
    // The operator registers the plugin (adding its finalizer to the Service); it dials only
    // when a Cluster uses it.
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(250),
        "the operator's finalizer on the plugin Service",
        || {
            let svc = env.get_json(&["service", "klio-plugin", "-n", "cnpg-system"]);
            Ok(svc.is_some_and(|s| {
                s["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty())
            }))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail(40)));

    let ns = env.create_namespace("cnpg-plugin");
    env.apply(&format!(
        "apiVersion: postgresql.cnpg.io/v1
kind: Cluster
metadata:
  name: withplugin
  namespace: {ns}
spec:
  instances: 1
  storage:
    size: 1Gi
  plugins:
  - name: klio.enterprisedb.io
"
    ));

    // The operator's TLS ClientHello arrives through the tunnel, naming the Service (SNI).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = plugin.accept() {
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut hello = vec![0u8; 2048];
            let n = conn.read(&mut hello).unwrap_or(0);
            hello.truncate(n);
            let _ = tx.send(hello);
        }
    });
    let hello = rx
        .recv_timeout(Duration::from_secs(90))
        .unwrap_or_else(|_| panic!("no connection from the operator\n{}", operator.log_tail(60)));
    assert_eq!(hello.first(), Some(&0x16), "not a TLS handshake: {hello:?}");
    assert!(
        hello
            .windows(b"klio-plugin".len())
            .any(|w| w == b"klio-plugin"),
        "the ClientHello does not name klio-plugin"
    );
    let events = operator.proxy().events();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with(&format!("CONNECT {authority} -> 127.0.0.1:"))),
        "{events:?}"
    );
}
