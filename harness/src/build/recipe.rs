//! Runs a build recipe (a shell script in harness/recipes/) with its output in a log file,
//! turning the log into a progress line so long builds show they are alive.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, IsTerminal, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::rig::process::{ChildGuard, Group};

/// Where the recipe scripts are: next to the sources of this crate, or P2PRIG_RECIPES.
pub fn recipes_dir() -> PathBuf {
    std::env::var_os("P2PRIG_RECIPES")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::rig::paths::project_root().join("harness/recipes"))
}

#[derive(Debug)]
pub struct Recipe<'a> {
    pub what: &'a str,
    pub script: PathBuf,
    pub args: Vec<PathBuf>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

impl Recipe<'_> {
    pub fn run(&self) -> Result<()> {
        if let Some(dir) = self.log.parent() {
            crate::build::cache::make_dir(dir)?;
        }
        let log =
            File::create(&self.log).with_context(|| format!("creating {}", self.log.display()))?;
        let mut cmd = Command::new("bash");
        cmd.arg(&self.script)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        eprintln!("building {} (log: {})", self.what, self.log.display());
        let started = Instant::now();
        let mut child = ChildGuard::spawn(self.what, cmd, Group::Own)?;
        let mut progress = Progress::new(self.what, &self.log)?;
        let status = loop {
            if let Some(status) = child.try_status() {
                break status;
            }
            if let Err(e) = crate::rig::process::check_interrupted() {
                child.terminate(Duration::from_secs(2));
                return Err(e);
            }
            progress.tick(started.elapsed())?;
            std::thread::sleep(Duration::from_millis(250));
        };
        progress.tick(started.elapsed())?;
        progress.finish();
        if !status.success() {
            let tail = tail_lines(&self.log, 25);
            if let Some(gone) = pin_gone(&tail) {
                bail!(
                    "building {} failed: {gone}\n(last lines of {}:\n{tail})",
                    self.what,
                    self.log.display()
                );
            }
            bail!(
                "building {} failed ({status}) after {:.0} s; last lines of {}:\n{tail}\nfix the cause above and run the build again (finished steps are cached)",
                self.what,
                started.elapsed().as_secs_f64(),
                self.log.display()
            );
        }
        eprintln!(
            "built {} in {:.0} s",
            self.what,
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// Follows the log: prints recipe phase lines ("==> ...") and a counter of ninja's
/// "[n/m]" or make's compile lines, in place on a terminal and every 30 s otherwise.
struct Progress {
    what: String,
    reader: BufReader<File>,
    tty: bool,
    phase: String,
    steps: String,
    last_print: Instant,
    compiled: u64,
}

impl Progress {
    fn new(what: &str, log: &Path) -> Result<Self> {
        let mut file = File::open(log)?;
        file.seek(SeekFrom::Start(0))?;
        Ok(Self {
            what: what.to_string(),
            reader: BufReader::new(file),
            tty: std::io::stderr().is_terminal(),
            phase: String::new(),
            steps: String::new(),
            last_print: Instant::now(),
            compiled: 0,
        })
    }

    fn tick(&mut self, elapsed: Duration) -> Result<()> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                // A partial line is re-read next time from where the reader stopped.
                if n > 0 {
                    self.reader.seek_relative(-(n as i64))?;
                }
                break;
            }
            let text = line.trim_end();
            if let Some(phase) = text.strip_prefix("==> ") {
                self.phase = phase.to_string();
                self.clear_line();
                eprintln!("  {}: {}", self.what, self.phase);
            } else if let Some(counter) = ninja_counter(text) {
                self.steps = counter;
            } else if is_make_compile_line(text) {
                self.compiled += 1;
                self.steps = format!("{} files compiled", self.compiled);
            }
        }
        let due = if self.tty {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(30)
        };
        if self.last_print.elapsed() >= due && !self.steps.is_empty() {
            self.last_print = Instant::now();
            let msg = format!(
                "  {}: {} [{:.0} s]",
                self.what,
                self.steps,
                elapsed.as_secs_f64()
            );
            if self.tty {
                eprint!("\r\x1b[2K{msg}");
                std::io::stderr().flush().ok();
            } else {
                eprintln!("{msg}");
            }
        }
        Ok(())
    }

    fn clear_line(&self) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }

    fn finish(&self) {
        self.clear_line();
    }
}

/// "[123/1691] Compiling ..." -> "123/1691 steps".
fn ninja_counter(line: &str) -> Option<String> {
    let rest = line.strip_prefix('[')?;
    let (counter, _) = rest.split_once(']')?;
    let (done, total) = counter.split_once('/')?;
    if done.chars().all(|c| c.is_ascii_digit()) && total.chars().all(|c| c.is_ascii_digit()) {
        Some(format!("{done}/{total} steps"))
    } else {
        None
    }
}

/// Kbuild's "  CC      path/file.o" lines.
fn is_make_compile_line(line: &str) -> bool {
    let trimmed = line.trim_start();
    line.starts_with("  ") && (trimmed.starts_with("CC ") || trimmed.starts_with("AS "))
}

/// The last `n` lines of a file, for error messages.
/// apt's answer when a pinned package version has left the archive (Debian's security archive
/// keeps the newest few): what happened and how to go on. `apt-get download` says
/// "E: Version 'V' for 'P' was not found", `apt-get source` "E: Can not find version 'V' of
/// package 'P'" (both measured here).
fn pin_gone(log: &str) -> Option<String> {
    let (package, version) = log.lines().find_map(|line| {
        if let Some(rest) = line.strip_prefix("E: Version '") {
            let (version, rest) = rest.split_once("' for '")?;
            Some((rest.strip_suffix("' was not found")?, version))
        } else {
            let rest = line.strip_prefix("E: Can not find version '")?;
            let (version, rest) = rest.split_once("' of package '")?;
            Some((rest.strip_suffix('\'')?, version))
        }
    })?;
    Some(format!(
        "the pinned source package {package}={version} is no longer in the Debian archive \
         this host's apt reaches. Pin a version it still offers (`apt-cache madison {package}` \
         lists them) where this one is pinned (kernel-patches/sources/*.toml for a kernel: \
         debian_version, deb_sha256 and tarball_sha256 of the new .deb), or build from a source \
         tarball you have (KERNEL_TARBALL=/path/to/linux.tar.xz, QEMU_TARBALL=/path/to/qemu.tar.xz)"
    ))
}

pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ninja_counter_is_parsed_and_other_brackets_are_not() {
        assert_eq!(
            ninja_counter("[12/1691] Compiling C object x.o").as_deref(),
            Some("12/1691 steps")
        );
        assert_eq!(ninja_counter("[warn] something"), None);
        assert_eq!(ninja_counter("plain"), None);
    }

    #[test]
    fn a_pin_gone_from_the_archive_is_named_with_the_way_on() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let script = dir.path().join("recipe.sh");
        // What apt-get prints for a version the archive dropped (measured with
        // `apt-get download linux-source-6.1=6.1.192-9`).
        fs::write(
            &script,
            "echo '==> downloading'\necho \"E: Version '6.1.192-2' for 'linux-source-6.1' was not found\" >&2\nexit 100\n",
        )?;
        let recipe = Recipe {
            what: "kernel v1:tiny",
            script,
            args: Vec::new(),
            env: Vec::new(),
            log: dir.path().join("log"),
        };
        let message = format!("{:#}", recipe.run().expect_err("apt failed"));
        assert!(
            message.starts_with(
                "building kernel v1:tiny failed: the pinned source package \
                 linux-source-6.1=6.1.192-2 is no longer in the Debian archive"
            ),
            "{message}"
        );
        assert!(
            message.contains("apt-cache madison linux-source-6.1"),
            "{message}"
        );
        assert!(message.contains("KERNEL_TARBALL="), "{message}");
        assert_eq!(pin_gone("E: Unable to locate package nope"), None);
        let source = pin_gone("E: Can not find version '56.1-9' of package 'rdma-core'\n");
        assert!(
            source.is_some_and(|m| m.contains("rdma-core=56.1-9 is no longer")),
            "apt-get source's wording"
        );
        Ok(())
    }

    #[test]
    fn kbuild_compile_lines_are_counted() {
        assert!(is_make_compile_line("  CC      kernel/fork.o"));
        assert!(is_make_compile_line("  AS      arch/x86/entry/entry_64.o"));
        assert!(!is_make_compile_line("  LD      vmlinux"));
        assert!(!is_make_compile_line("CC something"));
    }
}
