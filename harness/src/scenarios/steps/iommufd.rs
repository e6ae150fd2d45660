//! iommufd in the guest through the agent (the vIOMMU rig): nvme-cmb and edu opened through
//! their VFIO cdevs and bound to one iommufd, one IOAS both are attached to, agent memory and
//! dma-bufs mapped into it, edu's DMA between them, and the DMAR faults the guest logs.

use anyhow::{bail, Context, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply, DmabufUapi, EduDirection};

use crate::rig::Rig;

use super::*;

/// edu's class code (PCI_CLASS_OTHERS, hw/misc/edu.c).
pub(crate) const EDU_CLASS: u32 = 0x00ff00;
/// Where the agent's memory sits in the IOAS: two pages, edu's source and destination.
pub(crate) const MEMORY_IOVA: u64 = 0x10_0000;
pub(crate) const MEMORY_LENGTH: u64 = 2 * PAGE;
/// Where a dma-buf is mapped; below edu's 28-bit DMA mask like every IOVA here.
pub(crate) const DMABUF_IOVA: u64 = 0x20_0000;

/// The vIOMMU rig's objects for one scenario.
#[derive(Debug, Clone)]
pub(crate) struct IommufdRig {
    pub(crate) iommufd: u32,
    pub(crate) ioas: u32,
    /// nvme-cmb through its cdev.
    pub(crate) nvme: u32,
    pub(crate) edu: u32,
    pub(crate) edu_bdf: String,
    /// [`MEMORY_LENGTH`] bytes of agent memory at [`MEMORY_IOVA`].
    pub(crate) memory: u32,
}

fn open_cdev(rig: &mut Rig, held: &mut Held, bdf: &str, iommufd: u32) -> Result<u32> {
    bind_vfio(rig, bdf)?;
    let op = AgentOp::VfioCdevOpen {
        bdf: bdf.into(),
        iommufd,
    };
    match ok(
        rig.agent_call(op, RPC)?,
        &format!("open {bdf} through its cdev"),
    )? {
        AgentReply::CdevDevice { device, .. } => {
            held.push(AgentOp::VfioClose { device });
            Ok(device)
        }
        other => bail!("vfio_cdev_open {bdf}: unexpected {other:?}"),
    }
}

/// Opens nvme-cmb through its cdev bound to `iommufd` and attaches it to `ioas`.
pub(crate) fn open_nvme_cdev(
    rig: &mut Rig,
    held: &mut Held,
    iommufd: u32,
    ioas: u32,
) -> Result<u32> {
    let bdf = find_one(rig, NVME_CLASS, "NVMe function")?;
    let device = open_cdev(rig, held, &bdf, iommufd)?;
    ok(
        rig.agent_call(AgentOp::IoasAttach { device, ioas }, RPC)?,
        &format!("attach {bdf} to IOAS {ioas}"),
    )?;
    Ok(device)
}

/// IOMMU_IOAS_ALLOC of a new IOAS in `iommufd`.
pub(crate) fn alloc_ioas(rig: &mut Rig, iommufd: u32) -> Result<u32> {
    match ok(rig.agent_call(AgentOp::IoasAlloc { iommufd }, RPC)?, "IOAS")? {
        AgentReply::Ioas { ioas } => Ok(ioas),
        other => bail!("ioas_alloc: unexpected {other:?}"),
    }
}

/// Opens nvme-cmb and edu through iommufd, attaches both to a new IOAS, turns on edu's bus
/// mastering (without it edu's DMA does nothing) and maps agent memory at [`MEMORY_IOVA`].
pub(crate) fn iommufd_rig(rig: &mut Rig, held: &mut Held) -> Result<IommufdRig> {
    let nvme_bdf = find_one(rig, NVME_CLASS, "NVMe function")?;
    let edu_bdf = find_one(rig, EDU_CLASS, "edu device")?;
    let iommufd = match ok(
        rig.agent_call(AgentOp::IommufdOpen, RPC)?,
        "open /dev/iommu",
    )? {
        AgentReply::Iommufd { iommufd } => iommufd,
        other => bail!("iommufd_open: unexpected {other:?}"),
    };
    // Released last: closing it frees whatever the scenario left in it.
    held.push(AgentOp::IommufdClose { iommufd });
    let nvme = open_cdev(rig, held, &nvme_bdf, iommufd)?;
    let edu = open_cdev(rig, held, &edu_bdf, iommufd)?;
    let ioas = alloc_ioas(rig, iommufd)?;
    for (device, bdf) in [(nvme, &nvme_bdf), (edu, &edu_bdf)] {
        ok(
            rig.agent_call(AgentOp::IoasAttach { device, ioas }, RPC)?,
            &format!("attach {bdf} to IOAS {ioas}"),
        )?;
    }
    let command = config_read(rig, edu, 4, 2)?;
    config_write(
        rig,
        edu,
        4,
        2,
        command | 0x6,
        "edu PCI_COMMAND memory + bus master",
    )?;
    let op = AgentOp::IoasMapMemory {
        iommufd,
        ioas,
        iova: MEMORY_IOVA,
        length: MEMORY_LENGTH,
    };
    let memory = match ok(rig.agent_call(op, RPC)?, "map agent memory")? {
        AgentReply::DmaMemory { memory } => memory,
        other => bail!("ioas_map_memory: unexpected {other:?}"),
    };
    held.push(AgentOp::DmaMemoryFree { memory });
    Ok(IommufdRig {
        iommufd,
        ioas,
        nvme,
        edu,
        edu_bdf,
        memory,
    })
}

/// Exports (bar, offset, length) of nvme-cmb with upstream's uAPI (the only one iommufd
/// imports).
pub(crate) fn export_upstream(
    rig: &mut Rig,
    held: &mut Held,
    device: u32,
    bar: u32,
    offset: u64,
    length: u64,
) -> Result<u32> {
    export_in(rig, held, device, bar, offset, length, DmabufUapi::Upstream)
}

/// IOMMU_IOAS_MAP_FILE of a whole dma-buf of `length` bytes at `iova`; the kernel's refusal
/// is the caller's to judge.
pub(crate) fn map_dmabuf(
    rig: &mut Rig,
    io: &IommufdRig,
    dmabuf: u32,
    length: u64,
    iova: u64,
) -> Result<std::result::Result<(), p2prig_protocol::wire::ErrorReply>> {
    map_dmabuf_in(rig, io, io.ioas, dmabuf, length, iova)
}

/// [`map_dmabuf`] into another IOAS of the same iommufd.
pub(crate) fn map_dmabuf_in(
    rig: &mut Rig,
    io: &IommufdRig,
    ioas: u32,
    dmabuf: u32,
    length: u64,
    iova: u64,
) -> Result<std::result::Result<(), p2prig_protocol::wire::ErrorReply>> {
    let op = AgentOp::IoasMapDmabuf {
        iommufd: io.iommufd,
        ioas,
        dmabuf,
        start: 0,
        length,
        iova,
    };
    Ok(rig.agent_call(op, RPC)?.map(drop))
}

/// IOMMU_IOAS_UNMAP; answers the bytes unmapped or the kernel's refusal.
pub(crate) fn unmap(
    rig: &mut Rig,
    io: &IommufdRig,
    iova: u64,
    length: u64,
) -> Result<std::result::Result<u64, p2prig_protocol::wire::ErrorReply>> {
    let op = AgentOp::IoasUnmap {
        iommufd: io.iommufd,
        ioas: io.ioas,
        iova,
        length,
    };
    Ok(match rig.agent_call(op, RPC)? {
        Ok(AgentReply::Value { value }) => Ok(value),
        Ok(other) => bail!("ioas_unmap: unexpected {other:?}"),
        Err(e) => Err(e),
    })
}

pub(crate) fn memory_write(rig: &mut Rig, io: &IommufdRig, offset: u64, data: &[u8]) -> Result<()> {
    let op = AgentOp::DmaMemoryWrite {
        memory: io.memory,
        offset,
        data: p2prig_protocol::hex::encode(data),
    };
    ok(rig.agent_call(op, RPC)?, "write agent DMA memory").map(drop)
}

pub(crate) fn memory_read(
    rig: &mut Rig,
    io: &IommufdRig,
    offset: u64,
    length: u64,
) -> Result<String> {
    let op = AgentOp::DmaMemoryRead {
        memory: io.memory,
        offset,
        length,
    };
    match ok(rig.agent_call(op, RPC)?, "read agent DMA memory")? {
        AgentReply::Bytes { data } => Ok(data),
        other => bail!("dma_memory_read: unexpected {other:?}"),
    }
}

/// One edu transfer; returns when (guest clock) the engine was seen done.
pub(crate) fn edu_dma(
    rig: &mut Rig,
    io: &IommufdRig,
    direction: EduDirection,
    iova: u64,
    count: u64,
) -> Result<Option<u64>> {
    let op = AgentOp::EduDma {
        device: io.edu,
        direction,
        iova,
        buffer: 0,
        count,
        timeout_ms: 5000,
    };
    let id = rig.agent_start(op)?;
    let (reply, done_ns) = rig.agent_finish_stamped(id, RPC)?;
    ok(
        reply,
        &format!("edu DMA {direction:?} {count} bytes at iova {iova:#x}"),
    )?;
    Ok(done_ns)
}

/// Copies `count` bytes from agent memory (offset 0) to `iova` through edu's buffer: a DMA
/// read of the memory, then a DMA write to `iova`. Returns when the write was done.
pub(crate) fn edu_copy_to(
    rig: &mut Rig,
    io: &IommufdRig,
    iova: u64,
    count: u64,
) -> Result<Option<u64>> {
    edu_dma(rig, io, EduDirection::IovaToEdu, MEMORY_IOVA, count)
        .context("edu reading agent memory")?;
    edu_dma(rig, io, EduDirection::EduToIova, iova, count)
}

/// A DMA remapping fault the vIOMMU reported, from QEMU's `vtd_dmar_fault` trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DmarFault {
    /// PCI requester id: bus << 8 | device << 3 | function.
    pub(crate) source: u16,
    /// VT-d fault reason (5: write to a PTE without write access).
    pub(crate) reason: u32,
    pub(crate) address: u64,
    pub(crate) write: bool,
    pub(crate) line: String,
}

/// The faults in QEMU's stderr, lines like `vtd_dmar_fault sid 0x400 fault 5 addr 0x200008
/// write 1` (hw/i386/trace-events; the log backend may prefix `pid@time:`).
pub(crate) fn vtd_faults(text: &str) -> Vec<DmarFault> {
    text.lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once(crate::rig::shape::VTD_FAULT_TRACE_EVENT)?;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let [_, sid, _, reason, _, addr, _, write] = fields.as_slice() else {
                return None;
            };
            Some(DmarFault {
                source: u16::from_str_radix(sid.strip_prefix("0x")?, 16).ok()?,
                reason: reason.parse().ok()?,
                address: u64::from_str_radix(addr.strip_prefix("0x")?, 16).ok()?,
                write: *write == "1",
                line: line.trim().to_string(),
            })
        })
        .collect()
}

/// The requester id of a PCI address "ssss:bb:dd.f".
pub(crate) fn requester_id(bdf: &str) -> Option<u16> {
    let (_, rest) = bdf.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let bus = u16::from_str_radix(bus, 16).ok()?;
    let device = u16::from_str_radix(device, 16).ok()?;
    let function = u16::from_str_radix(function, 16).ok()?;
    (device < 32 && function < 8).then_some(bus << 8 | device << 3 | function)
}

/// The faults the vIOMMU reported after `mark` (of QEMU's stderr) for edu's accesses to the
/// page of `iova`.
pub(crate) fn faults_since(
    rig: &mut Rig,
    mark: u64,
    edu_bdf: &str,
    iova: u64,
) -> Result<Vec<DmarFault>> {
    let Some(source) = requester_id(edu_bdf) else {
        bail!("{edu_bdf:?} is not a PCI address");
    };
    Ok(vtd_faults(&rig.qemu_stderr_since(mark)?)
        .into_iter()
        .filter(|f| f.source == source && f.address & !(PAGE - 1) == iova & !(PAGE - 1))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtd_faults_are_read_from_qemus_trace_lines() {
        let text = "\
qemu-system-x86_64: vfio_container_dma_unmap(0x5, 0xff000000, 0x1000000) = -2 (No such file or directory)
vtd_dmar_fault sid 0x400 fault 5 addr 0x200008 write 1
1234@1700000000.000001:vtd_dmar_fault sid 0x28 fault 6 addr 0x10f000 write 0
vtd_dmar_fault sid 0xzz fault 5 addr 0x1 write 1
vtd_dmar_fault sid 0x400 fault 5
";
        let faults = vtd_faults(text);
        assert_eq!(faults.len(), 2, "{faults:?}");
        assert_eq!(
            (
                faults[0].source,
                faults[0].reason,
                faults[0].address,
                faults[0].write
            ),
            (0x400, 5, 0x20_0008, true)
        );
        assert_eq!(
            (
                faults[1].source,
                faults[1].reason,
                faults[1].address,
                faults[1].write
            ),
            (0x28, 6, 0x10_f000, false)
        );
        assert!(vtd_faults("").is_empty());
    }

    #[test]
    fn requester_ids_follow_bus_device_function() {
        assert_eq!(requester_id("0000:04:00.0"), Some(0x400));
        assert_eq!(requester_id("0000:00:05.1"), Some(0x29));
        assert_eq!(requester_id("0000:ff:1f.7"), Some(0xffff));
        assert_eq!(requester_id("0000:04:20.0"), None);
        assert_eq!(requester_id("nonsense"), None);
    }
}
