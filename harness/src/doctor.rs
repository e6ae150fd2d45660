//! `p2prig doctor`: every prerequisite of a run, its state on this host and the command that
//! fixes it. It builds and downloads nothing; a FAIL line is something a run would stop on.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build::cache::Cache;
use crate::build::{kernel, qemu};

/// How a prerequisite stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Ok,
    /// Works, but slower or with less coverage than it could (TCG, a fallback source).
    Warn,
    Fail,
}

/// One line of the doctor's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub what: &'static str,
    pub state: State,
    pub detail: String,
    /// The command (or step) that fixes it; empty when there is nothing to do.
    pub fix: String,
}

impl Finding {
    fn new(what: &'static str, state: State, detail: impl Into<String>, fix: &str) -> Self {
        Self {
            what,
            state,
            detail: detail.into(),
            fix: fix.to_string(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self.state {
            State::Ok => "ok  ",
            State::Warn => "warn",
            State::Fail => "FAIL",
        };
        write!(f, "{word} {:<16} {}", self.what, self.detail)?;
        if !self.fix.is_empty() {
            write!(f, "\n     {:<16} fix: {}", "", self.fix)?;
        }
        Ok(())
    }
}

/// Free space below which a cold cache (QEMU, two kernel trees, downloads) may not fit.
const CACHE_SPACE_NEEDED_GIB: u64 = 20;

pub fn examine(cache: &Cache) -> Vec<Finding> {
    let mut findings = vec![
        tool(
            "cargo",
            &["--version"],
            "install a Rust toolchain with rustup (stable)",
        ),
        tool("rustfmt", &["--version"], "rustup component add rustfmt"),
        tool(
            "cargo-clippy",
            &["--version"],
            "rustup component add clippy",
        ),
        tool(
            "make",
            &["--version"],
            "make deps (or apt-get install build-essential)",
        ),
        tool("gcc", &["--version"], "make deps"),
        tool("tshark", &["--version"], "make deps (installs tshark)"),
        browser(),
        qemu_state(cache),
        kvm_state(cache),
        cache_space(cache.root()),
    ];
    findings.extend(kernel_sources(cache));
    findings
}

fn tool(name: &'static str, args: &[&str], fix: &str) -> Finding {
    match Command::new(name).args(args).output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            Finding::new(
                name,
                State::Ok,
                text.lines().next().unwrap_or("").trim(),
                "",
            )
        }
        Ok(out) => Finding::new(
            name,
            State::Fail,
            format!("`{name}` exited with {}", out.status),
            fix,
        ),
        Err(_) => Finding::new(name, State::Fail, "not found on PATH", fix),
    }
}

/// The report-render test's browser: CHROME=, else Debian's chromium.
fn browser() -> Finding {
    let chosen = std::env::var("CHROME").ok().filter(|c| !c.is_empty());
    let name = chosen.clone().unwrap_or_else(|| "chromium".into());
    match Command::new(&name).arg("--version").output() {
        Ok(out) if out.status.success() => Finding::new(
            "browser",
            State::Ok,
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            "",
        ),
        _ => Finding::new(
            "browser",
            State::Warn,
            format!("`{name}` does not run (only the HTML report's render test needs it)"),
            if chosen.is_some() {
                "point CHROME= at a Chrome or Chromium binary"
            } else {
                "make deps (Debian's chromium), or CHROME=/path/to/chrome (Ubuntu: google-chrome)"
            },
        ),
    }
}

fn qemu_state(cache: &Cache) -> Finding {
    if let Some(path) = std::env::var_os("QEMU").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return match qemu::check_has_vfio_user(&path) {
            Ok(()) => Finding::new(
                "qemu",
                State::Ok,
                format!("QEMU={} has vfio-user-pci", path.display()),
                "",
            ),
            Err(e) => Finding::new(
                "qemu",
                State::Fail,
                format!("{e:#}"),
                "unset QEMU to let p2prig build 10.2.2",
            ),
        };
    }
    match qemu::cached_binary(cache) {
        Ok(Some(binary)) => Finding::new(
            "qemu",
            State::Ok,
            format!("built: {}", binary.display()),
            "",
        ),
        Ok(None) => Finding::new(
            "qemu",
            State::Warn,
            "not built yet (about 5 min on 2 cores)",
            "p2prig build qemu",
        ),
        Err(e) => Finding::new(
            "qemu",
            State::Fail,
            format!("{e:#}"),
            "check the checkout is complete",
        ),
    }
}

fn kvm_state(cache: &Cache) -> Finding {
    let fix_access = "give this user read-write access to /dev/kvm (CI: the action's udev step), or run with --accel tcg";
    if !Path::new("/dev/kvm").exists() {
        return Finding::new(
            "kvm",
            State::Warn,
            "no /dev/kvm: guests run under TCG (slower)",
            "enable virtualization (or nested virtualization) for this host",
        );
    }
    if !crate::rig::accel::kvm_device_usable() {
        return Finding::new(
            "kvm",
            State::Warn,
            "/dev/kvm exists but cannot be opened read-write",
            fix_access,
        );
    }
    match crate::rig::accel::probed(cache) {
        Some((true, detail)) => {
            Finding::new("kvm", State::Ok, format!("KVM guests run ({detail})"), "")
        }
        Some((false, detail)) => Finding::new(
            "kvm",
            State::Warn,
            format!("/dev/kvm opens but a KVM guest did not run ({detail}): runs use TCG"),
            "check nested virtualization; --accel tcg skips the probe",
        ),
        None => Finding::new(
            "kvm",
            State::Ok,
            "/dev/kvm opens; not probed on this boot yet (the first run probes it)",
            "",
        ),
    }
}

fn cache_space(root: &Path) -> Finding {
    match free_bytes(root) {
        Some(free) if free / (1 << 30) >= CACHE_SPACE_NEEDED_GIB => Finding::new(
            "cache space",
            State::Ok,
            format!("{} GiB free under {}", free >> 30, root.display()),
            "",
        ),
        Some(free) => Finding::new(
            "cache space",
            State::Fail,
            format!(
                "{} GiB free under {}; a cold cache needs about {CACHE_SPACE_NEEDED_GIB} GiB",
                free >> 30,
                root.display()
            ),
            "free space, or point P2PRIG_CACHE at a larger disk",
        ),
        None => Finding::new(
            "cache space",
            State::Warn,
            format!("cannot statvfs {}", root.display()),
            "",
        ),
    }
}

fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data, filled in by the call below.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` a valid out pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Each pinned kernel source: already downloaded, reachable through a Debian archive, or only
/// through its kernel.org fallback (vanilla source).
fn kernel_sources(cache: &Cache) -> Vec<Finding> {
    let archive = debian_archive(&apt_sources_text());
    let sources = match kernel::sources() {
        Ok(sources) => sources,
        Err(e) => {
            return vec![Finding::new(
                "kernel sources",
                State::Fail,
                format!("{e:#}"),
                "check kernel-patches/sources/",
            )]
        }
    };
    sources
        .into_iter()
        .map(|(name, source)| {
            let downloaded = cache.downloads().join(format!(
                "{}_{}.tar.xz",
                source.debian_package,
                source.debian_version.replace(':', "%3a")
            ));
            source_state(&name, &source, downloaded.is_file(), archive.as_deref())
        })
        .collect()
}

fn source_state(
    name: &str,
    source: &kernel::Source,
    downloaded: bool,
    archive: Option<&str>,
) -> Finding {
    let what = "kernel source";
    let pin = format!(
        "{name}: {}={}",
        source.debian_package, source.debian_version
    );
    if downloaded {
        return Finding::new(what, State::Ok, format!("{pin} (downloaded)"), "");
    }
    match (archive, &source.kernel_org_url) {
        (Some(uri), _) => Finding::new(what, State::Ok, format!("{pin} via apt from {uri}"), ""),
        (None, Some(url)) => Finding::new(
            what,
            State::Warn,
            format!("{pin}: no Debian archive in the apt sources; the fallback {url} (vanilla source) will be used"),
            "",
        ),
        (None, None) => Finding::new(
            what,
            State::Fail,
            format!("{pin}: no Debian archive in the apt sources and no kernel.org fallback pinned"),
            "KERNEL_TARBALL=/path/to/linux-<version>.tar.xz, or a Debian host",
        ),
    }
}

fn apt_sources_text() -> String {
    let mut text = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            if entry
                .path()
                .extension()
                .is_some_and(|e| e == "sources" || e == "list")
            {
                text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
                text.push('\n');
            }
        }
    }
    text
}

/// The first Debian archive URI (ending in /debian) in apt's sources, one-line or deb822 form:
/// what harness/recipes/apt-private.sh will use.
fn debian_archive(sources: &str) -> Option<String> {
    sources
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .flat_map(str::split_whitespace)
        .find(|word| {
            (word.starts_with("http://") || word.starts_with("https://"))
                && word.ends_with("/debian")
        })
        .map(str::to_string)
}

/// Prints the findings; the exit status says whether any would stop a run.
pub fn print(findings: &[Finding]) -> bool {
    for finding in findings {
        println!("{finding}");
    }
    let failed = findings.iter().filter(|f| f.state == State::Fail).count();
    if failed == 0 {
        println!("\nnothing blocks a run; `make vm-test` builds what is missing");
    } else {
        println!("\n{failed} prerequisite(s) missing: fix the FAIL lines above, then run `p2prig doctor` again");
    }
    failed == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_is_found_in_both_apt_formats_and_comments_are_skipped() {
        let one_line = "# deb http://old.example/debian bookworm main\ndeb http://deb.example/debian bookworm main\n";
        assert_eq!(
            debian_archive(one_line).as_deref(),
            Some("http://deb.example/debian")
        );
        let deb822 = "Types: deb\nURIs: https://mirror.example/debian\nSuites: bookworm\n";
        assert_eq!(
            debian_archive(deb822).as_deref(),
            Some("https://mirror.example/debian")
        );
        let ubuntu = "Types: deb\nURIs: http://archive.example/ubuntu/\nSuites: noble\n";
        assert_eq!(debian_archive(ubuntu), None);
    }

    fn source(fallback: Option<&str>) -> kernel::Source {
        kernel::Source {
            version: "6.1.192".into(),
            debian_package: "linux-source-6.1".into(),
            debian_version: "6.1.192-2".into(),
            deb_sha256: String::new(),
            tarball_in_deb: String::new(),
            tarball_sha256: String::new(),
            kernel_org_url: fallback.map(str::to_string),
            kernel_org_sha256: None,
        }
    }

    #[test]
    fn a_source_without_archive_or_fallback_fails_with_the_override() {
        let f = source_state("linux-6.1", &source(None), false, None);
        assert_eq!(f.state, State::Fail);
        assert!(f.fix.contains("KERNEL_TARBALL="), "{f}");
        let f = source_state(
            "linux-6.1",
            &source(Some("https://k.example/linux-6.1.192.tar.xz")),
            false,
            None,
        );
        assert_eq!(f.state, State::Warn);
        assert!(f.detail.contains("vanilla"), "{f}");
        assert_eq!(
            source_state("linux-6.1", &source(None), true, None).state,
            State::Ok
        );
        assert_eq!(
            source_state("linux-6.1", &source(None), false, Some("http://d/debian")).state,
            State::Ok
        );
    }

    #[test]
    fn a_finding_prints_its_fix_under_it() {
        let f = Finding::new("tshark", State::Fail, "not found on PATH", "make deps");
        assert_eq!(
            f.to_string(),
            "FAIL tshark           not found on PATH\n                      fix: make deps"
        );
    }

    #[test]
    fn a_missing_tool_is_a_failure_naming_the_fix() {
        let f = tool("p2prig-no-such-tool", &["--version"], "apt-get install it");
        assert_eq!(
            (f.state, f.detail.as_str(), f.fix.as_str()),
            (State::Fail, "not found on PATH", "apt-get install it")
        );
    }
}
