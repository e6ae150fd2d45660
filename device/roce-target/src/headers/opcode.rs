//! RC opcodes (IBTA 9.2.1, table 35; the RC group has the top three bits 000): the
//! constants, and the table of what each one is and which headers follow its BTH.

use super::{Aeth, AtomicAckEth, AtomicEth, Reth};

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

/// The opcode of a `kind` packet at `position`, with ImmDt or without: the table read
/// backwards, so the requester and responder never spell out the opcode layout. `None`
/// where table 35 has no such packet (ImmDt on a FIRST, say).
pub fn find(kind: OpKind, position: Position, immdt: bool) -> Option<u8> {
    RC_OPCODES
        .iter()
        .find(|i| i.kind == kind && i.position == position && i.immdt == immdt && !i.ieth)
        .map(|i| i.opcode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_the_packet_index() {
        assert_eq!(Position::of(0, 1), Position::Only);
        assert_eq!(Position::of(0, 3), Position::First);
        assert_eq!(Position::of(1, 3), Position::Middle);
        assert_eq!(Position::of(2, 3), Position::Last);
        assert_eq!(
            Position::of(0, 0),
            Position::Only,
            "a 0-byte message is one packet"
        );
    }

    #[test]
    fn find_reads_the_table_backwards() {
        use Position::*;
        assert_eq!(find(OpKind::Send, Only, false), Some(SEND_ONLY));
        assert_eq!(find(OpKind::Send, Last, true), Some(SEND_LAST_IMM));
        assert_eq!(find(OpKind::Write, First, false), Some(WRITE_FIRST));
        assert_eq!(find(OpKind::Write, Only, true), Some(WRITE_ONLY_IMM));
        assert_eq!(
            find(OpKind::ReadResponse, Middle, false),
            Some(READ_RESPONSE_MIDDLE)
        );
        assert_eq!(find(OpKind::ReadRequest, Only, false), Some(READ_REQUEST));
        assert_eq!(
            find(OpKind::Write, First, true),
            None,
            "ImmDt rides only on the end"
        );
        // The *_INV opcodes share kind and position with plain SENDs; never chosen.
        assert_eq!(find(OpKind::Send, Last, false), Some(SEND_LAST));
        for kind in [OpKind::Send, OpKind::Write, OpKind::ReadResponse] {
            for position in [First, Middle, Last, Only] {
                let op = find(kind, position, false).expect("every position of a message");
                let info = opcode_info(op).expect("in the table");
                assert_eq!(
                    (info.kind, info.position, info.immdt),
                    (kind, position, false)
                );
            }
        }
    }
}
