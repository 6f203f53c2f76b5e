//! Builds a server data directory whose repository holds `N` distinct (tiny) blocks, for
//! measuring what a server pays for a large repository (`bench/index.sh`).
//!
//! `cargo run --release -p klio-repository --example synthetic_repository -- DATA_DIR KEY_FILE N`
//!
//! The blocks are 8-byte counters in the legacy domain (the format every Klio version
//! reads), so the same directory can be opened by a server from before the on-disk index;
//! packs hold about as many blocks as packs of real pages do.

use std::path::PathBuf;
use std::sync::Arc;

use klio_crypto::{KeyEnvelope, Passphrase};
use klio_repository::{LocalStore, Repository, RepositoryOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [data_dir, key_file, n] = args.as_slice() else {
        return Err("usage: synthetic_repository DATA_DIR KEY_FILE N".into());
    };
    let data_dir = PathBuf::from(data_dir);
    let n: u64 = n.parse()?;
    std::fs::create_dir_all(&data_dir)?;
    let passphrase = Passphrase::from_file(&PathBuf::from(key_file))?;
    let master = KeyEnvelope::load_or_create(&data_dir.join("keys.json"), &passphrase)?;
    let root = data_dir.join("repository");
    let store = Arc::new(LocalStore::open(&root)?);
    let scratch = tempfile::tempdir()?;
    let repo = Repository::open_or_init(
        store,
        master,
        RepositoryOptions {
            index_cache: Some(scratch.path().join("index.redb")),
            // About 20,000 blocks per pack, as many as a 32 MiB pack of compressed 8 KiB
            // pages holds: the index objects have the size real ones have.
            pack_target_size: 1 << 20,
            ..RepositoryOptions::default()
        },
    )?;
    std::fs::copy(data_dir.join("keys.json"), root.join("keys.json"))?;
    let mut writer = repo.pack_writer();
    for i in 0..n {
        let data = i.to_be_bytes();
        let id = repo.block_id(&data);
        writer.add_block(&id, &data)?;
    }
    let stats = writer.finish()?;
    println!(
        "{} blocks in {} packs ({} bytes of packs, {} bytes of index objects)",
        stats.blocks_added, stats.packs_written, stats.pack_bytes, stats.index_bytes
    );
    Ok(())
}
