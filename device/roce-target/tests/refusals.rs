//! Integration tier: the real `roce-target` binary refusing what would hurt it or the host,
//! and still alive and answering afterwards: a memory table larger than its memfd, a second
//! instance on the same sockets, captures through a symlink or into a FIFO, oversized or
//! excess WRITEs, out-of-range QP attributes.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{get_features, message, wait_for};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Kills and reaps the child on every path, so no test leaves a target behind.
struct Target {
    child: Child,
    socket: PathBuf,
    control: PathBuf,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_roce-target"));
    command
        .arg("--socket")
        .arg(dir.join("net.sock"))
        .arg("--control")
        .arg(dir.join("control.sock"))
        .arg("--pcap-dir")
        .arg(dir.join("pcap"))
        .stdin(Stdio::null());
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

fn start(dir: &Path) -> Target {
    let child = command(dir).stderr(Stdio::null()).spawn().expect("spawn");
    let target = Target {
        child,
        socket: dir.join("net.sock"),
        control: dir.join("control.sock"),
    };
    wait_for(&target.socket);
    wait_for(&target.control);
    target
}

/// Runs an instance that is expected to refuse to start, to its exit (at most 10 s): how it
/// ended and its stderr.
fn run_to_exit(dir: &Path) -> (ExitStatus, String) {
    run_to_exit_with(dir, &[])
}

fn run_to_exit_with(dir: &Path, extra: &[&str]) -> (ExitStatus, String) {
    let child = command(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut target = Target {
        child,
        socket: dir.join("net.sock"),
        control: dir.join("control.sock"),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = target.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "roce-target kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = target.child.stderr.take() {
        pipe.read_to_string(&mut stderr).expect("stderr");
    }
    (status, stderr)
}

impl Target {
    /// One request line, one reply line (with a timeout: a hung target fails the test).
    fn call(&self, line: &str) -> String {
        let mut stream = UnixStream::connect(&self.control).expect("control");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream.write_all(line.as_bytes()).expect("write");
        stream.write_all(b"\n").expect("write");
        let mut reply = String::new();
        BufReader::new(stream)
            .read_line(&mut reply)
            .unwrap_or_else(|e| panic!("no reply to {line}: {e}"));
        reply
    }

    /// Alive, and both sockets answer.
    fn assert_serving(&mut self) {
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "roce-target died"
        );
        assert!(self.call(r#"{"id":1,"op":"stats"}"#).contains("\"stats\""));
        let features = get_features(&self.socket);
        assert_ne!(features & (1 << 30), 0, "PROTOCOL_FEATURES");
    }
}

fn memfd(size: u64) -> OwnedFd {
    // SAFETY: the name is a NUL-terminated literal; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(fd.try_clone().expect("dup"))
        .set_len(size)
        .expect("size");
    fd
}

#[test]
fn a_memory_region_larger_than_its_memfd_is_refused_and_the_target_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = start(dir.path());
    const USER_ADDR: u64 = 0x7f00_0000_0000;
    let ram = memfd(1 << 20);
    // VHOST_USER_SET_MEM_TABLE: one region of 1 TiB backed by a 1 MiB memfd.
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes());
    for value in [0u64, 1 << 40, USER_ADDR, 0] {
        table.extend_from_slice(&value.to_le_bytes());
    }
    let mut stream = UnixStream::connect(&target.socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .send_with_fds(&[&message(5, &table)[..]], &[ram.as_raw_fd()])
        .expect("send SET_MEM_TABLE");
    // VHOST_USER_SET_VRING_ADDR for ring 0, its used ring 512 MiB in: past the memfd's end.
    let mut ring = Vec::new();
    ring.extend_from_slice(&0u32.to_le_bytes());
    ring.extend_from_slice(&0u32.to_le_bytes());
    for offset in [0u64, 512 << 20, 4096] {
        ring.extend_from_slice(&(USER_ADDR + offset).to_le_bytes());
    }
    ring.extend_from_slice(&0u64.to_le_bytes());
    // The relay may already have closed the connection: a failed write is fine.
    let _ = stream.write_all(&message(9, &ring));
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    std::thread::sleep(Duration::from_millis(200));
    target.assert_serving();
}

#[test]
fn a_second_instance_on_live_sockets_refuses_to_start_and_the_first_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = start(dir.path());
    let capture = dir.path().join("pcap").join("run.pcap");
    let reply = first.call(r#"{"id":1,"op":"pcap_start","name":"run.pcap"}"#);
    assert!(reply.contains("\"ok\""), "{reply}");
    first.call(r#"{"id":2,"op":"announce"}"#);
    first.call(r#"{"id":3,"op":"pcap_stop"}"#);
    let captured = std::fs::metadata(&capture).expect("capture").len();
    assert!(captured > 24, "a frame after the header");
    let (status, stderr) = run_to_exit_with(dir.path(), &["--pcap", "run.pcap"]);
    assert!(!status.success(), "{status}");
    assert!(
        stderr.contains("another instance") && stderr.contains("control.sock"),
        "{stderr}"
    );
    for path in [&first.socket, &first.control] {
        assert!(path.exists(), "{} removed", path.display());
    }
    let kept = std::fs::metadata(&capture).expect("capture").len();
    assert_eq!(
        kept, captured,
        "the running instance's capture was truncated"
    );
    first.assert_serving();
}

#[test]
fn a_regular_file_at_the_backend_path_is_kept_and_sockets_are_0600() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend = dir.path().join("net.sock.backend");
    std::fs::write(&backend, b"precious").expect("write");
    let (status, stderr) = run_to_exit(dir.path());
    assert!(!status.success(), "{status}");
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&backend).expect("kept"), b"precious");
    std::fs::remove_file(&backend).expect("rm");

    let mut target = start(dir.path());
    wait_for(&backend);
    for path in [&target.socket, &target.control, &backend] {
        let mode = std::fs::symlink_metadata(path).expect("stat").mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
    target.assert_serving();
}

#[test]
fn captures_are_0600_and_never_follow_a_symlink_or_open_a_fifo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = start(dir.path());
    let pcap_dir = dir.path().join("pcap");
    let reply = target.call(r#"{"id":1,"op":"pcap_start","name":"plain.pcap"}"#);
    assert!(reply.contains("\"ok\""), "{reply}");
    let mode = std::fs::metadata(pcap_dir.join("plain.pcap"))
        .expect("stat")
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    target.call(r#"{"id":2,"op":"pcap_stop"}"#);

    let precious = dir.path().join("precious");
    std::fs::write(&precious, b"keep").expect("write");
    std::os::unix::fs::symlink(&precious, pcap_dir.join("link.pcap")).expect("symlink");
    let reply = target.call(r#"{"id":3,"op":"pcap_start","name":"link.pcap"}"#);
    assert!(
        reply.contains("\"err\"") && reply.contains("symbolic link"),
        "{reply}"
    );
    assert_eq!(std::fs::read(&precious).expect("read"), b"keep");

    let fifo = std::ffi::CString::new(
        pcap_dir
            .join("fifo.pcap")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .expect("path");
    // SAFETY: `fifo` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let reply = target.call(r#"{"id":4,"op":"pcap_start","name":"fifo.pcap"}"#);
    assert!(
        reply.contains("\"err\"") && reply.contains("not a regular file"),
        "{reply}"
    );
    target.assert_serving();
}

/// A QP in RTS toward a guest address nobody answers for, and a 32 MiB MR to post from.
fn connected_qp(target: &Target) -> (u32, u32) {
    let mr = target.call(r#"{"id":1,"op":"register_mr","length":33554432}"#);
    let key = number_after(&mr, "\"key\":");
    let qp = target.call(r#"{"id":2,"op":"create_qp","psn":1}"#);
    let qpn = number_after(&qp, "\"qpn\":");
    let connect = format!(
        r#"{{"id":3,"op":"connect","qpn":{qpn},"remote_qpn":17,"remote_psn":1,"remote_ip":"10.0.2.15","remote_mac":"52:54:00:12:34:56"}}"#
    );
    assert!(target.call(&connect).contains("\"ok\""));
    (qpn, key)
}

fn number_after(text: &str, field: &str) -> u32 {
    let start = text
        .find(field)
        .unwrap_or_else(|| panic!("{field} in {text}"))
        + field.len();
    text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or_else(|_| panic!("{field} in {text}"))
}

fn post_write(target: &Target, qpn: u32, key: u32, length: u32) -> String {
    target.call(&format!(
        r#"{{"id":9,"op":"post_write","qpn":{qpn},"wr_id":1,"local":{{"key":{key},"offset":0,"length":{length}}},"remote_va":4096,"remote_rkey":4660}}"#
    ))
}

#[test]
fn oversized_and_excess_writes_are_refused_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = start(dir.path());
    let (qpn, key) = connected_qp(&target);
    let reply = post_write(&target, qpn, key, 32 << 20);
    assert!(
        reply.contains("\"err\"") && reply.contains(&(16u32 << 20).to_string()),
        "{reply}"
    );
    for _ in 0..4 {
        let reply = post_write(&target, qpn, key, 16 << 20);
        assert!(reply.contains("\"ok\""), "{reply}");
    }
    let reply = post_write(&target, qpn, key, 16 << 20);
    assert!(
        reply.contains("\"err\"") && reply.contains(&(64u32 << 20).to_string()),
        "{reply}"
    );
    // Destroying the QP flushes its WRITEs and gives their bytes back.
    target.call(&format!(r#"{{"id":5,"op":"destroy_qp","qpn":{qpn}}}"#));
    let (qpn, key) = connected_qp(&target);
    let reply = post_write(&target, qpn, key, 16 << 20);
    assert!(reply.contains("\"ok\""), "{reply}");
    target.assert_serving();
}

#[test]
fn create_qp_refuses_out_of_range_psn_and_retry_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = start(dir.path());
    for (settings, what) in [
        (r#""psn":16777216"#, "psn"),
        (r#""retry_cnt":8"#, "retry_cnt"),
        (r#""rnr_retry":8"#, "rnr_retry"),
        (r#""min_rnr_timer":32"#, "min_rnr_timer"),
    ] {
        let reply = target.call(&format!(r#"{{"id":1,"op":"create_qp",{settings}}}"#));
        assert!(
            reply.contains("\"err\"") && reply.contains(what),
            "{settings}: {reply}"
        );
    }
    let reply =
        target.call(r#"{"id":2,"op":"create_qp","psn":16777215,"retry_cnt":7,"rnr_retry":0}"#);
    assert!(reply.contains("\"psn\":16777215"), "{reply}");
    target.assert_serving();
}
