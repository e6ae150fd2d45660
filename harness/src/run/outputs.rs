//! What a run leaves behind and says at its end, the same for `run`, `report` (a run's results
//! rendered again) and `merge` (shards as one run): results.json, JUnit, the HTML report and
//! the Markdown summary in the run directory; the table on the terminal; the job summary and
//! annotations under GitHub Actions.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::run::report::RunReport;
use crate::run::{github, html};

/// results.json, junit.xml, report.html and summary.md in `dir`.
pub fn write_all(report: &RunReport, dir: &Path) -> Result<()> {
    report.write_json(&dir.join("results.json"))?;
    report.write_junit(&dir.join("junit.xml"))?;
    html::write(report, &dir.join("report.html"))?;
    let summary = dir.join("summary.md");
    std::fs::write(&summary, github::summary_markdown(report))
        .with_context(|| format!("writing {}", summary.display()))
}

/// The end of one run on the terminal: boots, the table, per-kernel suite time, the verdict.
pub fn summarize(report: &RunReport, dir: &Path) {
    for boot in &report.boots {
        println!(
            "boot {} under {}: {} after {:.1} s",
            boot.flavor,
            boot.accel,
            if boot.ok { "agent ready" } else { "FAILED" },
            boot.to_agent_ready.as_secs_f64()
        );
    }
    println!("\n{}", report.table());
    for (kernel, took) in report.suite_times() {
        println!("suite time on {kernel}: {:.1} s", took.as_secs_f64());
    }
    let mismatches = report.results.iter().filter(|r| !r.verdict.is_ok()).count();
    println!(
        "{} results, {mismatches} not as expected; report {}",
        report.results.len(),
        dir.join("report.html").display()
    );
}

/// Under GitHub Actions: the job summary appended to $GITHUB_STEP_SUMMARY and an `::error`
/// annotation per mismatch on stdout.
pub fn tell_github_actions(report: &RunReport) -> Result<()> {
    if std::env::var("GITHUB_ACTIONS").as_deref() != Ok("true") {
        return Ok(());
    }
    for line in github::annotations(report) {
        println!("{line}");
    }
    if let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|p| !p.is_empty()) {
        use std::io::Write as _;
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .and_then(|mut f| f.write_all(github::summary_markdown(report).as_bytes()))
            .with_context(|| {
                format!(
                    "appending the job summary to GITHUB_STEP_SUMMARY={}",
                    PathBuf::from(&path).display()
                )
            })?;
    }
    Ok(())
}
