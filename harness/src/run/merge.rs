//! `p2prig merge`: the results.json files of the shards of one run (`run --shard K/N` on CI's
//! matrix) as one report, as if one machine had run them all.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::run::report::RunReport;
use crate::scenarios::SCENARIOS;

/// Merges shards: every input must come from the same run (seed, strictness) and no scenario
/// may have run on the same kernel twice. Results are ordered by kernel (in the order the
/// inputs first name them, debug variants last as in a run) and then by the scenario registry,
/// which is the order of one unsharded run.
pub fn merge(inputs: &[(PathBuf, RunReport)]) -> Result<RunReport> {
    let Some((first_path, first)) = inputs.first() else {
        bail!("nothing to merge: give the results.json of each shard");
    };
    check_shards(inputs)?;
    let mut merged = RunReport {
        strict: first.strict,
        shard: None,
        seed: first.seed,
        boots: Vec::new(),
        results: Vec::new(),
    };
    for (path, report) in inputs {
        if report.seed != first.seed || report.strict != first.strict {
            bail!(
                "{} ran with seed {:#x}{} but {} with seed {:#x}{}: shards of one run share \
                 --seed and --strict (pass the same ones to every shard)",
                shown(first_path),
                first.seed,
                if first.strict { " --strict" } else { "" },
                shown(path),
                report.seed,
                if report.strict { " --strict" } else { "" },
            );
        }
        for result in &report.results {
            if let Some(twin) = merged
                .results
                .iter()
                .find(|r| r.scenario == result.scenario && r.flavor == result.flavor)
            {
                bail!(
                    "{} ran on {} twice ({} and {}): merge the shards of one run, not repetitions",
                    result.scenario,
                    result.flavor,
                    twin.run_dir.display(),
                    result.run_dir.display()
                );
            }
            merged.results.push(result.clone());
        }
        merged.boots.extend(report.boots.iter().cloned());
    }
    let kernel_order: Vec<String> = match &first.shard {
        Some(shard) => shard.kernels.clone(),
        None => merged.axes().0.iter().map(|f| f.to_string()).collect(),
    };
    let position = |scenario: &str| SCENARIOS.iter().position(|s| s.name == scenario);
    merged
        .boots
        .sort_by_key(|b| kernel_order.iter().position(|k| *k == b.flavor));
    merged.results.sort_by_key(|r| {
        (
            kernel_order.iter().position(|k| *k == r.flavor),
            position(&r.scenario),
        )
    });
    Ok(merged)
}

/// Sharded inputs: each of 1..=N exactly once, all of the same plan. Unsharded inputs (runs
/// of different kernels) merge as they are.
fn check_shards(inputs: &[(PathBuf, RunReport)]) -> Result<()> {
    let shards: Vec<_> = inputs
        .iter()
        .filter_map(|(p, r)| Some((p, r.shard.as_ref()?)))
        .collect();
    let Some((first_path, first)) = shards.first() else {
        return Ok(());
    };
    if shards.len() != inputs.len() {
        bail!("some inputs are shards (`run --shard`) and some are not: merge one run's shards");
    }
    for (path, shard) in &shards {
        if shard.count != first.count || shard.kernels != first.kernels {
            bail!(
                "{} is shard {}/{} of a plan over {:?}, {} shard {}/{} of one over {:?}: \
                 merge the shards of one run",
                shown(first_path),
                first.index,
                first.count,
                first.kernels,
                shown(path),
                shard.index,
                shard.count,
                shard.kernels
            );
        }
    }
    let missing: Vec<String> = (1..=first.count)
        .filter(|k| !shards.iter().any(|(_, s)| s.index == *k))
        .map(|k| format!("{k}/{}", first.count))
        .collect();
    if !missing.is_empty() {
        bail!(
            "shard(s) {} missing: merge every shard of the run",
            missing.join(", ")
        );
    }
    if let Some(k) =
        (1..=first.count).find(|k| shards.iter().filter(|(_, s)| s.index == *k).count() > 1)
    {
        bail!("shard {k}/{} given twice", first.count);
    }
    Ok(())
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::report::tests::report;

    fn split(report: &RunReport, shard: usize, of: usize) -> RunReport {
        RunReport {
            shard: Some(crate::run::report::ShardOf {
                index: shard as u32 + 1,
                count: of as u32,
                kernels: vec!["v1:tiny".into(), "v1-fixed:tiny".into()],
            }),
            results: report
                .results
                .iter()
                .enumerate()
                .filter(|(i, _)| i % of == shard)
                .map(|(_, r)| r.clone())
                .collect(),
            ..report.clone()
        }
    }

    fn outcomes(report: &RunReport) -> Vec<(String, String, &'static str)> {
        report
            .results
            .iter()
            .map(|r| (r.flavor.clone(), r.scenario.clone(), r.verdict.label()))
            .collect()
    }

    #[test]
    fn merged_shards_equal_the_whole_run_outcome_for_outcome() -> Result<()> {
        let whole = report();
        // Shards arrive in any order.
        let shards = [
            split(&whole, 2, 3),
            split(&whole, 0, 3),
            split(&whole, 1, 3),
        ];
        let inputs: Vec<(PathBuf, RunReport)> = shards
            .into_iter()
            .enumerate()
            .map(|(i, r)| (PathBuf::from(format!("shard-{i}.json")), r))
            .collect();
        assert_eq!(outcomes(&merge(&inputs)?), outcomes(&whole));
        Ok(())
    }

    #[test]
    fn shards_of_different_runs_or_repeated_results_are_refused() {
        let mut other_seed = report();
        other_seed.seed = 2;
        let err = merge(&[("a.json".into(), report()), ("b.json".into(), other_seed)])
            .expect_err("different seeds");
        assert!(err.to_string().contains("share --seed"), "{err}");
        let err = merge(&[("a.json".into(), report()), ("b.json".into(), report())])
            .expect_err("the same results twice");
        assert!(
            err.to_string().contains("smoke ran on v1:tiny twice"),
            "{err}"
        );
        assert!(merge(&[]).is_err());
        let two_of_three = [
            ("a.json".into(), split(&report(), 0, 3)),
            ("b.json".into(), split(&report(), 2, 3)),
        ];
        let err = merge(&two_of_three).expect_err("a shard missing");
        assert!(err.to_string().contains("shard(s) 2/3 missing"), "{err}");
    }
}
