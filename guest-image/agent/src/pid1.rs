//! What init owes the kernel: filesystems, reaping orphans, and never exiting (an exiting PID 1
//! panics the kernel, which would read as a guest crash in every scenario).

use std::ffi::CString;
use std::time::Duration;

use crate::agent_log;

/// One filesystem init mounts.
#[derive(Debug, Clone, Copy)]
pub struct Mount {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: libc::c_ulong,
    pub data: &'static str,
    /// Missing kernel support (ENODEV) is fine: debugfs exists only in some flavors.
    pub optional: bool,
}

const NOSUID_NODEV_NOEXEC: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// In order: /dev before anything that needs device nodes, /sys before debugfs under it.
pub const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        optional: false,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        optional: false,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
        optional: false,
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
        optional: false,
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
        optional: false,
    },
    Mount {
        source: "debugfs",
        target: "/sys/kernel/debug",
        fstype: "debugfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        optional: true,
    },
];

fn cstring(text: &str) -> CString {
    // The mount table is made of constants without NUL bytes.
    CString::new(text).unwrap_or_default()
}

/// Mounts `mount`, creating its mount point. Already mounted (EBUSY) counts as done.
pub fn mount_one(mount: &Mount) -> Result<(), std::io::Error> {
    if let Err(error) = std::fs::create_dir_all(mount.target) {
        agent_log!("mkdir {}: {error}", mount.target);
    }
    let source = cstring(mount.source);
    let target = cstring(mount.target);
    let fstype = cstring(mount.fstype);
    let data = cstring(mount.data);
    // SAFETY: all strings are NUL-terminated and live across the call.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            mount.flags,
            data.as_ptr().cast(),
        )
    };
    if ret == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EBUSY) {
        return Ok(());
    }
    Err(error)
}

/// Mounts everything in [`MOUNTS`], logging each result; failures are logged, not fatal,
/// because a half-working agent still tells the harness more than a kernel panic.
pub fn mount_filesystems() {
    for mount in MOUNTS {
        match mount_one(mount) {
            Ok(()) => agent_log!("mounted {} on {}", mount.fstype, mount.target),
            Err(error) if mount.optional && error.raw_os_error() == Some(libc::ENODEV) => {
                agent_log!(
                    "{} not available in this kernel; {} left empty",
                    mount.fstype,
                    mount.target
                )
            }
            Err(error) => agent_log!(
                "mounting {} on {} failed: {error}",
                mount.fstype,
                mount.target
            ),
        }
    }
}

/// Reaps every child that ends, forever, on a thread of its own. Orphans of any process
/// become ours as PID 1. (The agent spawns no children of its own that it waits for; if it
/// ever does, this must learn to hand their statuses over.)
pub fn start_reaper() {
    let spawned = std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                continue;
            }
            // ECHILD (no children yet) or EINTR: look again a little later.
            std::thread::sleep(Duration::from_secs(1));
        });
    if let Err(error) = spawned {
        agent_log!("cannot start the zombie reaper: {error}");
    }
}

/// Flushes filesystems and powers the machine off as PID 1; elsewhere just exits. As PID 1
/// this never returns: if the kernel refuses to power off, it waits forever rather than exit.
pub fn power_off(is_init: bool) -> ! {
    agent_log!("powering off");
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    if !is_init {
        std::process::exit(0);
    }
    // SAFETY: reboot with a valid command; on success it does not return.
    let ret = unsafe { libc::reboot(libc::RB_POWER_OFF) };
    agent_log!(
        "reboot(RB_POWER_OFF) returned {ret}: {}; idling instead of exiting",
        std::io::Error::last_os_error()
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Sets up what the kernel command line asks for (`p2prig.net=`, `p2prig.rxe=`); failures are
/// logged and the agent serves requests regardless (they can redo the steps).
pub fn boot_network() {
    let cmdline = match std::fs::read_to_string("/proc/cmdline") {
        Ok(text) => text,
        Err(error) => {
            agent_log!("cannot read /proc/cmdline: {error}");
            return;
        }
    };
    let (boot, problems) = crate::net::parse_cmdline(&cmdline);
    for problem in problems {
        agent_log!("{problem}");
    }
    if let Some((ifname, addr, prefix)) = &boot.interface {
        match crate::net::net_up(ifname, *addr, *prefix) {
            Ok(()) => agent_log!("{ifname} up with {addr}/{prefix}"),
            Err(error) => agent_log!("bringing {ifname} up failed: {error}"),
        }
    }
    if let Some((name, netdev)) = &boot.rxe {
        match crate::net::rdma_link_add(name, netdev) {
            Ok(()) => agent_log!("rdma link {name} added on {netdev}"),
            Err(error) => agent_log!("rdma link add {name} on {netdev} failed: {error}"),
        }
    }
}

/// Logs panics to the console with the agent's prefix so they show in console.log.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        agent_log!("panic: {info}");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_table_orders_parents_first() {
        let position = |target: &str| {
            MOUNTS
                .iter()
                .position(|mount| mount.target == target)
                .unwrap_or(usize::MAX)
        };
        assert!(position("/sys") < position("/sys/kernel/debug"));
        assert!(position("/dev") < position("/tmp"));
        for target in ["/proc", "/sys", "/dev", "/tmp", "/run", "/sys/kernel/debug"] {
            assert_ne!(position(target), usize::MAX, "{target} missing");
        }
        assert!(MOUNTS
            .iter()
            .filter(|mount| mount.optional)
            .all(|mount| mount.fstype == "debugfs"));
    }
}
