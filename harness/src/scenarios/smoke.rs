//! The smoke scenario: export BAR0's doorbell page as a dma-buf, check an unaligned slice is
//! refused, ring SQ0's tail doorbell through the VFIO mmap, and prove from the device's own
//! event log that exactly that one write arrived.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply};
use p2prig_protocol::device::{DeviceOp, DeviceReply};
use p2prig_protocol::event::{Access, Event, EventKind};

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::ScenarioEnv;

const NVME_CLASS: u32 = 0x010802;
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
const DOORBELL_PAGE: u64 = 0x1000;
const PAGE: u64 = 0x1000;
const SQ0TDBL: u64 = 0x1000;
const EINVAL: i32 = 22;

/// Runs the checks, recording each in `suite`. A failed step that later steps depend on
/// ends the scenario early (recorded as a failure).
pub fn run(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    let uapi = env.uapi;
    let t = Instant::now();
    let hello = rig.agent_call(AgentOp::Hello, RPC_TIMEOUT)?;
    let kernel_release = match &hello {
        Ok(AgentReply::Hello { kernel_release, .. }) => Some(kernel_release.clone()),
        _ => None,
    };
    suite.record(
        checks::AGENT_HELLO,
        kernel_release.as_ref().is_some_and(|r| !r.is_empty()),
        match &kernel_release {
            Some(release) => format!("guest kernel {release}"),
            None => err_text(&hello),
        },
        t.elapsed(),
    );
    if kernel_release.is_none() {
        bail!("the guest agent does not answer hello");
    }

    let t = Instant::now();
    let functions = match expect(
        rig.agent_call(AgentOp::FindPci { class: NVME_CLASS }, RPC_TIMEOUT)?,
        "find_pci",
    )? {
        AgentReply::Pci { functions } => functions,
        other => bail!("find_pci: unexpected reply {other:?}"),
    };
    let ok = functions.len() == 1;
    suite.record(
        checks::NVME_FUNCTION_VISIBLE,
        ok,
        format!("class {NVME_CLASS:#08x} functions: {functions:?}"),
        t.elapsed(),
    );
    if !ok {
        bail!("the guest does not see exactly one NVMe function");
    }
    let bdf = functions[0].clone();

    let t = Instant::now();
    let bound = rig.agent_call(AgentOp::VfioBind { bdf: bdf.clone() }, RPC_TIMEOUT)?;
    suite.record(
        checks::BIND_VFIO_PCI,
        bound.is_ok(),
        err_text(&bound),
        t.elapsed(),
    );
    let opened = rig.agent_call(AgentOp::VfioOpen { bdf: bdf.clone() }, RPC_TIMEOUT)?;
    let device = match &opened {
        Ok(AgentReply::Device { device }) => Some(*device),
        _ => None,
    };
    suite.record(
        checks::OPEN_VFIO_DEVICE,
        device.is_some(),
        match device {
            Some(_) => format!("{bdf} (noiommu)"),
            None => err_text(&opened),
        },
        t.elapsed(),
    );
    let Some(device) = device else {
        bail!("cannot open the VFIO device");
    };

    let t = Instant::now();
    let export = AgentOp::DmabufExport {
        device,
        bar: 0,
        offset: DOORBELL_PAGE,
        length: PAGE,
        uapi,
    };
    match rig.agent_call(export, RPC_TIMEOUT)? {
        Ok(AgentReply::Dmabuf { dmabuf, size }) => {
            suite.record(
                checks::EXPORT_DOORBELL_PAGE,
                size == PAGE,
                format!("dma-buf size {size}, expected {PAGE}"),
                t.elapsed(),
            );
            let _ = rig.agent_call(AgentOp::DmabufClose { dmabuf }, RPC_TIMEOUT)?;
        }
        other => suite.record(
            checks::EXPORT_DOORBELL_PAGE,
            false,
            err_text(&other),
            t.elapsed(),
        ),
    }

    let t = Instant::now();
    let unaligned = AgentOp::DmabufExport {
        device,
        bar: 0,
        offset: DOORBELL_PAGE + 4,
        length: PAGE,
        uapi,
    };
    match rig.agent_call(unaligned, RPC_TIMEOUT)? {
        Err(e) => suite.record(
            checks::EXPORT_UNALIGNED_IS_EINVAL,
            e.errno == EINVAL,
            format!("errno {} ({})", e.errno, e.message),
            t.elapsed(),
        ),
        Ok(reply) => suite.record(
            checks::EXPORT_UNALIGNED_IS_EINVAL,
            false,
            format!("export succeeded: {reply:?}"),
            t.elapsed(),
        ),
    }

    let t = Instant::now();
    let baseline = last_seq(rig)?;
    let write = AgentOp::BarWrite {
        device,
        bar: 0,
        offset: SQ0TDBL,
        width: 4,
        value: 5,
    };
    let wrote = rig.agent_call(write, RPC_TIMEOUT)?;
    if wrote.is_err() {
        suite.record(
            checks::DOORBELL_WRITE_LANDS,
            false,
            err_text(&wrote),
            t.elapsed(),
        );
        return Ok(());
    }
    let events = doorbell_events_after(rig, baseline)?;
    let (ok, detail) = judge_doorbell(&events, SQ0TDBL, 5);
    suite.record(checks::DOORBELL_WRITE_LANDS, ok, detail, t.elapsed());
    let _ = rig.agent_call(AgentOp::VfioClose { device }, RPC_TIMEOUT)?;
    Ok(())
}

fn expect(
    reply: std::result::Result<AgentReply, p2prig_protocol::wire::ErrorReply>,
    what: &str,
) -> Result<AgentReply> {
    reply.map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

fn err_text<T: std::fmt::Debug>(
    r: &std::result::Result<T, p2prig_protocol::wire::ErrorReply>,
) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => e.to_string(),
    }
}

fn last_seq(rig: &mut Rig) -> Result<u64> {
    match rig.device_call(DeviceOp::EventsSince {
        since: u64::MAX,
        limit: Some(0),
    })? {
        DeviceReply::Events { last_seq, .. } => Ok(last_seq),
        other => bail!("nvme-cmb: unexpected reply {other:?}"),
    }
}

/// Doorbell-page events after `since`: waits until at least one arrived (writes are posted,
/// so they reach the device after the guest's store retires), then a short quiet period so a
/// duplicate or stray access would be caught too.
fn doorbell_events_after(rig: &mut Rig, since: u64) -> Result<Vec<Event>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut found: Vec<Event> = Vec::new();
    let mut quiet_until: Option<Instant> = None;
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
        found.extend(events.into_iter().filter(in_doorbell_page));
        if found.len() > before {
            quiet_until = Some(Instant::now() + Duration::from_millis(500));
        }
        match quiet_until {
            Some(t) if Instant::now() >= t => return Ok(found),
            None if Instant::now() >= deadline => return Ok(found),
            _ => {}
        }
        crate::rig::process::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn in_doorbell_page(event: &Event) -> bool {
    matches!(&event.kind,
        EventKind::Bar { bar: 0, offset, .. } | EventKind::Violation { bar: 0, offset, .. }
            if (DOORBELL_PAGE..DOORBELL_PAGE + PAGE).contains(offset))
}

/// Exactly one 4-byte write of `value` at `offset`, and nothing else in the doorbell page.
pub fn judge_doorbell(events: &[Event], offset: u64, value: u64) -> (bool, String) {
    let matching = events.iter().filter(|e| {
        matches!(&e.kind, EventKind::Bar { access: Access::Write, bar: 0, offset: o, size: 4, value: Some(v), .. }
            if *o == offset && *v == value)
    });
    let count = matching.count();
    let ok = count == 1 && events.len() == 1;
    let detail = if ok {
        format!(
            "one 4-byte write of {value} at BAR0+{offset:#x} (event seq {})",
            events[0].seq
        )
    } else {
        format!(
            "expected exactly one 4-byte write of {value} at BAR0+{offset:#x} and nothing else in the doorbell page; saw {} matching among {} events: {}",
            count,
            events.len(),
            serde_json::to_string(events).unwrap_or_default()
        )
    };
    (ok, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar_event(seq: u64, access: Access, offset: u64, size: u32, value: u64) -> Event {
        Event {
            seq,
            mono_ns: seq * 10,
            generation: 0,
            kind: EventKind::Bar {
                access,
                bar: 0,
                offset,
                size,
                value: Some(value),
                data: None,
            },
        }
    }

    #[test]
    fn single_matching_write_passes() {
        let events = vec![bar_event(4, Access::Write, 0x1000, 4, 5)];
        assert!(judge_doorbell(&events, 0x1000, 5).0);
    }

    #[test]
    fn missing_duplicate_wrong_value_or_stray_access_fails() {
        assert!(!judge_doorbell(&[], 0x1000, 5).0, "nothing arrived");
        let dup = vec![
            bar_event(4, Access::Write, 0x1000, 4, 5),
            bar_event(5, Access::Write, 0x1000, 4, 5),
        ];
        assert!(!judge_doorbell(&dup, 0x1000, 5).0, "two writes");
        assert!(
            !judge_doorbell(&[bar_event(4, Access::Write, 0x1000, 4, 6)], 0x1000, 5).0,
            "wrong value"
        );
        assert!(
            !judge_doorbell(&[bar_event(4, Access::Write, 0x1000, 2, 5)], 0x1000, 5).0,
            "wrong size"
        );
        let stray = vec![
            bar_event(4, Access::Write, 0x1000, 4, 5),
            bar_event(5, Access::Read, 0x1008, 4, 0),
        ];
        assert!(
            !judge_doorbell(&stray, 0x1000, 5).0,
            "stray read in the page"
        );
    }

    #[test]
    fn only_doorbell_page_events_are_considered() {
        assert!(in_doorbell_page(&bar_event(1, Access::Write, 0x1ffc, 4, 0)));
        assert!(
            !in_doorbell_page(&bar_event(1, Access::Write, 0x14, 4, 0)),
            "CC register is page 0"
        );
        assert!(!in_doorbell_page(&bar_event(
            1,
            Access::Write,
            0x2000,
            4,
            0
        )));
    }
}
