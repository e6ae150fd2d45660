//! `p2prig build qemu`: QEMU 10.2.2 with the vfio-user client, built from pinned source and
//! cached, or a user's QEMU given with QEMU=.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::build::cache::{self, Cache, CacheKey, KeyBuilder};
use crate::build::recipe::{recipes_dir, Recipe};

/// A QEMU binary known to have `vfio-user-pci`.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
}

pub fn build(cache: &Cache) -> Result<Qemu> {
    if let Some(path) = std::env::var_os("QEMU").filter(|p| !p.is_empty()) {
        let binary = PathBuf::from(path);
        check_has_vfio_user(&binary)?;
        return Ok(Qemu { binary });
    }
    let recipes = recipes_dir();
    let tarball = tarball();
    let out = cache.artifact("qemu", &cache_key()?);
    let binary = out.join("bin/qemu-system-x86_64");
    if binary.is_file() {
        return Ok(Qemu { binary });
    }
    let _lock = cache.lock("qemu")?;
    if binary.is_file() {
        return Ok(Qemu { binary });
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
    ];
    if let Some(t) = tarball {
        env.push(("QEMU_TARBALL".to_string(), t));
    }
    Recipe {
        what: "QEMU 10.2.2",
        script: recipes.join("qemu.sh"),
        args: vec![cache.root().join("qemu/work"), staging.clone()],
        env,
        log: cache.root().join("logs/qemu.log"),
    }
    .run()?;
    cache::publish(&staging, &out)?;
    check_has_vfio_user(&binary)?;
    Ok(Qemu { binary })
}

/// The cached build's binary, if QEMU has been built with today's inputs.
pub fn cached_binary(cache: &Cache) -> Result<Option<PathBuf>> {
    let binary = cache
        .artifact("qemu", &cache_key()?)
        .join("bin/qemu-system-x86_64");
    Ok(binary.is_file().then_some(binary))
}

/// QEMU_TARBALL: a user's QEMU source tarball instead of the pinned one.
fn tarball() -> Option<String> {
    std::env::var("QEMU_TARBALL").ok().filter(|s| !s.is_empty())
}

/// The cache key of the QEMU build (`p2prig build keys`), computed without building.
pub fn cache_key() -> Result<CacheKey> {
    let recipes = recipes_dir();
    let mut key = KeyBuilder::default()
        .file("recipe", &recipes.join("qemu.sh"))?
        .file("apt", &recipes.join("apt-private.sh"))?;
    if let Some(t) = tarball() {
        key = key.text("tarball", &cache::sha256_file(Path::new(&t))?);
    }
    Ok(key.finish())
}

pub fn check_has_vfio_user(binary: &Path) -> Result<()> {
    let output = Command::new(binary)
        .args(["-device", "help"])
        .output()
        .with_context(|| format!("running {} -device help", binary.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !text.contains("\"vfio-user-pci\"") {
        bail!(
            "{} has no vfio-user-pci device (QEMU 10.1 or newer built for Linux is needed); unset QEMU to let p2prig build one",
            binary.display()
        );
    }
    Ok(())
}
