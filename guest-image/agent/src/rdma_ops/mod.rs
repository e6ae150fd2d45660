//! The networking and verbs requests: argument checks and conversions, then the platform's
//! [`crate::rdma::Rdma`]. Limits keep a wrong argument from exhausting the small guest.

use std::os::fd::AsRawFd;
use std::time::Duration;

use p2prig_protocol::agent::{AgentOp, AgentReply};

use crate::dispatch::{lock, Agent, MAX_SLEEP_MS};
use crate::error::{AgentError, Result};
use crate::net::{check_ifname, parse_ipv4, parse_mac};
use crate::platform::Platform;
use crate::rdma::{
    access_mask, check_range, format_gid, from_hex, mtu_enum, parse_gid, RtrParams, RtsParams,
    SendRequest, Sge, Transition,
};

/// Largest agent-memory MR (the guest has little RAM).
pub const MAX_MR_LENGTH: u64 = 256 << 20;
/// Largest mr_read/mr_write (its hex must fit a reply line).
pub const MAX_MR_IO: u64 = 1 << 20;
/// Most completions one poll_cq returns.
pub const MAX_POLL: u32 = 1024;
/// Largest CQ and QP queue depths the agent asks for.
pub const MAX_CQ_ENTRIES: u32 = 1 << 16;
pub const MAX_QUEUE_DEPTH: u32 = 1 << 14;
/// PSNs and QP numbers are 24 bits (IBTA 9.2 BTH).
const MAX_24_BITS: u32 = 0x00ff_ffff;

pub fn describe(op: &AgentOp) -> String {
    match op {
        AgentOp::NetUp {
            ifname,
            addr,
            prefix,
        } => format!("net_up {ifname} {addr}/{prefix}"),
        AgentOp::NeighAdd { ifname, ip, mac } => format!("neigh_add {ip} lladdr {mac} dev {ifname}"),
        AgentOp::RdmaLinkAdd { name, netdev } => {
            format!("rdma_link_add {name} type rxe netdev {netdev}")
        }
        AgentOp::RdmaOpen { name } => format!("rdma_open {name}"),
        AgentOp::RdmaClose { context } => format!("rdma_close context {context}"),
        AgentOp::RdmaGid { context } => format!("rdma_gid context {context}"),
        AgentOp::AllocPd { context } => format!("alloc_pd context {context}"),
        AgentOp::DeallocPd { pd } => format!("dealloc_pd pd {pd}"),
        AgentOp::CreateCq { context, entries } => {
            format!("create_cq context {context} entries {entries}")
        }
        AgentOp::DestroyCq { cq } => format!("destroy_cq cq {cq}"),
        AgentOp::CreateQp {
            pd,
            send_cq,
            recv_cq,
            max_send_wr,
            max_recv_wr,
        } => format!(
            "create_qp pd {pd} send_cq {send_cq} recv_cq {recv_cq} max_send_wr {max_send_wr} max_recv_wr {max_recv_wr}"
        ),
        AgentOp::DestroyQp { qp } => format!("destroy_qp qp {qp}"),
        AgentOp::QpInit { qp, access } => format!("qp_init qp {qp} access {access:?}"),
        AgentOp::QpRtr {
            qp,
            remote_qpn,
            remote_psn,
            remote_gid,
            path_mtu,
            gid_index,
            ..
        } => format!(
            "qp_rtr qp {qp} remote_qpn {remote_qpn:#x} remote_psn {remote_psn:#x} remote_gid {remote_gid} path_mtu {path_mtu} gid_index {gid_index:?}"
        ),
        AgentOp::QpRts { qp, psn, .. } => format!("qp_rts qp {qp} psn {psn:#x}"),
        AgentOp::QpReset { qp } => format!("qp_reset qp {qp}"),
        AgentOp::QpQuery { qp } => format!("qp_query qp {qp}"),
        AgentOp::RegMr { pd, length, access } => {
            format!("reg_mr pd {pd} length {length:#x} access {access:?}")
        }
        AgentOp::RegDmabufMr {
            pd,
            dmabuf,
            offset,
            length,
            iova,
            access,
        } => format!(
            "reg_dmabuf_mr pd {pd} dmabuf {dmabuf} offset {offset:#x} length {length:#x} iova {iova:#x} access {access:?}"
        ),
        AgentOp::DeregMr { mr } => format!("dereg_mr mr {mr}"),
        AgentOp::MrWrite { mr, offset, data } => {
            format!("mr_write mr {mr} offset {offset:#x} ({} hex digits)", data.len())
        }
        AgentOp::MrRead { mr, offset, length } => {
            format!("mr_read mr {mr} offset {offset:#x} length {length}")
        }
        AgentOp::PostSend {
            qp,
            wr_id,
            opcode,
            mr,
            offset,
            length,
            remote_addr,
            rkey,
            signaled,
        } => format!(
            "post_send qp {qp} wr_id {wr_id} {opcode:?} mr {mr:?} offset {offset:#x} length {length} remote_addr {remote_addr:#x} rkey {rkey:#x} signaled {signaled}"
        ),
        AgentOp::PostRecv {
            qp,
            wr_id,
            mr,
            offset,
            length,
        } => format!("post_recv qp {qp} wr_id {wr_id} mr {mr} offset {offset:#x} length {length}"),
        AgentOp::PollCq {
            cq,
            count,
            timeout_ms,
        } => format!("poll_cq cq {cq} count {count} timeout {timeout_ms} ms"),
        other => format!("{other:?}"),
    }
}

fn check_24_bits(what: &str, value: u32) -> Result<()> {
    if value > MAX_24_BITS {
        return Err(AgentError::Invalid(format!(
            "{what} {value:#x} does not fit in 24 bits"
        )));
    }
    Ok(())
}

fn check_count(what: &str, value: u32, max: u32) -> Result<()> {
    if value == 0 || value > max {
        return Err(AgentError::Invalid(format!(
            "{what} {value} is not in 1..={max}"
        )));
    }
    Ok(())
}

impl<P: Platform> Agent<P> {
    pub(crate) fn run_rdma(&self, op: &AgentOp) -> Result<AgentReply> {
        let rdma = self.platform.rdma();
        match op {
            AgentOp::NetUp {
                ifname,
                addr,
                prefix,
            } => {
                check_ifname(ifname)?;
                let addr = parse_ipv4(addr)?;
                crate::net::netmask(*prefix)?;
                self.platform.net_up(ifname, addr, *prefix)?;
                Ok(AgentReply::Done)
            }
            AgentOp::NeighAdd { ifname, ip, mac } => {
                check_ifname(ifname)?;
                let ip = parse_ipv4(ip)?;
                let mac = parse_mac(mac)?;
                self.platform.neigh_add(ifname, ip, mac)?;
                Ok(AgentReply::Done)
            }
            AgentOp::RdmaLinkAdd { name, netdev } => {
                check_ifname(name)?;
                check_ifname(netdev)?;
                self.platform.rdma_link_add(name, netdev)?;
                Ok(AgentReply::Done)
            }
            AgentOp::RdmaOpen { name } => {
                check_ifname(name)?;
                Ok(AgentReply::RdmaContext {
                    context: rdma.open(name)?,
                })
            }
            AgentOp::RdmaClose { context } => {
                rdma.close(*context)?;
                Ok(AgentReply::Done)
            }
            AgentOp::RdmaGid { context } => {
                let (gid, index) = rdma.roce_v2_ipv4_gid(*context)?;
                Ok(AgentReply::Gid {
                    gid: format_gid(&gid),
                    index,
                })
            }
            AgentOp::AllocPd { context } => Ok(AgentReply::Pd {
                pd: rdma.alloc_pd(*context)?,
            }),
            AgentOp::DeallocPd { pd } => {
                rdma.dealloc_pd(*pd)?;
                Ok(AgentReply::Done)
            }
            AgentOp::CreateCq { context, entries } => {
                check_count("entries", *entries, MAX_CQ_ENTRIES)?;
                Ok(AgentReply::Cq {
                    cq: rdma.create_cq(*context, *entries)?,
                })
            }
            AgentOp::DestroyCq { cq } => {
                rdma.destroy_cq(*cq)?;
                Ok(AgentReply::Done)
            }
            AgentOp::CreateQp {
                pd,
                send_cq,
                recv_cq,
                max_send_wr,
                max_recv_wr,
            } => {
                check_count("max_send_wr", *max_send_wr, MAX_QUEUE_DEPTH)?;
                check_count("max_recv_wr", *max_recv_wr, MAX_QUEUE_DEPTH)?;
                let (qp, qpn) =
                    rdma.create_qp(*pd, *send_cq, *recv_cq, *max_send_wr, *max_recv_wr)?;
                Ok(AgentReply::Qp { qp, qpn })
            }
            AgentOp::DestroyQp { qp } => {
                rdma.destroy_qp(*qp)?;
                Ok(AgentReply::Done)
            }
            AgentOp::QpInit { qp, access } => {
                rdma.modify_qp(
                    *qp,
                    Transition::Init {
                        access: access_mask(access),
                    },
                )?;
                Ok(AgentReply::Done)
            }
            AgentOp::QpRtr {
                qp,
                remote_qpn,
                remote_psn,
                remote_gid,
                path_mtu,
                gid_index,
                max_dest_rd_atomic,
                min_rnr_timer,
            } => {
                check_24_bits("remote_qpn", *remote_qpn)?;
                check_24_bits("remote_psn", *remote_psn)?;
                let remote_gid = parse_gid(remote_gid)?;
                let path_mtu = mtu_enum(*path_mtu)?;
                // IBTA 9.7.5.2.8: the RNR timer field is 5 bits.
                if *min_rnr_timer > 31 {
                    return Err(AgentError::Invalid(format!(
                        "min_rnr_timer {min_rnr_timer} is over 31"
                    )));
                }
                let gid_index = match gid_index {
                    Some(index) => *index,
                    None => rdma.roce_v2_ipv4_gid(rdma.qp_context(*qp)?)?.1,
                };
                rdma.modify_qp(
                    *qp,
                    Transition::Rtr(RtrParams {
                        remote_qpn: *remote_qpn,
                        remote_psn: *remote_psn,
                        remote_gid,
                        path_mtu,
                        gid_index,
                        max_dest_rd_atomic: *max_dest_rd_atomic,
                        min_rnr_timer: *min_rnr_timer,
                    }),
                )?;
                Ok(AgentReply::Done)
            }
            AgentOp::QpRts {
                qp,
                psn,
                timeout,
                retry_cnt,
                rnr_retry,
                max_rd_atomic,
            } => {
                check_24_bits("psn", *psn)?;
                // Local ACK timeout is 5 bits, the retry counts 3 (IBTA 9.x, verbs.h).
                if *timeout > 31 || *retry_cnt > 7 || *rnr_retry > 7 {
                    return Err(AgentError::Invalid(format!(
                        "timeout {timeout} (max 31), retry_cnt {retry_cnt} / rnr_retry {rnr_retry} (max 7)"
                    )));
                }
                rdma.modify_qp(
                    *qp,
                    Transition::Rts(RtsParams {
                        psn: *psn,
                        timeout: *timeout,
                        retry_cnt: *retry_cnt,
                        rnr_retry: *rnr_retry,
                        max_rd_atomic: *max_rd_atomic,
                    }),
                )?;
                Ok(AgentReply::Done)
            }
            AgentOp::QpReset { qp } => {
                rdma.modify_qp(*qp, Transition::Reset)?;
                Ok(AgentReply::Done)
            }
            AgentOp::QpQuery { qp } => {
                let state = rdma.query_qp(*qp)?;
                Ok(AgentReply::QpState {
                    qpn: state.qpn,
                    state: state.state,
                    sq_psn: state.sq_psn,
                    rq_psn: state.rq_psn,
                    dest_qpn: state.dest_qpn,
                })
            }
            AgentOp::RegMr { pd, length, access } => {
                if *length == 0 || *length > MAX_MR_LENGTH {
                    return Err(AgentError::Invalid(format!(
                        "MR length {length} is not in 1..={MAX_MR_LENGTH}"
                    )));
                }
                let mr = rdma.reg_mr(*pd, *length, access_mask(access))?;
                self.mr_reply(mr)
            }
            AgentOp::RegDmabufMr {
                pd,
                dmabuf,
                offset,
                length,
                iova,
                access,
            } => {
                // Offsets and lengths are the kernel's to judge (scenarios test that); only
                // the handle is the agent's.
                let dmabufs = lock(&self.dmabufs);
                let fd = dmabufs.entries.get(dmabuf).ok_or_else(|| {
                    AgentError::BadHandle(format!("no open dma-buf has handle {dmabuf}"))
                })?;
                let mr = rdma.reg_dmabuf_mr(
                    *pd,
                    fd.as_raw_fd(),
                    *offset,
                    *length,
                    *iova,
                    access_mask(access),
                )?;
                drop(dmabufs);
                self.mr_reply(mr)
            }
            AgentOp::DeregMr { mr } => {
                rdma.dereg_mr(*mr)?;
                Ok(AgentReply::Done)
            }
            AgentOp::MrWrite { mr, offset, data } => {
                let bytes = from_hex(data)?;
                if bytes.len() as u64 > MAX_MR_IO {
                    return Err(AgentError::Invalid(format!(
                        "{} bytes is more than {MAX_MR_IO} per mr_write",
                        bytes.len()
                    )));
                }
                self.check_cpu_range(*mr, *offset, bytes.len() as u64)?;
                rdma.mr_write(*mr, *offset, &bytes)?;
                Ok(AgentReply::Done)
            }
            AgentOp::MrRead { mr, offset, length } => {
                if *length > MAX_MR_IO {
                    return Err(AgentError::Invalid(format!(
                        "{length} bytes is more than {MAX_MR_IO} per mr_read"
                    )));
                }
                self.check_cpu_range(*mr, *offset, *length)?;
                Ok(AgentReply::Bytes {
                    data: p2prig_protocol::hex::encode(&rdma.mr_read(*mr, *offset, *length)?),
                })
            }
            AgentOp::PostSend {
                qp,
                wr_id,
                opcode,
                mr,
                offset,
                length,
                remote_addr,
                rkey,
                signaled,
            } => {
                let sge = match mr {
                    Some(mr) => Some(self.sge(*mr, *offset, *length)?),
                    None if *length == 0 && *offset == 0 => None,
                    None => {
                        return Err(AgentError::Invalid(
                            "offset/length without an mr; give the local MR".into(),
                        ))
                    }
                };
                rdma.post_send(
                    *qp,
                    &SendRequest {
                        wr_id: *wr_id,
                        opcode: *opcode,
                        sge,
                        remote_addr: *remote_addr,
                        rkey: *rkey,
                        signaled: *signaled,
                    },
                )?;
                Ok(AgentReply::Done)
            }
            AgentOp::PostRecv {
                qp,
                wr_id,
                mr,
                offset,
                length,
            } => {
                let sge = self.sge(*mr, *offset, *length)?;
                rdma.post_recv(*qp, *wr_id, &sge)?;
                Ok(AgentReply::Done)
            }
            AgentOp::PollCq {
                cq,
                count,
                timeout_ms,
            } => {
                check_count("count", *count, MAX_POLL)?;
                if *timeout_ms > MAX_SLEEP_MS {
                    return Err(AgentError::Invalid(format!(
                        "{timeout_ms} ms is longer than the {MAX_SLEEP_MS} ms limit"
                    )));
                }
                Ok(AgentReply::Completions {
                    completions: rdma.poll_cq(*cq, *count, Duration::from_millis(*timeout_ms))?,
                })
            }
            // dispatch::run handles these itself; listed so that this match is exhaustive too.
            op @ device_op!() => Err(AgentError::Invalid(format!(
                "{} is not a networking or verbs request",
                describe(op)
            ))),
        }
    }

    fn mr_reply(&self, mr: u32) -> Result<AgentReply> {
        let info = self.platform.rdma().mr_info(mr)?;
        Ok(AgentReply::Mr {
            mr,
            lkey: info.lkey,
            rkey: info.rkey,
            addr: info.addr,
            length: info.length,
        })
    }

    fn check_cpu_range(&self, mr: u32, offset: u64, length: u64) -> Result<()> {
        let info = self.platform.rdma().mr_info(mr)?;
        if !info.cpu_accessible {
            return Err(AgentError::Invalid(format!(
                "MR {mr} is a dma-buf MR; the agent has no mapping of it (use bar_read/bar_write)"
            )));
        }
        check_range(&format!("MR {mr}"), info.length, offset, length)
    }

    /// A local SGE inside its MR (an SGE past the MR would be the kernel's error, but it is
    /// the agent's own bookkeeping mistake, so the agent refuses it).
    fn sge(&self, mr: u32, offset: u64, length: u32) -> Result<Sge> {
        let info = self.platform.rdma().mr_info(mr)?;
        check_range(&format!("MR {mr}"), info.length, offset, u64::from(length))?;
        Ok(Sge { mr, offset, length })
    }
}

#[cfg(test)]
mod tests;
