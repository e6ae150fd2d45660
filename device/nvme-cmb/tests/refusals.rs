//! The `nvme-cmb` binary refusing paths it must not take: a second instance on a running
//! one's sockets (without emptying its trace), a trace that is a symlink or a FIFO; and its
//! sockets and trace are 0600 whatever the umask.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Kills and reaps the child on every path.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Paths {
    socket: PathBuf,
    control: PathBuf,
    trace: PathBuf,
}

fn paths(dir: &Path) -> Paths {
    Paths {
        socket: dir.join("vfu.sock"),
        control: dir.join("control.sock"),
        trace: dir.join("trace.jsonl"),
    }
}

fn command(paths: &Paths) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nvme-cmb"));
    command
        .arg("--socket")
        .arg(&paths.socket)
        .arg("--control")
        .arg(&paths.control)
        .arg("--trace")
        .arg(&paths.trace)
        .args(["--cmb-size", "64K", "--queues", "8"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: umask(2) is async-signal-safe and touches no memory; a permissive umask shows
    // that the modes do not come from it.
    unsafe {
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    command
}

fn start(paths: &Paths) -> Guard {
    let guard = Guard(command(paths).stderr(Stdio::null()).spawn().expect("spawn"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(paths.socket.exists() && paths.control.exists()) {
        assert!(Instant::now() < deadline, "sockets never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    guard
}

/// Runs a second instance to its exit (at most 10 s) and returns how it ended and its stderr.
fn run_to_exit(paths: &Paths) -> (ExitStatus, String) {
    let mut child = Guard(command(paths).spawn().expect("spawn"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "nvme-cmb did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.0.stderr.take() {
        pipe.read_to_string(&mut stderr).expect("stderr");
    }
    (status, stderr)
}

fn stats(control: &Path) -> String {
    let mut stream = UnixStream::connect(control).expect("control");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(b"{\"id\":1,\"op\":\"stats\"}\n")
        .expect("write");
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).expect("read");
    reply
}

fn doorbell(socket: &Path) {
    let mut client = vfio_user::Client::new(socket).expect("client");
    client
        .region_write(7, 0x04, &6u16.to_le_bytes())
        .expect("decode on");
    client
        .region_write(0, 0x1000, &1u32.to_le_bytes())
        .expect("doorbell");
}

fn wait_for_trace(trace: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(trace).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{needle} never in the trace: {text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_instance_refuses_live_sockets_and_leaves_the_trace_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = paths(dir.path());
    let mut first = start(&paths);
    doorbell(&paths.socket);
    let before = wait_for_trace(&paths.trace, "\"offset\":4096");
    let (status, stderr) = run_to_exit(&paths);
    assert!(!status.success(), "{status}");
    assert!(
        stderr.contains("another instance") && stderr.contains("control.sock"),
        "{stderr}"
    );
    let after = std::fs::read_to_string(&paths.trace).expect("trace");
    assert!(
        after.starts_with(&before),
        "the running instance's trace was emptied"
    );
    assert!(
        first.0.try_wait().expect("try_wait").is_none(),
        "first died"
    );
    assert!(stats(&paths.control).contains("\"ok\""));
    doorbell(&paths.socket);
}

#[test]
fn sockets_and_trace_are_0600_whatever_the_umask() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = paths(dir.path());
    let _device = start(&paths);
    for path in [&paths.socket, &paths.control, &paths.trace] {
        let mode = std::fs::symlink_metadata(path).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    assert!(stats(&paths.control).contains("\"ok\""));
}

#[test]
fn a_symlinked_trace_is_refused_and_its_target_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = paths(dir.path());
    let precious = dir.path().join("precious");
    std::fs::write(&precious, b"keep").expect("write");
    std::os::unix::fs::symlink(&precious, &paths.trace).expect("symlink");
    let (status, stderr) = run_to_exit(&paths);
    assert!(!status.success());
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(std::fs::read(&precious).expect("read"), b"keep");
    assert!(!paths.socket.exists() && !paths.control.exists());
}

#[test]
fn a_fifo_trace_is_refused_at_once_instead_of_hanging() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = paths(dir.path());
    let fifo = std::ffi::CString::new(paths.trace.clone().into_os_string().into_encoded_bytes())
        .expect("path");
    // SAFETY: `fifo` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let (status, stderr) = run_to_exit(&paths);
    assert!(!status.success());
    assert!(stderr.contains("not a regular file"), "{stderr}");
    assert!(!paths.socket.exists() && !paths.control.exists());
}
