//! Responder side (IBTA 9.7.5.1): SEND, WRITE and READ requests from the guest, duplicate
//! detection, RNR and error NAKs, READ responses.

use std::time::Instant;

use p2prig_protocol::target::{Completion, CompletionOpcode, CompletionStatus, MrAccess};

use crate::headers::{
    opcode, packet_count, psn_add, psn_diff, Aeth, Bth, OpKind, Packet, PacketSpec, Position,
    NAK_INVALID_REQUEST, NAK_PSN_SEQUENCE, NAK_REMOTE_ACCESS, NAK_REMOTE_OPERATIONAL, PSN_MASK,
    RNR_NAK, SYNDROME_ACK,
};
use crate::memory::MemoryRegions;

use super::*;

/// Responder side: SEND, WRITE and READ requests from the guest (IBTA 9.7.5.1).
pub(super) fn on_request(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &mut MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) {
    let psn = packet.bth.psn;
    let diff = psn_diff(psn, qp.epsn);
    if diff > 0 {
        // IBTA 9.7.5.1.2: one NAK for a sequence error, then silence until the expected
        // PSN shows up (reference: rxe does the same).
        wire.stats.dropped_unexpected += 1;
        if !qp.seq_nak_sent {
            qp.seq_nak_sent = true;
            wire.send_aeth(qp, qp.epsn, NAK_PSN_SEQUENCE, now);
        }
        return;
    }
    if diff < 0 {
        wire.stats.duplicates += 1;
        duplicate_request(qp, wire, mrs, packet, now);
        return;
    }
    qp.seq_nak_sent = false;
    let result = match packet.info.kind {
        OpKind::Send => responder_send(qp, wire, cq, mrs, packet, now),
        OpKind::Write => responder_write(qp, wire, cq, mrs, packet, now),
        OpKind::ReadRequest => responder_read(qp, wire, mrs, packet, now),
        // Atomics are not offered (the guest's QP gets no REMOTE_ATOMIC use here).
        _ => Err(NAK_INVALID_REQUEST),
    };
    match result {
        Ok(Step::Accepted) => {
            qp.epsn = psn_add(psn, 1);
            if packet.bth.ack_req {
                wire.send_aeth(qp, psn, SYNDROME_ACK, now);
            }
        }
        Ok(Step::Consumed) | Ok(Step::RnrNak) => {}
        Err(code) => {
            // IBTA 9.7.5.1.3-5: NAK with the offending PSN, then the QP is in error and
            // drops everything after (reference: rxe behaves so).
            wire.send_aeth(qp, psn, code, now);
            enter_error(qp, cq, &mut wire.stats);
        }
    }
}

pub(super) enum Step {
    /// The packet was taken: advance the expected PSN and ACK if asked.
    Accepted,
    /// The packet was taken and the expected PSN already moved (READ).
    Consumed,
    /// No receive buffer: an RNR NAK was sent, the PSN stays expected.
    RnrNak,
}

/// Checks payload size against the position in the message (IBTA 9.7.5.1.1, C9-80..):
/// first and middle carry exactly one MTU, last 1..=MTU, only 0..=MTU; pad aligned.
pub(super) fn check_length(packet: &Packet<'_>, pmtu: u32) -> Result<(), u8> {
    let len = packet.payload.len();
    let pmtu = pmtu as usize;
    let ok = match packet.info.position {
        Position::First | Position::Middle => len == pmtu,
        Position::Last => (1..=pmtu).contains(&len),
        Position::Only => len <= pmtu,
    };
    if ok && packet.pad_is_aligned() {
        Ok(())
    } else {
        Err(NAK_INVALID_REQUEST)
    }
}

pub(super) fn rnr_nak(qp: &Qp, wire: &mut Wire, psn: u32, now: Instant) -> Result<Step, u8> {
    wire.send_aeth(qp, psn, RNR_NAK | qp.min_rnr_timer, now);
    Ok(Step::RnrNak)
}

pub(super) fn responder_send(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &mut MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) -> Result<Step, u8> {
    let position = packet.info.position;
    let received = match (qp.in_progress, position.starts_message()) {
        (None, true) => 0,
        (Some(InProgress::Send { received }), false) => received,
        _ => return Err(NAK_INVALID_REQUEST),
    };
    check_length(packet, qp.pmtu)?;
    let Some(&recv) = qp.recvs.front() else {
        // IBTA 9.7.5.1.4: no receive WQE is a receiver-not-ready condition.
        return rnr_nak(qp, wire, packet.bth.psn, now);
    };
    let len = packet.payload.len() as u32;
    let total = received.saturating_add(len);
    if total > recv.local.length {
        qp.recvs.pop_front();
        push_completion(
            cq,
            &mut wire.stats,
            Completion {
                qpn: qp.qpn,
                wr_id: recv.wr_id,
                opcode: CompletionOpcode::Recv,
                status: CompletionStatus::LocalLengthError,
                nak_code: None,
                byte_len: 0,
                imm: None,
            },
        );
        return Err(NAK_INVALID_REQUEST);
    }
    if mrs
        .write(
            recv.local.key,
            recv.local.offset + u64::from(received),
            packet.payload,
        )
        .is_err()
    {
        return Err(NAK_REMOTE_OPERATIONAL);
    }
    if position.ends_message() {
        qp.recvs.pop_front();
        qp.in_progress = None;
        qp.msn = psn_add(qp.msn, 1);
        push_completion(
            cq,
            &mut wire.stats,
            Completion {
                qpn: qp.qpn,
                wr_id: recv.wr_id,
                opcode: CompletionOpcode::Recv,
                status: CompletionStatus::Success,
                nak_code: None,
                byte_len: total,
                imm: packet.immdt,
            },
        );
    } else {
        qp.in_progress = Some(InProgress::Send { received: total });
    }
    Ok(Step::Accepted)
}

pub(super) fn responder_write(
    qp: &mut Qp,
    wire: &mut Wire,
    cq: &mut CompletionQueue,
    mrs: &mut MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) -> Result<Step, u8> {
    let position = packet.info.position;
    let (key, offset, total, received) = match (qp.in_progress, position.starts_message()) {
        (None, true) => {
            let reth = packet.reth.ok_or(NAK_INVALID_REQUEST)?;
            if reth.length > 0 {
                // IBTA 9.7.5.1.3 / C10-?: R_Key, access and bounds, else remote access
                // error. A 0-byte WRITE skips the check (reference: rxe does too).
                let (key, offset) = mrs
                    .check_remote(
                        reth.rkey,
                        reth.va,
                        u64::from(reth.length),
                        MrAccess::RemoteWrite,
                    )
                    .map_err(|_| NAK_REMOTE_ACCESS)?;
                (key, offset, reth.length, 0u32)
            } else {
                (0, 0, 0, 0)
            }
        }
        (
            Some(InProgress::Write {
                key,
                offset,
                total,
                received,
            }),
            false,
        ) => (key, offset, total, received),
        _ => return Err(NAK_INVALID_REQUEST),
    };
    check_length(packet, qp.pmtu)?;
    let len = packet.payload.len() as u32;
    let done = received.saturating_add(len);
    if done > total || (position.ends_message() && done != total) {
        return Err(NAK_INVALID_REQUEST);
    }
    if packet.immdt.is_some() && qp.recvs.is_empty() {
        return rnr_nak(qp, wire, packet.bth.psn, now);
    }
    if len > 0
        && mrs
            .write(key, offset + u64::from(received), packet.payload)
            .is_err()
    {
        // The MR went away mid-message.
        return Err(NAK_REMOTE_ACCESS);
    }
    if position.ends_message() {
        qp.in_progress = None;
        qp.msn = psn_add(qp.msn, 1);
        if let Some(imm) = packet.immdt {
            if let Some(recv) = qp.recvs.pop_front() {
                push_completion(
                    cq,
                    &mut wire.stats,
                    Completion {
                        qpn: qp.qpn,
                        wr_id: recv.wr_id,
                        opcode: CompletionOpcode::RecvRdmaWithImm,
                        status: CompletionStatus::Success,
                        nak_code: None,
                        byte_len: total,
                        imm: Some(imm),
                    },
                );
            }
        }
    } else {
        qp.in_progress = Some(InProgress::Write {
            key,
            offset,
            total,
            received: done,
        });
    }
    Ok(Step::Accepted)
}

pub(super) fn responder_read(
    qp: &mut Qp,
    wire: &mut Wire,
    mrs: &MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) -> Result<Step, u8> {
    if qp.in_progress.is_some() {
        return Err(NAK_INVALID_REQUEST);
    }
    let reth = packet.reth.ok_or(NAK_INVALID_REQUEST)?;
    if reth.length > MAX_MESSAGE_BYTES {
        return Err(NAK_INVALID_REQUEST);
    }
    if reth.length > 0 {
        mrs.check_remote(
            reth.rkey,
            reth.va,
            u64::from(reth.length),
            MrAccess::RemoteRead,
        )
        .map_err(|_| NAK_REMOTE_ACCESS)?;
    }
    let record = ReadRecord {
        first_psn: packet.bth.psn,
        packets: packet_count(u64::from(reth.length), qp.pmtu),
        va: reth.va,
        rkey: reth.rkey,
        length: reth.length,
    };
    qp.msn = psn_add(qp.msn, 1);
    send_read_responses(qp, wire, mrs, &record, 0, now);
    qp.epsn = psn_add(record.first_psn, record.packets);
    if qp.reads.len() >= READ_HISTORY {
        qp.reads.pop_front();
    }
    qp.reads.push_back(record);
    Ok(Step::Consumed)
}

/// Sends READ responses `from..packets` of `record` (IBTA 9.7.5.1.5: first/middle/last or
/// only; AETH on all but middle).
pub(super) fn send_read_responses(
    qp: &Qp,
    wire: &mut Wire,
    mrs: &MemoryRegions,
    record: &ReadRecord,
    from: u32,
    now: Instant,
) {
    let Some(remote) = qp.remote else { return };
    let pmtu = u64::from(qp.pmtu);
    let data: &[u8] = if record.length == 0 {
        &[]
    } else {
        match mrs
            .check_remote(
                record.rkey,
                record.va,
                u64::from(record.length),
                MrAccess::RemoteRead,
            )
            .and_then(|(key, offset)| mrs.slice(key, offset, u64::from(record.length)))
        {
            Ok(data) => data,
            // Deregistered between request and replay: nothing to send.
            Err(_) => return,
        }
    };
    // A replay from the middle restarts with a FIRST (or ONLY) response.
    let count = record.packets - from;
    for j in 0..count {
        let i = from + j;
        let op = match Position::of(j, count) {
            Position::Only => opcode::READ_RESPONSE_ONLY,
            Position::First => opcode::READ_RESPONSE_FIRST,
            Position::Middle => opcode::READ_RESPONSE_MIDDLE,
            Position::Last => opcode::READ_RESPONSE_LAST,
        };
        let psn = psn_add(record.first_psn, i);
        let mut spec = PacketSpec::new(Bth::new(op, remote.qpn, psn, false));
        if op != opcode::READ_RESPONSE_MIDDLE {
            spec.aeth = Some(Aeth {
                syndrome: SYNDROME_ACK,
                msn: qp.msn,
            });
        }
        let start = (u64::from(i) * pmtu).min(data.len() as u64) as usize;
        let end = (start as u64 + pmtu).min(data.len() as u64) as usize;
        spec.payload = &data[start..end];
        wire.send(remote, qp.udp_sport, &spec, now);
    }
}

/// IBTA 9.7.5.1.6: duplicates are answered, never executed again (except READ, which is
/// replayed from the duplicate's PSN).
pub(super) fn duplicate_request(
    qp: &mut Qp,
    wire: &mut Wire,
    mrs: &MemoryRegions,
    packet: &Packet<'_>,
    now: Instant,
) {
    let psn = packet.bth.psn;
    if packet.info.kind == OpKind::ReadRequest {
        let found = qp.reads.iter().copied().find(|r| {
            let d = psn_diff(psn, r.first_psn);
            d >= 0 && (d as u32) < r.packets
        });
        if let Some(record) = found {
            let from = psn_diff(psn, record.first_psn) as u32;
            send_read_responses(qp, wire, mrs, &record, from, now);
        }
        return;
    }
    if packet.bth.ack_req {
        // Reference: rxe re-ACKs duplicates with PSN = expected - 1.
        let last = psn_add(qp.epsn, PSN_MASK);
        wire.send_aeth(qp, last, SYNDROME_ACK, now);
    }
}
