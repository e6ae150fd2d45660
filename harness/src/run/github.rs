//! What a run tells GitHub Actions: a Markdown job summary (the scenario x kernel table and
//! each mismatch) and an `::error` workflow command per mismatch, naming the checks and the
//! defect, so a failed job says what broke on its summary page and in the diff view.

use std::fmt::Write as _;

use crate::run::report::{RunReport, ScenarioResult};
use crate::scenarios::Verdict;

/// The job summary: accelerator and boots, the outcome table, then every mismatch.
pub fn summary_markdown(report: &RunReport) -> String {
    let (flavors, scenarios) = report.axes();
    let mismatches = mismatches(report);
    let mut md = format!(
        "## p2prig: {} results, {} not as expected\n\n",
        report.results.len(),
        mismatches.len()
    );
    for boot in &report.boots {
        let _ = writeln!(
            md,
            "- boot {} under {}: {} after {:.1} s",
            boot.flavor,
            boot.accel,
            if boot.ok { "agent ready" } else { "failed" },
            boot.to_agent_ready.as_secs_f64()
        );
    }
    let _ = writeln!(
        md,
        "- seed `{:#x}` (replay with `--seed {:#x}`)\n",
        report.seed, report.seed
    );
    md.push_str("| scenario |");
    for f in &flavors {
        let _ = write!(md, " {} |", cell(f));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(flavors.len()));
    md.push('\n');
    for s in &scenarios {
        let _ = write!(md, "| {} |", cell(s));
        for f in &flavors {
            let label = report.result(s, f).map_or("-", |r| r.verdict.label());
            let shown = if label == Verdict::Mismatch.label() {
                format!("**{label}**")
            } else {
                label.to_string()
            };
            let _ = write!(md, " {shown} |");
        }
        md.push('\n');
    }
    if !mismatches.is_empty() {
        md.push_str("\n### Not as expected\n\n");
        for r in mismatches {
            let _ = writeln!(
                md,
                "- **{} on {}**: {}",
                cell(&r.scenario),
                cell(&r.flavor),
                cell(&explain(r))
            );
        }
    }
    md
}

/// One `::error` workflow command per mismatch.
pub fn annotations(report: &RunReport) -> Vec<String> {
    mismatches(report)
        .into_iter()
        .map(|r| {
            format!(
                "::error title={}::{}",
                escape_property(&format!("p2prig: {} on {}", r.scenario, r.flavor)),
                escape_data(&explain(r))
            )
        })
        .collect()
}

fn mismatches(report: &RunReport) -> Vec<&ScenarioResult> {
    report
        .results
        .iter()
        .filter(|r| r.verdict == Verdict::Mismatch)
        .collect()
}

/// The expectation, the failed checks (if any) and the first failure's note.
fn explain(r: &ScenarioResult) -> String {
    let mut text = r.mismatch();
    let failed = r.failed_checks();
    if !failed.is_empty() {
        let _ = write!(text, "; failed checks: {}", failed.join(", "));
    }
    if !r.note.is_empty() {
        let _ = write!(text, "; {}", r.note);
    }
    text
}

/// Table-cell text: no line breaks, no column separators.
fn cell(text: &str) -> String {
    text.replace(['\n', '\r'], " ").replace('|', "\\|")
}

/// A workflow command's message (GitHub's escaping for command data).
fn escape_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// A workflow command's property value (data escaping plus `:` and `,`).
fn escape_property(text: &str) -> String {
    escape_data(text).replace(':', "%3A").replace(',', "%2C")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::report::tests::report;

    #[test]
    fn the_summary_has_the_table_and_names_each_mismatch() {
        let md = summary_markdown(&report());
        assert!(md.starts_with("## p2prig: 3 results, 1 not as expected"));
        assert!(md.contains("| scenario | v1:tiny | v1-fixed:tiny |\n|---|---|---|\n"));
        assert!(md.contains("| smoke | pass | **MISMATCH** |"));
        assert!(md.contains("| revoke-on-flr | expected-fail | - |"));
        assert!(md.contains("- **smoke on v1-fixed:tiny**: expected to pass; doorbell <x> & \"y\""));
    }

    #[test]
    fn a_clean_run_has_no_mismatch_section_and_no_annotation() {
        let mut clean = report();
        clean.results.retain(|r| r.verdict != Verdict::Mismatch);
        assert!(!summary_markdown(&clean).contains("Not as expected"));
        assert!(annotations(&clean).is_empty());
    }

    #[test]
    fn annotations_are_escaped_workflow_commands() {
        let mut r = report();
        r.results[2].note = "line 1\nline 2, 100%".into();
        assert_eq!(
            annotations(&r),
            ["::error title=p2prig%3A smoke on v1-fixed%3Atiny::expected to pass; line 1%0Aline 2, 100%25"]
        );
    }
}
