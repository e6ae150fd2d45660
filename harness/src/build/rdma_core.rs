//! `p2prig build rdma-core`: libibverbs and the rxe provider from Debian's rdma-core source
//! with the provider patches of guest-image/rdma-core/, cached by a hash of the recipe, the
//! patches and the source; or a user's tarball given with RDMA_CORE_TARBALL=.
//!
//! The artifact has `rootfs/` (files at their guest paths, copied into the initramfs) and
//! `include/` (headers for the guest agent's bindgen). `<cache>/rdma-core/latest` points at the
//! newest build so the agent's build script finds the headers without being told.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::build::cache::{self, Cache, CacheKey, KeyBuilder};
use crate::build::recipe::{recipes_dir, Recipe};

/// A finished rdma-core build.
#[derive(Debug, Clone)]
pub struct RdmaCore {
    /// The artifact directory (holds `rootfs/`, `include/`, `BUILD-INFO`).
    pub dir: PathBuf,
}

impl RdmaCore {
    /// Files to copy into the guest, at the same paths below `/`.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// The headers the agent's bindings are generated from.
    pub fn include(&self) -> PathBuf {
        self.dir.join("include")
    }
}

/// The folder of provider patches in the project.
pub fn patches_dir() -> PathBuf {
    crate::rig::paths::project_root().join("guest-image/rdma-core")
}

/// RDMA_CORE_TARBALL: a user's rdma-core source tarball instead of the pinned one.
fn tarball() -> Option<String> {
    std::env::var("RDMA_CORE_TARBALL")
        .ok()
        .filter(|s| !s.is_empty())
}

/// The cache key of the rdma-core build (`p2prig build keys`), computed without building.
pub fn cache_key() -> Result<CacheKey> {
    let recipes = recipes_dir();
    let mut key = KeyBuilder::default()
        .file("recipe", &recipes.join("rdma-core.sh"))?
        .file("apt", &recipes.join("apt-private.sh"))?
        .dir("patches", &patches_dir())?;
    if let Some(t) = tarball() {
        key = key.text("tarball", &cache::sha256_file(Path::new(&t))?);
    }
    Ok(key.finish())
}

pub fn build(cache: &Cache) -> Result<RdmaCore> {
    let recipes = recipes_dir();
    let patches = patches_dir();
    let tarball = tarball();
    let key = cache_key()?;
    let out = cache.artifact("rdma-core", &key);
    let built = RdmaCore { dir: out.clone() };
    if is_complete(&built) {
        point_latest(cache, &out)?;
        return Ok(built);
    }
    let _lock = cache.lock("rdma-core")?;
    if is_complete(&built) {
        point_latest(cache, &out)?;
        return Ok(built);
    }
    let staging = out.with_extension("partial");
    std::fs::remove_dir_all(&staging).ok();
    let mut env = vec![
        (
            "P2PRIG_DOWNLOADS".to_string(),
            cache.downloads().display().to_string(),
        ),
        (
            "P2PRIG_APT_STATE".to_string(),
            cache.apt_state().display().to_string(),
        ),
        ("P2PRIG_PATCHES".to_string(), patches.display().to_string()),
    ];
    if let Some(t) = tarball {
        env.push(("RDMA_CORE_TARBALL".to_string(), t));
    }
    Recipe {
        what: "rdma-core 56.1 (libibverbs + rxe)",
        script: recipes.join("rdma-core.sh"),
        args: vec![cache.root().join("rdma-core/work"), staging.clone()],
        env,
        log: cache.root().join("logs/rdma-core.log"),
    }
    .run()?;
    cache::publish(&staging, &out)?;
    point_latest(cache, &out)?;
    Ok(built)
}

fn is_complete(build: &RdmaCore) -> bool {
    build.dir.join("BUILD-INFO").is_file()
        && build.include().join("infiniband/verbs.h").is_file()
        && build.rootfs().is_dir()
}

/// Points `<cache>/rdma-core/latest` at `out` (atomically: a new link renamed over the old).
fn point_latest(cache: &Cache, out: &Path) -> Result<()> {
    let parent = cache.root().join("rdma-core");
    let link = parent.join("latest");
    let target = out
        .file_name()
        .context("rdma-core artifact directory has no name")?;
    if std::fs::read_link(&link).ok().as_deref() == Some(Path::new(target)) {
        return Ok(());
    }
    let temporary = parent.join(format!(".latest.{}", std::process::id()));
    std::fs::remove_file(&temporary).ok();
    std::os::unix::fs::symlink(target, &temporary)
        .with_context(|| format!("creating {}", temporary.display()))?;
    std::fs::rename(&temporary, &link)
        .with_context(|| format!("pointing {} at {}", link.display(), out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_folder_holds_format_patch_files() -> Result<()> {
        let mut patches: Vec<String> = std::fs::read_dir(patches_dir())?
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".patch"))
            .collect();
        patches.sort();
        assert!(!patches.is_empty(), "no provider patch");
        for name in patches {
            let text = std::fs::read_to_string(patches_dir().join(&name))?;
            assert!(
                text.starts_with("From "),
                "{name} is not git format-patch output"
            );
            assert!(text.contains("\nSubject: "), "{name} has no subject");
        }
        Ok(())
    }
}
