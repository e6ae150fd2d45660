//! RDMA verbs in the guest through the agent: rxe contexts, PDs, CQs, RC QPs brought to RTS
//! (loopback pairs on rxe0), MRs over agent memory or a dma-buf, posting and polling.

use anyhow::{bail, Result};

use p2prig_protocol::agent::{Access, AgentOp, AgentReply, Completion, SendOpcode};
use p2prig_protocol::wire::ErrorReply;

use crate::rig::Rig;

use super::*;

/// Two connected RC QPs on rxe0: A posts, B's side owns the target MR.
pub(crate) struct Loopback {
    pub(crate) pd: u32,
    pub(crate) cq_a: u32,
    pub(crate) qp_a: u32,
    pub(crate) qp_b: u32,
    /// A's 8-byte source buffer.
    pub(crate) src_mr: u32,
}

impl Loopback {
    pub(crate) fn pd(&self) -> u32 {
        self.pd
    }
}

pub(crate) fn rdma_up(rig: &mut Rig, held: &mut Held) -> Result<u32> {
    ok(
        rig.agent_call(
            AgentOp::NetUp {
                ifname: "eth0".into(),
                addr: GUEST_IP.into(),
                prefix: 24,
            },
            RPC,
        )?,
        "eth0 up",
    )?;
    rxe_open(rig, "rxe0", "eth0", held)
}

/// Adds rxe device `name` on `netdev` unless it exists, and opens it.
pub(crate) fn rxe_open(rig: &mut Rig, name: &str, netdev: &str, held: &mut Held) -> Result<u32> {
    let add = AgentOp::RdmaLinkAdd {
        name: name.into(),
        netdev: netdev.into(),
    };
    match rig.agent_call(add, RPC)? {
        Ok(_) => {}
        Err(e) if e.errno == libc::EEXIST => {}
        Err(e) => bail!("rdma link add {name} netdev {netdev}: {e}"),
    }
    let open = AgentOp::RdmaOpen { name: name.into() };
    match ok(rig.agent_call(open, RPC)?, &format!("open {name}"))? {
        AgentReply::RdmaContext { context } => {
            held.push(AgentOp::RdmaClose { context });
            Ok(context)
        }
        other => bail!("open {name}: unexpected {other:?}"),
    }
}

pub(crate) fn connect_pair(rig: &mut Rig, context: u32, held: &mut Held) -> Result<Loopback> {
    let pd = alloc_pd(rig, context, held)?;
    connect_pair_on(rig, context, pd, held)
}

pub(crate) fn alloc_pd(rig: &mut Rig, context: u32, held: &mut Held) -> Result<u32> {
    match ok(
        rig.agent_call(AgentOp::AllocPd { context }, RPC)?,
        "alloc PD",
    )? {
        AgentReply::Pd { pd } => {
            held.push(AgentOp::DeallocPd { pd });
            Ok(pd)
        }
        other => bail!("pd: unexpected {other:?}"),
    }
}

/// The RoCEv2 IPv4 GID of rxe0's port 1.
pub(crate) fn rxe_gid(rig: &mut Rig, context: u32) -> Result<String> {
    match ok(
        rig.agent_call(AgentOp::RdmaGid { context }, RPC)?,
        "rxe0 GID",
    )? {
        AgentReply::Gid { gid, .. } => Ok(gid),
        other => bail!("gid: unexpected {other:?}"),
    }
}

pub(crate) fn create_cq(rig: &mut Rig, context: u32, held: &mut Held) -> Result<u32> {
    match ok(
        rig.agent_call(
            AgentOp::CreateCq {
                context,
                entries: 64,
            },
            RPC,
        )?,
        "create CQ",
    )? {
        AgentReply::Cq { cq } => {
            held.push(AgentOp::DestroyCq { cq });
            Ok(cq)
        }
        other => bail!("cq: unexpected {other:?}"),
    }
}

/// An RC QP on `pd` with `cq` for both queues; returns (handle, qpn).
pub(crate) fn create_qp(rig: &mut Rig, pd: u32, cq: u32, held: &mut Held) -> Result<(u32, u32)> {
    let op = AgentOp::CreateQp {
        pd,
        send_cq: cq,
        recv_cq: cq,
        max_send_wr: 16,
        max_recv_wr: 16,
    };
    match ok(rig.agent_call(op, RPC)?, "create QP")? {
        AgentReply::Qp { qp, qpn } => {
            held.push(AgentOp::DestroyQp { qp });
            Ok((qp, qpn))
        }
        other => bail!("qp: unexpected {other:?}"),
    }
}

/// Where an RC QP sends and how patiently: the remote end and our own send PSN.
pub(crate) struct RcPath {
    pub(crate) remote_qpn: u32,
    pub(crate) remote_psn: u32,
    pub(crate) remote_gid: String,
    pub(crate) path_mtu: u32,
    pub(crate) psn: u32,
    /// IBTA local ACK timeout exponent.
    pub(crate) timeout: u8,
    /// Both the transport and the RNR retry count.
    pub(crate) retries: u8,
}

/// RESET -> INIT -> RTR -> RTS, with local write and remote read/write access.
pub(crate) fn qp_to_rts(rig: &mut Rig, qp: u32, path: &RcPath) -> Result<()> {
    let access = vec![Access::LocalWrite, Access::RemoteWrite, Access::RemoteRead];
    ok(
        rig.agent_call(AgentOp::QpInit { qp, access }, RPC)?,
        "QP INIT",
    )?;
    let rtr = AgentOp::QpRtr {
        qp,
        remote_qpn: path.remote_qpn,
        remote_psn: path.remote_psn,
        remote_gid: path.remote_gid.clone(),
        path_mtu: path.path_mtu,
        gid_index: None,
        max_dest_rd_atomic: 1,
        min_rnr_timer: 12,
    };
    ok(rig.agent_call(rtr, RPC)?, "QP RTR")?;
    let rts = AgentOp::QpRts {
        qp,
        psn: path.psn,
        timeout: path.timeout,
        retry_cnt: path.retries,
        rnr_retry: path.retries,
        max_rd_atomic: 1,
    };
    ok(rig.agent_call(rts, RPC)?, "QP RTS")?;
    Ok(())
}

/// A connected pair on `pd`, so MRs of that PD stay reachable from its QPs.
pub(crate) fn connect_pair_on(
    rig: &mut Rig,
    context: u32,
    pd: u32,
    held: &mut Held,
) -> Result<Loopback> {
    let gid = rxe_gid(rig, context)?;
    let cqs = [
        create_cq(rig, context, held)?,
        create_cq(rig, context, held)?,
    ];
    let mut qps = Vec::new();
    for &cq in &cqs {
        qps.push(create_qp(rig, pd, cq, held)?);
    }
    for (i, &(qp, _)) in qps.iter().enumerate() {
        let path = RcPath {
            remote_qpn: qps[1 - i].1,
            remote_psn: 100,
            remote_gid: gid.clone(),
            path_mtu: 1024,
            psn: 100,
            timeout: 10,
            retries: 2,
        };
        qp_to_rts(rig, qp, &path)?;
    }
    let src_mr = reg_mr(rig, held, pd, 4096)?.mr;
    Ok(Loopback {
        pd,
        cq_a: cqs[0],
        qp_a: qps[0].0,
        qp_b: qps[1].0,
        src_mr,
    })
}

/// A fresh QP pair on the same PD (after a revoke the old ones are in error).
pub(crate) fn reconnect(
    rig: &mut Rig,
    context: u32,
    old: &Loopback,
    held: &mut Held,
) -> Result<Loopback> {
    for qp in [old.qp_a, old.qp_b] {
        let _ = rig.agent_call(AgentOp::DestroyQp { qp }, RPC)?;
    }
    // Same PD: the MR under test belongs to it.
    connect_pair_on(rig, context, old.pd, held)
}

/// An MR over agent memory.
pub(crate) struct AgentMr {
    pub(crate) mr: u32,
    pub(crate) addr: u64,
    pub(crate) rkey: u32,
}

/// Registers `length` bytes of agent memory with local and remote read/write access.
pub(crate) fn reg_mr(rig: &mut Rig, held: &mut Held, pd: u32, length: u64) -> Result<AgentMr> {
    let op = AgentOp::RegMr {
        pd,
        length,
        access: vec![Access::LocalWrite, Access::RemoteWrite, Access::RemoteRead],
    };
    match ok(rig.agent_call(op, RPC)?, "reg_mr")? {
        AgentReply::Mr { mr, addr, rkey, .. } => {
            held.push(AgentOp::DeregMr { mr });
            Ok(AgentMr { mr, addr, rkey })
        }
        other => bail!("reg_mr: unexpected {other:?}"),
    }
}

/// Registers `length` bytes at `offset` of the dma-buf as an MR; returns (mr, rkey).
pub(crate) fn reg_dmabuf(
    rig: &mut Rig,
    held: &mut Held,
    pd: u32,
    dmabuf: u32,
    offset: u64,
    length: u64,
) -> Result<std::result::Result<(u32, u32), String>> {
    Ok(
        match reg_dmabuf_reply(rig, held, pd, dmabuf, offset, length)? {
            Ok(AgentReply::Mr { mr, rkey, .. }) => Ok((mr, rkey)),
            Ok(other) => Err(format!("unexpected {other:?}")),
            Err(e) => Err(e.to_string()),
        },
    )
}

/// [`reg_dmabuf`] answering the agent's reply as it is, so a refusal keeps its errno; a
/// registered MR is released with the rest of `held`.
pub(crate) fn reg_dmabuf_reply(
    rig: &mut Rig,
    held: &mut Held,
    pd: u32,
    dmabuf: u32,
    offset: u64,
    length: u64,
) -> Result<std::result::Result<AgentReply, ErrorReply>> {
    let op = AgentOp::RegDmabufMr {
        pd,
        dmabuf,
        offset,
        length,
        iova: 0,
        access: vec![Access::LocalWrite, Access::RemoteWrite, Access::RemoteRead],
    };
    let reply = rig.agent_call(op, RPC)?;
    if let Ok(AgentReply::Mr { mr, .. }) = &reply {
        held.push(AgentOp::DeregMr { mr: *mr });
    }
    Ok(reply)
}

/// Posts an RDMA op of `data.len()` bytes from A's buffer and waits for its completion.
pub(crate) fn post(
    rig: &mut Rig,
    lb: &Loopback,
    opcode: SendOpcode,
    data: &[u8],
    remote_addr: u64,
    rkey: u32,
    wr_id: u64,
) -> Result<Option<Completion>> {
    let id = post_start(rig, lb, opcode, data, remote_addr, rkey, wr_id)?;
    ok(rig.agent_finish(id, RPC)?, "post_send")?;
    poll_one(rig, lb.cq_a, 5000)
}

pub(crate) fn post_start(
    rig: &mut Rig,
    lb: &Loopback,
    opcode: SendOpcode,
    data: &[u8],
    remote_addr: u64,
    rkey: u32,
    wr_id: u64,
) -> Result<u64> {
    if opcode == SendOpcode::RdmaWrite {
        let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
        ok(
            rig.agent_call(
                AgentOp::MrWrite {
                    mr: lb.src_mr,
                    offset: 0,
                    data: hex,
                },
                RPC,
            )?,
            "fill the source buffer",
        )?;
    }
    let length = u32::try_from(data.len())?;
    rig.agent_start(AgentOp::PostSend {
        qp: lb.qp_a,
        wr_id,
        opcode,
        mr: Some(lb.src_mr),
        offset: 0,
        length,
        remote_addr,
        rkey,
        signaled: true,
    })
}

pub(crate) fn poll_one(rig: &mut Rig, cq: u32, timeout_ms: u64) -> Result<Option<Completion>> {
    Ok(poll_one_stamped(rig, cq, timeout_ms)?.0)
}

/// [`poll_one`] with the guest's CLOCK_MONOTONIC when the poll returned.
pub(crate) fn poll_one_stamped(
    rig: &mut Rig,
    cq: u32,
    timeout_ms: u64,
) -> Result<(Option<Completion>, Option<u64>)> {
    let id = rig.agent_start(AgentOp::PollCq {
        cq,
        count: 1,
        timeout_ms,
    })?;
    let (reply, done_ns) = rig.agent_finish_stamped(id, RPC)?;
    match ok(reply, "poll CQ")? {
        AgentReply::Completions { mut completions } => Ok((completions.pop(), done_ns)),
        other => bail!("poll: unexpected {other:?}"),
    }
}

pub(crate) fn status_text(c: &Option<Completion>) -> String {
    match c {
        Some(c) => format!("status {} ({})", c.status, c.status_name),
        None => "no completion".into(),
    }
}
