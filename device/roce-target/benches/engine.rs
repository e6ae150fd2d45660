//! Engine figures: segmenting a 1 MiB RDMA WRITE into 1024-byte packets with their ICRC,
//! and an 8-byte WRITE round trip (post, responder, ACK, completion) between two engines
//! over a loopback link. Prints figures; asserts no wall-clock bound.

use std::collections::VecDeque;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use p2prig_protocol::target::{MrAccess, QpSettings, Sge};
use roce_target::engine::RemoteBuffer;
use roce_target::frame::{write_roce, RoceRoute};
use roce_target::headers::{opcode, packet_count, Bth, PacketSpec, Position, Reth};
use roce_target::{Engine, EngineConfig, Link};

type Wire = Arc<Mutex<VecDeque<Vec<u8>>>>;

struct QueueLink(Wire);

impl Link for QueueLink {
    fn transmit(&mut self, frame: &[u8]) -> bool {
        self.0
            .lock()
            .map(|mut q| q.push_back(frame.to_vec()))
            .is_ok()
    }
}

const ACCESS: [MrAccess; 3] = [
    MrAccess::LocalWrite,
    MrAccess::RemoteWrite,
    MrAccess::RemoteRead,
];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

fn segmentation(c: &mut Criterion) {
    // The requester's per-packet work for a 1 MiB WRITE at a 1024-byte path MTU: BTH (+RETH
    // on the first), payload copy, Eth/IPv4/UDP headers and the ICRC, 1024 times.
    const LEN: usize = 1 << 20;
    const PMTU: usize = 1024;
    let data = vec![0x5Au8; LEN];
    let route = RoceRoute {
        src_mac: EngineConfig::default().mac,
        dst_mac: GUEST_MAC,
        src_ip: EngineConfig::default().ip,
        dst_ip: GUEST_IP,
        src_port: 0xC001,
        ip_id: 1,
    };
    let mut frame = Vec::with_capacity(PMTU + 100);
    let mut group = c.benchmark_group("segmentation");
    group.throughput(Throughput::Bytes(LEN as u64));
    group.bench_function("write_1MiB_pmtu1024_frames_with_icrc", |b| {
        b.iter(|| {
            let count = packet_count(LEN as u64, PMTU as u32);
            let mut bytes = 0usize;
            for i in 0..count {
                let position = Position::of(i, count);
                let op = match position {
                    Position::First => opcode::WRITE_FIRST,
                    Position::Middle => opcode::WRITE_MIDDLE,
                    Position::Last => opcode::WRITE_LAST,
                    Position::Only => opcode::WRITE_ONLY,
                };
                let mut spec = PacketSpec::new(Bth::new(op, 0x11, i, position.ends_message()));
                if position.starts_message() {
                    spec.reth = Some(Reth {
                        va: 0x1000,
                        rkey: 0x1234,
                        length: LEN as u32,
                    });
                }
                let start = i as usize * PMTU;
                spec.payload = &data[start..(start + PMTU).min(LEN)];
                write_roce(&route, spec.len(), &mut frame, |out| spec.write(out));
                bytes += frame.len();
            }
            black_box(bytes)
        })
    });
    group.finish();
}

fn full_write(c: &mut Criterion) {
    // The whole 1 MiB WRITE through a peer: segmentation, ICRC both ways, ACKs.
    let (mut a, mut b, a_out, b_out, a_qpn, src, dst) = pair(1 << 20);
    let now = Instant::now();
    let mut group = c.benchmark_group("loopback");
    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function("write_1MiB_through_peer", |bench| {
        bench.iter(|| {
            a.post_write(
                a_qpn,
                1,
                Sge {
                    key: src,
                    offset: 0,
                    length: 1 << 20,
                },
                dst,
                None,
                now,
            )
            .expect("post");
            shuttle(&mut a, &mut b, &a_out, &b_out, now);
            assert_eq!(a.poll_cq(None, 4).len(), 1);
        })
    });
    group.finish();
}

#[allow(clippy::type_complexity)]
fn pair(len: u64) -> (Engine, Engine, Wire, Wire, u32, u32, RemoteBuffer) {
    let a_out = Wire::default();
    let b_out = Wire::default();
    let mut a = Engine::new(
        EngineConfig::default(),
        Box::new(QueueLink(Arc::clone(&a_out))),
    );
    let mut b = Engine::new(
        EngineConfig {
            mac: GUEST_MAC,
            ip: GUEST_IP,
        },
        Box::new(QueueLink(Arc::clone(&b_out))),
    );
    let qa = a.create_qp(&QpSettings::default()).expect("qp");
    let qb = b.create_qp(&QpSettings::default()).expect("qp");
    let now = Instant::now();
    a.connect(qa.qpn, qb.qpn, qb.psn, GUEST_IP, Some(GUEST_MAC), now)
        .expect("connect");
    b.connect(
        qb.qpn,
        qa.qpn,
        qa.psn,
        EngineConfig::default().ip,
        Some(EngineConfig::default().mac),
        now,
    )
    .expect("connect");
    let src = a.register_mr(len, &ACCESS).expect("mr");
    let dst = b.register_mr(len, &ACCESS).expect("mr");
    (
        a,
        b,
        a_out,
        b_out,
        qa.qpn,
        src.key,
        RemoteBuffer {
            va: dst.va,
            rkey: dst.key,
        },
    )
}

fn shuttle(a: &mut Engine, b: &mut Engine, a_out: &Wire, b_out: &Wire, now: Instant) {
    loop {
        let from_a = a_out.lock().ok().and_then(|mut q| q.pop_front());
        if let Some(frame) = &from_a {
            b.receive(frame, now);
        }
        let from_b = b_out.lock().ok().and_then(|mut q| q.pop_front());
        if let Some(frame) = &from_b {
            a.receive(frame, now);
        }
        if from_a.is_none() && from_b.is_none() {
            break;
        }
    }
}

fn round_trip(c: &mut Criterion) {
    let (mut a, mut b, a_out, b_out, a_qpn, src, dst) = pair(4096);
    let now = Instant::now();
    c.bench_function("loopback/write_8B_round_trip", |bench| {
        bench.iter(|| {
            a.post_write(
                a_qpn,
                1,
                Sge {
                    key: src,
                    offset: 0,
                    length: 8,
                },
                dst,
                None,
                now,
            )
            .expect("post");
            shuttle(&mut a, &mut b, &a_out, &b_out, now);
            black_box(a.poll_cq(None, 1));
        })
    });
}

criterion_group!(benches, segmentation, full_write, round_trip);
criterion_main!(benches);
