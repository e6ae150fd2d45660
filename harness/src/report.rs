//! Check results: PASS/FAIL lines on the terminal and JUnit XML.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
    pub duration: Duration,
}

/// The checks of one scenario run on one kernel.
#[derive(Debug, Clone)]
pub struct Suite {
    pub name: String,
    pub checks: Vec<Check>,
}

impl Suite {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            checks: Vec::new(),
        }
    }

    /// Records and prints one check.
    pub fn record(
        &mut self,
        name: &str,
        passed: bool,
        detail: impl Into<String>,
        duration: Duration,
    ) {
        let detail = detail.into();
        let word = if passed { "PASS" } else { "FAIL" };
        if detail.is_empty() {
            println!("{word} {name}");
        } else {
            println!("{word} {name}: {detail}");
        }
        self.checks.push(Check {
            name: name.to_string(),
            passed,
            detail,
            duration,
        });
    }

    pub fn failures(&self) -> usize {
        self.checks.iter().filter(|c| !c.passed).count()
    }

    pub fn write_junit(&self, path: &Path) -> Result<()> {
        std::fs::write(path, junit_xml(std::slice::from_ref(self)))
            .with_context(|| format!("writing JUnit XML to {}", path.display()))
    }
}

pub fn junit_xml(suites: &[Suite]) -> String {
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
    for suite in suites {
        let time: f64 = suite.checks.iter().map(|c| c.duration.as_secs_f64()).sum();
        let _ = writeln!(
            xml,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" time=\"{time:.3}\">",
            escape(&suite.name),
            suite.checks.len(),
            suite.failures()
        );
        for check in &suite.checks {
            let _ = write!(
                xml,
                "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
                escape(&suite.name),
                escape(&check.name),
                check.duration.as_secs_f64()
            );
            if check.passed {
                xml.push_str("/>\n");
            } else {
                let _ = writeln!(
                    xml,
                    ">\n      <failure message=\"{}\"/>\n    </testcase>",
                    escape(&check.detail)
                );
            }
        }
        xml.push_str("  </testsuite>\n");
    }
    xml.push_str("</testsuites>\n");
    xml
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => {
                out.push_str(&format!("&#x{:x};", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_counts_failures_and_escapes_text() {
        let mut suite = Suite::new("smoke v1:tiny");
        suite.record("a", true, "", Duration::from_millis(5));
        suite.record("b <x>", false, "got \"7\" & more", Duration::from_millis(5));
        let xml = junit_xml(&[suite]);
        assert!(xml.contains("tests=\"2\" failures=\"1\""));
        assert!(xml.contains("name=\"b &lt;x&gt;\""));
        assert!(xml.contains("message=\"got &quot;7&quot; &amp; more\""));
        assert_eq!(xml.matches("<testcase").count(), 2);
    }
}
