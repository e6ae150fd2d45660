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

/// The first kernel report (crash, KASAN, lockdep, WARN, kmemleak) in `text`.
pub fn report_excerpt(text: &str) -> Option<String> {
    first_marker(text, REPORT_MARKERS)
}

fn first_marker(text: &str, markers: &[&str]) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let hit = lines
        .iter()
        .position(|l| markers.iter().any(|m| l.contains(m)))?;
    let start = hit.saturating_sub(3);
    let end = (hit + 25).min(lines.len());
    Some(lines[start..end].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
