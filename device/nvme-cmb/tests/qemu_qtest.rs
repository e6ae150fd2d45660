//! End to end with a real QEMU (>= 10.1) driven through its qtest protocol: no guest, no
//! firmware; port I/O to 0xcf8/0xcfc programs config space and readl/writel reach the BARs
//! through QEMU's vfio-user client, exactly as guest accesses would.
//!
//! Ignored by default: `NVME_CMB_QEMU=/path/to/qemu-system-x86_64 cargo test -p nvme-cmb
//! --test qemu_qtest -- --ignored`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use p2prig_protocol::event::{Access, Event, EventKind};

/// Kills and reaps a child on drop, so no QEMU or device outlives a failed test.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Qtest {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qtest {
    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.writer, "{line}").expect("qtest send");
        loop {
            let mut reply = String::new();
            let n = self.reader.read_line(&mut reply).expect("qtest reply");
            assert!(n > 0, "QEMU closed the qtest socket after {line:?}");
            // Asynchronous notifications start with IRQ; replies with OK/FAIL/ERR.
            if reply.starts_with("OK") || reply.starts_with("FAIL") || reply.starts_with("ERR") {
                assert!(reply.starts_with("OK"), "{line:?} -> {reply:?}");
                return reply.trim().to_string();
            }
        }
    }

    fn value(&mut self, line: &str) -> u64 {
        let reply = self.cmd(line);
        let hex = reply.split_whitespace().nth(1).expect("value");
        u64::from_str_radix(hex.trim_start_matches("0x"), 16).expect("hex value")
    }

    /// Config address of bus 0, device 5, function 0.
    fn select(&mut self, register: u32) {
        let address = 0x8000_0000u32 | 5 << 11 | register;
        self.cmd(&format!("outl 0xcf8 {address:#x}"));
    }

    fn config_read(&mut self, register: u32) -> u32 {
        self.select(register);
        self.value("inl 0xcfc") as u32
    }

    fn config_write(&mut self, register: u32, value: u32) {
        self.select(register);
        self.cmd(&format!("outl 0xcfc {value:#x}"));
    }
}

fn wait_for(paths: &[&Path]) {
    for _ in 0..1000 {
        if paths.iter().all(|p| p.exists()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("sockets did not appear");
}

fn events(trace: &Path) -> Vec<Event> {
    std::fs::read_to_string(trace)
        .expect("trace")
        .lines()
        .map(|l| serde_json::from_str(l).expect("event"))
        .collect()
}

fn run(qemu: PathBuf, cmb_mode: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vfu.sock");
    let control = dir.path().join("control.sock");
    let trace = dir.path().join("trace.jsonl");
    let _device = Reaped(
        Command::new(env!("CARGO_BIN_EXE_nvme-cmb"))
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .arg("--trace")
            .arg(&trace)
            .args(["--cmb-mode", cmb_mode, "--reset-ms", "300"])
            .stderr(Stdio::null())
            .spawn()
            .expect("nvme-cmb"),
    );
    wait_for(&[&socket, &control]);
    let qtest_path = dir.path().join("qtest.sock");
    let listener = UnixListener::bind(&qtest_path).expect("qtest listener");
    let device_json = format!(
        r#"{{"driver":"vfio-user-pci","socket":{{"path":"{}","type":"unix"}},"addr":"0x5"}}"#,
        socket.display()
    );
    let _qemu = Reaped(
        Command::new(qemu)
            .args([
                "-M",
                "q35,memory-backend=mem",
                "-accel",
                "qtest",
                "-nodefaults",
            ])
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .args(["-display", "none", "-vga", "none", "-nic", "none"])
            .args(["-L", "/usr/share/seabios", "-L", "/usr/share/qemu"])
            .arg("-qtest")
            .arg(format!("unix:{}", qtest_path.display()))
            .args(["-device", &device_json])
            .stdout(Stdio::null())
            .spawn()
            .expect("QEMU starts"),
    );
    let (stream, _) = listener.accept().expect("QEMU connects to qtest");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut qt = Qtest {
        reader: BufReader::new(stream.try_clone().expect("clone")),
        writer: stream,
    };

    assert_eq!(qt.config_read(0x00), 0xc0b2_1b36);
    assert_eq!(qt.config_read(0x08) >> 8, 0x01_0802);
    qt.config_write(0x10, 0xffff_ffff);
    assert_eq!(qt.config_read(0x10), 0xffff_c004);
    qt.config_write(0x10, 0xc000_0000);
    qt.config_write(0x14, 0);
    qt.config_write(0x18, 0xc010_0000);
    qt.config_write(0x1c, 0);
    qt.config_write(0x04, 0x0006);

    assert_eq!(qt.value("readl 0xc0000008"), 0x0001_0400, "VS");
    qt.cmd("writel 0xc0001008 0x7");
    qt.cmd("writel 0xc0100010 0xdeadbeef");
    assert_eq!(qt.value("readl 0xc0100010"), 0xdead_beef);

    // FLR with a 300 ms window: config reads all-ones, a doorbell write is a violation.
    qt.config_write(0x58, 0x8000);
    assert_eq!(qt.config_read(0x00), 0xffff_ffff);
    qt.cmd("writel 0xc0001000 0x1");
    qt.value("readl 0xc0000008");
    let mut back = false;
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(10));
        if qt.config_read(0x00) == 0xc0b2_1b36 {
            back = true;
            break;
        }
    }
    assert!(back, "function back after the reset window");

    let events = events(&trace);
    // Everything QEMU's client sent (VERSION, DMA maps and unmaps, region infos, SET_IRQS,
    // accesses) passed the framing's checks.
    let refused: Vec<&EventKind> = events
        .iter()
        .map(|e| &e.kind)
        .filter(|k| k.name() == "bad_request")
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    let bar_writes: Vec<(u8, u64, Option<u64>)> = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Bar {
                access: Access::Write,
                bar,
                offset,
                value,
                ..
            } => Some((bar, offset, value)),
            _ => None,
        })
        .collect();
    let expected: &[(u8, u64, Option<u64>)] = if cmb_mode == "trap" {
        &[(0, 0x1008, Some(7)), (2, 0x10, Some(0xdead_beef))]
    } else {
        &[(0, 0x1008, Some(7))]
    };
    assert_eq!(bar_writes, expected);
    let violations: Vec<(String, Access, u64)> = events
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Violation {
                reason,
                access,
                offset,
                ..
            } => Some((reason, access, offset)),
            _ => None,
        })
        .collect();
    assert_eq!(
        violations,
        [
            ("in_reset:flr".to_string(), Access::Write, 0x1000),
            ("in_reset:flr".to_string(), Access::Read, 0x8),
        ]
    );
}

fn qemu() -> Option<PathBuf> {
    std::env::var_os("NVME_CMB_QEMU").map(PathBuf::from)
}

#[test]
#[ignore = "needs QEMU >= 10.1: set NVME_CMB_QEMU and pass --ignored"]
fn qemu_reaches_registers_doorbells_and_trapped_cmb_and_flr_window_flags_accesses() {
    run(qemu().expect("NVME_CMB_QEMU"), "trap");
}

#[test]
#[ignore = "needs QEMU >= 10.1: set NVME_CMB_QEMU and pass --ignored"]
fn qemu_maps_the_cmb_in_mmap_mode_and_only_register_accesses_are_trapped() {
    run(qemu().expect("NVME_CMB_QEMU"), "mmap");
}
