//! Whole transport packets: parsing one into its headers and payload, and writing one out
//! from a [`PacketSpec`].

use super::{
    array, opcode_info, Aeth, AtomicAckEth, AtomicEth, Bth, HeaderError, OpcodeInfo, Reth,
};

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

#[cfg(test)]
mod tests {
    use super::super::test_vectors::{unhex, TV1, TV2};
    use super::super::{opcode, OpKind, Syndrome, RC_OPCODES};
    use super::*;

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
    fn pad_rounds_the_payload_up_to_four_bytes() {
        assert_eq!(pad_for(0), 0);
        assert_eq!(pad_for(1), 3);
        assert_eq!(pad_for(8), 0);
        assert_eq!(pad_for(1023), 1);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = Packet::parse(&bytes);
            }
        }
    }
}
