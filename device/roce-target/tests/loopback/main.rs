//! Two RC engines back to back through a loopback link, no VM: one plays the target, the
//! other the guest's rxe. Time is synthetic, so timers are exact and tests never sleep.

mod held;
mod pair;

use std::net::Ipv4Addr;
use std::time::Duration;

use p2prig_protocol::target::{
    CompletionOpcode, CompletionStatus, MrAccess, QpSettings, QpStateName, Sge,
};
use roce_target::engine::RemoteBuffer;
use roce_target::headers::{opcode, Packet};
use roce_target::EngineConfig;

use pair::*;

#[test]
fn write_of_any_length_lands_in_the_peer_and_completes() {
    for len in [0usize, 1, 8, 1023, 1024, 1025, 4096, 70_000] {
        let mut p = Pair::new(QpSettings::default());
        let (src, _) = Pair::mr(&mut p.a, len.max(1) as u64, 0);
        p.a.mr_write(src, 0, &pattern(len)).expect("data");
        let (dst, dst_va) = Pair::mr(&mut p.b, len.max(1) as u64 + 16, 0xEE);
        p.a.post_write(
            p.a_qpn,
            7,
            Sge {
                key: src,
                offset: 0,
                length: len as u32,
            },
            RemoteBuffer {
                va: dst_va + 16,
                rkey: dst,
            },
            None,
            p.now,
        )
        .expect("post");
        p.run(|_, _| true);
        let done = p.a.poll_cq(None, 16);
        assert_eq!(done.len(), 1, "len {len}: {done:?}");
        assert_eq!(done[0].wr_id, 7);
        assert_eq!(done[0].status, CompletionStatus::Success);
        assert_eq!(done[0].opcode, CompletionOpcode::Write);
        let landed = p.b.mr_read(dst, 16, len as u64).expect("read");
        assert_eq!(landed, pattern(len), "len {len}");
        assert_eq!(p.b.mr_read(dst, 0, 16).expect("guard"), vec![0xEE; 16]);
        assert_eq!(p.a.stats().retransmissions, 0);
    }
}

#[test]
fn write_segments_by_path_mtu_with_ackreq_on_the_last_packet() {
    let mut p = Pair::new(QpSettings {
        path_mtu: Some(256),
        ..Default::default()
    });
    let (src, _) = Pair::mr(&mut p.a, 1000, 1);
    let (dst, va) = Pair::mr(&mut p.b, 1000, 0);
    p.a.post_write(
        p.a_qpn,
        1,
        Sge {
            key: src,
            offset: 0,
            length: 1000,
        },
        RemoteBuffer { va, rkey: dst },
        Some(0xABCD),
        p.now,
    )
    .expect("post");
    let frames: Vec<Vec<u8>> = p.a_out.lock().expect("lock").iter().cloned().collect();
    let ops: Vec<u8> = frames
        .iter()
        .filter_map(|f| roce_opcode(f))
        .map(|(op, _)| op)
        .collect();
    assert_eq!(
        ops,
        [
            opcode::WRITE_FIRST,
            opcode::WRITE_MIDDLE,
            opcode::WRITE_MIDDLE,
            opcode::WRITE_LAST_IMM
        ]
    );
    let ack_reqs: Vec<bool> = frames
        .iter()
        .filter_map(|f| {
            Packet::parse(&f[42..f.len() - 4])
                .ok()
                .map(|p| p.bth.ack_req)
        })
        .collect();
    assert_eq!(ack_reqs, [false, false, false, true]);
    // WRITE with immediate needs a receive at the peer.
    p.b.post_recv(
        p.b_qpn,
        99,
        Sge {
            key: dst,
            offset: 0,
            length: 0,
        },
    )
    .expect("recv");
    p.run(|_, _| true);
    let b_done = p.b.poll_cq(None, 4);
    assert_eq!(b_done.len(), 1);
    assert_eq!(b_done[0].opcode, CompletionOpcode::RecvRdmaWithImm);
    assert_eq!(b_done[0].imm, Some(0xABCD));
    assert_eq!(b_done[0].byte_len, 1000);
    assert_eq!(p.a.poll_cq(None, 4)[0].status, CompletionStatus::Success);
}

#[test]
fn read_reassembles_the_responses() {
    for len in [0usize, 5, 1024, 3000, 65_536] {
        let mut p = Pair::new(QpSettings::default());
        let (remote, remote_va) = Pair::mr(&mut p.b, len.max(1) as u64, 0);
        p.b.mr_write(remote, 0, &pattern(len)).expect("data");
        let (local, _) = Pair::mr(&mut p.a, len.max(1) as u64, 0);
        p.a.post_read(
            p.a_qpn,
            3,
            Sge {
                key: local,
                offset: 0,
                length: len as u32,
            },
            RemoteBuffer {
                va: remote_va,
                rkey: remote,
            },
            p.now,
        )
        .expect("post");
        p.run(|_, _| true);
        let done = p.a.poll_cq(None, 4);
        assert_eq!(done.len(), 1, "{len}");
        assert_eq!(done[0].status, CompletionStatus::Success);
        assert_eq!(done[0].opcode, CompletionOpcode::Read);
        assert_eq!(done[0].byte_len, len as u32);
        assert_eq!(
            p.a.mr_read(local, 0, len as u64).expect("read"),
            pattern(len)
        );
    }
}

#[test]
fn send_fills_a_posted_receive() {
    let mut p = Pair::new(QpSettings::default());
    let (src, _) = Pair::mr(&mut p.a, 5000, 0);
    p.a.mr_write(src, 0, &pattern(5000)).expect("data");
    let (dst, _) = Pair::mr(&mut p.b, 8192, 0);
    p.b.post_recv(
        p.b_qpn,
        11,
        Sge {
            key: dst,
            offset: 100,
            length: 6000,
        },
    )
    .expect("recv");
    p.a.post_send(
        p.a_qpn,
        12,
        Sge {
            key: src,
            offset: 0,
            length: 5000,
        },
        Some(5),
        p.now,
    )
    .expect("send");
    p.run(|_, _| true);
    let recv = p.b.poll_cq(None, 4);
    assert_eq!(recv.len(), 1);
    assert_eq!(recv[0].wr_id, 11);
    assert_eq!(recv[0].byte_len, 5000);
    assert_eq!(recv[0].imm, Some(5));
    assert_eq!(p.b.mr_read(dst, 100, 5000).expect("read"), pattern(5000));
    let sent = p.a.poll_cq(None, 4);
    assert_eq!(sent[0].wr_id, 12);
    assert_eq!(sent[0].status, CompletionStatus::Success);
}

#[test]
fn a_dropped_packet_is_recovered_by_nak_0x60_and_go_back_n() {
    let mut p = Pair::new(QpSettings::default());
    let (src, _) = Pair::mr(&mut p.a, 8192, 0);
    p.a.mr_write(src, 0, &pattern(8192)).expect("data");
    let (dst, va) = Pair::mr(&mut p.b, 8192, 0);
    p.a.post_write(
        p.a_qpn,
        1,
        Sge {
            key: src,
            offset: 0,
            length: 8192,
        },
        RemoteBuffer { va, rkey: dst },
        None,
        p.now,
    )
    .expect("post");
    let mut dropped = false;
    let mut naks = 0;
    p.run(|from_a, frame| {
        if let Some((op, _)) = roce_opcode(frame) {
            if from_a && op == opcode::WRITE_MIDDLE && !dropped {
                dropped = true;
                return false;
            }
            if !from_a && op == opcode::ACKNOWLEDGE && frame[42 + 12] == 0x60 {
                naks += 1;
            }
        }
        true
    });
    assert!(dropped);
    assert_eq!(naks, 1, "one NAK per gap, then silence");
    assert_eq!(p.b.mr_read(dst, 0, 8192).expect("read"), pattern(8192));
    let done = p.a.poll_cq(None, 4);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, CompletionStatus::Success);
    let stats = p.a.stats();
    assert!(stats.retransmissions >= 1);
    assert_eq!(stats.naks_received, 1);
    assert_eq!(p.b.stats().naks_sent, 1);
}

#[test]
fn a_lost_last_packet_is_resent_after_the_ack_timeout() {
    let mut p = Pair::new(QpSettings {
        ack_timeout_ms: Some(50),
        ..Default::default()
    });
    let (src, _) = Pair::mr(&mut p.a, 64, 3);
    let (dst, va) = Pair::mr(&mut p.b, 64, 0);
    p.a.post_write(
        p.a_qpn,
        1,
        Sge {
            key: src,
            offset: 0,
            length: 64,
        },
        RemoteBuffer { va, rkey: dst },
        None,
        p.now,
    )
    .expect("post");
    p.run(|from_a, _| !from_a);
    p.advance(Duration::from_millis(49));
    assert_eq!(p.run(|_, _| true), 0, "no resend before the timeout");
    p.advance(Duration::from_millis(1));
    p.run(|_, _| true);
    assert_eq!(p.a.poll_cq(None, 4)[0].status, CompletionStatus::Success);
    assert_eq!(p.a.stats().timeouts, 1);
    assert_eq!(p.b.mr_read(dst, 0, 64).expect("read"), vec![3; 64]);
}

#[test]
fn retries_run_out_into_a_timeout_completion_and_error() {
    let mut p = Pair::new(QpSettings {
        ack_timeout_ms: Some(10),
        retry_cnt: Some(2),
        ..Default::default()
    });
    let (src, _) = Pair::mr(&mut p.a, 64, 3);
    for wr_id in [1, 2] {
        p.a.post_write(
            p.a_qpn,
            wr_id,
            Sge {
                key: src,
                offset: 0,
                length: 64,
            },
            RemoteBuffer {
                va: 0x1000,
                rkey: 0x1234,
            },
            None,
            p.now,
        )
        .expect("post");
    }
    for _ in 0..4 {
        p.run(|from_a, _| !from_a);
        p.advance(Duration::from_millis(10));
    }
    let done = p.a.poll_cq(None, 4);
    assert_eq!(done.len(), 2);
    assert_eq!(done[0].status, CompletionStatus::RetryExceeded);
    assert_eq!(done[1].status, CompletionStatus::Flushed);
    assert_eq!(p.a.query_qp(p.a_qpn).expect("qp").state, QpStateName::Error);
    assert_eq!(p.a.stats().timeouts, 3);
}

#[test]
fn a_bad_rkey_gets_nak_0x62_and_both_qps_go_to_error() {
    let mut p = Pair::new(QpSettings::default());
    let (src, _) = Pair::mr(&mut p.a, 64, 3);
    let (dst, va) = Pair::mr(&mut p.b, 64, 0);
    for (wr_id, rkey) in [(1, dst ^ 0x100), (2, dst)] {
        p.a.post_write(
            p.a_qpn,
            wr_id,
            Sge {
                key: src,
                offset: 0,
                length: 64,
            },
            RemoteBuffer { va, rkey },
            None,
            p.now,
        )
        .expect("post");
    }
    p.run(|_, _| true);
    let done = p.a.poll_cq(None, 4);
    assert_eq!(done.len(), 2, "{done:?}");
    assert_eq!(done[0].wr_id, 1);
    assert_eq!(done[0].status, CompletionStatus::RemoteAccessError);
    assert_eq!(done[0].nak_code, Some(0x62));
    assert_eq!(done[1].status, CompletionStatus::Flushed);
    assert_eq!(p.a.query_qp(p.a_qpn).expect("a").state, QpStateName::Error);
    assert_eq!(p.b.query_qp(p.b_qpn).expect("b").state, QpStateName::Error);
    // The second WRITE never landed; the responder dropped it silently.
    assert_eq!(p.b.mr_read(dst, 0, 64).expect("read"), vec![0; 64]);
    // A reset and a new PSN exchange recover.
    let qa = p.a.reset_qp(p.a_qpn, None).expect("reset a");
    let qb = p.b.reset_qp(p.b_qpn, None).expect("reset b");
    p.a.connect(
        qa.qpn,
        qb.qpn,
        qb.psn,
        Ipv4Addr::new(10, 0, 2, 15),
        None,
        p.now,
    )
    .expect("reconnect a");
    p.b.connect(
        qb.qpn,
        qa.qpn,
        qa.psn,
        Ipv4Addr::new(10, 0, 2, 2),
        None,
        p.now,
    )
    .expect("reconnect b");
    p.a.post_write(
        p.a_qpn,
        3,
        Sge {
            key: src,
            offset: 0,
            length: 64,
        },
        RemoteBuffer { va, rkey: dst },
        None,
        p.now,
    )
    .expect("post");
    p.run(|_, _| true);
    assert_eq!(p.a.poll_cq(None, 4)[0].status, CompletionStatus::Success);
    assert_eq!(p.b.mr_read(dst, 0, 64).expect("read"), vec![3; 64]);
}

#[test]
fn a_read_without_remote_read_access_is_a_remote_access_error() {
    let mut p = Pair::new(QpSettings::default());
    let dst = p.b.register_mr(64, &[MrAccess::RemoteWrite]).expect("mr");
    let (local, _) = Pair::mr(&mut p.a, 64, 0);
    p.a.post_read(
        p.a_qpn,
        1,
        Sge {
            key: local,
            offset: 0,
            length: 64,
        },
        RemoteBuffer {
            va: dst.va,
            rkey: dst.key,
        },
        p.now,
    )
    .expect("post");
    p.run(|_, _| true);
    let done = p.a.poll_cq(None, 4);
    assert_eq!(done[0].status, CompletionStatus::RemoteAccessError);
    assert_eq!(done[0].nak_code, Some(0x62));
}

#[test]
fn a_send_without_a_receive_is_rnr_naked_and_retried_after_the_timer() {
    let mut p = Pair::new(QpSettings {
        min_rnr_timer: Some(13), // 0.96 ms (IBTA table 45)
        ..Default::default()
    });
    let (src, _) = Pair::mr(&mut p.a, 32, 9);
    p.a.post_send(
        p.a_qpn,
        1,
        Sge {
            key: src,
            offset: 0,
            length: 32,
        },
        None,
        p.now,
    )
    .expect("send");
    p.run(|_, _| true);
    assert_eq!(p.b.stats().rnr_naks_sent, 1);
    assert_eq!(p.a.stats().rnr_naks_received, 1);
    assert!(p.a.poll_cq(None, 4).is_empty());
    let (dst, _) = Pair::mr(&mut p.b, 32, 0);
    p.b.post_recv(
        p.b_qpn,
        2,
        Sge {
            key: dst,
            offset: 0,
            length: 32,
        },
    )
    .expect("recv");
    // The RNR timer has not run out yet: nothing is resent.
    p.advance(Duration::from_micros(900));
    assert_eq!(p.run(|_, _| true), 0);
    p.advance(Duration::from_micros(100));
    p.run(|_, _| true);
    assert_eq!(p.a.poll_cq(None, 4)[0].status, CompletionStatus::Success);
    assert_eq!(p.b.poll_cq(None, 4)[0].wr_id, 2);
    assert_eq!(p.b.mr_read(dst, 0, 32).expect("read"), vec![9; 32]);
}

#[test]
fn rnr_retries_run_out() {
    let mut p = Pair::new(QpSettings {
        rnr_retry: Some(1),
        min_rnr_timer: Some(1),
        ..Default::default()
    });
    let (src, _) = Pair::mr(&mut p.a, 32, 9);
    p.a.post_send(
        p.a_qpn,
        1,
        Sge {
            key: src,
            offset: 0,
            length: 32,
        },
        None,
        p.now,
    )
    .expect("send");
    for _ in 0..3 {
        p.run(|_, _| true);
        p.advance(Duration::from_millis(1));
    }
    let done = p.a.poll_cq(None, 4);
    assert_eq!(done[0].status, CompletionStatus::RnrRetryExceeded);
}

#[test]
fn psns_wrap_at_24_bits() {
    let mut p = Pair::new(QpSettings {
        psn: Some(0xFF_FFFE),
        path_mtu: Some(256),
        ..Default::default()
    });
    let (src, _) = Pair::mr(&mut p.a, 4096, 0);
    p.a.mr_write(src, 0, &pattern(4096)).expect("data");
    let (dst, va) = Pair::mr(&mut p.b, 4096, 0);
    let mut psns = Vec::new();
    p.a.post_write(
        p.a_qpn,
        1,
        Sge {
            key: src,
            offset: 0,
            length: 4096,
        },
        RemoteBuffer { va, rkey: dst },
        None,
        p.now,
    )
    .expect("post");
    p.a.post_read(
        p.a_qpn,
        2,
        Sge {
            key: src,
            offset: 0,
            length: 4096,
        },
        RemoteBuffer { va, rkey: dst },
        p.now,
    )
    .expect("read");
    p.run(|from_a, frame| {
        if from_a {
            if let Some((_, psn)) = roce_opcode(frame) {
                psns.push(psn);
            }
        }
        true
    });
    assert_eq!(&psns[..4], &[0xFF_FFFE, 0xFF_FFFF, 0, 1]);
    let done = p.a.poll_cq(None, 4);
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|c| c.status == CompletionStatus::Success));
    assert_eq!(p.b.mr_read(dst, 0, 4096).expect("read"), pattern(4096));
    let status = p.a.query_qp(p.a_qpn).expect("qp");
    assert_eq!(status.sq_psn, 30);
    assert_eq!(status.unacked_psn, 30);
}

#[test]
fn duplicate_requests_are_acked_not_executed_again() {
    let mut p = Pair::new(QpSettings::default());
    let (src, _) = Pair::mr(&mut p.a, 16, 1);
    let (dst, _) = Pair::mr(&mut p.b, 64, 0);
    p.b.post_recv(
        p.b_qpn,
        1,
        Sge {
            key: dst,
            offset: 0,
            length: 16,
        },
    )
    .expect("recv");
    p.a.post_send(
        p.a_qpn,
        1,
        Sge {
            key: src,
            offset: 0,
            length: 16,
        },
        None,
        p.now,
    )
    .expect("send");
    let send = p
        .a_out
        .lock()
        .expect("lock")
        .front()
        .cloned()
        .expect("frame");
    p.run(|_, _| true);
    p.b.receive(&send, p.now);
    assert_eq!(p.b.stats().duplicates, 1);
    assert_eq!(p.b.poll_cq(None, 4).len(), 1, "one receive, not two");
    p.run(|_, _| true);
    assert_eq!(p.a.poll_cq(None, 4).len(), 1);
}

#[test]
fn arp_requests_for_the_target_are_answered_and_unicast_probes_too() {
    let mut p = Pair::new(QpSettings::default());
    let before = p.a.stats().arp_requests_answered;
    let request = roce_target::frame::arp_request(
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        Ipv4Addr::new(10, 0, 2, 15),
        Ipv4Addr::new(10, 0, 2, 2),
    );
    p.a.receive(&request, p.now);
    let mut unicast = request.clone();
    unicast[..6].copy_from_slice(&EngineConfig::default().mac);
    p.a.receive(&unicast, p.now);
    assert_eq!(p.a.stats().arp_requests_answered, before + 2);
    let replies: Vec<Vec<u8>> = p.a_out.lock().expect("lock").drain(..).collect();
    assert_eq!(replies.len(), 2);
    assert!(replies.iter().all(|r| r[12..14] == [0x08, 0x06]));
    // For someone else: no reply.
    let other = roce_target::frame::arp_request(
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        Ipv4Addr::new(10, 0, 2, 15),
        Ipv4Addr::new(10, 0, 2, 3),
    );
    p.a.receive(&other, p.now);
    assert!(p.a_out.lock().expect("lock").is_empty());
}

#[test]
fn a_write_holds_its_bytes_against_the_send_queue_limit_until_acknowledged() {
    use roce_target::engine::{EngineError, MAX_POSTED_BYTES, MAX_QUEUED_BYTES};
    let mut p = Pair::new(QpSettings {
        path_mtu: Some(4096),
        ..Default::default()
    });
    let len = 1u32 << 20;
    let (src, _) = Pair::mr(&mut p.a, u64::from(MAX_POSTED_BYTES) + 1, 0x5A);
    let (dst, va) = Pair::mr(&mut p.b, u64::from(len), 0);
    let sge = |length| Sge {
        key: src,
        offset: 0,
        length,
    };
    let remote = RemoteBuffer { va, rkey: dst };
    let too_large =
        p.a.post_write(p.a_qpn, 1, sge(MAX_POSTED_BYTES + 1), remote, None, p.now);
    assert_eq!(
        too_large,
        Err(EngineError::PostTooLarge(MAX_POSTED_BYTES + 1))
    );
    p.a.post_write(p.a_qpn, 2, sge(len), remote, None, p.now)
        .expect("post");
    assert_eq!(p.a.queued_bytes(), u64::from(len));
    assert!(
        MAX_QUEUED_BYTES >= 16 * u64::from(len),
        "the bench's writes fit"
    );
    p.run(|_, _| true);
    let done = p.a.poll_cq(None, 4);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, CompletionStatus::Success);
    assert_eq!(p.a.queued_bytes(), 0, "the ACK gave the bytes back");
    assert_eq!(p.b.mr_read(dst, 0, 8).expect("read"), vec![0x5A; 8]);
}
