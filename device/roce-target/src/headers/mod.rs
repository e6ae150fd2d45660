//! InfiniBand transport headers as RoCEv2 carries them in UDP 4791 (IBTA 9.2 - 9.3,
//! Annex A17): BTH, RETH, AETH, ImmDt, IETH, AtomicETH, AtomicAckETH, the RC opcode table,
//! 24-bit PSN arithmetic and the ICRC. No crate covers these, so they are written by hand
//! here, in one place. Every field is big-endian on the wire except the ICRC.

mod bth;
mod extended;
mod icrc;
pub mod opcode;
mod packet;
mod psn;

pub use bth::{Bth, DEFAULT_PKEY};
pub use extended::{
    rnr_timer_us, Aeth, AtomicAckEth, AtomicEth, Reth, Syndrome, NAK_INVALID_REQUEST,
    NAK_PSN_SEQUENCE, NAK_REMOTE_ACCESS, NAK_REMOTE_OPERATIONAL, RNR_NAK, SYNDROME_ACK,
};
pub use icrc::Icrc;
pub use opcode::{opcode_info, OpKind, OpcodeInfo, Position, RC_OPCODES};
pub use packet::{pad_for, Packet, PacketSpec};
pub use psn::{mtu_enum, packet_count, psn_add, psn_diff, psn_within, PSN_MASK};

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

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

/// Byte-exact frames of reference/rocev2-rxe.md, for the tests of every layer that builds
/// or checks them.
#[cfg(test)]
pub(crate) mod test_vectors {
    pub(crate) fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// TV1: WRITE only, 8 bytes.
    pub(crate) const TV1: &str = "52540012345652540000000208004500004412344000401110650a0002020a00020fc00112b7003000000a00ffff000000118012345600007f000000100000001234000000080123456789abcdef96fec894";
    /// TV2: ACK, syndrome 0x1F, MSN 5.
    pub(crate) const TV2: &str = "52540012345652540000000208004500003012354000401110780a0002020a00020fc00112b7001c00001100ffff00000011001234561f0000057b8c1f44";
}
