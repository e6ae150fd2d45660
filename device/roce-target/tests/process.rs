//! Integration tier: the real `roce-target` binary. A vhost-user front end (a few raw
//! protocol messages) connects, disconnects and connects again, the control socket counts
//! the connections, and SIGTERM removes the sockets and exits 0.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{get_features, wait_for};

/// Kills and reaps the child on every path, so no test leaves a target behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn control(path: &Path, line: &str) -> String {
    let mut stream = UnixStream::connect(path).expect("control");
    stream.write_all(line.as_bytes()).expect("write");
    stream.write_all(b"\n").expect("write");
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).expect("read");
    reply
}

#[test]
fn serves_connection_after_connection_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("net.sock");
    let control_path = dir.path().join("control.sock");
    let pcap_dir = dir.path().join("pcap");
    let child = Command::new(env!("CARGO_BIN_EXE_roce-target"))
        .arg("--socket")
        .arg(&socket)
        .arg("--control")
        .arg(&control_path)
        .arg("--pcap-dir")
        .arg(&pcap_dir)
        .arg("--pcap")
        .arg("run.pcap")
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut guard = Guard(child);
    wait_for(&socket);
    wait_for(&control_path);
    for _ in 0..3 {
        let features = get_features(&socket);
        assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1");
        assert_ne!(features & (1 << 30), 0, "VHOST_USER_F_PROTOCOL_FEATURES");
        assert_eq!(features & (1 << 15), 0, "no MRG_RXBUF");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = control(&control_path, r#"{"id":1,"op":"stats"}"#);
        if stats.contains("\"connections\":3") {
            break;
        }
        assert!(Instant::now() < deadline, "{stats}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(pcap_dir.join("run.pcap").exists());
    // SAFETY: kill(2) on the child's pid, which the guard has not reaped yet.
    let rc = unsafe { libc::kill(guard.0.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = guard.0.wait().expect("wait");
    assert!(status.success(), "{status}");
    assert!(!socket.exists() && !control_path.exists());
}
