//! Reading the guest's serial console for crashes and kernel reports.

use std::path::Path;

/// Markers of a kernel crash that ends (or poisons) the boot.
const FATAL_MARKERS: &[&str] = &[
    "Kernel panic - not syncing",
    "Oops:",
    "BUG: unable to handle",
    "general protection fault",
];

/// Markers of a kernel report that fails a scenario without necessarily killing the guest.
const REPORT_MARKERS: &[&str] = &[
    "Kernel panic - not syncing",
    "Oops:",
    "BUG:",
    "general protection fault",
    "KASAN:",
    "WARNING:",
    "possible circular locking dependency",
    "inconsistent lock state",
    "unreferenced object",
];

/// The first fatal crash in the console log, with the lines around it.
pub fn fatal_excerpt(console: &Path) -> Option<String> {
    let text = std::fs::read(console).ok()?;
    first_marker(&String::from_utf8_lossy(&text), FATAL_MARKERS)
}

/// `--allow-splat REGEX`: kernel reports known to be noise on the kernel under test. A report
/// line matching one is allowed (and said so), never silently dropped; a crash is never allowed.
#[derive(Debug, Clone, Default)]
pub struct AllowedSplats(Vec<regex::Regex>);

impl AllowedSplats {
    pub fn new(patterns: &[String]) -> anyhow::Result<Self> {
        patterns
            .iter()
            .map(|p| {
                regex::Regex::new(p).map_err(|e| {
                    anyhow::anyhow!("--allow-splat `{p}` is not a regular expression: {e}")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map(Self)
    }

    fn allows(&self, line: &str) -> bool {
        self.0.iter().any(|r| r.is_match(line))
    }
}

/// What the kernel reported in a stretch of console or dmesg text.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reports {
    /// The first report no `--allow-splat` pattern allows, with the lines around it.
    pub first: Option<String>,
    /// The report lines an `--allow-splat` pattern allowed.
    pub allowed: Vec<String>,
}

impl Reports {
    /// A check's detail when nothing unallowed was reported.
    pub fn allowed_detail(&self) -> String {
        if self.allowed.is_empty() {
            String::new()
        } else {
            format!(
                "{} report line(s) allowed by --allow-splat: {}",
                self.allowed.len(),
                self.allowed.join(" | ")
            )
        }
    }
}

/// The kernel reports (crash, KASAN, lockdep, WARN, kmemleak) in `text`.
pub fn reports(text: &str, allowed: &AllowedSplats) -> Reports {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Reports::default();
    for (i, line) in lines.iter().enumerate() {
        if !REPORT_MARKERS.iter().any(|m| line.contains(m)) {
            continue;
        }
        let fatal = FATAL_MARKERS.iter().any(|m| line.contains(m));
        if !fatal && allowed.allows(line) {
            found.allowed.push(line.trim().to_string());
        } else {
            found.first = Some(around(&lines, i));
            break;
        }
    }
    found
}

/// The line of a report excerpt that names the report ("BUG: kernel NULL pointer
/// dereference, address: 0000000000000008"), without its timestamp.
pub fn headline(excerpt: &str) -> &str {
    let line = excerpt
        .lines()
        .find(|l| REPORT_MARKERS.iter().any(|m| l.contains(m)))
        .unwrap_or(excerpt);
    match line.trim_start().strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(line, |(_, r)| r).trim(),
        None => line.trim(),
    }
}

fn first_marker(text: &str, markers: &[&str]) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let hit = lines
        .iter()
        .position(|l| markers.iter().any(|m| l.contains(m)))?;
    Some(around(&lines, hit))
}

fn around(lines: &[&str], hit: usize) -> String {
    let start = hit.saturating_sub(3);
    let end = (hit + 25).min(lines.len());
    lines[start..end].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_excerpt(text: &str) -> Option<String> {
        reports(text, &AllowedSplats::default()).first
    }

    #[test]
    fn a_headline_is_the_marker_line_without_its_timestamp() {
        let excerpt = "[    1.000000] a line before\n[   12.345678] BUG: kernel NULL pointer \
                       dereference, address: 0000000000000008\n[   12.3] #PF: supervisor";
        assert_eq!(
            headline(excerpt),
            "BUG: kernel NULL pointer dereference, address: 0000000000000008"
        );
    }

    #[test]
    fn panic_is_found_with_context() {
        let text = "a\nb\nc\nd\n[    1.0] Kernel panic - not syncing: No working init found.\ne\n";
        let excerpt = first_marker(text, FATAL_MARKERS).expect("panic found");
        assert!(excerpt.starts_with("b\n"));
        assert!(excerpt.contains("No working init found"));
    }

    #[test]
    fn clean_boot_has_no_report() {
        let text = "[    0.0] Linux version 6.1\n[    1.0] Run /init as init process\n";
        assert!(report_excerpt(text).is_none());
        assert!(first_marker(text, FATAL_MARKERS).is_none());
    }

    #[test]
    fn kasan_and_warn_are_reports_but_not_fatal() {
        let text = "BUG: KASAN: use-after-free in foo\n";
        assert!(report_excerpt(text).is_some());
        let warn = "WARNING: CPU: 0 PID: 1 at drivers/x.c:1\n";
        assert!(report_excerpt(warn).is_some());
        assert!(first_marker(warn, FATAL_MARKERS).is_none());
    }

    #[test]
    fn an_allowed_report_is_named_and_a_crash_is_never_allowed() -> anyhow::Result<()> {
        let allowed = AllowedSplats::new(&["WARNING: .* at drivers/noisy\\.c".to_string()])?;
        let text = "ok\nWARNING: CPU: 0 PID: 1 at drivers/noisy.c:12 f+0x1\nok\n";
        let found = reports(text, &allowed);
        assert_eq!(found.first, None);
        assert_eq!(
            found.allowed,
            ["WARNING: CPU: 0 PID: 1 at drivers/noisy.c:12 f+0x1"]
        );
        assert!(found
            .allowed_detail()
            .starts_with("1 report line(s) allowed by --allow-splat"));

        let other = format!("{text}WARNING: CPU: 0 PID: 1 at drivers/other.c:3\n");
        assert!(reports(&other, &allowed)
            .first
            .is_some_and(|e| e.contains("other.c")));

        let everything = AllowedSplats::new(&[".*".to_string()])?;
        let crash = "BUG: unable to handle page fault for address: 0\nOops: 0000 [#1] SMP\n";
        assert!(
            reports(crash, &everything).first.is_some(),
            "a crash cannot be allowed"
        );

        let err = AllowedSplats::new(&["(".to_string()]).expect_err("bad regex");
        assert!(err
            .to_string()
            .contains("--allow-splat `(` is not a regular expression"));
        Ok(())
    }
}
