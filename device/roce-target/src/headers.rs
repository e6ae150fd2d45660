//! InfiniBand transport headers as RoCEv2 carries them in UDP 4791 (IBTA 9.2 - 9.3,
//! Annex A17): BTH, RETH, AETH, ImmDt, IETH, AtomicETH, AtomicAckETH, the RC opcode table,
//! 24-bit PSN arithmetic and the ICRC. No crate covers these, so they are written by hand
//! here, in one place. Every field is big-endian on the wire except the ICRC.

use std::fmt;

/// RC opcodes (IBTA 9.2.1, table 35; the RC group has the top three bits 000).
pub mod opcode {
    pub const SEND_FIRST: u8 = 0x00;
    pub const SEND_MIDDLE: u8 = 0x01;
    pub const SEND_LAST: u8 = 0x02;
    pub const SEND_LAST_IMM: u8 = 0x03;
    pub const SEND_ONLY: u8 = 0x04;
    pub const SEND_ONLY_IMM: u8 = 0x05;
    pub const WRITE_FIRST: u8 = 0x06;
    pub const WRITE_MIDDLE: u8 = 0x07;
    pub const WRITE_LAST: u8 = 0x08;
    pub const WRITE_LAST_IMM: u8 = 0x09;
    pub const WRITE_ONLY: u8 = 0x0A;
    pub const WRITE_ONLY_IMM: u8 = 0x0B;
    pub const READ_REQUEST: u8 = 0x0C;
    pub const READ_RESPONSE_FIRST: u8 = 0x0D;
    pub const READ_RESPONSE_MIDDLE: u8 = 0x0E;
    pub const READ_RESPONSE_LAST: u8 = 0x0F;
    pub const READ_RESPONSE_ONLY: u8 = 0x10;
    pub const ACKNOWLEDGE: u8 = 0x11;
    pub const ATOMIC_ACKNOWLEDGE: u8 = 0x12;
    pub const COMPARE_SWAP: u8 = 0x13;
    pub const FETCH_ADD: u8 = 0x14;
    pub const SEND_LAST_INV: u8 = 0x16;
    pub const SEND_ONLY_INV: u8 = 0x17;
}

/// What a packet is part of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Send,
    Write,
    ReadRequest,
    ReadResponse,
    Ack,
    AtomicAck,
    Atomic,
}

/// Where a packet sits in its message (IBTA 9.2.1: first/middle/last/only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    First,
    Middle,
    Last,
    Only,
}

impl Position {
    /// Position of packet `index` of a message of `count` packets.
    pub fn of(index: u32, count: u32) -> Self {
        match (index, count) {
            (_, 0 | 1) => Position::Only,
            (0, _) => Position::First,
            (i, n) if i + 1 >= n => Position::Last,
            _ => Position::Middle,
        }
    }

    pub fn starts_message(self) -> bool {
        matches!(self, Position::First | Position::Only)
    }

    pub fn ends_message(self) -> bool {
        matches!(self, Position::Last | Position::Only)
    }
}

/// The headers that follow the BTH for one opcode (IBTA 9.2.1 table 35, 9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpcodeInfo {
    pub opcode: u8,
    pub name: &'static str,
    pub kind: OpKind,
    pub position: Position,
    pub reth: bool,
    pub aeth: bool,
    pub immdt: bool,
    pub ieth: bool,
    pub atomic_eth: bool,
    pub atomic_ack_eth: bool,
    pub payload: bool,
}

impl OpcodeInfo {
    /// Length of the extension headers between BTH and payload.
    pub fn ext_len(&self) -> usize {
        let mut len = 0;
        if self.reth {
            len += Reth::LEN;
        }
        if self.atomic_eth {
            len += AtomicEth::LEN;
        }
        if self.aeth {
            len += Aeth::LEN;
        }
        if self.atomic_ack_eth {
            len += AtomicAckEth::LEN;
        }
        if self.immdt {
            len += 4;
        }
        if self.ieth {
            len += 4;
        }
        len
    }
}

const fn info(
    opcode: u8,
    name: &'static str,
    kind: OpKind,
    position: Position,
    headers: u8,
) -> OpcodeInfo {
    OpcodeInfo {
        opcode,
        name,
        kind,
        position,
        reth: headers & H_RETH != 0,
        aeth: headers & H_AETH != 0,
        immdt: headers & H_IMM != 0,
        ieth: headers & H_IETH != 0,
        atomic_eth: headers & H_ATOMIC != 0,
        atomic_ack_eth: headers & H_ATOMIC_ACK != 0,
        payload: headers & H_PAYLOAD != 0,
    }
}

const H_RETH: u8 = 1;
const H_AETH: u8 = 2;
const H_IMM: u8 = 4;
const H_IETH: u8 = 8;
const H_ATOMIC: u8 = 16;
const H_ATOMIC_ACK: u8 = 32;
const H_PAYLOAD: u8 = 64;

/// Every RC opcode rxe speaks (IBTA 9.2.1 table 35, 9.3 table 36), in opcode order.
pub const RC_OPCODES: [OpcodeInfo; 23] = {
    use OpKind::*;
    use Position::*;
    [
        info(0x00, "SEND_FIRST", Send, First, H_PAYLOAD),
        info(0x01, "SEND_MIDDLE", Send, Middle, H_PAYLOAD),
        info(0x02, "SEND_LAST", Send, Last, H_PAYLOAD),
        info(0x03, "SEND_LAST_IMM", Send, Last, H_IMM | H_PAYLOAD),
        info(0x04, "SEND_ONLY", Send, Only, H_PAYLOAD),
        info(0x05, "SEND_ONLY_IMM", Send, Only, H_IMM | H_PAYLOAD),
        info(0x06, "WRITE_FIRST", Write, First, H_RETH | H_PAYLOAD),
        info(0x07, "WRITE_MIDDLE", Write, Middle, H_PAYLOAD),
        info(0x08, "WRITE_LAST", Write, Last, H_PAYLOAD),
        info(0x09, "WRITE_LAST_IMM", Write, Last, H_IMM | H_PAYLOAD),
        info(0x0A, "WRITE_ONLY", Write, Only, H_RETH | H_PAYLOAD),
        info(
            0x0B,
            "WRITE_ONLY_IMM",
            Write,
            Only,
            H_RETH | H_IMM | H_PAYLOAD,
        ),
        info(0x0C, "READ_REQUEST", ReadRequest, Only, H_RETH),
        info(
            0x0D,
            "READ_RESPONSE_FIRST",
            ReadResponse,
            First,
            H_AETH | H_PAYLOAD,
        ),
        info(
            0x0E,
            "READ_RESPONSE_MIDDLE",
            ReadResponse,
            Middle,
            H_PAYLOAD,
        ),
        info(
            0x0F,
            "READ_RESPONSE_LAST",
            ReadResponse,
            Last,
            H_AETH | H_PAYLOAD,
        ),
        info(
            0x10,
            "READ_RESPONSE_ONLY",
            ReadResponse,
            Only,
            H_AETH | H_PAYLOAD,
        ),
        info(0x11, "ACKNOWLEDGE", Ack, Only, H_AETH),
        info(
            0x12,
            "ATOMIC_ACKNOWLEDGE",
            AtomicAck,
            Only,
            H_AETH | H_ATOMIC_ACK,
        ),
        info(0x13, "COMPARE_SWAP", Atomic, Only, H_ATOMIC),
        info(0x14, "FETCH_ADD", Atomic, Only, H_ATOMIC),
        info(0x16, "SEND_LAST_INV", Send, Last, H_IETH | H_PAYLOAD),
        info(0x17, "SEND_ONLY_INV", Send, Only, H_IETH | H_PAYLOAD),
    ]
};

/// The table entry of an RC opcode; `None` for other transports and reserved codes.
pub fn opcode_info(opcode: u8) -> Option<&'static OpcodeInfo> {
    RC_OPCODES.iter().find(|i| i.opcode == opcode)
}

/// Why bytes are not a transport packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("{0} bytes is too short for a {1}")]
    Truncated(usize, &'static str),
    #[error("opcode {0:#04x} is not an RC opcode")]
    UnknownOpcode(u8),
    #[error("transport header version {0} (only 0 exists)")]
    BadVersion(u8),
    #[error("pad count {pad} is more than the {payload} payload bytes")]
    BadPad { pad: u8, payload: usize },
    #[error("opcode {0:#04x} carries no payload but {1} bytes follow its headers")]
    UnexpectedPayload(u8, usize),
}

/// Base Transport Header (IBTA 9.2, 12 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bth {
    pub opcode: u8,
    pub solicited: bool,
    pub migration: bool,
    pub pad: u8,
    pub tver: u8,
    pub pkey: u16,
    /// Byte 4: FECN, BECN and reserved bits (Annex A17 uses it for congestion marks;
    /// masked to ones for the ICRC).
    pub flags: u8,
    pub dest_qp: u32,
    pub ack_req: bool,
    pub psn: u32,
}

/// The default partition's full-member P_Key (IBTA 10.9.1.1), what rxe sends.
pub const DEFAULT_PKEY: u16 = 0xFFFF;

impl Bth {
    pub const LEN: usize = 12;

    /// A BTH for `opcode` to `dest_qp` with `psn`; pad and flags zero, default P_Key.
    pub fn new(opcode: u8, dest_qp: u32, psn: u32, ack_req: bool) -> Self {
        Self {
            opcode,
            solicited: false,
            migration: false,
            pad: 0,
            tver: 0,
            pkey: DEFAULT_PKEY,
            flags: 0,
            dest_qp: dest_qp & PSN_MASK,
            ack_req,
            psn: psn & PSN_MASK,
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, HeaderError> {
        let b: &[u8; Self::LEN] = bytes
            .get(..Self::LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(HeaderError::Truncated(bytes.len(), "BTH"))?;
        Ok(Self {
            opcode: b[0],
            solicited: b[1] & 0x80 != 0,
            migration: b[1] & 0x40 != 0,
            pad: (b[1] >> 4) & 0x3,
            tver: b[1] & 0x0F,
            pkey: u16::from_be_bytes([b[2], b[3]]),
            flags: b[4],
            dest_qp: u32::from_be_bytes([0, b[5], b[6], b[7]]),
            ack_req: b[8] & 0x80 != 0,
            psn: u32::from_be_bytes([0, b[9], b[10], b[11]]),
        })
    }

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let qp = self.dest_qp.to_be_bytes();
        let psn = self.psn.to_be_bytes();
        [
            self.opcode,
            (u8::from(self.solicited) << 7)
                | (u8::from(self.migration) << 6)
                | ((self.pad & 0x3) << 4)
                | (self.tver & 0x0F),
            (self.pkey >> 8) as u8,
            self.pkey as u8,
            self.flags,
            qp[1],
            qp[2],
            qp[3],
            u8::from(self.ack_req) << 7,
            psn[1],
            psn[2],
            psn[3],
        ]
    }
}

/// RDMA Extended Transport Header (IBTA 9.3.3.1, 16 bytes): on WRITE first/only and READ
/// requests; `length` is the whole message's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reth {
    pub va: u64,
    pub rkey: u32,
    pub length: u32,
}

impl Reth {
    pub const LEN: usize = 16;

    pub fn parse(bytes: &[u8]) -> Result<Self, HeaderError> {
        let b = bytes
            .get(..Self::LEN)
            .ok_or(HeaderError::Truncated(bytes.len(), "RETH"))?;
        Ok(Self {
            va: u64::from_be_bytes(array(&b[0..8])),
            rkey: u32::from_be_bytes(array(&b[8..12])),
            length: u32::from_be_bytes(array(&b[12..16])),
        })
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.va.to_be_bytes());
        out.extend_from_slice(&self.rkey.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// ACK Extended Transport Header (IBTA 9.3.5, 4 bytes): syndrome and 24-bit MSN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aeth {
    pub syndrome: u8,
    pub msn: u32,
}

/// The syndrome rxe puts in every ACK: ACK with the credit field 0x1F ("invalid", no
/// end-to-end credits; IBTA 9.7.7.2).
pub const SYNDROME_ACK: u8 = 0x1F;
/// NAK codes (IBTA 9.3.5 table 44), the low five bits of a 0b011 syndrome.
pub const NAK_PSN_SEQUENCE: u8 = 0x60;
pub const NAK_INVALID_REQUEST: u8 = 0x61;
pub const NAK_REMOTE_ACCESS: u8 = 0x62;
pub const NAK_REMOTE_OPERATIONAL: u8 = 0x63;
/// An RNR NAK is 0b001 in the top bits and the timer code in the low five.
pub const RNR_NAK: u8 = 0x20;

/// What an AETH syndrome says (IBTA 9.3.5 table 43).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syndrome {
    Ack { credits: u8 },
    RnrNak { timer: u8 },
    Nak { code: u8 },
    Reserved(u8),
}

impl Aeth {
    pub const LEN: usize = 4;

    pub fn parse(bytes: &[u8]) -> Result<Self, HeaderError> {
        let b = bytes
            .get(..Self::LEN)
            .ok_or(HeaderError::Truncated(bytes.len(), "AETH"))?;
        Ok(Self {
            syndrome: b[0],
            msn: u32::from_be_bytes([0, b[1], b[2], b[3]]),
        })
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        let msn = self.msn.to_be_bytes();
        out.extend_from_slice(&[self.syndrome, msn[1], msn[2], msn[3]]);
    }

    pub fn kind(&self) -> Syndrome {
        match self.syndrome >> 5 {
            0b000 => Syndrome::Ack {
                credits: self.syndrome & 0x1F,
            },
            0b001 => Syndrome::RnrNak {
                timer: self.syndrome & 0x1F,
            },
            0b011 => Syndrome::Nak {
                code: self.syndrome,
            },
            _ => Syndrome::Reserved(self.syndrome),
        }
    }
}

/// Atomic Extended Transport Header (IBTA 9.3.3.2, 28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtomicEth {
    pub va: u64,
    pub rkey: u32,
    pub swap_add: u64,
    pub compare: u64,
}

impl AtomicEth {
    pub const LEN: usize = 28;

    pub fn parse(bytes: &[u8]) -> Result<Self, HeaderError> {
        let b = bytes
            .get(..Self::LEN)
            .ok_or(HeaderError::Truncated(bytes.len(), "AtomicETH"))?;
        Ok(Self {
            va: u64::from_be_bytes(array(&b[0..8])),
            rkey: u32::from_be_bytes(array(&b[8..12])),
            swap_add: u64::from_be_bytes(array(&b[12..20])),
            compare: u64::from_be_bytes(array(&b[20..28])),
        })
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.va.to_be_bytes());
        out.extend_from_slice(&self.rkey.to_be_bytes());
        out.extend_from_slice(&self.swap_add.to_be_bytes());
        out.extend_from_slice(&self.compare.to_be_bytes());
    }
}

/// Atomic ACK Extended Transport Header (IBTA 9.3.6, 8 bytes): the original value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtomicAckEth {
    pub original: u64,
}

impl AtomicAckEth {
    pub const LEN: usize = 8;
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

fn be32(bytes: &[u8], what: &'static str) -> Result<u32, HeaderError> {
    bytes
        .get(..4)
        .map(|b| u32::from_be_bytes(array(b)))
        .ok_or(HeaderError::Truncated(bytes.len(), what))
}

/// A parsed transport packet: BTH, the extension headers its opcode has, and the payload
/// without pad (ICRC already removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<'a> {
    pub bth: Bth,
    pub info: &'static OpcodeInfo,
    pub reth: Option<Reth>,
    pub aeth: Option<Aeth>,
    pub immdt: Option<u32>,
    pub ieth: Option<u32>,
    pub atomic_eth: Option<AtomicEth>,
    pub atomic_ack_eth: Option<AtomicAckEth>,
    pub payload: &'a [u8],
}

impl<'a> Packet<'a> {
    /// Parses BTH through pad; `bytes` ends before the ICRC.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, HeaderError> {
        let bth = Bth::parse(bytes)?;
        if bth.tver != 0 {
            return Err(HeaderError::BadVersion(bth.tver));
        }
        let info = opcode_info(bth.opcode).ok_or(HeaderError::UnknownOpcode(bth.opcode))?;
        let mut rest = &bytes[Bth::LEN..];
        let mut take = |len: usize, what: &'static str| -> Result<&'a [u8], HeaderError> {
            if rest.len() < len {
                return Err(HeaderError::Truncated(rest.len(), what));
            }
            let (head, tail) = rest.split_at(len);
            rest = tail;
            Ok(head)
        };
        // Order of extension headers: IBTA 9.2 figure 28 (RETH/AtomicETH, then AETH,
        // AtomicAckETH, then ImmDt/IETH).
        let reth = if info.reth {
            Some(Reth::parse(take(Reth::LEN, "RETH")?)?)
        } else {
            None
        };
        let atomic_eth = if info.atomic_eth {
            Some(AtomicEth::parse(take(AtomicEth::LEN, "AtomicETH")?)?)
        } else {
            None
        };
        let aeth = if info.aeth {
            Some(Aeth::parse(take(Aeth::LEN, "AETH")?)?)
        } else {
            None
        };
        let atomic_ack_eth = if info.atomic_ack_eth {
            let b = take(AtomicAckEth::LEN, "AtomicAckETH")?;
            Some(AtomicAckEth {
                original: u64::from_be_bytes(array(b)),
            })
        } else {
            None
        };
        let immdt = if info.immdt {
            Some(be32(take(4, "ImmDt")?, "ImmDt")?)
        } else {
            None
        };
        let ieth = if info.ieth {
            Some(be32(take(4, "IETH")?, "IETH")?)
        } else {
            None
        };
        let pad = usize::from(bth.pad);
        if pad > rest.len() {
            return Err(HeaderError::BadPad {
                pad: bth.pad,
                payload: rest.len(),
            });
        }
        let payload = &rest[..rest.len() - pad];
        if !info.payload && !rest.is_empty() {
            return Err(HeaderError::UnexpectedPayload(bth.opcode, rest.len()));
        }
        Ok(Self {
            bth,
            info,
            reth,
            aeth,
            immdt,
            ieth,
            atomic_eth,
            atomic_ack_eth,
            payload,
        })
    }

    /// True when payload plus pad end on a 4-byte boundary, as IBTA 9.2 (PadCnt) requires;
    /// rxe NAKs 0x61 otherwise.
    pub fn pad_is_aligned(&self) -> bool {
        (self.payload.len() + usize::from(self.bth.pad)).is_multiple_of(4)
    }
}

/// Bytes of pad after a payload of `len` bytes (IBTA 9.2: to a 4-byte multiple).
pub fn pad_for(len: usize) -> u8 {
    (len.wrapping_neg() & 3) as u8
}

/// Writes BTH (with PadCnt set from the payload), the given extension headers in IBTA
/// order, payload and pad into `out`. The caller has chosen headers that fit the opcode.
#[derive(Debug, Clone, Copy)]
pub struct PacketSpec<'p> {
    pub bth: Bth,
    pub reth: Option<Reth>,
    pub atomic_eth: Option<AtomicEth>,
    pub aeth: Option<Aeth>,
    pub atomic_ack_eth: Option<AtomicAckEth>,
    pub immdt: Option<u32>,
    pub ieth: Option<u32>,
    pub payload: &'p [u8],
}

impl<'p> PacketSpec<'p> {
    pub fn new(bth: Bth) -> Self {
        Self {
            bth,
            reth: None,
            atomic_eth: None,
            aeth: None,
            atomic_ack_eth: None,
            immdt: None,
            ieth: None,
            payload: &[],
        }
    }

    /// Bytes from BTH through pad.
    pub fn len(&self) -> usize {
        let mut len = Bth::LEN + self.payload.len() + usize::from(pad_for(self.payload.len()));
        len += self.reth.map_or(0, |_| Reth::LEN);
        len += self.atomic_eth.map_or(0, |_| AtomicEth::LEN);
        len += self.aeth.map_or(0, |_| Aeth::LEN);
        len += self.atomic_ack_eth.map_or(0, |_| AtomicAckEth::LEN);
        len += self.immdt.map_or(0, |_| 4);
        len += self.ieth.map_or(0, |_| 4);
        len
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        let pad = pad_for(self.payload.len());
        let mut bth = self.bth;
        bth.pad = pad;
        out.extend_from_slice(&bth.to_bytes());
        if let Some(reth) = self.reth {
            reth.write(out);
        }
        if let Some(atomic) = self.atomic_eth {
            atomic.write(out);
        }
        if let Some(aeth) = self.aeth {
            aeth.write(out);
        }
        if let Some(ack) = self.atomic_ack_eth {
            out.extend_from_slice(&ack.original.to_be_bytes());
        }
        if let Some(imm) = self.immdt {
            out.extend_from_slice(&imm.to_be_bytes());
        }
        if let Some(ieth) = self.ieth {
            out.extend_from_slice(&ieth.to_be_bytes());
        }
        out.extend_from_slice(self.payload);
        out.extend(std::iter::repeat_n(0u8, usize::from(pad)));
    }
}

/// PSNs are 24 bits (IBTA 9.7.1).
pub const PSN_MASK: u32 = 0x00FF_FFFF;

/// `a + n` modulo 2^24.
pub fn psn_add(a: u32, n: u32) -> u32 {
    a.wrapping_add(n) & PSN_MASK
}

/// Signed distance `a - b` in the 24-bit PSN space, in -2^23..2^23: rxe's
/// `(s32)((a - b) << 8) >> 8` (IBTA 9.7.2: half the space is "ahead", half "behind").
pub fn psn_diff(a: u32, b: u32) -> i32 {
    ((a.wrapping_sub(b) << 8) as i32) >> 8
}

/// Packets a message of `len` bytes takes at a path MTU of `pmtu` bytes: a 0-byte message
/// still takes one (IBTA 9.7.2, 9.7.4.1.1 for READ: max(1, ceil(len/pmtu)) PSNs).
pub fn packet_count(len: u64, pmtu: u32) -> u32 {
    let pmtu = u64::from(pmtu.max(1));
    len.div_ceil(pmtu).clamp(1, u64::from(PSN_MASK)) as u32
}

/// Path MTU enum of IBTA 7.7.4 (1 = 256 ... 5 = 4096) from bytes.
pub fn mtu_enum(bytes: u32) -> Option<u8> {
    match bytes {
        256 => Some(1),
        512 => Some(2),
        1024 => Some(3),
        2048 => Some(4),
        4096 => Some(5),
        _ => None,
    }
}

/// The RNR NAK timer (IBTA 9.7.5.2.8, table 45) in microseconds for a 5-bit code.
pub fn rnr_timer_us(code: u8) -> u64 {
    const TABLE: [u64; 32] = [
        655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1_280, 1_920, 2_560,
        3_840, 5_120, 7_680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880,
        163_840, 245_760, 327_680, 491_520,
    ];
    TABLE[usize::from(code & 0x1F)]
}

/// The invariant CRC of RoCEv2 (IBTA Annex A17.3.3): CRC-32 over 8 bytes of ones (the LRH
/// a RoCEv2 packet has no room for) and the IP header, UDP header, BTH and everything up to
/// the ICRC, with the fields routers may change set to ones first. Written little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Icrc(pub u32);

impl fmt::Display for Icrc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl Icrc {
    /// `ip_header` is the IPv4 (20+ bytes) or IPv6 (40 bytes) header, `udp_header` 8 bytes,
    /// `transport` BTH through pad.
    pub fn compute(ip_header: &[u8], udp_header: &[u8], transport: &[u8]) -> Self {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&[0xFF; 8]);
        let mut ip = [0u8; 60];
        let ip_len = ip_header.len().min(ip.len());
        ip[..ip_len].copy_from_slice(&ip_header[..ip_len]);
        let ip = &mut ip[..ip_len];
        match ip.first().map(|b| b >> 4) {
            Some(4) if ip.len() >= 20 => {
                ip[1] = 0xFF; // TOS
                ip[8] = 0xFF; // TTL
                ip[10] = 0xFF; // header checksum
                ip[11] = 0xFF;
            }
            Some(6) if ip.len() >= 40 => {
                ip[0] |= 0x0F; // traffic class and flow label
                ip[1] = 0xFF;
                ip[2] = 0xFF;
                ip[3] = 0xFF;
                ip[7] = 0xFF; // hop limit
            }
            _ => {}
        }
        hasher.update(ip);
        let mut udp = [0u8; 8];
        let udp_len = udp_header.len().min(8);
        udp[..udp_len].copy_from_slice(&udp_header[..udp_len]);
        udp[6] = 0xFF; // checksum
        udp[7] = 0xFF;
        hasher.update(&udp[..udp_len]);
        if transport.len() >= Bth::LEN {
            let mut bth = [0u8; Bth::LEN];
            bth.copy_from_slice(&transport[..Bth::LEN]);
            bth[4] = 0xFF; // FECN/BECN/reserved
            hasher.update(&bth);
            hasher.update(&transport[Bth::LEN..]);
        } else {
            hasher.update(transport);
        }
        Icrc(hasher.finalize())
    }

    pub fn to_wire(self) -> [u8; 4] {
        self.0.to_le_bytes()
    }

    pub fn from_wire(bytes: [u8; 4]) -> Self {
        Icrc(u32::from_le_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// TV1 of reference/rocev2-rxe.md: WRITE only, 8 bytes.
    const TV1: &str = "52540012345652540000000208004500004412344000401110650a0002020a00020fc00112b7003000000a00ffff000000118012345600007f000000100000001234000000080123456789abcdef96fec894";
    /// TV2: ACK, syndrome 0x1F, MSN 5.
    const TV2: &str = "52540012345652540000000208004500003012354000401110780a0002020a00020fc00112b7001c00001100ffff00000011001234561f0000057b8c1f44";

    #[test]
    fn tv1_transport_headers_parse_and_rebuild_byte_for_byte() {
        let frame = unhex(TV1);
        let transport = &frame[42..frame.len() - 4];
        let packet = Packet::parse(transport).expect("parses");
        assert_eq!(packet.bth.opcode, opcode::WRITE_ONLY);
        assert_eq!(packet.bth.dest_qp, 0x11);
        assert!(packet.bth.ack_req);
        assert_eq!(packet.bth.psn, 0x123456);
        assert_eq!(packet.bth.pkey, 0xFFFF);
        assert_eq!(
            packet.reth,
            Some(Reth {
                va: 0x7f00_0000_1000,
                rkey: 0x1234,
                length: 8
            })
        );
        assert_eq!(packet.payload, unhex("0123456789abcdef"));
        let mut spec = PacketSpec::new(Bth::new(opcode::WRITE_ONLY, 0x11, 0x123456, true));
        spec.reth = packet.reth;
        spec.payload = packet.payload;
        let mut out = Vec::new();
        spec.write(&mut out);
        assert_eq!(out, transport);
        assert_eq!(spec.len(), transport.len());
    }

    #[test]
    fn tv1_and_tv2_icrc_match_the_wire() {
        for tv in [TV1, TV2] {
            let frame = unhex(tv);
            let (ip, udp, transport) = (&frame[14..34], &frame[34..42], &frame[42..]);
            let (transport, icrc) = transport.split_at(transport.len() - 4);
            let icrc = Icrc::from_wire(icrc.try_into().expect("4 bytes"));
            assert_eq!(Icrc::compute(ip, udp, transport), icrc, "{tv}");
        }
        let frame = unhex(TV1);
        assert_eq!(
            Icrc::compute(&frame[14..34], &frame[34..42], &frame[42..frame.len() - 4]).to_wire(),
            [0x96, 0xfe, 0xc8, 0x94]
        );
    }

    #[test]
    fn tv2_ack_parses_as_ack_with_msn() {
        let frame = unhex(TV2);
        let packet = Packet::parse(&frame[42..frame.len() - 4]).expect("parses");
        assert_eq!(packet.info.kind, OpKind::Ack);
        let aeth = packet.aeth.expect("AETH");
        assert_eq!(aeth.msn, 5);
        assert_eq!(aeth.kind(), Syndrome::Ack { credits: 0x1F });
        assert!(packet.payload.is_empty());
    }

    #[test]
    fn icrc_ignores_the_fields_routers_rewrite() {
        let frame = unhex(TV1);
        let mut ip = frame[14..34].to_vec();
        let mut udp = frame[34..42].to_vec();
        let mut transport = frame[42..frame.len() - 4].to_vec();
        let before = Icrc::compute(&ip, &udp, &transport);
        ip[1] = 0x2e;
        ip[8] = 3;
        ip[10] = 0;
        udp[6] = 0x12;
        transport[4] = 0xC0;
        assert_eq!(Icrc::compute(&ip, &udp, &transport), before);
        transport[20] ^= 1;
        assert_ne!(Icrc::compute(&ip, &udp, &transport), before);
    }

    #[test]
    fn every_opcode_round_trips_with_its_headers() {
        for info in RC_OPCODES.iter() {
            let mut spec = PacketSpec::new(Bth::new(info.opcode, 0xABCDEF, 0xFFFFFE, true));
            spec.bth.solicited = true;
            let reth = Reth {
                va: 0x1122_3344_5566_7788,
                rkey: 0x99AA_BBCC,
                length: 77,
            };
            let aeth = Aeth {
                syndrome: 0x1F,
                msn: 0x00AB_CDEF,
            };
            let atomic = AtomicEth {
                va: 8,
                rkey: 3,
                swap_add: 0xDEAD,
                compare: 0xBEEF,
            };
            spec.reth = info.reth.then_some(reth);
            spec.aeth = info.aeth.then_some(aeth);
            spec.atomic_eth = info.atomic_eth.then_some(atomic);
            spec.atomic_ack_eth = info.atomic_ack_eth.then_some(AtomicAckEth { original: 42 });
            spec.immdt = info.immdt.then_some(0x0102_0304);
            spec.ieth = info.ieth.then_some(0x0506_0708);
            let payload = [0x5Au8; 7];
            if info.payload {
                spec.payload = &payload;
            }
            let mut bytes = Vec::new();
            spec.write(&mut bytes);
            assert_eq!(bytes.len(), spec.len(), "{}", info.name);
            assert_eq!(
                bytes.len(),
                Bth::LEN + info.ext_len() + if info.payload { 8 } else { 0 }
            );
            let parsed = Packet::parse(&bytes).expect(info.name);
            assert_eq!(parsed.info, info);
            assert_eq!(parsed.bth.psn, 0xFFFFFE);
            assert_eq!(parsed.bth.dest_qp, 0xABCDEF);
            assert!(parsed.bth.solicited && parsed.bth.ack_req);
            assert_eq!(parsed.reth, spec.reth);
            assert_eq!(parsed.aeth, spec.aeth);
            assert_eq!(parsed.atomic_eth, spec.atomic_eth);
            assert_eq!(parsed.atomic_ack_eth, spec.atomic_ack_eth);
            assert_eq!(parsed.immdt, spec.immdt);
            assert_eq!(parsed.ieth, spec.ieth);
            assert_eq!(parsed.payload, spec.payload);
            assert!(parsed.pad_is_aligned());
            // One byte short of any header is an error, never a panic.
            for cut in 0..Bth::LEN + info.ext_len() {
                let _ = Packet::parse(&bytes[..cut]);
            }
        }
    }

    #[test]
    fn unknown_opcodes_and_versions_are_rejected() {
        let mut bth = Bth::new(0x15, 1, 1, false).to_bytes();
        assert_eq!(Packet::parse(&bth), Err(HeaderError::UnknownOpcode(0x15)));
        bth[0] = 0x64; // UD SEND only
        assert!(Packet::parse(&bth).is_err());
        let mut bth = Bth::new(opcode::ACKNOWLEDGE, 1, 1, false).to_bytes();
        bth[1] = 1;
        assert_eq!(Packet::parse(&bth), Err(HeaderError::BadVersion(1)));
    }

    #[test]
    fn aeth_syndromes_decode() {
        let kind = |s| {
            Aeth {
                syndrome: s,
                msn: 0,
            }
            .kind()
        };
        assert_eq!(kind(0x1F), Syndrome::Ack { credits: 0x1F });
        assert_eq!(kind(0x2E), Syndrome::RnrNak { timer: 0x0E });
        assert_eq!(kind(0x62), Syndrome::Nak { code: 0x62 });
        assert_eq!(kind(0x40), Syndrome::Reserved(0x40));
    }

    #[test]
    fn psn_arithmetic_wraps_at_24_bits() {
        assert_eq!(psn_add(0xFFFFFE, 4), 0x2);
        assert_eq!(psn_diff(0x2, 0xFFFFFE), 4);
        assert_eq!(psn_diff(0xFFFFFE, 0x2), -4);
        assert_eq!(psn_diff(5, 5), 0);
        assert_eq!(psn_diff(0x7FFFFF, 0), 0x7FFFFF);
        assert_eq!(psn_diff(0x800000, 0), -0x800000);
    }

    #[test]
    fn segmentation_counts_and_positions() {
        assert_eq!(packet_count(0, 1024), 1);
        assert_eq!(packet_count(1, 1024), 1);
        assert_eq!(packet_count(1024, 1024), 1);
        assert_eq!(packet_count(1025, 1024), 2);
        assert_eq!(packet_count(1 << 20, 1024), 1024);
        assert_eq!(Position::of(0, 1), Position::Only);
        assert_eq!(Position::of(0, 3), Position::First);
        assert_eq!(Position::of(1, 3), Position::Middle);
        assert_eq!(Position::of(2, 3), Position::Last);
        assert_eq!(pad_for(0), 0);
        assert_eq!(pad_for(1), 3);
        assert_eq!(pad_for(8), 0);
        assert_eq!(pad_for(1023), 1);
        assert_eq!(rnr_timer_us(0), 655_360);
        assert_eq!(rnr_timer_us(1), 10);
        assert_eq!(rnr_timer_us(31), 491_520);
        assert_eq!(mtu_enum(1024), Some(3));
        assert_eq!(mtu_enum(1000), None);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = Packet::parse(&bytes);
                let _ = Icrc::compute(&bytes, &bytes, &bytes);
            }

            #[test]
            fn psn_add_then_diff_is_identity(a in 0u32..=PSN_MASK, n in 0u32..0x7F_FFFF) {
                let b = psn_add(a, n);
                prop_assert!(b <= PSN_MASK);
                prop_assert_eq!(psn_diff(b, a), n as i32);
                prop_assert_eq!(psn_diff(a, b), -(n as i32));
            }

            #[test]
            fn segments_cover_the_message(len in 0u64..200_000, mtu_shift in 0u32..5) {
                let pmtu = 256u32 << mtu_shift;
                let n = packet_count(len, pmtu);
                let full = u64::from(n - 1) * u64::from(pmtu);
                // Every packet but the last is exactly one MTU, the last 1..=pmtu (0 only
                // for an empty message).
                prop_assert!(len >= full);
                let last = len - full;
                prop_assert!(last <= u64::from(pmtu));
                prop_assert!(last >= 1 || len == 0);
            }
        }
    }
}
