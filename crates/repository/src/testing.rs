//! Checks shared by the tests of every [`ObjectStore`] implementation and of code built on
//! the repository (enabled by the `testing` feature; the helpers panic on failure).

#![allow(clippy::unwrap_used)]

use crate::{Error, FileEntry, FileKind, ObjectStore, Repository};

/// The contract every store keeps: create-only puts, empty objects, listing by prefix,
/// ranged reads (short and missing objects are errors), idempotent deletes. Runs on an
/// empty store.
pub fn exercise_store(s: &dyn ObjectStore) {
    s.put("packs/ab/abc", b"one").unwrap();
    s.put("packs/ab/abc", b"two").unwrap();
    assert_eq!(
        s.get("packs/ab/abc").unwrap().unwrap(),
        b"one",
        "create-only"
    );
    s.put("packs/ac/acd", b"three").unwrap();
    s.put("packs/b0/b01", b"four").unwrap();
    s.put("index/i1", b"").unwrap();
    assert_eq!(s.get("index/i1").unwrap().unwrap(), b"");
    assert_eq!(s.get("index/none").unwrap(), None);
    assert_eq!(
        s.list("packs/a").unwrap(),
        vec!["packs/ab/abc".to_string(), "packs/ac/acd".to_string()]
    );
    assert_eq!(s.list("packs/").unwrap().len(), 3);
    assert_eq!(s.list("").unwrap().len(), 4);
    assert!(s.list("nothing/").unwrap().is_empty());
    assert_eq!(s.get_range("packs/ac/acd", 1, 3).unwrap(), b"hre");
    assert_eq!(s.get_range("packs/ac/acd", 5, 0).unwrap(), b"");
    assert!(matches!(
        s.get_range("packs/ac/acd", 3, 3).unwrap_err(),
        Error::ShortObject { .. }
    ));
    assert!(matches!(
        s.get_range("packs/zz/none", 0, 1).unwrap_err(),
        Error::ObjectNotFound { .. }
    ));
    assert!(s.exists("packs/b0/b01").unwrap());
    s.delete("packs/b0/b01").unwrap();
    s.delete("packs/b0/b01").unwrap();
    assert!(!s.exists("packs/b0/b01").unwrap());
    assert_eq!(s.list("packs/b").unwrap(), Vec::<String>::new());
}

/// Reassembles a file of a backup from its manifest entry (empty for directories and links).
pub fn read_file(repo: &Repository, f: &FileEntry) -> Vec<u8> {
    match &f.kind {
        FileKind::Whole { block } => repo.read_block(block).unwrap(),
        FileKind::Listed { blocks, .. } => blocks
            .iter()
            .flat_map(|b| repo.read_block(b).unwrap())
            .collect(),
        FileKind::Blocks { blocklists, .. } => blocklists
            .iter()
            .flat_map(|l| repo.get_blocklist(l).unwrap())
            .flat_map(|b| repo.read_block(&b).unwrap())
            .collect(),
        _ => Vec::new(),
    }
}
