//! `nvme-cmb`: serves the NVMe-CMB PCI function over vfio-user until SIGTERM/SIGINT.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use device_support::{create_private_file, ExitSignals};
use nvme_cmb::cmb::{MAX_CMB_SIZE, MIN_CMB_SIZE};
use nvme_cmb::control::ControlSocket;
use nvme_cmb::nvme_regs::MAX_QUEUE_PAIRS;
use nvme_cmb::server::{bind_unix, Endpoint};
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
    /// Path of the vfio-user socket to listen on, mode 0600 (a stale socket there is
    /// replaced; one another instance serves is refused, and so is any other file).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Path of the control socket: JSON lines such as
    /// {"id":1,"op":"events_since","since":0,"limit":100} (see README.md for every op).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,

    /// Trace file, mode 0600, truncated at start (after both sockets are bound; a symlink or
    /// FIFO is refused); every event is appended as one JSON line the moment it is recorded.
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

/// Opens (truncates) the trace, builds the device and serves it on `listener`.
fn start_device(
    cli: &Cli,
    listener: UnixListener,
) -> Result<(Arc<Device>, Endpoint, Arc<EventLog>)> {
    let trace = create_private_file(&cli.trace, true)
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
    let endpoint = Endpoint::from_listener(listener, &cli.socket);
    Ok((device, endpoint, log))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let signals = ExitSignals::block()?;

    // Sockets first: a second instance started on a running one's paths must fail here,
    // before it truncates that instance's trace.
    let control = ControlSocket::bind(&cli.control).context("creating the control socket")?;
    let listener = bind_unix(&cli.socket).context("creating the vfio-user socket")?;
    let (device, endpoint, log) = match start_device(&cli, listener) {
        Ok(started) => started,
        Err(e) => {
            // The control socket's Drop removes its file; the bare listener has none.
            let _ = std::fs::remove_file(&cli.socket);
            return Err(e);
        }
    };
    let sockets = [cli.control.clone(), cli.socket.clone()];

    let stop = Arc::new(AtomicBool::new(false));
    {
        let device = Arc::clone(&device);
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || nvme_cmb::control::serve(&control, &device, &stop))
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

    let signal = signals.wait()?;
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
