//! Discovery and OpenAPI documents: what the aggregator merges into kube-apiserver's, so
//! that `kubectl get kliobackups` finds the resource and `kubectl explain kliobackups`
//! describes it.

use serde_json::{Map, Value, json};

use crate::objects::{KIND, RESOURCE, VERSION};

/// The group written backwards, as OpenAPI definition names are
/// (`kliocatalog.enterprisedb.io` → `io.enterprisedb.kliocatalog`).
fn definition_prefix(group: &str) -> String {
    let mut parts: Vec<&str> = group.split('.').collect();
    parts.reverse();
    format!("{}.{VERSION}", parts.join("."))
}

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";
const LIST_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta";

fn s(description: &str) -> Value {
    json!({"type": "string", "description": description})
}
fn i(description: &str) -> Value {
    json!({"type": "integer", "format": "int64", "description": description})
}
fn b(description: &str) -> Value {
    json!({"type": "boolean", "description": description})
}
fn t(description: &str) -> Value {
    json!({"type": "string", "format": "date-time", "description": description})
}

/// The schemas of the group's types (and the metadata types they use), with references
/// written as `ref_base` + name (`#/definitions/` in v2, `#/components/schemas/` in v3).
fn schemas(group: &str, ref_base: &str) -> Map<String, Value> {
    let p = definition_prefix(group);
    let r = |name: &str| json!({"$ref": format!("{ref_base}{name}")});
    let gvk = json!([{"group": group, "version": VERSION, "kind": KIND}]);
    let gvk_list = json!([{"group": group, "version": VERSION, "kind": format!("{KIND}List")}]);
    let mut m = Map::new();
    m.insert(
        format!("{p}.{KIND}"),
        json!({
            "description": "A base backup in a Klio server's catalog (read-only: backups are made by `klio backup` or CloudNativePG Backup objects and removed by retention).",
            "type": "object",
            "properties": {
                "apiVersion": s("APIVersion defines the versioned schema of this representation of an object."),
                "kind": s("Kind is a string value representing the REST resource this object represents."),
                "metadata": r(OBJECT_META),
                "spec": r(&format!("{p}.{KIND}Spec")),
                "status": r(&format!("{p}.{KIND}Status")),
            },
            "x-kubernetes-group-version-kind": gvk,
        }),
    );
    m.insert(
        format!("{p}.{KIND}List"),
        json!({
            "description": "A list of KlioBackups.",
            "type": "object",
            "required": ["items"],
            "properties": {
                "apiVersion": s("APIVersion defines the versioned schema of this representation of an object."),
                "kind": s("Kind is a string value representing the REST resource this object represents."),
                "metadata": r(LIST_META),
                "items": {"type": "array", "items": r(&format!("{p}.{KIND}"))},
            },
            "x-kubernetes-group-version-kind": gvk_list,
        }),
    );
    m.insert(
        format!("{p}.{KIND}Spec"),
        json!({
            "description": "Which backup this is.",
            "type": "object",
            "properties": {
                "backupID": s("The backup's id in the Klio catalog (backup-YYYYMMDDhhmmss)."),
                "clusterName": s("The cluster (WAL archive) the backup belongs to."),
            },
        }),
    );
    m.insert(
        format!("{p}.{KIND}Status"),
        json!({
            "description": "What the backup holds and what it can restore to.",
            "type": "object",
            "properties": {
                "startLSN": i("WAL position where the backup started, as a 64-bit integer."),
                "endLSN": i("WAL position where the backup ended (consistent from there), as a 64-bit integer."),
                "startLocation": s("startLSN as PostgreSQL writes it (X/Y)."),
                "endLocation": s("endLSN as PostgreSQL writes it (X/Y)."),
                "startWAL": s("WAL file holding startLSN."),
                "endWAL": s("WAL file holding endLSN."),
                "startedAt": t("When the backup started."),
                "stoppedAt": t("When the backup ended."),
                "timeline": i("PostgreSQL timeline of the backup."),
                "tiers": {"type": "array", "items": {"type": "integer"}, "description": "Tiers holding the backup: 1 (the Klio server's volume), 2 (object storage)."},
                "systemIdentifier": s("PostgreSQL system identifier of the cluster."),
                "fromStandby": b("Whether the backup was taken from a standby."),
                "dataChecksums": b("Whether the cluster has data checksums (pages were verified)."),
                "logicalSize": i("Bytes of the data directory the backup covers."),
                "newBytes": i("Bytes of data this backup added to the repository, before compression."),
                "newStoredBytes": i("Bytes this backup added to the repository as stored (compressed, encrypted): the cost of this backup."),
                "files": i("Files in the backup."),
                "checksumFailures": i("Pages whose checksum failed during the backup (0 when healthy)."),
                "tablespaces": {
                    "type": "array",
                    "description": "Tablespaces in the backup.",
                    "items": {"type": "object", "properties": {
                        "name": s("Tablespace name."),
                        "oid": i("Tablespace OID."),
                        "location": s("Tablespace directory on the source."),
                    }},
                },
                "recoveryWindow": {
                    "type": "object",
                    "description": "The points in time this backup can restore to: from its end to the end of the cluster's WAL archive.",
                    "properties": {
                        "from": t("The earliest time the backup can restore to."),
                        "fromLocation": s("The earliest WAL position (X/Y)."),
                        "timeline": i("Timeline of that position."),
                    },
                },
                "error": s("Why the server could not read this backup's manifest (only when it could not)."),
            },
        }),
    );
    m.insert(
        OBJECT_META.to_string(),
        json!({
            "description": "ObjectMeta is metadata that all persisted resources must have.",
            "type": "object",
            "properties": {
                "name": s("Name: <cluster>.<backupID>."),
                "namespace": s("Namespace the Klio server's catalog is shown in."),
                "uid": s("UID, stable for a backup."),
                "resourceVersion": s("Version of the catalog when the object last changed."),
                "creationTimestamp": t("When the backup completed."),
                "labels": {"type": "object", "additionalProperties": {"type": "string"}, "description": "klio.enterprisedb.io/cluster: the cluster name."},
            },
        }),
    );
    m.insert(
        LIST_META.to_string(),
        json!({
            "description": "ListMeta describes metadata that synthetic resources must have.",
            "type": "object",
            "properties": {
                "resourceVersion": s("Version of the catalog this list shows."),
            },
        }),
    );
    m
}

/// The API paths this service serves, for OpenAPI.
fn paths(group: &str, ref_base: &str, v3: bool) -> Value {
    let p = definition_prefix(group);
    let base = format!("/apis/{group}/{VERSION}");
    let op = |action: &str, kind: &str, id: &str| {
        let schema = json!({"$ref": format!("{ref_base}{p}.{kind}")});
        let response = if v3 {
            json!({"description": "OK", "content": {"application/json": {"schema": schema}}})
        } else {
            json!({"description": "OK", "schema": schema})
        };
        json!({"get": {
            "operationId": id,
            "tags": [format!("{}_{VERSION}", group.replace('.', "_"))],
            "responses": {"200": response},
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": {"group": group, "version": VERSION, "kind": KIND},
        }})
    };
    json!({
        format!("{base}/{RESOURCE}"): op("list", &format!("{KIND}List"), "listKlioBackupForAllNamespaces"),
        format!("{base}/namespaces/{{namespace}}/{RESOURCE}"): op("list", &format!("{KIND}List"), "listNamespacedKlioBackup"),
        format!("{base}/namespaces/{{namespace}}/{RESOURCE}/{{name}}"): op("get", KIND, "readNamespacedKlioBackup"),
    })
}

/// The OpenAPI v2 document (`/openapi/v2`).
pub fn v2(group: &str) -> Value {
    json!({
        "swagger": "2.0",
        "info": {"title": "Klio catalog", "version": VERSION},
        "paths": paths(group, "#/definitions/", false),
        "definitions": schemas(group, "#/definitions/"),
    })
}

/// The OpenAPI v3 document of the group version (`/openapi/v3/apis/<group>/v1alpha1`).
pub fn v3(group: &str) -> Value {
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Klio catalog", "version": VERSION},
        "paths": paths(group, "#/components/schemas/", true),
        "components": {"schemas": schemas(group, "#/components/schemas/")},
    })
}

/// The OpenAPI v3 index (`/openapi/v3`): where each group version's document is.
pub fn v3_index(group: &str, hash: &str) -> Value {
    json!({"paths": {
        format!("apis/{group}/{VERSION}"): {
            "serverRelativeURL": format!("/openapi/v3/apis/{group}/{VERSION}?hash={hash}"),
        },
    }})
}

/// `/apis`: the group list.
pub fn group_list(group: &str) -> Value {
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_object(group)]})
}

fn group_object(group: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{VERSION}"), "version": VERSION});
    json!({"name": group, "versions": [gv], "preferredVersion": gv})
}

/// `/apis/<group>`.
pub fn group(group: &str) -> Value {
    let mut g = group_object(group);
    g["kind"] = "APIGroup".into();
    g["apiVersion"] = "v1".into();
    g
}

/// `/apis/<group>/v1alpha1`: the resource list discovery reads.
pub fn resource_list(group: &str) -> Value {
    json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": format!("{group}/{VERSION}"),
        "resources": [{
            "name": RESOURCE,
            "singularName": "kliobackup",
            "namespaced": true,
            "kind": KIND,
            "verbs": ["get", "list", "watch"],
            "shortNames": ["kb"],
            "categories": ["klio"],
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `$ref` of `doc` names a schema the document holds.
    fn refs_resolve(doc: &Value, base: &str, schemas: &Map<String, Value>) {
        match doc {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    let name = r.strip_prefix(base).unwrap_or_else(|| panic!("{r}"));
                    assert!(schemas.contains_key(name), "dangling {r}");
                }
                m.values().for_each(|v| refs_resolve(v, base, schemas));
            }
            Value::Array(a) => a.iter().for_each(|v| refs_resolve(v, base, schemas)),
            _ => {}
        }
    }

    #[test]
    fn documents_are_self_contained_and_carry_the_kind() {
        let g = "kliocatalog.enterprisedb.io";
        let v2 = v2(g);
        let defs = v2["definitions"].as_object().unwrap();
        refs_resolve(&v2, "#/definitions/", defs);
        let k = &defs["io.enterprisedb.kliocatalog.v1alpha1.KlioBackup"];
        assert_eq!(
            k["x-kubernetes-group-version-kind"][0]["kind"],
            "KlioBackup"
        );
        let v3 = v3(g);
        let schemas = v3["components"]["schemas"].as_object().unwrap();
        refs_resolve(&v3, "#/components/schemas/", schemas);
        assert_eq!(
            v3_index(g, "abc")["paths"]["apis/kliocatalog.enterprisedb.io/v1alpha1"]["serverRelativeURL"],
            "/openapi/v3/apis/kliocatalog.enterprisedb.io/v1alpha1?hash=abc"
        );
        assert_eq!(
            resource_list(g)["resources"][0]["verbs"],
            json!(["get", "list", "watch"])
        );
        assert_eq!(
            group(g)["preferredVersion"]["groupVersion"],
            "kliocatalog.enterprisedb.io/v1alpha1"
        );
    }
}
