//! VFIO in the guest through the agent: opening nvme-cmb, exporting a BAR slice as a dma-buf,
//! config-space reads and writes, capabilities and the memory-decode bit.

use anyhow::{bail, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply};

use crate::rig::Rig;
use crate::scenarios::ScenarioEnv;

use super::*;

pub(crate) fn open_device(rig: &mut Rig, held: &mut Held) -> Result<u32> {
    let device = open_nvme(rig)?;
    held.push(AgentOp::VfioClose { device });
    Ok(device)
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
    export_in(rig, held, device, bar, offset, length, env.uapi)
}

/// [`export`] in a given uAPI (iommufd imports only upstream's dma-bufs).
pub(crate) fn export_in(
    rig: &mut Rig,
    held: &mut Held,
    device: u32,
    bar: u32,
    offset: u64,
    length: u64,
    uapi: p2prig_protocol::agent::DmabufUapi,
) -> Result<u32> {
    let op = AgentOp::DmabufExport {
        device,
        bar,
        offset,
        length,
        uapi,
    };
    match ok(rig.agent_call(op, RPC)?, "export the dma-buf")? {
        AgentReply::Dmabuf { dmabuf, .. } => {
            held.push(AgentOp::DmabufClose { dmabuf });
            Ok(dmabuf)
        }
        other => bail!("export: unexpected {other:?}"),
    }
}

/// Clears memory decode and returns the config write that sets it again (the restore, sent
/// when a scenario chooses).
pub(crate) fn decode_on_op(rig: &mut Rig, device: u32) -> Result<AgentOp> {
    let command = clear_memory_decode(rig, device)?;
    Ok(AgentOp::ConfigWrite {
        device,
        offset: 4,
        width: 2,
        value: command | 0x2,
    })
}

/// Capability offsets in config space, from the capability list (PCI 3.0 6.7).
pub(crate) fn find_capability(rig: &mut Rig, device: u32, id: u64) -> Result<u64> {
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

/// The class code of nvme-cmb (NVMe, I/O controller interface).
pub(crate) const NVME_CLASS: u32 = 0x010802;

/// The one function of `class` in the guest (`what` names it in the error).
pub(crate) fn find_one(rig: &mut Rig, class: u32, what: &str) -> Result<String> {
    let functions = match rig.agent_call(AgentOp::FindPci { class }, RPC)? {
        Ok(AgentReply::Pci { functions }) => functions,
        other => bail!("find_pci {class:#08x}: {other:?}"),
    };
    match functions.as_slice() {
        [bdf] => Ok(bdf.clone()),
        _ => bail!(
            "expected exactly one {what} (class {class:#08x}) in the guest, found {functions:?}"
        ),
    }
}

/// Binds `bdf` to vfio-pci (a no-op when it is bound already).
pub(crate) fn bind_vfio(rig: &mut Rig, bdf: &str) -> Result<()> {
    if let Err(e) = rig.agent_call(AgentOp::VfioBind { bdf: bdf.into() }, RPC)? {
        bail!("binding {bdf} to vfio-pci: {e}");
    }
    Ok(())
}

/// Binds and opens the rig's NVMe function (idempotent across scenarios of one boot).
pub(crate) fn open_nvme(rig: &mut Rig) -> Result<u32> {
    let bdf = find_one(rig, NVME_CLASS, "NVMe function")?;
    bind_vfio(rig, &bdf)?;
    match rig.agent_call(AgentOp::VfioOpen { bdf: bdf.clone() }, RPC)? {
        Ok(AgentReply::Device { device }) => Ok(device),
        other => bail!("opening {bdf} through VFIO: {other:?}"),
    }
}
