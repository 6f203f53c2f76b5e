//! Who is calling: the [`Principal`] named by a client certificate, and the access
//! rules built on it.
//!
//! A client certificate's subject common name is `<user>@<cluster>`. Each PostgreSQL
//! cluster's sidecar holds `klio@<cluster>` and may read and write only that cluster's
//! data; `snapshot_reader@klio` may read the catalog of every cluster and write nothing.

use std::fmt;

use tonic::Status;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::Error;

/// The user of the certificates that clusters' sidecars hold (`klio@<cluster>`).
pub const CLUSTER_USER: &str = "klio";

/// The user of the read-only catalog certificate.
pub const SNAPSHOT_READER_USER: &str = "snapshot_reader";

/// The cluster part of the snapshot reader's common name.
pub const SNAPSHOT_READER_CLUSTER: &str = "klio";

/// The full common name of the administration certificate (queue administration).
pub const ADMIN_CN: &str = "admin@klio";

/// The full common name of the read-only catalog certificate.
pub const SNAPSHOT_READER_CN: &str = "snapshot_reader@klio";

/// The longest cluster name accepted (a Kubernetes DNS label).
pub const MAX_CLUSTER_NAME_LEN: usize = 63;

/// The identity a verified client certificate names: `<user>@<cluster>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    pub user: String,
    pub cluster: String,
}

impl Principal {
    /// The principal of a cluster's own sidecar, `klio@<cluster>`.
    pub fn for_cluster(cluster: &str) -> Principal {
        Principal {
            user: CLUSTER_USER.to_string(),
            cluster: cluster.to_string(),
        }
    }

    /// Parses a common name of the form `<user>@<cluster>`: exactly one `@`, a user of
    /// lowercase letters, digits, `_`, `-` and `.`, and a valid cluster name.
    pub fn from_common_name(common_name: &str) -> Result<Principal, Error> {
        let invalid = |reason| Error::InvalidPrincipal {
            common_name: common_name.to_string(),
            reason,
        };
        let (user, cluster) = common_name
            .split_once('@')
            .ok_or_else(|| invalid("it contains no '@'"))?;
        if cluster.contains('@') {
            return Err(invalid("it contains more than one '@'"));
        }
        if user.is_empty() {
            return Err(invalid("the user before '@' is empty"));
        }
        if cluster.is_empty() {
            return Err(invalid("the cluster after '@' is empty"));
        }
        if !user.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
        }) {
            return Err(invalid(
                "the user may only contain lowercase letters, digits, '_', '-' and '.'",
            ));
        }
        if let Err(reason) = check_cluster_name(cluster) {
            return Err(invalid(reason));
        }
        Ok(Principal {
            user: user.to_string(),
            cluster: cluster.to_string(),
        })
    }

    /// Whether this is the administration principal `admin@klio`.
    pub fn is_admin(&self) -> bool {
        self.user == "admin" && self.cluster == SNAPSHOT_READER_CLUSTER
    }

    /// Whether this is the read-only catalog principal `snapshot_reader@klio`.
    pub fn is_snapshot_reader(&self) -> bool {
        self.user == SNAPSHOT_READER_USER && self.cluster == SNAPSHOT_READER_CLUSTER
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.user, self.cluster)
    }
}

/// Checks a cluster name: `[a-z0-9]([-a-z0-9.]*[a-z0-9])?`, at most 63 characters.
pub fn validate_cluster_name(name: &str) -> Result<(), Error> {
    check_cluster_name(name).map_err(|reason| Error::InvalidClusterName {
        name: name.to_string(),
        reason,
    })
}

fn check_cluster_name(name: &str) -> Result<(), &'static str> {
    let bytes = name.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (None, _) | (_, None) => Err("the cluster name is empty"),
        _ if bytes.len() > MAX_CLUSTER_NAME_LEN => {
            Err("the cluster name is longer than 63 characters")
        }
        _ if !bytes.iter().all(|&b| alnum(b) || b == b'-' || b == b'.') => {
            Err("the cluster name may only contain lowercase letters, digits, '-' and '.'")
        }
        (Some(&first), Some(&last)) if !alnum(first) || !alnum(last) => {
            Err("the cluster name must start and end with a lowercase letter or digit")
        }
        _ => Ok(()),
    }
}

/// Reads the [`Principal`] from a DER-encoded (client) certificate's subject common name.
///
/// This does not verify the certificate; call it on certificates the TLS layer has
/// already verified, such as [`tonic::Request::peer_certs`].
pub fn principal_from_der(cert_der: &[u8]) -> Result<Principal, Error> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| Error::Certificate {
        reason: format!("could not parse X.509 DER: {e}"),
    })?;
    let mut names = cert.subject().iter_common_name();
    let cn = names.next().ok_or_else(|| Error::Certificate {
        reason: format!("subject \"{}\" has no common name", cert.subject()),
    })?;
    if names.next().is_some() {
        return Err(Error::Certificate {
            reason: format!(
                "subject \"{}\" has more than one common name",
                cert.subject()
            ),
        });
    }
    let cn = cn.as_str().map_err(|e| Error::Certificate {
        reason: format!("the subject common name is not a string: {e}"),
    })?;
    Principal::from_common_name(cn)
}

/// The principal of the client that sent `req`, from the verified client certificate of
/// its TLS connection.
///
/// Works with connections from [`crate::tls_incoming`] and from tonic's own TLS
/// acceptor: both leave tonic's `TlsConnectInfo` in the request extensions. Errors are
/// `UNAUTHENTICATED`.
pub fn principal_of<T>(req: &tonic::Request<T>) -> Result<Principal, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    principal_from_der(leaf)
        .map_err(|e| Status::unauthenticated(format!("invalid client certificate: {e}")))
}

/// Allows `principal` to read and write `cluster`'s data: only the cluster's own
/// principal may, never the snapshot reader. Errors are `PERMISSION_DENIED`.
pub fn authorize_cluster(principal: &Principal, cluster: &str) -> Result<(), Status> {
    if cluster == SNAPSHOT_READER_CLUSTER {
        return Err(Status::permission_denied(format!(
            "\"{cluster}\" is reserved for Klio's own certificates ({ADMIN_CN}, {SNAPSHOT_READER_CN}) and is not a cluster name"
        )));
    }
    if principal.user == SNAPSHOT_READER_USER {
        return Err(Status::permission_denied(format!(
            "certificate \"{principal}\" may not access cluster \"{cluster}\"\nHINT: the snapshot reader may only read the catalog"
        )));
    }
    if principal.cluster != cluster {
        return Err(Status::permission_denied(format!(
            "certificate \"{principal}\" may not access cluster \"{cluster}\""
        )));
    }
    Ok(())
}

/// Allows only `admin@klio` ([`ADMIN_CN`]). Errors are `PERMISSION_DENIED`.
pub fn authorize_admin(principal: &Principal) -> Result<(), Status> {
    if principal.is_admin() {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "certificate \"{principal}\" may not administer the server\nHINT: use the certificate with common name \"{ADMIN_CN}\""
    )))
}

/// Allows `principal` to read `cluster`'s catalog (backups, WAL ranges, snapshots): the
/// snapshot reader may read every cluster's, other principals only their own cluster's.
/// Errors are `PERMISSION_DENIED`.
pub fn authorize_catalog_read(principal: &Principal, cluster: &str) -> Result<(), Status> {
    if cluster == SNAPSHOT_READER_CLUSTER {
        return Err(Status::permission_denied(format!(
            "\"{cluster}\" is reserved for Klio's own certificates and is not a cluster name"
        )));
    }
    if principal.is_snapshot_reader() {
        return Ok(());
    }
    if principal.user == SNAPSHOT_READER_USER || principal.cluster != cluster {
        return Err(Status::permission_denied(format!(
            "certificate \"{principal}\" may not read the catalog of cluster \"{cluster}\""
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason_of(cn: &str) -> &'static str {
        match Principal::from_common_name(cn) {
            Err(Error::InvalidPrincipal { reason, .. }) => reason,
            other => panic!("expected InvalidPrincipal for {cn:?}, got {other:?}"),
        }
    }

    #[test]
    fn from_common_name_cluster_certificate_parses() {
        let p = Principal::from_common_name("klio@main-db.prod").expect("valid");
        assert_eq!(p, Principal::for_cluster("main-db.prod"));
        assert_eq!(p.to_string(), "klio@main-db.prod");
        assert!(!p.is_snapshot_reader());
    }

    #[test]
    fn from_common_name_snapshot_reader_is_recognised() {
        let p = Principal::from_common_name(SNAPSHOT_READER_CN).expect("valid");
        assert_eq!(p.user, "snapshot_reader");
        assert_eq!(p.cluster, "klio");
        assert!(p.is_snapshot_reader());
    }

    #[test]
    fn from_common_name_malformed_names_are_rejected() {
        assert_eq!(reason_of("klio"), "it contains no '@'");
        assert_eq!(reason_of(""), "it contains no '@'");
        assert_eq!(reason_of("klio@a@b"), "it contains more than one '@'");
        assert_eq!(reason_of("@@"), "it contains more than one '@'");
        assert_eq!(reason_of("@a"), "the user before '@' is empty");
        assert_eq!(reason_of("klio@"), "the cluster after '@' is empty");
        assert_eq!(reason_of("@"), "the user before '@' is empty");
        assert!(reason_of("Klio@a").starts_with("the user may only contain"));
        assert!(reason_of("klio@A").starts_with("the cluster name may only contain"));
        assert!(reason_of("klio@-a").starts_with("the cluster name must start and end"));
        assert!(reason_of("klio@a b").starts_with("the cluster name may only contain"));
    }

    #[test]
    fn from_common_name_error_quotes_name_and_hints() {
        let msg = Principal::from_common_name("nobody")
            .expect_err("invalid")
            .to_string();
        assert!(msg.starts_with(
            "certificate common name \"nobody\" is not a Klio principal: it contains no '@'\nHINT: "
        ));
    }

    #[test]
    fn validate_cluster_name_accepts_kubernetes_names() {
        for name in ["a", "0", "main", "pg-1", "a.b-c.d", &"x".repeat(63)] {
            validate_cluster_name(name).unwrap_or_else(|e| panic!("{name:?}: {e}"));
        }
    }

    #[test]
    fn validate_cluster_name_rejects_other_names() {
        for name in [
            "",
            "-a",
            "a-",
            ".a",
            "a.",
            "A",
            "a_b",
            "a b",
            "a/b",
            "../x",
            "é",
            &"x".repeat(64),
        ] {
            let err = validate_cluster_name(name).expect_err(name);
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid cluster name \"{name}\": ")),
                "{err}"
            );
        }
    }

    #[test]
    fn authorize_cluster_own_cluster_is_allowed() {
        authorize_cluster(&Principal::for_cluster("a"), "a").expect("own cluster");
    }

    #[test]
    fn authorize_cluster_other_cluster_is_denied_naming_both() {
        let status = authorize_cluster(&Principal::for_cluster("a"), "b").expect_err("denied");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "certificate \"klio@a\" may not access cluster \"b\""
        );
    }

    #[test]
    fn authorize_cluster_snapshot_reader_is_denied_everywhere() {
        let reader = Principal::from_common_name(SNAPSHOT_READER_CN).expect("valid");
        // ("klio" is refused for everyone: the_reserved_name_is_no_cluster...)
        for cluster in ["a", "b"] {
            let status = authorize_cluster(&reader, cluster).expect_err("denied");
            assert_eq!(status.code(), tonic::Code::PermissionDenied);
            assert!(status.message().starts_with(&format!(
                "certificate \"snapshot_reader@klio\" may not access cluster \"{cluster}\""
            )));
        }
    }

    #[test]
    fn the_reserved_name_is_no_cluster_even_for_its_own_principals() {
        for cn in [ADMIN_CN, SNAPSHOT_READER_CN, "klio@klio"] {
            let p = Principal::from_common_name(cn).expect("valid");
            let e = authorize_cluster(&p, "klio").expect_err("reserved");
            assert!(e.message().contains("reserved"), "{cn}: {}", e.message());
            assert!(authorize_catalog_read(&p, "klio").is_err(), "{cn}");
        }
    }

    #[test]
    fn authorize_catalog_read_allows_reader_and_own_cluster_only() {
        let reader = Principal::from_common_name(SNAPSHOT_READER_CN).expect("valid");
        authorize_catalog_read(&reader, "a").expect("reader reads any catalog");
        authorize_catalog_read(&Principal::for_cluster("a"), "a").expect("own catalog");
        let status = authorize_catalog_read(&Principal::for_cluster("a"), "b").expect_err("denied");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "certificate \"klio@a\" may not read the catalog of cluster \"b\""
        );
        let fake_reader = Principal {
            user: SNAPSHOT_READER_USER.to_string(),
            cluster: "a".to_string(),
        };
        authorize_catalog_read(&fake_reader, "b").expect_err("not the real reader");
    }

    #[test]
    fn principal_of_without_tls_is_unauthenticated() {
        let status = principal_of(&tonic::Request::new(())).expect_err("no TLS");
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(status.message(), "no client certificate");
    }

    #[test]
    fn principal_from_der_garbage_is_rejected() {
        let err = principal_from_der(b"\x30\x03\x02\x01\x01").expect_err("not a certificate");
        assert!(
            err.to_string()
                .starts_with("invalid certificate: could not parse X.509 DER"),
            "{err}"
        );
    }
}
