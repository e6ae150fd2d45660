//! `p2prig build image`: the guest initramfs, a gzip'd newc archive whose /init is the guest
//! agent, holding exactly the agent, rdma-core's libibverbs and rxe provider (at the paths
//! libibverbs has compiled in, see `p2prig build rdma-core`) and the shared libraries all of
//! them load. Deterministic: the same inputs give the same bytes (sorted entries, zero mtimes,
//! fixed inode numbers).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use flate2::{write::GzEncoder, Compression, GzBuilder};

use crate::build::cache::{self, Cache, KeyBuilder};

/// Bumped when the image's layout changes.
const IMAGE_RECIPE: &str = "initramfs-2";

#[derive(Debug, Clone)]
pub struct Image {
    pub initramfs: PathBuf,
}

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File { mode: u32, contents: Vec<u8> },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

pub fn build(cache: &Cache) -> Result<Image> {
    let agent = crate::rig::paths::workspace_binary("guest-agent")?;
    let rdma =
        crate::build::rdma_core::build(cache).context("building rdma-core for the initramfs")?;
    let rdma_root = rdma.rootfs();
    let rdma_files = rootfs_files(&rdma_root)?;
    // The agent opens libibverbs at run time, so ldd of the agent does not list it: the
    // libraries of rdma-core's files (libnl, ...) are collected from those files themselves.
    let mut libraries = shared_libraries(&agent, None)?;
    for (_, path) in &rdma_files {
        if is_elf(path)? {
            libraries.extend(
                shared_libraries(path, Some(&rdma_root))?
                    .into_iter()
                    .filter(|lib| !lib.starts_with(&rdma_root)),
            );
        }
    }
    libraries.sort();
    libraries.dedup();
    let mut key = KeyBuilder::default()
        .text("recipe", IMAGE_RECIPE)
        .file("agent", &agent)?;
    for (name, path) in &rdma_files {
        key = key.file(&format!("rdma-core/{name}"), path)?;
    }
    for lib in &libraries {
        key = key.file(&lib.display().to_string(), lib)?;
    }
    let key = key.finish();
    let out = cache.artifact("image", &key);
    let initramfs = out.join("initramfs.cpio.gz");
    if initramfs.is_file() {
        return Ok(Image { initramfs });
    }
    let mut entries = BTreeMap::new();
    entries.insert(
        "init".to_string(),
        Entry::File {
            mode: 0o755,
            contents: read(&agent)?,
        },
    );
    for lib in &libraries {
        let name = lib.to_string_lossy().trim_start_matches('/').to_string();
        entries.insert(
            name,
            Entry::File {
                mode: 0o755,
                contents: read(lib)?,
            },
        );
    }
    for (name, path) in &rdma_files {
        let mode = if is_elf(path)? { 0o755 } else { 0o644 };
        entries.insert(
            name.clone(),
            Entry::File {
                mode,
                contents: read(path)?,
            },
        );
    }
    for dir in ["dev", "proc", "sys", "tmp", "run", "root"] {
        entries.insert(dir.to_string(), Entry::Dir);
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    entries.insert(
        "dev/console".to_string(),
        Entry::CharDevice {
            mode: 0o600,
            major: 5,
            minor: 1,
        },
    );
    add_parent_dirs(&mut entries);

    let staging = out.with_extension("partial");
    std::fs::remove_dir_all(&staging).ok();
    crate::build::cache::make_dir(&staging)?;
    let bytes = gzip(&newc(&entries)?)?;
    std::fs::write(staging.join("initramfs.cpio.gz"), bytes)?;
    let manifest: String = entries.keys().map(|k| format!("/{k}\n")).collect();
    std::fs::write(staging.join("manifest.txt"), manifest)?;
    cache::publish(&staging, &out)?;
    Ok(Image { initramfs })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {} for the initramfs", path.display()))
}

/// Every regular file under `root` as (path relative to it, full path), sorted.
fn rootfs_files(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                out.push((rel.to_string_lossy().into_owned(), path.clone()));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(root, root, &mut files)?;
    files.sort();
    Ok(files)
}

fn is_elf(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(file.read(&mut magic)? == 4 && magic == *b"\x7fELF")
}

/// The shared libraries (and the ELF interpreter) `binary` loads, as `ldd` resolves them;
/// with `rdma_root`, its multiarch library directory is searched first (libibverbs.so.1).
fn shared_libraries(binary: &Path, rdma_root: Option<&Path>) -> Result<Vec<PathBuf>> {
    let mut command = Command::new("ldd");
    command.arg(binary);
    if let Some(root) = rdma_root {
        command.env("LD_LIBRARY_PATH", root.join("usr/lib/x86_64-linux-gnu"));
    }
    let output = command.output().with_context(|| {
        format!(
            "running ldd (package libc-bin) to find the libraries of {}",
            binary.display()
        )
    })?;
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stdout);
        if text.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_ldd(&String::from_utf8_lossy(&output.stdout))
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("linux-vdso") {
            continue;
        }
        if line.contains("=> not found") {
            bail!("the guest needs a library that is not installed here: {line} (make deps)");
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    libs.sort();
    libs.dedup();
    Ok(libs)
}

fn add_parent_dirs(entries: &mut BTreeMap<String, Entry>) {
    let names: Vec<String> = entries.keys().cloned().collect();
    for name in names {
        let mut path = Path::new(&name).parent();
        while let Some(dir) = path.filter(|d| !d.as_os_str().is_empty()) {
            entries
                .entry(dir.to_string_lossy().into_owned())
                .or_insert(Entry::Dir);
            path = dir.parent();
        }
    }
}

/// Serialises entries (already sorted by the map) as a newc ("070701") archive.
pub fn newc(entries: &BTreeMap<String, Entry>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for (ino, (name, entry)) in (1u32..).zip(entries) {
        let (mode, contents, rdev): (u32, &[u8], (u32, u32)) = match entry {
            Entry::Dir => (0o040755, &[], (0, 0)),
            Entry::File { mode, contents } => (0o100000 | mode, contents, (0, 0)),
            Entry::CharDevice { mode, major, minor } => (0o020000 | mode, &[], (*major, *minor)),
        };
        let size = u32::try_from(contents.len()).context("initramfs member over 4 GiB")?;
        write_header(&mut out, ino, mode, size, rdev, name.len() + 1);
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(&mut out);
        out.extend_from_slice(contents);
        pad4(&mut out);
    }
    write_header(&mut out, 0, 0, 0, (0, 0), "TRAILER!!!".len() + 1);
    out.extend_from_slice(b"TRAILER!!!\0");
    pad4(&mut out);
    Ok(out)
}

fn write_header(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    size: u32,
    rdev: (u32, u32),
    namesize: usize,
) {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        rdev.0,
        rdev.1,
        namesize as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    // mtime 0 and no file name: the header carries nothing that varies between builds.
    let mut encoder: GzEncoder<Vec<u8>> = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    encoder.write_all(data)?;
    Ok(encoder.finish()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BTreeMap<String, Entry> {
        let mut e = BTreeMap::new();
        e.insert(
            "init".into(),
            Entry::File {
                mode: 0o755,
                contents: b"#!agent".to_vec(),
            },
        );
        e.insert(
            "lib/x/libc.so.6".into(),
            Entry::File {
                mode: 0o755,
                contents: vec![1, 2, 3],
            },
        );
        e.insert(
            "dev/console".into(),
            Entry::CharDevice {
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        );
        add_parent_dirs(&mut e);
        e
    }

    #[test]
    fn same_entries_give_same_bytes() -> Result<()> {
        let a = gzip(&newc(&sample())?)?;
        let b = gzip(&newc(&sample())?)?;
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn newc_layout_is_aligned_and_terminated() -> Result<()> {
        let bytes = newc(&sample())?;
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let trailer = bytes.windows(10).position(|w| w == b"TRAILER!!!");
        assert!(trailer.is_some());
        // Parents were added: dev, lib, lib/x.
        let names: Vec<String> = sample().into_keys().collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/x",
                "lib/x/libc.so.6"
            ]
        );
        Ok(())
    }

    #[test]
    fn ldd_output_is_parsed_into_paths() -> Result<()> {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        let libs = parse_ldd(text)?;
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
        Ok(())
    }
}
