//! Property test of the manifest rules: manifests generated from hostile path pieces, kinds,
//! modes and sizes never make the rules panic, and every manifest they accept is one a
//! restore can write inside its directory: relative paths without `.`/`..`/empty components
//! or NUL, links only at `pg_tblspc/<oid>`, nothing under a file or a link other than a
//! tablespace link, modes within 0o777 once masked. (Fixed seed; `KLIO_PROPERTY_SEED` and
//! `KLIO_PROPERTY_SCALE` as in the other property tests.)

use klio_proto::backup::v1::{FileEntry, file_entry};
use klio_proto::manifest_rules::{check_manifest, permission_bits, tablespace_link_oid};

#[path = "../../pg/tests/support/property.rs"]
mod property;
use property::{Rng, scale};

const PIECES: &[&str] = &[
    "base",
    "1",
    "16384",
    "pg_tblspc",
    "16390",
    "0",
    "012",
    "pg_wal",
    "global",
    "..",
    ".",
    "",
    "a",
    "passwd",
    "PG_VERSION",
    "\u{0}",
    "é",
    "/",
    "//",
    "etc",
    "4294967296",
];

fn generated(rng: &mut Rng) -> Vec<FileEntry> {
    let n = 1 + rng.below(6);
    (0..n)
        .map(|_| {
            let depth = 1 + rng.below(4);
            let mut path = (0..depth)
                .map(|_| rng.pick(PIECES))
                .collect::<Vec<_>>()
                .join("/");
            if rng.below(10) == 0 {
                path.insert(0, '/');
            }
            let kind = match rng.below(4) {
                0 => file_entry::Kind::Directory as i32,
                1 => file_entry::Kind::Symlink as i32,
                2 => 7,
                _ => file_entry::Kind::File as i32,
            };
            FileEntry {
                path,
                kind,
                mode: rng.next() as u32,
                size: rng.below(1 << 22),
                block_size: [0u32, 8192, 1 << 20, 1 << 21][rng.below(4) as usize],
                target: rng.pick(&["/mnt/ts", "", "../x", "/"]).to_string(),
                block_ids: vec![0u8; 32 * rng.below(3) as usize].into(),
                ..Default::default()
            }
        })
        .collect()
}

#[test]
fn accepted_manifests_stay_inside_their_directory() {
    let mut rng = Rng::seeded(0x5EED_0A11);
    let rounds = scale(100_000);
    let mut accepted = 0;
    for _ in 0..rounds {
        let entries = generated(&mut rng);
        if check_manifest(&entries).is_err() {
            continue;
        }
        accepted += 1;
        for e in &entries {
            assert!(!e.path.is_empty() && !e.path.starts_with('/'), "{e:?}");
            assert!(!e.path.contains('\0'), "{e:?}");
            assert!(
                e.path
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != ".."),
                "{e:?}"
            );
            assert!(permission_bits(e.mode) <= 0o777);
            if e.kind == file_entry::Kind::Symlink as i32 {
                assert!(tablespace_link_oid(&e.path).is_some(), "a link at {e:?}");
            }
            // Nothing lies under a file, or under a link other than a tablespace link's
            // (whose contents go to the tablespace location).
            for other in &entries {
                if let Some(rest) = e.path.strip_prefix(&format!("{}/", other.path)) {
                    assert!(!rest.is_empty());
                    assert_ne!(
                        other.kind,
                        file_entry::Kind::File as i32,
                        "{e:?} under a file"
                    );
                    if other.kind == file_entry::Kind::Symlink as i32 {
                        assert!(tablespace_link_oid(&other.path).is_some(), "{e:?}");
                    }
                }
            }
        }
    }
    eprintln!("{accepted} of {rounds} generated manifests accepted");
    assert!(accepted > 0, "the generator also makes valid manifests");
}
