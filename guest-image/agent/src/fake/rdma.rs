//! A recording stand-in for libibverbs: handles count up, MRs are byte vectors, completions
//! are whatever the test queues.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::Mutex;

use p2prig_protocol::agent::Completion;

use crate::dispatch::lock;
use crate::error::{AgentError, Result};
use crate::rdma::{parse_gid, MrInfo, QpState, Rdma, SendRequest, Sge, Transition};

#[derive(Debug, Default)]
pub struct FakeRdma {
    /// Every call that reached the "kernel", in order.
    pub calls: Mutex<Vec<String>>,
    pub next: Mutex<u32>,
    pub mrs: Mutex<BTreeMap<u32, (MrInfo, Vec<u8>)>>,
    pub completions: Mutex<Vec<Completion>>,
    /// errno reg_dmabuf_mr fails with (the kernel's answer), if any.
    pub dmabuf_errno: Mutex<Option<i32>>,
}

impl FakeRdma {
    fn record(&self, call: String) -> u32 {
        lock(&self.calls).push(call);
        let mut next = lock(&self.next);
        *next += 1;
        *next
    }

    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }
}

impl Rdma for FakeRdma {
    fn open(&self, name: &str) -> Result<u32> {
        if name != "rxe0" {
            return Err(AgentError::State {
                errno: libc::ENODEV,
                message: format!("no RDMA device named {name}"),
            });
        }
        Ok(self.record(format!("open {name}")))
    }
    fn close(&self, context: u32) -> Result<()> {
        self.record(format!("close {context}"));
        Ok(())
    }
    fn roce_v2_ipv4_gid(&self, _context: u32) -> Result<([u8; 16], u32)> {
        Ok((parse_gid("10.0.2.15")?, 1))
    }
    fn alloc_pd(&self, context: u32) -> Result<u32> {
        Ok(self.record(format!("alloc_pd {context}")))
    }
    fn dealloc_pd(&self, pd: u32) -> Result<()> {
        self.record(format!("dealloc_pd {pd}"));
        Ok(())
    }
    fn create_cq(&self, context: u32, entries: u32) -> Result<u32> {
        Ok(self.record(format!("create_cq {context} {entries}")))
    }
    fn destroy_cq(&self, cq: u32) -> Result<()> {
        self.record(format!("destroy_cq {cq}"));
        Ok(())
    }
    fn create_qp(&self, pd: u32, send: u32, recv: u32, sw: u32, rw: u32) -> Result<(u32, u32)> {
        let handle = self.record(format!("create_qp {pd} {send} {recv} {sw} {rw}"));
        Ok((handle, 0x10 + handle))
    }
    fn destroy_qp(&self, qp: u32) -> Result<()> {
        self.record(format!("destroy_qp {qp}"));
        Ok(())
    }
    fn qp_context(&self, _qp: u32) -> Result<u32> {
        Ok(1)
    }
    fn modify_qp(&self, qp: u32, transition: Transition) -> Result<()> {
        self.record(format!("modify_qp {qp} {transition:?}"));
        Ok(())
    }
    fn query_qp(&self, qp: u32) -> Result<QpState> {
        Ok(QpState {
            qpn: 0x10 + qp,
            state: "rts".into(),
            sq_psn: 1,
            rq_psn: 2,
            dest_qpn: 3,
        })
    }
    fn reg_mr(&self, pd: u32, length: u64, access: u32) -> Result<u32> {
        let mr = self.record(format!("reg_mr {pd} {length} {access:#x}"));
        let info = MrInfo {
            lkey: mr,
            rkey: mr << 8,
            addr: 0x7000_0000,
            length,
            cpu_accessible: true,
        };
        lock(&self.mrs).insert(mr, (info, vec![0; length as usize]));
        Ok(mr)
    }
    fn reg_dmabuf_mr(
        &self,
        pd: u32,
        _fd: RawFd,
        offset: u64,
        length: u64,
        iova: u64,
        access: u32,
    ) -> Result<u32> {
        let mr = self.record(format!(
            "reg_dmabuf_mr {pd} {offset:#x} {length:#x} {iova:#x} {access:#x}"
        ));
        if let Some(errno) = *lock(&self.dmabuf_errno) {
            return Err(AgentError::os(
                "ibv_reg_dmabuf_mr",
                std::io::Error::from_raw_os_error(errno),
            ));
        }
        let info = MrInfo {
            lkey: mr,
            rkey: mr << 8,
            addr: iova,
            length,
            cpu_accessible: false,
        };
        lock(&self.mrs).insert(mr, (info, Vec::new()));
        Ok(mr)
    }
    fn dereg_mr(&self, mr: u32) -> Result<()> {
        self.record(format!("dereg_mr {mr}"));
        lock(&self.mrs)
            .remove(&mr)
            .map(drop)
            .ok_or_else(|| AgentError::BadHandle(format!("no MR has handle {mr}")))
    }
    fn mr_info(&self, mr: u32) -> Result<MrInfo> {
        lock(&self.mrs)
            .get(&mr)
            .map(|(info, _)| *info)
            .ok_or_else(|| AgentError::BadHandle(format!("no MR has handle {mr}")))
    }
    fn mr_write(&self, mr: u32, offset: u64, data: &[u8]) -> Result<()> {
        let mut mrs = lock(&self.mrs);
        let (_, bytes) = mrs
            .get_mut(&mr)
            .ok_or_else(|| AgentError::BadHandle("mr".into()))?;
        bytes[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn mr_read(&self, mr: u32, offset: u64, length: u64) -> Result<Vec<u8>> {
        let mrs = lock(&self.mrs);
        let (_, bytes) = mrs
            .get(&mr)
            .ok_or_else(|| AgentError::BadHandle("mr".into()))?;
        Ok(bytes[offset as usize..(offset + length) as usize].to_vec())
    }
    fn post_send(&self, qp: u32, request: &SendRequest) -> Result<()> {
        self.record(format!("post_send {qp} {request:?}"));
        Ok(())
    }
    fn post_recv(&self, qp: u32, wr_id: u64, sge: &Sge) -> Result<()> {
        self.record(format!("post_recv {qp} {wr_id} {sge:?}"));
        Ok(())
    }
    fn poll_cq(
        &self,
        _cq: u32,
        count: u32,
        _timeout: std::time::Duration,
    ) -> Result<Vec<Completion>> {
        let mut queued = lock(&self.completions);
        let take = queued.len().min(count as usize);
        Ok(queued.drain(..take).collect())
    }
}
