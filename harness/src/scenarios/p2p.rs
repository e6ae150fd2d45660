//! In-guest peer-to-peer scenarios: rxe imports a VFIO BAR dma-buf as an MR and an RC QP
//! pair on rxe0 (loopback) writes and reads it, so every access the importer makes reaches
//! nvme-cmb, whose event log is the oracle. The revoke scenarios hold a reset (or decode off)
//! open while a write is posted into the MR, and check that nothing reached the device.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use p2prig_protocol::agent::{
    Access, AgentOp, AgentReply, Completion, KmemleakCommand, SendOpcode,
};
use p2prig_protocol::device::{DeviceOp, DeviceReply, EventFilter};
use p2prig_protocol::event::{Access as BarAccess, Event, EventKind};
use p2prig_protocol::target::{
    Completion as TargetCompletion, CompletionStatus, QpSettings, Sge, TargetOp, TargetReply,
};

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::export_args::open_nvme;
use crate::scenarios::ScenarioEnv;

pub(crate) const RPC: Duration = Duration::from_secs(30);
pub(crate) const PAGE: u64 = 0x1000;
/// SQ1's tail doorbell: BAR0 + 0x1000 + 8 * 1 (NVMe 1.4 3.1.24, DSTRD 0).
const SQ1TDBL: u64 = 0x1008;
const GUEST_IP: &str = "10.0.2.15";
/// enum ibv_wc_status
const IBV_WC_SUCCESS: u32 = 0;
const IBV_WC_REM_ACCESS_ERR: u32 = 10;
/// How long a reset is held open so a write can be posted inside it.
const RESET_WINDOW_MS: u64 = 1500;

pub(crate) fn ok(
    reply: std::result::Result<AgentReply, p2prig_protocol::wire::ErrorReply>,
    what: &str,
) -> Result<AgentReply> {
    reply.map_err(|e| anyhow!("{what}: {e}"))
}

/// Agent resources a scenario created, released in reverse order when it ends whatever
/// happened, so the next scenario on the same boot starts clean.
#[derive(Debug, Default)]
pub(crate) struct Held(Vec<AgentOp>);

impl Held {
    pub(crate) fn push(&mut self, release: AgentOp) {
        self.0.push(release);
    }

    /// Releases in reverse order. A resource may already be gone (a QP replaced after a
    /// revoke, an MR a race deregistered): the agent's errno is ignored. A release that does
    /// not return at all is a finding and ends the release with an error naming it.
    pub(crate) fn release(mut self, rig: &mut Rig) -> Result<()> {
        while let Some(op) = self.0.pop() {
            let desc = format!("{op:?}");
            // Ok(Err(errno)): already gone, which is fine here.
            let _gone_is_fine = rig
                .agent_call(op, RPC)
                .map_err(|e| anyhow!("releasing {desc} did not complete: {e:#}"))?;
        }
        Ok(())
    }
}

/// Runs a scenario body and releases what it held, even when it failed.
pub(crate) fn with_held(
    rig: &mut Rig,
    body: impl FnOnce(&mut Rig, &mut Held) -> Result<()>,
) -> Result<()> {
    with_held_value(rig, body)
}

/// [`with_held`] for a body that returns a value.
pub(crate) fn with_held_value<T>(
    rig: &mut Rig,
    body: impl FnOnce(&mut Rig, &mut Held) -> Result<T>,
) -> Result<T> {
    let mut held = Held::default();
    let result = body(rig, &mut held);
    let released = held.release(rig);
    let value = result?;
    released?;
    Ok(value)
}

/// Two connected RC QPs on rxe0: A posts, B's side owns the target MR.
pub(crate) struct Loopback {
    pd: u32,
    cq_a: u32,
    qp_a: u32,
    qp_b: u32,
    /// A's 8-byte source buffer.
    src_mr: u32,
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
fn rxe_open(rig: &mut Rig, name: &str, netdev: &str, held: &mut Held) -> Result<u32> {
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
fn rxe_gid(rig: &mut Rig, context: u32) -> Result<String> {
    match ok(
        rig.agent_call(AgentOp::RdmaGid { context }, RPC)?,
        "rxe0 GID",
    )? {
        AgentReply::Gid { gid, .. } => Ok(gid),
        other => bail!("gid: unexpected {other:?}"),
    }
}

fn create_cq(rig: &mut Rig, context: u32, held: &mut Held) -> Result<u32> {
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
fn create_qp(rig: &mut Rig, pd: u32, cq: u32, held: &mut Held) -> Result<(u32, u32)> {
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
struct RcPath {
    remote_qpn: u32,
    remote_psn: u32,
    remote_gid: String,
    path_mtu: u32,
    psn: u32,
    /// IBTA local ACK timeout exponent.
    timeout: u8,
    /// Both the transport and the RNR retry count.
    retries: u8,
}

/// RESET -> INIT -> RTR -> RTS, with local write and remote read/write access.
fn qp_to_rts(rig: &mut Rig, qp: u32, path: &RcPath) -> Result<()> {
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
fn connect_pair_on(rig: &mut Rig, context: u32, pd: u32, held: &mut Held) -> Result<Loopback> {
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
fn reconnect(rig: &mut Rig, context: u32, old: &Loopback, held: &mut Held) -> Result<Loopback> {
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
    let op = AgentOp::RegDmabufMr {
        pd,
        dmabuf,
        offset,
        length,
        iova: 0,
        access: vec![Access::LocalWrite, Access::RemoteWrite, Access::RemoteRead],
    };
    Ok(match rig.agent_call(op, RPC)? {
        Ok(AgentReply::Mr { mr, rkey, .. }) => {
            held.push(AgentOp::DeregMr { mr });
            Ok((mr, rkey))
        }
        Ok(other) => Err(format!("unexpected {other:?}")),
        Err(e) => Err(e.to_string()),
    })
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

fn post_start(
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
fn poll_one_stamped(
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

pub(crate) fn last_seq(rig: &mut Rig) -> Result<u64> {
    match rig.device_call(DeviceOp::EventsSince {
        since: u64::MAX,
        limit: Some(0),
    })? {
        DeviceReply::Events { last_seq, .. } => Ok(last_seq),
        other => bail!("nvme-cmb: unexpected {other:?}"),
    }
}

pub(crate) fn events_since(rig: &mut Rig, since: u64) -> Result<Vec<Event>> {
    match rig.device_call(DeviceOp::EventsSince { since, limit: None })? {
        DeviceReply::Events { events, .. } => Ok(events),
        other => bail!("nvme-cmb: unexpected {other:?}"),
    }
}

/// Waits briefly so posted MMIO writes have reached the device, then returns BAR0 doorbell
/// page accesses (and violations there) after `since`.
fn doorbell_events(rig: &mut Rig, since: u64) -> Result<Vec<Event>> {
    std::thread::sleep(Duration::from_millis(500));
    Ok(events_since(rig, since)?
        .into_iter()
        .filter(|e| {
            matches!(&e.kind,
            EventKind::Bar { bar: 0, offset, .. } | EventKind::Violation { bar: 0, offset, .. }
                if (PAGE..2 * PAGE).contains(offset))
        })
        .collect())
}

/// A loopback pair and an MR over BAR0's doorbell page, on an open VFIO device.
pub(crate) struct DoorbellMr {
    pub(crate) device: u32,
    pub(crate) context: u32,
    pub(crate) lb: Loopback,
    pub(crate) mr: u32,
    pub(crate) rkey: u32,
}

pub(crate) fn doorbell_mr(rig: &mut Rig, env: &ScenarioEnv, held: &mut Held) -> Result<DoorbellMr> {
    let device = open_device(rig, held)?;
    let dmabuf = export(rig, held, device, 0, PAGE, PAGE, env)?;
    let context = rdma_up(rig, held)?;
    let lb = connect_pair(rig, context, held)?;
    let (mr, rkey) = reg_dmabuf(rig, held, lb.pd, dmabuf, 0, PAGE)?
        .map_err(|e| anyhow!("reg_dmabuf_mr over the doorbell page: {e}"))?;
    Ok(DoorbellMr {
        device,
        context,
        lb,
        mr,
        rkey,
    })
}

/// An 8-byte RDMA WRITE of `value` at SQ1TDBL through the doorbell MR.
pub(crate) struct Ring {
    completion: Option<Completion>,
    /// Doorbell-page events the write caused.
    events: Vec<Event>,
    value: u64,
}

impl Ring {
    fn succeeded(&self) -> bool {
        matches!(&self.completion, Some(c) if c.status == IBV_WC_SUCCESS)
    }

    /// The write completed and the device saw exactly it, nothing else in the page.
    pub(crate) fn landed(&self) -> bool {
        let (value, only_these) = written_qword(&self.events, SQ1TDBL);
        self.succeeded() && value == Some(self.value) && only_these
    }

    pub(crate) fn detail(&self) -> String {
        format!(
            "{}; device at BAR0+{SQ1TDBL:#x}: {}",
            status_text(&self.completion),
            describe(&self.events)
        )
    }
}

pub(crate) fn ring(
    rig: &mut Rig,
    lb: &Loopback,
    rkey: u32,
    value: u64,
    wr_id: u64,
) -> Result<Ring> {
    let since = last_seq(rig)?;
    let completion = post(
        rig,
        lb,
        SendOpcode::RdmaWrite,
        &value.to_le_bytes(),
        SQ1TDBL - PAGE,
        rkey,
        wr_id,
    )?;
    let events = doorbell_events(rig, since)?;
    Ok(Ring {
        completion,
        events,
        value,
    })
}

/// The bytes written into [offset, offset + 8) by BAR0 write events, and whether every event
/// was a write inside that range.
fn written_qword(events: &[Event], offset: u64) -> (Option<u64>, bool) {
    let mut bytes = [None::<u8>; 8];
    let mut only_these = true;
    for e in events {
        match &e.kind {
            EventKind::Bar {
                access: BarAccess::Write,
                offset: o,
                size,
                value: Some(v),
                ..
            } if *o >= offset && *o + u64::from(*size) <= offset + 8 => {
                for i in 0..*size as usize {
                    bytes[(*o - offset) as usize + i] = Some((v >> (8 * i)) as u8);
                }
            }
            _ => only_these = false,
        }
    }
    let value = bytes
        .iter()
        .enumerate()
        .try_fold(0u64, |acc, (i, b)| b.map(|b| acc | u64::from(b) << (8 * i)));
    (value, only_these)
}

fn describe(events: &[Event]) -> String {
    serde_json::to_string(events).unwrap_or_default()
}

fn status_text(c: &Option<Completion>) -> String {
    match c {
        Some(c) => format!("status {} ({})", c.status, c.status_name),
        None => "no completion".into(),
    }
}

// ---------------------------------------------------------------- p2p-doorbell

/// QP A writes 7 (8 bytes) into QP B's dma-buf MR over BAR0's doorbell page at SQ1TDBL: the
/// device must log exactly that write.
pub fn run_doorbell(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| doorbell(rig, env, suite, held))
}

pub(crate) fn open_device(rig: &mut Rig, held: &mut Held) -> Result<u32> {
    let device = open_nvme(rig)?;
    held.push(AgentOp::VfioClose { device });
    Ok(device)
}

fn doorbell(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite, held: &mut Held) -> Result<()> {
    let t = Instant::now();
    // First, while nothing else holds the device open (the group is exclusive).
    let refused = import_without_pci_function(rig, env)?;
    suite.record(
        checks::RXE_WITHOUT_A_PCI_FUNCTION_REFUSES_WITH_EOPNOTSUPP,
        matches!(&refused, Err(e) if e.errno == libc::EOPNOTSUPP),
        format!("reg_dmabuf_mr on rxe over lo: {refused:?}"),
        t.elapsed(),
    );
    let t = Instant::now();
    let setup = doorbell_mr(rig, env, held);
    suite.record(
        checks::REG_DMABUF_MR_OVER_THE_DOORBELL_PAGE,
        setup.is_ok(),
        match &setup {
            Ok(d) => format!("rkey {:#x} over BAR0 {PAGE:#x}+{PAGE:#x}", d.rkey),
            Err(e) => format!("{e:#}"),
        },
        t.elapsed(),
    );
    let Ok(d) = setup else { return Ok(()) };
    let t = Instant::now();
    let r = ring(rig, &d.lb, d.rkey, 7, 1)?;
    suite.record(
        checks::RDMA_WRITE_COMPLETES,
        r.succeeded(),
        status_text(&r.completion),
        t.elapsed(),
    );
    suite.record(
        checks::DEVICE_SEES_ONE_DOORBELL_WRITE,
        r.landed(),
        r.detail(),
        t.elapsed(),
    );
    Ok(())
}

/// rxe on `lo`, a netdev with no PCI function under it, asked to import the doorbell page:
/// no exporter could check a peer-to-peer path to it, so registration must fail cleanly.
fn import_without_pci_function(
    rig: &mut Rig,
    env: &ScenarioEnv,
) -> Result<std::result::Result<AgentReply, p2prig_protocol::wire::ErrorReply>> {
    with_held_value(rig, |rig, held| {
        let device = open_device(rig, held)?;
        let dmabuf = export(rig, held, device, 0, PAGE, PAGE, env)?;
        let context = rxe_open(rig, "rxe_lo", "lo", held)?;
        let pd = alloc_pd(rig, context, held)?;
        let reply = rig.agent_call(
            AgentOp::RegDmabufMr {
                pd,
                dmabuf,
                offset: 0,
                length: PAGE,
                iova: 0,
                access: vec![Access::LocalWrite, Access::RemoteWrite],
            },
            RPC,
        )?;
        if let Ok(AgentReply::Mr { mr, .. }) = &reply {
            held.push(AgentOp::DeregMr { mr: *mr });
        }
        Ok(reply)
    })
}

pub(crate) fn export(
    rig: &mut Rig,
    held: &mut Held,
    device: u32,
    bar: u32,
    offset: u64,
    length: u64,
    env: &ScenarioEnv,
) -> Result<u32> {
    let op = AgentOp::DmabufExport {
        device,
        bar,
        offset,
        length,
        uapi: env.uapi,
    };
    match ok(rig.agent_call(op, RPC)?, "export the dma-buf")? {
        AgentReply::Dmabuf { dmabuf, .. } => {
            held.push(AgentOp::DmabufClose { dmabuf });
            Ok(dmabuf)
        }
        other => bail!("export: unexpected {other:?}"),
    }
}

// ---------------------------------------------------------------- stray PCI_COMMAND write

/// Setting bus-master in PCI_COMMAND (memory decode stays on) must not disturb a live
/// importer: a write after it lands like the one before it.
pub fn run_stray_command_write(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| stray_command_write(rig, env, suite, held))
}

fn stray_command_write(
    rig: &mut Rig,
    env: &ScenarioEnv,
    suite: &mut Suite,
    held: &mut Held,
) -> Result<()> {
    let t = Instant::now();
    let DoorbellMr {
        device, lb, rkey, ..
    } = doorbell_mr(rig, env, held)?;
    let before = ring(rig, &lb, rkey, 3, 1)?;
    suite.record(
        checks::WRITE_LANDS_BEFORE,
        before.landed(),
        before.detail(),
        t.elapsed(),
    );
    let t = Instant::now();
    let command = config_read(rig, device, 4, 2)?;
    // PCI_COMMAND_MASTER (bit 2); memory decode (bit 1) stays as it is (on).
    ok(
        rig.agent_call(
            AgentOp::ConfigWrite {
                device,
                offset: 4,
                width: 2,
                value: command | 0x4,
            },
            RPC,
        )?,
        "set PCI_COMMAND bus master",
    )?;
    let after = config_read(rig, device, 4, 2)?;
    suite.record(
        checks::DECODE_STAYS_ON,
        after & 0x2 != 0,
        format!("PCI_COMMAND {command:#06x} -> {after:#06x}"),
        t.elapsed(),
    );
    let t = Instant::now();
    let after = ring(rig, &lb, rkey, 4, 2)?;
    suite.record(
        checks::IMPORTER_UNDISTURBED,
        after.landed(),
        after.detail(),
        t.elapsed(),
    );
    Ok(())
}

// ---------------------------------------------------------------- CMB slices

const CMB_SLICE_OFFSET: u64 = 0x1000;
const CMB_SLICE_LENGTH: u64 = 0x2000;

/// slice-routing: a write at MR offset k of a CMB slice lands at (BAR2, slice offset + k).
pub fn run_slice_routing(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| {
        let (lb, rkey) = cmb_slice_mr(rig, env, held)?;
        let k = 0x10;
        let since = last_seq(rig)?;
        let t = Instant::now();
        let wc = post(
            rig,
            &lb,
            SendOpcode::RdmaWrite,
            &0x5a5a_0000_1234_5678u64.to_le_bytes(),
            k,
            rkey,
            1,
        )?;
        suite.record(
            checks::WRITE_COMPLETES,
            matches!(&wc, Some(c) if c.status == IBV_WC_SUCCESS),
            status_text(&wc),
            t.elapsed(),
        );
        std::thread::sleep(Duration::from_millis(500));
        let events: Vec<Event> = events_since(rig, since)?
            .into_iter()
            .filter(|e| {
                matches!(
                    &e.kind,
                    EventKind::Bar {
                        access: BarAccess::Write,
                        ..
                    }
                )
            })
            .collect();
        let want = CMB_SLICE_OFFSET + k;
        let routed = events.iter().any(|e| {
            matches!(&e.kind, EventKind::Bar { bar: 2, offset, .. } if (want..want + 8).contains(offset))
        });
        let strays: Vec<&Event> = events
            .iter()
            .filter(|e| !matches!(&e.kind, EventKind::Bar { bar: 2, .. }))
            .collect();
        suite.record(
            checks::WRITE_LANDS_AT_BAR2_SLICE_OFFSET,
            routed && strays.is_empty(),
            format!("want BAR2+{want:#x}; device writes: {}", describe(&events)),
            Duration::ZERO,
        );
        Ok(())
    })
}

/// cmb-roundtrip: the device fills the CMB with a pattern; an RDMA READ of the CMB slice MR
/// returns it byte-exact; an RDMA WRITE into it shows up in the device's CMB.
pub fn run_cmb_roundtrip(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| {
        let (lb, rkey) = cmb_slice_mr(rig, env, held)?;
        let t = Instant::now();
        let pattern = "c0ffee0123456789";
        match rig.device_call(DeviceOp::CmbFill {
            offset: 0,
            length: None,
            pattern_hex: pattern.into(),
        })? {
            DeviceReply::Done => {}
            other => bail!("nvme-cmb cmb_fill: unexpected {other:?}"),
        }
        let length = 256usize;
        let wc = post(
            rig,
            &lb,
            SendOpcode::RdmaRead,
            &vec![0u8; length],
            0,
            rkey,
            1,
        )?;
        let read = match ok(
            rig.agent_call(
                AgentOp::MrRead {
                    mr: lb.src_mr,
                    offset: 0,
                    length: length as u64,
                },
                RPC,
            )?,
            "read the local buffer",
        )? {
            AgentReply::Bytes { data } => data,
            other => bail!("mr_read: unexpected {other:?}"),
        };
        let want = pattern.repeat(length / (pattern.len() / 2));
        suite.record(
            checks::RDMA_READ_RETURNS_THE_CMB_PATTERN,
            matches!(&wc, Some(c) if c.status == IBV_WC_SUCCESS) && read == want,
            format!(
                "{}; read {}...",
                status_text(&wc),
                &read[..read.len().min(48)]
            ),
            t.elapsed(),
        );
        let t = Instant::now();
        let data: Vec<u8> = (0..64u8).collect();
        let wc = post(rig, &lb, SendOpcode::RdmaWrite, &data, 0x100, rkey, 2)?;
        std::thread::sleep(Duration::from_millis(500));
        let cmb = match rig.device_call(DeviceOp::CmbRead {
            offset: CMB_SLICE_OFFSET + 0x100,
            length: 64,
        })? {
            DeviceReply::CmbData { data_hex, .. } => data_hex,
            other => bail!("nvme-cmb cmb_read: unexpected {other:?}"),
        };
        let want: String = data.iter().map(|b| format!("{b:02x}")).collect();
        suite.record(
            checks::RDMA_WRITE_SHOWS_IN_THE_CMB,
            matches!(&wc, Some(c) if c.status == IBV_WC_SUCCESS) && cmb == want,
            format!(
                "{}; CMB+{:#x}: {cmb}",
                status_text(&wc),
                CMB_SLICE_OFFSET + 0x100
            ),
            t.elapsed(),
        );
        Ok(())
    })
}

/// A loopback pair and an MR over the CMB slice (BAR2 0x1000, 0x2000 bytes); returns the
/// pair and the MR's rkey.
fn cmb_slice_mr(rig: &mut Rig, env: &ScenarioEnv, held: &mut Held) -> Result<(Loopback, u32)> {
    let device = open_device(rig, held)?;
    let dmabuf = export(
        rig,
        held,
        device,
        2,
        CMB_SLICE_OFFSET,
        CMB_SLICE_LENGTH,
        env,
    )?;
    let context = rdma_up(rig, held)?;
    let lb = connect_pair(rig, context, held)?;
    let (_mr, rkey) = reg_dmabuf(rig, held, lb.pd, dmabuf, 0, CMB_SLICE_LENGTH)?
        .map_err(|e| anyhow!("reg_dmabuf_mr over the CMB slice: {e}"))?;
    Ok((lb, rkey))
}

// ---------------------------------------------------------------- remote peer

pub(crate) fn target_call(rig: &mut Rig, op: TargetOp) -> Result<TargetReply> {
    let desc = format!("{op:?}");
    rig.target_call(op)
        .and_then(|r| r.map_err(|e| anyhow!("{e}")))
        .map_err(|e| anyhow!("roce-target {desc}: {e:#}"))
}

/// Connects a guest RC QP with a fresh roce-target QP (parameters exchanged here, out of
/// band, as the design has it: no RDMA CM). Returns the guest QP and CQ handles and the
/// target's QPN.
pub(crate) fn connect_to_target(
    rig: &mut Rig,
    context: u32,
    pd: u32,
    held: &mut Held,
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
        timeout: 14,
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
fn target_write(
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
fn target_ring(
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
struct TargetPosted {
    qpn: u32,
    /// The target MR holding the source bytes.
    key: u32,
    posted_ns: u64,
}

fn target_post_write(
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

fn target_complete(rig: &mut Rig, posted: TargetPosted) -> Result<Option<TargetCompletion>> {
    let completion = target_poll(rig, posted.qpn);
    let _ = target_call(rig, TargetOp::DeregisterMr { key: posted.key });
    completion
}

/// roce-target (the RDMA NIC's peer) writes 7 into the guest's dma-buf MR over BAR0's
/// doorbell page at SQ1TDBL: rxe, the importer, must turn it into exactly that doorbell write.
pub fn run_remote_doorbell(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| remote_doorbell(rig, env, suite, held))
}

fn remote_doorbell(
    rig: &mut Rig,
    env: &ScenarioEnv,
    suite: &mut Suite,
    held: &mut Held,
) -> Result<()> {
    let t = Instant::now();
    let device = open_device(rig, held)?;
    let dmabuf = export(rig, held, device, 0, PAGE, PAGE, env)?;
    let context = rdma_up(rig, held)?;
    let pd = alloc_pd(rig, context, held)?;
    let (_, _, target_qpn) = connect_to_target(rig, context, pd, held)?;
    let (_mr, rkey) =
        reg_dmabuf(rig, held, pd, dmabuf, 0, PAGE)?.map_err(|e| anyhow!("reg_dmabuf_mr: {e}"))?;
    let (completion, events) = target_ring(rig, target_qpn, rkey, 7, 1)?;
    let acked = matches!(&completion, Some(c) if c.status == CompletionStatus::Success);
    suite.record(
        checks::TARGET_WRITE_IS_ACKED,
        acked,
        format!("{completion:?} (target qpn {target_qpn})"),
        t.elapsed(),
    );
    let (value, only_these) = written_qword(&events, SQ1TDBL);
    suite.record(
        checks::DEVICE_SEES_ONE_DOORBELL_WRITE,
        value == Some(7) && only_these && !events.is_empty(),
        format!("at BAR0+{SQ1TDBL:#x}: {}", describe(&events)),
        Duration::ZERO,
    );
    let _ = target_call(rig, TargetOp::DestroyQp { qpn: target_qpn });
    Ok(())
}

// ---------------------------------------------------------------- map leak

/// Registration maps the dma-buf attachment, deregistration unmaps it: each cycle is one
/// map/unmap.
const MAP_CYCLES: u32 = 32;
/// Memory decode off then on with an MR registered: each cycle is a revoke (unmap) and a
/// re-map from the importer's work item.
const REMAP_CYCLES: u32 = 16;
/// Long enough for rxe's re-map work (first attempt at once, retries after 10 and 100 ms).
const REMAP_SETTLE: Duration = Duration::from_millis(250);

pub fn run_map_leak(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| map_leak(rig, env, suite, held))
}

fn kmemleak(rig: &mut Rig, command: KmemleakCommand) -> Result<String> {
    match ok(
        rig.agent_call(AgentOp::Kmemleak { command }, RPC)?,
        "kmemleak",
    )? {
        AgentReply::Text { text } => Ok(text),
        other => bail!("kmemleak: unexpected {other:?}"),
    }
}

fn map_leak(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite, held: &mut Held) -> Result<()> {
    let t = Instant::now();
    let device = open_device(rig, held)?;
    let dmabuf = export(rig, held, device, 0, PAGE, PAGE, env)?;
    let context = rdma_up(rig, held)?;
    let pd = alloc_pd(rig, context, held)?;
    // Whatever kmemleak suspected before this scenario is not its finding.
    kmemleak(rig, KmemleakCommand::Scan)?;
    kmemleak(rig, KmemleakCommand::Clear)?;
    let mut cycles = 0;
    for _ in 0..MAP_CYCLES {
        let mut scratch = Held::default();
        let registered = reg_dmabuf(rig, &mut scratch, pd, dmabuf, 0, PAGE)?;
        scratch.release(rig)?;
        if registered.is_ok() {
            cycles += 1;
        }
    }
    suite.record(
        checks::MAP_UNMAP_CYCLES,
        cycles == MAP_CYCLES,
        format!("{cycles} of {MAP_CYCLES} registrations succeeded"),
        t.elapsed(),
    );

    let t = Instant::now();
    let lb = connect_pair_on(rig, context, pd, held)?;
    let (_mr, rkey) =
        reg_dmabuf(rig, held, pd, dmabuf, 0, PAGE)?.map_err(|e| anyhow!("reg_dmabuf_mr: {e}"))?;
    for _ in 0..REMAP_CYCLES {
        let command = clear_memory_decode(rig, device)?;
        config_write(rig, device, 4, 2, command | 0x2, "set PCI_COMMAND memory")?;
        std::thread::sleep(REMAP_SETTLE);
    }
    let after = ring(rig, &lb, rkey, 21, 1)?;
    suite.record(
        checks::REVOKE_REMAP_CYCLES_END_WITH_A_WORKING_MR,
        after.landed(),
        format!(
            "{REMAP_CYCLES} decode off/on cycles; then {}",
            after.detail()
        ),
        t.elapsed(),
    );
    // kmemleak reports an object only once it is older than its minimum age (5 s) and was
    // unreferenced in two scans.
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(6));
    kmemleak(rig, KmemleakCommand::Scan)?;
    let report = kmemleak(rig, KmemleakCommand::Scan)?;
    let leaks = report.matches("unreferenced object").count();
    suite.record(
        checks::KMEMLEAK_FINDS_NOTHING,
        leaks == 0,
        format!(
            "{leaks} unreferenced objects; {}",
            report.lines().take(24).collect::<Vec<_>>().join("\n")
        ),
        t.elapsed(),
    );
    Ok(())
}

// ---------------------------------------------------------------- remote verbs

/// roce-target against the guest's rxe on an ordinary MR: WRITE, READ back, SEND into a
/// posted receive, then a WRITE with the rkey of a deregistered MR, which must be NAKed with
/// remote access error (0x62) and put the target's QP in error. The frames of the scenario are
/// captured and must decode with tshark with no malformed packet.
pub fn run_remote_verbs(rig: &mut Rig, _env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| remote_verbs(rig, suite, held))
}

pub(crate) fn target_mr(rig: &mut Rig, length: u64) -> Result<u32> {
    match target_call(
        rig,
        TargetOp::RegisterMr {
            length,
            access: None,
        },
    )? {
        TargetReply::Mr(mr) => Ok(mr.key),
        other => bail!("roce-target register_mr: unexpected {other:?}"),
    }
}

fn target_poll(rig: &mut Rig, qpn: u32) -> Result<Option<TargetCompletion>> {
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

fn guest_bytes(rig: &mut Rig, mr: u32, offset: u64, length: u64) -> Result<String> {
    match ok(
        rig.agent_call(AgentOp::MrRead { mr, offset, length }, RPC)?,
        "read the guest MR",
    )? {
        AgentReply::Bytes { data } => Ok(data),
        other => bail!("mr_read: unexpected {other:?}"),
    }
}

fn remote_verbs(rig: &mut Rig, suite: &mut Suite, held: &mut Held) -> Result<()> {
    let pcap = match target_call(
        rig,
        TargetOp::PcapStart {
            name: Some("remote-verbs.pcap".into()),
        },
    )? {
        TargetReply::Pcap { path, .. } => path,
        other => bail!("roce-target pcap_start: unexpected {other:?}"),
    };
    let context = rdma_up(rig, held)?;
    let pd = alloc_pd(rig, context, held)?;
    let (qp, cq, target_qpn) = connect_to_target(rig, context, pd, held)?;
    let AgentMr { mr, addr, rkey } = reg_mr(rig, held, pd, 4096)?;
    let pattern = "00112233445566778899aabbccddeeff";
    let local = target_mr(rig, 4096)?;
    target_call(
        rig,
        TargetOp::MrWrite {
            key: local,
            offset: 0,
            data_hex: pattern.into(),
            length: None,
        },
    )?;

    let t = Instant::now();
    let sge = |offset, length| Sge {
        key: local,
        offset,
        length,
    };
    target_call(
        rig,
        TargetOp::PostWrite {
            qpn: target_qpn,
            wr_id: 1,
            local: sge(0, 16),
            remote_va: addr,
            remote_rkey: rkey,
            imm: None,
        },
    )?;
    let wc = target_poll(rig, target_qpn)?;
    let landed = guest_bytes(rig, mr, 0, 16)?;
    suite.record(
        checks::TARGET_WRITE_INTO_GUEST_MR,
        matches!(&wc, Some(c) if c.status == CompletionStatus::Success) && landed == pattern,
        format!("{wc:?}; guest MR: {landed}"),
        t.elapsed(),
    );

    let t = Instant::now();
    target_call(
        rig,
        TargetOp::PostRead {
            qpn: target_qpn,
            wr_id: 2,
            local: sge(1024, 16),
            remote_va: addr,
            remote_rkey: rkey,
        },
    )?;
    let wc = target_poll(rig, target_qpn)?;
    let read = match target_call(
        rig,
        TargetOp::MrRead {
            key: local,
            offset: 1024,
            length: 16,
        },
    )? {
        TargetReply::MrData { data_hex, .. } => data_hex,
        other => bail!("roce-target mr_read: unexpected {other:?}"),
    };
    suite.record(
        checks::TARGET_READS_IT_BACK,
        matches!(&wc, Some(c) if c.status == CompletionStatus::Success) && read == pattern,
        format!("{wc:?}; read {read}"),
        t.elapsed(),
    );

    let t = Instant::now();
    ok(
        rig.agent_call(
            AgentOp::PostRecv {
                qp,
                wr_id: 7,
                mr,
                offset: 256,
                length: 64,
            },
            RPC,
        )?,
        "post_recv",
    )?;
    target_call(
        rig,
        TargetOp::PostSend {
            qpn: target_qpn,
            wr_id: 3,
            local: sge(0, 16),
            imm: None,
        },
    )?;
    let sent = target_poll(rig, target_qpn)?;
    let received = poll_one(rig, cq, 5000)?;
    let data = guest_bytes(rig, mr, 256, 16)?;
    suite.record(
        checks::TARGET_SEND_INTO_POSTED_RECEIVE,
        matches!(&sent, Some(c) if c.status == CompletionStatus::Success)
            && matches!(&received, Some(c) if c.status == IBV_WC_SUCCESS && c.byte_len == 16 && c.wr_id == 7)
            && data == pattern,
        format!("target {sent:?}; guest {}; data {data}", status_text(&received)),
        t.elapsed(),
    );

    let t = Instant::now();
    ok(rig.agent_call(AgentOp::DeregMr { mr }, RPC)?, "dereg_mr")?;
    target_call(
        rig,
        TargetOp::PostWrite {
            qpn: target_qpn,
            wr_id: 4,
            local: sge(0, 16),
            remote_va: addr,
            remote_rkey: rkey,
            imm: None,
        },
    )?;
    let wc = target_poll(rig, target_qpn)?;
    let state = match target_call(rig, TargetOp::QueryQp { qpn: target_qpn })? {
        TargetReply::QpState(status) => format!("{:?}", status.state),
        other => bail!("roce-target query_qp: unexpected {other:?}"),
    };
    suite.record(
        checks::WRITE_TO_DEREGISTERED_RKEY_IS_NAK_0X62,
        matches!(&wc, Some(c) if c.status == CompletionStatus::RemoteAccessError && c.nak_code == Some(0x62))
            && state.eq_ignore_ascii_case("error"),
        format!("{wc:?}; target QP {state}"),
        t.elapsed(),
    );
    let _ = target_call(rig, TargetOp::DestroyQp { qpn: target_qpn });
    let _ = target_call(rig, TargetOp::DeregisterMr { key: local });

    let t = Instant::now();
    let frames = match target_call(rig, TargetOp::PcapStop)? {
        TargetReply::Pcap { frames, .. } => frames,
        other => bail!("roce-target pcap_stop: unexpected {other:?}"),
    };
    let (decoded, detail) = tshark_check(Path::new(&pcap));
    suite.record(
        checks::PCAP_DECODES_CLEANLY,
        frames > 0 && decoded,
        format!("{frames} frames in {pcap}: {detail}"),
        t.elapsed(),
    );
    Ok(())
}

/// Decodes a capture with tshark: RoCEv2 frames (InfiniBand over UDP 4791) must be there and
/// no frame may be malformed. The guest's own IPv6 housekeeping (ND, MLD) is captured too;
/// the target drops it, and it only has to decode.
fn tshark_check(pcap: &Path) -> (bool, String) {
    let output = std::process::Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args([
            "-T",
            "fields",
            "-e",
            "frame.protocols",
            "-e",
            "_ws.malformed",
            "-e",
            "_ws.expert.message",
        ])
        .output();
    let output = match output {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return (
                false,
                format!(
                    "tshark failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            )
        }
        Err(e) => {
            return (
                false,
                format!("running tshark (install it with `make deps`): {e}"),
            )
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let roce = lines.iter().filter(|l| l.contains("infiniband")).count();
    let malformed: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("malformed") || l.contains("Malformed"))
        .collect();
    // Decoded is what matters; the protocols expected are RoCEv2, ARP and the guest's IPv6
    // housekeeping (ND, MLD), which may or may not fall into the capture.
    let unknown: Vec<&&str> = lines
        .iter()
        .filter(|l| !["infiniband", "arp", "ipv6"].iter().any(|p| l.contains(p)))
        .collect();
    (
        roce > 0 && malformed.is_empty() && unknown.is_empty(),
        format!(
            "{} frames decoded, {roce} RoCEv2, malformed {malformed:?}, other {unknown:?}",
            lines.len()
        ),
    )
}

// ---------------------------------------------------------------- revoke windows

/// How a revoke window is opened and closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Window {
    /// VFIO_DEVICE_RESET, held open by nvme-cmb's reset duration.
    VfioReset,
    /// Initiate FLR in the PCIe Device Control register, written through VFIO's config region.
    ConfigFlr,
    /// VFIO_DEVICE_PCI_HOT_RESET: a secondary bus reset through the switch's downstream port.
    HotReset,
    /// PCI_COMMAND memory decode cleared, then set again.
    MemoryDecodeOff,
    /// PMCSR PowerState D3hot, then D0.
    D3Hot,
    /// The VFIO device fd closed while the dma-buf and its MR stay; no restore.
    DeviceClose,
}

impl Window {
    /// Reset-like windows: the device holds the reset while the request is in flight.
    fn is_reset(self) -> bool {
        matches!(
            self,
            Window::VfioReset | Window::ConfigFlr | Window::HotReset
        )
    }
}

/// One entry point per window: the scenario registry holds plain fn pointers.
macro_rules! window_scenarios {
    ($($name:ident => $window:expr),* $(,)?) => {$(
        pub fn $name(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
            with_held(rig, |rig, held| revoke_window(rig, env, suite, held, $window))
        }
    )*};
}

window_scenarios! {
    run_revoke_on_vfio_reset => Window::VfioReset,
    run_revoke_on_flr => Window::ConfigFlr,
    run_revoke_on_hot_reset => Window::HotReset,
    run_revoke_on_mem_disable => Window::MemoryDecodeOff,
    run_revoke_on_d3 => Window::D3Hot,
    run_revoke_on_close => Window::DeviceClose,
}

/// Capability offsets in config space, from the capability list (PCI 3.0 6.7).
fn find_capability(rig: &mut Rig, device: u32, id: u64) -> Result<u64> {
    let mut pointer = config_read(rig, device, 0x34, 1)? & 0xfc;
    for _ in 0..48 {
        if pointer == 0 {
            break;
        }
        if config_read(rig, device, pointer, 1)? == id {
            return Ok(pointer);
        }
        pointer = config_read(rig, device, pointer + 1, 1)? & 0xfc;
    }
    bail!("capability {id:#04x} not in the function's capability list")
}

/// Clears PCI_COMMAND's memory bit; returns the command register as it was.
pub(crate) fn clear_memory_decode(rig: &mut Rig, device: u32) -> Result<u64> {
    let command = config_read(rig, device, 4, 2)?;
    config_write(
        rig,
        device,
        4,
        2,
        command & !0x2,
        "clear PCI_COMMAND memory",
    )?;
    Ok(command)
}

pub(crate) fn config_write(
    rig: &mut Rig,
    device: u32,
    offset: u64,
    width: u8,
    value: u64,
    what: &str,
) -> Result<()> {
    ok(
        rig.agent_call(
            AgentOp::ConfigWrite {
                device,
                offset,
                width,
                value,
            },
            RPC,
        )?,
        what,
    )?;
    Ok(())
}

/// Opens the window; returns the id of a request still in flight (a held reset).
fn open_window(rig: &mut Rig, device: u32, window: Window, since: u64) -> Result<Option<u64>> {
    let request = match window {
        Window::VfioReset => Some(AgentOp::VfioReset { device }),
        Window::HotReset => Some(AgentOp::VfioHotReset { device }),
        Window::ConfigFlr => {
            let pcie = find_capability(rig, device, 0x10)?;
            let devctl = config_read(rig, device, pcie + 8, 2)?;
            // PCIe 6.1 7.5.3.4: Device Control bit 15, Initiate Function Level Reset.
            Some(AgentOp::ConfigWrite {
                device,
                offset: pcie + 8,
                width: 2,
                value: devctl | 0x8000,
            })
        }
        Window::MemoryDecodeOff => {
            clear_memory_decode(rig, device)?;
            None
        }
        Window::D3Hot => {
            let pm = find_capability(rig, device, 0x01)?;
            let pmcsr = config_read(rig, device, pm + 4, 2)?;
            config_write(rig, device, pm + 4, 2, (pmcsr & !0x3) | 0x3, "PMCSR D3hot")?;
            None
        }
        Window::DeviceClose => {
            ok(
                rig.agent_call(AgentOp::VfioClose { device }, RPC)?,
                "close the VFIO device",
            )?;
            None
        }
    };
    let Some(op) = request else { return Ok(None) };
    expect_done(rig.device_call(DeviceOp::SetResetDuration {
        ms: RESET_WINDOW_MS,
    })?)?;
    let id = rig.agent_start(op)?;
    let filter = EventFilter {
        kind: Some("reset_start".into()),
        ..EventFilter::default()
    };
    match rig.device_call(DeviceOp::WaitFor {
        filter,
        since: Some(since),
        timeout_ms: 5000,
    })? {
        DeviceReply::WaitResult { event: Some(_), .. } => Ok(Some(id)),
        other => bail!("the device never entered reset after {window:?}: {other:?}"),
    }
}

/// Closes the window; returns when (guest CLOCK_MONOTONIC) a held request returned.
fn close_window(
    rig: &mut Rig,
    device: u32,
    window: Window,
    request: Option<u64>,
) -> Result<Option<u64>> {
    let mut returned_ns = None;
    if let Some(id) = request {
        let (reply, done_ns) = rig.agent_finish_stamped(id, RPC)?;
        ok(reply, &format!("{window:?}"))?;
        returned_ns = done_ns;
        expect_done(rig.device_call(DeviceOp::SetResetDuration { ms: 0 })?)?;
    }
    match window {
        Window::MemoryDecodeOff => {
            let command = config_read(rig, device, 4, 2)?;
            config_write(rig, device, 4, 2, command | 0x2, "set PCI_COMMAND memory")?;
        }
        Window::D3Hot => {
            let pm = find_capability(rig, device, 0x01)?;
            let pmcsr = config_read(rig, device, pm + 4, 2)?;
            config_write(rig, device, pm + 4, 2, pmcsr & !0x3, "PMCSR D0")?;
        }
        _ => {}
    }
    Ok(returned_ns)
}

fn revoke_window(
    rig: &mut Rig,
    env: &ScenarioEnv,
    suite: &mut Suite,
    held: &mut Held,
    window: Window,
) -> Result<()> {
    let t = Instant::now();
    let DoorbellMr {
        device,
        context,
        lb,
        mr,
        rkey,
    } = doorbell_mr(rig, env, held)?;
    let before = ring(rig, &lb, rkey, 1, 1)?;
    suite.record(
        checks::WRITE_LANDS_BEFORE_THE_WINDOW,
        before.landed(),
        before.detail(),
        t.elapsed(),
    );
    // The remote RDMA peer, on the same PD as the MR: the NIC side of the P2P path.
    let (_, _, target_qpn) = connect_to_target(rig, context, lb.pd(), held)?;

    let t = Instant::now();
    let window_seq = last_seq(rig)?;
    let request = open_window(rig, device, window, window_seq)?;
    // Both writes go out at once, the remote one first: it does not wait for the agent.
    let target_posted = target_post_write(
        rig,
        target_qpn,
        &10u64.to_le_bytes(),
        SQ1TDBL - PAGE,
        rkey,
        2,
    )?;
    let target_posted_ns = target_posted.posted_ns;
    let id = post_start(
        rig,
        &lb,
        SendOpcode::RdmaWrite,
        &9u64.to_le_bytes(),
        SQ1TDBL - PAGE,
        rkey,
        2,
    )?;
    ok(rig.agent_finish(id, RPC)?, "post_send")?;
    // An upper bound: ibv_post_send had returned when its reply arrived.
    let posted_ns = crate::rig::client::mono_ns();
    let (wc, refused_guest_ns) = poll_one_stamped(rig, lb.cq_a, 5000)?;
    suite.record(
        checks::WRITE_IN_WINDOW_GETS_REMOTE_ACCESS_ERROR,
        matches!(&wc, Some(c) if c.status == IBV_WC_REM_ACCESS_ERR),
        status_text(&wc),
        t.elapsed(),
    );
    let target_wc = target_complete(rig, target_posted)?;
    suite.record(
        checks::TARGET_WRITE_IN_WINDOW_IS_NAK_0X62,
        matches!(&target_wc, Some(c) if c.status == CompletionStatus::RemoteAccessError
            && c.nak_code == Some(0x62)),
        format!("{target_wc:?}"),
        t.elapsed(),
    );
    let _ = target_call(rig, TargetOp::DestroyQp { qpn: target_qpn });

    let t = Instant::now();
    let returned_guest_ns = close_window(rig, device, window, request)?;
    let in_window: Vec<Event> = doorbell_events(rig, window_seq)?;
    if window == Window::HotReset {
        // QEMU does not run the guest while its vfio-user device is in a bus reset (measured:
        // even an agent request that touches no device waits for the reset's end), so no
        // access can overlap the device's reset; what is held open is the revoke, which lasts
        // until the ioctl returns, after vfio-pci restored the function. Both stamps are the
        // guest's clock.
        suite.record(
            checks::WRITE_REFUSED_BEFORE_THE_HOT_RESET_RETURNED,
            matches!((refused_guest_ns, returned_guest_ns), (Some(r), Some(e)) if r < e),
            format!(
                "loopback completion polled at {refused_guest_ns:?} ns, hot reset ioctl \
                 returned at {returned_guest_ns:?} ns (guest clock)"
            ),
            t.elapsed(),
        );
    } else if window != Window::DeviceClose {
        let window_end = window_end_ns(&events_since(rig, window_seq)?, window);
        suite.record(
            checks::WINDOW_WAS_OPEN_WHEN_THE_WRITES_WERE_POSTED,
            window_end.is_some_and(|end| end > posted_ns.max(target_posted_ns)),
            format!(
                "loopback write posted by {posted_ns} ns, target write by {target_posted_ns} ns, \
                 device window closed at {window_end:?} ns"
            ),
            t.elapsed(),
        );
    }
    let reached: Vec<&Event> = in_window
        .iter()
        .filter(|e| {
            matches!(
                &e.kind,
                EventKind::Bar {
                    access: BarAccess::Write,
                    ..
                } | EventKind::Violation { .. }
            )
        })
        .collect();
    suite.record(
        checks::NO_IMPORTER_ACCESS_REACHES_THE_DEVICE,
        reached.is_empty(),
        if reached.is_empty() {
            "none".into()
        } else {
            serde_json::to_string(&reached).unwrap_or_default()
        },
        Duration::ZERO,
    );

    let t = Instant::now();
    if window == Window::DeviceClose {
        // Nothing comes back after close; what must hold is that the MR can still go.
        let dereg = rig.agent_call(AgentOp::DeregMr { mr }, RPC)?;
        suite.record(
            checks::DEREG_AFTER_CLOSE_IS_SAFE,
            dereg.is_ok(),
            format!("{dereg:?}"),
            t.elapsed(),
        );
        return Ok(());
    }
    // After the window: fresh QPs (the old ones are in error), the same MR.
    let lb = reconnect(rig, context, &lb, held)?;
    let after = ring(rig, &lb, rkey, 11, 3)?;
    suite.record(
        checks::IMPORTER_MAPS_AGAIN_AFTER_RESTORE,
        after.landed(),
        after.detail(),
        t.elapsed(),
    );
    let t = Instant::now();
    let (_, _, target_qpn) = connect_to_target(rig, context, lb.pd(), held)?;
    let (target_wc, events) = target_ring(rig, target_qpn, rkey, 12, 4)?;
    let (value, only_these) = written_qword(&events, SQ1TDBL);
    suite.record(
        checks::TARGET_WRITE_LANDS_AFTER_RESTORE,
        matches!(&target_wc, Some(c) if c.status == CompletionStatus::Success)
            && value == Some(12)
            && only_these,
        format!(
            "{target_wc:?}; device at BAR0+{SQ1TDBL:#x}: {}",
            describe(&events)
        ),
        t.elapsed(),
    );
    let _ = target_call(rig, TargetOp::DestroyQp { qpn: target_qpn });
    Ok(())
}

fn window_end_ns(events: &[Event], window: Window) -> Option<u64> {
    events
        .iter()
        .find(|e| match (&e.kind, window) {
            (EventKind::ResetEnd { .. }, w) => w.is_reset(),
            (EventKind::Decode { enabled: true }, w) => w == Window::MemoryDecodeOff,
            (EventKind::PowerState { state: 0 }, w) => w == Window::D3Hot,
            _ => false,
        })
        .map(|e| e.mono_ns)
}

pub(crate) fn config_read(rig: &mut Rig, device: u32, offset: u64, width: u8) -> Result<u64> {
    match ok(
        rig.agent_call(
            AgentOp::ConfigRead {
                device,
                offset,
                width,
            },
            RPC,
        )?,
        "config read",
    )? {
        AgentReply::Value { value } => Ok(value),
        other => bail!("config read: unexpected {other:?}"),
    }
}

pub(crate) fn expect_done(reply: DeviceReply) -> Result<()> {
    match reply {
        DeviceReply::Done => Ok(()),
        other => bail!("nvme-cmb: unexpected {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(seq: u64, offset: u64, size: u32, value: u64) -> Event {
        Event {
            seq,
            mono_ns: seq,
            generation: 0,
            kind: EventKind::Bar {
                access: BarAccess::Write,
                bar: 0,
                offset,
                size,
                value: Some(value),
                data: None,
            },
        }
    }

    #[test]
    fn one_qword_or_two_dwords_make_the_same_value() {
        assert_eq!(
            written_qword(&[write(1, 0x1008, 8, 7)], 0x1008),
            (Some(7), true)
        );
        assert_eq!(
            written_qword(&[write(1, 0x1008, 4, 7), write(2, 0x100c, 4, 0)], 0x1008),
            (Some(7), true)
        );
    }

    #[test]
    fn partial_or_stray_writes_do_not_count() {
        assert_eq!(
            written_qword(&[write(1, 0x1008, 4, 7)], 0x1008).0,
            None,
            "upper half missing"
        );
        let (value, only) =
            written_qword(&[write(1, 0x1008, 8, 7), write(2, 0x1000, 4, 1)], 0x1008);
        assert_eq!(value, Some(7));
        assert!(!only, "a write to SQ0TDBL is a stray access");
    }
}
