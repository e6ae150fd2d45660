//! Child processes owned by the harness: every child dies with the harness (PR_SET_PDEATHSIG)
//! and is killed and reaped when its guard drops, so no path leaves a QEMU or device behind.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Set by SIGINT/SIGTERM/SIGHUP; every wait in the harness polls it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs handlers that only set a flag, so cleanup runs in ordinary code (guards' drops).
pub fn install_signal_handlers() -> Result<()> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    let flag = FLAG
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone();
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, flag.clone()).context("installing a signal handler")?;
    }
    std::thread::Builder::new()
        .name("signal-watch".into())
        .spawn(move || loop {
            if flag.load(Ordering::Relaxed) {
                INTERRUPTED.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        })
        .context("starting the signal watcher")?;
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Error returned by waits cut short by Ctrl-C, so callers can tell it from a failure.
#[derive(Debug, thiserror::Error)]
#[error("interrupted (Ctrl-C or SIGTERM): stopping and cleaning up")]
pub struct Interrupted;

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Whether the child gets a process group of its own (a build whose whole tree must be
/// killable) or stays in the harness's group (QEMU and devices, so a terminal's Ctrl-C
/// reaches them too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Harness,
    Own,
}

/// A running child that is terminated and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    group: Group,
    exited: Option<ExitStatus>,
}

impl ChildGuard {
    pub fn spawn(name: &str, mut cmd: Command, group: Group) -> Result<Self> {
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (prctl, setpgid, getppid, _exit).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The harness may have died between fork and prctl.
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                if group == Group::Own && libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name: name.to_string(),
            child,
            group,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exit status if the child has exited, without blocking.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// SIGTERM, then SIGKILL after `grace`, then reap.
    pub fn terminate(&mut self, grace: Duration) {
        if self.try_status().is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.try_status().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal(libc::SIGKILL);
        self.exited = self.child.wait().ok();
    }

    fn signal(&self, sig: libc::c_int) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        let target = if self.group == Group::Own { -pid } else { pid };
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child (or
        // its group), so it cannot have been recycled for another process.
        unsafe {
            libc::kill(target, sig);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(3));
    }
}
