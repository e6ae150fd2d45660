//! Responder side (IBTA 9.7.5.1): SEND, WRITE and READ requests from the guest, duplicate
//! detection, RNR and error NAKs, READ responses.

use std::time::Instant;

use p2prig_protocol::target::{Completion, CompletionOpcode, CompletionStatus, MrAccess};

use crate::headers::{
    opcode, packet_count, psn_add, psn_diff, Aeth, Bth, OpKind, Packet, PacketSpec, Position,
    NAK_INVALID_REQUEST, NAK_PSN_SEQUENCE, NAK_REMOTE_ACCESS, NAK_REMOTE_OPERATIONAL, PSN_MASK,
    RNR_NAK, SYNDROME_ACK,
};

use super::*;

/// Responder side: SEND, WRITE and READ requests from the guest (IBTA 9.7.5.1).
pub(super) fn on_request(qp: &mut Qp, shared: &mut Shared, packet: &Packet<'_>, now: Instant) {
    let psn = packet.bth.psn;
    let diff = psn_diff(psn, qp.epsn);
    if diff > 0 {
        // IBTA 9.7.5.1.2: one NAK for a sequence error, then silence until the expected
        // PSN shows up (reference: rxe does the same).
        shared.wire.stats.dropped_unexpected += 1;
        if !qp.seq_nak_sent {
            qp.seq_nak_sent = true;
            shared.wire.send_aeth(qp, qp.epsn, NAK_PSN_SEQUENCE, now);
        }
        return;
    }
    if diff < 0 {
        shared.wire.stats.duplicates += 1;
        duplicate_request(qp, shared, packet, now);
        return;
    }
    qp.seq_nak_sent = false;
    let result = match packet.info.kind {
        OpKind::Send => responder_send(qp, shared, packet, now),
        OpKind::Write => responder_write(qp, shared, packet, now),
        OpKind::ReadRequest => responder_read(qp, shared, packet, now),
        // Atomics are not offered (the guest's QP gets no REMOTE_ATOMIC use here).
        _ => Err(NAK_INVALID_REQUEST),
    };
    match result {
        Ok(Step::Accepted) => {
            qp.epsn = psn_add(psn, 1);
            if packet.bth.ack_req {
                shared.wire.send_aeth(qp, psn, SYNDROME_ACK, now);
            }
        }
        Ok(Step::Consumed) | Ok(Step::RnrNak) => {}
        Err(code) => {
            // IBTA 9.7.5.1.3-5: NAK with the offending PSN, then the QP is in error and
            // drops everything after (reference: rxe behaves so).
            shared.wire.send_aeth(qp, psn, code, now);
            qp.enter_error(shared);
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

fn rnr_nak(qp: &Qp, wire: &mut Wire, psn: u32, now: Instant) -> Result<Step, u8> {
    wire.send_aeth(qp, psn, RNR_NAK | qp.min_rnr_timer, now);
    Ok(Step::RnrNak)
}

fn responder_send(
    qp: &mut Qp,
    shared: &mut Shared,
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
        return rnr_nak(qp, &mut shared.wire, packet.bth.psn, now);
    };
    let len = packet.payload.len() as u32;
    let total = received.saturating_add(len);
    if total > recv.local.length {
        qp.recvs.pop_front();
        shared.complete(recv.completion(qp.qpn, CompletionStatus::LocalLengthError));
        return Err(NAK_INVALID_REQUEST);
    }
    if shared
        .mrs
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
        shared.complete(Completion {
            byte_len: total,
            imm: packet.immdt,
            ..recv.completion(qp.qpn, CompletionStatus::Success)
        });
    } else {
        qp.in_progress = Some(InProgress::Send { received: total });
    }
    Ok(Step::Accepted)
}

fn responder_write(
    qp: &mut Qp,
    shared: &mut Shared,
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
                let (key, offset) = shared
                    .mrs
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
        return rnr_nak(qp, &mut shared.wire, packet.bth.psn, now);
    }
    if len > 0
        && shared
            .mrs
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
                shared.complete(Completion {
                    opcode: CompletionOpcode::RecvRdmaWithImm,
                    byte_len: total,
                    imm: Some(imm),
                    ..recv.completion(qp.qpn, CompletionStatus::Success)
                });
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

fn responder_read(
    qp: &mut Qp,
    shared: &mut Shared,
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
        shared
            .mrs
            .check_remote(
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
    send_read_responses(qp, shared, &record, 0, now);
    qp.epsn = psn_add(record.first_psn, record.packets);
    if qp.reads.len() >= READ_HISTORY {
        qp.reads.pop_front();
    }
    qp.reads.push_back(record);
    Ok(Step::Consumed)
}

/// Sends READ responses `from..packets` of `record` (IBTA 9.7.5.1.5: first/middle/last or
/// only; AETH on all but middle).
fn send_read_responses(qp: &Qp, shared: &mut Shared, record: &ReadRecord, from: u32, now: Instant) {
    let Shared { wire, mrs, .. } = shared;
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
        let position = Position::of(j, count);
        let op = opcode::find(OpKind::ReadResponse, position, false)
            .expect("table 35 has every position of a READ response");
        let psn = psn_add(record.first_psn, i);
        let mut spec = PacketSpec::new(Bth::new(op, remote.qpn, psn, false));
        if position != Position::Middle {
            spec.aeth = Some(Aeth {
                syndrome: SYNDROME_ACK,
                msn: qp.msn,
            });
        }
        let start = (u64::from(i) * pmtu).min(data.len() as u64) as usize;
        let end = (start as u64 + pmtu).min(data.len() as u64) as usize;
        spec.payload = &data[start..end];
        wire.respond(qp, &spec, now);
    }
}

/// IBTA 9.7.5.1.6: duplicates are answered, never executed again (except READ, which is
/// replayed from the duplicate's PSN).
fn duplicate_request(qp: &mut Qp, shared: &mut Shared, packet: &Packet<'_>, now: Instant) {
    let psn = packet.bth.psn;
    if packet.info.kind == OpKind::ReadRequest {
        if let Some(record) = qp.reads.iter().copied().find(|r| r.contains(psn)) {
            let from = psn_diff(psn, record.first_psn) as u32;
            send_read_responses(qp, shared, &record, from, now);
        }
        return;
    }
    if packet.bth.ack_req {
        // Reference: rxe re-ACKs duplicates with PSN = expected - 1.
        let last = psn_add(qp.epsn, PSN_MASK);
        shared.wire.send_aeth(qp, last, SYNDROME_ACK, now);
    }
}

#[cfg(test)]
mod tests {
    use p2prig_protocol::target::{QpSettings, QpStateName, Sge};

    use super::super::test_support::{connected_qp, shared, PEER_QPN};
    use super::*;

    /// The bytes of one request to the target's QP.
    fn request(op: u8, psn: u32, ack_req: bool, payload: &[u8]) -> Vec<u8> {
        let mut spec = PacketSpec::new(Bth::new(op, PEER_QPN, psn, ack_req));
        spec.payload = payload;
        let mut bytes = Vec::new();
        spec.write(&mut bytes);
        bytes
    }

    fn parse(bytes: &[u8]) -> Packet<'_> {
        Packet::parse(bytes).expect("a well-formed packet")
    }

    #[test]
    fn payload_length_must_fit_the_position_in_the_message() {
        let mtu = [0u8; 256];
        let check = |op, len: usize| check_length(&parse(&request(op, 0, false, &mtu[..len])), 256);
        assert_eq!(check(opcode::SEND_FIRST, 256), Ok(()));
        assert_eq!(check(opcode::SEND_MIDDLE, 255), Err(NAK_INVALID_REQUEST));
        assert_eq!(check(opcode::SEND_LAST, 1), Ok(()));
        assert_eq!(check(opcode::SEND_LAST, 0), Err(NAK_INVALID_REQUEST));
        assert_eq!(check(opcode::SEND_ONLY, 0), Ok(()));
        assert_eq!(check(opcode::SEND_ONLY, 256), Ok(()));
        let long = [0u8; 257];
        let too_long = request(opcode::SEND_ONLY, 0, false, &long);
        assert_eq!(
            check_length(&parse(&too_long), 256),
            Err(NAK_INVALID_REQUEST)
        );
    }

    #[test]
    fn a_payload_and_pad_off_a_four_byte_boundary_is_an_invalid_request() {
        let mut bytes = request(opcode::SEND_ONLY, 0, false, &[1, 2, 3]);
        // Drop the pad byte and clear PadCnt: three bytes of payload, unpadded.
        bytes.pop();
        bytes[1] &= !0x30;
        let packet = parse(&bytes);
        assert_eq!(packet.payload, [1, 2, 3]);
        assert_eq!(check_length(&packet, 256), Err(NAK_INVALID_REQUEST));
    }

    #[test]
    fn a_send_without_a_receive_is_rnr_naked_and_stays_expected() {
        let (mut shared, link) = shared();
        let mut qp = connected_qp(&QpSettings::default(), 40);
        let bytes = request(opcode::SEND_ONLY, 40, true, &[7; 8]);
        on_request(&mut qp, &mut shared, &parse(&bytes), Instant::now());
        assert_eq!(shared.wire.stats.rnr_naks_sent, 1);
        assert_eq!((qp.epsn, qp.state, link.count()), (40, QpStateName::Rts, 1));
    }

    #[test]
    fn a_send_lands_in_the_head_receive_and_completes_it() {
        let (mut shared, _link) = shared();
        let key = shared
            .mrs
            .register(64, &[MrAccess::LocalWrite])
            .expect("MR")
            .info()
            .key;
        let mut qp = connected_qp(&QpSettings::default(), 40);
        let local = Sge {
            key,
            offset: 4,
            length: 16,
        };
        qp.recvs.push_back(RecvWqe { wr_id: 9, local });
        let bytes = request(opcode::SEND_ONLY, 40, true, &[7; 8]);
        on_request(&mut qp, &mut shared, &parse(&bytes), Instant::now());
        assert_eq!((qp.epsn, qp.msn, shared.wire.stats.acks_sent), (41, 1, 1));
        let completion = shared.cq.entries.front().expect("a completion");
        assert_eq!((completion.wr_id, completion.byte_len), (9, 8));
        assert_eq!(completion.status, CompletionStatus::Success);
        assert_eq!(shared.mrs.slice(key, 4, 8).expect("in range"), [7; 8]);
    }

    #[test]
    fn a_psn_gap_is_naked_once_and_a_duplicate_is_acked_again_not_executed() {
        let (mut shared, _link) = shared();
        let mut qp = connected_qp(&QpSettings::default(), 40);
        let now = Instant::now();
        for _ in 0..2 {
            let ahead = request(opcode::SEND_ONLY, 42, true, &[]);
            on_request(&mut qp, &mut shared, &parse(&ahead), now);
        }
        assert_eq!(shared.wire.stats.naks_sent, 1, "one NAK per gap");
        assert_eq!(qp.epsn, 40);
        let old = request(opcode::SEND_ONLY, 39, true, &[]);
        on_request(&mut qp, &mut shared, &parse(&old), now);
        assert_eq!(shared.wire.stats.duplicates, 1);
        assert_eq!(shared.wire.stats.acks_sent, 1);
        assert!(shared.cq.entries.is_empty(), "no receive was consumed");
    }

    #[test]
    fn a_bad_rkey_naks_remote_access_and_puts_the_qp_in_error() {
        let (mut shared, _link) = shared();
        let mut qp = connected_qp(&QpSettings::default(), 40);
        let mut spec = PacketSpec::new(Bth::new(opcode::WRITE_ONLY, PEER_QPN, 40, true));
        spec.reth = Some(crate::headers::Reth {
            va: 0,
            rkey: 0xBAD,
            length: 4,
        });
        spec.payload = &[1, 2, 3, 4];
        let mut bytes = Vec::new();
        spec.write(&mut bytes);
        on_request(&mut qp, &mut shared, &parse(&bytes), Instant::now());
        assert_eq!(shared.wire.stats.naks_sent, 1);
        assert_eq!(qp.state, QpStateName::Error);
    }
}
