//! roce-target's held responses (hold_responses / release_responses) through the pair.

use p2prig_protocol::target::{CompletionStatus, QpSettings, Sge};
use roce_target::engine::RemoteBuffer;
use roce_target::headers::opcode;

use super::pair::*;

#[test]
fn held_responses_go_out_only_on_release_and_in_order() {
    let mut p = Pair::new(QpSettings::default());
    let (src, _) = Pair::mr(&mut p.a, 64, 5);
    let (dst, va) = Pair::mr(&mut p.b, 4096, 0);
    let (read_into, _) = Pair::mr(&mut p.a, 64, 0);
    p.b.hold_responses(p.b_qpn).expect("hold");
    let sge = |key, length| Sge {
        key,
        offset: 0,
        length,
    };
    p.a.post_write(
        p.a_qpn,
        1,
        sge(src, 64),
        RemoteBuffer { va, rkey: dst },
        None,
        p.now,
    )
    .expect("write");
    p.a.post_read(
        p.a_qpn,
        2,
        sge(read_into, 64),
        RemoteBuffer { va, rkey: dst },
        p.now,
    )
    .expect("read");
    let mut answered = 0;
    p.run(|from_a, _| {
        answered += usize::from(!from_a);
        true
    });
    // The responder acted on both requests; nothing came back.
    assert_eq!(p.b.mr_read(dst, 0, 64).expect("dst"), vec![5; 64]);
    assert_eq!(answered, 0, "a held response was sent");
    assert!(
        p.a.poll_cq(None, 4).is_empty(),
        "nothing completes unanswered"
    );
    let (frames, dropped) = p.b.release_responses(p.b_qpn).expect("release");
    assert_eq!(
        (frames, dropped),
        (2, 0),
        "the WRITE's ACK and the READ response"
    );
    let released: Vec<(u8, u32)> = p
        .b_out
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|f| roce_opcode(f))
        .collect();
    assert_eq!(
        released.iter().map(|r| r.0).collect::<Vec<_>>(),
        [opcode::ACKNOWLEDGE, opcode::READ_RESPONSE_ONLY]
    );
    p.run(|_, _| true);
    let done = p.a.poll_cq(None, 4);
    assert_eq!(done.len(), 2, "{done:?}");
    assert!(done.iter().all(|c| c.status == CompletionStatus::Success));
    assert_eq!(
        p.a.mr_read(read_into, 0, 64).expect("read back"),
        vec![5; 64]
    );
    // Released: answers go out at once again, and a second release is refused.
    assert!(p.b.release_responses(p.b_qpn).is_err());
    assert!(p.b.hold_responses(0x00ff_ffff).is_err(), "no such QP");
}
