//! `p2prig run`: for each kernel, boot the rig once and run the selected scenarios in order,
//! rebooting after a scenario that broke the guest; every scenario is judged against its
//! expectation for that kernel.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::build::cache::Cache;
use crate::build::kernel::{self, KernelChoice};
use crate::rig::console;
use crate::rig::process;
use crate::rig::{Rig, RigConfig, RigShape, RunDir};
use crate::run::checks::{self, CheckId};
use crate::run::report::{Boot, RunReport, ScenarioResult, ShardOf, Suite};
use crate::scenarios::{self, Scenario, ScenarioEnv, Target, Verdict};
use p2prig_protocol::agent::DmabufUapi;

#[derive(Debug)]
pub struct RunPlan {
    /// Each kernel with the scenarios to run on it, booted in this order.
    pub boots: Vec<(KernelChoice, Vec<&'static Scenario>)>,
    pub strict: bool,
    /// Set when `boots` is one shard of a larger plan.
    pub shard: Option<ShardOf>,
    /// Seeds the randomised scenarios (release-races).
    pub seed: u64,
    /// `--allow-splat`: kernel reports that do not fail guest-console-clean.
    pub allowed_splats: console::AllowedSplats,
    /// Everything but the kernel; filled in per flavor.
    pub rig: RigConfig,
}

/// The boots of a run: every kernel with the selected scenarios, and with `debug_variants`
/// each kernel's debug variant too, for the selected scenarios that need one (a tiny kernel
/// then does not list them as skipped).
pub fn boots(
    kernels: &[KernelChoice],
    scenarios: &[&'static Scenario],
    debug_variants: bool,
) -> Vec<(KernelChoice, Vec<&'static Scenario>)> {
    let mut boots = Vec::new();
    for kernel in kernels {
        let debug = debug_variants.then(|| kernel.debug_variant()).flatten();
        let on_kernel: Vec<_> = scenarios
            .iter()
            .copied()
            .filter(|s| debug.is_none() || !s.needs_debug)
            .collect();
        if !on_kernel.is_empty() {
            boots.push((kernel.clone(), on_kernel));
        }
    }
    if debug_variants {
        let needing: Vec<_> = scenarios
            .iter()
            .copied()
            .filter(|s| s.needs_debug)
            .collect();
        for debug in kernels.iter().filter_map(KernelChoice::debug_variant) {
            if !needing.is_empty() && !kernels.contains(&debug) {
                boots.push((debug, needing.clone()));
            }
        }
    }
    boots
}

/// `--shard K/N`: shard K (1-based) of N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let bad = || format!("`{text}` is not a shard like 2/3 (K of N, 1 <= K <= N <= 64)");
        let (k, n) = text.split_once('/').ok_or_else(bad)?;
        let (index, count): (u32, u32) =
            (k.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
        if index == 0 || index > count || count > 64 {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

/// The part of `boots` that shard `shard` runs: the (kernel, scenario) pairs of the whole plan,
/// numbered in run order, cut into N contiguous runs of near-equal length (pair i of P to
/// shard i*N/P + 1). Contiguous rather than dealt round-robin: a shard then boots (and on a
/// cold CI runner builds) as few kernels as possible. The same plan always splits the same
/// way; kernels left with no scenario are not booted.
pub fn shard(
    boots: &[(KernelChoice, Vec<&'static Scenario>)],
    shard: Shard,
) -> Vec<(KernelChoice, Vec<&'static Scenario>)> {
    let pairs: usize = boots.iter().map(|(_, s)| s.len()).sum();
    let mut pair = 0usize;
    boots
        .iter()
        .filter_map(|(kernel, scenarios)| {
            let mine: Vec<_> = scenarios
                .iter()
                .copied()
                .filter(|_| {
                    let take = pair * shard.count as usize / pairs == shard.index as usize - 1;
                    pair += 1;
                    take
                })
                .collect();
            (!mine.is_empty()).then(|| (kernel.clone(), mine))
        })
        .collect()
}

pub fn run(cache: &Cache, plan: &RunPlan, top: &RunDir) -> Result<RunReport> {
    let mut report = RunReport {
        strict: plan.strict,
        shard: plan.shard.clone(),
        seed: plan.seed,
        boots: Vec::new(),
        results: Vec::new(),
    };
    let expectations = crate::run::expectations::get()?;
    let total: usize = plan.boots.iter().map(|(_, s)| s.len()).sum();
    let started = Instant::now();
    let mut index = 0;
    for (spec, scenarios) in &plan.boots {
        let kernel = kernel::resolve(cache, spec)?;
        let cfg = RigConfig {
            bzimage: kernel.bzimage.clone(),
            ..plan.rig.clone()
        };
        let env = ScenarioEnv {
            uapi: kernel.uapi,
            debug: kernel.debug,
            seed: plan.seed,
            allowed_splats: plan.allowed_splats.clone(),
            accel: cfg.accel,
        };
        let flavor_dir = top.subdir(&spec.dir_name())?;
        let mut rig: Option<(Rig, RunDir)> = None;
        let mut boots = 0;
        let mut boot_failure: Option<(RigShape, String)> = None;
        for scenario in scenarios {
            index += 1;
            println!(
                "[{index}/{total}] {spec} {} (elapsed {:.0} s)",
                scenario.name,
                started.elapsed().as_secs_f64()
            );
            let expect = expectations.expect(
                scenario.name,
                Target {
                    flavor: spec.expectation_key(),
                    debug: env.debug,
                },
            );
            let scenario_started = Instant::now();
            let mut result = ScenarioResult {
                scenario: scenario.name.to_string(),
                flavor: spec.to_string(),
                expect,
                passed: false,
                verdict: Verdict::Skipped,
                note: String::new(),
                checks: Vec::new(),
                duration: Duration::ZERO,
                start_ns: crate::rig::client::mono_ns(),
                end_ns: 0,
                run_dir: flavor_dir.path.clone(),
            };
            if scenario.needs_debug && !env.debug {
                result.note = "needs a debug kernel (KASAN, kmemleak): run FLAVOR:debug".into();
                println!("    skipped: {}", result.note);
                report.results.push(result);
                continue;
            }
            let shape = scenario.importer.shape();
            if shape == RigShape::Viommu && env.uapi != DmabufUapi::Upstream {
                result.note = "needs Linux 7.x: iommufd's dma-buf import (IOMMU_IOAS_MAP_FILE of \
                               a vfio-pci dma-buf) is not in 6.1, whose exporter is the seed's"
                    .into();
                println!("    skipped: {}", result.note);
                report.results.push(result);
                continue;
            }
            // The scenarios of one shape run in one boot; another shape reboots.
            if rig.as_ref().is_some_and(|(r, _)| r.shape != shape) {
                if let Some((r, _)) = rig.take() {
                    r.shutdown()?;
                }
            }
            if boot_failure
                .as_ref()
                .is_some_and(|(failed, _)| *failed != shape)
            {
                boot_failure = None;
            }
            if rig.is_none() && boot_failure.is_none() {
                boots += 1;
                let dir = flavor_dir.subdir(&format!("boot-{boots}"))?;
                let cfg = RigConfig {
                    shape,
                    ..cfg.clone()
                };
                println!(
                    "    booting {spec} under {}, {} shape (run directory {})",
                    cfg.accel.name(),
                    shape.name(),
                    dir.path.display()
                );
                let boot_started = Instant::now();
                match Rig::boot(&cfg, &dir) {
                    Ok(r) => {
                        println!(
                            "    guest agent ready after {:.1} s",
                            r.boot_time.as_secs_f64()
                        );
                        report
                            .boots
                            .push(boot_record(spec, &cfg, true, r.boot_time, &dir));
                        rig = Some((r, dir));
                    }
                    Err(e) => {
                        process::check_interrupted()?;
                        report.boots.push(boot_record(
                            spec,
                            &cfg,
                            false,
                            boot_started.elapsed(),
                            &dir,
                        ));
                        boot_failure = Some((shape, format!("boot failed: {e:#}")));
                    }
                }
            }
            let mut suite = Suite::default();
            match &mut rig {
                Some((r, dir)) => {
                    result.run_dir = dir.path.clone();
                    // The timeline starts with the scenario, not with the boot before it.
                    result.start_ns = crate::rig::client::mono_ns();
                    let console_mark = r.console_mark();
                    let outcome = (scenario.run)(r, &env, &mut suite);
                    process::check_interrupted()?;
                    if let Err(e) = outcome {
                        suite.record(
                            checks::SCENARIO_COMPLETED,
                            false,
                            format!("{e:#}"),
                            scenario_started.elapsed(),
                        );
                    }
                    let text = r.console_since(console_mark);
                    let found = console::reports(&text, &plan.allowed_splats);
                    match &found.first {
                        Some(excerpt) => suite.record(
                            checks::GUEST_CONSOLE_CLEAN,
                            false,
                            excerpt.clone(),
                            Duration::ZERO,
                        ),
                        None => suite.record(
                            checks::GUEST_CONSOLE_CLEAN,
                            true,
                            found.allowed_detail(),
                            Duration::ZERO,
                        ),
                    }
                    if !r.healthy() {
                        println!("    the guest is gone or crashed; the next scenario reboots");
                        rig = None;
                    }
                }
                None => {
                    let why = boot_failure
                        .as_ref()
                        .map(|(_, why)| why.clone())
                        .unwrap_or_default();
                    suite.record(checks::BOOT, false, why, Duration::ZERO);
                }
            }
            result.passed = suite.failures() == 0 && suite.skipped.is_none();
            let failed: Vec<CheckId> = suite
                .checks
                .iter()
                .filter(|c| !c.passed)
                .map(|c| c.name)
                .collect();
            result.verdict = match &suite.skipped {
                Some(_) if failed.is_empty() => Verdict::Skipped,
                _ => Verdict::judge(expect, &failed, plan.strict),
            };
            result.note = match (&suite.skipped, suite.checks.iter().find(|c| !c.passed)) {
                (_, Some(c)) => format!("{}: {}", c.name, c.detail),
                (Some(reason), None) => reason.clone(),
                (None, None) => String::new(),
            };
            result.checks = suite.checks;
            result.duration = scenario_started.elapsed();
            result.end_ns = crate::rig::client::mono_ns();
            println!(
                "    => {} ({})",
                result.verdict.label(),
                expectation_text(&result)
            );
            report.results.push(result);
        }
        if let Some((r, _)) = rig.take() {
            r.shutdown()?;
        }
    }
    Ok(report)
}

fn expectation_text(r: &ScenarioResult) -> String {
    match r.expect {
        scenarios::Expect::Pass => "expected to pass".into(),
        scenarios::Expect::Fail(why) => format!("expected to fail: {why}"),
    }
}

fn boot_record(
    spec: &KernelChoice,
    cfg: &RigConfig,
    ok: bool,
    took: Duration,
    dir: &RunDir,
) -> Boot {
    Boot {
        flavor: spec.to_string(),
        accel: cfg.accel.name().to_string(),
        shape: cfg.shape,
        ok,
        to_agent_ready: took,
        run_dir: dir.path.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(boots: &[(KernelChoice, Vec<&'static Scenario>)]) -> Vec<String> {
        boots
            .iter()
            .map(|(k, s)| {
                let s: Vec<&str> = s.iter().map(|s| s.name).collect();
                format!("{k}: {}", s.join(","))
            })
            .collect()
    }

    #[test]
    fn debug_variants_take_the_debug_scenarios_off_the_tiny_kernels() -> Result<()> {
        let kernels: Vec<KernelChoice> = vec!["v1".parse()?, "v1-fixed".parse()?];
        let scenarios = crate::scenarios::select("smoke,map-leak")?;
        assert_eq!(
            names(&boots(&kernels, &scenarios, true)),
            [
                "v1:tiny: smoke",
                "v1-fixed:tiny: smoke",
                "v1:debug: map-leak",
                "v1-fixed:debug: map-leak"
            ]
        );
        assert_eq!(
            names(&boots(&kernels, &scenarios, false)),
            ["v1:tiny: smoke,map-leak", "v1-fixed:tiny: smoke,map-leak"]
        );
        Ok(())
    }

    #[test]
    fn a_debug_kernel_given_explicitly_is_not_booted_twice() -> Result<()> {
        let kernels: Vec<KernelChoice> = vec!["v1".parse()?, "v1:debug".parse()?];
        let scenarios = crate::scenarios::select("map-leak")?;
        assert_eq!(
            names(&boots(&kernels, &scenarios, true)),
            ["v1:debug: map-leak"]
        );
        Ok(())
    }

    #[test]
    fn shards_cut_the_plan_into_contiguous_runs_the_same_way_each_time() -> Result<()> {
        let kernels: Vec<KernelChoice> = vec!["v1".parse()?, "v1-fixed".parse()?];
        let scenarios = crate::scenarios::select("smoke,p2p-doorbell,map-leak")?;
        let plan = boots(&kernels, &scenarios, true);
        let of = |k| names(&shard(&plan, Shard { index: k, count: 3 }));
        // Pairs in run order: v1 smoke, v1 p2p-doorbell, v1-fixed smoke, v1-fixed
        // p2p-doorbell, v1:debug map-leak, v1-fixed:debug map-leak.
        assert_eq!(of(1), ["v1:tiny: smoke,p2p-doorbell"]);
        assert_eq!(of(2), ["v1-fixed:tiny: smoke,p2p-doorbell"]);
        assert_eq!(of(3), ["v1:debug: map-leak", "v1-fixed:debug: map-leak"]);
        // More shards than pairs: some are empty, none gets a pair twice.
        let seven: Vec<usize> = (1..=7)
            .map(|k| {
                shard(&plan, Shard { index: k, count: 7 })
                    .iter()
                    .map(|(_, s)| s.len())
                    .sum()
            })
            .collect();
        assert_eq!(seven.iter().sum::<usize>(), 6);
        assert!(seven.iter().all(|n| *n <= 1), "{seven:?}");
        assert_eq!(of(2), of(2));
        let all: usize = (1..=3)
            .map(|k| {
                shard(&plan, Shard { index: k, count: 3 })
                    .iter()
                    .map(|(_, s)| s.len())
                    .sum::<usize>()
            })
            .sum();
        assert_eq!(all, 6);
        Ok(())
    }

    #[test]
    fn a_shard_is_k_of_n() {
        assert_eq!("2/3".parse(), Ok(Shard { index: 2, count: 3 }));
        for bad in ["0/3", "4/3", "3", "a/b", "1/65"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }
}
