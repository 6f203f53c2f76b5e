//! jemalloc as the allocator of the `klio` binary, with heap profiling compiled in but
//! inactive: [`activate`] turns sampling on (the server and sidecars do with `--pprof`),
//! [`pprof`] returns the live sampled allocations as a pprof heap profile (`go tool pprof`
//! reads it). One allocation is sampled per 512 KiB allocated on average
//! (`lg_prof_sample:19`), which costs little.

/// Read by jemalloc when it starts: profiling available, not active; at most 4 arenas
/// (jemalloc's default is 4 per core: memory spread over many arenas is memory held), and
/// freed pages returned to the system within a second by a background thread instead of
/// kept for ten, so the resident size follows what is in use.
// The symbol name is jemalloc's (with tikv-jemalloc-sys's `_rjem_` prefix); exporting it
// is the one unsafe attribute of the project.
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &[u8] = b"prof:true,prof_active:false,lg_prof_sample:19,narenas:4,background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// The allocator's type; the binary installs [`ALLOCATOR`] with `#[global_allocator]`.
pub type Allocator = tikv_jemallocator::Jemalloc;
pub const ALLOCATOR: Allocator = tikv_jemallocator::Jemalloc;

/// Starts sampling allocations (those made from now on appear in profiles).
pub async fn activate() -> anyhow::Result<()> {
    let ctl = jemalloc_pprof::PROF_CTL
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("jemalloc profiling is not available in this build"))?;
    ctl.lock()
        .await
        .activate()
        .map_err(|e| anyhow::anyhow!("activate jemalloc profiling: {e}"))
}

/// The live sampled allocations as a gzipped pprof heap profile.
pub async fn pprof() -> anyhow::Result<Vec<u8>> {
    let ctl = jemalloc_pprof::PROF_CTL
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("jemalloc profiling is not available in this build"))?;
    let mut ctl = ctl.lock().await;
    if !ctl.activated() {
        anyhow::bail!("heap profiling is not active: start the process with --pprof");
    }
    ctl.dump_pprof()
}
