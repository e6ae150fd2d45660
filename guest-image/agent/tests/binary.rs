//! The real guest-agent binary on the host: over stdin/stdout, and over a port found by name
//! in a fake sysfs (a pseudo-terminal stands in for the virtio-serial port).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use p2prig_protocol::agent::{AgentOp, AgentReply, READY_BANNER};
use p2prig_protocol::wire::{decode_line, encode_line, Outcome, Reply, Request};

const AGENT: &str = env!("CARGO_BIN_EXE_guest-agent");

/// Kills and reaps the agent when the test ends, however it ends.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fake /sys with one NVMe-class function and a virtio port entry, and an empty /dev.
fn fake_system(root: &Path) -> (PathBuf, PathBuf) {
    let sys = root.join("sys");
    let dev = root.join("dev");
    let function = sys.join("bus/pci/devices/0000:02:00.0");
    fs::create_dir_all(&function).expect("mkdir");
    fs::write(function.join("class"), "0x010802\n").expect("write");
    let bridge = sys.join("bus/pci/devices/0000:00:01.0");
    fs::create_dir_all(&bridge).expect("mkdir");
    fs::write(bridge.join("class"), "0x060400\n").expect("write");
    fs::create_dir_all(sys.join("class/virtio-ports/vport7p1")).expect("mkdir");
    fs::write(
        sys.join("class/virtio-ports/vport7p1/name"),
        "p2prig.agent\n",
    )
    .expect("write");
    fs::create_dir_all(&dev).expect("mkdir");
    (sys, dev)
}

fn reply_of(line: &str) -> Reply<AgentReply> {
    decode_line(line.as_bytes()).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
}

#[test]
fn stdio_mode_serves_until_eof_and_exits() {
    let root = tempfile::tempdir().expect("tempdir");
    let (sys, dev) = fake_system(root.path());
    let mut child = Agent(
        Command::new(AGENT)
            .arg("--stdio")
            .arg("--sys")
            .arg(&sys)
            .arg("--dev")
            .arg(&dev)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn guest-agent"),
    );
    let mut stdin = child.0.stdin.take().expect("stdin");
    stdin
        .write_all(&encode_line(&Request {
            id: 1,
            op: AgentOp::FindPci { class: 0x010802 },
        }))
        .expect("write");
    stdin
        .write_all(b"{\"id\":2,\"op\":\"vfio_open\",\"bdf\":\"0000:02:00.0\"}\n")
        .expect("write");
    stdin
        .write_all(b"{\"id\":3,\"op\":\"bogus\"}\n")
        .expect("write");
    drop(stdin);
    let mut stdout = String::new();
    child
        .0
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("read");
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "{status}");
    let mut replies: Vec<_> = stdout.lines().map(reply_of).collect();
    replies.sort_by_key(|reply| reply.id);
    assert_eq!(replies.len(), 3, "{stdout}");
    assert_eq!(
        replies[0].outcome,
        Outcome::Ok(AgentReply::Pci {
            functions: vec!["0000:02:00.0".into()]
        })
    );
    // The fake function has no iommu_group link: ENOENT, and the message says what to check.
    match &replies[1].outcome {
        Outcome::Err(error) => {
            assert_eq!(error.errno, libc::ENOENT);
            assert!(
                error.message.starts_with("vfio_open 0000:02:00.0: "),
                "{}",
                error.message
            );
            assert!(error.message.contains("iommu_group"), "{}", error.message);
        }
        other => panic!("unexpected {other:?}"),
    }
    match &replies[2].outcome {
        Outcome::Err(error) => assert_eq!(error.errno, libc::EINVAL),
        other => panic!("unexpected {other:?}"),
    }
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read");
    assert!(
        stderr.lines().all(|line| line.starts_with("guest-agent: ")),
        "{stderr}"
    );
}

/// A pseudo-terminal pair in raw mode: the agent opens the slave by path, the test talks on
/// the master, like the host end of a virtio-serial port.
fn raw_pty() -> (fs::File, PathBuf) {
    // SAFETY: posix_openpt with valid flags; the fd is owned right away.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    assert!(
        master >= 0,
        "posix_openpt: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fresh fd owned by nobody else.
    let master = fs::File::from(unsafe { OwnedFd::from_raw_fd(master) });
    // SAFETY: grantpt/unlockpt/ptsname_r on our master fd; the buffer outlives the call.
    let slave = unsafe {
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0);
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0
        );
        std::ffi::CStr::from_ptr(name.as_ptr())
            .to_string_lossy()
            .into_owned()
    };
    // No echo, no line editing, no CR/LF translation: bytes pass as on a virtio port.
    // SAFETY: termios is plain data; tcgetattr fills it before use.
    unsafe {
        let mut termios: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(master.as_raw_fd(), &mut termios), 0);
        libc::cfmakeraw(&mut termios);
        assert_eq!(
            libc::tcsetattr(master.as_raw_fd(), libc::TCSANOW, &termios),
            0
        );
    }
    (master, PathBuf::from(slave))
}

#[test]
fn port_found_by_name_gets_banner_then_replies() {
    let root = tempfile::tempdir().expect("tempdir");
    let (sys, dev) = fake_system(root.path());
    let (master, slave) = raw_pty();
    // devtmpfs would have the node itself; here /dev/vport7p1 points at the pty slave.
    std::os::unix::fs::symlink(&slave, dev.join("vport7p1")).expect("symlink");
    let _agent = Agent(
        Command::new(AGENT)
            .arg("--sys")
            .arg(&sys)
            .arg("--dev")
            .arg(&dev)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn guest-agent"),
    );
    // Lines from the agent arrive on a channel so every wait below has a timeout; the reader
    // thread ends when the agent is killed (reads on the master then fail with EIO).
    let (lines, received) = std::sync::mpsc::channel();
    let reader = master.try_clone().expect("clone");
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let timeout = Duration::from_secs(30);
    let banner = received.recv_timeout(timeout).expect("banner in time");
    assert_eq!(banner, READY_BANNER);
    (&master)
        .write_all(&encode_line(&Request {
            id: 11,
            op: AgentOp::Hello,
        }))
        .expect("send");
    let reply = reply_of(&received.recv_timeout(timeout).expect("reply in time"));
    assert_eq!(reply.id, 11);
    match reply.outcome {
        Outcome::Ok(AgentReply::Hello { agent_version, .. }) => {
            assert_eq!(agent_version, env!("CARGO_PKG_VERSION"))
        }
        other => panic!("unexpected {other:?}"),
    }
}
