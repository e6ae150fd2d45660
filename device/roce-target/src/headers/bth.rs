//! The Base Transport Header (IBTA 9.2), which starts every packet.

use super::{HeaderError, PSN_MASK};

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
