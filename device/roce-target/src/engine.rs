//! The RC engine: ARP for the target's address, RoCEv2 RC requester and responder
//! (IBTA 9.7: reliable service; Annex A17 for the RoCEv2 encapsulation), completions,
//! counters and pcap.
//!
//! It owns no thread and no clock: frames come in through [`Engine::receive`], leave
//! through a [`Link`], and timers advance when the caller passes `now` to
//! [`Engine::tick`]. Two engines joined by a loopback link therefore run a whole RC
//! exchange deterministically in a unit test.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use etherparse::ArpOperation;
use p2prig_protocol::target::{
    Completion, CompletionOpcode, CompletionStatus, MrAccess, MrInfo, QpEndpoint, QpSettings,
    QpStateName, QpStatus, Sge, TargetStats,
};

use crate::frame::{self, format_mac, gid_of, FrameError, Incoming, RoceRoute};
use crate::headers::{
    opcode, packet_count, psn_add, psn_diff, rnr_timer_us, Aeth, Bth, OpKind, Packet, PacketSpec,
    Position, Reth, Syndrome, NAK_INVALID_REQUEST, NAK_PSN_SEQUENCE, NAK_REMOTE_ACCESS,
    NAK_REMOTE_OPERATIONAL, PSN_MASK, RNR_NAK, SYNDROME_ACK,
};
use crate::memory::{MemoryError, MemoryRegions};
use crate::pcap::PcapWriter;

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
/// Completions kept until polled.
pub const MAX_COMPLETIONS: usize = 65_536;
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

/// A posted send-queue work request and the PSNs it took.
#[derive(Debug, Clone)]
struct SendWqe {
    wr_id: u64,
    op: WqeOp,
    length: u32,
    first_psn: u32,
    packets: u32,
    /// READ: response packets received in order so far.
    read_done: u32,
}

#[derive(Debug, Clone)]
enum WqeOp {
    /// The data is copied at post time (a snapshot, so a later MR change or
    /// deregistration cannot make a retransmission differ from the first try).
    Write {
        remote_va: u64,
        rkey: u32,
        imm: Option<u32>,
        data: Vec<u8>,
    },
    Send {
        imm: Option<u32>,
        data: Vec<u8>,
    },
    Read {
        remote_va: u64,
        rkey: u32,
        local: Sge,
    },
}

impl SendWqe {
    fn last_psn(&self) -> u32 {
        psn_add(self.first_psn, self.packets - 1)
    }

    fn end_psn(&self) -> u32 {
        psn_add(self.first_psn, self.packets)
    }

    fn contains(&self, psn: u32) -> bool {
        let d = psn_diff(psn, self.first_psn);
        d >= 0 && (d as u32) < self.packets
    }

    fn is_read(&self) -> bool {
        matches!(self.op, WqeOp::Read { .. })
    }

    fn opcode(&self) -> CompletionOpcode {
        match self.op {
            WqeOp::Write { .. } => CompletionOpcode::Write,
            WqeOp::Send { .. } => CompletionOpcode::Send,
            WqeOp::Read { .. } => CompletionOpcode::Read,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct RecvWqe {
    wr_id: u64,
    local: Sge,
}

/// A multi-packet message the responder is in the middle of (IBTA 9.7.5.1.1 opcode
/// sequence checks).
#[derive(Debug, Clone, Copy)]
enum InProgress {
    Send {
        received: u32,
    },
    Write {
        key: u32,
        offset: u64,
        total: u32,
        received: u32,
    },
}

/// An executed READ request, kept to replay on a duplicate (IBTA 9.7.5.1.6).
#[derive(Debug, Clone, Copy)]
struct ReadRecord {
    first_psn: u32,
    packets: u32,
    va: u64,
    rkey: u32,
    length: u32,
}

#[derive(Debug, Clone, Copy)]
struct Remote {
    qpn: u32,
    ip: Ipv4Addr,
}

#[derive(Debug)]
struct Qp {
    qpn: u32,
    state: QpStateName,
    pmtu: u32,
    ack_timeout: Duration,
    retry_cnt: u8,
    rnr_retry: u8,
    min_rnr_timer: u8,
    max_rd_atomic: u8,
    initial_psn: u32,
    udp_sport: u16,
    remote: Option<Remote>,
    // Requester (IBTA 9.7.4, 9.7.5.2).
    next_psn: u32,
    send_psn: u32,
    /// One past the highest PSN ever sent; anything sent below it is a retransmission.
    sent_high: u32,
    una: u32,
    wqes: VecDeque<SendWqe>,
    retries_left: u8,
    rnr_retries_left: u8,
    timer_start: Option<Instant>,
    rnr_until: Option<Instant>,
    // Responder (IBTA 9.7.5.1).
    epsn: u32,
    msn: u32,
    seq_nak_sent: bool,
    in_progress: Option<InProgress>,
    recvs: VecDeque<RecvWqe>,
    reads: VecDeque<ReadRecord>,
}

impl Qp {
    fn new(qpn: u32, settings: &QpSettings, psn: u32) -> Result<Self, EngineError> {
        let pmtu = settings.path_mtu.unwrap_or(1024);
        if crate::headers::mtu_enum(pmtu).is_none() {
            return Err(EngineError::BadPathMtu(pmtu));
        }
        let retry_cnt = settings.retry_cnt.unwrap_or(INFINITE_RETRIES).min(7);
        let rnr_retry = settings.rnr_retry.unwrap_or(INFINITE_RETRIES).min(7);
        let psn = psn & PSN_MASK;
        Ok(Self {
            qpn,
            state: QpStateName::Init,
            pmtu,
            ack_timeout: Duration::from_millis(settings.ack_timeout_ms.unwrap_or(100).max(1)),
            retry_cnt,
            rnr_retry,
            min_rnr_timer: settings.min_rnr_timer.unwrap_or(1) & 0x1F,
            max_rd_atomic: settings.max_rd_atomic.unwrap_or(1).max(1),
            initial_psn: psn,
            // rdma_get_udp_sport-like: 0xC000 plus a per-QP hash (Annex A17.2.3).
            udp_sport: 0xC000 | ((qpn.wrapping_mul(0x9E37) >> 2) as u16 & 0x3FFF),
            remote: None,
            next_psn: psn,
            send_psn: psn,
            sent_high: psn,
            una: psn,
            wqes: VecDeque::new(),
            retries_left: retry_cnt,
            rnr_retries_left: rnr_retry,
            timer_start: None,
            rnr_until: None,
            epsn: 0,
            msn: 0,
            seq_nak_sent: false,
            in_progress: None,
            recvs: VecDeque::new(),
            reads: VecDeque::new(),
        })
    }

    fn wqe_index(&self, psn: u32) -> Option<usize> {
        self.wqes.iter().position(|w| w.contains(psn))
    }

    fn status(&self) -> QpStatus {
        QpStatus {
            qpn: self.qpn,
            state: self.state,
            remote_qpn: self.remote.map(|r| r.qpn),
            sq_psn: self.next_psn,
            unacked_psn: self.una,
            expected_psn: self.epsn,
            msn: self.msn,
            pending_wqes: self.wqes.len() as u32,
            posted_recvs: self.recvs.len() as u32,
        }
    }
}

/// Completions waiting to be polled, bounded.
#[derive(Debug, Default)]
struct CompletionQueue {
    entries: VecDeque<Completion>,
}

/// The part of the engine that puts frames on the link: addresses, neighbour table, IP
/// identification, pcap and counters. Split from the QP table so QP code can borrow both.
struct Wire {
    config: EngineConfig,
    link: Box<dyn Link>,
    neighbours: HashMap<Ipv4Addr, [u8; 6]>,
    arp_sent_at: HashMap<Ipv4Addr, Instant>,
    ip_id: u16,
    pcap: Option<PcapWriter>,
    stats: TargetStats,
    frame: Vec<u8>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("config", &self.config)
            .field("neighbours", &self.neighbours)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Wire {
    fn capture(&mut self, frame: &[u8]) {
        if let Some(pcap) = &mut self.pcap {
            match pcap.record(frame) {
                Ok(()) => self.stats.pcap_frames += 1,
                Err(_) => self.stats.pcap_errors += 1,
            }
        }
    }

    fn emit(&mut self, frame: &[u8]) {
        self.capture(frame);
        self.stats.frames_out += 1;
        if !self.link.transmit(frame) {
            self.stats.dropped_link += 1;
        }
    }

    fn emit_own_buffer(&mut self) {
        let frame = std::mem::take(&mut self.frame);
        self.emit(&frame);
        self.frame = frame;
    }

    fn arp_for(&mut self, ip: Ipv4Addr, now: Instant) {
        let due = self
            .arp_sent_at
            .get(&ip)
            .is_none_or(|t| now.saturating_duration_since(*t) >= ARP_INTERVAL);
        if due {
            self.arp_sent_at.insert(ip, now);
            self.stats.arp_sent += 1;
            let frame = frame::arp_request(self.config.mac, self.config.ip, ip);
            self.emit(&frame);
        }
    }

    /// Sends one transport packet to `remote`; without a known MAC it asks by ARP and
    /// drops the packet (the retransmission timer sends it again).
    fn send(&mut self, remote: Remote, sport: u16, spec: &PacketSpec<'_>, now: Instant) {
        let Some(&dst_mac) = self.neighbours.get(&remote.ip) else {
            self.stats.dropped_no_neighbour += 1;
            self.arp_for(remote.ip, now);
            return;
        };
        self.ip_id = self.ip_id.wrapping_add(1);
        let route = RoceRoute {
            src_mac: self.config.mac,
            dst_mac,
            src_ip: self.config.ip,
            dst_ip: remote.ip,
            src_port: sport,
            ip_id: self.ip_id,
        };
        let mut buffer = std::mem::take(&mut self.frame);
        frame::write_roce(&route, spec.len(), &mut buffer, |out| spec.write(out));
        self.frame = buffer;
        self.stats.roce_out += 1;
        self.emit_own_buffer();
    }

    fn send_aeth(&mut self, qp: &Qp, psn: u32, syndrome: u8, now: Instant) {
        let Some(remote) = qp.remote else { return };
        let mut spec = PacketSpec::new(Bth::new(opcode::ACKNOWLEDGE, remote.qpn, psn, false));
        spec.aeth = Some(Aeth {
            syndrome,
            msn: qp.msn,
        });
        match syndrome >> 5 {
            0b000 => self.stats.acks_sent += 1,
            0b001 => self.stats.rnr_naks_sent += 1,
            _ => self.stats.naks_sent += 1,
        }
        self.send(remote, qp.udp_sport, &spec, now);
    }
}

/// The RC engine of the target.
#[derive(Debug)]
pub struct Engine {
    wire: Wire,
    qps: BTreeMap<u32, Qp>,
    next_qpn: u32,
    mrs: MemoryRegions,
    cq: CompletionQueue,
    pcap_seq: u64,
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

fn nak_status(code: u8) -> CompletionStatus {
    match code {
        NAK_INVALID_REQUEST => CompletionStatus::RemoteInvalidRequest,
        NAK_REMOTE_ACCESS => CompletionStatus::RemoteAccessError,
        _ => CompletionStatus::RemoteOperationError,
    }
}

impl Engine {
    pub fn new(config: EngineConfig, link: Box<dyn Link>) -> Self {
        Self {
            wire: Wire {
                config,
                link,
                neighbours: HashMap::new(),
                arp_sent_at: HashMap::new(),
                ip_id: random_u32() as u16,
                pcap: None,
                stats: TargetStats::default(),
                frame: Vec::with_capacity(4200),
            },
            qps: BTreeMap::new(),
            next_qpn: FIRST_QPN,
            mrs: MemoryRegions::default(),
            cq: CompletionQueue::default(),
            pcap_seq: 0,
        }
    }

    pub fn config(&self) -> EngineConfig {
        self.wire.config
    }

    /// Counters; `connections` is kept by the caller that owns the transport.
    pub fn stats(&self) -> TargetStats {
        self.wire.stats.clone()
    }

    pub fn stats_mut(&mut self) -> &mut TargetStats {
        &mut self.wire.stats
    }

    /// Records a MAC for an IP, as a static neighbour entry would.
    pub fn add_neighbour(&mut self, ip: Ipv4Addr, mac: [u8; 6]) {
        self.wire.neighbours.insert(ip, mac);
    }

    /// Broadcasts a gratuitous ARP for the target's address.
    pub fn announce(&mut self) {
        self.wire.stats.arp_sent += 1;
        let frame = frame::gratuitous_arp(self.wire.config.mac, self.wire.config.ip);
        self.wire.emit(&frame);
    }

    // ---- memory ----

    pub fn register_mr(&mut self, length: u64, access: &[MrAccess]) -> Result<MrInfo, EngineError> {
        Ok(self.mrs.register(length, access)?.info())
    }

    pub fn deregister_mr(&mut self, key: u32) -> Result<(), EngineError> {
        Ok(self.mrs.deregister(key)?)
    }

    pub fn mr_read(&self, key: u32, offset: u64, length: u64) -> Result<Vec<u8>, EngineError> {
        Ok(self.mrs.slice(key, offset, length)?.to_vec())
    }

    pub fn mr_write(&mut self, key: u32, offset: u64, bytes: &[u8]) -> Result<(), EngineError> {
        Ok(self.mrs.write(key, offset, bytes)?)
    }

    /// Fills `length` bytes at `offset` with `pattern` repeated.
    pub fn mr_fill(
        &mut self,
        key: u32,
        offset: u64,
        length: u64,
        pattern: &[u8],
    ) -> Result<(), EngineError> {
        let region = self.mrs.get_mut(key)?;
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
            gid: gid_of(self.wire.config.ip),
            ip: self.wire.config.ip.to_string(),
            mac: format_mac(self.wire.config.mac),
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
        let qp = Qp::new(qpn, settings, settings.psn.unwrap_or_else(random_u32))?;
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
            return Err(EngineError::BadState {
                qpn,
                state: qp.state,
                needed: "connect needs a new or reset QP",
            });
        }
        qp.remote = Some(Remote {
            qpn: remote_qpn & PSN_MASK,
            ip: remote_ip,
        });
        qp.epsn = remote_psn & PSN_MASK;
        qp.state = QpStateName::Rts;
        if let Some(mac) = remote_mac {
            self.wire.neighbours.insert(remote_ip, mac);
        } else if !self.wire.neighbours.contains_key(&remote_ip) {
            self.wire.arp_for(remote_ip, now);
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
        let qp = self.qps.get_mut(&qpn).ok_or(EngineError::NoSuchQp(qpn))?;
        flush(qp, &mut self.cq, &mut self.wire.stats);
        let settings = QpSettings {
            path_mtu: Some(qp.pmtu),
            psn: None,
            ack_timeout_ms: Some(qp.ack_timeout.as_millis() as u64),
            retry_cnt: Some(qp.retry_cnt),
            rnr_retry: Some(qp.rnr_retry),
            min_rnr_timer: Some(qp.min_rnr_timer),
            max_rd_atomic: Some(qp.max_rd_atomic),
        };
        *qp = Qp::new(qpn, &settings, psn.unwrap_or_else(random_u32))?;
        let endpoint = self.endpoint(&self.qps[&qpn]);
        Ok(endpoint)
    }

    pub fn destroy_qp(&mut self, qpn: u32) -> Result<(), EngineError> {
        let mut qp = self.qps.remove(&qpn).ok_or(EngineError::NoSuchQp(qpn))?;
        flush(&mut qp, &mut self.cq, &mut self.wire.stats);
        Ok(())
    }

    // ---- posting ----

    pub fn post_recv(&mut self, qpn: u32, wr_id: u64, local: Sge) -> Result<(), EngineError> {
        self.mrs.check_local(
            local.key,
            local.offset,
            u64::from(local.length),
            Some(MrAccess::LocalWrite),
        )?;
        let qp = self.qp_mut(qpn)?;
        if qp.state == QpStateName::Error {
            return Err(EngineError::BadState {
                qpn,
                state: qp.state,
                needed: "receives need INIT or RTS",
            });
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
        let op = WqeOp::Write {
            remote_va: remote.va,
            rkey: remote.rkey,
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
        self.post(qpn, wr_id, WqeOp::Send { imm, data }, local.length, now)
    }

    pub fn post_read(
        &mut self,
        qpn: u32,
        wr_id: u64,
        local: Sge,
        remote: RemoteBuffer,
        now: Instant,
    ) -> Result<(), EngineError> {
        self.mrs.check_local(
            local.key,
            local.offset,
            u64::from(local.length),
            Some(MrAccess::LocalWrite),
        )?;
        let op = WqeOp::Read {
            remote_va: remote.va,
            rkey: remote.rkey,
            local,
        };
        self.post(qpn, wr_id, op, local.length, now)
    }

    fn snapshot(&self, local: Sge) -> Result<Vec<u8>, EngineError> {
        if local.length > MAX_MESSAGE_BYTES {
            return Err(EngineError::MessageTooLong(local.length));
        }
        Ok(self
            .mrs
            .slice(local.key, local.offset, u64::from(local.length))?
            .to_vec())
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
            return Err(EngineError::BadState {
                qpn,
                state: qp.state,
                needed: "sends need RTS (connect first)",
            });
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
        pump(qp, &mut self.wire, &mut self.cq, &self.mrs, now);
        Ok(())
    }

    /// Takes up to `max` completions (of `qpn`, or of every QP), oldest first.
    pub fn poll_cq(&mut self, qpn: Option<u32>, max: usize) -> Vec<Completion> {
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.cq.entries.len());
        while let Some(entry) = self.cq.entries.pop_front() {
            if taken.len() < max && qpn.is_none_or(|q| q == entry.qpn) {
                taken.push(entry);
            } else {
                kept.push_back(entry);
            }
        }
        self.cq.entries = kept;
        taken
    }

    pub fn completions_pending(&self) -> usize {
        self.cq.entries.len()
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
        let writer = PcapWriter::create(&path)
            .map_err(|e| EngineError::Pcap(format!("creating {}: {e}", path.display())))?;
        self.wire.pcap = Some(writer);
        Ok(path.display().to_string())
    }

    /// Closes the capture; returns its path and frame count.
    pub fn pcap_stop(&mut self) -> Option<(String, u64)> {
        let mut writer = self.wire.pcap.take()?;
        if writer.flush().is_err() {
            self.wire.stats.pcap_errors += 1;
        }
        Some((writer.path().display().to_string(), writer.frames()))
    }

    pub fn pcap_status(&self) -> Option<(String, u64)> {
        self.wire
            .pcap
            .as_ref()
            .map(|w| (w.path().display().to_string(), w.frames()))
    }

    // ---- time ----

    /// Runs the retransmission and RNR timers (IBTA 9.7.6.1.1, 9.7.5.2.8) and flushes the
    /// capture. Call often (every millisecond or so).
    pub fn tick(&mut self, now: Instant) {
        for qp in self.qps.values_mut() {
            tick_qp(qp, &mut self.wire, &mut self.cq, &self.mrs, now);
        }
        if let Some(pcap) = &mut self.wire.pcap {
            if pcap.flush().is_err() {
                self.wire.stats.pcap_errors += 1;
            }
        }
    }

    // ---- frames in ----

    /// Handles one Ethernet frame from the link. Never panics, whatever the bytes.
    pub fn receive(&mut self, bytes: &[u8], now: Instant) {
        self.wire.stats.frames_in += 1;
        self.wire.capture(bytes);
        let config = self.wire.config;
        match frame::parse_frame(bytes, config.mac, config.ip) {
            Err(FrameError::NotOurs(_)) => self.wire.stats.dropped_not_ours += 1,
            Err(FrameError::Malformed(_)) => self.wire.stats.dropped_malformed += 1,
            Err(FrameError::BadIcrc { .. }) => self.wire.stats.dropped_bad_icrc += 1,
            Ok(Incoming::Arp { packet }) => self.on_arp(&packet),
            Ok(Incoming::Roce(roce)) => {
                self.wire.stats.roce_in += 1;
                self.on_roce(&roce, now)
            }
        }
    }

    fn on_arp(&mut self, packet: &etherparse::ArpEthIpv4Packet) {
        let config = self.wire.config;
        let sender = packet.sender_ipv4_addr();
        // Learn from every ARP (requests, replies, announcements), as RFC 826 suggests,
        // but never an entry for our own address or the unspecified one of a probe.
        if !sender.is_unspecified() && sender != config.ip {
            self.wire.neighbours.insert(sender, packet.sender_mac);
        }
        if packet.operation == ArpOperation::REQUEST && packet.target_ipv4_addr() == config.ip {
            self.wire.stats.arp_requests_answered += 1;
            let reply = frame::arp_reply(packet, config.mac, config.ip);
            self.wire.emit(&reply);
        } else if packet.operation != ArpOperation::REPLY {
            self.wire.stats.dropped_not_ours += 1;
        }
    }

    fn on_roce(&mut self, roce: &frame::RoceFrame<'_>, now: Instant) {
        let packet = match Packet::parse(roce.transport) {
            Ok(packet) => packet,
            Err(_) => {
                self.wire.stats.dropped_malformed += 1;
                return;
            }
        };
        // P_Key match ignoring the membership bit (IBTA 10.9.3); rxe only has 0xFFFF.
        if packet.bth.pkey & 0x7FFF != 0x7FFF {
            self.wire.stats.dropped_malformed += 1;
            return;
        }
        let Some(qp) = self.qps.get_mut(&packet.bth.dest_qp) else {
            self.wire.stats.dropped_unknown_qp += 1;
            return;
        };
        // A QP only talks to the address it was connected to (reference: rxe checks both
        // IPs the same way).
        if qp.state != QpStateName::Rts || qp.remote.is_none_or(|r| r.ip != roce.src_ip) {
            self.wire.stats.dropped_qp_state += 1;
            return;
        }
        self.wire.neighbours.insert(roce.src_ip, roce.src_mac);
        match packet.info.kind {
            OpKind::Ack | OpKind::AtomicAck | OpKind::ReadResponse => on_response(
                qp,
                &mut self.wire,
                &mut self.cq,
                &mut self.mrs,
                &packet,
                now,
            ),
            OpKind::Send | OpKind::Write | OpKind::ReadRequest | OpKind::Atomic => on_request(
                qp,
                &mut self.wire,
                &mut self.cq,
                &mut self.mrs,
                &packet,
                now,
            ),
        }
    }
}

fn push_completion(cq: &mut CompletionQueue, stats: &mut TargetStats, completion: Completion) {
    if cq.entries.len() >= MAX_COMPLETIONS {
        cq.entries.pop_front();
        stats.completions_dropped += 1;
    }
    stats.completions += 1;
    cq.entries.push_back(completion);
}

fn complete_wqe(
    qp: &Qp,
    wqe: &SendWqe,
    status: CompletionStatus,
    nak_code: Option<u8>,
    cq: &mut CompletionQueue,
    stats: &mut TargetStats,
) {
    push_completion(
        cq,
        stats,
        Completion {
            qpn: qp.qpn,
            wr_id: wqe.wr_id,
            opcode: wqe.opcode(),
            status,
            nak_code,
            byte_len: if status == CompletionStatus::Success {
                wqe.length
            } else {
                0
            },
            imm: None,
        },
    );
}

/// Every outstanding WQE and receive completes as flushed (IBTA 10.3.1.5: ERROR state).
fn flush(qp: &mut Qp, cq: &mut CompletionQueue, stats: &mut TargetStats) {
    while let Some(wqe) = qp.wqes.pop_front() {
        complete_wqe(qp, &wqe, CompletionStatus::Flushed, None, cq, stats);
    }
    while let Some(recv) = qp.recvs.pop_front() {
        push_completion(
            cq,
            stats,
            Completion {
                qpn: qp.qpn,
                wr_id: recv.wr_id,
                opcode: CompletionOpcode::Recv,
                status: CompletionStatus::Flushed,
                nak_code: None,
                byte_len: 0,
                imm: None,
            },
        );
    }
    qp.timer_start = None;
    qp.rnr_until = None;
    qp.in_progress = None;
}

fn enter_error(qp: &mut Qp, cq: &mut CompletionQueue, stats: &mut TargetStats) {
    qp.state = QpStateName::Error;
    flush(qp, cq, stats);
}

/// Fails the oldest WQE with `status` and moves the QP to ERROR.
fn fail_head(
    qp: &mut Qp,
    status: CompletionStatus,
    nak_code: Option<u8>,
    cq: &mut CompletionQueue,
    stats: &mut TargetStats,
) {
    if let Some(wqe) = qp.wqes.pop_front() {
        complete_wqe(qp, &wqe, status, nak_code, cq, stats);
    }
    enter_error(qp, cq, stats);
}

/// Sends what the window allows, from `send_psn` on (IBTA 9.7.4: requester behaviour;
/// go-back-N restarts simply move `send_psn` back).
fn pump(qp: &mut Qp, wire: &mut Wire, cq: &mut CompletionQueue, mrs: &MemoryRegions, now: Instant) {
    let _ = (cq, mrs);
    if qp.state != QpStateName::Rts {
        return;
    }
    let Some(remote) = qp.remote else { return };
    if let Some(until) = qp.rnr_until {
        if now < until {
            return;
        }
        qp.rnr_until = None;
    }
    while qp.send_psn != qp.next_psn && psn_diff(qp.send_psn, qp.una) < MAX_INFLIGHT_PSNS {
        let Some(index) = qp.wqe_index(qp.send_psn) else {
            // Only reachable if bookkeeping went wrong; resynchronise rather than spin.
            qp.send_psn = qp.next_psn;
            break;
        };
        let wqe = &qp.wqes[index];
        let i = psn_diff(qp.send_psn, wqe.first_psn) as u32;
        let pmtu = qp.pmtu;
        let psn = qp.send_psn;
        match &wqe.op {
            WqeOp::Read {
                remote_va, rkey, ..
            } => {
                // Outstanding READs are limited by the guest's max_dest_rd_atomic (IBTA
                // 9.7.4.1.4, reference: "keep outstanding READs <= max_dest_rd_atomic").
                let reads_ahead = qp.wqes.iter().take(index).filter(|w| w.is_read()).count();
                if reads_ahead >= usize::from(qp.max_rd_atomic) {
                    break;
                }
                // A retried READ restarts at the first missing response (IBTA 9.7.4.1.4).
                let offset = u64::from(i) * u64::from(pmtu);
                let mut spec =
                    PacketSpec::new(Bth::new(opcode::READ_REQUEST, remote.qpn, psn, true));
                spec.reth = Some(Reth {
                    va: remote_va.wrapping_add(offset),
                    rkey: *rkey,
                    length: wqe.length.saturating_sub(offset as u32),
                });
                let end = wqe.end_psn();
                note_sent(&mut qp.sent_high, psn, &mut wire.stats);
                wire.send(remote, qp.udp_sport, &spec, now);
                qp.send_psn = end;
            }
            WqeOp::Write { data, .. } | WqeOp::Send { data, .. } => {
                let position = Position::of(i, wqe.packets);
                let start = (i as usize).saturating_mul(pmtu as usize).min(data.len());
                let end = start.saturating_add(pmtu as usize).min(data.len());
                let ack_req = position.ends_message() || i % ACK_REQ_EVERY == ACK_REQ_EVERY - 1;
                let mut spec = PacketSpec::new(Bth::new(0, remote.qpn, psn, ack_req));
                spec.payload = &data[start..end];
                match &wqe.op {
                    WqeOp::Write {
                        remote_va,
                        rkey,
                        imm,
                        ..
                    } => {
                        spec.bth.opcode = match (position, imm.is_some()) {
                            (Position::Only, false) => opcode::WRITE_ONLY,
                            (Position::Only, true) => opcode::WRITE_ONLY_IMM,
                            (Position::First, _) => opcode::WRITE_FIRST,
                            (Position::Middle, _) => opcode::WRITE_MIDDLE,
                            (Position::Last, false) => opcode::WRITE_LAST,
                            (Position::Last, true) => opcode::WRITE_LAST_IMM,
                        };
                        if position.starts_message() {
                            spec.reth = Some(Reth {
                                va: *remote_va,
                                rkey: *rkey,
                                length: wqe.length,
                            });
                        }
                        if position.ends_message() {
                            spec.immdt = *imm;
                        }
                    }
                    WqeOp::Send { imm, .. } => {
                        spec.bth.opcode = match (position, imm.is_some()) {
                            (Position::Only, false) => opcode::SEND_ONLY,
                            (Position::Only, true) => opcode::SEND_ONLY_IMM,
                            (Position::First, _) => opcode::SEND_FIRST,
                            (Position::Middle, _) => opcode::SEND_MIDDLE,
                            (Position::Last, false) => opcode::SEND_LAST,
                            (Position::Last, true) => opcode::SEND_LAST_IMM,
                        };
                        if position.ends_message() {
                            spec.immdt = *imm;
                        }
                    }
                    WqeOp::Read { .. } => {}
                }
                note_sent(&mut qp.sent_high, psn, &mut wire.stats);
                wire.send(remote, qp.udp_sport, &spec, now);
                qp.send_psn = psn_add(psn, 1);
            }
        }
        if qp.timer_start.is_none() {
            qp.timer_start = Some(now);
        }
    }
}

fn note_sent(sent_high: &mut u32, psn: u32, stats: &mut TargetStats) {
    if psn_diff(psn, *sent_high) < 0 {
        stats.retransmissions += 1;
    } else {
        *sent_high = psn_add(psn, 1);
    }
}

fn tick_qp(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &MemoryRegions,
    now: Instant,
) {
    if qp.state != QpStateName::Rts {
        return;
    }
    if qp.una == qp.send_psn && qp.rnr_until.is_none() {
        qp.timer_start = None;
    }
    if let Some(start) = qp.timer_start {
        if qp.una != qp.send_psn && now.saturating_duration_since(start) >= qp.ack_timeout {
            // Local ACK timeout (IBTA 9.7.6.1.1): go back to the oldest unacked PSN.
            wire.stats.timeouts += 1;
            if qp.retry_cnt != INFINITE_RETRIES {
                if qp.retries_left == 0 {
                    fail_head(
                        qp,
                        CompletionStatus::RetryExceeded,
                        None,
                        cq,
                        &mut wire.stats,
                    );
                    return;
                }
                qp.retries_left -= 1;
            }
            qp.send_psn = qp.una;
            qp.timer_start = Some(now);
        }
    }
    pump(qp, wire, cq, mrs, now);
}

/// Completes every WQE whose last PSN is at or before `psn` and moves the unacked mark past
/// it (IBTA 9.7.5.2.1: an ACK acknowledges all earlier PSNs). A READ whose responses have
/// not all arrived cannot be completed by an ACK: the responses were lost, so the READ is
/// resent from its first missing PSN (IBTA 9.7.5.2.2, implied NAK).
fn acknowledge_through(
    qp: &mut Qp,
    psn: u32,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    now: Instant,
) {
    while let Some(front) = qp.wqes.front() {
        if psn_diff(front.last_psn(), psn) > 0 {
            break;
        }
        if front.is_read() && front.read_done < front.packets {
            let restart = psn_add(front.first_psn, front.read_done);
            qp.una = restart;
            qp.send_psn = restart;
            progress(qp, now);
            return;
        }
        if let Some(wqe) = qp.wqes.pop_front() {
            complete_wqe(
                qp,
                &wqe,
                CompletionStatus::Success,
                None,
                cq,
                &mut wire.stats,
            );
        }
    }
    let next = psn_add(psn, 1);
    if psn_diff(next, qp.una) > 0 {
        qp.una = next;
    }
    if psn_diff(qp.send_psn, qp.una) < 0 {
        qp.send_psn = qp.una;
    }
    progress(qp, now);
}

fn progress(qp: &mut Qp, now: Instant) {
    qp.retries_left = qp.retry_cnt;
    qp.rnr_retries_left = qp.rnr_retry;
    qp.timer_start = (qp.una != qp.send_psn).then_some(now);
}

/// Requester side: ACKs, NAKs and READ responses from the guest (IBTA 9.7.5.2).
fn on_response(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &mut MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) {
    let psn = packet.bth.psn;
    // Only PSNs sent and not yet acknowledged are live (IBTA 9.7.5.2.1); older ones are
    // duplicates, newer ones ghosts.
    let behind_una = psn_diff(psn, qp.una) < 0;
    let beyond_sent = psn_diff(psn, qp.sent_high) >= 0;
    match packet.info.kind {
        OpKind::Ack => {
            let Some(aeth) = packet.aeth else { return };
            match aeth.kind() {
                Syndrome::Ack { .. } => {
                    wire.stats.acks_received += 1;
                    if behind_una || beyond_sent {
                        wire.stats.duplicates += 1;
                        return;
                    }
                    acknowledge_through(qp, psn, wire, cq, now);
                }
                Syndrome::RnrNak { timer } => {
                    wire.stats.rnr_naks_received += 1;
                    if behind_una || beyond_sent {
                        wire.stats.duplicates += 1;
                        return;
                    }
                    acknowledge_before(qp, psn, wire, cq, now);
                    if qp.rnr_retry != INFINITE_RETRIES {
                        if qp.rnr_retries_left == 0 {
                            fail_head(
                                qp,
                                CompletionStatus::RnrRetryExceeded,
                                None,
                                cq,
                                &mut wire.stats,
                            );
                            return;
                        }
                        qp.rnr_retries_left -= 1;
                    }
                    // IBTA 9.7.5.2.8: wait the responder's timer, then resend from the PSN.
                    qp.send_psn = psn;
                    qp.rnr_until = Some(now + Duration::from_micros(rnr_timer_us(timer)));
                    qp.timer_start = None;
                }
                Syndrome::Nak { code } => {
                    wire.stats.naks_received += 1;
                    if behind_una || psn_diff(psn, qp.sent_high) > 0 {
                        wire.stats.duplicates += 1;
                        return;
                    }
                    acknowledge_before(qp, psn, wire, cq, now);
                    if code == NAK_PSN_SEQUENCE {
                        // IBTA 9.7.5.2.4: resend everything from the PSN the responder
                        // expects (go-back-N).
                        if qp.retry_cnt != INFINITE_RETRIES {
                            if qp.retries_left == 0 {
                                fail_head(
                                    qp,
                                    CompletionStatus::RetryExceeded,
                                    None,
                                    cq,
                                    &mut wire.stats,
                                );
                                return;
                            }
                            qp.retries_left -= 1;
                        }
                        qp.send_psn = psn;
                        qp.timer_start = Some(now);
                        pump(qp, wire, cq, mrs, now);
                    } else {
                        // IBTA 9.7.5.2.5-7: the request at this PSN failed; the QP errors.
                        fail_head(qp, nak_status(code), Some(code), cq, &mut wire.stats);
                    }
                }
                Syndrome::Reserved(_) => wire.stats.dropped_unexpected += 1,
            }
        }
        OpKind::ReadResponse => on_read_response(qp, wire, cq, mrs, packet, now),
        // We never send atomics, so an atomic ACK answers nothing.
        _ => wire.stats.dropped_unexpected += 1,
    }
    pump(qp, wire, cq, mrs, now);
}

fn acknowledge_before(
    qp: &mut Qp,
    psn: u32,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    now: Instant,
) {
    if psn_diff(psn, qp.una) > 0 {
        acknowledge_through(qp, psn_add(psn, PSN_MASK), wire, cq, now);
    }
}

fn on_read_response(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &mut MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) {
    let psn = packet.bth.psn;
    let Some(index) = qp.wqe_index(psn) else {
        wire.stats.duplicates += 1;
        return;
    };
    let (first_psn, read_done, packets, length, local) = {
        let wqe = &qp.wqes[index];
        let WqeOp::Read { local, .. } = wqe.op else {
            wire.stats.dropped_unexpected += 1;
            return;
        };
        (wqe.first_psn, wqe.read_done, wqe.packets, wqe.length, local)
    };
    // Responses must come in order (IBTA 9.7.5.2.3); a gap is left to the timer, which
    // re-requests from the first missing PSN.
    if psn != psn_add(first_psn, read_done) || psn_diff(psn, qp.send_psn) >= 0 {
        if psn_diff(psn, psn_add(first_psn, read_done)) < 0 {
            wire.stats.duplicates += 1;
        } else {
            wire.stats.dropped_unexpected += 1;
        }
        return;
    }
    let i = read_done;
    let pmtu = u64::from(qp.pmtu);
    let offset = u64::from(i) * pmtu;
    let expected_len = if i + 1 == packets {
        u64::from(length).saturating_sub(offset)
    } else {
        pmtu
    };
    let position = packet.info.position;
    let fits = packet.payload.len() as u64 == expected_len
        && (i + 1 == packets) == position.ends_message()
        && (position.starts_message() || i > 0);
    if !fits {
        wire.stats.dropped_unexpected += 1;
        return;
    }
    // A READ response implies every earlier request was carried out (IBTA 9.7.5.2.1).
    if index > 0 {
        let before = psn_add(first_psn, PSN_MASK);
        acknowledge_through(qp, before, wire, cq, now);
    }
    if mrs
        .write(local.key, local.offset + offset, packet.payload)
        .is_err()
    {
        fail_head(
            qp,
            CompletionStatus::LocalProtectionError,
            None,
            cq,
            &mut wire.stats,
        );
        return;
    }
    if let Some(wqe) = qp.wqes.front_mut() {
        wqe.read_done += 1;
    }
    qp.una = psn_add(psn, 1);
    if psn_diff(qp.send_psn, qp.una) < 0 {
        qp.send_psn = qp.una;
    }
    if i + 1 == packets {
        if let Some(wqe) = qp.wqes.pop_front() {
            complete_wqe(
                qp,
                &wqe,
                CompletionStatus::Success,
                None,
                cq,
                &mut wire.stats,
            );
        }
    }
    progress(qp, now);
}

/// Responder side: SEND, WRITE and READ requests from the guest (IBTA 9.7.5.1).
fn on_request(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &mut MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) {
    let psn = packet.bth.psn;
    let diff = psn_diff(psn, qp.epsn);
    if diff > 0 {
        // IBTA 9.7.5.1.2: one NAK for a sequence error, then silence until the expected
        // PSN shows up (reference: rxe does the same).
        wire.stats.dropped_unexpected += 1;
        if !qp.seq_nak_sent {
            qp.seq_nak_sent = true;
            wire.send_aeth(qp, qp.epsn, NAK_PSN_SEQUENCE, now);
        }
        return;
    }
    if diff < 0 {
        wire.stats.duplicates += 1;
        duplicate_request(qp, wire, mrs, packet, now);
        return;
    }
    qp.seq_nak_sent = false;
    let result = match packet.info.kind {
        OpKind::Send => responder_send(qp, wire, cq, mrs, packet, now),
        OpKind::Write => responder_write(qp, wire, cq, mrs, packet, now),
        OpKind::ReadRequest => responder_read(qp, wire, mrs, packet, now),
        // Atomics are not offered (the guest's QP gets no REMOTE_ATOMIC use here).
        _ => Err(NAK_INVALID_REQUEST),
    };
    match result {
        Ok(Step::Accepted) => {
            qp.epsn = psn_add(psn, 1);
            if packet.bth.ack_req {
                wire.send_aeth(qp, psn, SYNDROME_ACK, now);
            }
        }
        Ok(Step::Consumed) | Ok(Step::RnrNak) => {}
        Err(code) => {
            // IBTA 9.7.5.1.3-5: NAK with the offending PSN, then the QP is in error and
            // drops everything after (reference: rxe behaves so).
            wire.send_aeth(qp, psn, code, now);
            enter_error(qp, cq, &mut wire.stats);
        }
    }
}

enum Step {
    /// The packet was taken: advance the expected PSN and ACK if asked.
    Accepted,
    /// The packet was taken and the expected PSN already moved (READ).
    Consumed,
    /// No receive buffer: an RNR NAK was sent, the PSN stays expected.
    RnrNak,
}

/// Checks payload size against the position in the message (IBTA 9.7.5.1.1, C9-80..):
/// first and middle carry exactly one MTU, last 1..=MTU, only 0..=MTU; pad aligned.
fn check_length(packet: &Packet<'_>, pmtu: u32) -> Result<(), u8> {
    let len = packet.payload.len();
    let pmtu = pmtu as usize;
    let ok = match packet.info.position {
        Position::First | Position::Middle => len == pmtu,
        Position::Last => (1..=pmtu).contains(&len),
        Position::Only => len <= pmtu,
    };
    if ok && packet.pad_is_aligned() {
        Ok(())
    } else {
        Err(NAK_INVALID_REQUEST)
    }
}

fn rnr_nak(qp: &Qp, wire: &mut Wire, psn: u32, now: Instant) -> Result<Step, u8> {
    wire.send_aeth(qp, psn, RNR_NAK | qp.min_rnr_timer, now);
    Ok(Step::RnrNak)
}

fn responder_send(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &mut MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) -> Result<Step, u8> {
    let position = packet.info.position;
    let received = match (qp.in_progress, position.starts_message()) {
        (None, true) => 0,
        (Some(InProgress::Send { received }), false) => received,
        _ => return Err(NAK_INVALID_REQUEST),
    };
    check_length(packet, qp.pmtu)?;
    let Some(&recv) = qp.recvs.front() else {
        // IBTA 9.7.5.1.4: no receive WQE is a receiver-not-ready condition.
        return rnr_nak(qp, wire, packet.bth.psn, now);
    };
    let len = packet.payload.len() as u32;
    let total = received.saturating_add(len);
    if total > recv.local.length {
        qp.recvs.pop_front();
        push_completion(
            cq,
            &mut wire.stats,
            Completion {
                qpn: qp.qpn,
                wr_id: recv.wr_id,
                opcode: CompletionOpcode::Recv,
                status: CompletionStatus::LocalLengthError,
                nak_code: None,
                byte_len: 0,
                imm: None,
            },
        );
        return Err(NAK_INVALID_REQUEST);
    }
    if mrs
        .write(
            recv.local.key,
            recv.local.offset + u64::from(received),
            packet.payload,
        )
        .is_err()
    {
        return Err(NAK_REMOTE_OPERATIONAL);
    }
    if position.ends_message() {
        qp.recvs.pop_front();
        qp.in_progress = None;
        qp.msn = psn_add(qp.msn, 1);
        push_completion(
            cq,
            &mut wire.stats,
            Completion {
                qpn: qp.qpn,
                wr_id: recv.wr_id,
                opcode: CompletionOpcode::Recv,
                status: CompletionStatus::Success,
                nak_code: None,
                byte_len: total,
                imm: packet.immdt,
            },
        );
    } else {
        qp.in_progress = Some(InProgress::Send { received: total });
    }
    Ok(Step::Accepted)
}

fn responder_write(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &mut MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) -> Result<Step, u8> {
    let position = packet.info.position;
    let (key, offset, total, received) = match (qp.in_progress, position.starts_message()) {
        (None, true) => {
            let reth = packet.reth.ok_or(NAK_INVALID_REQUEST)?;
            if reth.length > 0 {
                // IBTA 9.7.5.1.3 / C10-?: R_Key, access and bounds, else remote access
                // error. A 0-byte WRITE skips the check (reference: rxe does too).
                let (key, offset) = mrs
                    .check_remote(
                        reth.rkey,
                        reth.va,
                        u64::from(reth.length),
                        MrAccess::RemoteWrite,
                    )
                    .map_err(|_| NAK_REMOTE_ACCESS)?;
                (key, offset, reth.length, 0u32)
            } else {
                (0, 0, 0, 0)
            }
        }
        (
            Some(InProgress::Write {
                key,
                offset,
                total,
                received,
            }),
            false,
        ) => (key, offset, total, received),
        _ => return Err(NAK_INVALID_REQUEST),
    };
    check_length(packet, qp.pmtu)?;
    let len = packet.payload.len() as u32;
    let done = received.saturating_add(len);
    if done > total || (position.ends_message() && done != total) {
        return Err(NAK_INVALID_REQUEST);
    }
    if packet.immdt.is_some() && qp.recvs.is_empty() {
        return rnr_nak(qp, wire, packet.bth.psn, now);
    }
    if len > 0
        && mrs
            .write(key, offset + u64::from(received), packet.payload)
            .is_err()
    {
        // The MR went away mid-message.
        return Err(NAK_REMOTE_ACCESS);
    }
    if position.ends_message() {
        qp.in_progress = None;
        qp.msn = psn_add(qp.msn, 1);
        if let Some(imm) = packet.immdt {
            if let Some(recv) = qp.recvs.pop_front() {
                push_completion(
                    cq,
                    &mut wire.stats,
                    Completion {
                        qpn: qp.qpn,
                        wr_id: recv.wr_id,
                        opcode: CompletionOpcode::RecvRdmaWithImm,
                        status: CompletionStatus::Success,
                        nak_code: None,
                        byte_len: total,
                        imm: Some(imm),
                    },
                );
            }
        }
    } else {
        qp.in_progress = Some(InProgress::Write {
            key,
            offset,
            total,
            received: done,
        });
    }
    Ok(Step::Accepted)
}

fn responder_read(
    qp: &mut Qp,
    wire: &mut Wire,
    mrs: &MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) -> Result<Step, u8> {
    if qp.in_progress.is_some() {
        return Err(NAK_INVALID_REQUEST);
    }
    let reth = packet.reth.ok_or(NAK_INVALID_REQUEST)?;
    if reth.length > MAX_MESSAGE_BYTES {
        return Err(NAK_INVALID_REQUEST);
    }
    if reth.length > 0 {
        mrs.check_remote(
            reth.rkey,
            reth.va,
            u64::from(reth.length),
            MrAccess::RemoteRead,
        )
        .map_err(|_| NAK_REMOTE_ACCESS)?;
    }
    let record = ReadRecord {
        first_psn: packet.bth.psn,
        packets: packet_count(u64::from(reth.length), qp.pmtu),
        va: reth.va,
        rkey: reth.rkey,
        length: reth.length,
    };
    qp.msn = psn_add(qp.msn, 1);
    send_read_responses(qp, wire, mrs, &record, 0, now);
    qp.epsn = psn_add(record.first_psn, record.packets);
    if qp.reads.len() >= READ_HISTORY {
        qp.reads.pop_front();
    }
    qp.reads.push_back(record);
    Ok(Step::Consumed)
}

/// Sends READ responses `from..packets` of `record` (IBTA 9.7.5.1.5: first/middle/last or
/// only; AETH on all but middle).
fn send_read_responses(
    qp: &Qp,
    wire: &mut Wire,
    mrs: &MemoryRegions,
    record: &ReadRecord,
    from: u32,
    now: Instant,
) {
    let Some(remote) = qp.remote else { return };
    let pmtu = u64::from(qp.pmtu);
    let data: &[u8] = if record.length == 0 {
        &[]
    } else {
        match mrs
            .check_remote(
                record.rkey,
                record.va,
                u64::from(record.length),
                MrAccess::RemoteRead,
            )
            .and_then(|(key, offset)| mrs.slice(key, offset, u64::from(record.length)))
        {
            Ok(data) => data,
            // Deregistered between request and replay: nothing to send.
            Err(_) => return,
        }
    };
    // A replay from the middle restarts with a FIRST (or ONLY) response.
    let count = record.packets - from;
    for j in 0..count {
        let i = from + j;
        let op = match Position::of(j, count) {
            Position::Only => opcode::READ_RESPONSE_ONLY,
            Position::First => opcode::READ_RESPONSE_FIRST,
            Position::Middle => opcode::READ_RESPONSE_MIDDLE,
            Position::Last => opcode::READ_RESPONSE_LAST,
        };
        let psn = psn_add(record.first_psn, i);
        let mut spec = PacketSpec::new(Bth::new(op, remote.qpn, psn, false));
        if op != opcode::READ_RESPONSE_MIDDLE {
            spec.aeth = Some(Aeth {
                syndrome: SYNDROME_ACK,
                msn: qp.msn,
            });
        }
        let start = (u64::from(i) * pmtu).min(data.len() as u64) as usize;
        let end = (start as u64 + pmtu).min(data.len() as u64) as usize;
        spec.payload = &data[start..end];
        wire.send(remote, qp.udp_sport, &spec, now);
    }
}

/// IBTA 9.7.5.1.6: duplicates are answered, never executed again (except READ, which is
/// replayed from the duplicate's PSN).
fn duplicate_request(
    qp: &mut Qp,
    wire: &mut Wire,
    mrs: &MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) {
    let psn = packet.bth.psn;
    if packet.info.kind == OpKind::ReadRequest {
        let found = qp.reads.iter().copied().find(|r| {
            let d = psn_diff(psn, r.first_psn);
            d >= 0 && (d as u32) < r.packets
        });
        if let Some(record) = found {
            let from = psn_diff(psn, record.first_psn) as u32;
            send_read_responses(qp, wire, mrs, &record, from, now);
        }
        return;
    }
    if packet.bth.ack_req {
        // Reference: rxe re-ACKs duplicates with PSN = expected - 1.
        let last = psn_add(qp.epsn, PSN_MASK);
        wire.send_aeth(qp, last, SYNDROME_ACK, now);
    }
}
