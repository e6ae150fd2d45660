//! Where the project's files and the workspace's binaries are.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The repository root: P2PRIG_ROOT, else the workspace this binary was built from.
pub fn project_root() -> PathBuf {
    if let Some(root) = std::env::var_os("P2PRIG_ROOT") {
        return PathBuf::from(root);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A binary of this workspace (nvme-cmb, guest-agent), looked up next to the running
/// `p2prig` (cargo puts all of a profile's binaries in one directory).
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dirs = Vec::new();
    if let Some(dir) = exe.parent() {
        dirs.push(dir.to_path_buf());
        // Integration tests run from target/<profile>/deps.
        if let Some(up) = dir.parent() {
            dirs.push(up.to_path_buf());
        }
    }
    for dir in &dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "cannot find the `{name}` binary next to {}: build the workspace first (`cargo build --release --workspace`, or `make build`)",
        exe.display()
    )
}

/// target/p2prig under the project root: run directories and reports.
pub fn output_root() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
        .join("p2prig")
}
