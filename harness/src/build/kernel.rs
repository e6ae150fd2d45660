//! Guest kernels: a flavor is a kernel source + an ordered list of patch series + config
//! fragments, declared in kernel-patches/flavors/<name>.toml; each builds in a `tiny` or
//! `debug` variant with kernel-patches/config/<variant>.config added. A user's own Linux
//! tree (`src:PATH`) builds with the same fragments, out of tree, without patches.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::build::cache::{self, Cache, CacheKey, KeyBuilder};
use crate::build::recipe::{recipes_dir, Recipe};
use crate::build::user_config::UserConfig;
use p2prig_protocol::agent::DmabufUapi;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Tiny,
    Debug,
}

impl Variant {
    pub const ALL: [Variant; 2] = [Variant::Tiny, Variant::Debug];

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

impl FromStr for Variant {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Variant::Tiny),
            "debug" => Ok(Variant::Debug),
            v => bail!("unknown kernel variant `{v}`: use tiny or debug"),
        }
    }
}

impl FromStr for FlavorSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (flavor, variant) = match s.split_once(':') {
            Some((f, v)) => (
                f,
                v.parse().map_err(|e| {
                    anyhow::anyhow!("`{s}`: {e} (FLAVOR, FLAVOR:tiny or FLAVOR:debug)")
                })?,
            ),
            None => (s, Variant::Tiny),
        };
        if flavor.is_empty()
            || !flavor
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("`{s}` is not a flavor name: use e.g. v1, v1-fixed or v1:debug");
        }
        // Checked here, when the argument is parsed, so that nothing is built or downloaded
        // before a misspelt flavor is reported.
        let known = flavor_names()?;
        if !known.iter().any(|k| k == flavor) {
            bail!(
                "no kernel flavor `{flavor}`; known: {} (kernel-patches/flavors/*.toml, `p2prig list`)",
                known.join(", ")
            );
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

/// A user's Linux tree, `src:PATH[:tiny|:debug]`: built out of tree with our fragments and
/// no patches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTree {
    /// Absolute: the build directory in the cache is keyed by it.
    pub path: PathBuf,
    pub variant: Variant,
    /// `--config` / `--configitem`, merged after p2prig's fragments.
    pub config: UserConfig,
}

impl FromStr for SourceTree {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let rest = s
            .strip_prefix("src:")
            .with_context(|| format!("`{s}` is not a source tree: spell it src:PATH[:debug]"))?;
        let (path, variant) = match rest.rsplit_once(':') {
            Some((path, "tiny")) => (path, Variant::Tiny),
            Some((path, "debug")) => (path, Variant::Debug),
            _ => (rest, Variant::Tiny),
        };
        if path.is_empty() {
            bail!("`{s}` names no directory: use src:/path/to/linux or src:/path/to/linux:debug");
        }
        let path = std::fs::canonicalize(path).with_context(|| {
            format!("{s}: no such directory (src:PATH names a Linux source tree)")
        })?;
        if !path.join("Makefile").is_file() || !path.join("Kconfig").is_file() {
            bail!(
                "{} is not a Linux source tree (no Makefile and Kconfig at its top)",
                path.display()
            );
        }
        Ok(Self {
            path,
            variant,
            config: UserConfig::default(),
        })
    }
}

impl fmt::Display for SourceTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "src:{}:{}", self.path.display(), self.variant.name())
    }
}

/// What `p2prig build kernel` takes: `all`, a flavor or a user's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildTarget {
    /// Every flavor in every variant.
    All,
    Flavor(FlavorSpec),
    Source(SourceTree),
}

impl FromStr for BuildTarget {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "all" {
            Ok(Self::All)
        } else if s.starts_with("src:") {
            Ok(Self::Source(s.parse()?))
        } else {
            Ok(Self::Flavor(s.parse()?))
        }
    }
}

/// Every flavor in every variant, in name order, tiny before debug.
pub fn all_specs() -> Result<Vec<FlavorSpec>> {
    Ok(flavor_names()?
        .into_iter()
        .flat_map(|flavor| {
            Variant::ALL.map(|variant| FlavorSpec {
                flavor: flavor.clone(),
                variant,
            })
        })
        .collect())
}

/// What `--kernel` names: a flavor to build, a user's tree (`src:PATH`) or a user's bzImage
/// (any other argument with a `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelChoice {
    Flavor(FlavorSpec),
    Source(SourceTree),
    Image(PathBuf),
}

impl FromStr for KernelChoice {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.starts_with("src:") {
            return Ok(Self::Source(s.parse()?));
        }
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
            Self::Source(tree) => tree.fmt(f),
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
            Self::Source(_) | Self::Image(_) => "byo",
        }
    }

    /// The same kernel's debug variant, if it has one it is not already: a flavor's or a
    /// source tree's (a user's bzImage is what it is).
    pub fn debug_variant(&self) -> Option<KernelChoice> {
        match self {
            Self::Flavor(spec) if spec.variant == Variant::Tiny => Some(Self::Flavor(FlavorSpec {
                flavor: spec.flavor.clone(),
                variant: Variant::Debug,
            })),
            Self::Source(tree) if tree.variant == Variant::Tiny => Some(Self::Source(SourceTree {
                variant: Variant::Debug,
                ..tree.clone()
            })),
            _ => None,
        }
    }

    /// A short name for run directories.
    pub fn dir_name(&self) -> String {
        match self {
            Self::Flavor(spec) => format!("{}-{}", spec.flavor, spec.variant.name()),
            Self::Source(tree) => format!("src-{}", tree.variant.name()),
            Self::Image(_) => "byo".to_string(),
        }
    }
}

/// Builds the flavor or the user's tree, or checks the user's image.
pub fn resolve(cache: &Cache, choice: &KernelChoice) -> Result<Kernel> {
    match choice {
        KernelChoice::Flavor(spec) => build(cache, spec),
        KernelChoice::Source(tree) => build_tree(cache, tree),
        KernelChoice::Image(path) => {
            let facts =
                crate::build::byo::check_image(path, &patches_root().join("config/base.config"))?;
            Ok(Kernel {
                bzimage: path.clone(),
                uapi: facts.uapi,
                debug: facts.debug,
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
    /// The scenarios this flavor is expected to fail and why (crate::run::expectations).
    #[serde(default)]
    pub expected_failure: Vec<crate::run::expectations::FailureEntry>,
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
    /// Built with the debug variant's checkers (KASAN, kmemleak, lockdep).
    pub debug: bool,
}

fn patches_root() -> PathBuf {
    crate::rig::paths::project_root().join("kernel-patches")
}

pub fn flavor_names() -> Result<Vec<String>> {
    toml_names(&patches_root().join("flavors"))
}

/// The names of the `*.toml` files in `dir`, sorted.
fn toml_names(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
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

/// Every pinned kernel source (kernel-patches/sources/*.toml), by name.
pub fn sources() -> Result<Vec<(String, Source)>> {
    toml_names(&patches_root().join("sources"))?
        .into_iter()
        .map(|name| Ok((name.clone(), load_source(&name)?)))
        .collect()
}

fn load_source(name: &str) -> Result<Source> {
    let path = patches_root().join("sources").join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading kernel source {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The variant's fragments, merged after the flavor's `fragments` (file names in
/// `config_dir`): `<variant>.config`, then each flavor fragment's companion
/// `<fragment stem>-<variant>.config` when that file exists (an era's options for one variant,
/// e.g. linux-6.1-debug.config next to linux-6.1.config).
fn variant_fragments(config_dir: &Path, fragments: &[String], variant: Variant) -> Vec<PathBuf> {
    let mut out = vec![config_dir.join(format!("{}.config", variant.name()))];
    for fragment in fragments {
        let stem = fragment.strip_suffix(".config").unwrap_or(fragment);
        let companion = config_dir.join(format!("{stem}-{}.config", variant.name()));
        if companion.is_file() {
            out.push(companion);
        }
    }
    out
}

/// Everything a flavor's kernel is built from, and the cache key over all of it.
struct Inputs {
    flavor: Flavor,
    source: Source,
    series: Vec<PathBuf>,
    fragments: Vec<PathBuf>,
    /// KERNEL_TARBALL: a user's tarball instead of the pinned source.
    tarball: Option<String>,
    key: CacheKey,
}

fn inputs(spec: &FlavorSpec) -> Result<Inputs> {
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
    fragments.extend(variant_fragments(
        &root.join("config"),
        &flavor.fragments,
        spec.variant,
    ));

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
    Ok(Inputs {
        flavor,
        source,
        series,
        fragments,
        tarball,
        key: key.finish(),
    })
}

/// The cache key of a flavor's kernel (`p2prig build keys`), computed without building.
pub fn cache_key(spec: &FlavorSpec) -> Result<CacheKey> {
    Ok(inputs(spec)?.key)
}

pub fn build(cache: &Cache, spec: &FlavorSpec) -> Result<Kernel> {
    let Inputs {
        flavor,
        source,
        series,
        fragments,
        tarball,
        key,
    } = inputs(spec)?;
    let recipes = recipes_dir();
    let out = cache.artifact("kernel", &key);
    let done = |out: &Path| Kernel {
        bzimage: out.join("bzImage"),
        uapi: flavor.uapi,
        debug: spec.variant == Variant::Debug,
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

/// The kernel era of a user's tree, told by the Kconfig symbols it defines: 6.1's fragments
/// while it still has DMABUF_MOVE_NOTIFY, 7.x's once it has the merged exporter, neither for
/// a tree in between (base.config and the variant only).
fn tree_era(tree: &Path) -> Option<&'static str> {
    let defines = |kconfig: &str, symbol: &str| {
        let wanted = format!("config {symbol}");
        std::fs::read_to_string(tree.join(kconfig))
            .is_ok_and(|text| text.lines().any(|line| line.trim() == wanted))
    };
    if defines("drivers/dma-buf/Kconfig", "DMABUF_MOVE_NOTIFY") {
        Some("linux-6.1")
    } else if defines("drivers/vfio/pci/Kconfig", "VFIO_PCI_DMABUF") {
        Some("linux-7.x")
    } else {
        None
    }
}

/// base.config, the era's fragment (if any), then the variant's fragments.
fn tree_fragments(config_dir: &Path, era: Option<&str>, variant: Variant) -> Vec<PathBuf> {
    let mut names = vec!["base.config".to_string()];
    names.extend(era.map(|era| format!("{era}.config")));
    let mut fragments: Vec<PathBuf> = names.iter().map(|n| config_dir.join(n)).collect();
    fragments.extend(variant_fragments(config_dir, &names, variant));
    fragments
}

/// The cache's work directory of a user's tree: one per (absolute path, variant), so a
/// tree's O= build stays incremental across runs and two trees never share one.
fn tree_work_name(tree: &SourceTree) -> String {
    let key = KeyBuilder::default()
        .text("tree", &tree.path.to_string_lossy())
        .finish();
    format!("src-{}-{}", key.short(), tree.variant.name())
}

/// Builds a user's tree out of tree (O= in the cache) with our fragments and no patches.
/// Always runs the recipe: the tree's content is not hashed, and make is incremental.
pub fn build_tree(cache: &Cache, tree: &SourceTree) -> Result<Kernel> {
    let recipes = recipes_dir();
    let config_dir = patches_root().join("config");
    let work_name = tree_work_name(tree);
    let work = cache.root().join("kernel").join(&work_name);
    let mut fragments = tree_fragments(&config_dir, tree_era(&tree.path), tree.variant);
    fragments.extend(tree.config.fragment_files(&work)?);
    let out = work.join("out");
    let _lock = cache.lock(&format!("kernel-{work_name}"))?;
    let fragment_list = fragments
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join("\n");
    Recipe {
        what: &format!("kernel {tree}"),
        script: recipes.join("kernel.sh"),
        args: vec![work.join("work"), out.clone()],
        env: vec![
            ("P2PRIG_RECIPES".into(), recipes.display().to_string()),
            ("KERNEL_SRC_TREE".into(), tree.path.display().to_string()),
            ("KFRAGMENTS".into(), fragment_list),
        ],
        log: cache.root().join(format!("logs/kernel-{work_name}.log")),
    }
    .run()
    .with_context(|| {
        format!(
            "building your tree {} (no patches applied)",
            tree.path.display()
        )
    })?;
    let config_path = out.join("config");
    let config = std::fs::read_to_string(&config_path)
        .with_context(|| format!("the recipe left no {}", config_path.display()))?;
    Ok(Kernel {
        bzimage: out.join("bzImage"),
        uapi: crate::build::byo::uapi_of(&crate::build::byo::parse_config(&config)),
        debug: tree.variant == Variant::Debug,
    })
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

    #[test]
    fn build_target_takes_all_flavors_and_trees() -> Result<()> {
        assert_eq!("all".parse::<BuildTarget>()?, BuildTarget::All);
        assert!(matches!(
            "upstream:debug".parse::<BuildTarget>()?,
            BuildTarget::Flavor(FlavorSpec { ref flavor, variant: Variant::Debug }) if flavor == "upstream"
        ));
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("Makefile"), "")?;
        std::fs::write(dir.path().join("Kconfig"), "")?;
        let spelled = format!("src:{}:debug", dir.path().display());
        let BuildTarget::Source(tree) = spelled.parse::<BuildTarget>()? else {
            bail!("not a source tree")
        };
        assert_eq!(tree.variant, Variant::Debug);
        assert_eq!(tree.path, std::fs::canonicalize(dir.path())?);
        let choice: KernelChoice = format!("src:{}", dir.path().display()).parse()?;
        assert!(matches!(&choice, KernelChoice::Source(t) if t.variant == Variant::Tiny));
        assert_eq!(choice.expectation_key(), "byo");
        assert!("src:/nonexistent/linux".parse::<SourceTree>().is_err());
        assert!("src:".parse::<SourceTree>().is_err());
        let not_linux = tempfile::tempdir()?;
        assert!(format!("src:{}", not_linux.path().display())
            .parse::<SourceTree>()
            .is_err());
        Ok(())
    }

    #[test]
    fn tree_work_dir_is_keyed_by_path_and_variant() {
        let tree = |path: &str, variant| SourceTree {
            path: PathBuf::from(path),
            variant,
            config: UserConfig::default(),
        };
        let a = tree_work_name(&tree("/src/linux", Variant::Tiny));
        assert_eq!(a, tree_work_name(&tree("/src/linux", Variant::Tiny)));
        assert_ne!(a, tree_work_name(&tree("/src/linux-2", Variant::Tiny)));
        assert_ne!(a, tree_work_name(&tree("/src/linux", Variant::Debug)));
        assert!(a.starts_with("src-") && a.ends_with("-tiny"));
    }

    #[test]
    fn era_fragments_follow_the_variant_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let config = dir.path();
        std::fs::write(config.join("linux-6.1-debug.config"), "")?;
        std::fs::write(config.join("linux-7.x-debug.config"), "")?;
        let names = |paths: Vec<PathBuf>| -> Vec<String> {
            paths
                .iter()
                .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
                .collect()
        };
        let flavor = ["base.config".to_string(), "linux-6.1.config".to_string()];
        assert_eq!(
            names(variant_fragments(config, &flavor, Variant::Debug)),
            ["debug.config", "linux-6.1-debug.config"]
        );
        assert_eq!(
            names(variant_fragments(config, &flavor, Variant::Tiny)),
            ["tiny.config"]
        );
        assert_eq!(
            names(tree_fragments(config, Some("linux-7.x"), Variant::Debug)),
            [
                "base.config",
                "linux-7.x.config",
                "debug.config",
                "linux-7.x-debug.config"
            ]
        );
        assert_eq!(
            names(tree_fragments(config, None, Variant::Tiny)),
            ["base.config", "tiny.config"]
        );
        Ok(())
    }

    #[test]
    fn tree_era_is_read_from_kconfig() -> Result<()> {
        let tree = tempfile::tempdir()?;
        assert_eq!(tree_era(tree.path()), None);
        std::fs::create_dir_all(tree.path().join("drivers/vfio/pci"))?;
        std::fs::write(
            tree.path().join("drivers/vfio/pci/Kconfig"),
            "config VFIO_PCI_DMABUF\n\tdef_bool y if VFIO_PCI_CORE\n",
        )?;
        assert_eq!(tree_era(tree.path()), Some("linux-7.x"));
        std::fs::create_dir_all(tree.path().join("drivers/dma-buf"))?;
        std::fs::write(
            tree.path().join("drivers/dma-buf/Kconfig"),
            "config DMABUF_MOVE_NOTIFY\n\tbool \"Move notify\"\n",
        )?;
        assert_eq!(tree_era(tree.path()), Some("linux-6.1"));
        Ok(())
    }

    #[test]
    fn every_flavor_names_a_source_series_and_fragments_that_exist() -> Result<()> {
        let root = patches_root();
        let names = flavor_names()?;
        assert!(names.iter().any(|n| n == "upstream"), "{names:?}");
        for name in names {
            let flavor = load_flavor(&name)?;
            load_source(&flavor.source)?;
            for series in &flavor.series {
                assert!(root.join(series).is_dir(), "{name}: series {series}");
            }
            for fragment in &flavor.fragments {
                assert!(
                    root.join("config").join(fragment).is_file(),
                    "{name}: fragment {fragment}"
                );
            }
        }
        assert_eq!(load_flavor("upstream")?.uapi, DmabufUapi::Upstream);
        Ok(())
    }
}
