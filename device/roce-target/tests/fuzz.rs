//! Fuzz-style properties: whatever arrives, the frame parser and the RC state machine do
//! not panic. Random bytes rarely pass the ICRC, so the second property builds frames with
//! a valid ICRC around random transport headers aimed at a live QP, with PSNs near the
//! ones the QP expects, interleaved with posts and timer ticks.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use p2prig_protocol::target::{MrAccess, QpSettings, Sge};
use proptest::prelude::*;
use roce_target::engine::RemoteBuffer;
use roce_target::frame::{build_roce, parse_frame, RoceRoute};
use roce_target::headers::{psn_add, Bth, Packet, PSN_MASK};
use roce_target::{Engine, EngineConfig, Link};

struct Sink(Arc<Mutex<VecDeque<Vec<u8>>>>);

impl Link for Sink {
    fn transmit(&mut self, frame: &[u8]) -> bool {
        self.0
            .lock()
            .map(|mut q| q.push_back(frame.to_vec()))
            .is_ok()
    }
}

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

#[derive(Debug, Clone)]
enum Action {
    Frame {
        opcode: u8,
        psn_delta: i32,
        relative_to_requester: bool,
        ack_req: bool,
        pad: u8,
        ext: Vec<u8>,
        payload_len: usize,
    },
    Tick(u16),
    PostWrite(u32),
    PostRead(u32),
    PostSend(u32),
    PostRecv(u32),
    Reset,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (
            prop_oneof![0u8..=0x17, any::<u8>()],
            -3i32..4,
            any::<bool>(),
            any::<bool>(),
            0u8..4,
            proptest::collection::vec(any::<u8>(), 0..36),
            0usize..1100,
        )
            .prop_map(|(opcode, psn_delta, relative_to_requester, ack_req, pad, ext, payload_len)| {
                Action::Frame {
                    opcode,
                    psn_delta,
                    relative_to_requester,
                    ack_req,
                    pad,
                    ext,
                    payload_len,
                }
            }),
        1 => (0u16..300).prop_map(Action::Tick),
        1 => (0u32..5000).prop_map(Action::PostWrite),
        1 => (0u32..5000).prop_map(Action::PostRead),
        1 => (0u32..3000).prop_map(Action::PostSend),
        1 => (0u32..3000).prop_map(Action::PostRecv),
        1 => Just(Action::Reset),
    ]
}

struct Target {
    engine: Engine,
    out: Arc<Mutex<VecDeque<Vec<u8>>>>,
    qpn: u32,
    mr: u32,
    mr_va: u64,
    now: Instant,
    ip_id: u16,
}

impl Target {
    fn new() -> Self {
        let out = Arc::new(Mutex::new(VecDeque::new()));
        let mut engine = Engine::new(EngineConfig::default(), Box::new(Sink(Arc::clone(&out))));
        let qp = engine
            .create_qp(&QpSettings {
                ack_timeout_ms: Some(20),
                retry_cnt: Some(3),
                rnr_retry: Some(3),
                max_rd_atomic: Some(2),
                ..Default::default()
            })
            .expect("qp");
        let now = Instant::now();
        engine
            .connect(qp.qpn, 0x11, 0xFF_FFF0, GUEST_IP, Some(GUEST_MAC), now)
            .expect("connect");
        let mr = engine
            .register_mr(
                8192,
                &[
                    MrAccess::LocalWrite,
                    MrAccess::RemoteWrite,
                    MrAccess::RemoteRead,
                ],
            )
            .expect("mr");
        Self {
            engine,
            out,
            qpn: qp.qpn,
            mr: mr.key,
            mr_va: mr.va,
            now,
            ip_id: 0,
        }
    }

    fn frame(&mut self, bth: Bth, ext: &[u8], payload_len: usize) -> Vec<u8> {
        let mut transport = bth.to_bytes().to_vec();
        transport.extend_from_slice(ext);
        transport.extend((0..payload_len).map(|i| i as u8));
        self.ip_id = self.ip_id.wrapping_add(1);
        let route = RoceRoute {
            src_mac: GUEST_MAC,
            dst_mac: EngineConfig::default().mac,
            src_ip: GUEST_IP,
            dst_ip: EngineConfig::default().ip,
            src_port: 0xC123,
            ip_id: self.ip_id,
        };
        build_roce(&route, &transport)
    }

    fn apply(&mut self, action: &Action) {
        let sge = |length: u32| Sge {
            key: self.mr,
            offset: 0,
            length: length.min(8192),
        };
        let remote = RemoteBuffer {
            va: 0x1000,
            rkey: 0x1234,
        };
        match action {
            Action::Frame {
                opcode,
                psn_delta,
                relative_to_requester,
                ack_req,
                pad,
                ext,
                payload_len,
            } => {
                let Ok(status) = self.engine.query_qp(self.qpn) else {
                    return;
                };
                let base = if *relative_to_requester {
                    status.unacked_psn
                } else {
                    status.expected_psn
                };
                let psn = psn_add(base, (*psn_delta as u32) & PSN_MASK);
                let mut bth = Bth::new(*opcode, self.qpn, psn, *ack_req);
                bth.pad = *pad;
                // Half the time, make the extension headers plausible for our MR.
                let mut ext = ext.clone();
                if ext.len() >= 16 && ext[0] & 1 == 0 {
                    ext[..8].copy_from_slice(&self.mr_va.to_be_bytes());
                    ext[8..12].copy_from_slice(&self.mr.to_be_bytes());
                }
                let frame = self.frame(bth, &ext, *payload_len);
                // Every frame we build parses as ours with a good ICRC.
                assert!(parse_frame(
                    &frame,
                    EngineConfig::default().mac,
                    EngineConfig::default().ip
                )
                .is_ok());
                self.engine.receive(&frame, self.now);
            }
            Action::Tick(ms) => {
                self.now += Duration::from_millis(u64::from(*ms));
                self.engine.tick(self.now);
            }
            Action::PostWrite(len) => {
                let _ = self
                    .engine
                    .post_write(self.qpn, 1, sge(*len), remote, None, self.now);
            }
            Action::PostRead(len) => {
                let _ = self
                    .engine
                    .post_read(self.qpn, 2, sge(*len), remote, self.now);
            }
            Action::PostSend(len) => {
                let _ = self
                    .engine
                    .post_send(self.qpn, 3, sge(*len), Some(7), self.now);
            }
            Action::PostRecv(len) => {
                let _ = self.engine.post_recv(self.qpn, 4, sge(*len));
            }
            Action::Reset => {
                if let Ok(qp) = self.engine.reset_qp(self.qpn, None) {
                    let _ = self
                        .engine
                        .connect(qp.qpn, 0x11, 0, GUEST_IP, None, self.now);
                }
            }
        }
        // Everything the target sends is well formed RoCE or ARP.
        let sent: Vec<Vec<u8>> = self.out.lock().expect("lock").drain(..).collect();
        for frame in sent {
            if frame.len() > 46 && frame[12..14] == [0x08, 0x00] {
                let parsed = parse_frame(&frame, GUEST_MAC, GUEST_IP);
                let Ok(roce_target::frame::Incoming::Roce(roce)) = parsed else {
                    panic!("target sent an unparsable frame: {parsed:?}");
                };
                let packet = Packet::parse(roce.transport).expect("transport parses");
                assert!(packet.pad_is_aligned());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_engine(frames in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 0..1600), 1..20)
    ) {
        let mut target = Target::new();
        for frame in &frames {
            target.engine.receive(frame, target.now);
            let _ = parse_frame(frame, EngineConfig::default().mac, EngineConfig::default().ip);
        }
    }

    #[test]
    fn random_valid_icrc_packets_and_posts_never_panic_the_rc_state_machine(
        actions in proptest::collection::vec(action(), 1..60)
    ) {
        let mut target = Target::new();
        for action in &actions {
            target.apply(action);
        }
        let _ = target.engine.poll_cq(None, usize::MAX);
        let stats = target.engine.stats();
        prop_assert!(stats.frames_in >= stats.roce_in);
    }

    #[test]
    fn mutated_frames_never_panic(
        flips in proptest::collection::vec((0usize..120, any::<u8>()), 1..8),
        truncate in 0usize..130,
    ) {
        let mut target = Target::new();
        let bth = Bth::new(0x0A, target.qpn, 0xFF_FFF0, true);
        let mut ext = target.mr_va.to_be_bytes().to_vec();
        ext.extend_from_slice(&target.mr.to_be_bytes());
        ext.extend_from_slice(&8u32.to_be_bytes());
        let mut frame = target.frame(bth, &ext, 8);
        for (at, value) in flips {
            if let Some(byte) = frame.get_mut(at) {
                *byte ^= value;
            }
        }
        frame.truncate(truncate.max(1));
        target.engine.receive(&frame, target.now);
    }
}
