//! Target `roce_frame`: frames from the guest into roce-target's RC engine.
//!
//! The input (cut at 128 KiB) is a sequence of records (at most 32) separated by
//! [`SEPARATOR`]; a record's first byte says what the rest is (its value modulo 3):
//! - 0: a raw Ethernet frame, as the guest's virtio-net TX queue hands it over (at most
//!   `backend::MAX_TX_FRAME` bytes: the backend drops longer ones before the engine);
//! - 1: a transport packet (BTH through pad), wrapped here in Ethernet/IPv4/UDP with a valid
//!   ICRC, so mutations reach the transport parser and the RC state machine instead of dying
//!   at the ICRC check;
//! - 2: a timer tick of the next two bytes (big-endian) in milliseconds.
//!
//! Every record goes through `frame::parse_frame`, `headers::Packet::parse` and
//! `Engine::receive` (or `Engine::tick`) on one engine per input with a connected QP, an MR,
//! and a WRITE, a READ, a SEND and a receive buffer posted, so that requests and responses
//! both find something to act on. Properties:
//! - a wrapped transport packet parses back out of its frame unchanged, from the guest;
//! - a packet that parses re-encodes (`PacketSpec::write`) to the same bytes (pad bytes and
//!   BTH's reserved bits aside, which receivers ignore) when its pad count is the one its
//!   payload needs;
//! - the engine never panics (its documented promise), and every frame it sends in reply
//!   is itself well formed: a valid ARP, or RoCEv2 with good checksums and ICRC and a
//!   transport packet that parses with its payload padded to four bytes.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use p2prig_protocol::target::{MrAccess, QpSettings, Sge};
use roce_target::backend::MAX_TX_FRAME;
use roce_target::engine::RemoteBuffer;
use roce_target::frame::{build_roce, parse_frame, FrameError, Incoming, RoceRoute};
use roce_target::headers::{Bth, Packet, PacketSpec};
use roce_target::{Engine, EngineConfig, Link};

/// Separates the records of one input (also in the target's dictionary).
pub const SEPARATOR: &[u8] = b"%%%%";
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest's QP number and first PSN, which the target's QP expects.
pub const GUEST_QPN: u32 = 0x12;
pub const GUEST_PSN: u32 = 0x200;
/// The first PSN the target's QP sends (its WRITE, READ and SEND start here).
pub const TARGET_PSN: u32 = 0x100;
/// Records after these are ignored: longer inputs add no new paths, only time per execution
/// (havoc splices grow inputs to tens of kilobytes of tiny records).
const MAX_RECORDS: usize = 32;
/// Inputs are cut at this many bytes: 32 records of the largest packets fit, and the work of
/// one execution is linear in its bytes (a megabyte in one record took over 100 ms).
const MAX_INPUT: usize = 128 << 10;
/// The largest transport packet wrapped into one frame: a 4096-byte MTU and its headers fit.
const MAX_WRAPPED: usize = 4200;

/// The frames the engine sends, kept for [`check_outgoing`].
#[derive(Debug, Clone, Default)]
pub struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

impl Sink {
    /// Takes the frames sent since the last call.
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Link for Sink {
    fn transmit(&mut self, frame: &[u8]) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(frame.to_vec());
        true
    }
}

/// Asserts that a frame the engine sent is well formed, wherever it is addressed.
pub fn check_outgoing(frame: &[u8]) {
    let mac: [u8; 6] = frame
        .get(..6)
        .and_then(|b| b.try_into().ok())
        .unwrap_or_else(|| panic!("outgoing frame of {} bytes", frame.len()));
    // The IPv4 destination (bytes 30..34 behind a 14-byte Ethernet header); an ARP frame
    // is not checked against it.
    let ip = frame.get(30..34).map_or(Ipv4Addr::UNSPECIFIED, |b| {
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    });
    match parse_frame(frame, mac, ip) {
        Ok(Incoming::Arp { .. }) => {}
        Ok(Incoming::Roce(roce)) => {
            let packet = Packet::parse(roce.transport)
                .unwrap_or_else(|e| panic!("the engine sent a packet that does not parse: {e}"));
            assert!(packet.pad_is_aligned(), "the engine sent a misaligned pad");
        }
        Err(error) => panic!("the engine sent a frame that does not parse: {error}"),
    }
}

fn route(ip_id: u16) -> RoceRoute {
    let target = EngineConfig::default();
    RoceRoute {
        src_mac: GUEST_MAC,
        dst_mac: target.mac,
        src_ip: GUEST_IP,
        dst_ip: target.ip,
        src_port: 0xC000 | ip_id,
        ip_id,
    }
}

/// The engine of one input: a QP connected to the guest with work in flight both ways.
fn engine(now: Instant) -> (Engine, Sink) {
    let sink = Sink::default();
    let mut engine = Engine::new(EngineConfig::default(), Box::new(sink.clone()));
    let setup = (|| {
        let qp = engine.create_qp(&QpSettings {
            path_mtu: Some(256),
            psn: Some(TARGET_PSN),
            ack_timeout_ms: Some(20),
            retry_cnt: Some(3),
            rnr_retry: Some(3),
            max_rd_atomic: Some(2),
            ..Default::default()
        })?;
        engine.connect(qp.qpn, GUEST_QPN, GUEST_PSN, GUEST_IP, Some(GUEST_MAC), now)?;
        let all = [
            MrAccess::LocalWrite,
            MrAccess::RemoteWrite,
            MrAccess::RemoteRead,
        ];
        let mr = engine.register_mr(4096, &all)?;
        let sge = |offset, length| Sge {
            key: mr.key,
            offset,
            length,
        };
        let remote = RemoteBuffer {
            va: 0x1000,
            rkey: 0x1234,
        };
        engine.post_recv(qp.qpn, 4, sge(2048, 1024))?;
        engine.post_write(qp.qpn, 1, sge(0, 600), remote, None, now)?;
        engine.post_read(qp.qpn, 2, sge(1024, 512), remote, now)?;
        engine.post_send(qp.qpn, 3, sge(0, 100), Some(7), now)?;
        Ok::<_, roce_target::EngineError>(())
    })();
    if let Err(error) = setup {
        panic!("the fuzz engine's setup failed: {error}");
    }
    (engine, sink)
}

pub fn check(data: &[u8]) {
    let start = Instant::now();
    let mut now = start;
    let (mut engine, sink) = engine(now);
    for frame in sink.take() {
        check_outgoing(&frame);
    }
    let target = EngineConfig::default();
    let data = &data[..data.len().min(MAX_INPUT)];
    for (index, record) in split(data).take(MAX_RECORDS).enumerate() {
        let Some((&kind, rest)) = record.split_first() else {
            continue;
        };
        match kind % 3 {
            0 => {
                if rest.len() > MAX_TX_FRAME {
                    continue;
                }
                if let Ok(Incoming::Roce(roce)) = parse_frame(rest, target.mac, target.ip) {
                    check_packet(roce.transport);
                }
                engine.receive(rest, now);
            }
            1 => {
                check_packet(rest);
                if rest.len() > MAX_WRAPPED {
                    continue;
                }
                let route = route(index as u16);
                let frame = build_roce(&route, rest);
                match parse_frame(&frame, target.mac, target.ip) {
                    Ok(Incoming::Roce(roce)) => {
                        assert_eq!(roce.transport, rest, "transport changed in its frame");
                        assert_eq!(
                            (roce.src_mac, roce.src_ip, roce.src_port),
                            (route.src_mac, route.src_ip, route.src_port)
                        );
                    }
                    Err(FrameError::Malformed(_)) if rest.len() < Bth::LEN => {}
                    other => panic!("a built frame of {} transport bytes: {other:?}", rest.len()),
                }
                engine.receive(&frame, now);
            }
            _ => {
                let ms = rest
                    .get(..2)
                    .map_or(1, |b| u16::from_be_bytes([b[0], b[1]]));
                now += Duration::from_millis(u64::from(ms));
                engine.tick(now);
            }
        }
        for frame in sink.take() {
            check_outgoing(&frame);
        }
    }
}

/// The records of an input.
fn split(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let current = rest?;
        match current
            .windows(SEPARATOR.len())
            .position(|w| w == SEPARATOR)
        {
            Some(at) => {
                rest = Some(&current[at + SEPARATOR.len()..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

/// `Packet::parse` on transport bytes, and the re-encoding of what it understood.
fn check_packet(transport: &[u8]) {
    let Ok(packet) = Packet::parse(transport) else {
        return;
    };
    let pad = usize::from(packet.bth.pad);
    if !packet.pad_is_aligned() {
        return;
    }
    let spec = PacketSpec {
        bth: packet.bth,
        reth: packet.reth,
        atomic_eth: packet.atomic_eth,
        aeth: packet.aeth,
        atomic_ack_eth: packet.atomic_ack_eth,
        immdt: packet.immdt,
        ieth: packet.ieth,
        payload: packet.payload,
    };
    let mut written = Vec::new();
    spec.write(&mut written);
    assert_eq!(
        written.len(),
        spec.len(),
        "PacketSpec::len disagrees with write"
    );
    assert_eq!(written.len(), transport.len(), "re-encoded length");
    // BTH byte 8 is AckReq and seven reserved bits, which the parser drops; the pad bytes
    // are the sender's.
    let significant = |bytes: &[u8]| {
        let mut bytes = bytes[..bytes.len() - pad].to_vec();
        bytes[8] &= 0x80;
        bytes
    };
    assert_eq!(
        significant(&written),
        significant(transport),
        "re-encoded packet"
    );
    let again = Packet::parse(&written).expect("a re-encoded packet parses");
    assert_eq!(again, packet, "packet changed through PacketSpec::write");
}
