//! The remote RDMA peer: roce-target's control calls, a QP connected to rxe0 over RoCEv2,
//! its MRs, posts and completion polling.

use anyhow::{anyhow, bail, Result};

use p2prig_protocol::agent::AgentOp;
use p2prig_protocol::event::Event;
use p2prig_protocol::target::{
    Completion as TargetCompletion, MrInfo, QpSettings, Sge, TargetOp, TargetReply,
};

use crate::rig::Rig;

use super::*;

pub(crate) fn target_call(rig: &mut Rig, op: TargetOp) -> Result<TargetReply> {
    let desc = format!("{op:?}");
    rig.target_call(op)
        .and_then(|r| r.map_err(|e| anyhow!("{e}")))
        .map_err(|e| anyhow!("roce-target {desc}: {e:#}"))
}

/// The guest QP's local ACK timeout towards roce-target: 4.096 us * 2^14, about 67 ms.
pub(crate) const TARGET_ACK_TIMEOUT: u8 = 14;

/// Connects a guest RC QP with a fresh roce-target QP (parameters exchanged here, out of
/// band, as the design has it: no RDMA CM). Returns the guest QP and CQ handles and the
/// target's QPN.
pub(crate) fn connect_to_target(
    rig: &mut Rig,
    context: u32,
    pd: u32,
    held: &mut Held,
) -> Result<(u32, u32, u32)> {
    connect_to_target_timed(rig, context, pd, held, TARGET_ACK_TIMEOUT)
}

/// [`connect_to_target`] with the guest QP's local ACK timeout exponent (IBTA 9.7.6.1.3).
pub(crate) fn connect_to_target_timed(
    rig: &mut Rig,
    context: u32,
    pd: u32,
    held: &mut Held,
    ack_timeout: u8,
) -> Result<(u32, u32, u32)> {
    let endpoint = match target_call(rig, TargetOp::CreateQp(QpSettings::default()))? {
        TargetReply::Qp(endpoint) => endpoint,
        other => bail!("roce-target create_qp: unexpected {other:?}"),
    };
    // A permanent neighbour entry: rxe's RTR needs the peer's MAC, and ARP timing is not
    // what this scenario is about.
    ok(
        rig.agent_call(
            AgentOp::NeighAdd {
                ifname: "eth0".into(),
                ip: endpoint.ip.clone(),
                mac: endpoint.mac.clone(),
            },
            RPC,
        )?,
        "neighbour entry for roce-target",
    )?;
    let guest_gid = rxe_gid(rig, context)?;
    let cq = create_cq(rig, context, held)?;
    let (qp, qpn) = create_qp(rig, pd, cq, held)?;
    let path = RcPath {
        remote_qpn: endpoint.qpn,
        remote_psn: endpoint.psn,
        remote_gid: endpoint.gid.clone(),
        path_mtu: endpoint.path_mtu,
        psn: 200,
        timeout: ack_timeout,
        retries: 7,
    };
    qp_to_rts(rig, qp, &path)?;
    let connect = TargetOp::Connect {
        qpn: endpoint.qpn,
        remote_qpn: qpn,
        remote_psn: 200,
        remote_gid: Some(guest_gid),
        remote_ip: None,
        remote_mac: None,
    };
    target_call(rig, connect)?;
    Ok((qp, cq, endpoint.qpn))
}

/// An RDMA WRITE of `data` from a target MR to (`remote_va`, `rkey`) in the guest; returns
/// the target's completion and when (CLOCK_MONOTONIC) the target had posted it.
pub(crate) fn target_write(
    rig: &mut Rig,
    target_qpn: u32,
    data: &[u8],
    remote_va: u64,
    rkey: u32,
    wr_id: u64,
) -> Result<(Option<TargetCompletion>, u64)> {
    let posted = target_post_write(rig, target_qpn, data, remote_va, rkey, wr_id)?;
    let posted_ns = posted.posted_ns;
    Ok((target_complete(rig, posted)?, posted_ns))
}

/// roce-target writes `value` (8 bytes) at SQ1TDBL through the doorbell MR `rkey`; returns
/// its completion and the doorbell-page events the device logged meanwhile.
pub(crate) fn target_ring(
    rig: &mut Rig,
    target_qpn: u32,
    rkey: u32,
    value: u64,
    wr_id: u64,
) -> Result<(Option<TargetCompletion>, Vec<Event>)> {
    let since = last_seq(rig)?;
    let (completion, _) = target_write(
        rig,
        target_qpn,
        &value.to_le_bytes(),
        SQ1TDBL - PAGE,
        rkey,
        wr_id,
    )?;
    Ok((completion, doorbell_events(rig, since)?))
}

/// A target RDMA WRITE on the wire, its completion not yet polled.
pub(crate) struct TargetPosted {
    pub(crate) qpn: u32,
    /// The target MR holding the source bytes.
    pub(crate) key: u32,
    pub(crate) posted_ns: u64,
}

pub(crate) fn target_post_write(
    rig: &mut Rig,
    target_qpn: u32,
    data: &[u8],
    remote_va: u64,
    rkey: u32,
    wr_id: u64,
) -> Result<TargetPosted> {
    let length = u64::try_from(data.len())?;
    let key = match target_call(
        rig,
        TargetOp::RegisterMr {
            length,
            access: None,
        },
    )? {
        TargetReply::Mr(mr) => mr.key,
        other => bail!("roce-target register_mr: unexpected {other:?}"),
    };
    let data_hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
    target_call(
        rig,
        TargetOp::MrWrite {
            key,
            offset: 0,
            data_hex,
            length: None,
        },
    )?;
    let local = Sge {
        key,
        offset: 0,
        length: u32::try_from(data.len())?,
    };
    target_call(
        rig,
        TargetOp::PostWrite {
            qpn: target_qpn,
            wr_id,
            local,
            remote_va,
            remote_rkey: rkey,
            imm: None,
        },
    )?;
    Ok(TargetPosted {
        qpn: target_qpn,
        key,
        posted_ns: crate::rig::client::mono_ns(),
    })
}

pub(crate) fn target_complete(
    rig: &mut Rig,
    posted: TargetPosted,
) -> Result<Option<TargetCompletion>> {
    let completion = target_poll(rig, posted.qpn);
    let _ = target_call(rig, TargetOp::DeregisterMr { key: posted.key });
    completion
}

pub(crate) fn target_mr(rig: &mut Rig, length: u64) -> Result<u32> {
    Ok(target_mr_info(rig, length)?.key)
}

/// A fresh target MR of `length` bytes with every access right: its key and address.
pub(crate) fn target_mr_info(rig: &mut Rig, length: u64) -> Result<MrInfo> {
    match target_call(
        rig,
        TargetOp::RegisterMr {
            length,
            access: None,
        },
    )? {
        TargetReply::Mr(mr) => Ok(mr),
        other => bail!("roce-target register_mr: unexpected {other:?}"),
    }
}

pub(crate) fn target_poll(rig: &mut Rig, qpn: u32) -> Result<Option<TargetCompletion>> {
    target_poll_within(rig, qpn, 5000)
}

/// The next completion of target QP `qpn`, waiting up to `wait_ms` for it.
pub(crate) fn target_poll_within(
    rig: &mut Rig,
    qpn: u32,
    wait_ms: u64,
) -> Result<Option<TargetCompletion>> {
    match target_call(
        rig,
        TargetOp::PollCq {
            qpn: Some(qpn),
            max: Some(1),
            wait_ms,
        },
    )? {
        TargetReply::Completions { mut completions } => Ok(completions.pop()),
        other => bail!("roce-target poll_cq: unexpected {other:?}"),
    }
}
