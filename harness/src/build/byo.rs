//! Bring-your-own kernel: `--kernel path/to/bzImage`. Its embedded config (CONFIG_IKCONFIG)
//! is read and every option the rig needs is checked before anything boots.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use flate2::read::GzDecoder;

use p2prig_protocol::agent::DmabufUapi;

/// Options of base.config that are our build's preferences, not needs of the rig: a user's
/// kernel may choose otherwise (another compressor, unwinder, allocator, no paravirt).
const PREFERENCES: &[&str] = &[
    "CONFIG_KERNEL_GZIP",
    "CONFIG_KERNEL_XZ",
    "CONFIG_SLUB",
    "CONFIG_SLOB",
    "CONFIG_UNWINDER_ORC",
    "CONFIG_UNWINDER_GUESS",
    "CONFIG_HYPERVISOR_GUEST",
    "CONFIG_PARAVIRT",
    "CONFIG_KVM_GUEST",
    "CONFIG_PRINTK_TIME",
    "CONFIG_EARLY_PRINTK",
    "CONFIG_MAGIC_SYSRQ",
    "CONFIG_MODULES",
    "CONFIG_INTEL_IOMMU",
    "CONFIG_INTEL_IOMMU_DEFAULT_OFF",
    "CONFIG_INTEL_IOMMU_DEFAULT_ON",
    "CONFIG_IRQ_REMAP",
    "CONFIG_VSOCKETS",
    "CONFIG_VIRTIO_VSOCKETS",
    "CONFIG_UDMABUF",
    "CONFIG_ADVISE_SYSCALLS",
    "CONFIG_PANIC_ON_OOPS",
];

/// What a user's kernel image says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageFacts {
    pub uapi: DmabufUapi,
    /// KASAN and kmemleak are built in: scenarios may expect the debug variant's reports.
    pub debug: bool,
}

/// The export uAPI a kernel config speaks: upstream's merged exporter, or the seed's.
pub fn uapi_of(config: &BTreeMap<String, String>) -> DmabufUapi {
    if is_y(config, "CONFIG_VFIO_PCI_DMABUF") {
        DmabufUapi::Upstream
    } else {
        DmabufUapi::SeedV1
    }
}

fn is_y(config: &BTreeMap<String, String>, name: &str) -> bool {
    config.get(name).map(String::as_str) == Some("y")
}

/// Checks a user's bzImage against base.config (what every era of kernel the rig supports
/// needs) and tells which export uAPI it speaks and whether it is a debug build.
pub fn check_image(path: &Path, base_fragment: &Path) -> Result<ImageFacts> {
    let image = std::fs::read(path)
        .with_context(|| format!("reading the kernel image {}", path.display()))?;
    let config_text = embedded_config(&image).with_context(|| {
        format!(
            "{} has no readable embedded config: build it with CONFIG_IKCONFIG=y (gzip-compressed bzImage) so p2prig can check it",
            path.display()
        )
    })?;
    let config = parse_config(&config_text);
    let fragment = std::fs::read_to_string(base_fragment)
        .with_context(|| format!("reading {}", base_fragment.display()))?;
    let missing = missing_options(&config, &fragment);
    if !missing.is_empty() {
        bail!(
            "{} lacks options the rig needs (from {}): {}; enable them (=y, built in) and rebuild",
            path.display(),
            base_fragment.display(),
            missing.join(", ")
        );
    }
    Ok(ImageFacts {
        uapi: uapi_of(&config),
        debug: is_y(&config, "CONFIG_KASAN") && is_y(&config, "CONFIG_DEBUG_KMEMLEAK"),
    })
}

/// Options set to `y` in the fragment (minus preferences) that the config does not have as `y`.
fn missing_options(config: &BTreeMap<String, String>, fragment: &str) -> Vec<String> {
    fragment
        .lines()
        .filter_map(|l| l.trim().strip_suffix("=y"))
        .filter(|name| !PREFERENCES.contains(name))
        .filter(|name| !is_y(config, name))
        .map(str::to_string)
        .collect()
}

pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

/// The .config inside a kernel image: `scripts/extract-ikconfig`'s search, for gzip. The
/// config is a gzip stream between the markers IKCFG_ST and IKCFG_ED inside the (itself
/// gzip-compressed) kernel.
fn embedded_config(image: &[u8]) -> Option<String> {
    if let Some(text) = config_after_marker(image) {
        return Some(text);
    }
    const GZIP_MAGIC: [u8; 3] = [0x1f, 0x8b, 0x08];
    image
        .windows(3)
        .enumerate()
        .filter(|(_, w)| *w == GZIP_MAGIC)
        .take(64)
        .find_map(|(offset, _)| {
            let mut kernel = Vec::new();
            // A bounded read: a false magic decodes garbage or fails quickly.
            let decoder = GzDecoder::new(&image[offset..]);
            decoder.take(512 << 20).read_to_end(&mut kernel).ok();
            config_after_marker(&kernel)
        })
}

fn config_after_marker(bytes: &[u8]) -> Option<String> {
    let start = find(bytes, b"IKCFG_ST")? + b"IKCFG_ST".len();
    let mut text = String::new();
    GzDecoder::new(&bytes[start..])
        .read_to_string(&mut text)
        .ok()?;
    text.contains("CONFIG_").then_some(text)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        let _ = e.write_all(data);
        e.finish().unwrap_or_default()
    }

    /// A fake bzImage: setup bytes, then a gzip'd "kernel" holding the IKCFG block.
    fn fake_image(config: &str) -> Vec<u8> {
        let mut kernel = b"\x7fELF....".to_vec();
        kernel.extend_from_slice(b"IKCFG_ST");
        kernel.extend_from_slice(&gz(config.as_bytes()));
        kernel.extend_from_slice(b"IKCFG_ED");
        let mut image = vec![0u8; 512];
        image.extend_from_slice(&gz(&kernel));
        image
    }

    const FRAGMENT: &str = "CONFIG_KERNEL_GZIP=y\nCONFIG_VFIO_PCI=y\nCONFIG_PCI_P2PDMA=y\nCONFIG_RDMA_RXE=y\n# CONFIG_MODULES is not set\n";

    #[test]
    fn embedded_config_is_found_inside_the_compressed_kernel() {
        let image = fake_image("CONFIG_VFIO_PCI=y\nCONFIG_RDMA_RXE=y\n");
        let text = embedded_config(&image).expect("config found");
        assert!(text.contains("CONFIG_RDMA_RXE=y"));
        assert!(embedded_config(&[0u8; 4096]).is_none());
    }

    #[test]
    fn missing_options_are_named_and_preferences_ignored() {
        let config = parse_config("CONFIG_VFIO_PCI=y\nCONFIG_RDMA_RXE=m\n");
        let missing = missing_options(&config, FRAGMENT);
        assert_eq!(missing, ["CONFIG_PCI_P2PDMA", "CONFIG_RDMA_RXE"]);
    }

    #[test]
    fn upstream_kernels_are_recognised_and_debug_builds_told_apart() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let image = dir.path().join("bzImage");
        let fragment = dir.path().join("base.config");
        std::fs::write(&fragment, FRAGMENT)?;
        let upstream =
            "CONFIG_VFIO_PCI=y\nCONFIG_PCI_P2PDMA=y\nCONFIG_RDMA_RXE=y\nCONFIG_VFIO_PCI_DMABUF=y\n";
        std::fs::write(&image, fake_image(upstream))?;
        let facts = check_image(&image, &fragment)?;
        assert_eq!(
            facts,
            ImageFacts {
                uapi: DmabufUapi::Upstream,
                debug: false
            }
        );
        let debug = format!("{upstream}CONFIG_KASAN=y\nCONFIG_DEBUG_KMEMLEAK=y\n");
        std::fs::write(&image, fake_image(&debug))?;
        assert!(check_image(&image, &fragment)?.debug);
        std::fs::write(
            &image,
            fake_image("CONFIG_VFIO_PCI=y\nCONFIG_PCI_P2PDMA=y\n"),
        )?;
        let err = check_image(&image, &fragment)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("CONFIG_RDMA_RXE"), "{err}");
        std::fs::write(&image, b"not a kernel")?;
        let err = check_image(&image, &fragment)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("CONFIG_IKCONFIG"), "{err}");
        Ok(())
    }
}
