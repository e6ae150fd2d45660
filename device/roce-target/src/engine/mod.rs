//! The RC engine: ARP for the target's address, RoCEv2 RC requester and responder
//! (IBTA 9.7: reliable service; Annex A17 for the RoCEv2 encapsulation), completions,
//! counters and pcap.
//!
//! It owns no thread and no clock: frames come in through [`Engine::receive`], leave
//! through a [`Link`], and timers advance when the caller passes `now` to
//! [`Engine::tick`]. Two engines joined by a loopback link therefore run a whole RC
//! exchange deterministically in a unit test.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etherparse::ArpOperation;
use p2prig_protocol::target::{
    Completion, MrAccess, MrInfo, QpEndpoint, QpSettings, QpStateName, QpStatus, Sge, TargetStats,
};

use crate::frame::{self, format_mac, gid_of, FrameError, Incoming};
use crate::headers::{packet_count, psn_add, OpKind, Packet, PSN_MASK};
use crate::memory::{MemoryError, MemoryRegions};
use crate::pcap::PcapWriter;

mod qp;
mod requester;
mod responder;
mod wire;

use qp::*;
use requester::*;
use responder::*;
use wire::*;

/// Where frames go: the guest's virtio-net RX queue, or another engine in a test.
pub trait Link: Send {
    /// Hands one Ethernet frame (no FCS) to the other side; false when it was dropped.
    fn transmit(&mut self, frame: &[u8]) -> bool;
}

/// PSNs a requester keeps unacknowledged at most (rxe's limit, reference "at most 128").
pub const MAX_INFLIGHT_PSNS: i32 = 128;
/// AckReq on every this many packets of a long message, so the window keeps moving.
const ACK_REQ_EVERY: u32 = 64;
/// Largest message one work request may carry (IBTA 9.7.2 allows 2^31; 1 GiB keeps any
/// message inside half the PSN space at a 256-byte MTU).
pub const MAX_MESSAGE_BYTES: u32 = 1 << 30;
/// Largest WRITE or SEND the target posts. Its bytes are copied at post time (a
/// [`qp::Snapshot`]), so this bounds what one request costs in memory: 16 times the largest
/// the harness posts (its bench's 1 MiB WRITE into ordinary memory).
pub const MAX_POSTED_BYTES: u32 = 16 << 20;
/// WRITE and SEND bytes all QPs together hold until their requests complete (or are flushed).
/// A post past it is refused, as ibv_post_send refuses one on a full send queue, until
/// completions make room: four requests of the largest size, 64 of the bench's.
pub const MAX_QUEUED_BYTES: u64 = 64 << 20;
/// Completions kept until polled.
pub const MAX_COMPLETIONS: usize = 65_536;
/// Responses one QP keeps while they are held ([`Engine::hold_responses`]); later ones are
/// dropped and counted. A guest requester retransmits every ACK timeout, so a hold of a
/// few seconds makes tens of responses; this bounds a hold nobody releases.
pub const MAX_HELD_RESPONSES: usize = 1024;
/// READ requests remembered for duplicate replay (IBTA 9.7.5.1.6 wants as many as
/// max_dest_rd_atomic; rxe allows up to 16).
const READ_HISTORY: usize = 16;
/// Retry counts of 7 mean "retry forever" (IBTA 9.7.6.2.1 for rnr_retry; rxe treats
/// retry_cnt the same way).
const INFINITE_RETRIES: u8 = 7;

/// Longest gap between two ARP requests for the same address.
const ARP_INTERVAL: Duration = Duration::from_millis(100);
const FIRST_QPN: u32 = 0x11;

/// Why an operation on the engine failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("no QP {0:#x}")]
    NoSuchQp(u32),
    #[error("QP {qpn:#x} is in state {state:?}; {needed}")]
    BadState {
        qpn: u32,
        state: QpStateName,
        needed: &'static str,
    },
    #[error("path MTU {0} is not 256, 512, 1024, 2048 or 4096")]
    BadPathMtu(u32),
    #[error("{0} is not an IPv4 address or an IPv4-mapped GID")]
    BadAddress(String),
    #[error("{0} is not a MAC address")]
    BadMac(String),
    #[error("message of {0} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")]
    MessageTooLong(u32),
    #[error(
        "a {0}-byte WRITE or SEND is over the {MAX_POSTED_BYTES}-byte limit of one posted request"
    )]
    PostTooLarge(u32),
    #[error(
        "send queues full: {queued} bytes of WRITE/SEND data are waiting for completion and \
         {length} more would pass the {MAX_QUEUED_BYTES}-byte limit; poll completions or \
         destroy a QP first"
    )]
    SendQueueFull { queued: u64, length: u32 },
    #[error("{field} {value} is out of range: {range}")]
    OutOfRange {
        field: &'static str,
        value: u32,
        range: &'static str,
    },
    #[error("all QP numbers are in use")]
    NoQpNumbers,
    #[error("{0}")]
    Memory(#[from] MemoryError),
    #[error("pcap: {0}")]
    Pcap(String),
}

/// Where an RDMA WRITE or READ goes in the peer's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteBuffer {
    pub va: u64,
    pub rkey: u32,
}

/// The target's own addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            mac: [0x52, 0x54, 0x00, 0x00, 0x00, 0x02],
            ip: Ipv4Addr::new(10, 0, 2, 2),
        }
    }
}

/// The RC engine of the target.
#[derive(Debug)]
pub struct Engine {
    qps: BTreeMap<u32, Qp>,
    next_qpn: u32,
    shared: Shared,
    pcap_seq: u64,
}

/// What QP code works on besides its QP: the wire, the completion queue and the memory
/// regions. Kept apart from the QP table so that one QP and all of this borrow at once.
#[derive(Debug)]
struct Shared {
    wire: Wire,
    cq: CompletionQueue,
    mrs: MemoryRegions,
    /// WRITE/SEND bytes held by posted requests, kept by their [`qp::Snapshot`]s.
    queued: Arc<AtomicU64>,
}

fn random_u32() -> u32 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    hasher.finish() as u32
}

impl Engine {
    pub fn new(config: EngineConfig, link: Box<dyn Link>) -> Self {
        Self {
            qps: BTreeMap::new(),
            next_qpn: FIRST_QPN,
            shared: Shared {
                wire: Wire::new(config, link),
                cq: CompletionQueue::default(),
                mrs: MemoryRegions::default(),
                queued: Arc::default(),
            },
            pcap_seq: 0,
        }
    }

    pub fn config(&self) -> EngineConfig {
        self.shared.wire.config
    }

    /// Counters; `connections` is kept by the caller that owns the transport.
    pub fn stats(&self) -> TargetStats {
        self.shared.wire.stats.clone()
    }

    pub fn stats_mut(&mut self) -> &mut TargetStats {
        &mut self.shared.wire.stats
    }

    /// Records a MAC for an IP, as a static neighbour entry would.
    pub fn add_neighbour(&mut self, ip: Ipv4Addr, mac: [u8; 6]) {
        self.shared.wire.neighbours.insert(ip, mac);
    }

    /// Broadcasts a gratuitous ARP for the target's address.
    pub fn announce(&mut self) {
        self.shared.wire.stats.arp_sent += 1;
        let frame = frame::gratuitous_arp(self.shared.wire.config.mac, self.shared.wire.config.ip);
        self.shared.wire.emit(&frame);
    }

    // ---- memory ----

    pub fn register_mr(&mut self, length: u64, access: &[MrAccess]) -> Result<MrInfo, EngineError> {
        Ok(self.shared.mrs.register(length, access)?.info())
    }

    pub fn deregister_mr(&mut self, key: u32) -> Result<(), EngineError> {
        Ok(self.shared.mrs.deregister(key)?)
    }

    pub fn mr_read(&self, key: u32, offset: u64, length: u64) -> Result<Vec<u8>, EngineError> {
        Ok(self.shared.mrs.slice(key, offset, length)?.to_vec())
    }

    pub fn mr_write(&mut self, key: u32, offset: u64, bytes: &[u8]) -> Result<(), EngineError> {
        Ok(self.shared.mrs.write(key, offset, bytes)?)
    }

    /// Fills `length` bytes at `offset` with `pattern` repeated.
    pub fn mr_fill(
        &mut self,
        key: u32,
        offset: u64,
        length: u64,
        pattern: &[u8],
    ) -> Result<(), EngineError> {
        let region = self.shared.mrs.get_mut(key)?;
        let range = region.range(offset, length)?;
        if !pattern.is_empty() {
            for (byte, value) in region.data[range].iter_mut().zip(pattern.iter().cycle()) {
                *byte = *value;
            }
        }
        Ok(())
    }

    // ---- QPs ----

    fn endpoint(&self, qp: &Qp) -> QpEndpoint {
        QpEndpoint {
            qpn: qp.qpn,
            psn: qp.initial_psn,
            gid: gid_of(self.shared.wire.config.ip),
            ip: self.shared.wire.config.ip.to_string(),
            mac: format_mac(self.shared.wire.config.mac),
            path_mtu: qp.pmtu,
        }
    }

    pub fn create_qp(&mut self, settings: &QpSettings) -> Result<QpEndpoint, EngineError> {
        let mut qpn = None;
        for _ in 0..=PSN_MASK {
            let candidate = self.next_qpn;
            self.next_qpn = if candidate >= PSN_MASK {
                FIRST_QPN
            } else {
                candidate + 1
            };
            if !self.qps.contains_key(&candidate) {
                qpn = Some(candidate);
                break;
            }
        }
        let qpn = qpn.ok_or(EngineError::NoQpNumbers)?;
        let psn = match settings.psn {
            Some(psn) => check_psn(psn)?,
            None => random_u32() & PSN_MASK,
        };
        let qp = Qp::new(qpn, settings, psn)?;
        let endpoint = self.endpoint(&qp);
        self.qps.insert(qpn, qp);
        Ok(endpoint)
    }

    fn qp_mut(&mut self, qpn: u32) -> Result<&mut Qp, EngineError> {
        self.qps.get_mut(&qpn).ok_or(EngineError::NoSuchQp(qpn))
    }

    /// INIT -> RTR -> RTS in one step toward the guest's QP (IBTA 10.3.1 state diagram).
    pub fn connect(
        &mut self,
        qpn: u32,
        remote_qpn: u32,
        remote_psn: u32,
        remote_ip: Ipv4Addr,
        remote_mac: Option<[u8; 6]>,
        now: Instant,
    ) -> Result<(), EngineError> {
        let qp = self.qp_mut(qpn)?;
        if qp.state != QpStateName::Init {
            return Err(qp.bad_state("connect needs a new or reset QP"));
        }
        qp.remote = Some(Remote {
            qpn: remote_qpn & PSN_MASK,
            ip: remote_ip,
        });
        qp.epsn = remote_psn & PSN_MASK;
        qp.state = QpStateName::Rts;
        if let Some(mac) = remote_mac {
            self.shared.wire.neighbours.insert(remote_ip, mac);
        } else if !self.shared.wire.neighbours.contains_key(&remote_ip) {
            self.shared.wire.arp_for(remote_ip, now);
        }
        Ok(())
    }

    pub fn query_qp(&self, qpn: u32) -> Result<QpStatus, EngineError> {
        self.qps
            .get(&qpn)
            .map(Qp::status)
            .ok_or(EngineError::NoSuchQp(qpn))
    }

    /// Flushes every outstanding request and returns the QP to INIT with a new PSN.
    pub fn reset_qp(&mut self, qpn: u32, psn: Option<u32>) -> Result<QpEndpoint, EngineError> {
        let psn = match psn {
            Some(psn) => check_psn(psn)?,
            None => random_u32() & PSN_MASK,
        };
        let qp = self.qps.get_mut(&qpn).ok_or(EngineError::NoSuchQp(qpn))?;
        qp.flush(&mut self.shared);
        // Responses held for the old connection are not sent to the new one.
        self.shared.wire.held.remove(&qpn);
        let settings = QpSettings {
            path_mtu: Some(qp.pmtu),
            psn: None,
            ack_timeout_ms: Some(qp.ack_timeout.as_millis() as u64),
            retry_cnt: Some(qp.retries.limit()),
            rnr_retry: Some(qp.rnr_retries.limit()),
            min_rnr_timer: Some(qp.min_rnr_timer),
            max_rd_atomic: Some(qp.max_rd_atomic),
        };
        *qp = Qp::new(qpn, &settings, psn)?;
        let endpoint = self.endpoint(&self.qps[&qpn]);
        Ok(endpoint)
    }

    pub fn destroy_qp(&mut self, qpn: u32) -> Result<(), EngineError> {
        let mut qp = self.qps.remove(&qpn).ok_or(EngineError::NoSuchQp(qpn))?;
        qp.flush(&mut self.shared);
        self.shared.wire.held.remove(&qpn);
        Ok(())
    }

    /// From now on the responses QP `qpn` sends as a responder (ACKs, NAKs, READ
    /// responses) are kept instead of sent, up to [`MAX_HELD_RESPONSES`], until
    /// [`Engine::release_responses`]: a peer whose answers are late, e.g. until the guest's
    /// requester QP has gone to the error state. Holding twice is holding.
    pub fn hold_responses(&mut self, qpn: u32) -> Result<(), EngineError> {
        self.qp_mut(qpn)?;
        self.shared.wire.held.entry(qpn).or_default();
        Ok(())
    }

    /// Sends what [`Engine::hold_responses`] kept, in order, and sends responses at once
    /// again; answers (frames sent, responses dropped over the bound).
    pub fn release_responses(&mut self, qpn: u32) -> Result<(u64, u64), EngineError> {
        let qp = self.qp_mut(qpn)?;
        let not_held = qp.bad_state("its responses are not held (hold_responses first)");
        self.shared.wire.release(qpn).ok_or(not_held)
    }

    // ---- posting ----

    pub fn post_recv(&mut self, qpn: u32, wr_id: u64, local: Sge) -> Result<(), EngineError> {
        self.check_writable(local)?;
        let qp = self.qp_mut(qpn)?;
        if qp.state == QpStateName::Error {
            return Err(qp.bad_state("receives need INIT or RTS"));
        }
        qp.recvs.push_back(RecvWqe { wr_id, local });
        Ok(())
    }

    pub fn post_write(
        &mut self,
        qpn: u32,
        wr_id: u64,
        local: Sge,
        remote: RemoteBuffer,
        imm: Option<u32>,
        now: Instant,
    ) -> Result<(), EngineError> {
        let data = self.snapshot(local)?;
        let op = WqeOp::Message {
            write: Some(remote),
            imm,
            data,
        };
        self.post(qpn, wr_id, op, local.length, now)
    }

    pub fn post_send(
        &mut self,
        qpn: u32,
        wr_id: u64,
        local: Sge,
        imm: Option<u32>,
        now: Instant,
    ) -> Result<(), EngineError> {
        let data = self.snapshot(local)?;
        let op = WqeOp::Message {
            write: None,
            imm,
            data,
        };
        self.post(qpn, wr_id, op, local.length, now)
    }

    pub fn post_read(
        &mut self,
        qpn: u32,
        wr_id: u64,
        local: Sge,
        remote: RemoteBuffer,
        now: Instant,
    ) -> Result<(), EngineError> {
        self.check_writable(local)?;
        let op = WqeOp::Read { remote, local };
        self.post(qpn, wr_id, op, local.length, now)
    }

    /// Checks a buffer the engine will write into: a receive's, or a READ's destination.
    fn check_writable(&self, local: Sge) -> Result<(), EngineError> {
        let length = u64::from(local.length);
        let access = Some(MrAccess::LocalWrite);
        Ok(self
            .shared
            .mrs
            .check_local(local.key, local.offset, length, access)?)
    }

    /// Copies a WRITE's or SEND's bytes, within [`MAX_POSTED_BYTES`] and the room left
    /// under [`MAX_QUEUED_BYTES`].
    fn snapshot(&self, local: Sge) -> Result<Snapshot, EngineError> {
        if local.length > MAX_POSTED_BYTES {
            return Err(EngineError::PostTooLarge(local.length));
        }
        let queued = self.queued_bytes();
        if queued + u64::from(local.length) > MAX_QUEUED_BYTES {
            return Err(EngineError::SendQueueFull {
                queued,
                length: local.length,
            });
        }
        let bytes = self
            .shared
            .mrs
            .slice(local.key, local.offset, u64::from(local.length))?;
        Ok(Snapshot::new(bytes.to_vec(), &self.shared.queued))
    }

    /// WRITE/SEND bytes that posted requests hold until they complete.
    pub fn queued_bytes(&self) -> u64 {
        self.shared.queued.load(Ordering::Relaxed)
    }

    fn post(
        &mut self,
        qpn: u32,
        wr_id: u64,
        op: WqeOp,
        length: u32,
        now: Instant,
    ) -> Result<(), EngineError> {
        if length > MAX_MESSAGE_BYTES {
            return Err(EngineError::MessageTooLong(length));
        }
        let qp = self.qps.get_mut(&qpn).ok_or(EngineError::NoSuchQp(qpn))?;
        if qp.state != QpStateName::Rts {
            return Err(qp.bad_state("sends need RTS (connect first)"));
        }
        let packets = packet_count(u64::from(length), qp.pmtu);
        qp.wqes.push_back(SendWqe {
            wr_id,
            op,
            length,
            first_psn: qp.next_psn,
            packets,
            read_done: 0,
        });
        qp.next_psn = psn_add(qp.next_psn, packets);
        pump(qp, &mut self.shared.wire, now);
        Ok(())
    }

    /// Takes up to `max` completions (of `qpn`, or of every QP), oldest first.
    pub fn poll_cq(&mut self, qpn: Option<u32>, max: usize) -> Vec<Completion> {
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.shared.cq.entries.len());
        while let Some(entry) = self.shared.cq.entries.pop_front() {
            if taken.len() < max && qpn.is_none_or(|q| q == entry.qpn) {
                taken.push(entry);
            } else {
                kept.push_back(entry);
            }
        }
        self.shared.cq.entries = kept;
        taken
    }

    pub fn completions_pending(&self) -> usize {
        self.shared.cq.entries.len()
    }

    // ---- pcap ----

    /// Starts a capture to `dir/name` (default `capture-<n>.pcap`), closing any running one.
    pub fn pcap_start(&mut self, dir: &Path, name: Option<&str>) -> Result<String, EngineError> {
        self.pcap_stop();
        self.pcap_seq += 1;
        let name = match name {
            Some(name) => {
                let valid = !name.is_empty()
                    && !name.starts_with('.')
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                if !valid {
                    return Err(EngineError::Pcap(format!(
                        "{name:?} is not a plain file name (letters, digits, - _ .)"
                    )));
                }
                name.to_string()
            }
            None => format!("capture-{}.pcap", self.pcap_seq),
        };
        let path = dir.join(name);
        // The error names the path (and says why a symlink or FIFO is refused).
        let writer = PcapWriter::create(&path).map_err(|e| EngineError::Pcap(e.to_string()))?;
        self.shared.wire.pcap = Some(writer);
        Ok(path.display().to_string())
    }

    /// Closes the capture; returns its path and frame count.
    pub fn pcap_stop(&mut self) -> Option<(String, u64)> {
        let mut writer = self.shared.wire.pcap.take()?;
        if writer.flush().is_err() {
            self.shared.wire.stats.pcap_errors += 1;
        }
        Some((writer.path().display().to_string(), writer.frames()))
    }

    pub fn pcap_status(&self) -> Option<(String, u64)> {
        self.shared
            .wire
            .pcap
            .as_ref()
            .map(|w| (w.path().display().to_string(), w.frames()))
    }

    // ---- time ----

    /// Runs the retransmission and RNR timers (IBTA 9.7.6.1.1, 9.7.5.2.8) and flushes the
    /// capture. Call often (every millisecond or so).
    pub fn tick(&mut self, now: Instant) {
        for qp in self.qps.values_mut() {
            tick_qp(qp, &mut self.shared, now);
        }
        if let Some(pcap) = &mut self.shared.wire.pcap {
            if pcap.flush().is_err() {
                self.shared.wire.stats.pcap_errors += 1;
            }
        }
    }

    // ---- frames in ----

    /// Handles one Ethernet frame from the link. Never panics, whatever the bytes.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) {
        self.shared.wire.stats.frames_in += 1;
        self.shared.wire.capture(bytes);
        let config = self.shared.wire.config;
        match frame::parse_frame(bytes, config.mac, config.ip) {
            Err(FrameError::NotOurs(_)) => self.shared.wire.stats.dropped_not_ours += 1,
            Err(FrameError::Malformed(_)) => self.shared.wire.stats.dropped_malformed += 1,
            Err(FrameError::BadIcrc { .. }) => self.shared.wire.stats.dropped_bad_icrc += 1,
            Ok(Incoming::Arp { packet }) => self.on_arp(&packet),
            Ok(Incoming::Roce(roce)) => {
                self.shared.wire.stats.roce_in += 1;
                self.on_roce(&roce, now)
            }
        }
    }

    fn on_arp(&mut self, packet: &etherparse::ArpEthIpv4Packet) {
        let config = self.shared.wire.config;
        let sender = packet.sender_ipv4_addr();
        // Learn from every ARP (requests, replies, announcements), as RFC 826 suggests,
        // but never an entry for our own address or the unspecified one of a probe.
        if !sender.is_unspecified() && sender != config.ip {
            self.shared
                .wire
                .neighbours
                .insert(sender, packet.sender_mac);
        }
        if packet.operation == ArpOperation::REQUEST && packet.target_ipv4_addr() == config.ip {
            self.shared.wire.stats.arp_requests_answered += 1;
            let reply = frame::arp_reply(packet, config.mac, config.ip);
            self.shared.wire.emit(&reply);
        } else if packet.operation != ArpOperation::REPLY {
            self.shared.wire.stats.dropped_not_ours += 1;
        }
    }

    fn on_roce(&mut self, roce: &frame::RoceFrame<'_>, now: Instant) {
        let packet = match Packet::parse(roce.transport) {
            Ok(packet) => packet,
            Err(_) => {
                self.shared.wire.stats.dropped_malformed += 1;
                return;
            }
        };
        // P_Key match ignoring the membership bit (IBTA 10.9.3); rxe only has 0xFFFF.
        if packet.bth.pkey & 0x7FFF != 0x7FFF {
            self.shared.wire.stats.dropped_malformed += 1;
            return;
        }
        let Some(qp) = self.qps.get_mut(&packet.bth.dest_qp) else {
            self.shared.wire.stats.dropped_unknown_qp += 1;
            return;
        };
        // A QP only talks to the address it was connected to (reference: rxe checks both
        // IPs the same way).
        if qp.state != QpStateName::Rts || qp.remote.is_none_or(|r| r.ip != roce.src_ip) {
            self.shared.wire.stats.dropped_qp_state += 1;
            return;
        }
        self.shared
            .wire
            .neighbours
            .insert(roce.src_ip, roce.src_mac);
        match packet.info.kind {
            OpKind::Ack | OpKind::AtomicAck | OpKind::ReadResponse => {
                on_response(qp, &mut self.shared, &packet, now)
            }
            OpKind::Send | OpKind::Write | OpKind::ReadRequest | OpKind::Atomic => {
                on_request(qp, &mut self.shared, &packet, now)
            }
        }
    }
}

/// A PSN given by the caller: 24 bits (IBTA 9.2; BTH carries 24).
fn check_psn(psn: u32) -> Result<u32, EngineError> {
    if psn > PSN_MASK {
        return Err(EngineError::OutOfRange {
            field: "psn",
            value: psn,
            range: "a PSN is 24 bits, 0 to 16777215",
        });
    }
    Ok(psn)
}

/// Pieces for the unit tests of the engine's parts: a `Shared` whose link keeps its frames,
/// and a QP connected to a peer it already knows the MAC of.
#[cfg(test)]
mod test_support {
    use std::sync::{Arc, Mutex};

    use super::*;

    pub(super) const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
    pub(super) const PEER_QPN: u32 = 0x22;

    /// A link that keeps every frame it is given.
    #[derive(Debug, Clone, Default)]
    pub(super) struct Captured(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Captured {
        pub(super) fn count(&self) -> usize {
            self.0.lock().expect("link lock").len()
        }
    }

    impl Link for Captured {
        fn transmit(&mut self, frame: &[u8]) -> bool {
            self.0.lock().expect("link lock").push(frame.to_vec());
            true
        }
    }

    pub(super) fn shared() -> (Shared, Captured) {
        let link = Captured::default();
        let mut wire = Wire::new(EngineConfig::default(), Box::new(link.clone()));
        wire.neighbours
            .insert(PEER_IP, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let shared = Shared {
            wire,
            cq: CompletionQueue::default(),
            mrs: MemoryRegions::default(),
            queued: Arc::default(),
        };
        (shared, link)
    }

    /// A QP in RTS toward the peer, sending from `psn` and expecting `psn` from the peer.
    pub(super) fn connected_qp(settings: &QpSettings, psn: u32) -> Qp {
        let mut qp = Qp::new(0x11, settings, psn).expect("valid settings");
        qp.remote = Some(Remote {
            qpn: PEER_QPN,
            ip: PEER_IP,
        });
        qp.epsn = psn;
        qp.state = QpStateName::Rts;
        qp
    }

    /// Queues a one-packet SEND of `len` bytes as if posted, without sending it.
    pub(super) fn queue_send(qp: &mut Qp, wr_id: u64, len: usize) {
        let packets = packet_count(len as u64, qp.pmtu);
        qp.wqes.push_back(SendWqe {
            wr_id,
            op: WqeOp::Message {
                write: None,
                imm: None,
                data: Snapshot::from(vec![0xA5; len]),
            },
            length: len as u32,
            first_psn: qp.next_psn,
            packets,
            read_done: 0,
        });
        qp.next_psn = psn_add(qp.next_psn, packets);
    }
}
