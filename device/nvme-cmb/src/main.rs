//! `nvme-cmb`: serves the NVMe-CMB PCI function over vfio-user until SIGTERM/SIGINT.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use nvme_cmb::cmb::{MAX_CMB_SIZE, MIN_CMB_SIZE};
use nvme_cmb::control::ControlSocket;
use nvme_cmb::nvme_regs::MAX_QUEUE_PAIRS;
use nvme_cmb::server::Endpoint;
use nvme_cmb::{CmbMode, Device, DeviceSettings, EventLog};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CmbModeArg {
    /// Every CMB access is a vfio-user message and an event.
    Trap,
    /// QEMU maps the CMB memfd (sparse mmap area); the device sees contents, not accesses.
    /// QEMU then sends every trapped BAR write synchronously.
    Mmap,
}

/// vfio-user server presenting an NVMe function with a controller memory buffer (CMB);
/// every BAR access, config write, reset and violation is recorded as an event.
///
/// Start it, wait until both sockets exist, then attach QEMU with
/// `-device '{"driver":"vfio-user-pci","socket":{"path":"<SOCKET>","type":"unix"}}'`.
/// It serves one QEMU after another; SIGTERM or SIGINT removes the sockets and exits 0.
#[derive(Debug, Parser)]
#[command(name = "nvme-cmb", version)]
struct Cli {
    /// Path of the vfio-user socket to listen on (a stale socket there is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Path of the control socket: JSON lines such as
    /// {"id":1,"op":"events_since","since":0,"limit":100} (see README.md for every op).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,

    /// Trace file, truncated at start; every event is appended as one JSON line the
    /// moment it is recorded.
    #[arg(long, value_name = "PATH")]
    trace: PathBuf,

    /// Number of queue pairs with doorbells, 1 to 1536 (SQyTDBL at 0x1000 + 8y, CQyHDBL at
    /// +4).
    #[arg(long, default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=MAX_QUEUE_PAIRS as i64))]
    queues: u32,

    /// CMB (BAR2) size: a power of two from 64K to 256M; K, M, G suffixes are binary.
    #[arg(long, default_value = "1M", value_name = "SIZE", value_parser = parse_size)]
    cmb_size: u64,

    /// How QEMU reaches the CMB.
    #[arg(long, value_enum, default_value = "trap")]
    cmb_mode: CmbModeArg,

    /// How long every reset lasts, in ms: config reads return all-ones and BAR accesses
    /// are violations until it ends. VFIO_USER_DEVICE_RESET is answered when the reset is
    /// over, so keep this below QEMU's x-msg-timeout (5000 ms by default).
    #[arg(long, default_value_t = 0, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    reset_ms: u64,

    /// Delay from CC.EN 0 -> 1 to CSTS.RDY 1, in ms.
    #[arg(long, default_value_t = 0, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(0..=600_000))]
    rdy_delay_ms: u64,

    /// Events kept in memory for control-socket queries (the trace file keeps all).
    #[arg(long, default_value_t = 262_144, value_name = "N")]
    event_ring: usize,
}

/// Parses "1048576", "64K", "1M", "256M" (binary units).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 10),
        Some((i, 'm' | 'M')) => (&text[..i], 20),
        Some((i, 'g' | 'G')) => (&text[..i], 30),
        _ => (text, 0),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 1M or 65536"))?;
    let size = number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text} is too large"))?;
    if !size.is_power_of_two() || !(MIN_CMB_SIZE..=MAX_CMB_SIZE).contains(&size) {
        return Err(format!("{text} is not a power of two between 64K and 256M"));
    }
    Ok(size)
}

/// Blocks SIGTERM and SIGINT in this thread (and every thread it starts later) and returns
/// the set, for a dedicated thread to sigwait on.
fn block_exit_signals() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; the calls only write to it and
    // to this thread's signal mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        bail!("blocking SIGTERM/SIGINT failed (error {rc})");
    }
    Ok(set)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let signals = block_exit_signals()?;

    let trace = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&cli.trace)
        .with_context(|| format!("opening the trace file {}", cli.trace.display()))?;
    let log = Arc::new(EventLog::new(cli.event_ring, Some(trace)));
    let settings = DeviceSettings {
        queue_pairs: cli.queues,
        cmb_size: cli.cmb_size,
        cmb_mode: match cli.cmb_mode {
            CmbModeArg::Trap => CmbMode::Trap,
            CmbModeArg::Mmap => CmbMode::Mmap,
        },
        reset_ms: cli.reset_ms,
        ready_delay_ms: cli.rdy_delay_ms,
    };
    let device = Device::new(settings, Arc::clone(&log)).context("creating the CMB")?;

    let control = ControlSocket::bind(&cli.control).context("creating the control socket")?;
    let endpoint = Endpoint::bind(&cli.socket, &device).context("creating the vfio-user socket")?;
    let sockets = [cli.control.clone(), cli.socket.clone()];

    let stop = Arc::new(AtomicBool::new(false));
    {
        let device = Arc::clone(&device);
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || control.serve(&device, &stop))
            .context("starting the control socket thread")?;
    }
    {
        let device = Arc::clone(&device);
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("vfio-user".into())
            .spawn(move || endpoint.serve(&device, &stop))
            .context("starting the vfio-user thread")?;
    }
    eprintln!(
        "nvme-cmb: serving {} (control {}, trace {})",
        cli.socket.display(),
        cli.control.display(),
        cli.trace.display()
    );

    let mut signal: libc::c_int = 0;
    // SAFETY: `signals` is an initialised set and `signal` a valid out pointer.
    let rc = unsafe { libc::sigwait(&signals, &mut signal) };
    if rc != 0 {
        bail!("waiting for SIGTERM/SIGINT failed (error {rc})");
    }
    for path in &sockets {
        let _ = std::fs::remove_file(path);
    }
    eprintln!("nvme-cmb: signal {signal}, exiting");
    // Exit while holding the log still, so no trace line is cut in half.
    let _quiet = log.quiesce();
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("268435456"), Ok(256 << 20));
        assert!(parse_size("3M").is_err());
        assert!(parse_size("512M").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
