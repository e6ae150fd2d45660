//! Requester side (IBTA 9.7.4, 9.7.5.2): sending work requests as packets, the ACK timer and
//! retries, and the ACKs, NAKs and READ responses that come back.

use std::time::{Duration, Instant};

use p2prig_protocol::target::{CompletionStatus, QpStateName, TargetStats};

use crate::headers::{
    opcode, psn_add, psn_diff, rnr_timer_us, Bth, OpKind, Packet, PacketSpec, Position, Reth,
    Syndrome, NAK_PSN_SEQUENCE, PSN_MASK,
};

use super::*;

/// Sends what the window allows, from `send_psn` on (IBTA 9.7.4: requester behaviour;
/// go-back-N restarts simply move `send_psn` back).
pub(super) fn pump(qp: &mut Qp, wire: &mut Wire, now: Instant) {
    if qp.state != QpStateName::Rts {
        return;
    }
    let Some(remote) = qp.remote else { return };
    if let Some(until) = qp.rnr_until {
        if now < until {
            return;
        }
        qp.rnr_until = None;
    }
    while qp.send_psn != qp.next_psn && psn_diff(qp.send_psn, qp.una) < MAX_INFLIGHT_PSNS {
        let Some(index) = qp.wqe_index(qp.send_psn) else {
            // Only reachable if bookkeeping went wrong; resynchronise rather than spin.
            qp.send_psn = qp.next_psn;
            break;
        };
        let wqe = &qp.wqes[index];
        if wqe.is_read() {
            // Outstanding READs are limited by the guest's max_dest_rd_atomic (IBTA
            // 9.7.4.1.4, reference: "keep outstanding READs <= max_dest_rd_atomic").
            let reads_ahead = qp.wqes.iter().take(index).filter(|w| w.is_read()).count();
            if reads_ahead >= usize::from(qp.max_rd_atomic) {
                break;
            }
        }
        let psn = qp.send_psn;
        let spec = wqe.packet(psn_diff(psn, wqe.first_psn) as u32, qp.pmtu, remote.qpn);
        // One READ request asks for every response still missing.
        let next = if wqe.is_read() {
            wqe.end_psn()
        } else {
            psn_add(psn, 1)
        };
        note_sent(&mut qp.sent_high, psn, &mut wire.stats);
        wire.send(remote, qp.udp_sport, &spec, now);
        qp.send_psn = next;
        if qp.timer_start.is_none() {
            qp.timer_start = Some(now);
        }
    }
}

impl SendWqe {
    /// Packet `i` of this request to `dest_qp`: the `i`th MTU of a SEND or WRITE, or a READ
    /// request for the responses from `i` on (a retried READ restarts at the first missing
    /// response, IBTA 9.7.4.1.4).
    fn packet(&self, i: u32, pmtu: u32, dest_qp: u32) -> PacketSpec<'_> {
        let psn = psn_add(self.first_psn, i);
        match &self.op {
            WqeOp::Read { remote, .. } => {
                let offset = u64::from(i) * u64::from(pmtu);
                let mut spec = PacketSpec::new(Bth::new(opcode::READ_REQUEST, dest_qp, psn, true));
                spec.reth = Some(Reth {
                    va: remote.va.wrapping_add(offset),
                    rkey: remote.rkey,
                    length: self.length.saturating_sub(offset as u32),
                });
                spec
            }
            WqeOp::Message { write, imm, data } => {
                let position = Position::of(i, self.packets);
                let kind = if write.is_some() {
                    OpKind::Write
                } else {
                    OpKind::Send
                };
                let immdt = imm.filter(|_| position.ends_message());
                let op = opcode::find(kind, position, immdt.is_some())
                    .expect("table 35 has every position of a SEND and a WRITE");
                let ack_req = position.ends_message() || i % ACK_REQ_EVERY == ACK_REQ_EVERY - 1;
                let mut spec = PacketSpec::new(Bth::new(op, dest_qp, psn, ack_req));
                let start = (i as usize).saturating_mul(pmtu as usize).min(data.len());
                let end = start.saturating_add(pmtu as usize).min(data.len());
                spec.payload = &data[start..end];
                spec.immdt = immdt;
                // The RETH, with the whole message's length, rides on the first packet only.
                spec.reth = write.filter(|_| position.starts_message()).map(|to| Reth {
                    va: to.va,
                    rkey: to.rkey,
                    length: self.length,
                });
                spec
            }
        }
    }
}

pub(super) fn note_sent(sent_high: &mut u32, psn: u32, stats: &mut TargetStats) {
    if psn_diff(psn, *sent_high) < 0 {
        stats.retransmissions += 1;
    } else {
        *sent_high = psn_add(psn, 1);
    }
}

pub(super) fn tick_qp(qp: &mut Qp, shared: &mut Shared, now: Instant) {
    if qp.state != QpStateName::Rts {
        return;
    }
    if qp.una == qp.send_psn && qp.rnr_until.is_none() {
        qp.timer_start = None;
    }
    if let Some(start) = qp.timer_start {
        if qp.una != qp.send_psn && now.saturating_duration_since(start) >= qp.ack_timeout {
            // Local ACK timeout (IBTA 9.7.6.1.1): go back to the oldest unacked PSN.
            shared.wire.stats.timeouts += 1;
            let una = qp.una;
            go_back(qp, shared, una, now);
        }
    }
    pump(qp, &mut shared.wire, now);
}

/// Resends from `psn` on, spending one transport retry (retry_cnt); when none is left the
/// oldest WQE fails and the QP errors (IBTA 9.7.6.1.1 for timeouts, 9.7.5.2.4 for sequence
/// NAKs).
fn go_back(qp: &mut Qp, shared: &mut Shared, psn: u32, now: Instant) {
    if qp.retries.take() {
        qp.send_psn = psn;
        qp.timer_start = Some(now);
    } else {
        qp.fail_head(shared, CompletionStatus::RetryExceeded, None);
    }
}

/// Completes every WQE whose last PSN is at or before `psn` and moves the unacked mark past
/// it (IBTA 9.7.5.2.1: an ACK acknowledges all earlier PSNs). A READ whose responses have
/// not all arrived cannot be completed by an ACK: the responses were lost, so the READ is
/// resent from its first missing PSN (IBTA 9.7.5.2.2, implied NAK).
pub(super) fn acknowledge_through(qp: &mut Qp, psn: u32, shared: &mut Shared, now: Instant) {
    while let Some(front) = qp.wqes.front() {
        if psn_diff(front.last_psn(), psn) > 0 {
            break;
        }
        if front.is_read() && front.read_done < front.packets {
            let restart = psn_add(front.first_psn, front.read_done);
            qp.una = restart;
            qp.send_psn = restart;
            progress(qp, now);
            return;
        }
        qp.complete_head(shared, CompletionStatus::Success, None);
    }
    let next = psn_add(psn, 1);
    if psn_diff(next, qp.una) > 0 {
        qp.una = next;
    }
    if psn_diff(qp.send_psn, qp.una) < 0 {
        qp.send_psn = qp.una;
    }
    progress(qp, now);
}

/// A NAK or RNR NAK for `psn` acknowledges everything before it.
fn acknowledge_before(qp: &mut Qp, psn: u32, shared: &mut Shared, now: Instant) {
    if psn_diff(psn, qp.una) > 0 {
        acknowledge_through(qp, psn_add(psn, PSN_MASK), shared, now);
    }
}

pub(super) fn progress(qp: &mut Qp, now: Instant) {
    qp.retries.refill();
    qp.rnr_retries.refill();
    qp.timer_start = (qp.una != qp.send_psn).then_some(now);
}

/// Whether an ACK or NAK for `psn` answers a request sent and not yet acknowledged (IBTA
/// 9.7.5.2.1): older PSNs are duplicates, newer ones ghosts. A NAK may also name the PSN
/// after the last one sent: the responder's expected PSN when it lost that last packet.
pub(super) fn answers_outstanding(qp: &Qp, psn: u32, nak: bool) -> bool {
    let past_sent = psn_diff(psn, qp.sent_high);
    psn_diff(psn, qp.una) >= 0 && (past_sent < 0 || (nak && past_sent == 0))
}

/// Requester side: ACKs, NAKs and READ responses from the guest (IBTA 9.7.5.2).
pub(super) fn on_response(qp: &mut Qp, shared: &mut Shared, packet: &Packet<'_>, now: Instant) {
    let psn = packet.bth.psn;
    match packet.info.kind {
        OpKind::Ack => {
            let Some(aeth) = packet.aeth else { return };
            let syndrome = aeth.kind();
            let stats = &mut shared.wire.stats;
            match syndrome {
                Syndrome::Ack { .. } => stats.acks_received += 1,
                Syndrome::RnrNak { .. } => stats.rnr_naks_received += 1,
                Syndrome::Nak { .. } => stats.naks_received += 1,
                Syndrome::Reserved(_) => stats.dropped_unexpected += 1,
            }
            let nak = matches!(syndrome, Syndrome::Nak { .. });
            if !matches!(syndrome, Syndrome::Reserved(_)) && !answers_outstanding(qp, psn, nak) {
                stats.duplicates += 1;
                return;
            }
            match syndrome {
                Syndrome::Ack { .. } => acknowledge_through(qp, psn, shared, now),
                Syndrome::RnrNak { timer } => {
                    acknowledge_before(qp, psn, shared, now);
                    if qp.rnr_retries.take() {
                        // IBTA 9.7.5.2.8: wait the responder's timer, then resend from the PSN.
                        qp.send_psn = psn;
                        qp.rnr_until = Some(now + Duration::from_micros(rnr_timer_us(timer)));
                        qp.timer_start = None;
                    } else {
                        qp.fail_head(shared, CompletionStatus::RnrRetryExceeded, None);
                    }
                }
                Syndrome::Nak {
                    code: NAK_PSN_SEQUENCE,
                } => {
                    acknowledge_before(qp, psn, shared, now);
                    // IBTA 9.7.5.2.4: resend everything from the PSN the responder expects.
                    go_back(qp, shared, psn, now);
                }
                Syndrome::Nak { code } => {
                    acknowledge_before(qp, psn, shared, now);
                    // IBTA 9.7.5.2.5-7: the request at this PSN failed; the QP errors.
                    qp.fail_head(shared, nak_status(code), Some(code));
                }
                Syndrome::Reserved(_) => {}
            }
        }
        OpKind::ReadResponse => on_read_response(qp, shared, packet, now),
        // We never send atomics, so an atomic ACK answers nothing.
        _ => shared.wire.stats.dropped_unexpected += 1,
    }
    pump(qp, &mut shared.wire, now);
}

fn on_read_response(qp: &mut Qp, shared: &mut Shared, packet: &Packet<'_>, now: Instant) {
    let stats = &mut shared.wire.stats;
    let psn = packet.bth.psn;
    let Some(index) = qp.wqe_index(psn) else {
        stats.duplicates += 1;
        return;
    };
    let wqe = &qp.wqes[index];
    let WqeOp::Read { local, .. } = wqe.op else {
        stats.dropped_unexpected += 1;
        return;
    };
    let (first_psn, i, packets, length) = (wqe.first_psn, wqe.read_done, wqe.packets, wqe.length);
    // Responses must come in order (IBTA 9.7.5.2.3); a gap is left to the timer, which
    // re-requests from the first missing PSN.
    let awaited = psn_add(first_psn, i);
    if psn != awaited || psn_diff(psn, qp.send_psn) >= 0 {
        if psn_diff(psn, awaited) < 0 {
            stats.duplicates += 1;
        } else {
            stats.dropped_unexpected += 1;
        }
        return;
    }
    let pmtu = u64::from(qp.pmtu);
    let offset = u64::from(i) * pmtu;
    let last = i + 1 == packets;
    let expected_len = if last {
        u64::from(length).saturating_sub(offset)
    } else {
        pmtu
    };
    let position = packet.info.position;
    let fits = packet.payload.len() as u64 == expected_len
        && last == position.ends_message()
        && (position.starts_message() || i > 0);
    if !fits {
        stats.dropped_unexpected += 1;
        return;
    }
    // A READ response implies every earlier request was carried out (IBTA 9.7.5.2.1).
    if index > 0 {
        acknowledge_through(qp, psn_add(first_psn, PSN_MASK), shared, now);
    }
    if shared
        .mrs
        .write(local.key, local.offset + offset, packet.payload)
        .is_err()
    {
        qp.fail_head(shared, CompletionStatus::LocalProtectionError, None);
        return;
    }
    if let Some(wqe) = qp.wqes.front_mut() {
        wqe.read_done += 1;
    }
    qp.una = psn_add(psn, 1);
    if psn_diff(qp.send_psn, qp.una) < 0 {
        qp.send_psn = qp.una;
    }
    if last {
        qp.complete_head(shared, CompletionStatus::Success, None);
    }
    progress(qp, now);
}

#[cfg(test)]
mod tests {
    use p2prig_protocol::target::{CompletionOpcode, QpSettings, Sge};

    use super::super::test_support::{connected_qp, queue_send, shared, PEER_QPN};
    use super::*;

    fn statuses(shared: &Shared) -> Vec<(u64, CompletionStatus)> {
        shared
            .cq
            .entries
            .iter()
            .map(|c| (c.wr_id, c.status))
            .collect()
    }

    #[test]
    fn one_ack_completes_every_request_it_covers_in_order() {
        let (mut shared, link) = shared();
        let mut qp = connected_qp(&QpSettings::default(), 0xFFFFFE);
        for wr_id in 1..=3 {
            queue_send(&mut qp, wr_id, 8);
        }
        let now = Instant::now();
        pump(&mut qp, &mut shared.wire, now);
        assert_eq!(link.count(), 3);
        assert_eq!((qp.send_psn, qp.sent_high), (1, 1), "PSNs wrap at 24 bits");
        // The responder coalesces: one ACK for the second PSN answers the first two.
        acknowledge_through(&mut qp, 0xFFFFFF, &mut shared, now);
        assert_eq!(
            statuses(&shared),
            [
                (1, CompletionStatus::Success),
                (2, CompletionStatus::Success)
            ]
        );
        assert_eq!((qp.una, qp.wqes.len()), (0, 1));
        assert_eq!(qp.timer_start, Some(now), "the third is still outstanding");
        acknowledge_through(&mut qp, 0, &mut shared, now);
        assert_eq!((qp.una, qp.wqes.len(), qp.timer_start), (1, 0, None));
    }

    #[test]
    fn an_ack_past_an_unfinished_read_resends_it_from_the_first_missing_response() {
        let (mut shared, _link) = shared();
        let mut qp = connected_qp(&QpSettings::default(), 100);
        let local = Sge {
            key: 1,
            offset: 0,
            length: 4096,
        };
        let remote = RemoteBuffer { va: 0, rkey: 9 };
        qp.wqes.push_back(SendWqe {
            wr_id: 7,
            op: WqeOp::Read { remote, local },
            length: 4096,
            first_psn: 100,
            packets: 4,
            read_done: 1,
        });
        qp.next_psn = 104;
        qp.send_psn = 104;
        qp.sent_high = 104;
        acknowledge_through(&mut qp, 103, &mut shared, Instant::now());
        assert!(
            shared.cq.entries.is_empty(),
            "a READ completes by its data only"
        );
        assert_eq!((qp.una, qp.send_psn), (101, 101));
    }

    #[test]
    fn only_unacknowledged_sent_psns_are_answered_and_a_nak_may_name_the_next() {
        let mut qp = connected_qp(&QpSettings::default(), 0xFFFFFE);
        qp.una = 0xFFFFFF;
        qp.sent_high = 2;
        assert!(answers_outstanding(&qp, 0xFFFFFF, false));
        assert!(answers_outstanding(&qp, 1, false));
        assert!(
            !answers_outstanding(&qp, 0xFFFFFE, false),
            "already acknowledged"
        );
        assert!(!answers_outstanding(&qp, 2, false), "never sent");
        assert!(
            answers_outstanding(&qp, 2, true),
            "a NAK for the PSN expected next"
        );
        assert!(!answers_outstanding(&qp, 3, true));
    }

    #[test]
    fn timeouts_go_back_to_the_oldest_unacked_psn_until_retry_cnt_is_spent() {
        let (mut shared, link) = shared();
        let settings = QpSettings {
            retry_cnt: Some(1),
            ack_timeout_ms: Some(10),
            ..QpSettings::default()
        };
        let mut qp = connected_qp(&settings, 5);
        queue_send(&mut qp, 1, 8);
        queue_send(&mut qp, 2, 8);
        let start = Instant::now();
        pump(&mut qp, &mut shared.wire, start);
        let later = start + Duration::from_millis(10);
        tick_qp(&mut qp, &mut shared, later);
        assert_eq!(shared.wire.stats.timeouts, 1);
        assert_eq!(shared.wire.stats.retransmissions, 2, "both resent");
        assert_eq!(link.count(), 4);
        assert_eq!(qp.state, QpStateName::Rts);
        tick_qp(&mut qp, &mut shared, later + Duration::from_millis(10));
        assert_eq!(qp.state, QpStateName::Error);
        assert_eq!(
            statuses(&shared),
            [
                (1, CompletionStatus::RetryExceeded),
                (2, CompletionStatus::Flushed)
            ]
        );
        assert_eq!(link.count(), 4, "nothing more sent once in error");
    }

    #[test]
    fn a_multi_packet_write_carries_reth_first_and_immediate_last() {
        let wqe = SendWqe {
            wr_id: 1,
            op: WqeOp::Message {
                write: Some(RemoteBuffer {
                    va: 0x1000,
                    rkey: 0x77,
                }),
                imm: Some(0xCAFE),
                data: Snapshot::from((0..=255).cycle().take(600).collect::<Vec<u8>>()),
            },
            length: 600,
            first_psn: 0xFFFFFF,
            packets: 3,
            read_done: 0,
        };
        let first = wqe.packet(0, 256, PEER_QPN);
        assert_eq!(first.bth.opcode, opcode::WRITE_FIRST);
        assert_eq!(first.bth.psn, 0xFFFFFF);
        assert_eq!(
            first.reth,
            Some(Reth {
                va: 0x1000,
                rkey: 0x77,
                length: 600
            })
        );
        assert_eq!(
            (first.payload.len(), first.immdt, first.bth.ack_req),
            (256, None, false)
        );
        let middle = wqe.packet(1, 256, PEER_QPN);
        assert_eq!(
            (middle.bth.opcode, middle.bth.psn),
            (opcode::WRITE_MIDDLE, 0)
        );
        assert_eq!((middle.reth, middle.payload[0]), (None, 0));
        let last = wqe.packet(2, 256, PEER_QPN);
        assert_eq!(last.bth.opcode, opcode::WRITE_LAST_IMM);
        assert_eq!((last.payload.len(), last.immdt), (88, Some(0xCAFE)));
        assert!(last.bth.ack_req, "the end of a message asks for an ACK");
        assert_eq!(wqe.opcode(), CompletionOpcode::Write);
    }

    #[test]
    fn a_resent_read_request_asks_only_for_what_is_missing() {
        let wqe = SendWqe {
            wr_id: 1,
            op: WqeOp::Read {
                remote: RemoteBuffer {
                    va: 0x1000,
                    rkey: 0x77,
                },
                local: Sge::default(),
            },
            length: 1000,
            first_psn: 10,
            packets: 4,
            read_done: 2,
        };
        let spec = wqe.packet(2, 256, PEER_QPN);
        assert_eq!((spec.bth.opcode, spec.bth.psn), (opcode::READ_REQUEST, 12));
        assert_eq!(
            spec.reth,
            Some(Reth {
                va: 0x1200,
                rkey: 0x77,
                length: 488
            })
        );
    }

    #[test]
    fn only_psns_below_the_highest_sent_count_as_retransmissions() {
        let mut stats = TargetStats::default();
        let mut sent_high = 0xFFFFFF;
        note_sent(&mut sent_high, 0xFFFFFF, &mut stats);
        assert_eq!((sent_high, stats.retransmissions), (0, 0), "wraps to 0");
        note_sent(&mut sent_high, 0xFFFFFF, &mut stats);
        assert_eq!((sent_high, stats.retransmissions), (0, 1));
    }
}
