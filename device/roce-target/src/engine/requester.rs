//! Requester side (IBTA 9.7.4, 9.7.5.2): sending work requests as packets, the ACK timer and
//! retries, and the ACKs, NAKs and READ responses that come back.

use std::time::{Duration, Instant};

use p2prig_protocol::target::{CompletionStatus, QpStateName, TargetStats};

use crate::headers::{
    opcode, psn_add, psn_diff, rnr_timer_us, Bth, OpKind, Packet, PacketSpec, Position, Reth,
    Syndrome, NAK_PSN_SEQUENCE, PSN_MASK,
};
use crate::memory::MemoryRegions;

use super::*;

/// Sends what the window allows, from `send_psn` on (IBTA 9.7.4: requester behaviour;
/// go-back-N restarts simply move `send_psn` back).
pub(super) fn pump(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &MemoryRegions,
    now: Instant,
) {
    let _ = (cq, mrs);
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
        let i = psn_diff(qp.send_psn, wqe.first_psn) as u32;
        let pmtu = qp.pmtu;
        let psn = qp.send_psn;
        match &wqe.op {
            WqeOp::Read {
                remote_va, rkey, ..
            } => {
                // Outstanding READs are limited by the guest's max_dest_rd_atomic (IBTA
                // 9.7.4.1.4, reference: "keep outstanding READs <= max_dest_rd_atomic").
                let reads_ahead = qp.wqes.iter().take(index).filter(|w| w.is_read()).count();
                if reads_ahead >= usize::from(qp.max_rd_atomic) {
                    break;
                }
                // A retried READ restarts at the first missing response (IBTA 9.7.4.1.4).
                let offset = u64::from(i) * u64::from(pmtu);
                let mut spec =
                    PacketSpec::new(Bth::new(opcode::READ_REQUEST, remote.qpn, psn, true));
                spec.reth = Some(Reth {
                    va: remote_va.wrapping_add(offset),
                    rkey: *rkey,
                    length: wqe.length.saturating_sub(offset as u32),
                });
                let end = wqe.end_psn();
                note_sent(&mut qp.sent_high, psn, &mut wire.stats);
                wire.send(remote, qp.udp_sport, &spec, now);
                qp.send_psn = end;
            }
            WqeOp::Write { data, .. } | WqeOp::Send { data, .. } => {
                let position = Position::of(i, wqe.packets);
                let start = (i as usize).saturating_mul(pmtu as usize).min(data.len());
                let end = start.saturating_add(pmtu as usize).min(data.len());
                let ack_req = position.ends_message() || i % ACK_REQ_EVERY == ACK_REQ_EVERY - 1;
                let mut spec = PacketSpec::new(Bth::new(0, remote.qpn, psn, ack_req));
                spec.payload = &data[start..end];
                match &wqe.op {
                    WqeOp::Write {
                        remote_va,
                        rkey,
                        imm,
                        ..
                    } => {
                        spec.bth.opcode = match (position, imm.is_some()) {
                            (Position::Only, false) => opcode::WRITE_ONLY,
                            (Position::Only, true) => opcode::WRITE_ONLY_IMM,
                            (Position::First, _) => opcode::WRITE_FIRST,
                            (Position::Middle, _) => opcode::WRITE_MIDDLE,
                            (Position::Last, false) => opcode::WRITE_LAST,
                            (Position::Last, true) => opcode::WRITE_LAST_IMM,
                        };
                        if position.starts_message() {
                            spec.reth = Some(Reth {
                                va: *remote_va,
                                rkey: *rkey,
                                length: wqe.length,
                            });
                        }
                        if position.ends_message() {
                            spec.immdt = *imm;
                        }
                    }
                    WqeOp::Send { imm, .. } => {
                        spec.bth.opcode = match (position, imm.is_some()) {
                            (Position::Only, false) => opcode::SEND_ONLY,
                            (Position::Only, true) => opcode::SEND_ONLY_IMM,
                            (Position::First, _) => opcode::SEND_FIRST,
                            (Position::Middle, _) => opcode::SEND_MIDDLE,
                            (Position::Last, false) => opcode::SEND_LAST,
                            (Position::Last, true) => opcode::SEND_LAST_IMM,
                        };
                        if position.ends_message() {
                            spec.immdt = *imm;
                        }
                    }
                    WqeOp::Read { .. } => {}
                }
                note_sent(&mut qp.sent_high, psn, &mut wire.stats);
                wire.send(remote, qp.udp_sport, &spec, now);
                qp.send_psn = psn_add(psn, 1);
            }
        }
        if qp.timer_start.is_none() {
            qp.timer_start = Some(now);
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

pub(super) fn tick_qp(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &MemoryRegions,
    now: Instant,
) {
    if qp.state != QpStateName::Rts {
        return;
    }
    if qp.una == qp.send_psn && qp.rnr_until.is_none() {
        qp.timer_start = None;
    }
    if let Some(start) = qp.timer_start {
        if qp.una != qp.send_psn && now.saturating_duration_since(start) >= qp.ack_timeout {
            // Local ACK timeout (IBTA 9.7.6.1.1): go back to the oldest unacked PSN.
            wire.stats.timeouts += 1;
            if !qp.retries.take() {
                fail_head(
                    qp,
                    CompletionStatus::RetryExceeded,
                    None,
                    cq,
                    &mut wire.stats,
                );
                return;
            }
            qp.send_psn = qp.una;
            qp.timer_start = Some(now);
        }
    }
    pump(qp, wire, cq, mrs, now);
}

/// Completes every WQE whose last PSN is at or before `psn` and moves the unacked mark past
/// it (IBTA 9.7.5.2.1: an ACK acknowledges all earlier PSNs). A READ whose responses have
/// not all arrived cannot be completed by an ACK: the responses were lost, so the READ is
/// resent from its first missing PSN (IBTA 9.7.5.2.2, implied NAK).
pub(super) fn acknowledge_through(
    qp: &mut Qp,
    psn: u32,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    now: Instant,
) {
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
        if let Some(wqe) = qp.wqes.pop_front() {
            complete_wqe(
                qp,
                &wqe,
                CompletionStatus::Success,
                None,
                cq,
                &mut wire.stats,
            );
        }
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

pub(super) fn progress(qp: &mut Qp, now: Instant) {
    qp.retries.refill();
    qp.rnr_retries.refill();
    qp.timer_start = (qp.una != qp.send_psn).then_some(now);
}

/// Requester side: ACKs, NAKs and READ responses from the guest (IBTA 9.7.5.2).
pub(super) fn on_response(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &mut MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) {
    let psn = packet.bth.psn;
    // Only PSNs sent and not yet acknowledged are live (IBTA 9.7.5.2.1); older ones are
    // duplicates, newer ones ghosts.
    let behind_una = psn_diff(psn, qp.una) < 0;
    let beyond_sent = psn_diff(psn, qp.sent_high) >= 0;
    match packet.info.kind {
        OpKind::Ack => {
            let Some(aeth) = packet.aeth else { return };
            match aeth.kind() {
                Syndrome::Ack { .. } => {
                    wire.stats.acks_received += 1;
                    if behind_una || beyond_sent {
                        wire.stats.duplicates += 1;
                        return;
                    }
                    acknowledge_through(qp, psn, wire, cq, now);
                }
                Syndrome::RnrNak { timer } => {
                    wire.stats.rnr_naks_received += 1;
                    if behind_una || beyond_sent {
                        wire.stats.duplicates += 1;
                        return;
                    }
                    acknowledge_before(qp, psn, wire, cq, now);
                    if !qp.rnr_retries.take() {
                        fail_head(
                            qp,
                            CompletionStatus::RnrRetryExceeded,
                            None,
                            cq,
                            &mut wire.stats,
                        );
                        return;
                    }
                    // IBTA 9.7.5.2.8: wait the responder's timer, then resend from the PSN.
                    qp.send_psn = psn;
                    qp.rnr_until = Some(now + Duration::from_micros(rnr_timer_us(timer)));
                    qp.timer_start = None;
                }
                Syndrome::Nak { code } => {
                    wire.stats.naks_received += 1;
                    if behind_una || psn_diff(psn, qp.sent_high) > 0 {
                        wire.stats.duplicates += 1;
                        return;
                    }
                    acknowledge_before(qp, psn, wire, cq, now);
                    if code == NAK_PSN_SEQUENCE {
                        // IBTA 9.7.5.2.4: resend everything from the PSN the responder
                        // expects (go-back-N).
                        if !qp.retries.take() {
                            fail_head(
                                qp,
                                CompletionStatus::RetryExceeded,
                                None,
                                cq,
                                &mut wire.stats,
                            );
                            return;
                        }
                        qp.send_psn = psn;
                        qp.timer_start = Some(now);
                        pump(qp, wire, cq, mrs, now);
                    } else {
                        // IBTA 9.7.5.2.5-7: the request at this PSN failed; the QP errors.
                        fail_head(qp, nak_status(code), Some(code), cq, &mut wire.stats);
                    }
                }
                Syndrome::Reserved(_) => wire.stats.dropped_unexpected += 1,
            }
        }
        OpKind::ReadResponse => on_read_response(qp, wire, cq, mrs, packet, now),
        // We never send atomics, so an atomic ACK answers nothing.
        _ => wire.stats.dropped_unexpected += 1,
    }
    pump(qp, wire, cq, mrs, now);
}

pub(super) fn acknowledge_before(
    qp: &mut Qp,
    psn: u32,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    now: Instant,
) {
    if psn_diff(psn, qp.una) > 0 {
        acknowledge_through(qp, psn_add(psn, PSN_MASK), wire, cq, now);
    }
}

pub(super) fn on_read_response(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &mut MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) {
    let psn = packet.bth.psn;
    let Some(index) = qp.wqe_index(psn) else {
        wire.stats.duplicates += 1;
        return;
    };
    let (first_psn, read_done, packets, length, local) = {
        let wqe = &qp.wqes[index];
        let WqeOp::Read { local, .. } = wqe.op else {
            wire.stats.dropped_unexpected += 1;
            return;
        };
        (wqe.first_psn, wqe.read_done, wqe.packets, wqe.length, local)
    };
    // Responses must come in order (IBTA 9.7.5.2.3); a gap is left to the timer, which
    // re-requests from the first missing PSN.
    if psn != psn_add(first_psn, read_done) || psn_diff(psn, qp.send_psn) >= 0 {
        if psn_diff(psn, psn_add(first_psn, read_done)) < 0 {
            wire.stats.duplicates += 1;
        } else {
            wire.stats.dropped_unexpected += 1;
        }
        return;
    }
    let i = read_done;
    let pmtu = u64::from(qp.pmtu);
    let offset = u64::from(i) * pmtu;
    let expected_len = if i + 1 == packets {
        u64::from(length).saturating_sub(offset)
    } else {
        pmtu
    };
    let position = packet.info.position;
    let fits = packet.payload.len() as u64 == expected_len
        && (i + 1 == packets) == position.ends_message()
        && (position.starts_message() || i > 0);
    if !fits {
        wire.stats.dropped_unexpected += 1;
        return;
    }
    // A READ response implies every earlier request was carried out (IBTA 9.7.5.2.1).
    if index > 0 {
        let before = psn_add(first_psn, PSN_MASK);
        acknowledge_through(qp, before, wire, cq, now);
    }
    if mrs
        .write(local.key, local.offset + offset, packet.payload)
        .is_err()
    {
        fail_head(
            qp,
            CompletionStatus::LocalProtectionError,
            None,
            cq,
            &mut wire.stats,
        );
        return;
    }
    if let Some(wqe) = qp.wqes.front_mut() {
        wqe.read_done += 1;
    }
    qp.una = psn_add(psn, 1);
    if psn_diff(qp.send_psn, qp.una) < 0 {
        qp.send_psn = qp.una;
    }
    if i + 1 == packets {
        if let Some(wqe) = qp.wqes.pop_front() {
            complete_wqe(
                qp,
                &wqe,
                CompletionStatus::Success,
                None,
                cq,
                &mut wire.stats,
            );
        }
    }
    progress(qp, now);
}
