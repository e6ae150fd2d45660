//! The smoke scenario: export BAR0's doorbell page as a dma-buf, check an unaligned slice is
//! refused, ring SQ0's tail doorbell through the VFIO mmap, and prove from the device's own
//! event log that exactly that one write arrived.

use std::time::Instant;

use anyhow::{bail, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply};

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::oracles;
use crate::scenarios::steps::{doorbell_events, last_seq};
use crate::scenarios::steps::{NVME_CLASS, PAGE, RPC};
use crate::scenarios::ScenarioEnv;

const SQ0TDBL: u64 = 0x1000;
const EINVAL: i32 = 22;

/// Runs the checks, recording each in `suite`. A failed step that later steps depend on
/// ends the scenario early (recorded as a failure).
pub fn run(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    let uapi = env.uapi;
    let t = Instant::now();
    let hello = rig.agent_call(AgentOp::Hello, RPC)?;
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
        rig.agent_call(AgentOp::FindPci { class: NVME_CLASS }, RPC)?,
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
    let bound = rig.agent_call(AgentOp::VfioBind { bdf: bdf.clone() }, RPC)?;
    suite.record(
        checks::BIND_VFIO_PCI,
        bound.is_ok(),
        err_text(&bound),
        t.elapsed(),
    );
    let opened = rig.agent_call(AgentOp::VfioOpen { bdf: bdf.clone() }, RPC)?;
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
        offset: oracles::DOORBELL_PAGE.start,
        length: PAGE,
        uapi,
    };
    match rig.agent_call(export, RPC)? {
        Ok(AgentReply::Dmabuf { dmabuf, size }) => {
            suite.record(
                checks::EXPORT_DOORBELL_PAGE,
                size == PAGE,
                format!("dma-buf size {size}, expected {PAGE}"),
                t.elapsed(),
            );
            let _ = rig.agent_call(AgentOp::DmabufClose { dmabuf }, RPC)?;
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
        offset: oracles::DOORBELL_PAGE.start + 4,
        length: PAGE,
        uapi,
    };
    match rig.agent_call(unaligned, RPC)? {
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
    let wrote = rig.agent_call(write, RPC)?;
    if wrote.is_err() {
        suite.record(
            checks::DOORBELL_WRITE_LANDS,
            false,
            err_text(&wrote),
            t.elapsed(),
        );
        return Ok(());
    }
    let events = doorbell_events(rig, baseline)?;
    suite.record(
        checks::DOORBELL_WRITE_LANDS,
        oracles::written(&events, SQ0TDBL, 4).exactly(5),
        format!(
            "want one 4-byte write of 5 at BAR0+{SQ0TDBL:#x} and nothing else in the doorbell \
             page; device: {}",
            oracles::describe(&events)
        ),
        t.elapsed(),
    );
    let _ = rig.agent_call(AgentOp::VfioClose { device }, RPC)?;
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
