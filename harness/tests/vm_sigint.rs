//! Ctrl-C during boot must leave no QEMU or nvme-cmb process behind.
//!
//! Needs the built rig (QEMU, the v1 kernel, the initramfs in the cache), so it is ignored by
//! a plain `cargo test`; `make vm-sigint-test` (part of `make test`) runs it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; only count processes that can still run.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// The directory under `root` (depth first) that holds a file called `name`.
fn find_file_dir(root: &Path, name: &str) -> Option<PathBuf> {
    if root.join(name).is_file() {
        return Some(root.to_path_buf());
    }
    let entries = std::fs::read_dir(root).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .find_map(|e| find_file_dir(&e.path(), name))
}

#[test]
#[ignore = "needs the built rig; run by `make vm-sigint-test`"]
fn sigint_during_boot_leaves_no_qemu_or_device_behind() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_p2prig"))
        .args([
            "run",
            "--kernel",
            "v1",
            "--scenario",
            "smoke",
            "--accel",
            "tcg",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("p2prig starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let run_dir = loop {
        let line = lines
            .next()
            .expect("p2prig printed its run directory")
            .expect("utf-8 line");
        if let Some(dir) = line.strip_prefix("run directory: ") {
            break PathBuf::from(dir);
        }
    };
    // The pids file is written once QEMU has been started: the guest is booting.
    let deadline = Instant::now() + Duration::from_secs(120);
    let boot_dir = loop {
        if let Some(dir) = find_file_dir(&run_dir, "pids") {
            break dir;
        }
        assert!(Instant::now() < deadline, "p2prig never started QEMU");
        std::thread::sleep(Duration::from_millis(50));
    };
    let pids_file = boot_dir.join("pids");
    std::thread::sleep(Duration::from_millis(1500));
    let pids: Vec<(String, i32)> = std::fs::read_to_string(&pids_file)
        .expect("pids readable")
        .lines()
        .filter_map(|l| {
            let (name, pid) = l.split_once(' ')?;
            Some((name.to_string(), pid.parse().ok()?))
        })
        .collect();
    assert_eq!(
        pids.len(),
        3,
        "pids file names nvme-cmb, roce-target and qemu: {pids:?}"
    );
    for (name, pid) in &pids {
        assert!(alive(*pid), "{name} ({pid}) should be running during boot");
    }
    let harness = i32::try_from(child.id()).expect("pid fits");
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(harness, libc::SIGINT) }, 0);

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "p2prig did not exit within 30 s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.code(),
        Some(130),
        "p2prig reports the interruption with exit code 130"
    );
    for (name, pid) in &pids {
        assert!(!alive(*pid), "{name} ({pid}) survived p2prig's SIGINT");
    }
    assert!(
        boot_dir.join("console.log").exists(),
        "the run directory keeps the console log"
    );
    assert!(
        boot_dir.join("qemu.cmdline").exists(),
        "the run directory keeps the QEMU command line"
    );
}
