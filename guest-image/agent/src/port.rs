//! The virtio-serial port: find it, wait for the host end, announce, serve, and start over
//! whenever the host goes away.
//!
//! A virtio console port reports POLLHUP while no host side is connected (QEMU's socket
//! chardev without a client) and its reads then return 0 at once, so "EOF" means "host gone
//! for now", never "stop". The banner is written at each (re)connection, so a harness that
//! connects late, or reconnects, always sees `p2prig-agent ready` before its first reply.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use p2prig_protocol::agent::READY_BANNER;

use crate::agent_log;
use crate::dispatch::Agent;
use crate::platform::Platform;
use crate::rpc::{serve, SessionEnd};
use crate::sysfs::SystemPaths;

/// How the port is found.
#[derive(Debug, Clone)]
pub enum Locate {
    /// A given device node.
    Path(PathBuf),
    /// By the name in /sys/class/virtio-ports/*/name (no udev in the guest).
    Name { paths: SystemPaths, name: String },
}

const RETRY: Duration = Duration::from_millis(200);
/// How often a still-failing wait is logged again (the first failure is logged at once).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Rate-limits "still waiting" log lines.
struct Reminder {
    last: Option<Instant>,
}

impl Reminder {
    fn new() -> Self {
        Self { last: None }
    }

    fn due(&mut self) -> bool {
        let due = self.last.is_none_or(|last| last.elapsed() >= LOG_EVERY);
        if due {
            self.last = Some(Instant::now());
        }
        due
    }
}

impl Locate {
    fn find(&self) -> Option<PathBuf> {
        match self {
            Self::Path(path) => Some(path.clone()),
            Self::Name { paths, name } => paths.find_virtio_port(name),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Path(path) => path.display().to_string(),
            Self::Name { name, .. } => format!("virtio port named {name}"),
        }
    }
}

/// Finds and opens the port, retrying until it exists: devtmpfs creates the node shortly
/// after virtio-console probes, which can be after init has started.
fn open_port(locate: &Locate) -> File {
    let mut reminder = Reminder::new();
    loop {
        match locate.find() {
            Some(path) => match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(file) => {
                    agent_log!("opened {} for {}", path.display(), locate.describe());
                    return file;
                }
                Err(error) => {
                    if reminder.due() {
                        agent_log!("cannot open {} yet: {error}; retrying", path.display());
                    }
                }
            },
            None => {
                if reminder.due() {
                    agent_log!("waiting for the {}", locate.describe());
                }
            }
        }
        std::thread::sleep(RETRY);
    }
}

/// Waits until the host end is connected (no POLLHUP). Returns false on a poll error.
fn wait_for_host(port: &File) -> bool {
    let mut reminder = Reminder::new();
    loop {
        let mut poll_fd = libc::pollfd {
            fd: port.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll_fd, 1, 1000) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            agent_log!("poll on the port failed: {error}");
            return false;
        }
        if poll_fd.revents & libc::POLLHUP == 0 {
            return true;
        }
        if reminder.due() {
            agent_log!("waiting for the host to connect to the port");
        }
        std::thread::sleep(RETRY);
    }
}

/// One connection of the host: banner, then requests until the host goes away.
fn session<P: Platform>(agent: &Agent<P>, port: &File) -> Result<SessionEnd, std::io::Error> {
    let mut writer = port;
    writer.write_all(format!("{READY_BANNER}\n").as_bytes())?;
    agent_log!("{READY_BANNER}");
    let reader = port.try_clone()?;
    Ok(serve(agent, reader, port))
}

/// Serves the port for the rest of the machine's life.
pub fn serve_forever<P: Platform>(agent: &Agent<P>, locate: &Locate) -> ! {
    loop {
        let port = open_port(locate);
        loop {
            if !wait_for_host(&port) {
                break;
            }
            let result = catch_unwind(AssertUnwindSafe(|| session(agent, &port)));
            match result {
                Ok(Ok(SessionEnd::Eof)) => agent_log!("host closed the port; waiting for it again"),
                Ok(Ok(SessionEnd::ReadError(error))) => {
                    agent_log!("reading the port failed: {error}; reopening it");
                    break;
                }
                Ok(Err(error)) => agent_log!("cannot start a session on the port: {error}"),
                Err(_) => agent_log!("the session panicked; starting a new one"),
            }
            std::thread::sleep(RETRY);
        }
        std::thread::sleep(RETRY);
    }
}
