//! The `nvme-cmb` binary as the harness runs it: sockets appear, a client is served, and
//! SIGTERM/SIGINT remove the sockets and exit 0.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn wait_for_sockets(paths: &[&Path]) -> bool {
    for _ in 0..1000 {
        if paths.iter().all(|p| p.exists()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn start(dir: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nvme-cmb"))
        .arg("--socket")
        .arg(dir.join("vfu.sock"))
        .arg("--control")
        .arg(dir.join("control.sock"))
        .arg("--trace")
        .arg(dir.join("trace.jsonl"))
        .args(extra)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nvme-cmb starts")
}

fn signal_and_wait(child: &mut Child, signal: i32) -> std::process::ExitStatus {
    let pid = child.id() as libc::pid_t;
    // SAFETY: sending a signal to our own child, which has not been reaped yet.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0);
    for _ in 0..1000 {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    panic!("nvme-cmb did not exit after signal {signal}");
}

#[test]
fn sigterm_removes_both_sockets_and_exits_zero_after_serving_a_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vfu.sock");
    let control = dir.path().join("control.sock");
    let mut child = start(dir.path(), &["--cmb-size", "64K", "--queues", "8"]);
    assert!(wait_for_sockets(&[&socket, &control]));
    {
        let mut client = vfio_user::Client::new(&socket).expect("client");
        client
            .region_write(7, 0x04, &6u16.to_le_bytes())
            .expect("decode on");
        client
            .region_write(0, 0x1000, &1u32.to_le_bytes())
            .expect("doorbell");
    }
    let status = signal_and_wait(&mut child, libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists() && !control.exists());
    let trace = std::fs::read_to_string(dir.path().join("trace.jsonl")).expect("trace");
    assert!(
        trace.lines().any(|l| l.contains("\"offset\":4096")),
        "{trace}"
    );
}

#[test]
fn sigint_exits_zero_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = start(dir.path(), &[]);
    assert!(wait_for_sockets(&[&dir.path().join("vfu.sock")]));
    assert_eq!(signal_and_wait(&mut child, libc::SIGINT).code(), Some(0));
}

#[test]
fn a_stale_socket_left_by_a_killed_instance_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vfu.sock");
    let mut first = start(dir.path(), &[]);
    assert!(wait_for_sockets(&[&socket]));
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");
    assert!(socket.exists(), "SIGKILL leaves the socket file behind");
    let mut second = start(dir.path(), &[]);
    // The stale file is there from the start, so wait for a listener, not for the file.
    let served = (0..1000).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        vfio_user::Client::new(&socket).is_ok()
    });
    assert!(served);
    assert_eq!(signal_and_wait(&mut second, libc::SIGTERM).code(), Some(0));
}

#[test]
fn bad_options_are_refused_with_a_message() {
    for args in [
        &["--cmb-size", "3M"][..],
        &["--queues", "0"],
        &["--cmb-mode", "teleport"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_nvme-cmb"))
            .args(["--socket", "/nonexistent/a", "--control", "/nonexistent/b"])
            .args(["--trace", "/nonexistent/c"])
            .args(args)
            .output()
            .expect("runs");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(!output.stderr.is_empty());
    }
}

#[test]
fn a_path_in_use_by_a_regular_file_is_an_error_not_clobbered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vfu.sock");
    std::fs::write(&socket, b"precious").expect("file");
    let output = Command::new(env!("CARGO_BIN_EXE_nvme-cmb"))
        .arg("--socket")
        .arg(&socket)
        .arg("--control")
        .arg(dir.path().join("control.sock"))
        .arg("--trace")
        .arg(dir.path().join("trace.jsonl"))
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(std::fs::read(&socket).expect("file kept"), b"precious");
}
