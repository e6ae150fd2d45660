//! The vhost-user-net backend driven through `handle_event` with virtio-queue's mock split
//! queues over real guest memory (GuestMemoryMmap), as rust-vmm's vhost-device crates test
//! their devices: no QEMU, no socket.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use p2prig_protocol::target::{CompletionStatus, MrAccess, QpSettings, Sge};
use roce_target::backend::{
    device_features, GuestLink, GuestQueue, NetBackend, FRAMES_WAITING_EVENT, NET_HDR_LEN,
    RX_QUEUE, TX_QUEUE,
};
use roce_target::engine::RemoteBuffer;
use roce_target::frame::{arp_request, parse_frame, Incoming};
use roce_target::{Engine, EngineConfig, Link};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const QUEUE_SIZE: u16 = 16;
const RX_RING: u64 = 0x0;
const TX_RING: u64 = 0x1_0000;
const RX_BUFFERS: u64 = 0x4_0000;
const TX_BUFFERS: u64 = 0x8_0000;
const BUFFER: u64 = 0x1000;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const TARGET_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

struct Rig {
    mem: &'static GuestMemoryMmap,
    rx_mock: MockSplitQueue<'static, GuestMemoryMmap>,
    tx_mock: MockSplitQueue<'static, GuestMemoryMmap>,
    backend: NetBackend,
    engine: Arc<Mutex<Engine>>,
    queue: Arc<GuestQueue>,
    vrings: Vec<VringRwLock>,
    rx_added: u16,
    tx_added: u16,
    rx_seen: u16,
}

impl Rig {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("memory");
        // The mocks borrow the memory for the whole test; a leaked clone (the regions are
        // shared) gives them a 'static one.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(mem));
        let rx_mock = MockSplitQueue::create(mem, GuestAddress(RX_RING), QUEUE_SIZE);
        let tx_mock = MockSplitQueue::create(mem, GuestAddress(TX_RING), QUEUE_SIZE);
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let queue = Arc::new(GuestQueue::new().expect("eventfd"));
        let engine = Arc::new(Mutex::new(Engine::new(
            EngineConfig::default(),
            Box::new(GuestLink(Arc::clone(&queue))),
        )));
        let backend = NetBackend::new(
            Arc::clone(&engine),
            Arc::clone(&queue),
            EngineConfig::default().mac,
        );
        backend.update_memory(atomic.clone()).expect("memory");
        let vrings = [&rx_mock, &tx_mock]
            .iter()
            .map(|mock| {
                let vring = VringRwLock::new(atomic.clone(), 1024).expect("vring");
                vring.set_queue_size(QUEUE_SIZE);
                vring
                    .set_queue_info(
                        mock.desc_table_addr().0,
                        mock.avail_addr().0,
                        mock.used_addr().0,
                    )
                    .expect("queue info");
                vring.set_queue_ready(true);
                vring.set_enabled(true);
                vring
            })
            .collect();
        Self {
            mem,
            rx_mock,
            tx_mock,
            backend,
            engine,
            queue,
            vrings,
            rx_added: 0,
            tx_added: 0,
            rx_seen: 0,
        }
    }

    fn mock(&self, base: u64) -> &MockSplitQueue<'static, GuestMemoryMmap> {
        if base == RX_RING {
            &self.rx_mock
        } else {
            &self.tx_mock
        }
    }

    fn add_rx_buffers(&mut self, count: u16, len: u32) {
        for _ in 0..count {
            let index = self.rx_added % QUEUE_SIZE;
            let desc = RawDescriptor::from(SplitDescriptor::new(
                RX_BUFFERS + u64::from(index) * BUFFER,
                len,
                VRING_DESC_F_WRITE as u16,
                0,
            ));
            self.mock(RX_RING)
                .add_desc_chains(&[desc], index)
                .expect("rx chain");
            self.rx_added += 1;
        }
    }

    /// Queues a frame for transmission, with the 12-byte virtio-net header in front.
    fn add_tx_frame(&mut self, frame: &[u8]) {
        let index = self.tx_added % QUEUE_SIZE;
        let addr = TX_BUFFERS + u64::from(index) * BUFFER * 2;
        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes.extend_from_slice(frame);
        self.mem
            .write_slice(&bytes, GuestAddress(addr))
            .expect("write");
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, bytes.len() as u32, 0, 0));
        self.mock(TX_RING)
            .add_desc_chains(&[desc], index)
            .expect("tx chain");
        self.tx_added += 1;
    }

    fn add_raw_tx(&mut self, addr: u64, len: u32) {
        let index = self.tx_added % QUEUE_SIZE;
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0));
        self.mock(TX_RING)
            .add_desc_chains(&[desc], index)
            .expect("tx chain");
        self.tx_added += 1;
    }

    fn event(&self, event: u16) {
        self.backend
            .handle_event(event, EventSet::IN, &self.vrings, 0)
            .expect("handle_event never fails");
    }

    fn used_idx(&self, ring: u64) -> u16 {
        let used = self.mock(ring).used_addr();
        self.mem
            .read_obj::<u16>(GuestAddress(used.0 + 2))
            .expect("used idx")
    }

    /// Frames the backend put in the receive queue since the last call, header stripped;
    /// checks each header says one buffer and no offloads.
    fn received(&mut self) -> Vec<Vec<u8>> {
        let used = self.mock(RX_RING).used_addr().0;
        let idx = self.used_idx(RX_RING);
        let mut frames = Vec::new();
        while self.rx_seen != idx {
            let slot = u64::from(self.rx_seen % QUEUE_SIZE);
            let id = self
                .mem
                .read_obj::<u32>(GuestAddress(used + 4 + slot * 8))
                .expect("id");
            let len = self
                .mem
                .read_obj::<u32>(GuestAddress(used + 8 + slot * 8))
                .expect("len");
            let mut bytes = vec![0u8; len as usize];
            self.mem
                .read_slice(
                    &mut bytes,
                    GuestAddress(RX_BUFFERS + u64::from(id) * BUFFER),
                )
                .expect("read");
            assert_eq!(&bytes[..10], &[0; 10], "no offload fields");
            assert_eq!(&bytes[10..12], &[1, 0], "num_buffers 1");
            frames.push(bytes[NET_HDR_LEN..].to_vec());
            self.rx_seen = self.rx_seen.wrapping_add(1);
        }
        frames
    }
}

fn arp_operation(frame: &[u8]) -> Option<u16> {
    match parse_frame(frame, GUEST_MAC, GUEST_IP) {
        Ok(Incoming::Arp { packet }) => Some(packet.operation.0),
        _ => None,
    }
}

#[test]
fn features_are_only_what_is_implemented() {
    let features = device_features();
    for bit in [32, 5, 16, 28, 30] {
        assert_ne!(features & (1 << bit), 0, "bit {bit}");
    }
    // No checksum/TSO offloads, no mergeable buffers, no multiqueue, no event index.
    for bit in [0, 1, 7, 8, 11, 12, 15, 22, 29] {
        assert_eq!(features & (1 << bit), 0, "bit {bit}");
    }
    let rig = Rig::new();
    assert_eq!(rig.backend.get_config(0, 6), EngineConfig::default().mac);
    assert_eq!(rig.backend.get_config(6, 2), [1, 0], "link up");
    assert_eq!(rig.backend.get_config(200, 4), [0; 4]);
    assert_eq!(rig.backend.num_queues(), 2);
}

#[test]
fn arp_from_the_guest_is_answered_through_the_receive_queue() {
    let mut rig = Rig::new();
    rig.add_rx_buffers(8, 2048);
    rig.add_tx_frame(&arp_request(GUEST_MAC, GUEST_IP, TARGET_IP));
    rig.event(TX_QUEUE);
    assert_eq!(rig.used_idx(TX_RING), 1, "the TX buffer is returned");
    let frames = rig.received();
    let ops: Vec<Option<u16>> = frames.iter().map(|f| arp_operation(f)).collect();
    // The reply, plus two gratuitous ARPs: one on the guest's first frame, one when the
    // receive queue was first usable.
    assert_eq!(ops, [Some(1), Some(2), Some(1)]);
    assert_eq!(&frames[1][..6], &GUEST_MAC);
    assert_eq!(&frames[0][..6], &[0xFF; 6]);
    assert_eq!(rig.backend.counters().tx_frames, 1);
    assert_eq!(rig.backend.counters().rx_frames, 3);
}

#[test]
fn frames_wait_for_receive_buffers() {
    let mut rig = Rig::new();
    rig.engine.lock().expect("engine").announce();
    rig.event(FRAMES_WAITING_EVENT);
    assert_eq!(rig.used_idx(RX_RING), 0);
    assert!(!rig.queue.is_empty());
    rig.add_rx_buffers(4, 2048);
    rig.event(RX_QUEUE);
    assert_eq!(rig.received().len(), 2);
    assert!(rig.queue.is_empty());
}

#[test]
fn too_small_receive_buffers_are_left_alone() {
    let mut rig = Rig::new();
    rig.add_rx_buffers(1, 20);
    rig.event(RX_QUEUE);
    assert_eq!(rig.used_idx(RX_RING), 0);
    assert_eq!(rig.backend.counters().rx_too_small, 1);
    assert_eq!(rig.engine.lock().expect("engine").stats().dropped_link, 1);
}

#[test]
fn garbage_descriptors_never_fail_the_backend() {
    let mut rig = Rig::new();
    rig.add_rx_buffers(4, 2048);
    rig.add_raw_tx(0xFFFF_0000, 64); // outside guest memory
    rig.add_raw_tx(TX_BUFFERS, 3); // shorter than the virtio-net header
    rig.add_raw_tx(0xF_FFF0, 0x100); // runs off the end of memory
    rig.add_tx_frame(&[0xAB; 7]); // a runt frame
    rig.event(TX_QUEUE);
    rig.event(RX_QUEUE);
    rig.event(FRAMES_WAITING_EVENT);
    rig.event(99);
    assert_eq!(rig.used_idx(TX_RING), 4, "every buffer is returned");
    assert_eq!(rig.backend.counters().bad_chains, 3);
    let stats = rig.engine.lock().expect("engine").stats();
    assert_eq!(stats.dropped_malformed, 1);
    // Mismatched vring slices are tolerated too.
    rig.backend
        .handle_event(TX_QUEUE, EventSet::IN, &[], 0)
        .expect("no vrings");
}

struct QueueLink(Arc<Mutex<VecDeque<Vec<u8>>>>);

impl Link for QueueLink {
    fn transmit(&mut self, frame: &[u8]) -> bool {
        self.0
            .lock()
            .map(|mut q| q.push_back(frame.to_vec()))
            .is_ok()
    }
}

#[test]
fn an_rdma_write_from_the_guest_lands_in_target_memory_through_the_rings() {
    let mut rig = Rig::new();
    rig.add_rx_buffers(16, 2048);
    // The "guest" is another engine whose frames go through the TX ring.
    let guest_out = Arc::new(Mutex::new(VecDeque::new()));
    let mut guest = Engine::new(
        EngineConfig {
            mac: GUEST_MAC,
            ip: GUEST_IP,
        },
        Box::new(QueueLink(Arc::clone(&guest_out))),
    );
    let now = Instant::now();
    let (target_qp, target_mr) = {
        let mut engine = rig.engine.lock().expect("engine");
        let qp = engine.create_qp(&QpSettings::default()).expect("qp");
        let mr = engine
            .register_mr(4096, &[MrAccess::RemoteWrite])
            .expect("mr");
        (qp, mr)
    };
    let guest_qp = guest.create_qp(&QpSettings::default()).expect("qp");
    let src = guest
        .register_mr(3000, &[MrAccess::LocalWrite])
        .expect("mr");
    guest.mr_fill(src.key, 0, 3000, &[0x3C]).expect("fill");
    rig.engine
        .lock()
        .expect("engine")
        .connect(
            target_qp.qpn,
            guest_qp.qpn,
            guest_qp.psn,
            GUEST_IP,
            None,
            now,
        )
        .expect("connect");
    guest
        .connect(
            guest_qp.qpn,
            target_qp.qpn,
            target_qp.psn,
            TARGET_IP,
            Some(EngineConfig::default().mac),
            now,
        )
        .expect("connect");
    guest
        .post_write(
            guest_qp.qpn,
            5,
            Sge {
                key: src.key,
                offset: 0,
                length: 3000,
            },
            RemoteBuffer {
                va: target_mr.va + 100,
                rkey: target_mr.key,
            },
            None,
            now,
        )
        .expect("post");
    for _ in 0..10 {
        let frames: Vec<Vec<u8>> = guest_out.lock().expect("lock").drain(..).collect();
        for frame in &frames {
            rig.add_tx_frame(frame);
        }
        rig.event(TX_QUEUE);
        for frame in rig.received() {
            guest.receive(&frame, now);
        }
        rig.add_rx_buffers(8, 2048);
    }
    let done = guest.poll_cq(None, 4);
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0].status, CompletionStatus::Success);
    let landed = rig
        .engine
        .lock()
        .expect("engine")
        .mr_read(target_mr.key, 100, 3000)
        .expect("read");
    assert_eq!(landed, vec![0x3C; 3000]);
}
