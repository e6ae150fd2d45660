//! The networking and verbs requests: argument checks and conversions, then the platform's
//! [`crate::rdma::Rdma`]. Limits keep a wrong argument from exhausting the small guest.

use std::os::fd::AsRawFd;
use std::time::Duration;

use p2prig_protocol::agent::{Access, AgentReply, SendOpcode};

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

/// One method per networking or verbs op, called by dispatch with the op's fields.
impl<P: Platform> Agent<P> {
    pub(crate) fn net_up(&self, ifname: &str, addr: &str, prefix: u8) -> Result<AgentReply> {
        check_ifname(ifname)?;
        let addr = parse_ipv4(addr)?;
        crate::net::netmask(prefix)?;
        self.platform.net_up(ifname, addr, prefix)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn neigh_add(&self, ifname: &str, ip: &str, mac: &str) -> Result<AgentReply> {
        check_ifname(ifname)?;
        let ip = parse_ipv4(ip)?;
        let mac = parse_mac(mac)?;
        self.platform.neigh_add(ifname, ip, mac)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn rdma_link_add(&self, name: &str, netdev: &str) -> Result<AgentReply> {
        check_ifname(name)?;
        check_ifname(netdev)?;
        self.platform.rdma_link_add(name, netdev)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn rdma_open(&self, name: &str) -> Result<AgentReply> {
        check_ifname(name)?;
        Ok(AgentReply::RdmaContext {
            context: self.platform.rdma().open(name)?,
        })
    }

    pub(crate) fn rdma_close(&self, context: u32) -> Result<AgentReply> {
        self.platform.rdma().close(context)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn rdma_gid(&self, context: u32) -> Result<AgentReply> {
        let (gid, index) = self.platform.rdma().roce_v2_ipv4_gid(context)?;
        Ok(AgentReply::Gid {
            gid: format_gid(&gid),
            index,
        })
    }

    pub(crate) fn alloc_pd(&self, context: u32) -> Result<AgentReply> {
        Ok(AgentReply::Pd {
            pd: self.platform.rdma().alloc_pd(context)?,
        })
    }

    pub(crate) fn dealloc_pd(&self, pd: u32) -> Result<AgentReply> {
        self.platform.rdma().dealloc_pd(pd)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn create_cq(&self, context: u32, entries: u32) -> Result<AgentReply> {
        check_count("entries", entries, MAX_CQ_ENTRIES)?;
        Ok(AgentReply::Cq {
            cq: self.platform.rdma().create_cq(context, entries)?,
        })
    }

    pub(crate) fn destroy_cq(&self, cq: u32) -> Result<AgentReply> {
        self.platform.rdma().destroy_cq(cq)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn create_qp(
        &self,
        pd: u32,
        send_cq: u32,
        recv_cq: u32,
        max_send_wr: u32,
        max_recv_wr: u32,
    ) -> Result<AgentReply> {
        check_count("max_send_wr", max_send_wr, MAX_QUEUE_DEPTH)?;
        check_count("max_recv_wr", max_recv_wr, MAX_QUEUE_DEPTH)?;
        let (qp, qpn) =
            self.platform
                .rdma()
                .create_qp(pd, send_cq, recv_cq, max_send_wr, max_recv_wr)?;
        Ok(AgentReply::Qp { qp, qpn })
    }

    pub(crate) fn destroy_qp(&self, qp: u32) -> Result<AgentReply> {
        self.platform.rdma().destroy_qp(qp)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn qp_init(&self, qp: u32, access: &[Access]) -> Result<AgentReply> {
        self.platform.rdma().modify_qp(
            qp,
            Transition::Init {
                access: access_mask(access),
            },
        )?;
        Ok(AgentReply::Done)
    }

    // One parameter per field of AgentOp::QpRtr.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn qp_rtr(
        &self,
        qp: u32,
        remote_qpn: u32,
        remote_psn: u32,
        remote_gid: &str,
        path_mtu: u32,
        gid_index: Option<u32>,
        max_dest_rd_atomic: u8,
        min_rnr_timer: u8,
    ) -> Result<AgentReply> {
        let rdma = self.platform.rdma();
        check_24_bits("remote_qpn", remote_qpn)?;
        check_24_bits("remote_psn", remote_psn)?;
        let remote_gid = parse_gid(remote_gid)?;
        let path_mtu = mtu_enum(path_mtu)?;
        // IBTA 9.7.5.2.8: the RNR timer field is 5 bits.
        if min_rnr_timer > 31 {
            return Err(AgentError::Invalid(format!(
                "min_rnr_timer {min_rnr_timer} is over 31"
            )));
        }
        let gid_index = match gid_index {
            Some(index) => index,
            None => rdma.roce_v2_ipv4_gid(rdma.qp_context(qp)?)?.1,
        };
        rdma.modify_qp(
            qp,
            Transition::Rtr(RtrParams {
                remote_qpn,
                remote_psn,
                remote_gid,
                path_mtu,
                gid_index,
                max_dest_rd_atomic,
                min_rnr_timer,
            }),
        )?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn qp_rts(
        &self,
        qp: u32,
        psn: u32,
        timeout: u8,
        retry_cnt: u8,
        rnr_retry: u8,
        max_rd_atomic: u8,
    ) -> Result<AgentReply> {
        check_24_bits("psn", psn)?;
        // Local ACK timeout is 5 bits, the retry counts 3 (IBTA 9.x, verbs.h).
        if timeout > 31 || retry_cnt > 7 || rnr_retry > 7 {
            return Err(AgentError::Invalid(format!(
                "timeout {timeout} (max 31), retry_cnt {retry_cnt} / rnr_retry {rnr_retry} (max 7)"
            )));
        }
        self.platform.rdma().modify_qp(
            qp,
            Transition::Rts(RtsParams {
                psn,
                timeout,
                retry_cnt,
                rnr_retry,
                max_rd_atomic,
            }),
        )?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn qp_reset(&self, qp: u32) -> Result<AgentReply> {
        self.platform.rdma().modify_qp(qp, Transition::Reset)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn qp_error(&self, qp: u32) -> Result<AgentReply> {
        self.platform.rdma().modify_qp(qp, Transition::Error)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn qp_query(&self, qp: u32) -> Result<AgentReply> {
        let state = self.platform.rdma().query_qp(qp)?;
        Ok(AgentReply::QpState {
            qpn: state.qpn,
            state: state.state,
            sq_psn: state.sq_psn,
            rq_psn: state.rq_psn,
            dest_qpn: state.dest_qpn,
        })
    }

    pub(crate) fn reg_mr(&self, pd: u32, length: u64, access: &[Access]) -> Result<AgentReply> {
        if length == 0 || length > MAX_MR_LENGTH {
            return Err(AgentError::Invalid(format!(
                "MR length {length} is not in 1..={MAX_MR_LENGTH}"
            )));
        }
        let mr = self
            .platform
            .rdma()
            .reg_mr(pd, length, access_mask(access))?;
        self.mr_reply(mr)
    }

    pub(crate) fn reg_dmabuf_mr(
        &self,
        pd: u32,
        dmabuf: u32,
        offset: u64,
        length: u64,
        iova: u64,
        access: &[Access],
    ) -> Result<AgentReply> {
        // Offsets and lengths are the kernel's to judge (scenarios test that); only the handle
        // is the agent's.
        let dmabufs = lock(&self.dmabufs);
        let fd = dmabufs
            .entries
            .get(&dmabuf)
            .ok_or_else(|| AgentError::BadHandle(format!("no open dma-buf has handle {dmabuf}")))?;
        let mr = self.platform.rdma().reg_dmabuf_mr(
            pd,
            fd.as_raw_fd(),
            offset,
            length,
            iova,
            access_mask(access),
        )?;
        drop(dmabufs);
        self.mr_reply(mr)
    }

    pub(crate) fn dereg_mr(&self, mr: u32) -> Result<AgentReply> {
        self.platform.rdma().dereg_mr(mr)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn mr_write(&self, mr: u32, offset: u64, data: &str) -> Result<AgentReply> {
        let bytes = from_hex(data)?;
        if bytes.len() as u64 > MAX_MR_IO {
            return Err(AgentError::Invalid(format!(
                "{} bytes is more than {MAX_MR_IO} per mr_write",
                bytes.len()
            )));
        }
        self.check_cpu_range(mr, offset, bytes.len() as u64)?;
        self.platform.rdma().mr_write(mr, offset, &bytes)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn mr_read(&self, mr: u32, offset: u64, length: u64) -> Result<AgentReply> {
        if length > MAX_MR_IO {
            return Err(AgentError::Invalid(format!(
                "{length} bytes is more than {MAX_MR_IO} per mr_read"
            )));
        }
        self.check_cpu_range(mr, offset, length)?;
        Ok(AgentReply::Bytes {
            data: p2prig_protocol::hex::encode(&self.platform.rdma().mr_read(mr, offset, length)?),
        })
    }

    // One parameter per field of AgentOp::PostSend.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn post_send(
        &self,
        qp: u32,
        wr_id: u64,
        opcode: SendOpcode,
        mr: Option<u32>,
        offset: u64,
        length: u32,
        remote_addr: u64,
        rkey: u32,
        signaled: bool,
    ) -> Result<AgentReply> {
        let sge = match mr {
            Some(mr) => Some(self.sge(mr, offset, length)?),
            None if length == 0 && offset == 0 => None,
            None => {
                return Err(AgentError::Invalid(
                    "offset/length without an mr; give the local MR".into(),
                ))
            }
        };
        self.platform.rdma().post_send(
            qp,
            &SendRequest {
                wr_id,
                opcode,
                sge,
                remote_addr,
                rkey,
                signaled,
            },
        )?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn post_recv(
        &self,
        qp: u32,
        wr_id: u64,
        mr: u32,
        offset: u64,
        length: u32,
    ) -> Result<AgentReply> {
        let sge = self.sge(mr, offset, length)?;
        self.platform.rdma().post_recv(qp, wr_id, &sge)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn poll_cq(&self, cq: u32, count: u32, timeout_ms: u64) -> Result<AgentReply> {
        check_count("count", count, MAX_POLL)?;
        if timeout_ms > MAX_SLEEP_MS {
            return Err(AgentError::Invalid(format!(
                "{timeout_ms} ms is longer than the {MAX_SLEEP_MS} ms limit"
            )));
        }
        Ok(AgentReply::Completions {
            completions: self.platform.rdma().poll_cq(
                cq,
                count,
                Duration::from_millis(timeout_ms),
            )?,
        })
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
