//! `p2prig`: builds the rig (QEMU, guest kernels, initramfs), boots it, runs scenarios and
//! reports which dma-buf revoke guarantees hold on which kernel.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod build;
mod doctor;
mod rig;
mod run;
mod scenarios;

use accel::AccelChoice;
use build::{cache, image, kernel, qemu, rdma_core};
use cache::Cache;
use kernel::{BuildTarget, FlavorSpec, KernelChoice};
use report::RunReport;
use rig::{accel, paths, process};
use rig::{RigConfig, RunDir};
use run::{bench, expectations, github, html, list, report, runner};

#[derive(Debug, Parser)]
#[command(
    name = "p2prig",
    version,
    about = "Reproduce PCI peer-to-peer dma-buf revoke bugs under QEMU, without the hardware"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build (or find in the cache) QEMU, guest kernels and the initramfs.
    Build {
        #[command(subcommand)]
        what: BuildWhat,
    },
    /// Boot the rig on a kernel and run a scenario.
    Run(RunArgs),
    /// List the scenarios, the kernel flavors, the known defects and what each scenario is
    /// expected to do on each flavor and variant.
    List {
        /// Print it as JSON (scenarios x flavors x variants with defect ids and checks).
        #[arg(long)]
        json: bool,
    },
    /// Check every prerequisite (tools, QEMU, KVM, kernel sources, disk space) and print the
    /// command that fixes each missing one; builds nothing. Exit 1 if a run would fail.
    Doctor,
    /// Measure the rig's performance figures in one boot (boot time, RDMA WRITE latency and
    /// throughput into ordinary and CMB memory, in-guest loopback); reports, asserts nothing.
    Bench(BenchArgs),
}

#[derive(Debug, Subcommand)]
enum BuildWhat {
    /// QEMU 10.2.2 with the vfio-user client (QEMU=/path uses an existing one).
    Qemu,
    /// A guest kernel: FLAVOR[:tiny|debug] (v1, upstream:debug), `all` (every flavor in both
    /// variants) or src:PATH[:debug] (your Linux tree, built out of tree in the cache with
    /// p2prig's config fragments and no patches).
    Kernel { spec: BuildTarget },
    /// libibverbs and the rxe provider (rdma-core with guest-image/rdma-core/*.patch).
    RdmaCore,
    /// The initramfs with the guest agent as /init, libibverbs and the rxe provider.
    Image,
    /// Print the cache key of QEMU, rdma-core and each given kernel (default: every flavor
    /// in both variants) without building anything: CI derives its cache key from these.
    Keys {
        #[arg(long = "kernel")]
        kernels: Vec<FlavorSpec>,
    },
    /// QEMU, rdma-core, the initramfs and the given kernels (default: v1).
    All {
        #[arg(long = "kernel", default_value = "v1")]
        kernels: Vec<FlavorSpec>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Kernel to boot: a flavor[:variant] (v1, v1-fixed:debug, upstream), src:PATH[:debug]
    /// (your Linux tree, built out of tree with p2prig's config fragments, no patches) or a
    /// path to your own bzImage (its embedded config is checked first); repeat for several,
    /// each gets its own boot. Default: v1, unless --kernel-src is given.
    #[arg(long = "kernel")]
    kernels: Vec<KernelChoice>,
    /// Your Linux tree: the same as `--kernel src:PATH` (built out of tree in the cache with
    /// p2prig's config fragments; your patches are what is tested, expected to pass all).
    #[arg(long = "kernel-src", value_name = "PATH")]
    kernel_src: Vec<PathBuf>,
    /// Also boot each kernel's debug variant (KASAN, kmemleak, lockdep) for the selected
    /// scenarios that need one (map-leak); they are then not listed as skipped on the others.
    #[arg(long)]
    debug_variants: bool,
    /// Run the whole selection this many times in a row and report any scenario whose
    /// outcome differs between runs (a flake); exit 1 if one does.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    /// Scenarios to run: a name, a glob (`revoke-*`) or a comma-separated list.
    #[arg(long, default_value = "*")]
    scenario: String,
    /// Count every failure, including those expected on a flavor (known defects).
    #[arg(long)]
    strict: bool,
    /// Accelerator: auto probes KVM once and falls back to TCG.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// Also write JUnit XML here (it is always written into the run directory).
    #[arg(long)]
    junit: Option<PathBuf>,
    /// Seconds the guest gets to boot to a ready agent.
    #[arg(long, default_value_t = 300)]
    boot_timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// Seed of the randomised scenarios (release-races), decimal or 0x-hex; a run prints the
    /// one it used (default: a fresh one per run).
    #[arg(long, value_parser = parse_seed)]
    seed: Option<u64>,
}

fn parse_seed(text: &str) -> std::result::Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("`{text}` is not a 64-bit seed (decimal or 0x-hex): {e}"))
}

/// A fresh seed when none is given: the clock and the pid, mixed.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Kernel to boot (needs the rxe dma-buf importer).
    #[arg(long, default_value = "v1-fixed")]
    kernel: KernelChoice,
    /// Samples per latency figure.
    #[arg(long, default_value_t = 50)]
    iterations: u32,
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelChoice,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = process::install_signal_handlers() {
        eprintln!("p2prig: {e:#}");
        return ExitCode::from(2);
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            if process::interrupted() {
                eprintln!("p2prig: interrupted; child processes stopped");
                return ExitCode::from(130);
            }
            eprintln!("p2prig: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let cache = Cache::from_env()?;
    match cli.command {
        Cmd::Build { what } => {
            let started = Instant::now();
            match what {
                BuildWhat::Qemu => println!("{}", qemu::build(&cache)?.binary.display()),
                BuildWhat::Kernel {
                    spec: BuildTarget::Flavor(spec),
                } => println!("{}", kernel::build(&cache, &spec)?.bzimage.display()),
                BuildWhat::Kernel {
                    spec: BuildTarget::Source(tree),
                } => println!("{}", kernel::build_tree(&cache, &tree)?.bzimage.display()),
                BuildWhat::Kernel {
                    spec: BuildTarget::All,
                } => {
                    for spec in kernel::all_specs()? {
                        let built = Instant::now();
                        let kernel = kernel::build(&cache, &spec)?;
                        println!(
                            "kernel  {spec:<16} {} ({:.1} s)",
                            kernel.bzimage.display(),
                            built.elapsed().as_secs_f64()
                        );
                    }
                }
                BuildWhat::RdmaCore => println!("{}", rdma_core::build(&cache)?.dir.display()),
                BuildWhat::Keys { kernels } => {
                    let kernels = if kernels.is_empty() {
                        kernel::all_specs()?
                    } else {
                        kernels
                    };
                    for line in build::cache_keys(&kernels)? {
                        println!("{line}");
                    }
                    // Nothing was built: no "build finished" line on stderr.
                    return Ok(ExitCode::SUCCESS);
                }
                BuildWhat::Image => println!("{}", image::build(&cache)?.initramfs.display()),
                BuildWhat::All { kernels } => {
                    println!("qemu    {}", qemu::build(&cache)?.binary.display());
                    println!("rdma    {}", rdma_core::build(&cache)?.dir.display());
                    for spec in &kernels {
                        println!(
                            "kernel  {spec:<16} {}",
                            kernel::build(&cache, spec)?.bzimage.display()
                        );
                    }
                    println!("image   {}", image::build(&cache)?.initramfs.display());
                }
            }
            eprintln!("build finished in {:.1} s", started.elapsed().as_secs_f64());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List { json } => {
            list::print(json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Doctor => Ok(if doctor::print(&doctor::examine(&cache)) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Cmd::Run(args) => run(&cache, args),
        Cmd::Bench(args) => bench(&cache, args),
    }
}

fn run(cache: &Cache, args: RunArgs) -> Result<ExitCode> {
    // A bad flavor or defects file stops the run before anything is built.
    expectations::get()?;
    let scenarios = scenarios::select(&args.scenario)?;
    let kernels = kernels_of(&args)?;
    let boots = runner::boots(&kernels, &scenarios, args.debug_variants);
    if boots.is_empty() {
        anyhow::bail!(
            "nothing to run: `{}` selects only debug scenarios; add --debug-variants or a \
             FLAVOR:debug kernel",
            args.scenario
        );
    }
    let qemu = qemu::build(cache)?;
    let image = image::build(cache)?;
    let first_kernel = kernel::resolve(cache, &boots[0].0)?;
    let accel = accel::resolve(args.accel, cache, &qemu.binary, &first_kernel.bzimage)?;
    let plan = runner::RunPlan {
        boots,
        strict: args.strict,
        seed: args.seed.unwrap_or_else(fresh_seed),
        rig: RigConfig {
            qemu: qemu.binary,
            bzimage: first_kernel.bzimage,
            initramfs: Some(image.initramfs),
            nvme_cmb: paths::workspace_binary("nvme-cmb")?,
            roce_target: paths::workspace_binary("roce-target")?,
            accel,
            memory_mib: args.memory,
            boot_timeout: Duration::from_secs(args.boot_timeout),
            extra_cmdline: String::new(),
        },
    };
    let label = match args.scenario.as_str() {
        "*" => "all".to_string(),
        pattern => pattern.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"),
    };
    let top = RunDir::create(&label)?;
    println!("run directory: {}", top.path.display());
    println!(
        "seed {:#x} (replay the random timing with --seed {:#x})",
        plan.seed, plan.seed
    );
    let mut reports = Vec::new();
    for repetition in 1..=args.repeat {
        let repetition_dir = if args.repeat == 1 {
            None
        } else {
            println!("repetition {repetition}/{}", args.repeat);
            Some(top.subdir(&format!("repetition-{repetition}"))?)
        };
        let dir = repetition_dir.as_ref().unwrap_or(&top);
        let report = runner::run(cache, &plan, dir)?;
        report.write_junit(&dir.file("junit.xml"))?;
        report.write_json(&dir.file("results.json"))?;
        html::write(&report, &dir.file("report.html"))?;
        let summary = github::summary_markdown(&report);
        std::fs::write(dir.file("summary.md"), &summary)
            .with_context(|| format!("writing {}", dir.file("summary.md").display()))?;
        if let Some(path) = &args.junit {
            report.write_junit(path)?;
        }
        summarize(&report, dir);
        tell_github_actions(&report, &summary)?;
        reports.push(report);
    }
    let flakes = report::flakes(&reports);
    if args.repeat > 1 {
        if flakes.is_empty() {
            println!(
                "{} repetitions, identical outcomes in every one",
                args.repeat
            );
        } else {
            println!("outcomes differ between repetitions (flakes):");
            for flake in &flakes {
                println!("  {flake}");
            }
        }
    }
    Ok(
        if flakes.is_empty() && reports.iter().all(RunReport::all_match) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

/// Under GitHub Actions: the job summary appended to $GITHUB_STEP_SUMMARY and an `::error`
/// annotation per mismatch on stdout.
fn tell_github_actions(report: &RunReport, summary: &str) -> Result<()> {
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
            .and_then(|mut f| f.write_all(summary.as_bytes()))
            .with_context(|| {
                format!(
                    "appending the job summary to GITHUB_STEP_SUMMARY={}",
                    PathBuf::from(&path).display()
                )
            })?;
    }
    Ok(())
}

/// The kernels a run boots: every --kernel, then every --kernel-src; v1 when none is given.
fn kernels_of(args: &RunArgs) -> Result<Vec<KernelChoice>> {
    let mut kernels = args.kernels.clone();
    for path in &args.kernel_src {
        kernels.push(format!("src:{}", path.display()).parse()?);
    }
    if kernels.is_empty() {
        kernels.push("v1".parse()?);
    }
    Ok(kernels)
}

/// The end of one run on the terminal: boots, the table, per-kernel suite time, the verdict.
fn summarize(report: &RunReport, dir: &RunDir) {
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
        dir.file("report.html").display()
    );
}

fn bench(cache: &Cache, args: BenchArgs) -> Result<ExitCode> {
    let qemu = qemu::build(cache)?;
    let image = image::build(cache)?;
    let kernel = kernel::resolve(cache, &args.kernel)?;
    let accel = accel::resolve(args.accel, cache, &qemu.binary, &kernel.bzimage)?;
    let cfg = RigConfig {
        qemu: qemu.binary,
        bzimage: kernel.bzimage.clone(),
        initramfs: Some(image.initramfs),
        nvme_cmb: paths::workspace_binary("nvme-cmb")?,
        roce_target: paths::workspace_binary("roce-target")?,
        accel,
        memory_mib: 1024,
        boot_timeout: Duration::from_secs(300),
        extra_cmdline: String::new(),
    };
    let top = RunDir::create("bench")?;
    println!(
        "bench on {} under {} (run directory {})",
        args.kernel,
        accel.name(),
        top.path.display()
    );
    let mut rig = rig::Rig::boot(&cfg, &top)?;
    let env = scenarios::ScenarioEnv {
        uapi: kernel.uapi,
        debug: kernel.debug,
        seed: 0,
    };
    let figures = bench::run(&mut rig, &env, args.iterations)?;
    rig.shutdown()?;
    for f in &figures {
        println!("  {:<72} {}", f.name, f.value);
    }
    std::fs::write(
        top.file("bench.json"),
        serde_json::to_string_pretty(&figures)?,
    )?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{bail, Context};
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_to_every_scenario_on_v1_auto() -> Result<()> {
        let cli = Cli::try_parse_from(["p2prig", "run"]).context("parses")?;
        let Cmd::Run(args) = cli.command else {
            bail!("not run")
        };
        let kernels = kernels_of(&args)?;
        assert_eq!(kernels.len(), 1);
        assert_eq!(kernels[0].to_string(), "v1:tiny");
        assert_eq!(args.scenario, "*");
        assert_eq!(args.accel, AccelChoice::Auto);
        assert_eq!((args.repeat, args.debug_variants), (1, false));
        Ok(())
    }

    #[test]
    fn kernel_src_is_a_source_tree_and_replaces_the_default() -> Result<()> {
        let tree = tempfile::tempdir()?;
        std::fs::write(tree.path().join("Makefile"), "")?;
        std::fs::write(tree.path().join("Kconfig"), "")?;
        let path = tree.path().to_str().context("utf-8 temp path")?;
        let cli = Cli::try_parse_from(["p2prig", "run", "--kernel-src", path])?;
        let Cmd::Run(args) = cli.command else {
            bail!("not run")
        };
        let kernels = kernels_of(&args)?;
        assert_eq!(kernels.len(), 1);
        let expected = tree.path().canonicalize()?;
        assert!(matches!(&kernels[0], KernelChoice::Source(t) if t.path == expected));
        Ok(())
    }

    #[test]
    fn seeds_parse_in_decimal_and_hex_and_bad_ones_say_why() {
        assert_eq!(parse_seed("42"), Ok(42));
        assert_eq!(parse_seed("0x5eed"), Ok(0x5eed));
        assert!(parse_seed("0xzz").is_err_and(|e| e.contains("0x-hex")));
        assert!(Cli::try_parse_from(["p2prig", "run", "--repeat", "0"]).is_err());
    }

    #[test]
    fn build_kernel_accepts_all() -> Result<()> {
        let cli = Cli::try_parse_from(["p2prig", "build", "kernel", "all"]).context("parses")?;
        let Cmd::Build {
            what: BuildWhat::Kernel { spec },
        } = cli.command
        else {
            bail!("not build kernel")
        };
        assert_eq!(spec, BuildTarget::All);
        Ok(())
    }
}
