//! guest-agent: PID 1 of the p2prig guest. Mounts the basics, finds its virtio-serial port,
//! announces itself and serves the JSON-lines RPC of `p2prig_protocol::agent` forever.
//!
//! Outside a guest (`--stdio`, or any PID other than 1) it serves stdin/stdout and exits at
//! EOF, which is how it is debugged and integration-tested on a host.

mod describe;
mod dispatch;
mod edu;
mod error;
#[cfg(test)]
mod fake;
mod iommufd;
mod iommufd_ops;
mod kmsg;
mod log;
mod mmio;
mod net;
mod netlink;
mod pid1;
mod platform;
mod port;
mod rdma;
mod rdma_ops;
mod rpc;
mod sysfs;
mod verbs;
mod vfio;

use std::path::PathBuf;

use clap::Parser;

use crate::dispatch::Agent;
use crate::platform::LinuxPlatform;
use crate::sysfs::SystemPaths;

/// Name QEMU gives the agent's port (`-device virtserialport,name=...`).
pub const PORT_NAME: &str = "p2prig.agent";

#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Serve requests on stdin/stdout instead of the virtio-serial port; exit at EOF.
    #[arg(long)]
    stdio: bool,
    /// Serve on this character device instead of looking the port up by name.
    #[arg(long, value_name = "PATH", conflicts_with = "stdio")]
    port: Option<PathBuf>,
    /// Name of the virtio-serial port to look up in /sys/class/virtio-ports.
    #[arg(long, default_value = PORT_NAME)]
    port_name: String,
    /// Where sysfs is mounted (tests point this at a fake tree).
    #[arg(long, default_value = "/sys")]
    sys: PathBuf,
    /// Where devtmpfs is mounted.
    #[arg(long, default_value = "/dev")]
    dev: PathBuf,
}

fn main() {
    pid1::install_panic_hook();
    // SAFETY: getpid has no preconditions.
    let is_init = unsafe { libc::getpid() } == 1;
    // The kernel passes init its command line's extra words; clap would refuse them, and a
    // PID 1 that exits on a usage error panics the kernel, so init ignores its arguments.
    let cli = if is_init {
        Cli::parse_from(["guest-agent"])
    } else {
        Cli::parse()
    };
    if is_init {
        pid1::mount_filesystems();
        if let Err(error) = log::use_console("/dev/console") {
            agent_log!("cannot open /dev/console ({error}); logging to stderr");
        }
        pid1::start_reaper();
        pid1::boot_network();
    }
    agent_log!(
        "guest-agent {} starting as pid {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    match run(&cli, is_init) {
        Ok(()) => {}
        Err(error) => agent_log!("stopping: {error:#}"),
    }
    if is_init {
        pid1::power_off(true);
    }
}

fn run(cli: &Cli, is_init: bool) -> anyhow::Result<()> {
    let paths = SystemPaths {
        sys: cli.sys.clone(),
        dev: cli.dev.clone(),
        proc: PathBuf::from("/proc"),
    };
    let agent = Agent::new(LinuxPlatform {
        paths: paths.clone(),
        is_init,
        verbs: Default::default(),
    });
    if cli.stdio {
        let end = rpc::serve(&agent, std::io::stdin().lock(), std::io::stdout());
        agent_log!("stdin closed ({end:?})");
        return Ok(());
    }
    let locate = match &cli.port {
        Some(path) => port::Locate::Path(path.clone()),
        None => port::Locate::Name {
            paths,
            name: cli.port_name.clone(),
        },
    };
    port::serve_forever(&agent, &locate)
}
