//! The extended transport headers that follow the BTH as the opcode says (IBTA 9.3): RETH,
//! AETH with its syndromes, AtomicETH and AtomicAckETH.

use super::{array, HeaderError};

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

/// The RNR NAK timer (IBTA 9.7.5.2.8, table 45) in microseconds for a 5-bit code.
pub fn rnr_timer_us(code: u8) -> u64 {
    const TABLE: [u64; 32] = [
        655_360, 10, 20, 30, 40, 60, 80, 120, 160, 240, 320, 480, 640, 960, 1_280, 1_920, 2_560,
        3_840, 5_120, 7_680, 10_240, 15_360, 20_480, 30_720, 40_960, 61_440, 81_920, 122_880,
        163_840, 245_760, 327_680, 491_520,
    ];
    TABLE[usize::from(code & 0x1F)]
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn rnr_timer_codes_follow_table_45() {
        assert_eq!(rnr_timer_us(0), 655_360);
        assert_eq!(rnr_timer_us(1), 10);
        assert_eq!(rnr_timer_us(31), 491_520);
    }
}
