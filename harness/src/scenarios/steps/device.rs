//! nvme-cmb's side of the bus: its event log since a mark, the doorbell MR and the oracle that
//! a doorbell write landed exactly once with the value written (judged by `oracles`).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use p2prig_protocol::agent::{Completion, SendOpcode};
use p2prig_protocol::device::{DeviceOp, DeviceReply};
use p2prig_protocol::event::Event;

use crate::rig::Rig;
use crate::scenarios::ScenarioEnv;

use super::*;
use crate::scenarios::oracles;

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

/// How long the doorbell page must stay quiet before its events are judged: posted writes
/// reach the device after the store (or the RDMA completion) the guest saw, and a duplicate or
/// stray access must have had the time to show too.
const QUIET: Duration = Duration::from_millis(500);

/// BAR0 doorbell-page accesses (and violations there) after `since`, once the page has been
/// quiet for [`QUIET`]: as soon as that if nothing comes (a refused write), later if events
/// keep arriving.
pub(crate) fn doorbell_events(rig: &mut Rig, since: u64) -> Result<Vec<Event>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut found: Vec<Event> = Vec::new();
    let mut quiet_until = Instant::now() + QUIET;
    let mut cursor = since;
    loop {
        let DeviceReply::Events {
            events, last_seq, ..
        } = rig.device_call(DeviceOp::EventsSince {
            since: cursor,
            limit: None,
        })?
        else {
            bail!("nvme-cmb: unexpected reply to events_since");
        };
        cursor = last_seq.max(cursor);
        let before = found.len();
        found.extend(events.into_iter().filter(oracles::in_doorbell_page));
        if found.len() > before {
            quiet_until = Instant::now() + QUIET;
        }
        if Instant::now() >= quiet_until || Instant::now() >= deadline {
            return Ok(found);
        }
        crate::rig::process::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(50));
    }
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
    pub(crate) completion: Option<Completion>,
    /// Doorbell-page events the write caused.
    pub(crate) events: Vec<Event>,
    pub(crate) value: u64,
}

impl Ring {
    pub(crate) fn succeeded(&self) -> bool {
        oracles::wc_succeeded(&self.completion)
    }

    /// The write completed and the device saw exactly it, nothing else in the page.
    pub(crate) fn landed(&self) -> bool {
        self.succeeded() && oracles::written(&self.events, SQ1TDBL, 8).exactly(self.value)
    }

    pub(crate) fn detail(&self) -> String {
        format!(
            "{}; device at BAR0+{SQ1TDBL:#x}: {}",
            status_text(&self.completion),
            oracles::describe(&self.events)
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
