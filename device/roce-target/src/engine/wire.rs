//! The wire side of the engine: frames out through the [`Link`](super::Link), ARP, the pcap
//! and the counters.

use std::collections::{BTreeMap, HashMap};
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
    /// The responses of QPs whose responses are held back, by the QP's number.
    pub(super) held: BTreeMap<u32, HeldResponses>,
}

/// Responses a QP sent while they were held: whole frames, in order, until released.
#[derive(Debug, Default)]
pub(super) struct HeldResponses {
    pub(super) frames: Vec<Vec<u8>>,
    /// Responses past [`MAX_HELD_RESPONSES`], not kept.
    pub(super) dropped: u64,
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
            held: BTreeMap::new(),
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
        if self.build(remote, sport, spec, now) {
            self.emit_own_buffer();
        }
    }

    /// Builds the frame of one transport packet to `remote` in `self.frame`; false (and an
    /// ARP request) when the remote's MAC is not known yet.
    fn build(&mut self, remote: Remote, sport: u16, spec: &PacketSpec<'_>, now: Instant) -> bool {
        let Some(&dst_mac) = self.neighbours.get(&remote.ip) else {
            self.stats.dropped_no_neighbour += 1;
            self.arp_for(remote.ip, now);
            return false;
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
        true
    }

    /// Sends a response of `qp` (ACK, NAK, READ response) to its remote, or keeps it while
    /// the QP's responses are held.
    pub(super) fn respond(&mut self, qp: &Qp, spec: &PacketSpec<'_>, now: Instant) {
        let Some(remote) = qp.remote else { return };
        if !self.held.contains_key(&qp.qpn) {
            self.send(remote, qp.udp_sport, spec, now);
            return;
        }
        if !self.build(remote, qp.udp_sport, spec, now) {
            return;
        }
        let frame = self.frame.clone();
        if let Some(held) = self.held.get_mut(&qp.qpn) {
            if held.frames.len() < MAX_HELD_RESPONSES {
                held.frames.push(frame);
            } else {
                held.dropped += 1;
            }
        }
    }

    /// Sends the responses held for QP `qpn` in the order they were made and stops holding;
    /// answers how many went out and how many had been dropped over the bound.
    pub(super) fn release(&mut self, qpn: u32) -> Option<(u64, u64)> {
        let held = self.held.remove(&qpn)?;
        for frame in &held.frames {
            self.emit(frame);
        }
        Some((held.frames.len() as u64, held.dropped))
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
        self.respond(qp, &spec, now);
    }
}

#[cfg(test)]
mod tests {
    use p2prig_protocol::target::QpSettings;

    use super::super::test_support::{connected_qp, shared};
    use super::*;
    use crate::headers::SYNDROME_ACK;

    #[test]
    fn a_hold_keeps_at_most_its_bound_and_counts_the_rest() {
        let (mut shared, link) = shared();
        let qp = connected_qp(&QpSettings::default(), 0x100);
        shared.wire.held.entry(qp.qpn).or_default();
        let now = Instant::now();
        for psn in 0..MAX_HELD_RESPONSES as u32 + 10 {
            shared.wire.send_aeth(&qp, psn, SYNDROME_ACK, now);
        }
        assert_eq!(link.count(), 0, "nothing goes out while held");
        let released = shared.wire.release(qp.qpn);
        assert_eq!(released, Some((MAX_HELD_RESPONSES as u64, 10)));
        assert_eq!(link.count(), MAX_HELD_RESPONSES);
        assert_eq!(shared.wire.release(qp.qpn), None, "released once");
        shared.wire.send_aeth(&qp, 0, SYNDROME_ACK, now);
        assert_eq!(link.count(), MAX_HELD_RESPONSES + 1, "sent at once again");
    }
}
