//! `p2prig shell` driven as a user would, through tmux: the prompt comes up on a booted rig,
//! agent and device operations answer, a wrong line gets a clear error, and `exit` leaves no
//! QEMU or device process behind.
//!
//! Needs the built rig (QEMU, the v1 kernel, the initramfs) and tmux, so it is ignored by a
//! plain `cargo test`; `make vm-shell-test` (part of `make test`) runs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmux server of this test's own (its own socket name), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux runs (make deps installs it)")
    }

    /// The pane's history and screen, without the screen's empty rows below the cursor (so a
    /// length taken now marks where the next output starts).
    fn pane(&self) -> String {
        let out = self.cmd(&["capture-pane", "-p", "-J", "-t", "shell", "-S", "-500"]);
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    fn send_line(&self, line: &str) {
        assert!(self
            .cmd(&["send-keys", "-t", "shell", "-l", line])
            .status
            .success());
        assert!(self
            .cmd(&["send-keys", "-t", "shell", "Enter"])
            .status
            .success());
    }

    /// Waits until the pane shows `text` after the `from`-th byte; returns the pane.
    fn wait_for(&self, text: &str, from: usize, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let pane = self.pane();
            if pane.get(from..).is_some_and(|p| p.contains(text)) {
                return pane;
            }
            assert!(
                Instant::now() < deadline,
                "no `{text}` within {within:?}; the pane:\n{pane}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn pids_under(dir: &Path) -> Vec<(String, i32)> {
    let text = walk(dir)
        .and_then(|file| std::fs::read_to_string(file).ok())
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (name, pid) = l.split_once(' ')?;
            Some((name.to_string(), pid.parse().ok()?))
        })
        .collect()
}

fn walk(dir: &Path) -> Option<PathBuf> {
    if dir.join("pids").is_file() {
        return Some(dir.join("pids"));
    }
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .find_map(|e| walk(&e.path()))
}

#[test]
#[ignore = "needs the built rig and tmux; run by `make vm-shell-test`"]
fn the_shell_runs_operations_and_exit_tears_the_rig_down() {
    let tmux = Tmux {
        socket: format!("p2prig-shell-test-{}", std::process::id()),
    };
    let command = format!(
        "{} shell --kernel v1 --accel tcg; echo SHELL-EXITED $?; sleep 600",
        env!("CARGO_BIN_EXE_p2prig")
    );
    let started = tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "shell",
        "-x",
        "200",
        "-y",
        "50",
        &command,
    ]);
    assert!(started.status.success(), "tmux new-session: {started:?}");

    let pane = tmux.wait_for("p2prig>", 0, Duration::from_secs(300));
    assert!(pane.contains("rig up in"), "{pane}");
    let run_dir = pane
        .lines()
        .find_map(|l| {
            l.split_once("(run directory ")?
                .1
                .split_once(')')
                .map(|(d, _)| PathBuf::from(d))
        })
        .expect("the shell names its run directory");
    let pids = pids_under(&run_dir);
    assert_eq!(pids.len(), 3, "nvme-cmb, roce-target and qemu: {pids:?}");
    assert!(pids.iter().all(|(_, pid)| alive(*pid)), "{pids:?}");

    let mark = tmux.pane().len();
    tmux.send_line("hello");
    tmux.wait_for("\"kernel_release\"", mark, Duration::from_secs(60));

    let mark = tmux.pane().len();
    tmux.send_line("device stats");
    tmux.wait_for("\"type\":\"stats\"", mark, Duration::from_secs(30));

    let mark = tmux.pane().len();
    tmux.send_line("no_such_op");
    tmux.wait_for(
        "unknown variant `no_such_op`, expected one of",
        mark,
        Duration::from_secs(10),
    );

    let mark = tmux.pane().len();
    tmux.send_line("exit");
    tmux.wait_for("SHELL-EXITED 0", mark, Duration::from_secs(60));
    for (name, pid) in &pids {
        assert!(!alive(*pid), "{name} ({pid}) outlived the shell");
    }
}
