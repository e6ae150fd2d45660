//! The agent's `Rdma` operations on libibverbs: every call through the loaded library, its
//! handles kept in the tables of `Verbs`.

use super::*;

impl Rdma for Verbs {
    fn open(&self, name: &str) -> Result<u32> {
        let verbs = library()?;
        let mut count = 0;
        // SAFETY: ibv_get_device_list writes the count and returns an array we free below.
        let list = unsafe { verbs.ibv_get_device_list(&mut count) };
        if list.is_null() {
            return Err(verbs_error("ibv_get_device_list", -1));
        }
        let mut context = std::ptr::null_mut();
        let mut found = false;
        for index in 0..usize::try_from(count).unwrap_or(0) {
            // SAFETY: the array holds `count` valid device pointers.
            let device = unsafe { *list.add(index) };
            // SAFETY: a valid device; the name is a NUL-terminated string it owns.
            let device_name = unsafe { CStr::from_ptr(verbs.ibv_get_device_name(device)) };
            if device_name.to_bytes() == name.as_bytes() {
                found = true;
                // SAFETY: a valid device of the list, opened before the list is freed.
                context = unsafe { verbs.ibv_open_device(device) };
                break;
            }
        }
        let open_error = (found && context.is_null()).then(|| verbs_error("ibv_open_device", -1));
        // SAFETY: the list came from ibv_get_device_list; an opened context outlives it.
        unsafe { verbs.ibv_free_device_list(list) };
        if let Some(error) = open_error {
            return Err(error);
        }
        if !found {
            return Err(AgentError::State {
                errno: libc::ENODEV,
                message: format!(
                    "libibverbs lists no RDMA device named {name:?} ({count} devices)"
                ),
            });
        }
        let handle = lock(&self.tables).contexts.insert(Arc::new(Context {
            raw: Raw::new(context),
        }));
        Ok(handle)
    }

    fn close(&self, context: u32) -> Result<()> {
        let verbs = library()?;
        let mut tables = lock(&self.tables);
        let entry = get(&tables.contexts, context, "RDMA context")?;
        let users = tables
            .pds
            .entries
            .values()
            .filter(|pd| pd.context == context)
            .count()
            + tables
                .cqs
                .entries
                .values()
                .filter(|cq| cq.context == context)
                .count();
        if users > 0 {
            return Err(busy(format!("context {context} still has {users} PDs/CQs")));
        }
        // SAFETY: a context from ibv_open_device with no objects of ours left on it.
        entry.raw.destroy("ibv_close_device", |ptr| unsafe {
            verbs.ibv_close_device(ptr)
        })?;
        tables.contexts.entries.remove(&context);
        Ok(())
    }

    fn roce_v2_ipv4_gid(&self, context: u32) -> Result<([u8; 16], u32)> {
        let verbs = library()?;
        let entry = get(&lock(&self.tables).contexts, context, "RDMA context")?;
        entry.raw.with("context", |ptr| {
            let mut entries = vec![sys::ibv_gid_entry::default(); MAX_GID_ENTRIES];
            // SAFETY: a live context; the array holds MAX_GID_ENTRIES entries of the size given.
            let count = unsafe {
                verbs._ibv_query_gid_table(
                    ptr,
                    entries.as_mut_ptr(),
                    entries.len(),
                    0,
                    std::mem::size_of::<sys::ibv_gid_entry>(),
                )
            };
            if count < 0 {
                return Err(verbs_error("ibv_query_gid_table", count as i64));
            }
            let v4_mapped = [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
            entries
                .iter()
                .take(count as usize)
                .filter(|e| {
                    e.port_num == u32::from(PORT) && e.gid_type == sys::IBV_GID_TYPE_ROCE_V2
                })
                // SAFETY: raw is the byte view of the 16-byte GID union; always initialised.
                .map(|e| (unsafe { e.gid.raw }, e.gid_index))
                .find(|(gid, _)| gid[..12] == v4_mapped)
                .ok_or_else(|| AgentError::State {
                    errno: libc::ENOENT,
                    message: format!(
                        "port {PORT} has no RoCE v2 GID with an IPv4 address among its {count} \
                         GIDs; give the netdev an IPv4 address (net_up) first"
                    ),
                })
        })
    }

    fn alloc_pd(&self, context: u32) -> Result<u32> {
        let verbs = library()?;
        let mut tables = lock(&self.tables);
        let entry = get(&tables.contexts, context, "RDMA context")?;
        let pd = entry.raw.with("context", |ptr| {
            // SAFETY: a live context.
            let pd = unsafe { verbs.ibv_alloc_pd(ptr) };
            created(pd, "ibv_alloc_pd")
        })?;
        Ok(tables.pds.insert(Arc::new(Pd {
            context,
            raw: Raw::new(pd),
        })))
    }

    fn dealloc_pd(&self, pd: u32) -> Result<()> {
        let verbs = library()?;
        let mut tables = lock(&self.tables);
        let entry = get(&tables.pds, pd, "PD")?;
        let users = tables.qps.entries.values().filter(|qp| qp.pd == pd).count()
            + tables.mrs.entries.values().filter(|mr| mr.pd == pd).count();
        if users > 0 {
            return Err(busy(format!("PD {pd} still has {users} QPs/MRs")));
        }
        entry.raw.destroy("ibv_dealloc_pd", |ptr| {
            // SAFETY: a PD from ibv_alloc_pd with no objects of ours left on it.
            unsafe { verbs.ibv_dealloc_pd(ptr) }
        })?;
        tables.pds.entries.remove(&pd);
        Ok(())
    }

    fn create_cq(&self, context: u32, entries: u32) -> Result<u32> {
        let verbs = library()?;
        let mut tables = lock(&self.tables);
        let entry = get(&tables.contexts, context, "RDMA context")?;
        let cqe = i32::try_from(entries)
            .map_err(|_| AgentError::Invalid(format!("{entries} CQ entries")))?;
        let cq = entry.raw.with("context", |ptr| {
            // SAFETY: a live context; no completion channel, no user context.
            let cq = unsafe {
                verbs.ibv_create_cq(ptr, cqe, std::ptr::null_mut(), std::ptr::null_mut(), 0)
            };
            created(cq, "ibv_create_cq")
        })?;
        Ok(tables.cqs.insert(Arc::new(Cq {
            context,
            raw: Raw::new(cq),
        })))
    }

    fn destroy_cq(&self, cq: u32) -> Result<()> {
        let verbs = library()?;
        let mut tables = lock(&self.tables);
        let entry = get(&tables.cqs, cq, "CQ")?;
        let users = tables
            .qps
            .entries
            .values()
            .filter(|qp| qp.send_cq == cq || qp.recv_cq == cq)
            .count();
        if users > 0 {
            return Err(busy(format!("CQ {cq} is used by {users} QPs")));
        }
        entry.raw.destroy("ibv_destroy_cq", |ptr| {
            // SAFETY: a CQ from ibv_create_cq that no QP of ours uses.
            unsafe { verbs.ibv_destroy_cq(ptr) }
        })?;
        tables.cqs.entries.remove(&cq);
        Ok(())
    }

    fn create_qp(
        &self,
        pd: u32,
        send_cq: u32,
        recv_cq: u32,
        max_send_wr: u32,
        max_recv_wr: u32,
    ) -> Result<(u32, u32)> {
        let verbs = library()?;
        let mut tables = lock(&self.tables);
        let pd_entry = get(&tables.pds, pd, "PD")?;
        let send = get(&tables.cqs, send_cq, "CQ")?;
        let recv = get(&tables.cqs, recv_cq, "CQ")?;
        let qp = pd_entry.raw.with("PD", |pd_ptr| {
            send.raw.with("send CQ", |send_ptr| {
                recv.raw.with("receive CQ", |recv_ptr| {
                    let mut init = sys::ibv_qp_init_attr {
                        send_cq: send_ptr,
                        recv_cq: recv_ptr,
                        qp_type: sys::IBV_QPT_RC,
                        sq_sig_all: 0,
                        ..Default::default()
                    };
                    init.cap.max_send_wr = max_send_wr;
                    init.cap.max_recv_wr = max_recv_wr;
                    init.cap.max_send_sge = 1;
                    init.cap.max_recv_sge = 1;
                    // SAFETY: a live PD and CQs; init is fully initialised.
                    let qp = unsafe { verbs.ibv_create_qp(pd_ptr, &mut init) };
                    created(qp, "ibv_create_qp")
                })
            })
        })?;
        // SAFETY: a QP just created; qp_num is set by libibverbs.
        let qpn = unsafe { (*qp).qp_num };
        let handle = tables.qps.insert(Arc::new(Qp {
            context: pd_entry.context,
            pd,
            send_cq,
            recv_cq,
            raw: Raw::new(qp),
        }));
        Ok((handle, qpn))
    }

    fn destroy_qp(&self, qp: u32) -> Result<()> {
        let verbs = library()?;
        let mut tables = lock(&self.tables);
        let entry = get(&tables.qps, qp, "QP")?;
        entry.raw.destroy("ibv_destroy_qp", |ptr| {
            // SAFETY: a QP from ibv_create_qp.
            unsafe { verbs.ibv_destroy_qp(ptr) }
        })?;
        tables.qps.entries.remove(&qp);
        Ok(())
    }

    fn qp_context(&self, qp: u32) -> Result<u32> {
        Ok(get(&lock(&self.tables).qps, qp, "QP")?.context)
    }

    fn modify_qp(&self, qp: u32, transition: Transition) -> Result<()> {
        let verbs = library()?;
        let entry = get(&lock(&self.tables).qps, qp, "QP")?;
        let mut attr = sys::ibv_qp_attr::default();
        let mask = match transition {
            Transition::Init { access } => {
                attr.qp_state = sys::IBV_QPS_INIT;
                attr.pkey_index = 0;
                attr.port_num = PORT;
                attr.qp_access_flags = access;
                sys::IBV_QP_STATE
                    | sys::IBV_QP_PKEY_INDEX
                    | sys::IBV_QP_PORT
                    | sys::IBV_QP_ACCESS_FLAGS
            }
            Transition::Rtr(rtr) => {
                attr.qp_state = sys::IBV_QPS_RTR;
                attr.path_mtu = rtr.path_mtu;
                attr.dest_qp_num = rtr.remote_qpn;
                attr.rq_psn = rtr.remote_psn;
                attr.max_dest_rd_atomic = rtr.max_dest_rd_atomic;
                attr.min_rnr_timer = rtr.min_rnr_timer;
                attr.ah_attr.is_global = 1;
                attr.ah_attr.port_num = PORT;
                attr.ah_attr.grh.dgid.raw = rtr.remote_gid;
                attr.ah_attr.grh.sgid_index = u8::try_from(rtr.gid_index).map_err(|_| {
                    AgentError::Invalid(format!("gid_index {} is over 255", rtr.gid_index))
                })?;
                attr.ah_attr.grh.hop_limit = 64;
                sys::IBV_QP_STATE
                    | sys::IBV_QP_AV
                    | sys::IBV_QP_PATH_MTU
                    | sys::IBV_QP_DEST_QPN
                    | sys::IBV_QP_RQ_PSN
                    | sys::IBV_QP_MAX_DEST_RD_ATOMIC
                    | sys::IBV_QP_MIN_RNR_TIMER
            }
            Transition::Rts(rts) => {
                attr.qp_state = sys::IBV_QPS_RTS;
                attr.sq_psn = rts.psn;
                attr.timeout = rts.timeout;
                attr.retry_cnt = rts.retry_cnt;
                attr.rnr_retry = rts.rnr_retry;
                attr.max_rd_atomic = rts.max_rd_atomic;
                sys::IBV_QP_STATE
                    | sys::IBV_QP_TIMEOUT
                    | sys::IBV_QP_RETRY_CNT
                    | sys::IBV_QP_RNR_RETRY
                    | sys::IBV_QP_SQ_PSN
                    | sys::IBV_QP_MAX_QP_RD_ATOMIC
            }
            Transition::Reset => {
                attr.qp_state = sys::IBV_QPS_RESET;
                sys::IBV_QP_STATE
            }
            Transition::Error => {
                attr.qp_state = sys::IBV_QPS_ERR;
                sys::IBV_QP_STATE
            }
        };
        entry.raw.with("QP", |ptr| {
            // SAFETY: a live QP; attr is initialised for every bit of the mask.
            let rc = unsafe { verbs.ibv_modify_qp(ptr, &mut attr, mask as i32) };
            check("ibv_modify_qp", rc)
        })
    }

    fn query_qp(&self, qp: u32) -> Result<QpState> {
        let verbs = library()?;
        let entry = get(&lock(&self.tables).qps, qp, "QP")?;
        entry.raw.with("QP", |ptr| {
            let mut attr = sys::ibv_qp_attr::default();
            let mut init = sys::ibv_qp_init_attr::default();
            let mask =
                sys::IBV_QP_STATE | sys::IBV_QP_SQ_PSN | sys::IBV_QP_RQ_PSN | sys::IBV_QP_DEST_QPN;
            // SAFETY: a live QP; both structs are ours.
            let rc = unsafe { verbs.ibv_query_qp(ptr, &mut attr, mask as i32, &mut init) };
            check("ibv_query_qp", rc)?;
            Ok(QpState {
                // SAFETY: a live QP.
                qpn: unsafe { (*ptr).qp_num },
                state: qp_state_name(attr.qp_state).to_owned(),
                sq_psn: attr.sq_psn,
                rq_psn: attr.rq_psn,
                dest_qpn: attr.dest_qp_num,
            })
        })
    }

    fn reg_mr(&self, pd: u32, length: u64, access: u32) -> Result<u32> {
        let verbs = library()?;
        let len = usize::try_from(length)
            .map_err(|_| AgentError::Invalid(format!("MR length {length}")))?;
        let buffer = Buffer::new(len)?;
        let mut tables = lock(&self.tables);
        let pd_entry = get(&tables.pds, pd, "PD")?;
        let mr = pd_entry.raw.with("PD", |pd_ptr| {
            // SAFETY: a live PD; the buffer is ours for as long as the MR exists.
            let mr = unsafe { verbs.ibv_reg_mr(pd_ptr, buffer.ptr.cast(), len, access as i32) };
            created(mr, "ibv_reg_mr")
        })?;
        // SAFETY: an MR just registered.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        let info = MrInfo {
            lkey,
            rkey,
            addr: buffer.ptr as u64,
            length,
            cpu_accessible: true,
        };
        Ok(tables.mrs.insert(Arc::new(Mr {
            pd,
            info,
            raw: Raw::new(mr),
            buffer: Some(buffer),
        })))
    }

    fn reg_dmabuf_mr(
        &self,
        pd: u32,
        fd: RawFd,
        offset: u64,
        length: u64,
        iova: u64,
        access: u32,
    ) -> Result<u32> {
        let verbs = library()?;
        let len = usize::try_from(length)
            .map_err(|_| AgentError::Invalid(format!("MR length {length}")))?;
        let mut tables = lock(&self.tables);
        let pd_entry = get(&tables.pds, pd, "PD")?;
        let mr = pd_entry.raw.with("PD", |pd_ptr| {
            // SAFETY: a live PD and an open dma-buf fd (the kernel takes its own reference).
            let mr =
                unsafe { verbs.ibv_reg_dmabuf_mr(pd_ptr, offset, len, iova, fd, access as i32) };
            created(mr, "ibv_reg_dmabuf_mr")
        })?;
        // SAFETY: an MR just registered.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        let info = MrInfo {
            lkey,
            rkey,
            addr: iova,
            length,
            cpu_accessible: false,
        };
        Ok(tables.mrs.insert(Arc::new(Mr {
            pd,
            info,
            raw: Raw::new(mr),
            buffer: None,
        })))
    }

    fn dereg_mr(&self, mr: u32) -> Result<()> {
        let verbs = library()?;
        let mut tables = lock(&self.tables);
        let entry = get(&tables.mrs, mr, "MR")?;
        entry.raw.destroy("ibv_dereg_mr", |ptr| {
            // SAFETY: an MR from ibv_reg_mr / ibv_reg_dmabuf_mr; its buffer outlives it.
            unsafe { verbs.ibv_dereg_mr(ptr) }
        })?;
        tables.mrs.entries.remove(&mr);
        Ok(())
    }

    fn mr_info(&self, mr: u32) -> Result<MrInfo> {
        Ok(get(&lock(&self.tables).mrs, mr, "MR")?.info)
    }

    fn mr_write(&self, mr: u32, offset: u64, data: &[u8]) -> Result<()> {
        let entry = get(&lock(&self.tables).mrs, mr, "MR")?;
        let buffer = entry.buffer.as_ref().ok_or_else(|| {
            AgentError::Invalid(format!("MR {mr} is a dma-buf MR without agent memory"))
        })?;
        crate::rdma::check_range(
            &format!("MR {mr}"),
            buffer.len as u64,
            offset,
            data.len() as u64,
        )?;
        // SAFETY: the range was checked against the mapping, which the Arc keeps alive.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                buffer.ptr.add(offset as usize),
                data.len(),
            )
        };
        Ok(())
    }

    fn mr_read(&self, mr: u32, offset: u64, length: u64) -> Result<Vec<u8>> {
        let entry = get(&lock(&self.tables).mrs, mr, "MR")?;
        let buffer = entry.buffer.as_ref().ok_or_else(|| {
            AgentError::Invalid(format!("MR {mr} is a dma-buf MR without agent memory"))
        })?;
        crate::rdma::check_range(&format!("MR {mr}"), buffer.len as u64, offset, length)?;
        let mut data = vec![0u8; length as usize];
        // SAFETY: the range was checked against the mapping, which the Arc keeps alive.
        unsafe {
            std::ptr::copy_nonoverlapping(
                buffer.ptr.add(offset as usize),
                data.as_mut_ptr(),
                data.len(),
            )
        };
        Ok(data)
    }

    fn post_send(&self, qp: u32, request: &SendRequest) -> Result<()> {
        let entry = get(&lock(&self.tables).qps, qp, "QP")?;
        let mut sge = match &request.sge {
            Some(sge) => Some(self.lookup_mr_sge(sge)?),
            None => None,
        };
        let mut wr = sys::ibv_send_wr {
            wr_id: request.wr_id,
            num_sge: i32::from(sge.is_some()),
            sg_list: sge
                .as_mut()
                .map_or(std::ptr::null_mut(), |sge| sge as *mut sys::ibv_sge),
            opcode: match request.opcode {
                SendOpcode::RdmaWrite => sys::IBV_WR_RDMA_WRITE,
                SendOpcode::RdmaRead => sys::IBV_WR_RDMA_READ,
                SendOpcode::Send => sys::IBV_WR_SEND,
            },
            send_flags: if request.signaled {
                sys::IBV_SEND_SIGNALED
            } else {
                0
            },
            ..Default::default()
        };
        wr.wr.rdma.remote_addr = request.remote_addr;
        wr.wr.rdma.rkey = request.rkey;
        entry.raw.with("QP", |ptr| {
            let mut bad = std::ptr::null_mut();
            // SAFETY: a live QP whose context outlives it; the ops table is the provider's.
            let post =
                unsafe { (*(*ptr).context).ops.post_send }.ok_or_else(|| AgentError::State {
                    errno: libc::ENOSYS,
                    message: "provider has no post_send".into(),
                })?;
            // SAFETY: a live QP; wr and its SGE live across the call (the provider copies them).
            let rc = unsafe { post(ptr, &mut wr, &mut bad) };
            check("ibv_post_send", rc)
        })
    }

    fn post_recv(&self, qp: u32, wr_id: u64, sge: &Sge) -> Result<()> {
        let entry = get(&lock(&self.tables).qps, qp, "QP")?;
        let mut sge = self.lookup_mr_sge(sge)?;
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            next: std::ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        entry.raw.with("QP", |ptr| {
            let mut bad = std::ptr::null_mut();
            // SAFETY: a live QP whose context outlives it.
            let post =
                unsafe { (*(*ptr).context).ops.post_recv }.ok_or_else(|| AgentError::State {
                    errno: libc::ENOSYS,
                    message: "provider has no post_recv".into(),
                })?;
            // SAFETY: a live QP; wr and its SGE live across the call.
            let rc = unsafe { post(ptr, &mut wr, &mut bad) };
            check("ibv_post_recv", rc)
        })
    }

    fn poll_cq(&self, cq: u32, count: u32, timeout: Duration) -> Result<Vec<Completion>> {
        let verbs = library()?;
        let entry = get(&lock(&self.tables).cqs, cq, "CQ")?;
        let wanted = count as usize;
        let deadline = Instant::now() + timeout;
        let mut completions = Vec::new();
        loop {
            let mut wcs = vec![sys::ibv_wc::default(); wanted - completions.len()];
            let polled = entry.raw.with("CQ", |ptr| {
                // SAFETY: a live CQ whose context outlives it.
                let poll =
                    unsafe { (*(*ptr).context).ops.poll_cq }.ok_or_else(|| AgentError::State {
                        errno: libc::ENOSYS,
                        message: "provider has no poll_cq".into(),
                    })?;
                // SAFETY: a live CQ; wcs holds as many entries as asked for.
                let rc = unsafe { poll(ptr, wcs.len() as i32, wcs.as_mut_ptr()) };
                if rc < 0 {
                    return Err(verbs_error("ibv_poll_cq", i64::from(rc)));
                }
                Ok(rc as usize)
            })?;
            for wc in wcs.iter().take(polled) {
                // SAFETY: ibv_wc_status_str returns a static string for any value.
                let status_name = unsafe { CStr::from_ptr(verbs.ibv_wc_status_str(wc.status)) };
                completions.push(Completion {
                    wr_id: wc.wr_id,
                    status: wc.status,
                    status_name: status_name.to_string_lossy().into_owned(),
                    vendor_err: wc.vendor_err,
                    opcode: wc.opcode,
                    opcode_name: wc_opcode_name(wc.opcode).to_owned(),
                    byte_len: wc.byte_len,
                    qp_num: wc.qp_num,
                });
            }
            if completions.len() >= wanted || Instant::now() >= deadline {
                return Ok(completions);
            }
            if polled == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
