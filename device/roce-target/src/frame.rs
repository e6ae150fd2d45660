//! Ethernet, ARP, IPv4 and UDP: parsed and built with etherparse; the RoCEv2 part (UDP
//! 4791, IBTA Annex A17.2) is split off here and its ICRC checked, so the RC engine only
//! sees transport packets that arrived intact.

use std::net::Ipv4Addr;

use etherparse::{
    ArpEthIpv4Packet, ArpOperation, ArpPacketSlice, EtherType, Ethernet2Header, Ethernet2Slice,
    IpNumber, Ipv4Header, Ipv4Slice, UdpHeader, UdpSlice,
};

use crate::headers::Icrc;

/// The RoCEv2 UDP destination port (IBTA Annex A17.2.3).
pub const ROCE_V2_PORT: u16 = 4791;
pub const BROADCAST_MAC: [u8; 6] = [0xFF; 6];
/// TTL of every IPv4 packet we send, as rxe (reference: "TTL/hop limit 64").
pub const TTL: u8 = 64;
/// Frames shorter than this are padded (IEEE 802.3 minimum without FCS).
pub const MIN_FRAME: usize = 60;

/// A MAC address as `52:54:00:00:00:02`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `52:54:00:00:00:02` (or with dashes).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// The RoCE v2 GID of an IPv4 address: `::ffff:a.b.c.d` (IBTA Annex A17.4.5.2).
pub fn gid_of(ip: Ipv4Addr) -> String {
    format!("::ffff:{ip}")
}

/// The IPv4 address inside an IPv4-mapped GID, or a plain IPv4 address.
pub fn ip_of_gid(text: &str) -> Option<Ipv4Addr> {
    if let Ok(ip) = text.parse::<Ipv4Addr>() {
        return Some(ip);
    }
    text.parse::<std::net::Ipv6Addr>().ok()?.to_ipv4_mapped()
}

/// Why an incoming frame was not handed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("not for us: {0}")]
    NotOurs(&'static str),
    #[error("ICRC {received} does not match the computed {computed}")]
    BadIcrc { received: Icrc, computed: Icrc },
}

/// A frame the engine acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming<'a> {
    Arp { packet: ArpEthIpv4Packet },
    Roce(RoceFrame<'a>),
}

/// A RoCEv2 packet whose ICRC was good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoceFrame<'a> {
    pub src_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub src_port: u16,
    /// BTH through pad (ICRC removed).
    pub transport: &'a [u8],
}

/// Classifies one Ethernet frame (without FCS) addressed to `mac`/`ip`.
pub fn parse_frame(frame: &[u8], mac: [u8; 6], ip: Ipv4Addr) -> Result<Incoming<'_>, FrameError> {
    let eth = Ethernet2Slice::from_slice_without_fcs(frame)
        .map_err(|_| FrameError::Malformed("Ethernet header"))?;
    let dst = eth.destination();
    if dst != mac && dst != BROADCAST_MAC {
        return Err(FrameError::NotOurs("destination MAC"));
    }
    let payload = eth.payload();
    match payload.ether_type {
        EtherType::ARP => {
            let arp = ArpPacketSlice::from_slice(payload.payload)
                .map_err(|_| FrameError::Malformed("ARP packet"))?
                .to_packet()
                .try_eth_ipv4()
                .map_err(|_| FrameError::NotOurs("ARP for another protocol"))?;
            Ok(Incoming::Arp { packet: arp })
        }
        EtherType::IPV4 => parse_ipv4(payload.payload, eth.source(), ip),
        EtherType::IPV6 => Err(FrameError::NotOurs("IPv6")),
        _ => Err(FrameError::NotOurs("ether type")),
    }
}

fn parse_ipv4(bytes: &[u8], src_mac: [u8; 6], ip: Ipv4Addr) -> Result<Incoming<'_>, FrameError> {
    let ipv4 = Ipv4Slice::from_slice(bytes).map_err(|_| FrameError::Malformed("IPv4 packet"))?;
    let header = ipv4.header();
    if header.destination_addr() != ip {
        return Err(FrameError::NotOurs("destination IP"));
    }
    if header.to_header().calc_header_checksum() != header.header_checksum() {
        return Err(FrameError::Malformed("IPv4 header checksum"));
    }
    if ipv4.is_payload_fragmented() {
        return Err(FrameError::NotOurs("IP fragment"));
    }
    if ipv4.payload_ip_number() != IpNumber::UDP {
        return Err(FrameError::NotOurs("IP protocol"));
    }
    let udp = UdpSlice::from_slice(ipv4.payload().payload)
        .map_err(|_| FrameError::Malformed("UDP datagram"))?;
    if udp.destination_port() != ROCE_V2_PORT {
        return Err(FrameError::NotOurs("UDP port"));
    }
    // rxe sends 0 (no checksum); a non-zero one must be right, as the kernel's UDP layer
    // would insist before rxe ever saw the packet.
    if udp.checksum() != 0 {
        let computed = udp
            .to_header()
            .calc_checksum_ipv4_raw(header.source(), header.destination(), udp.payload())
            .map_err(|_| FrameError::Malformed("UDP length"))?;
        if computed != udp.checksum() {
            return Err(FrameError::Malformed("UDP checksum"));
        }
    }
    let roce = udp.payload();
    if roce.len() < crate::headers::Bth::LEN + 4 {
        return Err(FrameError::Malformed("RoCE packet shorter than BTH + ICRC"));
    }
    let (transport, icrc) = roce.split_at(roce.len() - 4);
    let received = Icrc::from_wire([icrc[0], icrc[1], icrc[2], icrc[3]]);
    let computed = Icrc::compute(header.slice(), udp.header_slice(), transport);
    if received != computed {
        return Err(FrameError::BadIcrc { received, computed });
    }
    Ok(Incoming::Roce(RoceFrame {
        src_mac,
        src_ip: header.source_addr(),
        dst_ip: header.destination_addr(),
        src_port: udp.source_port(),
        transport,
    }))
}

/// Addresses and IP identification of one outgoing RoCEv2 frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoceRoute {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    /// 0xC000 | hash, like rdma_get_udp_sport (IBTA Annex A17.2.3 leaves it free for ECMP).
    pub src_port: u16,
    pub ip_id: u16,
}

/// Builds Eth | IPv4 (DF, TTL 64) | UDP (checksum 0) | `transport` | ICRC.
pub fn build_roce(route: &RoceRoute, transport: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + 20 + 8 + transport.len() + 4);
    write_roce(route, transport.len(), &mut frame, |out| {
        out.extend_from_slice(transport)
    });
    frame
}

/// Builds a RoCEv2 frame into `frame` (cleared first) with the transport bytes written by
/// `write_transport`, which must write exactly `transport_len` bytes. Lets the engine build
/// packets without an intermediate copy.
pub fn write_roce(
    route: &RoceRoute,
    transport_len: usize,
    frame: &mut Vec<u8>,
    write_transport: impl FnOnce(&mut Vec<u8>),
) {
    frame.clear();
    let eth = Ethernet2Header {
        source: route.src_mac,
        destination: route.dst_mac,
        ether_type: EtherType::IPV4,
    };
    frame.extend_from_slice(&eth.to_bytes());
    let udp_len = 8 + transport_len + 4;
    let mut ip = Ipv4Header::new(
        u16::try_from(udp_len).unwrap_or(u16::MAX),
        TTL,
        IpNumber::UDP,
        route.src_ip.octets(),
        route.dst_ip.octets(),
    )
    .unwrap_or_default();
    ip.identification = route.ip_id;
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    let ip_start = frame.len();
    frame.extend_from_slice(&ip.to_bytes());
    let udp = UdpHeader {
        source_port: route.src_port,
        destination_port: ROCE_V2_PORT,
        length: u16::try_from(udp_len).unwrap_or(u16::MAX),
        checksum: 0,
    };
    let udp_start = frame.len();
    frame.extend_from_slice(&udp.to_bytes());
    let transport_start = frame.len();
    write_transport(frame);
    let icrc = Icrc::compute(
        &frame[ip_start..udp_start],
        &frame[udp_start..transport_start],
        &frame[transport_start..],
    );
    frame.extend_from_slice(&icrc.to_wire());
}

/// An ARP packet (RFC 826) in an Ethernet frame, padded to the minimum frame size.
pub fn build_arp(dst_mac: [u8; 6], packet: &ArpEthIpv4Packet) -> Vec<u8> {
    let eth = Ethernet2Header {
        source: packet.sender_mac,
        destination: dst_mac,
        ether_type: EtherType::ARP,
    };
    let mut frame = Vec::with_capacity(MIN_FRAME);
    frame.extend_from_slice(&eth.to_bytes());
    frame.extend_from_slice(&packet.to_bytes());
    frame.resize(frame.len().max(MIN_FRAME), 0);
    frame
}

/// The reply to an ARP request for our address (unicast to the asker, RFC 826).
pub fn arp_reply(request: &ArpEthIpv4Packet, mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    build_arp(
        request.sender_mac,
        &ArpEthIpv4Packet {
            operation: ArpOperation::REPLY,
            sender_mac: mac,
            sender_ipv4: ip.octets(),
            target_mac: request.sender_mac,
            target_ipv4: request.sender_ipv4,
        },
    )
}

/// A broadcast ARP request for `target`.
pub fn arp_request(mac: [u8; 6], ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    build_arp(
        BROADCAST_MAC,
        &ArpEthIpv4Packet {
            operation: ArpOperation::REQUEST,
            sender_mac: mac,
            sender_ipv4: ip.octets(),
            target_mac: [0; 6],
            target_ipv4: target.octets(),
        },
    )
}

/// A gratuitous ARP (RFC 5227 announcement: a request for our own address), so the guest's
/// neighbour table learns us before rxe's 1000 ms RTR resolution has to.
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    arp_request(mac, ip, ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::test_vectors::{unhex, TV1, TV2};
    use crate::headers::{opcode, Aeth, Bth, PacketSpec, Reth};

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const TARGET_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

    fn route(ip_id: u16) -> RoceRoute {
        RoceRoute {
            src_mac: TARGET_MAC,
            dst_mac: GUEST_MAC,
            src_ip: Ipv4Addr::new(10, 0, 2, 2),
            dst_ip: Ipv4Addr::new(10, 0, 2, 15),
            src_port: 0xC001,
            ip_id,
        }
    }

    #[test]
    fn tv1_builds_byte_for_byte() {
        let mut spec = PacketSpec::new(Bth::new(opcode::WRITE_ONLY, 0x11, 0x123456, true));
        spec.reth = Some(Reth {
            va: 0x7f00_0000_1000,
            rkey: 0x1234,
            length: 8,
        });
        let payload = unhex("0123456789abcdef");
        spec.payload = &payload;
        let mut frame = Vec::new();
        write_roce(&route(0x1234), spec.len(), &mut frame, |out| {
            spec.write(out)
        });
        assert_eq!(frame, unhex(TV1));
    }

    #[test]
    fn tv2_builds_byte_for_byte() {
        let mut spec = PacketSpec::new(Bth::new(opcode::ACKNOWLEDGE, 0x11, 0x123456, false));
        spec.aeth = Some(Aeth {
            syndrome: 0x1F,
            msn: 5,
        });
        let mut transport = Vec::new();
        spec.write(&mut transport);
        assert_eq!(build_roce(&route(0x1235), &transport), unhex(TV2));
    }

    #[test]
    fn tv1_parses_on_the_guest_side_and_a_flipped_bit_fails_the_icrc() {
        let frame = unhex(TV1);
        let Ok(Incoming::Roce(roce)) = parse_frame(&frame, GUEST_MAC, Ipv4Addr::new(10, 0, 2, 15))
        else {
            panic!("TV1 is RoCE");
        };
        assert_eq!(roce.src_ip, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(roce.src_port, 0xC001);
        assert_eq!(roce.transport, &frame[42..frame.len() - 4]);
        let mut bad = frame.clone();
        bad[60] ^= 0x10;
        assert!(matches!(
            parse_frame(&bad, GUEST_MAC, Ipv4Addr::new(10, 0, 2, 15)),
            Err(FrameError::BadIcrc { .. })
        ));
        // The wrong host, or a wrong MAC, is not ours.
        assert!(matches!(
            parse_frame(&frame, GUEST_MAC, Ipv4Addr::new(10, 0, 2, 16)),
            Err(FrameError::NotOurs(_))
        ));
        assert!(matches!(
            parse_frame(&frame, TARGET_MAC, Ipv4Addr::new(10, 0, 2, 15)),
            Err(FrameError::NotOurs(_))
        ));
    }

    #[test]
    fn arp_request_gets_a_unicast_reply() {
        let guest_ip = Ipv4Addr::new(10, 0, 2, 15);
        let target_ip = Ipv4Addr::new(10, 0, 2, 2);
        let request = arp_request(GUEST_MAC, guest_ip, target_ip);
        assert_eq!(request.len(), MIN_FRAME);
        let Ok(Incoming::Arp { packet }) = parse_frame(&request, TARGET_MAC, target_ip) else {
            panic!("ARP");
        };
        assert_eq!(packet.operation, ArpOperation::REQUEST);
        let reply = arp_reply(&packet, TARGET_MAC, target_ip);
        assert_eq!(&reply[..6], &GUEST_MAC);
        let Ok(Incoming::Arp { packet }) = parse_frame(&reply, GUEST_MAC, guest_ip) else {
            panic!("ARP reply");
        };
        assert_eq!(packet.operation, ArpOperation::REPLY);
        assert_eq!(packet.sender_mac, TARGET_MAC);
        assert_eq!(packet.sender_ipv4, target_ip.octets());
        assert_eq!(packet.target_ipv4, guest_ip.octets());
        let garp = gratuitous_arp(TARGET_MAC, target_ip);
        assert_eq!(&garp[..6], &BROADCAST_MAC);
    }

    #[test]
    fn non_zero_udp_checksums_are_verified() {
        let mut frame = unhex(TV1);
        // Any non-zero checksum that is not the right one is dropped.
        frame[40] = 0x12;
        frame[41] = 0x34;
        assert_eq!(
            parse_frame(&frame, GUEST_MAC, Ipv4Addr::new(10, 0, 2, 15)),
            Err(FrameError::Malformed("UDP checksum"))
        );
    }

    #[test]
    fn addresses_parse_and_format() {
        assert_eq!(parse_mac("52:54:00:12:34:56"), Some(GUEST_MAC));
        assert_eq!(format_mac(GUEST_MAC), "52:54:00:12:34:56");
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("52:54:00:12:34:zz"), None);
        assert_eq!(
            ip_of_gid("::ffff:10.0.2.15"),
            Some(Ipv4Addr::new(10, 0, 2, 15))
        );
        assert_eq!(ip_of_gid("10.0.2.15"), Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(ip_of_gid("fe80::1"), None);
        assert_eq!(gid_of(Ipv4Addr::new(10, 0, 2, 2)), "::ffff:10.0.2.2");
    }
}
