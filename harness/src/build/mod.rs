//! Building what a rig boots, cached by the hash of its inputs: QEMU, rdma-core, guest kernels, the initramfs, and checks of a user's own kernel.

pub mod byo;
pub mod cache;
pub mod image;
pub mod kernel;
pub mod qemu;
pub mod rdma_core;
pub mod recipe;
pub mod user_config;

/// The cache keys of the pinned builds, one `artifact key` line each, computed without building
/// anything: CI derives its cache key from them, so any input p2prig hashes (a recipe, a
/// patch, a config fragment, the cache layout) invalidates CI's cache too. The initramfs is
/// left out: it is rebuilt in seconds from the workspace's binaries.
pub fn cache_keys(kernels: &[kernel::FlavorSpec]) -> anyhow::Result<Vec<String>> {
    let mut lines = vec![
        format!("qemu {}", qemu::cache_key()?.short()),
        format!("rdma-core {}", rdma_core::cache_key()?.short()),
    ];
    for spec in kernels {
        lines.push(format!(
            "kernel {spec} {}",
            kernel::cache_key(spec)?.short()
        ));
    }
    Ok(lines)
}
