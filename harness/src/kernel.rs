//! Guest kernels: a flavor is a kernel source + an ordered list of patch series + config
//! fragments, declared in kernel-patches/flavors/<name>.toml; each builds in a `tiny` or
//! `debug` variant with kernel-patches/config/<variant>.config added.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::cache::{self, Cache, KeyBuilder};
use crate::recipe::{recipes_dir, Recipe};
use p2prig_protocol::agent::DmabufUapi;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Tiny,
    Debug,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Tiny => "tiny",
            Variant::Debug => "debug",
        }
    }
}

/// "v1" or "v1-fixed:debug".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlavorSpec {
    pub flavor: String,
    pub variant: Variant,
}

impl FromStr for FlavorSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (flavor, variant) = match s.split_once(':') {
            Some((f, "tiny")) => (f, Variant::Tiny),
            Some((f, "debug")) => (f, Variant::Debug),
            Some((_, v)) => bail!("unknown kernel variant `{v}` in `{s}`: use tiny or debug"),
            None => (s, Variant::Tiny),
        };
        if flavor.is_empty()
            || !flavor
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("`{s}` is not a flavor name: use e.g. v1, v1-fixed or v1:debug");
        }
        Ok(Self {
            flavor: flavor.to_string(),
            variant,
        })
    }
}

impl fmt::Display for FlavorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.flavor, self.variant.name())
    }
}

/// What `--kernel` names: a flavor to build, or a user's bzImage (any argument with a `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelChoice {
    Flavor(FlavorSpec),
    Image(PathBuf),
}

impl FromStr for KernelChoice {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.contains('/') {
            let path = PathBuf::from(s);
            if !path.is_file() {
                bail!("--kernel {s}: no such kernel image (a path is a bzImage; a name is a flavor such as v1)");
            }
            return Ok(Self::Image(path));
        }
        Ok(Self::Flavor(s.parse()?))
    }
}

impl fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flavor(spec) => spec.fmt(f),
            Self::Image(path) => write!(f, "byo:{}", path.display()),
        }
    }
}

impl KernelChoice {
    /// The name scenario expectations are keyed by: the flavor, or "byo" for a user's kernel
    /// (expected to keep every guarantee).
    pub fn expectation_key(&self) -> &str {
        match self {
            Self::Flavor(spec) => &spec.flavor,
            Self::Image(_) => "byo",
        }
    }

    /// A short name for run directories.
    pub fn dir_name(&self) -> String {
        match self {
            Self::Flavor(spec) => format!("{}-{}", spec.flavor, spec.variant.name()),
            Self::Image(_) => "byo".to_string(),
        }
    }
}

/// Builds the flavor, or checks the user's image.
pub fn resolve(cache: &Cache, choice: &KernelChoice) -> Result<Kernel> {
    match choice {
        KernelChoice::Flavor(spec) => build(cache, spec),
        KernelChoice::Image(path) => {
            let uapi = crate::byo::check_image(path, &patches_root().join("config/base.config"))?;
            Ok(Kernel {
                bzimage: path.clone(),
                uapi,
            })
        }
    }
}

/// kernel-patches/flavors/<name>.toml
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flavor {
    pub description: String,
    pub uapi: DmabufUapi,
    pub source: String,
    #[serde(default)]
    pub series: Vec<String>,
    #[serde(default)]
    pub fragments: Vec<String>,
}

/// kernel-patches/sources/<name>.toml
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub version: String,
    pub debian_package: String,
    pub debian_version: String,
    pub deb_sha256: String,
    pub tarball_in_deb: String,
    pub tarball_sha256: String,
    #[serde(default)]
    pub kernel_org_url: Option<String>,
    #[serde(default)]
    pub kernel_org_sha256: Option<String>,
}

/// A built kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub bzimage: PathBuf,
    pub uapi: DmabufUapi,
}

fn patches_root() -> PathBuf {
    crate::paths::project_root().join("kernel-patches")
}

pub fn flavor_names() -> Result<Vec<String>> {
    let dir = patches_root().join("flavors");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".toml")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    Ok(names)
}

pub fn load_flavor(name: &str) -> Result<Flavor> {
    let path = patches_root().join("flavors").join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no kernel flavor `{name}` ({} unreadable); known flavors: {}",
            path.display(),
            flavor_names().unwrap_or_default().join(", ")
        )
    })?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn load_source(name: &str) -> Result<Source> {
    let path = patches_root().join("sources").join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading kernel source {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

pub fn build(cache: &Cache, spec: &FlavorSpec) -> Result<Kernel> {
    let flavor = load_flavor(&spec.flavor)?;
    let source = load_source(&flavor.source)?;
    let root = patches_root();
    let recipes = recipes_dir();

    let series: Vec<PathBuf> = flavor.series.iter().map(|s| root.join(s)).collect();
    let mut fragments: Vec<PathBuf> = flavor
        .fragments
        .iter()
        .map(|f| root.join("config").join(f))
        .collect();
    fragments.push(
        root.join("config")
            .join(format!("{}.config", spec.variant.name())),
    );

    let mut key = KeyBuilder::default()
        .file("recipe", &recipes.join("kernel.sh"))?
        .file("apt", &recipes.join("apt-private.sh"))?
        .file(
            "source",
            &root.join("sources").join(format!("{}.toml", flavor.source)),
        )?
        .text("variant", spec.variant.name());
    for dir in &series {
        if !dir.is_dir() {
            bail!(
                "flavor {} names series {} which does not exist",
                spec.flavor,
                dir.display()
            );
        }
        key = key.dir("series", dir)?;
    }
    for fragment in &fragments {
        key = key.file("fragment", fragment)?;
    }
    let tarball = std::env::var("KERNEL_TARBALL")
        .ok()
        .filter(|s| !s.is_empty());
    if let Some(t) = &tarball {
        key = key.text("tarball", &cache::sha256_file(Path::new(t))?);
    }
    let key = key.finish();

    let out = cache.artifact("kernel", &key);
    let done = |out: &Path| Kernel {
        bzimage: out.join("bzImage"),
        uapi: flavor.uapi,
    };
    if out.join("bzImage").is_file() {
        return Ok(done(&out));
    }
    // One work tree per (source, variant): switching flavors re-applies patches and rebuilds
    // incrementally instead of from scratch.
    let work_name = format!("{}-{}", flavor.source, spec.variant.name());
    let _lock = cache.lock(&format!("kernel-{work_name}"))?;
    if out.join("bzImage").is_file() {
        return Ok(done(&out));
    }
    let staging = out.with_extension("partial");
    std::fs::remove_dir_all(&staging).ok();
    let join = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut env = vec![
        ("P2PRIG_DOWNLOADS", cache.downloads().display().to_string()),
        ("P2PRIG_APT_STATE", cache.apt_state().display().to_string()),
        ("P2PRIG_RECIPES", recipes.display().to_string()),
        ("KSRC_VERSION", source.version.clone()),
        ("KSRC_DEB_PACKAGE", source.debian_package.clone()),
        ("KSRC_DEB_VERSION", source.debian_version.clone()),
        ("KSRC_DEB_SHA256", source.deb_sha256.clone()),
        ("KSRC_TARBALL_IN_DEB", source.tarball_in_deb.clone()),
        ("KSRC_TARBALL_SHA256", source.tarball_sha256.clone()),
        (
            "KSRC_ORG_URL",
            source.kernel_org_url.clone().unwrap_or_default(),
        ),
        (
            "KSRC_ORG_SHA256",
            source.kernel_org_sha256.clone().unwrap_or_default(),
        ),
        ("KSERIES", join(&series)),
        ("KFRAGMENTS", join(&fragments)),
    ];
    if let Some(t) = tarball {
        env.push(("KERNEL_TARBALL", t));
    }
    Recipe {
        what: &format!("kernel {spec}"),
        script: recipes.join("kernel.sh"),
        args: vec![
            cache
                .root()
                .join("kernel")
                .join(format!("work-{work_name}")),
            staging.clone(),
        ],
        env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        log: cache.root().join(format!(
            "logs/kernel-{}-{}.log",
            spec.flavor,
            spec.variant.name()
        )),
    }
    .run()?;
    if !staging.join("bzImage").is_file() {
        bail!(
            "the kernel recipe finished without producing {}/bzImage",
            staging.display()
        );
    }
    cache::publish(&staging, &out)?;
    Ok(done(&out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavor_spec_defaults_to_tiny_and_rejects_junk() -> Result<()> {
        assert_eq!("v1".parse::<FlavorSpec>()?.variant, Variant::Tiny);
        let debug: FlavorSpec = "v1-fixed:debug".parse()?;
        assert_eq!(
            (debug.flavor.as_str(), debug.variant),
            ("v1-fixed", Variant::Debug)
        );
        assert!("v1:huge".parse::<FlavorSpec>().is_err());
        assert!("../etc".parse::<FlavorSpec>().is_err());
        assert!("".parse::<FlavorSpec>().is_err());
        Ok(())
    }

    #[test]
    fn flavor_file_with_unknown_field_is_rejected() {
        let text = "description = \"x\"\nuapi = \"seed_v1\"\nsource = \"linux-6.1\"\nseries = []\nbogus = 1\n";
        assert!(toml::from_str::<Flavor>(text).is_err());
        let ok = "description = \"x\"\nuapi = \"upstream\"\nsource = \"linux-7.3\"\n";
        assert!(toml::from_str::<Flavor>(ok).is_ok());
    }
}
