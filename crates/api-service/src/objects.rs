//! The `KlioBackup` resource: a backup's catalog metadata as a Kubernetes object, its table
//! row (`kubectl get`), the `Status` objects errors are answered with, and label and field
//! selectors. Pure functions over JSON, so everything here is unit-tested.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The resource's plural name (the URL segment).
pub const RESOURCE: &str = "kliobackups";
/// Its kind.
pub const KIND: &str = "KlioBackup";
/// Its one API version.
pub const VERSION: &str = "v1alpha1";
/// The default API group (the seed's); a second Klio server needs a group of its own.
pub const DEFAULT_GROUP: &str = "kliocatalog.enterprisedb.io";
/// Label holding the cluster (archive) name, for `-l klio.enterprisedb.io/cluster=...`.
pub const CLUSTER_LABEL: &str = "klio.enterprisedb.io/cluster";

/// One backup of the catalog, as the Klio server lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    pub cluster: String,
    pub backup_id: String,
    /// The backup's metadata (the server's `BackupSummary.metadata_json`).
    pub metadata: Value,
    pub in_tier1: bool,
    pub in_tier2: bool,
}

impl CatalogEntry {
    /// The object name: `<cluster>.<backupID>` (cluster names cannot hold a dot).
    pub fn name(&self) -> String {
        format!("{}.{}", self.cluster, self.backup_id)
    }
}

/// Parses `X/Y` (PostgreSQL's text form of an LSN) into its 64-bit value.
pub fn lsn_value(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u32::MAX as u64 && lo <= u32::MAX as u64).then_some(hi << 32 | lo)
}

/// An RFC 3339 time at whole seconds in UTC, as Kubernetes writes times.
pub fn kube_time(text: &str) -> Option<String> {
    let t = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    let t = t.to_offset(time::UtcOffset::UTC);
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

/// A time as the seed's table shows it (Go's `time.Time.String()` in UTC):
/// `2025-11-13 09:31:37 +0000 UTC`.
fn table_time(text: &str) -> String {
    match kube_time(text) {
        Some(t) => format!("{} {} +0000 UTC", &t[..10], &t[11..19]),
        None => String::new(),
    }
}

/// A stable object uid derived from what identifies the backup, formatted as a UUID.
fn uid(group: &str, entry: &CatalogEntry) -> String {
    let h = blake3::hash(
        format!(
            "{group}\0{}\0{}\0{}",
            entry.cluster, entry.backup_id, entry.metadata["started_at"]
        )
        .as_bytes(),
    );
    let x = hex(&h.as_bytes()[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `KlioBackup` object of `entry` in `namespace` (without a resourceVersion: the
/// catalog sets it).
pub fn backup_object(group: &str, namespace: &str, entry: &CatalogEntry) -> Value {
    let m = &entry.metadata;
    let mut metadata = json!({
        "name": entry.name(),
        "namespace": namespace,
        "uid": uid(group, entry),
        "labels": { CLUSTER_LABEL: entry.cluster },
    });
    if let Some(t) = m["stopped_at"].as_str().and_then(kube_time) {
        metadata["creationTimestamp"] = t.into();
    }
    let spec = json!({ "backupID": entry.backup_id, "clusterName": entry.cluster });
    let mut tiers = Vec::new();
    if entry.in_tier1 {
        tiers.push(1);
    }
    if entry.in_tier2 {
        tiers.push(2);
    }
    let mut status = serde_json::Map::new();
    if let Some(e) = m.get("error") {
        // A manifest the server could not read: say so rather than hide the backup.
        status.insert(
            "error".into(),
            e.as_str()
                .map_or_else(|| e.to_string(), str::to_string)
                .into(),
        );
        status.insert("tiers".into(), tiers.into());
        return json!({
            "apiVersion": format!("{group}/{VERSION}"),
            "kind": KIND,
            "metadata": metadata,
            "spec": spec,
            "status": status,
        });
    }
    let text = |k: &str| m[k].as_str().map(str::to_string);
    if let Some(v) = text("start_lsn").as_deref().and_then(lsn_value) {
        status.insert("startLSN".into(), v.into());
    }
    if let Some(v) = text("end_lsn").as_deref().and_then(lsn_value) {
        status.insert("endLSN".into(), v.into());
    }
    for (key, field) in [
        ("start_lsn", "startLocation"),
        ("end_lsn", "endLocation"),
        ("start_wal", "startWAL"),
        ("end_wal", "endWAL"),
    ] {
        if let Some(v) = text(key) {
            status.insert(field.into(), v.into());
        }
    }
    for (key, field) in [("started_at", "startedAt"), ("stopped_at", "stoppedAt")] {
        if let Some(v) = text(key).as_deref().and_then(kube_time) {
            status.insert(field.into(), v.into());
        }
    }
    for (key, field) in [
        ("timeline", "timeline"),
        ("logical_size", "logicalSize"),
        ("bytes_new", "newStoredBytes"),
        ("plain_bytes_new", "newBytes"),
        ("files", "files"),
    ] {
        if let Some(v) = m[key].as_u64() {
            status.insert(field.into(), v.into());
        }
    }
    for (key, field) in [
        ("from_standby", "fromStandby"),
        ("data_checksums", "dataChecksums"),
    ] {
        if let Some(v) = m[key].as_bool() {
            status.insert(field.into(), v.into());
        }
    }
    if let Some(v) = m.get("system_id").filter(|v| !v.is_null()) {
        let s = v.as_str().map_or_else(|| v.to_string(), str::to_string);
        status.insert("systemIdentifier".into(), s.into());
    }
    status.insert("tiers".into(), tiers.into());
    let failures = m["checksum_failures"].as_array().map_or(0, Vec::len);
    status.insert("checksumFailures".into(), failures.into());
    if let Some(list) = m["tablespaces"].as_array()
        && !list.is_empty()
    {
        let t: Vec<Value> = list
            .iter()
            .map(|t| json!({"name": t["name"], "oid": t["oid"], "location": t["location"]}))
            .collect();
        status.insert("tablespaces".into(), t.into());
    }
    // A backup can restore to any point from the moment it became consistent (its end) to
    // the end of the cluster's WAL archive.
    if let (Some(from), Some(lsn)) = (
        text("stopped_at").as_deref().and_then(kube_time),
        text("end_lsn"),
    ) {
        status.insert(
            "recoveryWindow".into(),
            json!({ "from": from, "fromLocation": lsn, "timeline": m["timeline"] }),
        );
    }
    json!({
        "apiVersion": format!("{group}/{VERSION}"),
        "kind": KIND,
        "metadata": metadata,
        "spec": spec,
        "status": status,
    })
}

/// A byte count for people: `352.1 MiB`.
pub fn human_bytes(v: Option<u64>) -> String {
    let Some(v) = v else {
        return String::new();
    };
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = v as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v} B")
    } else {
        format!("{x:.1} {}", units[u])
    }
}

/// The table's columns: the seed's four, then wide ones (`-o wide`, priority 1).
pub fn column_definitions() -> Value {
    let col = |name: &str, ty: &str, format: &str, description: &str, priority: u32| json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority});
    json!([
        col("Name", "string", "name", "<cluster>.<backupID>", 0),
        col(
            "Cluster Name",
            "string",
            "",
            "The cluster (WAL archive) the backup belongs to",
            0
        ),
        col("Started At", "string", "", "When the backup started", 0),
        col(
            "Stopped At",
            "string",
            "",
            "When the backup ended: the earliest time it can restore to",
            0
        ),
        col("Timeline", "integer", "", "PostgreSQL timeline", 1),
        col("Tiers", "string", "", "Tiers holding the backup", 1),
        col(
            "Size",
            "string",
            "",
            "Logical size of the data directory",
            1
        ),
        col(
            "New",
            "string",
            "",
            "Bytes this backup added to the repository (stored)",
            1
        ),
        col(
            "End WAL",
            "string",
            "",
            "WAL file holding the backup's end",
            1
        ),
    ])
}

/// The cells of `object`'s row, in [`column_definitions`]' order.
pub fn row_cells(object: &Value) -> Value {
    let s = &object["status"];
    let tiers: Vec<String> = s["tiers"]
        .as_array()
        .map(|t| t.iter().map(|v| v.to_string()).collect())
        .unwrap_or_default();
    let time_cell = |k: &str| s[k].as_str().map(table_time).unwrap_or_default();
    json!([
        object["metadata"]["name"],
        object["spec"]["clusterName"],
        time_cell("startedAt"),
        time_cell("stoppedAt"),
        s["timeline"],
        tiers.join(","),
        human_bytes(s["logicalSize"].as_u64()),
        human_bytes(s["newStoredBytes"].as_u64()),
        s["endWAL"].as_str().unwrap_or(""),
    ])
}

/// How much of each object a table row carries (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

/// The object as `PartialObjectMetadata`.
pub fn partial_metadata(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object["metadata"],
    })
}

/// A `meta.k8s.io/v1` Table of `objects`.
pub fn table(objects: &[&Value], resource_version: &str, include: IncludeObject) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut row = json!({ "cells": row_cells(o) });
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => row["object"] = partial_metadata(o),
                IncludeObject::Object => row["object"] = (*o).clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": { "resourceVersion": resource_version },
        "columnDefinitions": column_definitions(),
        "rows": rows,
    })
}

/// A `Status` failure, the body of every error answer.
pub fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed label selector (`a=b,c!=d,e in (f,g),!h`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelRequirement>);

/// Splits at commas outside parentheses.
fn split_top(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced parentheses".into());
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses".into());
    }
    out.push(&s[start..]);
    Ok(out)
}

fn check_key(k: &str) -> Result<String, String> {
    let ok = !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(k.to_string())
    } else {
        Err(format!("invalid label key {k:?}"))
    }
}

fn check_value(v: &str) -> Result<String, String> {
    let ok = v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!("invalid label value {v:?}"))
    }
}

impl LabelSelector {
    /// Parses Kubernetes' label selector syntax; the error says what is wrong.
    pub fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut reqs = Vec::new();
        if text.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for part in split_top(text)? {
            let p = part.trim();
            if p.is_empty() {
                return Err("empty requirement".into());
            }
            let set = |rest: &str| -> Result<Vec<String>, String> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| format!("expected (values) in {p:?}"))?;
                inner.split(',').map(|v| check_value(v.trim())).collect()
            };
            if let Some(k) = p.strip_prefix('!') {
                reqs.push(LabelRequirement::DoesNotExist(check_key(k.trim())?));
            } else if let Some((k, v)) = p.split_once("!=") {
                reqs.push(LabelRequirement::NotIn(
                    check_key(k.trim())?,
                    vec![check_value(v.trim())?],
                ));
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                reqs.push(LabelRequirement::In(
                    check_key(k.trim())?,
                    vec![check_value(v.trim())?],
                ));
            } else if let Some((k, rest)) = p.split_once(" notin ") {
                reqs.push(LabelRequirement::NotIn(check_key(k.trim())?, set(rest)?));
            } else if let Some((k, rest)) = p.split_once(" in ") {
                reqs.push(LabelRequirement::In(check_key(k.trim())?, set(rest)?));
            } else {
                reqs.push(LabelRequirement::Exists(check_key(p)?));
            }
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            LabelRequirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            LabelRequirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

/// The fields a field selector may name, and where each is in the object.
const FIELDS: [(&str, &str, &str); 4] = [
    ("metadata.name", "metadata", "name"),
    ("metadata.namespace", "metadata", "namespace"),
    ("spec.clusterName", "spec", "clusterName"),
    ("spec.backupID", "spec", "backupID"),
];

/// A parsed field selector (`spec.clusterName=pg,metadata.name!=x`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(&'static str, &'static str, bool, String)>);

impl FieldSelector {
    /// Parses a field selector over the fields it supports (metadata.name, metadata.namespace,
    /// spec.clusterName, spec.backupID); others are refused by name.
    pub fn parse(text: &str) -> Result<FieldSelector, String> {
        let mut reqs = Vec::new();
        if text.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for part in text.split(',') {
            let p = part.trim();
            let (k, v, equal) = if let Some((k, v)) = p.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                (k, v, true)
            } else {
                return Err(format!("invalid field selector requirement {p:?}"));
            };
            let k = k.trim();
            let Some((_, section, field)) = FIELDS.iter().find(|(name, _, _)| *name == k) else {
                return Err(format!(
                    "field label not supported: {k} (supported: {})",
                    FIELDS.map(|f| f.0).join(", ")
                ));
            };
            reqs.push((*section, *field, equal, v.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    /// Whether `object` satisfies every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(section, field, equal, v)| {
            (object[section][field].as_str() == Some(v.as_str())) == *equal
        })
    }

    /// The value `metadata.name` must have, if the selector pins it.
    pub fn pinned_name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(s, f, eq, _)| *s == "metadata" && *f == "name" && *eq)
            .map(|(_, _, _, v)| v.as_str())
    }
}

/// The labels of an object.
pub fn labels_of(object: &Value) -> BTreeMap<String, String> {
    object["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> CatalogEntry {
        CatalogEntry {
            cluster: "pg-one".into(),
            backup_id: "backup-20251113093137".into(),
            metadata: json!({
                "timeline": 1,
                "start_lsn": "0/7000028",
                "end_lsn": "0/7000120",
                "start_wal": "000000010000000000000007",
                "end_wal": "000000010000000000000007",
                "started_at": "2025-11-13T09:31:37.123456Z",
                "stopped_at": "2025-11-13T09:31:39.9Z",
                "system_id": "7300000000000000001",
                "from_standby": false,
                "data_checksums": true,
                "logical_size": 52_428_800u64,
                "bytes_new": 1_048_576u64,
                "plain_bytes_new": 4_194_304u64,
                "files": 1234,
                "checksum_failures": [{"path": "base/1/2", "block": 3}],
                "tablespaces": [{"oid": 16400, "name": "ts", "location": "/ts"}],
            }),
            in_tier1: true,
            in_tier2: true,
        }
    }

    #[test]
    fn object_has_the_seed_fields_and_more() {
        let o = backup_object(DEFAULT_GROUP, "ns", &entry());
        assert_eq!(o["apiVersion"], "kliocatalog.enterprisedb.io/v1alpha1");
        assert_eq!(o["kind"], "KlioBackup");
        assert_eq!(o["metadata"]["name"], "pg-one.backup-20251113093137");
        assert_eq!(o["metadata"]["namespace"], "ns");
        assert_eq!(o["metadata"]["labels"][CLUSTER_LABEL], "pg-one");
        assert_eq!(o["metadata"]["creationTimestamp"], "2025-11-13T09:31:39Z");
        assert_eq!(o["spec"]["backupID"], "backup-20251113093137");
        assert_eq!(o["spec"]["clusterName"], "pg-one");
        let s = &o["status"];
        // The seed's startLSN is the integer form: 0x7000028.
        assert_eq!(s["startLSN"], 117_440_552u64);
        assert_eq!(s["endLSN"], 0x7000120u64);
        assert_eq!(s["startLocation"], "0/7000028");
        assert_eq!(s["startWAL"], "000000010000000000000007");
        assert_eq!(s["startedAt"], "2025-11-13T09:31:37Z");
        assert_eq!(s["stoppedAt"], "2025-11-13T09:31:39Z");
        assert_eq!(s["timeline"], 1);
        assert_eq!(s["tiers"], json!([1, 2]));
        assert_eq!(s["logicalSize"], 52_428_800u64);
        assert_eq!(s["newStoredBytes"], 1_048_576u64);
        assert_eq!(s["newBytes"], 4_194_304u64);
        assert_eq!(s["checksumFailures"], 1);
        assert_eq!(s["systemIdentifier"], "7300000000000000001");
        assert_eq!(s["tablespaces"][0]["name"], "ts");
        assert_eq!(s["recoveryWindow"]["from"], "2025-11-13T09:31:39Z");
        assert_eq!(s["recoveryWindow"]["fromLocation"], "0/7000120");
        // The uid is stable and differs per backup.
        assert_eq!(
            o["metadata"]["uid"],
            backup_object(DEFAULT_GROUP, "ns", &entry())["metadata"]["uid"]
        );
        let mut other = entry();
        other.backup_id = "backup-20251113093138".into();
        assert_ne!(
            o["metadata"]["uid"],
            backup_object(DEFAULT_GROUP, "ns", &other)["metadata"]["uid"]
        );
    }

    #[test]
    fn unreadable_manifest_is_shown_with_its_error() {
        let mut e = entry();
        e.metadata = json!({"backup_id": e.backup_id, "error": "manifest is damaged"});
        e.in_tier2 = false;
        let o = backup_object(DEFAULT_GROUP, "ns", &e);
        assert_eq!(o["status"]["error"], "manifest is damaged");
        assert_eq!(o["status"]["tiers"], json!([1]));
        assert!(o["status"].get("startLSN").is_none());
    }

    #[test]
    fn table_rows_follow_the_seed() {
        let o = backup_object(DEFAULT_GROUP, "ns", &entry());
        let t = table(&[&o], "42", IncludeObject::Metadata);
        assert_eq!(t["kind"], "Table");
        assert_eq!(t["metadata"]["resourceVersion"], "42");
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["priority"] == 0)
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["Name", "Cluster Name", "Started At", "Stopped At"]);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "pg-one.backup-20251113093137");
        assert_eq!(cells[1], "pg-one");
        assert_eq!(cells[2], "2025-11-13 09:31:37 +0000 UTC");
        assert_eq!(cells[3], "2025-11-13 09:31:39 +0000 UTC");
        assert_eq!(cells[5], "1,2");
        assert_eq!(cells[6], "50.0 MiB");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(
            cells.as_array().unwrap().len(),
            t["columnDefinitions"].as_array().unwrap().len()
        );
    }

    #[test]
    fn lsn_and_times_parse_or_refuse() {
        assert_eq!(lsn_value("1/0"), Some(1 << 32));
        assert_eq!(lsn_value("0/7000028"), Some(0x7000028));
        assert_eq!(lsn_value("x/1"), None);
        assert_eq!(lsn_value("100000000/0"), None);
        assert_eq!(lsn_value("17"), None);
        assert_eq!(
            kube_time("2025-11-13T10:31:37+01:00").as_deref(),
            Some("2025-11-13T09:31:37Z")
        );
        assert_eq!(kube_time("yesterday"), None);
        assert_eq!(human_bytes(Some(512)), "512 B");
        assert_eq!(human_bytes(Some(1536)), "1.5 KiB");
    }

    #[test]
    fn label_selectors() {
        let labels: BTreeMap<String, String> =
            [(CLUSTER_LABEL.to_string(), "pg-one".to_string())].into();
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&labels);
        assert!(m(""));
        assert!(m("klio.enterprisedb.io/cluster=pg-one"));
        assert!(m("klio.enterprisedb.io/cluster==pg-one"));
        assert!(!m("klio.enterprisedb.io/cluster!=pg-one"));
        assert!(m("klio.enterprisedb.io/cluster in (pg-two, pg-one)"));
        assert!(!m("klio.enterprisedb.io/cluster notin (pg-one)"));
        assert!(m("klio.enterprisedb.io/cluster"));
        assert!(!m("!klio.enterprisedb.io/cluster"));
        assert!(m("other!=x"));
        assert!(!m("other=x"));
        assert!(!m("klio.enterprisedb.io/cluster=pg-one,other"));
        for bad in ["a in (b", "=x", "a=b c", "a in b", ",", "a b c"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn field_selectors() {
        let o = backup_object(DEFAULT_GROUP, "ns", &entry());
        let m = |s: &str| FieldSelector::parse(s).unwrap().matches(&o);
        assert!(m("spec.clusterName=pg-one"));
        assert!(!m("spec.clusterName=pg-two"));
        assert!(m("metadata.namespace==ns,spec.backupID!=x"));
        assert!(m("metadata.name=pg-one.backup-20251113093137"));
        assert_eq!(
            FieldSelector::parse("metadata.name=a")
                .unwrap()
                .pinned_name(),
            Some("a")
        );
        let e = FieldSelector::parse("status.timeline=1").unwrap_err();
        assert!(
            e.contains("field label not supported: status.timeline"),
            "{e}"
        );
        assert!(FieldSelector::parse("spec.clusterName").is_err());
    }
}
