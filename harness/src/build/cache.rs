//! The build cache: every artifact lives under `$P2PRIG_CACHE` (default ~/.cache/p2prig) in a
//! directory named by a hash of all of its inputs, published atomically when complete.

use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Bumped when the way artifacts are laid out changes, so old entries are never reused.
const LAYOUT_VERSION: &str = "p2prig-cache-1";

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn from_env() -> Result<Self> {
        let root = match std::env::var_os("P2PRIG_CACHE") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => {
                let home = std::env::var_os("HOME")
                    .context("neither P2PRIG_CACHE nor HOME is set: set P2PRIG_CACHE to a directory for build artifacts")?;
                PathBuf::from(home).join(".cache/p2prig")
            }
        };
        fs::create_dir_all(&root)
            .with_context(|| format!("creating the cache directory {}", root.display()))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn downloads(&self) -> PathBuf {
        self.root.join("downloads")
    }

    pub fn apt_state(&self) -> PathBuf {
        self.root.join("apt")
    }

    /// Directory of a finished artifact of `kind` with this key.
    pub fn artifact(&self, kind: &str, key: &CacheKey) -> PathBuf {
        self.root.join(kind).join(key.short())
    }

    /// Takes an exclusive lock named `name` for as long as the returned guard lives, so two
    /// p2prig processes never build into the same work directory at once.
    pub fn lock(&self, name: &str) -> Result<LockGuard> {
        let dir = self.root.join("locks");
        make_dir(&dir)?;
        let path = dir.join(format!("{name}.lock"));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; it has no memory-safety preconditions.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            eprintln!("waiting for another p2prig holding {}", path.display());
            // SAFETY: as above, blocking variant.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                bail!(
                    "locking {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        Ok(LockGuard { _file: file })
    }
}

/// Holds a cache lock; released when dropped (the file is closed).
#[derive(Debug)]
pub struct LockGuard {
    _file: File,
}

/// A hash of every input of a build, fed piece by piece with labels so that moving bytes
/// from one input to another changes the key.
#[derive(Debug, Clone)]
pub struct CacheKey {
    hex: String,
}

impl CacheKey {
    pub fn short(&self) -> &str {
        &self.hex[..16]
    }
}

#[derive(Debug)]
pub struct KeyBuilder {
    hasher: Sha256,
}

impl Default for KeyBuilder {
    fn default() -> Self {
        let mut hasher = Sha256::new();
        hasher.update(LAYOUT_VERSION);
        Self { hasher }
    }
}

impl KeyBuilder {
    pub fn text(mut self, label: &str, value: &str) -> Self {
        self.feed(label, value.as_bytes());
        self
    }

    pub fn file(mut self, label: &str, path: &Path) -> Result<Self> {
        let bytes = fs::read(path)
            .with_context(|| format!("reading {} for the cache key", path.display()))?;
        self.feed(label, &bytes);
        Ok(self)
    }

    /// Every regular file under `dir`, in name order, relative names included.
    pub fn dir(mut self, label: &str, dir: &Path) -> Result<Self> {
        let mut files = Vec::new();
        collect_files(dir, dir, &mut files)?;
        files.sort();
        for rel in files {
            let bytes = fs::read(dir.join(&rel))?;
            self.feed(&format!("{label}/{}", rel.display()), &bytes);
        }
        Ok(self)
    }

    fn feed(&mut self, label: &str, bytes: &[u8]) {
        self.hasher.update((label.len() as u64).to_le_bytes());
        self.hasher.update(label);
        self.hasher.update((bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
    }

    pub fn finish(self) -> CacheKey {
        let digest = self.hasher.finalize();
        CacheKey {
            hex: digest.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_files(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_path_buf());
        }
    }
    Ok(())
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Moves a finished staging directory into place; a concurrent identical build that got
/// there first wins and ours is discarded.
/// `mkdir -p` inside the cache, with an error that names the directory and the way out.
pub fn make_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| {
        format!(
            "creating {}: p2prig's cache must be writable; point P2PRIG_CACHE at a directory \
             you can write",
            dir.display()
        )
    })
}

pub fn publish(staging: &Path, target: &Path) -> Result<()> {
    if let Some(parent) = target.parent() {
        make_dir(parent)?;
    }
    match fs::rename(staging, target) {
        Ok(()) => Ok(()),
        Err(_) if target.is_dir() => {
            fs::remove_dir_all(staging).ok();
            Ok(())
        }
        Err(e) => Err(e)
            .with_context(|| format!("publishing {} as {}", staging.display(), target.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_when_any_input_changes() {
        let a = KeyBuilder::default().text("x", "1").text("y", "2").finish();
        let b = KeyBuilder::default().text("x", "1").text("y", "3").finish();
        let c = KeyBuilder::default().text("x", "12").text("y", "").finish();
        assert_ne!(a.short(), b.short());
        assert_ne!(
            a.short(),
            c.short(),
            "moving bytes between inputs must change the key"
        );
        let again = KeyBuilder::default().text("x", "1").text("y", "2").finish();
        assert_eq!(a.short(), again.short());
    }

    #[test]
    fn dir_key_covers_names_and_contents() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        fs::write(tmp.path().join("a.patch"), "one")?;
        let k1 = KeyBuilder::default().dir("s", tmp.path())?.finish();
        fs::write(tmp.path().join("a.patch"), "two")?;
        let k2 = KeyBuilder::default().dir("s", tmp.path())?.finish();
        fs::rename(tmp.path().join("a.patch"), tmp.path().join("b.patch"))?;
        let k3 = KeyBuilder::default().dir("s", tmp.path())?.finish();
        assert_ne!(k1.short(), k2.short());
        assert_ne!(k2.short(), k3.short());
        Ok(())
    }

    #[test]
    fn an_unwritable_cache_names_the_directory_and_the_way_out() -> Result<()> {
        let tmp = tempfile::tempdir()?;
        let file = tmp.path().join("not-a-dir");
        std::fs::write(&file, "")?;
        let err = make_dir(&file.join("locks")).expect_err("a file is in the way");
        let text = format!("{err:#}");
        assert!(
            text.contains(&format!("creating {}", file.join("locks").display())),
            "{text}"
        );
        assert!(
            text.contains("point P2PRIG_CACHE at a directory you can write"),
            "{text}"
        );
        Ok(())
    }
}
