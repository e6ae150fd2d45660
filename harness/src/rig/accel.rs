//! `--accel auto`: use KVM where a short probe boot shows it works, else TCG. The answer is
//! remembered in the cache per (host kernel, QEMU binary), so the probe runs once.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::build::cache::Cache;
use crate::rig::process::{ChildGuard, Group};
use crate::rig::Accel;

/// How long a KVM guest gets to print its banner; TCG needs ~1 s for it on this kind of host.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Serialize, Deserialize)]
struct ProbeRecord {
    host_kernel: String,
    qemu: String,
    kvm_works: bool,
    detail: String,
}

pub fn resolve(choice: AccelChoice, cache: &Cache, qemu: &Path, bzimage: &Path) -> Result<Accel> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => {
            if !kvm_device_usable() {
                bail!("--accel kvm: /dev/kvm cannot be opened read-write; use --accel tcg or auto, or give this user access to /dev/kvm");
            }
            Ok(Accel::Kvm)
        }
        AccelChoice::Auto => {
            if !kvm_device_usable() {
                return Ok(Accel::Tcg);
            }
            let record_path = cache.root().join("accel-probe.json");
            let host_kernel = host_kernel_release();
            let qemu_id = crate::build::cache::sha256_file(qemu)?;
            if let Ok(text) = std::fs::read_to_string(&record_path) {
                if let Ok(rec) = serde_json::from_str::<ProbeRecord>(&text) {
                    if rec.host_kernel == host_kernel && rec.qemu == qemu_id {
                        return Ok(if rec.kvm_works {
                            Accel::Kvm
                        } else {
                            Accel::Tcg
                        });
                    }
                }
            }
            eprintln!(
                "probing whether KVM guests run on this host (once; up to {PROBE_TIMEOUT:?})"
            );
            let (kvm_works, detail) = probe_kvm(qemu, bzimage)?;
            eprintln!(
                "KVM probe: {detail}; using {}",
                if kvm_works { "kvm" } else { "tcg" }
            );
            let rec = ProbeRecord {
                host_kernel,
                qemu: qemu_id,
                kvm_works,
                detail,
            };
            std::fs::write(&record_path, serde_json::to_string_pretty(&rec)?)?;
            Ok(if kvm_works { Accel::Kvm } else { Accel::Tcg })
        }
    }
}

fn kvm_device_usable() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Boots the kernel with no initramfs under KVM: a working KVM prints the kernel banner
/// within a second or two; a broken one hangs silently.
fn probe_kvm(qemu: &Path, bzimage: &Path) -> Result<(bool, String)> {
    let dir = tempfile::Builder::new()
        .prefix("p2prig-kvm-probe")
        .tempdir()?;
    let console = dir.path().join("console.log");
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-nic",
        "none",
        "-no-reboot",
    ])
    .args(["-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256M"])
    .args([
        "-bios",
        "/usr/share/qemu/qboot.rom",
        "-L",
        "/usr/share/seabios",
        "-L",
        "/usr/share/qemu",
    ])
    .arg("-kernel")
    .arg(bzimage)
    .args(["-append", "console=ttyS0 panic=-1"])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = ChildGuard::spawn("qemu (kvm probe)", cmd, Group::Harness)?;
    let started = Instant::now();
    while started.elapsed() < PROBE_TIMEOUT {
        crate::rig::process::check_interrupted()?;
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("Linux version") {
            return Ok((
                true,
                format!(
                    "kernel banner after {:.1} s",
                    started.elapsed().as_secs_f64()
                ),
            ));
        }
        if let Some(status) = child.try_status() {
            return Ok((
                false,
                format!("QEMU exited ({status}) before the kernel printed anything"),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.terminate(Duration::from_secs(1));
    Ok((false, format!("no kernel output within {PROBE_TIMEOUT:?}")))
}
