//! nvme-cmb's side of the bus: its event log since a mark, the doorbell MR and the oracle that
//! a doorbell write landed exactly once with the value written.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use p2prig_protocol::agent::{Completion, SendOpcode};
use p2prig_protocol::device::{DeviceOp, DeviceReply};
use p2prig_protocol::event::{Access as BarAccess, Event, EventKind};

use crate::rig::Rig;
use crate::scenarios::ScenarioEnv;

use super::*;

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
pub(crate) fn doorbell_events(rig: &mut Rig, since: u64) -> Result<Vec<Event>> {
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
    pub(crate) completion: Option<Completion>,
    /// Doorbell-page events the write caused.
    pub(crate) events: Vec<Event>,
    pub(crate) value: u64,
}

impl Ring {
    pub(crate) fn succeeded(&self) -> bool {
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
pub(crate) fn written_qword(events: &[Event], offset: u64) -> (Option<u64>, bool) {
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

pub(crate) fn describe(events: &[Event]) -> String {
    serde_json::to_string(events).unwrap_or_default()
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
