//! Runs a program on a booted rig and records what each operation did: its result, for a
//! write where it was aimed, the value it carried and when it completed, and for a held
//! reset when its request returned. Judging is `oracle`'s; this module only observes.
//!
//! The executor keeps the model in step with the rig: an export or registration the kernel
//! refused against the prediction is forgotten by the model, one it accepted against the
//! prediction is undone at once, so the rest of the program means what it says.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use p2prig_protocol::agent::{AgentOp, AgentReply, DmabufUapi, SendOpcode};
use p2prig_protocol::event::Event;
use p2prig_protocol::target::TargetOp;

use crate::rig::client::mono_ns;
use crate::rig::Rig;
use crate::scenarios::oracles;
use crate::scenarios::steps::*;
use crate::scenarios::windows::{self, close_window, open_window_held};

use super::model::{Model, Predicted, Window, RESTORE_SETTLE_MS};
use super::program::{Op, Program, ResetKind, Slice, SLOTS};

/// How long the device log must stay quiet before a program's events are judged: QEMU posts
/// vfio-user region writes, which reach nvme-cmb after the guest saw its completion.
const QUIET: Duration = Duration::from_millis(500);

/// The boot-long part of the rig a program uses: rxe0 open, one PD for every MR and QP, and a
/// loopback pair and a roce-target connection, replaced whenever a refused access left them
/// in the error state.
pub struct Fixture {
    context: u32,
    pd: u32,
    held: Held,
    lb: Option<(Loopback, Held)>,
    target: Option<(u32, Held)>,
    uapi: DmabufUapi,
}

impl Fixture {
    pub fn set_up(rig: &mut Rig, uapi: DmabufUapi) -> Result<Fixture> {
        let mut held = Held::default();
        let context = rdma_up(rig, &mut held)?;
        let pd = alloc_pd(rig, context, &mut held)?;
        Ok(Fixture {
            context,
            pd,
            held,
            lb: None,
            target: None,
            uapi,
        })
    }

    pub fn tear_down(mut self, rig: &mut Rig) -> Result<()> {
        self.drop_loopback(rig)?;
        self.drop_target(rig)?;
        self.held.release(rig)
    }

    fn loopback(&mut self, rig: &mut Rig) -> Result<&Loopback> {
        if self.lb.is_none() {
            let mut held = Held::default();
            let lb = connect_pair_on(rig, self.context, self.pd, &mut held)?;
            self.lb = Some((lb, held));
        }
        match &self.lb {
            Some((lb, _)) => Ok(lb),
            None => bail!("the loopback pair did not connect"),
        }
    }

    fn drop_loopback(&mut self, rig: &mut Rig) -> Result<()> {
        match self.lb.take() {
            Some((_, held)) => held.release(rig),
            None => Ok(()),
        }
    }

    fn target_qpn(&mut self, rig: &mut Rig) -> Result<u32> {
        if self.target.is_none() {
            let mut held = Held::default();
            let (_, _, qpn) = connect_to_target(rig, self.context, self.pd, &mut held)?;
            self.target = Some((qpn, held));
        }
        match &self.target {
            Some((qpn, _)) => Ok(*qpn),
            None => bail!("the roce-target connection did not come up"),
        }
    }

    fn drop_target(&mut self, rig: &mut Rig) -> Result<()> {
        match self.target.take() {
            Some((qpn, held)) => {
                let _ = target_call(rig, TargetOp::DestroyQp { qpn });
                held.release(rig)
            }
            None => Ok(()),
        }
    }
}

/// How a write completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteStatus {
    Success,
    /// The loopback write's remote access error, or roce-target's NAK 0x62.
    Refused,
    /// Anything else: another status, another NAK, no completion.
    Other(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct WriteAccess {
    pub value: u64,
    pub bar: u8,
    pub offset: u64,
    pub status: WriteStatus,
    /// Host CLOCK_MONOTONIC when the completion was in hand.
    pub completed_ns: u64,
    /// The held reset it was posted in (an index into [`Execution::resets`]).
    pub reset: Option<usize>,
}

/// What an operation did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Observed {
    Ok,
    Errno {
        errno: i32,
        message: String,
    },
    Write(WriteAccess),
    /// Not run: its object is missing, because an earlier divergence kept it from existing.
    Skipped(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Index in the program; cleanup steps after it have `None`.
    pub index: Option<usize>,
    pub op: String,
    #[serde(skip)]
    pub op_value: Option<Op>,
    pub predicted: Predicted,
    /// The window open when it ran, or the one that closed last before it (`after`).
    pub window: Option<Window>,
    pub after: Option<Window>,
    pub observed: Observed,
    pub took_ms: u64,
    /// Host CLOCK_MONOTONIC when its result was in hand.
    pub completed_ns: u64,
    /// The held reset it ran in (an index into [`Execution::resets`]).
    pub reset: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResetRecord {
    pub kind: ResetKind,
    /// The device log's last sequence number before the reset began.
    pub since_seq: u64,
    /// Host clock: when the device logged the reset's end.
    pub device_end_ns: Option<u64>,
}

/// A program's run: every operation's record, the device's log, the console.
#[derive(Debug, Clone, Serialize)]
pub struct Execution {
    pub records: Vec<Record>,
    pub resets: Vec<ResetRecord>,
    #[serde(skip)]
    pub events: Vec<Event>,
    pub console: String,
    /// The operation the executor could not complete, and why.
    pub stopped: Option<(usize, String)>,
    pub healthy: bool,
    pub took_ms: u64,
}

struct Objects {
    device: Option<u32>,
    bufs: [Option<(u32, Slice)>; SLOTS as usize],
    mrs: [Option<(u32, u32, Slice)>; SLOTS as usize],
    reset: Option<(u64, ResetKind, usize)>,
}

/// Runs `program` from a freshly opened device; `run` makes the values its writes carry
/// unique across the campaign.
pub fn execute(rig: &mut Rig, fx: &mut Fixture, program: &Program, run: u64) -> Result<Execution> {
    let started = Instant::now();
    let mark = last_seq(rig)?;
    let console_mark = rig.console_mark();
    let mut objects = Objects {
        device: Some(open_nvme(rig)?),
        bufs: [None; SLOTS as usize],
        mrs: [None; SLOTS as usize],
        reset: None,
    };
    let mut model = Model::with_uapi(fx.uapi);
    let mut records = Vec::new();
    let mut resets = Vec::new();
    let mut stopped = None;
    let mut after = None;
    for (index, op) in program.ops.iter().enumerate() {
        let window = model.window();
        let predicted = model.step(op);
        let t = Instant::now();
        let value = 0xf022_0000_0000_0000 | (run & 0xffff_ffff) << 16 | index as u64;
        let reset = objects.reset.map(|(_, _, i)| i);
        match run_op(rig, fx, &mut objects, &mut resets, op, value) {
            Ok(observed) => {
                let completed_ns = mono_ns();
                keep_in_step(rig, &mut model, &mut objects, op, predicted, &observed)?;
                records.push(Record {
                    index: Some(index),
                    op: op.to_string(),
                    op_value: Some(*op),
                    predicted,
                    window,
                    after,
                    observed,
                    took_ms: t.elapsed().as_millis() as u64,
                    completed_ns,
                    reset,
                });
            }
            Err(e) => {
                crate::rig::process::check_interrupted()?;
                stopped = Some((index, format!("{e:#}")));
                break;
            }
        }
        if let (Some(w), None) = (window, model.window()) {
            after = Some(w);
            std::thread::sleep(Duration::from_millis(RESTORE_SETTLE_MS));
        }
    }
    let healthy = rig.healthy();
    if healthy {
        clean_up(rig, &mut objects, &mut records, after)?;
    }
    let events = if healthy {
        quiet_events(rig, mark)?
    } else {
        Vec::new()
    };
    for record in &mut resets {
        record.device_end_ns = reset_end_after(&events, record.since_seq);
    }
    Ok(Execution {
        records,
        resets,
        events,
        console: rig.console_since(console_mark),
        stopped,
        healthy,
        took_ms: started.elapsed().as_millis() as u64,
    })
}

fn run_op(
    rig: &mut Rig,
    fx: &mut Fixture,
    objects: &mut Objects,
    resets: &mut Vec<ResetRecord>,
    op: &Op,
    value: u64,
) -> Result<Observed> {
    let device = || objects.device.ok_or_else(|| anyhow!("no open device"));
    Ok(match *op {
        Op::Export { buf, slice } => {
            let (bar, offset, length) = slice.request();
            let reply = rig.agent_call(
                AgentOp::DmabufExport {
                    device: device()?,
                    bar,
                    offset,
                    length,
                    uapi: fx.uapi,
                },
                RPC,
            )?;
            match reply {
                Ok(AgentReply::Dmabuf { dmabuf, .. }) => {
                    objects.bufs[usize::from(buf)] = Some((dmabuf, slice));
                    Observed::Ok
                }
                Ok(other) => bail!("export: unexpected {other:?}"),
                Err(e) => errno(e),
            }
        }
        Op::CloseBuf { buf } => match objects.bufs[usize::from(buf)].take() {
            Some((dmabuf, _)) => agent_done(rig, AgentOp::DmabufClose { dmabuf })?,
            None => Observed::Skipped("its export failed".into()),
        },
        Op::Reg { mr, buf } => {
            let Some((dmabuf, slice)) = objects.bufs[usize::from(buf)] else {
                return Ok(Observed::Skipped("its export failed".into()));
            };
            let mut untracked = Held::default();
            match reg_dmabuf_reply(rig, &mut untracked, fx.pd, dmabuf, 0, slice.request().2)? {
                Ok(AgentReply::Mr {
                    mr: handle, rkey, ..
                }) => {
                    objects.mrs[usize::from(mr)] = Some((handle, rkey, slice));
                    Observed::Ok
                }
                Ok(other) => bail!("reg_dmabuf_mr: unexpected {other:?}"),
                Err(e) => errno(e),
            }
        }
        Op::Dereg { mr } => match objects.mrs[usize::from(mr)].take() {
            Some((handle, _, _)) => agent_done(rig, AgentOp::DeregMr { mr: handle })?,
            None => Observed::Skipped("its registration failed".into()),
        },
        Op::Write { mr, word } | Op::TargetWrite { mr, word } => {
            let Some((_, rkey, slice)) = objects.mrs[usize::from(mr)] else {
                return Ok(Observed::Skipped("its registration failed".into()));
            };
            let reset = objects.reset.map(|(_, _, i)| i);
            let target = matches!(op, Op::TargetWrite { .. });
            Observed::Write(write(rig, fx, target, rkey, slice, word, value, reset)?)
        }
        Op::Reset { kind, hold_ms } => {
            let since = last_seq(rig)?;
            let id =
                open_window_held(rig, device()?, scenario_window(kind), since, hold_ms.into())?
                    .ok_or_else(|| anyhow!("a reset without a request in flight"))?;
            resets.push(ResetRecord {
                kind,
                since_seq: since,
                device_end_ns: None,
            });
            objects.reset = Some((id, kind, resets.len() - 1));
            Observed::Ok
        }
        Op::ResetEnd => {
            let (id, kind, _) = objects
                .reset
                .take()
                .ok_or_else(|| anyhow!("no reset in flight"))?;
            close_window(rig, device()?, scenario_window(kind), Some(id))?;
            Observed::Ok
        }
        Op::DecodeOff => {
            clear_memory_decode(rig, device()?)?;
            Observed::Ok
        }
        Op::DecodeOn => {
            close_window(rig, device()?, windows::Window::MemoryDecodeOff, None)?;
            Observed::Ok
        }
        Op::D3 | Op::LowPowerEnter => {
            let window = match op {
                Op::D3 => windows::Window::D3Hot,
                _ => windows::Window::LowPower,
            };
            let since = last_seq(rig)?;
            open_window_held(rig, device()?, window, since, 0)?;
            Observed::Ok
        }
        Op::D0 | Op::LowPowerExit => {
            let window = match op {
                Op::D0 => windows::Window::D3Hot,
                _ => windows::Window::LowPower,
            };
            close_window(rig, device()?, window, None)?;
            Observed::Ok
        }
        Op::CloseDevice => {
            let device = objects
                .device
                .take()
                .ok_or_else(|| anyhow!("no open device"))?;
            agent_done(rig, AgentOp::VfioClose { device })?
        }
        Op::OpenDevice => {
            objects.device = Some(open_nvme(rig)?);
            Observed::Ok
        }
        Op::Sleep { ms } => {
            std::thread::sleep(Duration::from_millis(ms.into()));
            Observed::Ok
        }
    })
}

fn scenario_window(kind: ResetKind) -> windows::Window {
    match kind {
        ResetKind::Vfio => windows::Window::VfioReset,
        ResetKind::Flr => windows::Window::ConfigFlr,
        ResetKind::Hot => windows::Window::HotReset,
    }
}

fn errno(e: p2prig_protocol::wire::ErrorReply) -> Observed {
    Observed::Errno {
        errno: e.errno,
        message: e.message,
    }
}

fn agent_done(rig: &mut Rig, op: AgentOp) -> Result<Observed> {
    Ok(match rig.agent_call(op, RPC)? {
        Ok(_) => Observed::Ok,
        Err(e) => errno(e),
    })
}

/// Where a write through an MR of `slice` at `word` lands: (bar, offset in the BAR, offset in
/// the MR). The doorbell page takes SQ1TDBL whatever the word.
pub fn aim(slice: Slice, word: u16) -> (u8, u64, u64) {
    match slice {
        Slice::Cmb => (2, 0x1000 + u64::from(word) * 8, u64::from(word) * 8),
        _ => (0, SQ1TDBL, SQ1TDBL - PAGE),
    }
}

#[allow(clippy::too_many_arguments)]
fn write(
    rig: &mut Rig,
    fx: &mut Fixture,
    target: bool,
    rkey: u32,
    slice: Slice,
    word: u16,
    value: u64,
    reset: Option<usize>,
) -> Result<WriteAccess> {
    let (bar, offset, remote_addr) = aim(slice, word);
    let data = value.to_le_bytes();
    let status = if target {
        let qpn = fx.target_qpn(rig)?;
        let posted = target_post_write(rig, qpn, &data, remote_addr, rkey, value)?;
        let wc = target_complete(rig, posted)?;
        if oracles::target_acked(&wc) {
            WriteStatus::Success
        } else if oracles::target_nak_remote_access(&wc) {
            WriteStatus::Refused
        } else {
            WriteStatus::Other(format!("{wc:?}"))
        }
    } else {
        let lb = fx.loopback(rig)?;
        let (cq, id) = (
            lb.cq_a,
            post_start(
                rig,
                lb,
                SendOpcode::RdmaWrite,
                &data,
                remote_addr,
                rkey,
                value,
            )?,
        );
        ok(rig.agent_finish(id, RPC)?, "post_send")?;
        let wc = poll_one(rig, cq, 5000)?;
        if oracles::wc_succeeded(&wc) {
            WriteStatus::Success
        } else if oracles::wc_remote_access_error(&wc) {
            WriteStatus::Refused
        } else {
            WriteStatus::Other(status_text(&wc))
        }
    };
    let completed_ns = mono_ns();
    if status != WriteStatus::Success {
        // A refused access leaves the QP in the error state: the next write gets fresh ones.
        if target {
            fx.drop_target(rig)?;
        } else {
            fx.drop_loopback(rig)?;
        }
    }
    Ok(WriteAccess {
        value,
        bar,
        offset,
        status,
        completed_ns,
        reset,
    })
}

fn keep_in_step(
    rig: &mut Rig,
    model: &mut Model,
    objects: &mut Objects,
    op: &Op,
    predicted: Predicted,
    observed: &Observed,
) -> Result<()> {
    let worked = matches!(observed, Observed::Ok);
    match (*op, predicted == Predicted::Ok, worked) {
        (Op::Export { buf, .. }, true, false) => model.forget_buf(buf),
        (Op::Reg { mr, .. }, true, false) => model.forget_mr(mr),
        (Op::Export { buf, .. }, false, true) => {
            if let Some((dmabuf, _)) = objects.bufs[usize::from(buf)].take() {
                let _ = rig.agent_call(AgentOp::DmabufClose { dmabuf }, RPC)?;
            }
        }
        (Op::Reg { mr, .. }, false, true) => {
            if let Some((handle, _, _)) = objects.mrs[usize::from(mr)].take() {
                let _ = rig.agent_call(AgentOp::DeregMr { mr: handle }, RPC)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Releases what the program left: a reset still in flight (a program stopped early), its
/// MRs (deregistration must succeed: recorded and judged), its dma-buf fds and the device.
fn clean_up(
    rig: &mut Rig,
    objects: &mut Objects,
    records: &mut Vec<Record>,
    after: Option<Window>,
) -> Result<()> {
    if let Some((id, _, _)) = objects.reset.take() {
        let _ = rig.agent_finish(id, RPC)?;
        expect_done(
            rig.device_call(p2prig_protocol::device::DeviceOp::SetResetDuration { ms: 0 })?,
        )?;
    }
    for (slot, mr) in objects.mrs.iter_mut().enumerate() {
        if let Some((handle, _, _)) = mr.take() {
            let t = Instant::now();
            let observed = agent_done(rig, AgentOp::DeregMr { mr: handle })?;
            records.push(Record {
                index: None,
                op: format!("dereg {slot} (cleanup)"),
                op_value: Some(Op::Dereg { mr: slot as u8 }),
                predicted: Predicted::Ok,
                window: None,
                after,
                observed,
                took_ms: t.elapsed().as_millis() as u64,
                completed_ns: mono_ns(),
                reset: None,
            });
        }
    }
    for (dmabuf, _) in objects.bufs.iter_mut().filter_map(Option::take) {
        let _ = rig.agent_call(AgentOp::DmabufClose { dmabuf }, RPC)?;
    }
    if let Some(device) = objects.device.take() {
        let _ = rig
            .agent_call(AgentOp::VfioClose { device }, RPC)
            .context("closing the device after the program")?;
    }
    Ok(())
}

/// The device's events since `mark`, once its log has been quiet for [`QUIET`].
fn quiet_events(rig: &mut Rig, mark: u64) -> Result<Vec<Event>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = last_seq(rig)?;
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < QUIET && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = last_seq(rig)?;
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    events_since(rig, mark)
}

/// When the first reset after `since` ended (the held one: nothing else resets the device
/// while a reset is held, the model allows no device operation there).
fn reset_end_after(events: &[Event], since: u64) -> Option<u64> {
    events
        .iter()
        .find(|e| {
            e.seq > since && matches!(e.kind, p2prig_protocol::event::EventKind::ResetEnd { .. })
        })
        .map(|e| e.mono_ns)
}
