//! Bounded, seeded random input to every parser of untrusted bytes: region accesses, control
//! lines and raw vfio-user messages. The property: no panic escapes, every request gets an
//! answer or ends only its own connection, and the device keeps serving.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvme_cmb::{Device, DeviceSettings, EventLog};

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn random_region_accesses_never_panic_and_keep_the_device_consistent() {
    let device = Device::new(
        DeviceSettings {
            cmb_size: 64 << 10,
            ..Default::default()
        },
        Arc::new(EventLog::new(1024, None)),
    )
    .expect("device");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let offsets = [
        0u64, 3, 0x14, 0x1c, 0x44, 0x58, 0xfff, 0x1000, 0x3ffc, 0xfffc, 0x1_0000,
    ];
    for _ in 0..20_000 {
        let region = rng.below(10) as u32;
        let offset = match rng.below(4) {
            0 => rng.next(),
            1 => u64::MAX - rng.below(16),
            _ => rng.pick(&offsets) + rng.below(8),
        };
        let size = rng.pick(&[0usize, 1, 2, 3, 4, 8, 16, 4096]);
        if rng.below(2) == 0 {
            let mut buf = vec![0u8; size];
            let _ = device.region_read(region, offset, &mut buf);
        } else {
            let data = rng.bytes(size);
            let _ = device.region_write(region, offset, &data);
        }
    }
    // Config space still answers (possibly after a reset the random writes started).
    let mut id = [0u8; 4];
    let _ = device.region_read(7, 0, &mut id);
    let dump = device.registers();
    assert!(dump.in_reset.is_none(), "resets have no duration here");
    assert_eq!(u32::from_le_bytes(id), 0xc0b2_1b36);
}

#[test]
fn random_control_lines_always_get_a_reply() {
    let rig = Rig::default();
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let fragments: [&[u8]; 12] = [
        b"{",
        b"}",
        b"\"id\":",
        b"\"op\":\"events_since\"",
        b"\"op\":\"cmb_read\"",
        b"\"op\":\"wait_for\",\"timeout_ms\":0",
        b",",
        b"\"since\":18446744073709551615",
        b"\"length\":4294967295",
        b"null",
        b"\xff",
        b"1e999",
    ];
    let mut control = rig.control_client();
    for _ in 0..300 {
        let mut line = Vec::new();
        for _ in 0..rng.below(8) + 1 {
            if rng.below(4) == 0 {
                let len = rng.below(12) as usize;
                line.extend(rng.bytes(len).into_iter().filter(|b| *b != b'\n'));
            } else {
                line.extend_from_slice(rng.pick(&fragments));
            }
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        line.push(b'\n');
        let _ = control.send_raw(&line);
    }
    assert!(matches!(
        control.call(p2prig_protocol::device::DeviceOp::Stats),
        p2prig_protocol::wire::Outcome::Ok(_)
    ));
}

#[test]
fn random_vfio_user_messages_never_take_the_server_down() {
    let rig = Rig::default();
    // NVME_CMB_FUZZ_SEED / NVME_CMB_FUZZ_CONNECTIONS widen the search by hand.
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let mut rng = Rng(env("NVME_CMB_FUZZ_SEED", 0x0123_4567_89ab_cdef) | 1);
    for _ in 0..env("NVME_CMB_FUZZ_CONNECTIONS", 40) {
        let mut stream = std::os::unix::net::UnixStream::connect(&rig.socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        for _ in 0..rng.below(6) + 1 {
            let command = rng.below(16) as u16;
            let payload_len = rng.pick(&[0usize, 4, 8, 16, 24, 32, 64, 200]);
            let mut payload = rng.bytes(payload_len);
            // Keep some region accesses plausible so they reach the device.
            if (command == 9 || command == 10) && payload_len >= 16 {
                payload[8..12].copy_from_slice(&(rng.below(10) as u32).to_le_bytes());
                payload[12..16].copy_from_slice(&(rng.below(16) as u32).to_le_bytes());
            }
            let size = match rng.below(3) {
                0 => rng.next() as u32,
                _ => (HEADER_SIZE + payload_len) as u32,
            };
            let mut message = Vec::new();
            message.extend_from_slice(&(rng.next() as u16).to_le_bytes());
            message.extend_from_slice(&command.to_le_bytes());
            message.extend_from_slice(&size.to_le_bytes());
            message
                .extend_from_slice(&(rng.pick(&[0u32, 0x10, 1, 0x20, 0xffff_ffff])).to_le_bytes());
            message.extend_from_slice(&0u32.to_le_bytes());
            message.extend_from_slice(&payload);
            if stream.write_all(&message).is_err() {
                break;
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        // Drain until the server closes its end: it must not hang on a half-read message.
        let mut sink = Vec::new();
        // A reset instead of an orderly close is fine: the server closed with input unread.
        let drained = stream.read_to_end(&mut sink);
        let hung = matches!(&drained, Err(e) if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ));
        assert!(!hung, "server left the connection hanging: {drained:?}");
    }
    let mut client = rig.decoding_client();
    write32(&mut client, BAR0, 0x1000, 1);
    assert_eq!(read32(&mut client, BAR0, 0x08), 0x0001_0400);
}
