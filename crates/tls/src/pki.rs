//! The development PKI: a local CA and the server, cluster and snapshot-reader
//! certificates it signs, written as PEM files into one directory.
//!
//! Layout of the directory (see [`PkiLayout`]):
//!
//! | file                                   | what                                        |
//! |----------------------------------------|---------------------------------------------|
//! | `ca.crt`, `ca.key`                     | the CA (ECDSA P-256)                        |
//! | `server.crt`, `server.key`             | server certificate, EKU serverAuth          |
//! | `client-<cluster>.crt`, `.key`         | `klio@<cluster>`, EKU clientAuth            |
//! | `snapshot-reader.crt`, `.key`          | `snapshot_reader@klio`, EKU clientAuth      |
//!
//! `crl.pem` (written by [`revoke_dev_certs`]) lists the revoked client certificates; the
//! server refuses them with `--client-crl`.
//!
//! Private keys are written with mode 0600, certificates with 0644, each through
//! [`klio_durable::write_atomic`]. Existing files are kept: a second run reuses the CA
//! and only adds what is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, DnsName};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::Error;
use crate::pem::{parse_certs, read_file};
use crate::principal::{CLUSTER_USER, SNAPSHOT_READER_CN, validate_cluster_name};

/// Mode of private key files.
pub const KEY_FILE_MODE: u32 = 0o600;
/// Mode of certificate files.
pub const CERT_FILE_MODE: u32 = 0o644;

const CA_STEM: &str = "ca";
const SERVER_STEM: &str = "server";
const SNAPSHOT_READER_STEM: &str = "snapshot-reader";
const CA_COMMON_NAME: &str = "Klio development CA";
const SERVER_COMMON_NAME: &str = "Klio server";
const ORGANIZATION: &str = "Klio";

/// Validity of the CA certificate.
const CA_VALIDITY: time::Duration = time::Duration::days(3650);
/// Validity of server and client certificates.
const LEAF_VALIDITY: time::Duration = time::Duration::days(825);
/// How far back certificates are valid from, to tolerate clock skew between machines.
const BACKDATE: time::Duration = time::Duration::hours(1);

/// Where a certificate and its private key live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKeyPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertKeyPaths {
    fn in_dir(dir: &Path, stem: &str) -> CertKeyPaths {
        CertKeyPaths {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// The files of a development PKI directory.
#[derive(Debug, Clone)]
pub struct PkiLayout {
    pub dir: PathBuf,
    /// `ca.crt` / `ca.key`.
    pub ca: CertKeyPaths,
    /// `server.crt` / `server.key`.
    pub server: CertKeyPaths,
    /// `snapshot-reader.crt` / `snapshot-reader.key` (`snapshot_reader@klio`).
    pub snapshot_reader: CertKeyPaths,
    /// `admin.crt` / `admin.key` (`admin@klio`).
    pub admin: CertKeyPaths,
    /// `client-<cluster>.crt` / `.key` (`klio@<cluster>`) by cluster name, for the
    /// clusters [`init_dev_pki`] was asked about.
    pub clients: BTreeMap<String, CertKeyPaths>,
    /// Files [`init_dev_pki`] wrote in this run, in order; empty when all existed.
    pub created: Vec<PathBuf>,
}

impl PkiLayout {
    /// The fixed paths of a PKI directory, without touching the file system.
    pub fn in_dir(dir: &Path) -> PkiLayout {
        PkiLayout {
            dir: dir.to_path_buf(),
            ca: CertKeyPaths::in_dir(dir, CA_STEM),
            server: CertKeyPaths::in_dir(dir, SERVER_STEM),
            snapshot_reader: CertKeyPaths::in_dir(dir, SNAPSHOT_READER_STEM),
            admin: CertKeyPaths::in_dir(dir, "admin"),
            clients: BTreeMap::new(),
            created: Vec::new(),
        }
    }

    /// The paths of cluster `cluster`'s client certificate in this directory (whether or
    /// not they exist).
    pub fn client_paths(&self, cluster: &str) -> CertKeyPaths {
        CertKeyPaths::in_dir(&self.dir, &format!("client-{cluster}"))
    }
}

/// Creates or completes a development PKI in `dir` (created if missing).
///
/// An existing CA is loaded and reused, never replaced; missing server and client
/// certificates are issued by it. The server certificate names `localhost`,
/// `127.0.0.1`, `::1` and every entry of `extra_dns` (DNS names or IP addresses); an
/// existing one that lacks any of them is reissued. Each of `clusters` gets
/// `client-<cluster>.crt` with common name `klio@<cluster>`, and the snapshot reader
/// gets `snapshot-reader.crt` with common name `snapshot_reader@klio`, the administrator
/// `admin.crt` with `admin@klio`.
///
/// For a "certificate from another CA", run this on a second directory: each directory
/// has its own, unrelated CA.
pub fn init_dev_pki(
    dir: &Path,
    clusters: &[String],
    extra_dns: &[String],
) -> Result<PkiLayout, Error> {
    for cluster in clusters {
        validate_cluster_name(cluster)?;
    }
    let server_names = server_names(extra_dns)?;
    create_dir(dir)?;

    let mut layout = PkiLayout::in_dir(dir);
    let mut created = Vec::new();
    let ca = load_or_create_ca(&layout.ca, &mut created)?;
    ensure_server_cert(&ca, &layout.server, &server_names, &mut created)?;
    for cluster in clusters {
        let paths = layout.client_paths(cluster);
        let cn = format!("{CLUSTER_USER}@{cluster}");
        ensure_client_cert(&ca, &paths, &cn, &mut created)?;
        layout.clients.insert(cluster.clone(), paths);
    }
    ensure_client_cert(
        &ca,
        &layout.snapshot_reader,
        SNAPSHOT_READER_CN,
        &mut created,
    )?;
    ensure_client_cert(&ca, &layout.admin, crate::ADMIN_CN, &mut created)?;
    layout.created = created;
    Ok(layout)
}

/// Issues a client certificate with an arbitrary `common_name` from the CA in
/// `dir_with_ca`, written as `<out_stem>.crt` and `<out_stem>.key` in that directory
/// (replacing them if present). Returns `(cert, key)` paths.
///
/// Meant for tests and tooling: the common name is not checked, so certificates for
/// other clusters or with malformed names can be made.
pub fn issue_client_cert(
    dir_with_ca: &Path,
    common_name: &str,
    out_stem: &str,
) -> Result<(PathBuf, PathBuf), Error> {
    check_stem(out_stem)?;
    let layout = PkiLayout::in_dir(dir_with_ca);
    let ca = load_ca(&layout.ca)?;
    let paths = CertKeyPaths::in_dir(dir_with_ca, out_stem);
    let (cert, key) = issue_leaf(&ca, common_name, Leaf::Client)?;
    write_pair(&paths, &cert, &key, &mut Vec::new())?;
    Ok((paths.cert, paths.key))
}

/// The revocation list in a development PKI directory.
pub const CRL_FILE: &str = "crl.pem";

/// Adds the certificates `certs` (PEM files issued by the CA in `dir`) to the CA's revocation
/// list `dir/crl.pem`, keeping those it already lists, and returns its path. The list is
/// valid for a year; `klio server --client-crl` refuses the certificates it names.
pub fn revoke_dev_certs(dir: &Path, certs: &[PathBuf]) -> Result<PathBuf, Error> {
    use x509_parser::revocation_list::CertificateRevocationList;
    const CRL: &str = "certificate revocation list";
    let layout = PkiLayout::in_dir(dir);
    let ca = load_ca(&layout.ca)?;
    let path = dir.join(CRL_FILE);
    let mut serials: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut number: u64 = 1;
    if path.exists() {
        let pem = read_file(&path, CRL)?;
        for der in crate::pem::parse_crls(&pem, CRL, Some(&path))? {
            let (_, crl) = CertificateRevocationList::from_der(der.as_ref())
                .map_err(|e| Error::load(CRL, Some(&path), format!("invalid CRL: {e}")))?;
            for r in crl.iter_revoked_certificates() {
                serials.insert(r.raw_serial().to_vec());
            }
            if let Some(n) = crl.crl_number() {
                number = number.max(u64::try_from(n.clone()).unwrap_or(u64::MAX - 1) + 1);
            }
        }
    }
    for cert in certs {
        const WHAT: &str = "certificate to revoke";
        let pem = read_file(cert, WHAT)?;
        for der in parse_certs(&pem, WHAT, Some(cert))? {
            let (_, c) = X509Certificate::from_der(der.as_ref())
                .map_err(|e| Error::load(WHAT, Some(cert), format!("invalid X.509: {e}")))?;
            serials.insert(c.raw_serial().to_vec());
        }
    }
    let now = now();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - BACKDATE,
        next_update: now + time::Duration::days(365),
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: serials
            .into_iter()
            .map(|serial| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&serial),
                revocation_time: now - BACKDATE,
                reason_code: Some(rcgen::RevocationReason::CessationOfOperation),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(&ca)
        .map_err(|e| Error::generate("the certificate revocation list", e))?;
    let pem = crl
        .pem()
        .map_err(|e| Error::generate("the certificate revocation list", e))?;
    klio_durable::write_atomic(&path, pem.as_bytes(), CERT_FILE_MODE)
        .map_err(|e| Error::write(&path, e))?;
    Ok(path)
}

fn check_stem(stem: &str) -> Result<(), Error> {
    let invalid = |reason| Error::InvalidFileStem {
        stem: stem.to_string(),
        reason,
    };
    if stem.is_empty() {
        return Err(invalid("the name is empty"));
    }
    if stem.starts_with('.') {
        return Err(invalid("the name may not start with '.'"));
    }
    if !stem
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
    {
        return Err(invalid(
            "the name may only contain letters, digits, '-', '_', '.' and '@'",
        ));
    }
    if stem == CA_STEM {
        return Err(invalid("the name is reserved for the CA"));
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    klio_durable::create_dir_all_durable(dir).map_err(|source| Error::CreateDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// A name the server certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ServerName {
    Dns(String),
    Ip(IpAddr),
}

fn server_names(extra: &[String]) -> Result<BTreeSet<ServerName>, Error> {
    let mut names = BTreeSet::from([
        ServerName::Dns("localhost".to_string()),
        ServerName::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ServerName::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]);
    for name in extra {
        let parsed = match name.parse::<IpAddr>() {
            Ok(ip) => ServerName::Ip(ip),
            Err(_) => {
                DnsName::try_from(name.as_str()).map_err(|e| Error::InvalidSubjectAltName {
                    name: name.clone(),
                    reason: format!("not an IP address nor a valid DNS name ({e})"),
                })?;
                ServerName::Dns(name.to_ascii_lowercase())
            }
        };
        names.insert(parsed);
    }
    Ok(names)
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

fn new_key(what: &str) -> Result<KeyPair, Error> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::generate(format!("private key for {what}"), e))
}

fn load_or_create_ca(
    paths: &CertKeyPaths,
    created: &mut Vec<PathBuf>,
) -> Result<Issuer<'static, KeyPair>, Error> {
    match (paths.cert.exists(), paths.key.exists()) {
        (true, true) => load_ca(paths),
        (true, false) => Err(Error::CaKeyMissing {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
        }),
        (false, true) => {
            // The key is written before the certificate, so a crash in between leaves
            // only the key: certify it again rather than inventing a new CA.
            tracing::warn!(key = %paths.key.display(), "CA certificate missing, re-creating it from the existing CA key");
            let key = load_key(&paths.key, "CA private key")?;
            let (cert_pem, issuer) = self_sign_ca(key)?;
            write_file(&paths.cert, cert_pem.as_bytes(), CERT_FILE_MODE, created)?;
            Ok(issuer)
        }
        (false, false) => {
            let key = new_key("the CA")?;
            let key_pem = key.serialize_pem();
            let (cert_pem, issuer) = self_sign_ca(key)?;
            write_pair(paths, &cert_pem, &key_pem, created)?;
            Ok(issuer)
        }
    }
}

fn self_sign_ca(key: KeyPair) -> Result<(String, Issuer<'static, KeyPair>), Error> {
    // Every development CA gets its own name (from its public key), so certificates of
    // one CA are reported as "unknown issuer" by another rather than failing a
    // signature check against a namesake.
    let tag: String = key
        .public_key_raw()
        .iter()
        .skip(1)
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(&format!("{CA_COMMON_NAME} {tag}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = now();
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    let cert = params
        .self_signed(&key)
        .map_err(|e| Error::generate("the CA certificate", e))?;
    Ok((cert.pem(), Issuer::new(params, key)))
}

fn load_key(path: &Path, what: &'static str) -> Result<KeyPair, Error> {
    let pem = read_file(path, what)?;
    let text = std::str::from_utf8(&pem)
        .map_err(|_| Error::load(what, Some(path), "the file is not PEM text"))?;
    KeyPair::from_pem(text).map_err(|e| Error::load(what, Some(path), e.to_string()))
}

fn load_ca(paths: &CertKeyPaths) -> Result<Issuer<'static, KeyPair>, Error> {
    const WHAT: &str = "CA certificate";
    let pem = read_file(&paths.cert, WHAT)?;
    let der: CertificateDer<'static> = parse_certs(&pem, WHAT, Some(&paths.cert))?
        .into_iter()
        .next()
        .ok_or_else(|| Error::load(WHAT, Some(&paths.cert), "no certificate found"))?;
    let key = load_key(&paths.key, "CA private key")?;

    let (_, cert) = X509Certificate::from_der(&der)
        .map_err(|e| Error::load(WHAT, Some(&paths.cert), format!("invalid X.509: {e}")))?;
    if !cert.is_ca() {
        return Err(Error::load(
            WHAT,
            Some(&paths.cert),
            "the certificate is not a CA (basicConstraints lacks CA:TRUE)",
        ));
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(Error::CaKeyMismatch {
            cert: paths.cert.clone(),
            key: paths.key.clone(),
        });
    }
    Issuer::from_ca_cert_der(&der, key)
        .map_err(|e| Error::load(WHAT, Some(&paths.cert), e.to_string()))
}

#[derive(Debug, Clone, Copy)]
enum Leaf<'a> {
    Server(&'a BTreeSet<ServerName>),
    Client,
}

/// Issues a leaf certificate; returns `(cert_pem, key_pem)`.
fn issue_leaf(
    ca: &Issuer<'_, KeyPair>,
    common_name: &str,
    leaf: Leaf<'_>,
) -> Result<(String, String), Error> {
    let what = format!("certificate \"{common_name}\"");
    let key = new_key(&what)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let now = now();
    params.not_before = now - BACKDATE;
    params.not_after = now + LEAF_VALIDITY;
    match leaf {
        Leaf::Server(names) => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            for name in names {
                params.subject_alt_names.push(match name {
                    ServerName::Ip(ip) => SanType::IpAddress(*ip),
                    ServerName::Dns(dns) => SanType::DnsName(
                        dns.as_str()
                            .try_into()
                            .map_err(|e| Error::generate(what.clone(), e))?,
                    ),
                });
            }
        }
        Leaf::Client => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    let cert = params
        .signed_by(&key, ca)
        .map_err(|e| Error::generate(what, e))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn ensure_server_cert(
    ca: &Issuer<'_, KeyPair>,
    paths: &CertKeyPaths,
    names: &BTreeSet<ServerName>,
    created: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    if paths.cert.exists() && paths.key.exists() {
        let present = names_in_server_cert(&paths.cert)?;
        let missing: Vec<_> = names.difference(&present).collect();
        if missing.is_empty() {
            return Ok(());
        }
        tracing::info!(cert = %paths.cert.display(), ?missing, "reissuing the server certificate for additional names");
    }
    let (cert, key) = issue_leaf(ca, SERVER_COMMON_NAME, Leaf::Server(names))?;
    write_pair(paths, &cert, &key, created)
}

fn names_in_server_cert(path: &Path) -> Result<BTreeSet<ServerName>, Error> {
    const WHAT: &str = "server certificate";
    let pem = read_file(path, WHAT)?;
    let certs = parse_certs(&pem, WHAT, Some(path))?;
    let mut names = BTreeSet::new();
    let Some(der) = certs.first() else {
        return Ok(names);
    };
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::load(WHAT, Some(path), format!("invalid X.509: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| Error::load(WHAT, Some(path), format!("invalid subjectAltName: {e}")))?;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        match name {
            GeneralName::DNSName(dns) => {
                names.insert(ServerName::Dns(dns.to_ascii_lowercase()));
            }
            GeneralName::IPAddress(bytes) => {
                let ip = match bytes.len() {
                    4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                    _ => None,
                };
                names.extend(ip.map(ServerName::Ip));
            }
            _ => {}
        }
    }
    Ok(names)
}

fn ensure_client_cert(
    ca: &Issuer<'_, KeyPair>,
    paths: &CertKeyPaths,
    common_name: &str,
    created: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    if paths.cert.exists() && paths.key.exists() {
        return Ok(());
    }
    let (cert, key) = issue_leaf(ca, common_name, Leaf::Client)?;
    write_pair(paths, &cert, &key, created)
}

/// Writes the key first, then the certificate: a certificate on disk always has its key.
fn write_pair(
    paths: &CertKeyPaths,
    cert_pem: &str,
    key_pem: &str,
    created: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    write_file(&paths.key, key_pem.as_bytes(), KEY_FILE_MODE, created)?;
    write_file(&paths.cert, cert_pem.as_bytes(), CERT_FILE_MODE, created)
}

fn write_file(
    path: &Path,
    data: &[u8],
    mode: u32,
    created: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    klio_durable::write_atomic(path, data, mode).map_err(|e| Error::write(path, e))?;
    created.push(path.to_path_buf());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn clusters(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    }

    fn common_name(path: &Path) -> String {
        let pem = std::fs::read(path).expect("read cert");
        let der = parse_certs(&pem, "test", None).expect("pem").remove(0);
        let (_, cert) = X509Certificate::from_der(&der).expect("x509");
        cert.subject()
            .iter_common_name()
            .next()
            .expect("cn")
            .as_str()
            .expect("utf8")
            .to_string()
    }

    #[test]
    fn init_dev_pki_fresh_dir_writes_all_files_with_modes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki");
        let layout = init_dev_pki(&dir, &clusters(&["a", "b"]), &["klio.example".to_string()])
            .expect("init");
        let pairs = [
            &layout.ca,
            &layout.server,
            &layout.snapshot_reader,
            &layout.admin,
            &layout.clients["a"],
            &layout.clients["b"],
        ];
        for pair in pairs {
            assert_eq!(mode(&pair.key), 0o600, "{}", pair.key.display());
            assert_eq!(mode(&pair.cert) & 0o600, 0o600, "{}", pair.cert.display());
        }
        assert_eq!(layout.created.len(), 12);
        assert_eq!(common_name(&layout.admin.cert), crate::ADMIN_CN);
        assert_eq!(layout.clients["a"].cert, dir.join("client-a.crt"));
        assert_eq!(common_name(&layout.clients["a"].cert), "klio@a");
        assert_eq!(common_name(&layout.clients["b"].cert), "klio@b");
        assert_eq!(
            common_name(&layout.snapshot_reader.cert),
            "snapshot_reader@klio"
        );
        let names = names_in_server_cert(&layout.server.cert).expect("server names");
        assert!(names.contains(&ServerName::Dns("klio.example".into())));
        assert!(names.contains(&ServerName::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST))));
    }

    #[test]
    fn init_dev_pki_second_run_keeps_ca_and_adds_clients() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first = init_dev_pki(tmp.path(), &clusters(&["a"]), &[]).expect("first");
        let ca_before = std::fs::read(&first.ca.cert).expect("ca");
        let client_a_before = std::fs::read(&first.clients["a"].cert).expect("client a");

        let second = init_dev_pki(tmp.path(), &clusters(&["a", "c"]), &[]).expect("second");
        assert_eq!(std::fs::read(&second.ca.cert).expect("ca"), ca_before);
        assert_eq!(
            std::fs::read(&second.clients["a"].cert).expect("client a"),
            client_a_before
        );
        assert_eq!(
            second.created,
            vec![
                dir_file(tmp.path(), "client-c.key"),
                dir_file(tmp.path(), "client-c.crt")
            ]
        );
        assert_eq!(common_name(&second.clients["c"].cert), "klio@c");
    }

    fn dir_file(dir: &Path, name: &str) -> PathBuf {
        dir.join(name)
    }

    #[test]
    fn init_dev_pki_new_server_name_reissues_server_cert_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        init_dev_pki(tmp.path(), &[], &[]).expect("first");
        let second = init_dev_pki(tmp.path(), &[], &["10.0.0.7".to_string()]).expect("second");
        assert_eq!(
            second.created,
            vec![
                dir_file(tmp.path(), "server.key"),
                dir_file(tmp.path(), "server.crt")
            ]
        );
        let names = names_in_server_cert(&second.server.cert).expect("names");
        assert!(names.contains(&ServerName::Ip("10.0.0.7".parse().expect("ip"))));
    }

    #[test]
    fn init_dev_pki_bad_cluster_name_is_rejected_before_writing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("pki");
        let err = init_dev_pki(&dir, &clusters(&["ok", "Bad_Name"]), &[]).expect_err("invalid");
        assert!(matches!(err, Error::InvalidClusterName { ref name, .. } if name == "Bad_Name"));
        assert!(err.to_string().contains("\nHINT: "));
        assert!(!dir.exists());
    }

    #[test]
    fn init_dev_pki_bad_extra_name_is_rejected() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = init_dev_pki(tmp.path(), &[], &["not a name".to_string()]).expect_err("invalid");
        assert!(
            err.to_string()
                .starts_with("invalid server certificate name \"not a name\""),
            "{err}"
        );
    }

    #[test]
    fn init_dev_pki_ca_cert_without_key_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = init_dev_pki(tmp.path(), &[], &[]).expect("init");
        std::fs::remove_file(&layout.ca.key).expect("rm key");
        let err = init_dev_pki(tmp.path(), &[], &[]).expect_err("missing key");
        assert!(matches!(err, Error::CaKeyMissing { .. }), "{err}");
    }

    #[test]
    fn init_dev_pki_ca_key_without_cert_recertifies_same_key() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = init_dev_pki(tmp.path(), &[], &[]).expect("init");
        let key_before = std::fs::read(&layout.ca.key).expect("key");
        std::fs::remove_file(&layout.ca.cert).expect("rm cert");
        let again = init_dev_pki(tmp.path(), &[], &[]).expect("again");
        assert_eq!(again.created, vec![layout.ca.cert.clone()]);
        assert_eq!(std::fs::read(&layout.ca.key).expect("key"), key_before);
    }

    #[test]
    fn init_dev_pki_mismatched_ca_key_is_an_error() {
        let one = tempfile::tempdir().expect("tempdir");
        let two = tempfile::tempdir().expect("tempdir");
        let a = init_dev_pki(one.path(), &[], &[]).expect("one");
        let b = init_dev_pki(two.path(), &[], &[]).expect("two");
        std::fs::copy(&b.ca.key, &a.ca.key).expect("copy");
        let err = init_dev_pki(one.path(), &[], &[]).expect_err("mismatch");
        assert!(matches!(err, Error::CaKeyMismatch { .. }), "{err}");
    }

    #[test]
    fn issue_client_cert_writes_arbitrary_common_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        init_dev_pki(tmp.path(), &[], &[]).expect("init");
        let (cert, key) = issue_client_cert(tmp.path(), "no-at-sign", "weird").expect("issue");
        assert_eq!(cert, tmp.path().join("weird.crt"));
        assert_eq!(mode(&key), 0o600);
        assert_eq!(common_name(&cert), "no-at-sign");
    }

    #[test]
    fn issue_client_cert_without_ca_names_missing_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = issue_client_cert(tmp.path(), "klio@a", "x").expect_err("no CA");
        let msg = err.to_string();
        assert!(
            msg.starts_with("could not read CA certificate file \""),
            "{msg}"
        );
        assert!(msg.contains("ca.crt"), "{msg}");
    }

    #[test]
    fn issue_client_cert_unsafe_stems_are_rejected() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for stem in ["", "ca", "../x", "a/b", ".hidden"] {
            let err = issue_client_cert(tmp.path(), "klio@a", stem).expect_err(stem);
            assert!(
                matches!(err, Error::InvalidFileStem { .. }),
                "{stem}: {err}"
            );
        }
    }
}
