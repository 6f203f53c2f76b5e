//! Writes the CRD YAML of Klio's resources to `deploy/charts/klio/crds/`.
//!
//! `cargo run -p klio-k8s-types --example crd-yaml [REPO_ROOT]`

use std::path::PathBuf;

use klio_k8s_types::crd_yaml::{CRD_DIR, crds, render};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."));
    let dir = root.join(CRD_DIR);
    std::fs::create_dir_all(&dir)?;
    for (file, crd) in crds() {
        let path = dir.join(file);
        std::fs::write(&path, render(&crd)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
