//! The pair the loopback tests drive: two RC engines joined by in-memory links, with
//! synthetic time.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use p2prig_protocol::target::{MrAccess, QpSettings};
use roce_target::headers::Packet;
use roce_target::{Engine, EngineConfig, Link};

pub type Wire = Arc<Mutex<VecDeque<Vec<u8>>>>;

pub struct QueueLink(pub Wire);

impl Link for QueueLink {
    fn transmit(&mut self, frame: &[u8]) -> bool {
        match self.0.lock() {
            Ok(mut queue) => {
                queue.push_back(frame.to_vec());
                true
            }
            Err(_) => false,
        }
    }
}

pub const ALL: [MrAccess; 3] = [
    MrAccess::LocalWrite,
    MrAccess::RemoteWrite,
    MrAccess::RemoteRead,
];

pub struct Pair {
    pub a: Engine,
    pub b: Engine,
    pub a_out: Wire,
    pub b_out: Wire,
    pub now: Instant,
    pub a_qpn: u32,
    pub b_qpn: u32,
}

/// The opcode of a RoCE frame, if it is one.
pub fn roce_opcode(frame: &[u8]) -> Option<(u8, u32)> {
    let transport = frame.get(42..frame.len().checked_sub(4)?)?;
    let packet = Packet::parse(transport).ok()?;
    Some((packet.bth.opcode, packet.bth.psn))
}

impl Pair {
    pub fn new(settings: QpSettings) -> Self {
        let a_out = Wire::default();
        let b_out = Wire::default();
        let a_config = EngineConfig::default();
        let b_config = EngineConfig {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            ip: Ipv4Addr::new(10, 0, 2, 15),
        };
        let mut a = Engine::new(a_config, Box::new(QueueLink(Arc::clone(&a_out))));
        let mut b = Engine::new(b_config, Box::new(QueueLink(Arc::clone(&b_out))));
        let qa = a.create_qp(&settings).expect("qp a");
        let qb = b.create_qp(&settings).expect("qp b");
        let now = Instant::now();
        // B learns A's MAC by ARP (the target answers); A is given B's MAC.
        a.connect(qa.qpn, qb.qpn, qb.psn, b_config.ip, Some(b_config.mac), now)
            .expect("connect a");
        b.connect(qb.qpn, qa.qpn, qa.psn, a_config.ip, None, now)
            .expect("connect b");
        let mut pair = Self {
            a,
            b,
            a_out,
            b_out,
            now,
            a_qpn: qa.qpn,
            b_qpn: qb.qpn,
        };
        pair.run(|_, _| true);
        pair
    }

    /// Moves frames both ways until both links are quiet; `keep(from_a, frame)` may drop.
    pub fn run(&mut self, mut keep: impl FnMut(bool, &[u8]) -> bool) -> usize {
        let mut moved = 0;
        for _ in 0..100_000 {
            let from_a = self.a_out.lock().expect("lock").pop_front();
            if let Some(frame) = &from_a {
                moved += 1;
                if keep(true, frame) {
                    self.b.receive(frame, self.now);
                }
            }
            let from_b = self.b_out.lock().expect("lock").pop_front();
            if let Some(frame) = &from_b {
                moved += 1;
                if keep(false, frame) {
                    self.a.receive(frame, self.now);
                }
            }
            if from_a.is_none() && from_b.is_none() {
                break;
            }
        }
        moved
    }

    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.a.tick(self.now);
        self.b.tick(self.now);
    }

    pub fn mr(engine: &mut Engine, len: u64, fill: u8) -> (u32, u64) {
        let mr = engine.register_mr(len, &ALL).expect("mr");
        engine.mr_fill(mr.key, 0, len, &[fill]).expect("fill");
        (mr.key, mr.va)
    }
}

pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}
