//! The vhost-user-net backend: one queue pair (VIRTIO 1.2 5.1.2: queue 0 receiveq, queue 1
//! transmitq) between QEMU's virtio-net device and the RC engine.
//!
//! Guest TX frames are read out of the transmit queue and handed to the engine; frames the
//! engine emits go through a [`GuestLink`] into a bounded queue and an eventfd wakes the
//! backend's epoll thread, which copies them into receive buffers. Nothing the guest puts
//! in a ring can make `handle_event` fail: a failing `handle_event` would stop
//! vhost-user-backend's worker thread, and with it the NIC.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::engine::{Engine, Link};

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const NUM_QUEUES: usize = 2;
/// Largest ring QEMU may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// The epoll `data` of the frames-waiting eventfd; vhost-user-backend reserves
/// 0..=NUM_QUEUES for the queues and its exit event.
pub const FRAMES_WAITING_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// `struct virtio_net_hdr_v1` (VIRTIO 1.2 5.1.6): with VIRTIO_F_VERSION_1 the header is
/// always 12 bytes, num_buffers included, whether or not MRG_RXBUF is negotiated.
pub const NET_HDR_LEN: usize = 12;
/// Frames waiting for guest receive buffers at most; more are dropped and counted.
pub const MAX_PENDING_FRAMES: usize = 4096;
/// Largest frame taken from the guest (a 1500-byte MTU needs 1514; leave room for larger).
pub const MAX_TX_FRAME: usize = 65_536;

/// The features we really implement (VIRTIO 1.2 5.1.3): the modern header, the MAC and the
/// link status in config space, indirect descriptors (virtio-queue walks them), and
/// vhost-user protocol features (QEMU's vhost-user-net will not start without them; see
/// [`crate::proxy`] for the ordering problem they bring). No offloads, no mergeable buffers,
/// no event index.
pub fn device_features() -> u64 {
    (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_NET_F_MAC)
        | (1 << VIRTIO_NET_F_STATUS)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// Frames on their way into the guest's receive queue.
#[derive(Debug)]
pub struct GuestQueue {
    frames: Mutex<VecDeque<Vec<u8>>>,
    waiting: EventFd,
}

impl GuestQueue {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            frames: Mutex::new(VecDeque::new()),
            waiting: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd that becomes readable when frames wait.
    pub fn event(&self) -> &EventFd {
        &self.waiting
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Vec<u8>>> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep going.
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, frame: &[u8]) -> bool {
        {
            let mut frames = self.lock();
            if frames.len() >= MAX_PENDING_FRAMES {
                return false;
            }
            frames.push_back(frame.to_vec());
        }
        // EAGAIN only when the counter is saturated, which still leaves it readable.
        let _ = self.waiting.write(1);
        true
    }

    fn pop(&self) -> Option<Vec<u8>> {
        self.lock().pop_front()
    }

    fn unpop(&self, frame: Vec<u8>) {
        self.lock().push_front(frame);
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The engine's [`Link`] toward the guest.
#[derive(Debug, Clone)]
pub struct GuestLink(pub Arc<GuestQueue>);

impl Link for GuestLink {
    fn transmit(&mut self, frame: &[u8]) -> bool {
        self.0.push(frame)
    }
}

/// The engine as the backend and the control socket share it.
pub type SharedEngine = Arc<Mutex<Engine>>;

/// Locks the engine even if a thread panicked while holding it.
pub fn lock_engine(engine: &SharedEngine) -> std::sync::MutexGuard<'_, Engine> {
    engine.lock().unwrap_or_else(|e| e.into_inner())
}

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

#[derive(Debug)]
struct Inner {
    engine: SharedEngine,
    queue: Arc<GuestQueue>,
    mac: [u8; 6],
    mem: RwLock<Option<Memory>>,
    acked_features: AtomicU64,
    announced_rx: AtomicBool,
    announced_tx: AtomicBool,
    tx_frames: AtomicU64,
    rx_frames: AtomicU64,
    rx_too_small: AtomicU64,
    bad_chains: AtomicU64,
}

/// Counters of the virtio side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendCounters {
    pub tx_frames: u64,
    pub rx_frames: u64,
    /// Frames dropped because a receive buffer was smaller than header + frame.
    pub rx_too_small: u64,
    /// Descriptor chains that did not map to guest memory.
    pub bad_chains: u64,
}

/// The vhost-user-net backend (cheap to clone; clones share everything).
#[derive(Debug, Clone)]
pub struct NetBackend {
    inner: Arc<Inner>,
}

impl NetBackend {
    pub fn new(engine: SharedEngine, queue: Arc<GuestQueue>, mac: [u8; 6]) -> Self {
        Self {
            inner: Arc::new(Inner {
                engine,
                queue,
                mac,
                mem: RwLock::new(None),
                acked_features: AtomicU64::new(0),
                announced_rx: AtomicBool::new(false),
                announced_tx: AtomicBool::new(false),
                tx_frames: AtomicU64::new(0),
                rx_frames: AtomicU64::new(0),
                rx_too_small: AtomicU64::new(0),
                bad_chains: AtomicU64::new(0),
            }),
        }
    }

    pub fn counters(&self) -> BackendCounters {
        BackendCounters {
            tx_frames: self.inner.tx_frames.load(Ordering::Relaxed),
            rx_frames: self.inner.rx_frames.load(Ordering::Relaxed),
            rx_too_small: self.inner.rx_too_small.load(Ordering::Relaxed),
            bad_chains: self.inner.bad_chains.load(Ordering::Relaxed),
        }
    }

    pub fn acked_features(&self) -> u64 {
        self.inner.acked_features.load(Ordering::Relaxed)
    }

    /// Forgets the last front end: the next driver gets fresh announcements and no stale
    /// frames (a rebooted guest must not receive the old one's ACKs).
    pub fn disconnected(&self) {
        self.inner.announced_rx.store(false, Ordering::Relaxed);
        self.inner.announced_tx.store(false, Ordering::Relaxed);
        self.inner.queue.clear();
        if let Ok(mut mem) = self.inner.mem.write() {
            *mem = None;
        }
    }

    fn memory(&self) -> Option<Memory> {
        self.inner.mem.read().ok().and_then(|m| m.clone())
    }

    /// The virtio_net_config (VIRTIO 1.2 5.1.4): mac, status, max_virtqueue_pairs.
    pub fn config_space(&self) -> [u8; 10] {
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.inner.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config
    }

    /// Takes every frame the guest queued for transmission and hands it to the engine.
    pub fn process_tx(&self, vring: &VringRwLock) {
        let Some(atomic) = self.memory() else { return };
        let mem = atomic.memory();
        let mut frames = Vec::new();
        {
            let mut state = vring.get_mut();
            let mut used = false;
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                let head = chain.head_index();
                match read_frame(&mem, chain) {
                    Some(frame) => frames.push(frame),
                    None => {
                        self.inner.bad_chains.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // The device writes nothing into TX buffers (VIRTIO 1.2 2.7.8: len is the
                // bytes written).
                if state.get_queue_mut().add_used(&*mem, head, 0).is_err() {
                    self.inner.bad_chains.fetch_add(1, Ordering::Relaxed);
                }
                used = true;
            }
            if used {
                let _ = state.signal_used_queue();
            }
        }
        if frames.is_empty() {
            return;
        }
        self.inner
            .tx_frames
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        let mut engine = lock_engine(&self.inner.engine);
        // The first frame from the guest means its interface is up: announce again, since
        // an announcement into a down interface was lost.
        if !self.inner.announced_tx.swap(true, Ordering::Relaxed) {
            engine.announce();
        }
        let now = Instant::now();
        for frame in &frames {
            engine.receive(frame, now);
        }
    }

    /// Copies waiting frames into the guest's receive buffers while both last.
    pub fn process_rx(&self, vring: &VringRwLock) {
        let Some(atomic) = self.memory() else { return };
        let mem = atomic.memory();
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return;
        }
        if !self.inner.announced_rx.swap(true, Ordering::Relaxed) {
            lock_engine(&self.inner.engine).announce();
        }
        let mut used = false;
        while let Some(frame) = self.inner.queue.pop() {
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                // No buffer: keep the frame for the guest's next kick.
                self.inner.queue.unpop(frame);
                break;
            };
            let head = chain.head_index();
            match write_frame(&mem, chain, &frame) {
                Ok(len) => {
                    if state.get_queue_mut().add_used(&*mem, head, len).is_err() {
                        self.inner.bad_chains.fetch_add(1, Ordering::Relaxed);
                    }
                    self.inner.rx_frames.fetch_add(1, Ordering::Relaxed);
                    used = true;
                }
                Err(WriteError::TooSmall) => {
                    // Give the buffer back untouched and drop the frame.
                    state.get_queue_mut().go_to_previous_position();
                    self.inner.rx_too_small.fetch_add(1, Ordering::Relaxed);
                    lock_engine(&self.inner.engine).stats_mut().dropped_link += 1;
                }
                Err(WriteError::BadChain) => {
                    // Unusable buffer: return it empty so the ring does not leak it.
                    let _ = state.get_queue_mut().add_used(&*mem, head, 0);
                    self.inner.bad_chains.fetch_add(1, Ordering::Relaxed);
                    used = true;
                }
            }
        }
        if used {
            let _ = state.signal_used_queue();
        }
    }
}

fn read_frame<M>(mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<M>) -> Option<Vec<u8>>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory + Sized,
{
    let mut reader = Reader::new(mem, chain).ok()?;
    let total = reader.available_bytes();
    if !(NET_HDR_LEN..=NET_HDR_LEN + MAX_TX_FRAME).contains(&total) {
        return None;
    }
    let mut bytes = vec![0u8; total];
    reader.read_exact(&mut bytes).ok()?;
    // The header's offload fields are all zero: no offloads were negotiated.
    bytes.drain(..NET_HDR_LEN);
    Some(bytes)
}

enum WriteError {
    TooSmall,
    BadChain,
}

fn write_frame<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
    frame: &[u8],
) -> Result<u32, WriteError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory + Sized,
{
    let mut writer = Writer::new(mem, chain).map_err(|_| WriteError::BadChain)?;
    let total = NET_HDR_LEN + frame.len();
    if writer.available_bytes() < total {
        return Err(WriteError::TooSmall);
    }
    let mut header = [0u8; NET_HDR_LEN];
    // num_buffers = 1 (VIRTIO 1.2 5.1.6.3.1: one buffer without MRG_RXBUF).
    header[10..12].copy_from_slice(&1u16.to_le_bytes());
    writer
        .write_all(&header)
        .and_then(|()| writer.write_all(frame))
        .map_err(|_| WriteError::BadChain)?;
    Ok(total as u32)
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        device_features()
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No CONFIG: QEMU's vhost-user-net keeps the virtio-net config space itself (MAC
        // from -device mac=) and warns about a backend offering it; get_config still
        // answers for other front ends.
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // VIRTIO_RING_F_EVENT_IDX is not offered, so it is never enabled.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config_space();
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        let mut out = config[start..end].to_vec();
        out.resize(size.min(256) as usize, 0);
        out
    }

    /// A fresh exit event per worker thread: without one the crate's worker never leaves its
    /// epoll loop, and dropping the daemon after a disconnect joins it for ever, so the
    /// next QEMU connection would never be accepted.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        if let Ok(mut slot) = self.inner.mem.write() {
            *slot = Some(mem);
        }
        Ok(())
    }

    fn reset_device(&self) {
        self.inner.announced_rx.store(false, Ordering::Relaxed);
        self.inner.announced_tx.store(false, Ordering::Relaxed);
        self.inner.queue.clear();
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let (Some(rx), Some(tx)) = (
            vrings.get(usize::from(RX_QUEUE)),
            vrings.get(usize::from(TX_QUEUE)),
        ) else {
            return Ok(());
        };
        match device_event {
            TX_QUEUE => self.process_tx(tx),
            FRAMES_WAITING_EVENT => {
                // Reset the counter; EAGAIN just means another wake-up already did.
                let _ = self.inner.queue.event().read();
            }
            // RX_QUEUE: new receive buffers; anything else is not ours to fail on.
            _ => {}
        }
        self.process_rx(rx);
        Ok(())
    }
}
