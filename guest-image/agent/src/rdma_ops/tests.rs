//! Tests of rdma_ops against the fake platform (crate::fake).
use p2prig_protocol::agent::{Access, AgentOp, Completion, SendOpcode};
use p2prig_protocol::wire::{decode_line, Outcome, Request};

use super::*;
use crate::fake::{err, ok, FakePlatform};
use crate::rdma::access_bits;

fn agent() -> Agent<FakePlatform> {
    Agent::new(FakePlatform::default())
}

fn op(line: &str) -> AgentOp {
    match decode_line::<Request<AgentOp>>(line.as_bytes()) {
        Ok(request) => request.op,
        Err(error) => panic!("{line}: {error}"),
    }
}

#[test]
fn network_requests_parse_and_reach_the_platform() {
    let agent = agent();
    ok(
        &agent,
        op(r#"{"id":1,"op":"net_up","ifname":"eth0","addr":"10.0.2.15","prefix":24}"#),
    );
    ok(
        &agent,
        op(
            r#"{"id":2,"op":"neigh_add","ifname":"eth0","ip":"10.0.2.2","mac":"52:54:00:12:34:56"}"#,
        ),
    );
    ok(
        &agent,
        op(r#"{"id":3,"op":"rdma_link_add","name":"rxe0","netdev":"eth0"}"#),
    );
    let again = err(
        &agent,
        op(r#"{"id":4,"op":"rdma_link_add","name":"rxe0","netdev":"eth0"}"#),
    );
    assert_eq!(again.errno, libc::EEXIST, "the kernel's errno comes back");
    assert!(
        again
            .message
            .starts_with("rdma_link_add rxe0 type rxe netdev eth0: "),
        "{}",
        again.message
    );
    assert_eq!(
        *lock(&agent.platform.net_calls),
        [
            "net_up eth0 10.0.2.15/24",
            "neigh_add eth0 10.0.2.2 [52, 54, 00, 12, 34, 56]",
            "rdma_link_add rxe0 eth0",
        ]
    );
}

#[test]
fn bad_network_arguments_are_einval_and_reach_nothing() {
    let agent = agent();
    for bad in [
        r#"{"id":1,"op":"net_up","ifname":"eth0","addr":"10.0.2.315","prefix":24}"#,
        r#"{"id":1,"op":"net_up","ifname":"eth0","addr":"10.0.2.15","prefix":33}"#,
        r#"{"id":1,"op":"net_up","ifname":"../eth0","addr":"10.0.2.15","prefix":24}"#,
        r#"{"id":1,"op":"neigh_add","ifname":"eth0","ip":"10.0.2.2","mac":"52:54:00:12:34"}"#,
        r#"{"id":1,"op":"neigh_add","ifname":"eth0","ip":"::1","mac":"52:54:00:12:34:56"}"#,
        r#"{"id":1,"op":"rdma_link_add","name":"","netdev":"eth0"}"#,
        r#"{"id":1,"op":"rdma_open","name":"rxe0/../x"}"#,
    ] {
        assert_eq!(err(&agent, op(bad)).errno, libc::EINVAL, "{bad}");
    }
    assert!(lock(&agent.platform.net_calls).is_empty());
    assert!(agent.platform.rdma.calls().is_empty());
}

#[test]
fn loopback_setup_converts_arguments_to_verbs_numbers() {
    let agent = agent();
    assert_eq!(
        ok(&agent, op(r#"{"id":1,"op":"rdma_open","name":"rxe0"}"#)),
        AgentReply::RdmaContext { context: 1 }
    );
    assert_eq!(
        ok(&agent, op(r#"{"id":1,"op":"rdma_gid","context":1}"#)),
        AgentReply::Gid {
            gid: "::ffff:10.0.2.15".into(),
            index: 1
        }
    );
    assert_eq!(
        ok(&agent, op(r#"{"id":1,"op":"alloc_pd","context":1}"#)),
        AgentReply::Pd { pd: 2 }
    );
    assert_eq!(
        ok(&agent, op(r#"{"id":1,"op":"create_cq","context":1}"#)),
        AgentReply::Cq { cq: 3 }
    );
    assert_eq!(
        ok(
            &agent,
            op(r#"{"id":1,"op":"create_qp","pd":2,"send_cq":3,"recv_cq":3}"#)
        ),
        AgentReply::Qp { qp: 4, qpn: 0x14 }
    );
    ok(&agent, op(r#"{"id":1,"op":"qp_init","qp":4}"#));
    ok(
        &agent,
        op(
            r#"{"id":1,"op":"qp_rtr","qp":4,"remote_qpn":17,"remote_psn":100,"remote_gid":"10.0.2.15"}"#,
        ),
    );
    ok(&agent, op(r#"{"id":1,"op":"qp_rts","qp":4,"psn":200}"#));
    let calls = agent.platform.rdma.calls();
    assert_eq!(calls[2], "create_cq 1 64", "default CQ size");
    assert_eq!(calls[3], "create_qp 2 3 3 16 16", "default queue depths");
    assert_eq!(
        calls[4],
        format!(
            "modify_qp 4 {:?}",
            Transition::Init {
                access: access_bits::REMOTE_WRITE
                    | access_bits::REMOTE_READ
                    | access_bits::REMOTE_ATOMIC
            }
        )
    );
    let Ok(gid) = parse_gid("::ffff:10.0.2.15") else {
        panic!("gid")
    };
    assert_eq!(
        calls[5],
        format!(
            "modify_qp 4 {:?}",
            Transition::Rtr(RtrParams {
                remote_qpn: 17,
                remote_psn: 100,
                remote_gid: gid,
                path_mtu: 3,
                gid_index: 1,
                max_dest_rd_atomic: 1,
                min_rnr_timer: 12,
            })
        )
    );
    assert_eq!(
        calls[6],
        format!(
            "modify_qp 4 {:?}",
            Transition::Rts(RtsParams {
                psn: 200,
                timeout: 14,
                retry_cnt: 7,
                rnr_retry: 7,
                max_rd_atomic: 1,
            })
        )
    );
}

#[test]
fn qp_reset_and_qp_error_reach_the_provider_as_their_states() {
    let agent = agent();
    ok(&agent, op(r#"{"id":1,"op":"qp_error","qp":4}"#));
    ok(&agent, op(r#"{"id":2,"op":"qp_reset","qp":4}"#));
    assert_eq!(
        agent.platform.rdma.calls(),
        [
            format!("modify_qp 4 {:?}", Transition::Error),
            format!("modify_qp 4 {:?}", Transition::Reset),
        ]
    );
}

#[test]
fn qp_arguments_out_of_range_are_refused_before_verbs() {
    let agent = agent();
    for bad in [
        r#"{"id":1,"op":"qp_rtr","qp":4,"remote_qpn":16777216,"remote_psn":0,"remote_gid":"10.0.2.2"}"#,
        r#"{"id":1,"op":"qp_rtr","qp":4,"remote_qpn":17,"remote_psn":16777216,"remote_gid":"10.0.2.2"}"#,
        r#"{"id":1,"op":"qp_rtr","qp":4,"remote_qpn":17,"remote_psn":0,"remote_gid":"nope"}"#,
        r#"{"id":1,"op":"qp_rtr","qp":4,"remote_qpn":17,"remote_psn":0,"remote_gid":"10.0.2.2","path_mtu":1500}"#,
        r#"{"id":1,"op":"qp_rtr","qp":4,"remote_qpn":17,"remote_psn":0,"remote_gid":"10.0.2.2","min_rnr_timer":32}"#,
        r#"{"id":1,"op":"qp_rts","qp":4,"psn":16777216}"#,
        r#"{"id":1,"op":"qp_rts","qp":4,"psn":1,"retry_cnt":8}"#,
        r#"{"id":1,"op":"qp_rts","qp":4,"psn":1,"timeout":32}"#,
        r#"{"id":1,"op":"create_cq","context":1,"entries":0}"#,
        r#"{"id":1,"op":"create_qp","pd":1,"send_cq":1,"recv_cq":1,"max_send_wr":100000}"#,
        r#"{"id":1,"op":"poll_cq","cq":1,"count":0}"#,
        r#"{"id":1,"op":"poll_cq","cq":1,"count":1,"timeout_ms":600001}"#,
    ] {
        assert_eq!(err(&agent, op(bad)).errno, libc::EINVAL, "{bad}");
    }
    assert!(agent.platform.rdma.calls().is_empty());
    let line = br#"{"id":5,"op":"qp_init","qp":4,"access":["remote_write","everything"]}"#;
    let (reply, _) = crate::rpc::answer_line(&agent, line);
    assert_eq!(reply.id, 5);
    assert!(
        matches!(reply.outcome, Outcome::Err(ref e) if e.errno == libc::EINVAL),
        "unknown access right: {reply:?}"
    );
}

#[test]
fn agent_memory_mrs_are_filled_read_and_bounded() {
    let agent = agent();
    let reply = ok(&agent, op(r#"{"id":1,"op":"reg_mr","pd":1,"length":16}"#));
    assert_eq!(
        reply,
        AgentReply::Mr {
            mr: 1,
            lkey: 1,
            rkey: 0x100,
            addr: 0x7000_0000,
            length: 16
        }
    );
    assert_eq!(
        agent.platform.rdma.calls()[0],
        format!(
            "reg_mr 1 16 {:#x}",
            access_bits::LOCAL_WRITE | access_bits::REMOTE_WRITE | access_bits::REMOTE_READ
        )
    );
    ok(
        &agent,
        op(r#"{"id":1,"op":"mr_write","mr":1,"offset":8,"data":"0123456789ABCDEF"}"#),
    );
    assert_eq!(
        ok(
            &agent,
            op(r#"{"id":1,"op":"mr_read","mr":1,"offset":6,"length":6}"#)
        ),
        AgentReply::Bytes {
            data: "000001234567".into()
        }
    );
    for (bad, why) in [
        (
            r#"{"id":1,"op":"mr_write","mr":1,"offset":9,"data":"0123456789abcdef"}"#,
            "past the end",
        ),
        (
            r#"{"id":1,"op":"mr_write","mr":1,"offset":0,"data":"012"}"#,
            "odd",
        ),
        (
            r#"{"id":1,"op":"mr_read","mr":1,"offset":18446744073709551615,"length":2}"#,
            "past the end",
        ),
        (
            r#"{"id":1,"op":"mr_read","mr":1,"offset":0,"length":1048577}"#,
            "more than",
        ),
        (r#"{"id":1,"op":"reg_mr","pd":1,"length":0}"#, "not in"),
        (
            r#"{"id":1,"op":"reg_mr","pd":1,"length":268435457}"#,
            "not in",
        ),
        (
            r#"{"id":1,"op":"post_send","qp":1,"wr_id":1,"opcode":"rdma_write","mr":1,"offset":8,"length":9}"#,
            "past the end",
        ),
        (
            r#"{"id":1,"op":"post_send","qp":1,"wr_id":1,"opcode":"send","length":4}"#,
            "without an mr",
        ),
        (
            r#"{"id":1,"op":"post_recv","qp":1,"wr_id":1,"mr":1,"offset":16,"length":1}"#,
            "past the end",
        ),
    ] {
        let error = err(&agent, op(bad));
        assert_eq!(error.errno, libc::EINVAL, "{bad}");
        assert!(error.message.contains(why), "{} lacks {why}", error.message);
    }
    assert_eq!(
        err(
            &agent,
            op(r#"{"id":1,"op":"mr_read","mr":9,"offset":0,"length":1}"#)
        )
        .errno,
        libc::EBADF
    );
    assert_eq!(
        agent.platform.rdma.calls().len(),
        1,
        "nothing but reg_mr reached verbs"
    );
}

#[test]
fn posts_carry_work_request_fields_and_completions_come_back() {
    let agent = agent();
    ok(&agent, op(r#"{"id":1,"op":"reg_mr","pd":1,"length":8}"#));
    ok(
        &agent,
        op(
            r#"{"id":1,"op":"post_send","qp":4,"wr_id":7,"opcode":"rdma_write","mr":1,"length":8,"remote_addr":4096,"rkey":512}"#,
        ),
    );
    ok(
        &agent,
        op(r#"{"id":1,"op":"post_send","qp":4,"wr_id":8,"opcode":"rdma_read","signaled":false}"#),
    );
    ok(
        &agent,
        op(r#"{"id":1,"op":"post_recv","qp":4,"wr_id":9,"mr":1,"length":8}"#),
    );
    let calls = agent.platform.rdma.calls();
    let write = SendRequest {
        wr_id: 7,
        opcode: SendOpcode::RdmaWrite,
        sge: Some(Sge {
            mr: 1,
            offset: 0,
            length: 8,
        }),
        remote_addr: 4096,
        rkey: 512,
        signaled: true,
    };
    assert_eq!(calls[1], format!("post_send 4 {write:?}"));
    let read = SendRequest {
        wr_id: 8,
        opcode: SendOpcode::RdmaRead,
        sge: None,
        remote_addr: 0,
        rkey: 0,
        signaled: false,
    };
    assert_eq!(calls[2], format!("post_send 4 {read:?}"));
    let completion = Completion {
        wr_id: 7,
        status: 0,
        status_name: "success".into(),
        vendor_err: 0,
        opcode: 1,
        opcode_name: "rdma_write".into(),
        byte_len: 8,
        qp_num: 0x11,
    };
    lock(&agent.platform.rdma.completions).push(completion.clone());
    assert_eq!(
        ok(
            &agent,
            op(r#"{"id":1,"op":"poll_cq","cq":3,"count":2,"timeout_ms":5}"#)
        ),
        AgentReply::Completions {
            completions: vec![completion]
        }
    );
}

#[test]
fn dmabuf_mrs_pass_arguments_through_and_return_the_kernel_errno() {
    let agent = agent();
    let error = err(
        &agent,
        op(r#"{"id":1,"op":"reg_dmabuf_mr","pd":1,"dmabuf":1,"offset":0,"length":4096,"iova":0}"#),
    );
    assert_eq!(
        error.errno,
        libc::EBADF,
        "no such dma-buf: {}",
        error.message
    );
    // A memfd stands in for an exported dma-buf.
    // SAFETY: memfd_create with a static NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"fake-dmabuf".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd owned by nobody else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let handle = lock(&agent.dmabufs).insert(fd);
    *lock(&agent.platform.rdma.dmabuf_errno) = Some(libc::EOPNOTSUPP);
    let line = format!(
        r#"{{"id":1,"op":"reg_dmabuf_mr","pd":1,"dmabuf":{handle},"offset":4096,"length":12288,"iova":65536,"access":["local_write","remote_write"]}}"#
    );
    let error = err(&agent, op(&line));
    assert_eq!(error.errno, libc::EOPNOTSUPP);
    assert!(
        error
            .message
            .starts_with("reg_dmabuf_mr pd 1 dmabuf 1 offset 0x1000"),
        "{}",
        error.message
    );
    *lock(&agent.platform.rdma.dmabuf_errno) = None;
    assert_eq!(
        ok(&agent, op(&line)),
        AgentReply::Mr {
            mr: 2,
            lkey: 2,
            rkey: 0x200,
            addr: 65536,
            length: 12288
        }
    );
    assert_eq!(
        agent.platform.rdma.calls()[1],
        format!(
            "reg_dmabuf_mr 1 0x1000 0x3000 0x10000 {:#x}",
            access_bits::LOCAL_WRITE | access_bits::REMOTE_WRITE
        )
    );
    let error = err(
        &agent,
        op(r#"{"id":1,"op":"mr_read","mr":2,"offset":0,"length":4}"#),
    );
    assert_eq!(error.errno, libc::EINVAL);
    assert!(error.message.contains("dma-buf MR"), "{}", error.message);
    ok(&agent, op(r#"{"id":1,"op":"dereg_mr","mr":2}"#));
    assert_eq!(
        err(&agent, op(r#"{"id":1,"op":"dereg_mr","mr":2}"#)).errno,
        libc::EBADF
    );
    let _ = Access::RemoteAtomic;
}
