//! `p2prig`: builds the rig (QEMU, guest kernels, initramfs), boots it, runs scenarios and
//! reports which dma-buf revoke guarantees hold on which kernel.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Parser, Subcommand};

mod build;
mod doctor;
mod fuzz;
mod rig;
mod run;
mod scenarios;
mod shell;

use accel::AccelChoice;
use build::{cache, image, kernel, qemu, rdma_core};
use cache::Cache;
use kernel::{BuildTarget, FlavorSpec, KernelChoice};
use report::RunReport;
use rig::{accel, process};
use rig::{RigConfig, RigShape, RunDir};
use run::{bench, expectations, list, outputs, report, runner};

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
    /// Render a run's results.json again: report.html, junit.xml and summary.md in its
    /// directory and the table on the terminal, or KTAP on stdout.
    Report {
        /// A run directory (target/p2prig/runs/...) or its results.json.
        run: PathBuf,
        #[arg(long, value_enum, default_value = "files")]
        format: ReportFormat,
    },
    /// Join the results.json of a run's shards (`run --shard K/N`) into one report in --out,
    /// as if one machine had run them; exit 1 if any outcome is not as expected.
    Merge {
        /// Each shard's results.json (or run directory).
        #[arg(required = true)]
        results: Vec<PathBuf>,
        /// Directory for the merged results.json, junit.xml, report.html and summary.md.
        #[arg(long)]
        out: PathBuf,
    },
    /// Boot the full rig on one kernel with a prompt that runs the guest agent's operations and
    /// the devices' controls by name (`help` lists the syntax); `exit` tears it all down.
    Shell(ShellArgs),
    /// Check every prerequisite (tools, QEMU, KVM, kernel sources, disk space) and print the
    /// command that fixes each missing one; builds nothing. Exit 1 if a run would fail.
    Doctor,
    /// Fuzz the revoke paths: programs of exports, imports, writes, resets, decode and power
    /// changes and closes, generated from a seed and mutated from a corpus, each judged
    /// against a model of the revoke semantics; findings minimised and replayable.
    Fuzz(fuzz::command::FuzzArgs),
    /// Measure the rig's performance figures in one boot (boot time, RDMA WRITE latency and
    /// throughput into ordinary and CMB memory, in-guest loopback); reports, asserts nothing.
    Bench(BenchArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReportFormat {
    /// report.html, junit.xml and summary.md written again, the table printed.
    Files,
    /// KTAP version 1 on stdout, for kselftest-minded tools.
    Ktap,
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
    /// vCPUs of every boot instead of the shape's own choice (2; 1 for the vIOMMU shape under
    /// TCG, see docs/findings/Q1.md).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=8))]
    cpus: Option<u32>,
    /// Seed of the randomised scenarios (release-races), decimal or 0x-hex; a run prints the
    /// one it used (default: a fresh one per run).
    #[arg(long, value_parser = parse_seed)]
    seed: Option<u64>,
    /// Run only shard K of N of the scenario x kernel pairs (contiguous runs of the plan, cut
    /// the same way every time); `p2prig merge` joins the shards' results. Give every shard the
    /// same --seed.
    #[arg(long, value_name = "K/N")]
    shard: Option<runner::Shard>,
    /// A config fragment merged into your tree's configuration (src: kernels only), after
    /// p2prig's; every option in it is checked to hold in the final .config. Repeatable.
    #[arg(long = "config", value_name = "FRAGMENT")]
    config: Vec<PathBuf>,
    /// One option for your tree's configuration, CONFIG_X=y|m|n|value (src: kernels only),
    /// merged last and checked like --config. Repeatable.
    #[arg(long = "configitem", value_name = "CONFIG_X=y")]
    config_items: Vec<build::user_config::ConfigItem>,
    /// A kernel report (WARN, KASAN, lockdep, kmemleak line) matching this regular expression
    /// is known noise: the console checks pass and say it was allowed. Crashes never are.
    /// Repeatable.
    #[arg(long = "allow-splat", value_name = "REGEX")]
    allow_splat: Vec<String>,
}

pub(crate) fn parse_seed(text: &str) -> std::result::Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("`{text}` is not a 64-bit seed (decimal or 0x-hex): {e}"))
}

/// A fresh seed when none is given: the clock and the pid, mixed.
pub(crate) fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

#[derive(Debug, clap::Args)]
struct ShellArgs {
    /// Kernel to boot, as for `run --kernel`.
    #[arg(long, default_value = "v1-fixed")]
    kernel: KernelChoice,
    /// Also start QEMU's gdbstub on a free loopback port (kernel booted with nokaslr) and
    /// print the gdb command line with the matching vmlinux.
    #[arg(long)]
    gdb: bool,
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// Seconds the guest gets to boot to a ready agent.
    #[arg(long, default_value_t = 300)]
    boot_timeout: u64,
    /// The machine: `switch` (no IOMMU, the rxe scenarios' rig) or `viommu` (intel-iommu and
    /// edu, the iommufd scenarios' rig; needs a 7.x kernel).
    #[arg(long, value_enum, default_value = "switch")]
    shape: ShapeChoice,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ShapeChoice {
    Switch,
    Viommu,
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
        Cmd::Report { run, format } => {
            let (dir, report) = read_results(&run)?;
            match format {
                ReportFormat::Ktap => print!("{}", run::ktap::render(&report)),
                ReportFormat::Files => {
                    outputs::write_all(&report, &dir)?;
                    outputs::summarize(&report, &dir);
                }
            }
            Ok(exit_code(report.all_match()))
        }
        Cmd::Merge { results, out } => {
            let inputs = results
                .iter()
                .map(|path| Ok((path.clone(), read_results(path)?.1)))
                .collect::<Result<Vec<_>>>()?;
            let merged = run::merge::merge(&inputs)?;
            std::fs::create_dir_all(&out).map_err(|e| {
                anyhow::anyhow!("creating the merge directory {}: {e}", out.display())
            })?;
            outputs::write_all(&merged, &out)?;
            outputs::summarize(&merged, &out);
            outputs::tell_github_actions(&merged)?;
            Ok(exit_code(merged.all_match()))
        }
        Cmd::Doctor => Ok(if doctor::print(&doctor::examine(&cache)) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Cmd::Run(args) => run(&cache, args),
        Cmd::Shell(args) => shell(&cache, args),
        Cmd::Bench(args) => bench(&cache, args),
        Cmd::Fuzz(args) => fuzz::command::run(&cache, args),
    }
}

fn run(cache: &Cache, args: RunArgs) -> Result<ExitCode> {
    // A bad flavor or defects file, or a bad argument, stops the run before anything is built.
    expectations::get()?;
    let allowed_splats = rig::console::AllowedSplats::new(&args.allow_splat)?;
    let scenarios = scenarios::select(&args.scenario)?;
    let kernels = kernels_of(&args)?;
    let whole = runner::boots(&kernels, &scenarios, args.debug_variants);
    let (boots, shard) = match args.shard {
        None => (whole, None),
        Some(shard) => {
            let part = runner::shard(&whole, shard);
            let of = report::ShardOf {
                index: shard.index,
                count: shard.count,
                kernels: whole.iter().map(|(k, _)| k.to_string()).collect(),
            };
            if part.is_empty() && !whole.is_empty() {
                println!(
                    "shard {}/{}: no scenario x kernel pair falls to this shard (the plan has {})",
                    shard.index,
                    shard.count,
                    whole.iter().map(|(_, s)| s.len()).sum::<usize>()
                );
            }
            (part, Some(of))
        }
    };
    if boots.is_empty() && shard.is_none() {
        anyhow::bail!(
            "nothing to run: `{}` selects only debug scenarios; add --debug-variants or a \
             FLAVOR:debug kernel",
            args.scenario
        );
    }
    let seed = args.seed.unwrap_or_else(fresh_seed);
    if boots.is_empty() {
        // A shard with nothing to do still leaves results, so that `merge` sees every shard.
        let empty = RunReport {
            strict: args.strict,
            shard,
            seed,
            boots: Vec::new(),
            results: Vec::new(),
        };
        let top = RunDir::create("empty-shard")?;
        outputs::write_all(&empty, &top.path)?;
        println!("results (none) in {}", top.path.display());
        return Ok(ExitCode::SUCCESS);
    }
    let qemu = qemu::build(cache)?;
    let image = image::build(cache)?;
    let first_kernel = kernel::resolve(cache, &boots[0].0)?;
    let accel = accel::resolve(args.accel, cache, &qemu.binary, &first_kernel.bzimage)?;
    let plan = runner::RunPlan {
        boots,
        strict: args.strict,
        shard,
        seed,
        allowed_splats,
        rig: RigConfig {
            memory_mib: args.memory,
            cpus: args.cpus,
            boot_timeout: Duration::from_secs(args.boot_timeout),
            ..RigConfig::new(qemu.binary, first_kernel.bzimage, image.initramfs, accel)?
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
        outputs::write_all(&report, &dir.path)?;
        if let Some(path) = &args.junit {
            report.write_junit(path)?;
        }
        outputs::summarize(&report, &dir.path);
        outputs::tell_github_actions(&report)?;
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

/// A run directory or a results.json: the directory and the report read back.
fn read_results(path: &std::path::Path) -> Result<(PathBuf, RunReport)> {
    let (dir, file) = if path.is_dir() {
        (path.to_path_buf(), path.join("results.json"))
    } else {
        let dir = path
            .parent()
            .map_or_else(|| PathBuf::from("."), |p| p.to_path_buf());
        (dir, path.to_path_buf())
    };
    Ok((dir, RunReport::read_json(&file)?))
}

fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The kernels a run boots: every --kernel, then every --kernel-src; v1 when none is given.
/// --config and --configitem go to each source tree, and are an error without one.
fn kernels_of(args: &RunArgs) -> Result<Vec<KernelChoice>> {
    let mut kernels = args.kernels.clone();
    for path in &args.kernel_src {
        kernels.push(format!("src:{}", path.display()).parse()?);
    }
    if kernels.is_empty() {
        kernels.push("v1".parse()?);
    }
    let config = build::user_config::UserConfig {
        fragments: args.config.clone(),
        items: args.config_items.clone(),
    };
    if !config.is_empty() {
        let mut trees = 0;
        for kernel in &mut kernels {
            if let KernelChoice::Source(tree) = kernel {
                tree.config = config.clone();
                trees += 1;
            }
        }
        if trees == 0 {
            anyhow::bail!(
                "--config and --configitem apply to your own tree (--kernel src:PATH or \
                 --kernel-src PATH); a flavor's configuration is its fragments in \
                 kernel-patches/config/"
            );
        }
    }
    Ok(kernels)
}

fn shell(cache: &Cache, args: ShellArgs) -> Result<ExitCode> {
    let qemu = qemu::build(cache)?;
    let image = image::build(cache)?;
    let kernel = kernel::resolve(cache, &args.kernel)?;
    let accel = accel::resolve(args.accel, cache, &qemu.binary, &kernel.bzimage)?;
    let cfg = RigConfig {
        boot_timeout: Duration::from_secs(args.boot_timeout),
        shape: match args.shape {
            ShapeChoice::Switch => RigShape::Switch,
            ShapeChoice::Viommu => RigShape::Viommu,
        },
        ..RigConfig::new(qemu.binary, kernel.bzimage.clone(), image.initramfs, accel)?
    };
    shell::run(cache, cfg, &args.kernel.to_string(), args.gdb)?;
    Ok(ExitCode::SUCCESS)
}

fn bench(cache: &Cache, args: BenchArgs) -> Result<ExitCode> {
    let qemu = qemu::build(cache)?;
    let image = image::build(cache)?;
    let kernel = kernel::resolve(cache, &args.kernel)?;
    let accel = accel::resolve(args.accel, cache, &qemu.binary, &kernel.bzimage)?;
    let cfg = RigConfig::new(qemu.binary, kernel.bzimage.clone(), image.initramfs, accel)?;
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
        allowed_splats: Default::default(),
        accel,
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
