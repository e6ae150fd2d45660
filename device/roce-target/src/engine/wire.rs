//! The wire side of the engine: frames out through the [`Link`](super::Link), ARP, the pcap
//! and the counters.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use p2prig_protocol::target::TargetStats;

use crate::frame::{self, RoceRoute};
use crate::headers::{opcode, Aeth, Bth, PacketSpec};
use crate::pcap::PcapWriter;

use super::*;

/// The part of the engine that puts frames on the link: addresses, neighbour table, IP
/// identification, pcap and counters. Split from the QP table so QP code can borrow both.
pub(super) struct Wire {
    pub(super) config: EngineConfig,
    pub(super) link: Box<dyn Link>,
    pub(super) neighbours: HashMap<Ipv4Addr, [u8; 6]>,
    pub(super) arp_sent_at: HashMap<Ipv4Addr, Instant>,
    pub(super) ip_id: u16,
    pub(super) pcap: Option<PcapWriter>,
    pub(super) stats: TargetStats,
    pub(super) frame: Vec<u8>,
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
    pub(super) fn new(config: EngineConfig, link: Box<dyn Link>) -> Self {
        Self {
            config,
            link,
            neighbours: HashMap::new(),
            arp_sent_at: HashMap::new(),
            ip_id: random_u32() as u16,
            pcap: None,
            stats: TargetStats::default(),
            frame: Vec::with_capacity(4200),
        }
    }

    pub(super) fn capture(&mut self, frame: &[u8]) {
        if let Some(pcap) = &mut self.pcap {
            match pcap.record(frame) {
                Ok(()) => self.stats.pcap_frames += 1,
                Err(_) => self.stats.pcap_errors += 1,
            }
        }
    }

    pub(super) fn emit(&mut self, frame: &[u8]) {
        self.capture(frame);
        self.stats.frames_out += 1;
        if !self.link.transmit(frame) {
            self.stats.dropped_link += 1;
        }
    }

    pub(super) fn emit_own_buffer(&mut self) {
        let frame = std::mem::take(&mut self.frame);
        self.emit(&frame);
        self.frame = frame;
    }

    pub(super) fn arp_for(&mut self, ip: Ipv4Addr, now: Instant) {
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
    pub(super) fn send(&mut self, remote: Remote, sport: u16, spec: &PacketSpec<'_>, now: Instant) {
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

    pub(super) fn send_aeth(&mut self, qp: &Qp, psn: u32, syndrome: u8, now: Instant) {
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
