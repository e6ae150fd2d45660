//! The campaign: boot, then generate or mutate, run, judge, keep what behaved new, minimise
//! what diverged; a progress line every few seconds, results in fuzz.json, and a clean stop on
//! Ctrl-C that keeps the corpus (it is written as it grows).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use p2prig_protocol::agent::{DmabufUapi, KmemleakCommand};

use crate::rig::console::AllowedSplats;
use crate::rig::{process, Rig, RigConfig, RunDir};
use crate::scenarios::map_leak::{kmemleak, kmemleak_report};
use crate::scenarios::races::schedule::SplitMix64;

use super::exec::{execute, Execution, Fixture, Observed};
use super::generate::Generator;
use super::minimise::minimise;
use super::oracle::{console_divergence, judge, Divergence};
use super::program::Program;

/// Runs a minimisation may take (each one program on the rig).
const MINIMISE_RUNS: u32 = 40;
/// Replays of a minimised program that confirm it.
const REPLAYS: u32 = 3;
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Programs between kmemleak checks on a debug kernel (a check takes about 10 s).
const KMEMLEAK_EVERY: usize = 10;
/// The share of programs generated fresh rather than mutated from the corpus, in percent.
const FRESH_PERCENT: u64 = 30;

#[derive(Debug, Clone, Copy)]
pub enum Budget {
    Time(Duration),
    Programs(u64),
}

#[derive(Debug, Clone)]
pub struct Campaign {
    pub kernel: String,
    pub uapi: DmabufUapi,
    /// A debug kernel: kmemleak is checked too.
    pub debug: bool,
    pub budget: Budget,
    pub seed: u64,
    pub corpus_dir: PathBuf,
    pub minimise: bool,
    pub allowed_splats: AllowedSplats,
    pub rig: RigConfig,
}

/// One finding: a signature first seen in a program, minimised and replayed.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub signature: String,
    pub oracle: &'static str,
    pub first_seen_s: f64,
    pub found_by_program: u64,
    pub occurrences: u64,
    pub detail: String,
    pub program: String,
    pub minimised: String,
    pub minimised_ops: usize,
    pub minimise_runs: u32,
    pub replays_reproduced: u32,
    pub replays: u32,
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FuzzReport {
    pub kernel: String,
    pub accel: String,
    pub seed: u64,
    pub duration_s: f64,
    pub programs: u64,
    pub operations: u64,
    pub boots: u32,
    pub corpus: usize,
    pub features: usize,
    pub kmemleak_checks: u32,
    pub findings: Vec<Finding>,
    pub interrupted: bool,
}

impl FuzzReport {
    pub fn programs_per_min(&self) -> f64 {
        self.programs as f64 * 60.0 / self.duration_s.max(1e-9)
    }

    pub fn operations_per_s(&self) -> f64 {
        self.operations as f64 / self.duration_s.max(1e-9)
    }
}

/// The booted rig, booted again when a program broke it (or left a lockdep or kmemleak report,
/// which the kernel makes only once).
struct Rigs<'a> {
    campaign: &'a Campaign,
    top: &'a RunDir,
    boots: u32,
    current: Option<(Rig, Fixture)>,
    runs: u64,
}

impl<'a> Rigs<'a> {
    fn get(&mut self) -> Result<(&mut Rig, &mut Fixture)> {
        if self.current.is_none() {
            self.boots += 1;
            let dir = self.top.subdir(&format!("boot-{}", self.boots))?;
            println!(
                "    booting {} under {} (run directory {})",
                self.campaign.kernel,
                self.campaign.rig.accel.name(),
                dir.path.display()
            );
            let mut rig = Rig::boot(&self.campaign.rig, &dir)?;
            println!(
                "    guest agent ready after {:.1} s",
                rig.boot_time.as_secs_f64()
            );
            let fixture = Fixture::set_up(&mut rig, self.campaign.uapi)?;
            if self.campaign.debug {
                kmemleak(&mut rig, KmemleakCommand::Scan)?;
                kmemleak(&mut rig, KmemleakCommand::Clear)?;
            }
            self.current = Some((rig, fixture));
        }
        match self.current.as_mut() {
            Some((rig, fixture)) => Ok((rig, fixture)),
            None => anyhow::bail!("the rig did not boot"),
        }
    }

    fn discard(&mut self) -> Result<()> {
        if let Some((mut rig, fixture)) = self.current.take() {
            if rig.healthy() {
                let _ = fixture.tear_down(&mut rig);
            }
            rig.shutdown()?;
        }
        Ok(())
    }

    /// Runs `program` and judges it; `kmemleak` adds a leak check after it.
    fn run(
        &mut self,
        program: &Program,
        check_leaks: bool,
    ) -> Result<(Execution, Vec<Divergence>)> {
        self.runs += 1;
        let run = self.runs;
        let allowed = self.campaign.allowed_splats.clone();
        let (rig, fixture) = self.get()?;
        let execution = match execute(rig, fixture, program, run) {
            Ok(e) => e,
            Err(e) => {
                process::check_interrupted()?;
                let healthy = rig.healthy();
                let console = rig.console_since(0);
                let qemu = qemu_abort(rig);
                self.discard()?;
                let divergence = Divergence {
                    oracle: "liveness",
                    op: None,
                    signature: if healthy {
                        "liveness: the program's setup or cleanup did not complete".into()
                    } else {
                        "liveness: the guest died".into()
                    },
                    detail: format!("{e:#}"),
                };
                // A report on the console is the finding; the failure it caused is not another.
                let reports = crate::rig::console::reports(&console, &allowed);
                let found = match (reports.first, qemu) {
                    (Some(excerpt), _) => vec![console_divergence(&excerpt)],
                    (None, Some(abort)) => vec![abort],
                    (None, None) => vec![divergence],
                };
                return Ok((empty_execution(), found));
            }
        };
        let mut found = judge(&execution, &allowed);
        if !execution.healthy {
            if let Some(abort) = qemu_abort(rig) {
                found.retain(|d| d.signature != "liveness: the guest died");
                found.push(abort);
            }
        }
        if check_leaks && execution.healthy {
            let (leaks, report) = kmemleak_report(rig)?;
            kmemleak(rig, KmemleakCommand::Clear)?;
            if leaks > 0 {
                found.push(Divergence {
                    oracle: "kmemleak",
                    op: None,
                    signature: "kmemleak: unreferenced objects".into(),
                    detail: report.lines().take(30).collect::<Vec<_>>().join("\n"),
                });
            }
        }
        if !execution.healthy || found.iter().any(|d| d.oracle == "console") {
            self.discard()?;
        }
        Ok((execution, found))
    }

    fn reproduces(&mut self, program: &Program, signature: &str, kmemleak: bool) -> Result<bool> {
        let (_, found) = self.run(program, kmemleak)?;
        Ok(found.iter().any(|d| d.signature == signature))
    }
}

/// QEMU's own abort (an assertion, an error it exits with), from its stderr: a finding in
/// QEMU rather than in the guest's kernel.
fn qemu_abort(rig: &Rig) -> Option<Divergence> {
    let stderr = rig.qemu_stderr_since(0).ok()?;
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.contains("Assertion") || l.contains("Aborted") || l.contains("core dumped"))?;
    let what = line.rsplit_once(": ").map_or(line, |(_, w)| w);
    Some(Divergence {
        oracle: "liveness",
        op: None,
        signature: format!("qemu: {}", what.trim()),
        detail: line.to_string(),
    })
}

fn empty_execution() -> Execution {
    Execution {
        records: Vec::new(),
        resets: Vec::new(),
        events: Vec::new(),
        console: String::new(),
        stopped: None,
        healthy: false,
        took_ms: 0,
    }
}

/// What a program's run exercised, in the model's terms: each operation's kind, the window it
/// ran in or after, and how it came out. A program that adds one joins the corpus.
fn features(execution: &Execution, found: &[Divergence]) -> Vec<String> {
    let mut out: Vec<String> = execution
        .records
        .iter()
        .map(|r| {
            let outcome = match &r.observed {
                Observed::Ok => "ok".to_string(),
                Observed::Errno { errno, .. } => format!("errno {errno}"),
                Observed::Write(w) => format!("{:?}", w.status),
                Observed::Skipped(_) => "skipped".into(),
            };
            format!(
                "{}|{}|{}|{outcome}",
                r.op_value.map_or("cleanup", |op| op.kind()),
                r.window.map_or_else(|| "-".into(), |w| w.name()),
                r.after.map_or_else(|| "-".into(), |w| w.name()),
            )
        })
        .collect();
    out.extend(found.iter().map(|d| d.signature.clone()));
    out
}

/// The corpus on disk: one program a file, named by its content's hash.
struct Corpus {
    dir: PathBuf,
    programs: Vec<Program>,
}

impl Corpus {
    fn load(dir: &Path) -> Result<Corpus> {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating the corpus directory {}", dir.display()))?;
        let mut programs = Vec::new();
        let mut entries: Vec<_> = fs::read_dir(dir)
            .with_context(|| format!("reading the corpus directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "prog"))
            .collect();
        entries.sort();
        for path in entries {
            let text = fs::read_to_string(&path).unwrap_or_default();
            match Program::parse(&text) {
                Ok(p) => {
                    let ops = super::model::repair(&p.ops);
                    if !ops.is_empty() {
                        programs.push(Program { ops });
                    }
                }
                Err(e) => println!(
                    "    corpus: skipping {}: {e} (fix or delete the file)",
                    path.display()
                ),
            }
        }
        Ok(Corpus {
            dir: dir.to_path_buf(),
            programs,
        })
    }

    fn add(&mut self, program: &Program) -> Result<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        program.hash(&mut h);
        let path = self.dir.join(format!("{:016x}.prog", h.finish()));
        fs::write(&path, program.to_file("p2prig fuzz corpus program"))
            .with_context(|| format!("writing {}", path.display()))?;
        self.programs.push(program.clone());
        Ok(())
    }
}

/// A campaign on one kernel until its budget is spent or Ctrl-C.
pub fn run(campaign: &Campaign, top: &RunDir) -> Result<FuzzReport> {
    let started = Instant::now();
    let mut corpus = Corpus::load(&campaign.corpus_dir)?;
    println!(
        "fuzz: {} programs in the corpus ({})",
        corpus.programs.len(),
        campaign.corpus_dir.display()
    );
    let mut generator = Generator::new(campaign.seed);
    let mut choice = SplitMix64(campaign.seed ^ 0x636f_7270_7573);
    let mut rigs = Rigs {
        campaign,
        top,
        boots: 0,
        current: None,
        runs: 0,
    };
    let mut report = FuzzReport {
        kernel: campaign.kernel.clone(),
        accel: campaign.rig.accel.name().to_string(),
        seed: campaign.seed,
        ..FuzzReport::default()
    };
    let mut seen: HashSet<String> = HashSet::new();
    let mut by_signature: BTreeMap<String, usize> = BTreeMap::new();
    let mut since_kmemleak: Vec<Program> = Vec::new();
    let mut last_progress = Instant::now();
    let outcome = (|| -> Result<()> {
        while !spent(campaign.budget, started, report.programs) {
            process::check_interrupted()?;
            let program = if corpus.programs.is_empty() || choice.below(100) < FRESH_PERCENT {
                generator.program()
            } else {
                let n = corpus.programs.len() as u64;
                let a = &corpus.programs[choice.below(n) as usize];
                let b = &corpus.programs[choice.below(n) as usize];
                generator.mutate(a, Some(b))
            };
            let (execution, mut found) = rigs.run(&program, false)?;
            report.programs += 1;
            report.operations += execution.records.len() as u64;
            if campaign.debug {
                since_kmemleak.push(program.clone());
                if since_kmemleak.len() >= KMEMLEAK_EVERY {
                    report.kmemleak_checks += 1;
                    if let Some(leak) = kmemleak_culprit(&mut rigs, &mut since_kmemleak)? {
                        found.push(leak.1);
                        record_finding(
                            campaign,
                            top,
                            &mut rigs,
                            &mut report,
                            &mut by_signature,
                            &leak.0,
                            &found,
                            started,
                        )?;
                        found.clear();
                    }
                }
            }
            let fresh: Vec<String> = features(&execution, &found)
                .into_iter()
                .filter(|f| seen.insert(f.clone()))
                .collect();
            if !fresh.is_empty() && !program.ops.is_empty() {
                corpus.add(&program)?;
            }
            record_finding(
                campaign,
                top,
                &mut rigs,
                &mut report,
                &mut by_signature,
                &program,
                &found,
                started,
            )?;
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                report.duration_s = started.elapsed().as_secs_f64();
                println!(
                    "[{:>5.0} s] {} programs ({:.1}/min), {} ops ({:.2}/s), corpus {}, features {}, findings {}",
                    report.duration_s,
                    report.programs,
                    report.programs_per_min(),
                    report.operations,
                    report.operations_per_s(),
                    corpus.programs.len(),
                    seen.len(),
                    report.findings.len()
                );
            }
        }
        Ok(())
    })();
    report.interrupted = process::interrupted();
    report.duration_s = started.elapsed().as_secs_f64();
    report.corpus = corpus.programs.len();
    report.features = seen.len();
    report.boots = rigs.boots;
    if !report.interrupted {
        rigs.discard()?;
    }
    match outcome {
        Err(e) if !report.interrupted => Err(e),
        _ => Ok(report),
    }
}

fn spent(budget: Budget, started: Instant, programs: u64) -> bool {
    match budget {
        Budget::Time(limit) => started.elapsed() >= limit,
        Budget::Programs(n) => programs >= n,
    }
}

/// After a batch on a debug kernel: kmemleak, and when it reports, the first program of the
/// batch that leaks again alone (each re-run with its own check).
fn kmemleak_culprit(
    rigs: &mut Rigs,
    batch: &mut Vec<Program>,
) -> Result<Option<(Program, Divergence)>> {
    let programs = std::mem::take(batch);
    let (rig, _) = rigs.get()?;
    let (leaks, _) = kmemleak_report(rig)?;
    kmemleak(rig, KmemleakCommand::Clear)?;
    if leaks == 0 {
        return Ok(None);
    }
    println!(
        "    kmemleak reports {leaks} objects: re-running the last {} programs one by one",
        programs.len()
    );
    for program in programs {
        let (_, found) = rigs.run(&program, true)?;
        if let Some(d) = found.into_iter().find(|d| d.oracle == "kmemleak") {
            return Ok(Some((program, d)));
        }
    }
    Ok(None)
}

/// Counts the divergences of one program; a signature seen for the first time becomes a
/// finding: minimised, replayed, saved and printed.
#[allow(clippy::too_many_arguments)]
fn record_finding(
    campaign: &Campaign,
    top: &RunDir,
    rigs: &mut Rigs,
    report: &mut FuzzReport,
    by_signature: &mut BTreeMap<String, usize>,
    program: &Program,
    found: &[Divergence],
    started: Instant,
) -> Result<()> {
    let mut signatures: Vec<&Divergence> = Vec::new();
    for d in found {
        if !signatures.iter().any(|s| s.signature == d.signature) {
            signatures.push(d);
        }
    }
    for d in signatures {
        if let Some(&i) = by_signature.get(&d.signature) {
            report.findings[i].occurrences += 1;
            continue;
        }
        let first_seen_s = started.elapsed().as_secs_f64();
        println!(
            "finding {}: {} (after {first_seen_s:.0} s, program {})",
            report.findings.len() + 1,
            d.signature,
            report.programs
        );
        let kmemleak = d.oracle == "kmemleak";
        let (minimised, runs) = if campaign.minimise {
            minimise(program, MINIMISE_RUNS, |p| {
                rigs.reproduces(p, &d.signature, kmemleak)
            })?
        } else {
            (program.clone(), 0)
        };
        let mut reproduced = 0;
        let replays = if campaign.minimise { REPLAYS } else { 0 };
        for _ in 0..replays {
            if rigs.reproduces(&minimised, &d.signature, kmemleak)? {
                reproduced += 1;
            }
        }
        let n = report.findings.len() + 1;
        let dir = top.subdir(&format!("findings/{n:02}-{}", slug(&d.signature)))?;
        let header = format!(
            "p2prig fuzz finding {n} on {}: {}\nreplay: p2prig fuzz --replay {} --kernel {}",
            campaign.kernel,
            d.signature,
            dir.file("program.txt").display(),
            campaign.kernel
        );
        fs::write(dir.file("program.txt"), minimised.to_file(&header))?;
        fs::write(dir.file("original.txt"), program.to_file(&header))?;
        fs::write(dir.file("detail.txt"), &d.detail)?;
        println!(
            "    minimised to {} operations in {runs} runs, reproduced {reproduced} of {replays} \
             replays:\n{}    {}\n    replay: p2prig fuzz --replay {} --kernel {}",
            minimised.ops.len(),
            minimised.steps(),
            summary(d),
            dir.file("program.txt").display(),
            campaign.kernel
        );
        by_signature.insert(d.signature.clone(), report.findings.len());
        report.findings.push(Finding {
            signature: d.signature.clone(),
            oracle: d.oracle,
            first_seen_s,
            found_by_program: report.programs,
            occurrences: 1,
            detail: d.detail.clone(),
            program: program.to_string(),
            minimised: minimised.to_string(),
            minimised_ops: minimised.ops.len(),
            minimise_runs: runs,
            replays_reproduced: reproduced,
            replays,
            dir: dir.path.clone(),
        });
    }
    Ok(())
}

/// A divergence in one line: a console report's headline, else its detail's first line.
fn summary(d: &Divergence) -> &str {
    if d.oracle == "console" {
        crate::rig::console::headline(&d.detail)
    } else {
        first_line(&d.detail)
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

fn slug(signature: &str) -> String {
    let mut s: String = signature
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    s.trim_matches('-').chars().take(60).collect()
}

/// `--replay FILE`: the program `times` times, each judged; returns each run's divergences.
pub fn replay(
    campaign: &Campaign,
    top: &RunDir,
    program: &Program,
    times: u32,
) -> Result<Vec<Vec<Divergence>>> {
    let mut rigs = Rigs {
        campaign,
        top,
        boots: 0,
        current: None,
        runs: 0,
    };
    let mut all = Vec::new();
    for i in 1..=times {
        let (execution, found) = rigs.run(program, campaign.debug)?;
        println!(
            "replay {i}/{times}: {} operations run",
            execution.records.len()
        );
        for record in &execution.records {
            println!(
                "    {:<28} predicted {:<18} observed {}",
                record.op,
                format!("{:?}", record.predicted),
                serde_json::to_string(&record.observed).unwrap_or_default()
            );
        }
        if found.is_empty() {
            println!("    as the model predicts: no divergence");
        }
        for d in &found {
            println!("    divergence: {}\n      {}", d.signature, summary(d));
        }
        fs::write(
            top.file(&format!("replay-{i}.json")),
            serde_json::to_string_pretty(&(&execution, &found))?,
        )?;
        all.push(found);
    }
    rigs.discard()?;
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_short_lowercase_words() {
        assert_eq!(
            slug("write in reset-flr: predicted refused, completed and landed"),
            "write-in-reset-flr-predicted-refused-completed-and-landed"
        );
    }

    #[test]
    fn a_corpus_keeps_its_programs_and_skips_a_bad_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut corpus = Corpus::load(dir.path())?;
        let program = Program::parse("export 0 doorbell\nreg 0 0\nwrite 0 0\n").expect("valid");
        corpus.add(&program)?;
        fs::write(dir.path().join("bad.prog"), "reboot now\n")?;
        let again = Corpus::load(dir.path())?;
        assert_eq!(again.programs, [program]);
        Ok(())
    }
}
