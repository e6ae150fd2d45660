//! `--accel auto`: use KVM where a short probe boot shows it works, else TCG; `--accel kvm`:
//! KVM, proven by the same probe. The answer is remembered in the cache per (boot of this
//! host, host kernel, QEMU binary), so the probe runs once per boot and never travels with a
//! restored cache to another machine.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
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

/// What the probe found, for one boot of one host with one QEMU binary. The boot id is part of
/// the key because the record lives in the cache, which CI restores onto other machines: a
/// runner whose KVM did not work must not send the next runner to TCG.
#[derive(Debug, Serialize, Deserialize)]
struct ProbeRecord {
    boot_id: String,
    host_kernel: String,
    qemu: String,
    kvm_works: bool,
    detail: String,
}

impl ProbeRecord {
    fn applies_to(&self, boot_id: &str, host_kernel: &str, qemu: &str) -> bool {
        !boot_id.is_empty()
            && self.boot_id == boot_id
            && self.host_kernel == host_kernel
            && self.qemu == qemu
    }
}

pub fn resolve(choice: AccelChoice, cache: &Cache, qemu: &Path, bzimage: &Path) -> Result<Accel> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => {
            if !kvm_device_usable() {
                bail!("--accel kvm: /dev/kvm cannot be opened read-write by this user; give it access (CI: the udev rule in action.yml), or use --accel tcg or auto");
            }
            // Proven, not assumed: a KVM that opens but runs no guest would otherwise show
            // as a boot timeout minutes later.
            let record = probe_once(cache, qemu, bzimage)?;
            if !record.kvm_works {
                bail!(
                    "--accel kvm: /dev/kvm opens but a KVM guest did not run on this host ({}); \
                     check nested virtualization is enabled, or use --accel tcg or auto",
                    record.detail
                );
            }
            Ok(Accel::Kvm)
        }
        AccelChoice::Auto => {
            if !kvm_device_usable() {
                return Ok(Accel::Tcg);
            }
            let record = probe_once(cache, qemu, bzimage)?;
            Ok(if record.kvm_works {
                Accel::Kvm
            } else {
                Accel::Tcg
            })
        }
    }
}

/// The probe's record for this boot of this host and this QEMU: read back from the cache, or
/// made now (a short KVM boot) and stored.
fn probe_once(cache: &Cache, qemu: &Path, bzimage: &Path) -> Result<ProbeRecord> {
    let record_path = cache.root().join("accel-probe.json");
    let boot_id = read_proc("/proc/sys/kernel/random/boot_id");
    let host_kernel = read_proc("/proc/sys/kernel/osrelease");
    let qemu_id = crate::build::cache::sha256_file(qemu)?;
    if let Ok(text) = std::fs::read_to_string(&record_path) {
        if let Ok(rec) = serde_json::from_str::<ProbeRecord>(&text) {
            if rec.applies_to(&boot_id, &host_kernel, &qemu_id) {
                return Ok(rec);
            }
        }
    }
    eprintln!(
        "probing whether KVM guests run on this host (once per boot; up to {PROBE_TIMEOUT:?})"
    );
    let (kvm_works, detail) = probe_kvm(qemu, bzimage)?;
    eprintln!(
        "KVM probe: {detail}; KVM {}",
        if kvm_works {
            "works"
        } else {
            "does not run guests here"
        }
    );
    let rec = ProbeRecord {
        boot_id,
        host_kernel,
        qemu: qemu_id,
        kvm_works,
        detail,
    };
    std::fs::write(&record_path, serde_json::to_string_pretty(&rec)?)
        .with_context(|| format!("writing the KVM probe's record {}", record_path.display()))?;
    Ok(rec)
}

pub fn kvm_device_usable() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// What the probe found on this boot of this host, if it ran (for `p2prig doctor`; any QEMU).
pub fn probed(cache: &Cache) -> Option<(bool, String)> {
    let text = std::fs::read_to_string(cache.root().join("accel-probe.json")).ok()?;
    let rec: ProbeRecord = serde_json::from_str(&text).ok()?;
    rec.applies_to(
        &read_proc("/proc/sys/kernel/random/boot_id"),
        &read_proc("/proc/sys/kernel/osrelease"),
        &rec.qemu,
    )
    .then_some((rec.kvm_works, rec.detail))
}

/// A one-line /proc file, or empty where it cannot be read (then no record applies).
fn read_proc(path: &str) -> String {
    std::fs::read_to_string(path)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(boot_id: &str) -> ProbeRecord {
        ProbeRecord {
            boot_id: boot_id.into(),
            host_kernel: "6.1.0".into(),
            qemu: "abc".into(),
            kvm_works: false,
            detail: "no kernel output within 20s".into(),
        }
    }

    #[test]
    fn a_record_applies_only_to_the_boot_that_made_it() {
        let rec = record("boot-1");
        assert!(rec.applies_to("boot-1", "6.1.0", "abc"));
        // A cache restored onto another runner (or this host after a reboot).
        assert!(!rec.applies_to("boot-2", "6.1.0", "abc"));
        assert!(!rec.applies_to("boot-1", "6.12.0", "abc"));
        assert!(!rec.applies_to("boot-1", "6.1.0", "def"));
        // Unreadable boot id: never trust a stored answer.
        assert!(!record("").applies_to("", "6.1.0", "abc"));
    }

    #[test]
    fn a_record_from_before_the_boot_id_is_not_read_as_one() {
        let old = r#"{"host_kernel":"6.1.0","qemu":"abc","kvm_works":false,"detail":"x"}"#;
        assert!(serde_json::from_str::<ProbeRecord>(old).is_err());
    }
}
