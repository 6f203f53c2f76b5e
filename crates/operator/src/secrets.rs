//! The Secrets a `Server` references, checked for presence and hashed into the pod template
//! so that a change of their content (a renewed certificate) rolls the server pod.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use klio_k8s_types::{SecretKeySelector, Server};

/// One Secret key the server pod needs, and the spec field that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretUse {
    pub secret: String,
    pub key: String,
    pub field: &'static str,
}

/// Every Secret key `server` needs, in a fixed order (the TLS key first).
pub fn uses(server: &Server) -> Vec<SecretUse> {
    let spec = &server.spec;
    let mut out = Vec::new();
    let mut push = |secret: &str, key: &str, field: &'static str| {
        out.push(SecretUse {
            secret: secret.to_string(),
            key: key.to_string(),
            field,
        })
    };
    push(&spec.tls_secret_name, "tls.key", "spec.tlsSecretName");
    push(&spec.tls_secret_name, "tls.crt", "spec.tlsSecretName");
    push(&spec.ca_secret_name, "ca.crt", "spec.caSecretName");
    let mut selector = |s: &SecretKeySelector, field| push(&s.name, &s.key, field);
    if let Some(t1) = &spec.tier1 {
        selector(&t1.encryption_key, "spec.tier1.encryptionKey");
    }
    if let Some(t2) = &spec.tier2 {
        selector(&t2.encryption_key, "spec.tier2.encryptionKey");
        let s3 = &t2.s3;
        if let Some(s) = &s3.access_key_id {
            selector(s, "spec.tier2.s3.accessKeyId");
        }
        if let Some(s) = &s3.secret_access_key {
            selector(s, "spec.tier2.s3.secretAccessKey");
        }
        if let Some(s) = &s3.custom_ca_bundle {
            selector(s, "spec.tier2.s3.customCaBundle");
        }
    }
    out
}

/// Whether `server` references the Secret `name` (of its namespace).
pub fn references(server: &Server, name: &str) -> bool {
    uses(server).iter().any(|u| u.secret == name)
}

/// A Secret key the server needs that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub secret: String,
    /// `None`: the Secret itself is missing.
    pub key: Option<String>,
    pub field: &'static str,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            None => write!(
                f,
                "Secret \"{}\" ({}) does not exist",
                self.secret, self.field
            ),
            Some(key) => write!(
                f,
                "Secret \"{}\" ({}) has no key \"{key}\"",
                self.secret, self.field
            ),
        }
    }
}

/// The hash of the content of every key in `uses`, or what is missing.
///
/// The hash is keyed with a key derived from the server's TLS private key, so the annotation
/// (readable by anyone who can read pods) cannot be used to test guesses of an encryption
/// passphrase: it changes when any used key changes and reveals nothing else.
pub fn hash(
    uses: &[SecretUse],
    secrets: &BTreeMap<String, Secret>,
) -> Result<String, Vec<Missing>> {
    let mut missing = Vec::new();
    let mut values = Vec::new();
    for u in uses {
        let Some(secret) = secrets.get(&u.secret) else {
            let m = Missing {
                secret: u.secret.clone(),
                key: None,
                field: u.field,
            };
            if !missing.contains(&m) {
                missing.push(m);
            }
            continue;
        };
        match value(secret, &u.key) {
            Some(v) => values.push((u, v)),
            None => missing.push(Missing {
                secret: u.secret.clone(),
                key: Some(u.key.clone()),
                field: u.field,
            }),
        }
    }
    if !missing.is_empty() {
        return Err(missing);
    }
    // `uses` puts the TLS key first; without one there is nothing to hash.
    let Some((_, tls_key)) = values.first() else {
        return Ok(String::new());
    };
    let key = blake3::derive_key("klio-operator secrets hash v1", tls_key);
    let mut h = blake3::Hasher::new_keyed(&key);
    for (u, v) in &values {
        for part in [u.secret.as_bytes(), u.key.as_bytes(), v] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    Ok(h.finalize().to_hex()[..32].to_string())
}

/// The value of `key` in `secret` (`data`, or `stringData` when a client wrote it that way).
fn value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return Some(v.0.clone());
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|s| s.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn secret(name: &str, data: &[(&str, &str)]) -> (String, Secret) {
        let data = data
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect();
        let s = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..Secret::default()
        };
        (name.to_string(), s)
    }

    fn uses_of(pairs: &[(&str, &str)]) -> Vec<SecretUse> {
        pairs
            .iter()
            .map(|(s, k)| SecretUse {
                secret: s.to_string(),
                key: k.to_string(),
                field: "spec.x",
            })
            .collect()
    }

    #[test]
    fn hash_changes_with_content_and_reports_missing() {
        let uses = uses_of(&[("tls", "tls.key"), ("key", "encryptionKey")]);
        let mut secrets = BTreeMap::from([
            secret("tls", &[("tls.key", "K1")]),
            secret("key", &[("encryptionKey", "p1"), ("other", "x")]),
        ]);
        let h1 = hash(&uses, &secrets).unwrap();
        assert_eq!(h1.len(), 32);
        // A key nobody uses does not matter.
        secrets.insert("key".into(), secret("key", &[("encryptionKey", "p1")]).1);
        assert_eq!(hash(&uses, &secrets).unwrap(), h1);
        secrets.insert("key".into(), secret("key", &[("encryptionKey", "p2")]).1);
        assert_ne!(hash(&uses, &secrets).unwrap(), h1);
        secrets.insert("key".into(), secret("key", &[]).1);
        secrets.remove("tls");
        let missing = hash(&uses, &secrets).unwrap_err();
        let text: Vec<String> = missing.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "Secret \"tls\" (spec.x) does not exist",
                "Secret \"key\" (spec.x) has no key \"encryptionKey\""
            ]
        );
    }
}
