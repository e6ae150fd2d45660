//! A user's own configuration for their tree (`run --kernel src:PATH`): `--config FRAGMENT`
//! files and `--configitem CONFIG_X=y` options, merged after p2prig's fragments. The kernel
//! recipe checks that every option of every fragment, these included, holds in the final
//! .config, so an option that an unmet dependency drops is an error, not a silent no-op.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};

/// One `--configitem`: `CONFIG_NAME=value` (`n` means "is not set").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigItem {
    pub name: String,
    pub value: String,
}

impl FromStr for ConfigItem {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let hint = "spell it CONFIG_NAME=y, =m, =n, a number or a \"string\"";
        let Some((name, value)) = text.split_once('=') else {
            bail!("`{text}` is not a config item: {hint}");
        };
        let symbol = name.strip_prefix("CONFIG_").unwrap_or("");
        if symbol.is_empty()
            || !symbol
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            bail!("`{name}` is not a Kconfig symbol: {hint}");
        }
        let quoted = value.len() >= 2
            && value.starts_with('"')
            && value.ends_with('"')
            && !value[1..value.len() - 1].contains(['"', '\n']);
        let plain = !value.is_empty()
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !(quoted || plain) {
            bail!("`{text}`: the value `{value}` cannot be written into a .config: {hint}");
        }
        Ok(Self {
            name: name.to_string(),
            value: value.to_string(),
        })
    }
}

impl fmt::Display for ConfigItem {
    /// The item as a fragment line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.value.as_str() {
            "n" => write!(f, "# {} is not set", self.name),
            value => write!(f, "{}={value}", self.name),
        }
    }
}

/// Everything a user adds to their tree's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserConfig {
    pub fragments: Vec<PathBuf>,
    pub items: Vec<ConfigItem>,
}

impl UserConfig {
    pub fn is_empty(&self) -> bool {
        self.fragments.is_empty() && self.items.is_empty()
    }

    /// The fragments to merge last: the user's files (checked to exist now, not halfway
    /// through a build), then the items written to `dir/user-items.config`.
    pub fn fragment_files(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for fragment in &self.fragments {
            let path = std::fs::canonicalize(fragment).with_context(|| {
                format!("--config {}: no such fragment file", fragment.display())
            })?;
            if !path.is_file() {
                bail!("--config {}: not a file", fragment.display());
            }
            files.push(path);
        }
        if !self.items.is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join("user-items.config");
            let text: String = self.items.iter().map(|i| format!("{i}\n")).collect();
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            files.push(path);
        }
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_kconfig_lines_and_junk_is_refused_with_the_spelling() -> Result<()> {
        assert_eq!(
            "CONFIG_KASAN=y".parse::<ConfigItem>()?.to_string(),
            "CONFIG_KASAN=y"
        );
        assert_eq!(
            "CONFIG_KASAN=n".parse::<ConfigItem>()?.to_string(),
            "# CONFIG_KASAN is not set"
        );
        assert_eq!(
            r#"CONFIG_CMDLINE="quiet loglevel=3""#.parse::<ConfigItem>()?.to_string(),
            r#"CONFIG_CMDLINE="quiet loglevel=3""#
        );
        assert_eq!("CONFIG_NR_CPUS=0x10".parse::<ConfigItem>()?.value, "0x10");
        for bad in [
            "KASAN=y",
            "CONFIG_=y",
            "CONFIG_KASAN",
            "CONFIG_KA SAN=y",
            "CONFIG_X=",
            "CONFIG_X=a b",
            "CONFIG_X=\"a\"b\"",
        ] {
            let err = bad.parse::<ConfigItem>().expect_err(bad).to_string();
            assert!(err.contains("CONFIG_NAME=y"), "{bad}: {err}");
        }
        Ok(())
    }

    #[test]
    fn fragments_come_first_then_the_items_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mine = dir.path().join("mine.config");
        std::fs::write(&mine, "CONFIG_FOO=y\n")?;
        let config = UserConfig {
            fragments: vec![mine.clone()],
            items: vec!["CONFIG_BAR=n".parse()?],
        };
        let files = config.fragment_files(&dir.path().join("work"))?;
        assert_eq!(files[0], std::fs::canonicalize(&mine)?);
        assert_eq!(
            std::fs::read_to_string(&files[1])?,
            "# CONFIG_BAR is not set\n"
        );
        let missing = UserConfig {
            fragments: vec![dir.path().join("nope.config")],
            items: Vec::new(),
        };
        let err = missing
            .fragment_files(dir.path())
            .expect_err("missing fragment");
        assert!(err.to_string().contains("no such fragment file"), "{err}");
        Ok(())
    }
}
