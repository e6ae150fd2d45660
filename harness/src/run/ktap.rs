//! KTAP version 1 (the kernel's Documentation/dev-tools/ktap.rst): one parent test per kernel,
//! one subtest per scenario. An expected failure is `not ok ... # XFAIL <defect>`, a skipped
//! scenario `ok ... # SKIP <why>`; a mismatch is plain `not ok` with its explanation as a
//! diagnostic line, and fails its kernel's parent test.

use std::fmt::Write as _;

use crate::run::report::{RunReport, ScenarioResult};
use crate::scenarios::{Expect, Verdict};

pub fn render(report: &RunReport) -> String {
    let (flavors, _) = report.axes();
    let mut out = format!("KTAP version 1\n1..{}\n", flavors.len());
    for (k, flavor) in flavors.iter().enumerate() {
        let cases: Vec<&ScenarioResult> = report
            .results
            .iter()
            .filter(|r| r.flavor == *flavor)
            .collect();
        let _ = write!(
            out,
            "  KTAP version 1\n  # Subtest: {flavor}\n  1..{}\n",
            cases.len()
        );
        for (i, r) in cases.iter().enumerate() {
            let n = i + 1;
            let line = match (r.verdict, r.expect) {
                (Verdict::Pass, _) => format!("ok {n} {}", r.scenario),
                (Verdict::ExpectedFail, Expect::Fail(why)) => {
                    format!(
                        "not ok {n} {} # XFAIL {}",
                        r.scenario,
                        one_line(&why.to_string())
                    )
                }
                (Verdict::ExpectedFail, Expect::Pass) => format!("not ok {n} {}", r.scenario),
                (Verdict::Skipped, _) => {
                    format!("ok {n} {} # SKIP {}", r.scenario, one_line(&r.note))
                }
                (Verdict::Mismatch, _) => {
                    let _ = writeln!(out, "  # {}: {}", r.scenario, one_line(&r.mismatch()));
                    if !r.note.is_empty() {
                        let _ = writeln!(out, "  # {}: {}", r.scenario, one_line(&r.note));
                    }
                    format!("not ok {n} {}", r.scenario)
                }
            };
            let _ = writeln!(out, "  {line}");
        }
        let ok = cases.iter().all(|r| r.verdict != Verdict::Mismatch);
        let _ = writeln!(
            out,
            "{} {} {flavor}",
            if ok { "ok" } else { "not ok" },
            k + 1
        );
    }
    out
}

/// KTAP lines end at a newline; a `#` in a description would start a directive.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::report::tests::report;

    #[test]
    fn each_kernel_is_a_parent_test_with_a_subtest_per_scenario() {
        assert_eq!(
            render(&report()),
            "KTAP version 1\n1..2\n\
             \x20 KTAP version 1\n  # Subtest: v1:tiny\n  1..2\n\
             \x20 ok 1 smoke\n\
             \x20 not ok 2 revoke-on-flr # XFAIL B1: a test defect\n\
             ok 1 v1:tiny\n\
             \x20 KTAP version 1\n  # Subtest: v1-fixed:tiny\n  1..1\n\
             \x20 # smoke: expected to pass\n\
             \x20 # smoke: doorbell <x> & \"y\"\n\
             \x20 not ok 1 smoke\n\
             not ok 2 v1-fixed:tiny\n"
        );
    }
}
