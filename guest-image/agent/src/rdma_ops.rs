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
            other => Err(AgentError::Invalid(format!(
                "{} is not a networking or verbs request",
                describe(other)
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
mod tests {
    use p2prig_protocol::agent::{Access, Completion, SendOpcode};
    use p2prig_protocol::wire::{decode_line, Outcome, Request};

    use super::*;
    use crate::dispatch::fake::{err, ok, FakePlatform};
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
            op(
                r#"{"id":1,"op":"post_send","qp":4,"wr_id":8,"opcode":"rdma_read","signaled":false}"#,
            ),
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
            op(
                r#"{"id":1,"op":"reg_dmabuf_mr","pd":1,"dmabuf":1,"offset":0,"length":4096,"iova":0}"#,
            ),
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
}
