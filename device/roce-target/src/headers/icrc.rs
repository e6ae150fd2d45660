//! The RoCEv2 invariant CRC.

use std::fmt;

use super::Bth;

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
    use super::super::test_vectors::{unhex, TV1, TV2};
    use super::*;

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

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn compute_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = Icrc::compute(&bytes, &bytes, &bytes);
            }
        }
    }
}
