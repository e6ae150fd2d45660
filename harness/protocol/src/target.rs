//! roce-target's control socket: the remote RDMA peer of the guest's rxe.
//!
//! One request per line, one reply per request (see [`crate::wire`]). A typical session:
//! `{"id":1,"op":"register_mr","length":65536,"access":["local_write","remote_write","remote_read"]}`,
//! `{"id":2,"op":"create_qp","path_mtu":1024}`,
//! `{"id":3,"op":"connect","qpn":17,"remote_qpn":17,"remote_psn":4660,"remote_gid":"::ffff:10.0.2.15"}`,
//! `{"id":4,"op":"post_write","qpn":17,"wr_id":1,"local":{"key":256,"offset":0,"length":8},"remote_va":4096,"remote_rkey":4660}`,
//! `{"id":5,"op":"poll_cq","max":16,"wait_ms":1000}`.
//!
//! Addresses are strings: MACs as `52:54:00:00:00:02`, GIDs as IPv6 text (`::ffff:10.0.2.2`
//! for a RoCE v2 IPv4 GID), IPs as dotted quads. Keys, QPNs and PSNs are plain numbers.

use serde::{Deserialize, Serialize};

/// A request on roce-target's control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum TargetOp {
    /// Creates an RC QP. Every field is optional; see [`QpSettings`] for the defaults.
    CreateQp(QpSettings),
    /// Moves a created (or reset) QP to RTS toward the guest's QP.
    Connect {
        qpn: u32,
        remote_qpn: u32,
        /// First PSN the guest will send (its SQ PSN): our expected PSN.
        remote_psn: u32,
        /// The guest QP's GID (`::ffff:a.b.c.d`); `remote_ip` may be given instead.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote_gid: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote_ip: Option<String>,
        /// The guest's MAC, when known; otherwise it is learned from ARP or resolved by an
        /// ARP request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote_mac: Option<String>,
    },
    /// Target-side memory the guest may access by rkey (and local operations by key).
    RegisterMr {
        length: u64,
        /// Any of `local_write`, `remote_write`, `remote_read` (default: all three).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        access: Option<Vec<MrAccess>>,
    },
    DeregisterMr {
        key: u32,
    },
    /// Bytes of a target MR as hex (at most 1 MiB per request).
    MrRead {
        key: u32,
        #[serde(default)]
        offset: u64,
        length: u32,
    },
    /// Writes `data_hex` into a target MR at `offset`, or fills `length` bytes with it
    /// repeated when `length` is given.
    MrWrite {
        key: u32,
        #[serde(default)]
        offset: u64,
        data_hex: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        length: Option<u64>,
    },
    /// A receive buffer for one incoming SEND (or WRITE with immediate).
    PostRecv {
        qpn: u32,
        wr_id: u64,
        local: Sge,
    },
    /// RDMA WRITE of `local` to the guest's `remote_va`/`remote_rkey`.
    PostWrite {
        qpn: u32,
        wr_id: u64,
        local: Sge,
        remote_va: u64,
        remote_rkey: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        imm: Option<u32>,
    },
    /// RDMA READ of `local.length` bytes from the guest into `local`.
    PostRead {
        qpn: u32,
        wr_id: u64,
        local: Sge,
        remote_va: u64,
        remote_rkey: u32,
    },
    /// SEND of `local` into a receive buffer the guest posted.
    PostSend {
        qpn: u32,
        wr_id: u64,
        local: Sge,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        imm: Option<u32>,
    },
    /// Takes up to `max` (default 64) completions, oldest first, of one QP or of all;
    /// waits up to `wait_ms` (default 0, capped at 10 minutes) for the first one.
    PollCq {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        qpn: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<u32>,
        #[serde(default)]
        wait_ms: u64,
    },
    /// State and PSNs of a QP.
    QueryQp {
        qpn: u32,
    },
    /// Back to a fresh, unconnected QP with the same number and a new PSN; pending work is
    /// flushed. Needs a new `connect`.
    ResetQp {
        qpn: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        psn: Option<u32>,
    },
    DestroyQp {
        qpn: u32,
    },
    /// Keep the responses (ACKs, NAKs, READ responses) this QP sends from now on instead of
    /// sending them (at most 1024), until `release_responses`: a late peer.
    HoldResponses {
        qpn: u32,
    },
    /// Send the held responses in order and stop holding; answers `released`.
    ReleaseResponses {
        qpn: u32,
    },
    /// Counters.
    Stats,
    /// Starts writing every frame in and out to `<pcap dir>/<name>` (default
    /// `capture-<n>.pcap`); a capture already running is closed first.
    PcapStart {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    PcapStop,
    /// Sends a gratuitous ARP for the target's address now.
    Announce,
}

/// Remote access rights of a target MR (IBTA 10.6.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MrAccess {
    LocalWrite,
    RemoteWrite,
    RemoteRead,
}

/// A scatter/gather element in target memory: `length` bytes at `offset` into MR `key`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sge {
    pub key: u32,
    #[serde(default)]
    pub offset: u64,
    pub length: u32,
}

/// Parameters of a new QP; absent fields take the defaults in brackets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpSettings {
    /// Path MTU in bytes: 256, 512, 1024, 2048 or 4096 [1024, rxe's active MTU on a
    /// 1500-byte netdev].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_mtu: Option<u32>,
    /// First PSN this QP sends [random].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psn: Option<u32>,
    /// ACK timeout before a retransmission, ms [100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack_timeout_ms: Option<u64>,
    /// Retransmissions after timeouts or NAK 0x60 before the WQE fails; 7 = infinite [7].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_cnt: Option<u8>,
    /// Retries after RNR NAKs; 7 = infinite [7].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rnr_retry: Option<u8>,
    /// RNR timer code (IBTA table 45) this QP sends in its RNR NAKs [1 = 0.01 ms].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_rnr_timer: Option<u8>,
    /// RDMA READs this QP keeps outstanding toward the guest (its max_dest_rd_atomic) [1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rd_atomic: Option<u8>,
}

/// Replies, one variant per kind of answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TargetReply {
    /// Answer to `create_qp` and `reset_qp`: what the guest needs for INIT->RTR->RTS.
    Qp(QpEndpoint),
    Mr(MrInfo),
    MrData {
        key: u32,
        offset: u64,
        data_hex: String,
    },
    Completions {
        completions: Vec<Completion>,
    },
    QpState(QpStatus),
    Stats(TargetStats),
    Pcap {
        path: String,
        /// Frames written so far (0 right after start).
        frames: u64,
    },
    /// Answer to `release_responses`.
    Released {
        /// Frames sent now.
        frames: u64,
        /// Responses the hold dropped over its bound.
        dropped: u64,
    },
    /// The request was carried out.
    Done,
}

/// The target's side of a QP, to hand to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpEndpoint {
    pub qpn: u32,
    /// First PSN the target sends (the guest's RQ PSN).
    pub psn: u32,
    /// `::ffff:<target ip>`, the RoCE v2 GID of the target.
    pub gid: String,
    pub ip: String,
    pub mac: String,
    pub path_mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MrInfo {
    /// lkey == rkey.
    pub key: u32,
    /// The address the guest uses as `remote_va` (offset 0 of the MR).
    pub va: u64,
    pub length: u64,
    pub access: Vec<MrAccess>,
}

/// One work completion (IBTA 11.4.2.1 ibv_wc, trimmed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub qpn: u32,
    pub wr_id: u64,
    pub opcode: CompletionOpcode,
    pub status: CompletionStatus,
    /// AETH syndrome of the NAK that failed the request (0x61, 0x62, 0x63, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nak_code: Option<u8>,
    pub byte_len: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imm: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompletionOpcode {
    Write,
    Read,
    Send,
    Recv,
    RecvRdmaWithImm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompletionStatus {
    Success,
    /// NAK 0x61 from the guest.
    RemoteInvalidRequest,
    /// NAK 0x62 from the guest.
    RemoteAccessError,
    /// NAK 0x63 (or another NAK code) from the guest.
    RemoteOperationError,
    /// No ACK after `retry_cnt` retransmissions: the timeout outcome.
    RetryExceeded,
    RnrRetryExceeded,
    /// The local MR vanished or is too small.
    LocalProtectionError,
    /// An incoming SEND did not fit the receive buffer.
    LocalLengthError,
    /// The QP went to ERROR (or was reset) before this request finished.
    Flushed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QpStateName {
    /// Created or reset; waits for `connect`.
    Init,
    Rts,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpStatus {
    pub qpn: u32,
    pub state: QpStateName,
    pub remote_qpn: Option<u32>,
    /// Next PSN the requester assigns.
    pub sq_psn: u32,
    /// Oldest PSN not yet acknowledged.
    pub unacked_psn: u32,
    /// Responder: next PSN expected from the guest.
    pub expected_psn: u32,
    pub msn: u32,
    pub pending_wqes: u32,
    pub posted_recvs: u32,
}

/// Counters since start. Frames dropped are counted by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub arp_requests_answered: u64,
    pub arp_sent: u64,
    pub roce_in: u64,
    pub roce_out: u64,
    pub acks_sent: u64,
    pub naks_sent: u64,
    pub rnr_naks_sent: u64,
    pub acks_received: u64,
    pub naks_received: u64,
    pub rnr_naks_received: u64,
    pub retransmissions: u64,
    pub timeouts: u64,
    pub duplicates: u64,
    pub completions: u64,
    /// Completions dropped because the queue was full (nobody polled).
    pub completions_dropped: u64,
    pub dropped_bad_icrc: u64,
    pub dropped_malformed: u64,
    /// Ethernet frames that are neither ARP nor IPv4 UDP 4791 to us (IPv6 included).
    pub dropped_not_ours: u64,
    pub dropped_unknown_qp: u64,
    /// Packets for a QP in ERROR or not yet connected, or from the wrong address.
    pub dropped_qp_state: u64,
    /// Out-of-sequence or otherwise unusable responses at the requester.
    pub dropped_unexpected: u64,
    /// Frames not sent because the guest's MAC is not known yet.
    pub dropped_no_neighbour: u64,
    /// Frames the guest had no receive buffer room for (vhost-user link).
    pub dropped_link: u64,
    pub pcap_frames: u64,
    pub pcap_errors: u64,
    /// vhost-user connections served so far.
    pub connections: u64,
}
