//! Results: PASS/FAIL lines as checks run, the scenario x flavor table, JUnit XML and JSON.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::run::checks::CheckId;

#[cfg(test)]
use crate::run::expectations::ExpectedFailure;
use crate::scenarios::{Expect, Verdict};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: CheckId,
    pub passed: bool,
    pub detail: String,
    #[serde(serialize_with = "secs", deserialize_with = "from_secs")]
    pub duration: Duration,
}

/// The checks of one scenario run on one kernel, printed as they are recorded.
#[derive(Debug, Clone, Default)]
pub struct Suite {
    pub checks: Vec<Check>,
    /// Why the scenario could not show what it is about on this rig (set by [`Suite::skip`]).
    pub skipped: Option<String>,
}

impl Suite {
    pub fn record(
        &mut self,
        name: CheckId,
        passed: bool,
        detail: impl Into<String>,
        duration: Duration,
    ) {
        let detail = detail.into();
        let word = if passed { "PASS" } else { "FAIL" };
        if detail.is_empty() {
            println!("    {word} {name}");
        } else {
            println!("    {word} {name}: {detail}");
        }
        self.checks.push(Check {
            name,
            passed,
            detail,
            duration,
        });
    }

    pub fn failures(&self) -> usize {
        self.checks.iter().filter(|c| !c.passed).count()
    }

    /// Marks the scenario skipped: this rig cannot show what it checks (e.g. the host's
    /// CPU makes the kernel allow what the scenario needs refused). The scenario returns
    /// without recording more; a check that failed before, or the console check after,
    /// still makes it a failure.
    pub fn skip(&mut self, reason: impl Into<String>) {
        let reason = reason.into();
        println!("    skipped: {reason}");
        self.skipped = Some(reason);
    }
}

/// One scenario on one kernel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub scenario: String,
    pub flavor: String,
    #[serde(flatten)]
    pub expect: Expect,
    pub passed: bool,
    pub verdict: Verdict,
    /// Why it was skipped, or what failed (first failed check).
    pub note: String,
    pub checks: Vec<Check>,
    #[serde(serialize_with = "secs", deserialize_with = "from_secs")]
    pub duration: Duration,
    /// CLOCK_MONOTONIC bounds of the scenario, the clock of device events and RPC transcripts.
    pub start_ns: u64,
    pub end_ns: u64,
    pub run_dir: PathBuf,
}

impl ScenarioResult {
    /// What was expected and what happened instead, for a mismatch: the JUnit failure and the
    /// CI annotation.
    pub fn mismatch(&self) -> String {
        match self.expect {
            Expect::Pass => "expected to pass".to_string(),
            Expect::Fail(why) if self.passed => format!("expected to fail ({why}) but passed"),
            Expect::Fail(why) => format!(
                "expected to fail ({why}) in {}, but failed elsewhere",
                why.shows_as
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        }
    }

    /// The names of the checks that failed, in the order they ran.
    pub fn failed_checks(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect()
    }
}

/// A boot of the rig.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Boot {
    pub flavor: String,
    pub accel: String,
    /// The machine booted (`switch` or `viommu`); older results have none.
    #[serde(default)]
    pub shape: crate::rig::RigShape,
    pub ok: bool,
    #[serde(serialize_with = "secs", deserialize_with = "from_secs")]
    pub to_agent_ready: Duration,
    pub run_dir: PathBuf,
}

/// `run --shard K/N`: which part of a run's plan this one ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardOf {
    /// 1-based.
    pub index: u32,
    pub count: u32,
    /// Every kernel of the whole plan in boot order, so merged shards keep the order of one run.
    pub kernels: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub strict: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardOf>,
    /// The seed of the randomised scenarios (release-races); `--seed` replays it.
    pub seed: u64,
    pub boots: Vec<Boot>,
    pub results: Vec<ScenarioResult>,
}

/// Scenario x kernel pairs whose verdict differs between repeated runs of the same selection,
/// each with its verdicts in run order.
pub fn flakes(reports: &[RunReport]) -> Vec<String> {
    let Some(first) = reports.first() else {
        return Vec::new();
    };
    first
        .results
        .iter()
        .filter_map(|r| {
            let verdicts: Vec<&str> = reports
                .iter()
                .map(|report| {
                    report
                        .result(&r.scenario, &r.flavor)
                        .map_or("missing", |o| o.verdict.label())
                })
                .collect();
            verdicts
                .iter()
                .any(|v| *v != verdicts[0])
                .then(|| format!("{} on {}: {}", r.scenario, r.flavor, verdicts.join(", ")))
        })
        .collect()
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

fn from_secs<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Duration, D::Error> {
    let secs = f64::deserialize(d)?;
    Duration::try_from_secs_f64(secs).map_err(serde::de::Error::custom)
}

impl RunReport {
    /// A run's results.json, read back (`p2prig report`, `p2prig merge`).
    pub fn read_json(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a p2prig results.json this version can read",
                path.display()
            )
        })
    }

    pub fn all_match(&self) -> bool {
        self.results.iter().all(|r| r.verdict.is_ok())
    }

    /// Per kernel, in run order: its boots to a ready agent plus its scenarios.
    pub fn suite_times(&self) -> Vec<(String, Duration)> {
        let mut times: Vec<(String, Duration)> = Vec::new();
        let spans = self
            .boots
            .iter()
            .map(|b| (&b.flavor, b.to_agent_ready))
            .chain(self.results.iter().map(|r| (&r.flavor, r.duration)));
        for (kernel, took) in spans {
            match times.iter_mut().find(|(k, _)| k == kernel) {
                Some((_, total)) => *total += took,
                None => times.push((kernel.clone(), took)),
            }
        }
        times
    }

    /// The kernels and the scenarios of the run, each in the order first seen: the columns
    /// and rows of its tables.
    pub fn axes(&self) -> (Vec<&str>, Vec<&str>) {
        let mut flavors: Vec<&str> = Vec::new();
        let mut scenarios: Vec<&str> = Vec::new();
        for r in &self.results {
            if !flavors.contains(&r.flavor.as_str()) {
                flavors.push(&r.flavor);
            }
            if !scenarios.contains(&r.scenario.as_str()) {
                scenarios.push(&r.scenario);
            }
        }
        (flavors, scenarios)
    }

    /// The result of `scenario` on kernel `flavor`, if it ran there.
    pub fn result(&self, scenario: &str, flavor: &str) -> Option<&ScenarioResult> {
        self.results
            .iter()
            .find(|r| r.scenario == scenario && r.flavor == flavor)
    }

    /// Rows are scenarios, columns flavors.
    pub fn table(&self) -> String {
        let (flavors, scenarios) = self.axes();
        let first = scenarios.iter().map(|s| s.len()).max().unwrap_or(8).max(8);
        let width = flavors.iter().map(|f| f.len()).max().unwrap_or(0).max(13);
        let mut out = format!("{:<first$}", "scenario");
        for f in &flavors {
            let _ = write!(out, "  {f:<width$}");
        }
        out.push('\n');
        for s in &scenarios {
            let _ = write!(out, "{s:<first$}");
            for f in &flavors {
                let cell = self.result(s, f).map(|r| r.verdict.label()).unwrap_or("-");
                let _ = write!(out, "  {cell:<width$}");
            }
            out.push('\n');
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    pub fn write_junit(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.junit_xml())
            .with_context(|| format!("writing JUnit XML to {}", path.display()))
    }

    /// One testsuite per flavor, one testcase per scenario; only a mismatch is a failure.
    pub fn junit_xml(&self) -> String {
        let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
        let (flavors, _) = self.axes();
        for flavor in flavors {
            let cases: Vec<&ScenarioResult> =
                self.results.iter().filter(|r| r.flavor == flavor).collect();
            let failures = cases
                .iter()
                .filter(|r| r.verdict == Verdict::Mismatch)
                .count();
            let skipped = cases
                .iter()
                .filter(|r| r.verdict == Verdict::Skipped)
                .count();
            let time: f64 = cases.iter().map(|r| r.duration.as_secs_f64()).sum();
            let _ = writeln!(
                xml,
                "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{time:.3}\">",
                escape(flavor),
                cases.len()
            );
            for r in cases {
                let _ = write!(
                    xml,
                    "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">",
                    escape(flavor),
                    escape(&r.scenario),
                    r.duration.as_secs_f64()
                );
                match (r.verdict, r.expect) {
                    (Verdict::Mismatch, _) => {
                        let _ = write!(
                            xml,
                            "\n      <failure message=\"{}: {}\"/>\n    ",
                            escape(&r.mismatch()),
                            escape(&r.note)
                        );
                    }
                    (Verdict::ExpectedFail, Expect::Fail(why)) => {
                        let _ = write!(
                            xml,
                            "\n      <system-out>reproduced: {}</system-out>\n    ",
                            escape(&why.to_string())
                        );
                    }
                    (Verdict::Skipped, _) => {
                        let _ = write!(
                            xml,
                            "\n      <skipped message=\"{}\"/>\n    ",
                            escape(&r.note)
                        );
                    }
                    _ => {}
                }
                xml.push_str("</testcase>\n");
            }
            xml.push_str("  </testsuite>\n");
        }
        xml.push_str("</testsuites>\n");
        xml
    }
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
                let _ = write!(out, "&#x{:x};", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const SHOWN: CheckId = crate::run::checks::WRITE_IN_WINDOW_GETS_REMOTE_ACCESS_ERROR;

    fn b1() -> ExpectedFailure {
        crate::run::expectations::test_failure("B1", &[SHOWN])
    }

    pub(crate) fn result(
        scenario: &str,
        flavor: &str,
        expect: Expect,
        passed: bool,
    ) -> ScenarioResult {
        ScenarioResult {
            scenario: scenario.into(),
            flavor: flavor.into(),
            expect,
            passed,
            verdict: Verdict::judge(expect, if passed { &[] } else { &[SHOWN] }, false),
            note: if passed {
                String::new()
            } else {
                "doorbell <x> & \"y\"".into()
            },
            checks: Vec::new(),
            duration: Duration::from_millis(1500),
            start_ns: 0,
            end_ns: 1,
            run_dir: PathBuf::from("/r"),
        }
    }

    pub(crate) fn report() -> RunReport {
        RunReport {
            strict: false,
            shard: None,
            seed: 1,
            boots: Vec::new(),
            results: vec![
                result("smoke", "v1:tiny", Expect::Pass, true),
                result("revoke-on-flr", "v1:tiny", Expect::Fail(b1()), false),
                result("smoke", "v1-fixed:tiny", Expect::Pass, false),
            ],
        }
    }

    #[test]
    fn junit_fails_only_mismatches_and_escapes_text() {
        let xml = report().junit_xml();
        assert_eq!(xml.matches("<testsuite ").count(), 2);
        assert!(xml.contains("name=\"v1:tiny\" tests=\"2\" failures=\"0\""));
        assert!(xml.contains("name=\"v1-fixed:tiny\" tests=\"1\" failures=\"1\""));
        assert!(xml.contains("reproduced: B1"));
        assert!(xml.contains("doorbell &lt;x&gt; &amp; &quot;y&quot;"));
    }

    #[test]
    fn flakes_name_pairs_whose_verdict_changed() {
        let steady = report();
        assert!(flakes(&[steady.clone(), report(), report()]).is_empty());
        let mut changed = report();
        changed.results[1] = result("revoke-on-flr", "v1:tiny", Expect::Fail(b1()), true);
        assert_eq!(
            flakes(&[steady, changed]),
            ["revoke-on-flr on v1:tiny: expected-fail, MISMATCH"]
        );
    }

    #[test]
    fn suite_time_adds_boots_and_scenarios_per_kernel() {
        let mut r = report();
        r.boots.push(Boot {
            flavor: "v1:tiny".into(),
            accel: "tcg".into(),
            shape: crate::rig::RigShape::Switch,
            ok: true,
            to_agent_ready: Duration::from_secs(3),
            run_dir: PathBuf::from("/r"),
        });
        assert_eq!(
            r.suite_times(),
            [
                ("v1:tiny".to_string(), Duration::from_millis(6000)),
                ("v1-fixed:tiny".to_string(), Duration::from_millis(1500)),
            ]
        );
    }

    #[test]
    fn table_has_a_cell_per_scenario_and_flavor() {
        let table = report().table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].contains("v1:tiny") && lines[0].contains("v1-fixed:tiny"));
        assert!(
            lines[1].starts_with("smoke")
                && lines[1].contains("pass")
                && lines[1].contains("MISMATCH")
        );
        assert!(lines[2].contains("expected-fail") && lines[2].trim_end().ends_with('-'));
    }

    #[test]
    fn json_carries_expectation_and_verdict() -> Result<()> {
        let text = serde_json::to_string(&report())?;
        assert!(text.contains(
            "\"expect\":\"fail\",\"defect\":{\"id\":\"B1\",\"title\":\"a test defect\",\
             \"shows_as\":[\"write-in-window-gets-remote-access-error\"]}"
        ));
        assert!(text.contains("\"verdict\":\"expected_fail\""));
        Ok(())
    }

    #[test]
    fn results_json_reads_back_with_the_same_outcomes() -> Result<()> {
        let real = crate::run::expectations::get()?.expect(
            "revoke-on-flr",
            crate::scenarios::Target {
                flavor: "v1",
                debug: false,
            },
        );
        assert!(
            matches!(real, Expect::Fail(_)),
            "v1 is expected to fail revoke-on-flr"
        );
        let mut written = report();
        written.results[1].expect = real;
        written.results[1].checks.push(Check {
            name: SHOWN,
            passed: false,
            detail: "success".into(),
            duration: Duration::from_millis(1250),
        });
        let text = serde_json::to_string(&written)?;
        let read: RunReport = serde_json::from_str(&text)?;
        assert_eq!(serde_json::to_string(&read)?, text);
        assert_eq!(read.results[1].expect, real);
        assert_eq!(
            read.results[1].checks[0].duration,
            Duration::from_millis(1250)
        );

        let unknown_check = text.replace(SHOWN.as_str(), "no-such-check");
        let err = serde_json::from_str::<RunReport>(&unknown_check).expect_err("unknown check");
        assert!(
            err.to_string().contains("unknown check `no-such-check`"),
            "{err}"
        );
        Ok(())
    }
}
