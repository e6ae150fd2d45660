//! `roce-target`: serves the vhost-user-net backend and the control socket until
//! SIGTERM/SIGINT.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use device_support::ExitSignals;
use roce_target::backend::{
    lock_engine, GuestLink, GuestQueue, NetBackend, SharedEngine, FRAMES_WAITING_EVENT, NUM_QUEUES,
};
use roce_target::control::{bind_unix, ControlContext, ControlSocket};
use roce_target::frame::parse_mac;
use roce_target::proxy::filter_connection;
use roce_target::{Engine, EngineConfig};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// vhost-user-net backend that is the remote RoCEv2 peer of the guest's rxe: it answers
/// ARP for its address and speaks RC (RDMA WRITE, READ, SEND) over UDP 4791.
///
/// Start it, wait until both sockets exist, then attach QEMU with
/// `-chardev socket,id=net0,path=<SOCKET> -netdev vhost-user,id=n0,chardev=net0
/// -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56` (guest RAM must be a shared
/// memfd). It serves one QEMU connection after another; SIGTERM or SIGINT removes the
/// sockets and exits 0.
#[derive(Debug, Parser)]
#[command(name = "roce-target", version)]
struct Cli {
    /// Path of the vhost-user socket to listen on, mode 0600 (a stale socket there is
    /// replaced; one another instance serves is refused, and so is any other file).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Path of the control socket: JSON lines such as {"id":1,"op":"create_qp"}
    /// (see README.md for every op).
    #[arg(long, value_name = "PATH")]
    control: PathBuf,

    /// Directory for pcap captures started with the pcap_start op (one file per capture).
    #[arg(long, value_name = "DIR")]
    pcap_dir: Option<PathBuf>,

    /// Start a capture to <pcap-dir>/<NAME> right away, before QEMU connects.
    #[arg(long, value_name = "NAME", requires = "pcap_dir")]
    pcap: Option<String>,

    /// The target's MAC address on the virtual link.
    #[arg(long, default_value = "52:54:00:00:00:02", value_parser = mac_arg)]
    mac: [u8; 6],

    /// The target's IPv4 address (its RoCE v2 GID is ::ffff:<ip>).
    #[arg(long, default_value = "10.0.2.2")]
    ip: Ipv4Addr,
}

fn mac_arg(text: &str) -> Result<[u8; 6], String> {
    parse_mac(text).ok_or_else(|| format!("{text:?} is not a MAC like 52:54:00:00:00:02"))
}

/// Serves QEMU connections one after another, for ever: a guest reboot or a QEMU restart
/// is just the next connection.
fn serve_vhost_user(
    mut backend_listener: Listener,
    backend: NetBackend,
    queue: Arc<GuestQueue>,
    connections: Arc<AtomicU64>,
) {
    loop {
        let daemon = VhostUserDaemon::new(
            "roce-target-vhost".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        );
        let mut daemon = match daemon {
            Ok(daemon) => daemon,
            Err(e) => {
                eprintln!("roce-target: creating the vhost-user daemon: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let handlers = daemon.get_epoll_handlers();
        for handler in &handlers {
            if let Err(e) = handler.register_listener(
                queue.event().as_raw_fd(),
                EventSet::IN,
                u64::from(FRAMES_WAITING_EVENT),
            ) {
                eprintln!("roce-target: registering the frame eventfd: {e}");
            }
        }
        if let Err(e) = daemon.start(&mut backend_listener) {
            eprintln!("roce-target: accepting a vhost-user connection: {e}");
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let n = connections.fetch_add(1, Ordering::Relaxed) + 1;
        eprintln!("roce-target: vhost-user connection {n} up");
        match daemon.wait() {
            Ok(()) => eprintln!("roce-target: vhost-user connection {n} closed"),
            Err(e) => eprintln!("roce-target: vhost-user connection {n} ended: {e}"),
        }
        for handler in &handlers {
            handler.send_exit_event();
        }
        backend.disconnected();
    }
}

/// Creates the pcap directory and starts the `--pcap` capture, when asked for.
fn start_capture(cli: &Cli, engine: &SharedEngine) -> Result<()> {
    if let Some(dir) = &cli.pcap_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the pcap directory {}", dir.display()))?;
        if let Some(name) = &cli.pcap {
            lock_engine(engine)
                .pcap_start(dir, Some(name))
                .with_context(|| format!("starting the capture {name}"))?;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let signals = ExitSignals::block()?;

    let queue = Arc::new(GuestQueue::new().context("creating the frame eventfd")?);
    let config = EngineConfig {
        mac: cli.mac,
        ip: cli.ip,
    };
    let engine: SharedEngine = Arc::new(Mutex::new(Engine::new(
        config,
        Box::new(GuestLink(Arc::clone(&queue))),
    )));
    let connections = Arc::new(AtomicU64::new(0));
    let context = ControlContext {
        engine: Arc::clone(&engine),
        pcap_dir: cli.pcap_dir.clone(),
        connections: Arc::clone(&connections),
    };
    let control = ControlSocket::bind(&cli.control)
        .with_context(|| format!("creating the control socket {}", cli.control.display()))?;
    let socket = cli
        .socket
        .to_str()
        .with_context(|| format!("{} is not UTF-8", cli.socket.display()))?;
    // QEMU connects to `socket`, served by the filter in `proxy`; the vhost crate's handler
    // listens next to it on `<socket>.backend`. The socket QEMU sees is bound (and checked
    // for a running instance) first.
    let backend_socket = format!("{socket}.backend");
    let front = bind_unix(&cli.socket)
        .with_context(|| format!("creating the vhost-user socket {socket}"))?;
    let backend_listener = match bind_unix(Path::new(&backend_socket)) {
        // From a plain listener the crate's Listener never unlinks the path: the
        // clean-up below, on SIGTERM, is the one place that removes our sockets.
        Ok(listener) => Listener::from(listener),
        Err(e) => {
            let _ = std::fs::remove_file(&cli.socket);
            return Err(e)
                .with_context(|| format!("creating the inner vhost-user socket {backend_socket}"));
        }
    };
    // After the sockets: a second instance started by mistake fails on them before it can
    // truncate the running instance's capture.
    if let Err(e) = start_capture(&cli, &engine) {
        for path in [&cli.socket, &PathBuf::from(&backend_socket)] {
            let _ = std::fs::remove_file(path);
        }
        return Err(e);
    }
    let backend = NetBackend::new(Arc::clone(&engine), Arc::clone(&queue), cli.mac);

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("control-accept".into())
            .spawn(move || roce_target::control::serve(&control, &context, &stop))
            .context("starting the control socket thread")?;
    }
    {
        let queue = Arc::clone(&queue);
        std::thread::Builder::new()
            .name("vhost-user".into())
            .spawn(move || serve_vhost_user(backend_listener, backend, queue, connections))
            .context("starting the vhost-user thread")?;
    }
    {
        let backend_socket = PathBuf::from(&backend_socket);
        std::thread::Builder::new()
            .name("vhost-user-filter".into())
            .spawn(move || {
                for stream in front.incoming() {
                    let Ok(stream) = stream else { continue };
                    // One QEMU at a time: the handler serves connections in turn.
                    match filter_connection(stream, &backend_socket, NUM_QUEUES as u32) {
                        Ok(report) if report.early_enables > 0 => eprintln!(
                            "roce-target: answered {} early SET_VRING_ENABLE",
                            report.early_enables
                        ),
                        Ok(_) => {}
                        Err(e) => eprintln!("roce-target: vhost-user relay: {e}"),
                    }
                }
            })
            .context("starting the vhost-user filter thread")?;
    }
    {
        // Retransmission and RNR timers at 1 ms resolution (IBTA timers are coarser).
        let engine = Arc::clone(&engine);
        std::thread::Builder::new()
            .name("timers".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(1));
                lock_engine(&engine).tick(Instant::now());
            })
            .context("starting the timer thread")?;
    }
    eprintln!(
        "roce-target: serving {} (control {}, {} {})",
        cli.socket.display(),
        cli.control.display(),
        cli.ip,
        roce_target::frame::format_mac(cli.mac)
    );

    let signal = signals.wait()?;
    stop.store(true, Ordering::Relaxed);
    let _ = lock_engine(&engine).pcap_stop();
    for path in [&cli.control, &cli.socket, &PathBuf::from(&backend_socket)] {
        let _ = std::fs::remove_file(path);
    }
    eprintln!("roce-target: signal {signal}, exiting");
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn macs_parse() {
        assert_eq!(mac_arg("52:54:00:00:00:02"), Ok([0x52, 0x54, 0, 0, 0, 2]));
        assert!(mac_arg("nope").is_err());
    }
}
