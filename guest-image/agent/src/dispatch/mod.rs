//! Turns one [`AgentOp`] into one outcome: argument checks, handle tables, error sentences.
//!
//! The agent checks only what the kernel cannot see (widths, alignment, bounds of its own
//! mapping, fields the uAPI cannot carry); dma-buf export arguments are otherwise passed through
//! untouched, because whether the kernel rejects them is what the scenarios test.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use p2prig_protocol::agent::{AgentOp, AgentReply, DmabufUapi, KmemleakCommand};
use p2prig_protocol::wire::{ErrorReply, Outcome};
use vfio_bindings::bindings::vfio::{VFIO_PCI_BAR5_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX};

use crate::describe::describe;
use crate::error::{AgentError, Result};
use crate::iommufd::{DmaMemory, Iommu};
use crate::platform::{Device, Platform};
use crate::vfio::{DmabufRequest, RegionInfo};

/// Longest Sleep the agent accepts; longer is surely a unit mistake in the caller.
pub const MAX_SLEEP_MS: u64 = 600_000;

/// What the RPC loop must do after sending the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Nothing,
    PowerOff,
}

/// Open objects by handle. Handles start at 1 and are not reused while the agent runs, so a
/// stale handle is EBADF instead of silently naming a newer object.
#[derive(Debug)]
pub(crate) struct HandleTable<T> {
    next: u32,
    pub(crate) entries: BTreeMap<u32, T>,
}

impl<T> HandleTable<T> {
    pub(crate) fn new() -> Self {
        Self {
            next: 1,
            entries: BTreeMap::new(),
        }
    }

    pub(crate) fn insert(&mut self, value: T) -> u32 {
        // After 2^32 allocations wrap around, skipping 0 and handles still open.
        while self.next == 0 || self.entries.contains_key(&self.next) {
            self.next = self.next.wrapping_add(1);
        }
        let handle = self.next;
        self.next = self.next.wrapping_add(1);
        self.entries.insert(handle, value);
        handle
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a table lock (caught by the RPC loop) must not wedge the agent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The agent's state: the platform and the open devices and dma-bufs.
pub struct Agent<P> {
    pub(crate) platform: P,
    devices: Mutex<HandleTable<Arc<dyn Device>>>,
    pub(crate) dmabufs: Mutex<HandleTable<OwnedFd>>,
    pub(crate) iommufds: Mutex<HandleTable<Arc<dyn Iommu>>>,
    pub(crate) dma_memory: Mutex<HandleTable<Arc<DmaMemory>>>,
}

impl<P: std::fmt::Debug> std::fmt::Debug for Agent<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("platform", &self.platform)
            .field("devices", &lock(&self.devices).entries.len())
            .field("dmabufs", &lock(&self.dmabufs).entries.len())
            .field("iommufds", &lock(&self.iommufds).entries.len())
            .field("dma_memory", &lock(&self.dma_memory).entries.len())
            .finish()
    }
}

fn value_mask(width: u8) -> u64 {
    match width {
        8 => u64::MAX,
        _ => (1u64 << (8 * u32::from(width))) - 1,
    }
}

/// Checks a `width`-byte access at `offset` of a region of `size` bytes.
fn check_access(what: &str, size: u64, offset: u64, width: u8, widths: &[u8]) -> Result<()> {
    if !widths.contains(&width) {
        return Err(AgentError::Invalid(format!(
            "width {width} is not one of {widths:?}"
        )));
    }
    // Every accepted width is a power of two.
    if offset & (u64::from(width) - 1) != 0 {
        return Err(AgentError::Invalid(format!(
            "offset {offset:#x} is not aligned to the {width}-byte width"
        )));
    }
    match offset.checked_add(u64::from(width)) {
        Some(end) if end <= size => Ok(()),
        _ => Err(AgentError::Invalid(format!(
            "{width} bytes at {offset:#x} run past the end of {what} ({size:#x} bytes)"
        ))),
    }
}

fn check_value(width: u8, value: u64) -> Result<()> {
    if value & !value_mask(width) != 0 {
        return Err(AgentError::Invalid(format!(
            "value {value:#x} does not fit in {width} bytes"
        )));
    }
    Ok(())
}

impl<P: Platform> Agent<P> {
    pub fn new(platform: P) -> Self {
        Self {
            platform,
            devices: Mutex::new(HandleTable::new()),
            dmabufs: Mutex::new(HandleTable::new()),
            iommufds: Mutex::new(HandleTable::new()),
            dma_memory: Mutex::new(HandleTable::new()),
        }
    }

    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// Runs one operation. Never panics on any input (the RPC loop still catches panics).
    pub fn handle(&self, op: &AgentOp) -> (Outcome<AgentReply>, After) {
        let after = if matches!(op, AgentOp::PowerOff) {
            After::PowerOff
        } else {
            After::Nothing
        };
        match self.run(op) {
            Ok(reply) => (Outcome::Ok(reply), after),
            Err(error) => (
                Outcome::Err(ErrorReply::new(
                    error.errno(),
                    format!("{}: {error}", describe(op)),
                )),
                After::Nothing,
            ),
        }
    }

    pub(crate) fn insert_device(&self, device: Arc<dyn Device>) -> u32 {
        lock(&self.devices).insert(device)
    }

    pub(crate) fn device(&self, device: u32) -> Result<Arc<dyn Device>> {
        lock(&self.devices)
            .entries
            .get(&device)
            .cloned()
            .ok_or_else(|| {
                AgentError::BadHandle(format!("no open VFIO device has handle {device}"))
            })
    }

    pub(crate) fn bar_region(device: &dyn Device, bar: u32) -> Result<RegionInfo> {
        if bar > VFIO_PCI_BAR5_REGION_INDEX {
            return Err(AgentError::Invalid(format!(
                "{bar} is not a BAR number (0-5)"
            )));
        }
        let region = device.region_info(bar)?;
        if region.size == 0 {
            return Err(AgentError::Invalid(format!(
                "BAR {bar} is not implemented (size 0)"
            )));
        }
        Ok(region)
    }

    fn run(&self, op: &AgentOp) -> Result<AgentReply> {
        // Every op by name, no wildcard: a new op that nobody handles is a compile error.
        match op {
            AgentOp::Hello => Ok(AgentReply::Hello {
                kernel_release: self.platform.kernel_release()?,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            }),
            AgentOp::FindPci { class } => {
                if *class > 0x00ff_ffff {
                    return Err(AgentError::Invalid(format!(
                        "class {class:#x} has more than 24 bits"
                    )));
                }
                Ok(AgentReply::Pci {
                    functions: self.platform.find_pci(*class)?,
                })
            }
            AgentOp::VfioBind { bdf } => {
                self.platform.vfio_bind(bdf)?;
                Ok(AgentReply::Done)
            }
            AgentOp::Sysrq { report } => {
                self.platform.sysrq(report.key())?;
                Ok(AgentReply::Done)
            }
            AgentOp::Kmemleak { command } => Ok(AgentReply::Text {
                text: self.platform.kmemleak(match command {
                    KmemleakCommand::Scan => "scan",
                    KmemleakCommand::Clear => "clear",
                })?,
            }),
            AgentOp::PciAttrRead { bdf, attribute } => Ok(AgentReply::Text {
                text: self.platform.pci_attr_read(bdf, attribute)?,
            }),
            AgentOp::PciAttrWrite {
                bdf,
                attribute,
                value,
            } => {
                self.platform.pci_attr_write(bdf, attribute, value)?;
                Ok(AgentReply::Done)
            }
            AgentOp::VfioOpen { bdf } => {
                let device = self.platform.vfio_open(bdf)?;
                Ok(AgentReply::Device {
                    device: self.insert_device(device),
                })
            }
            AgentOp::VfioClose { device } => {
                let removed = lock(&self.devices).entries.remove(device);
                // The device closes when the last in-flight operation on it lets go of it.
                match removed {
                    Some(_) => Ok(AgentReply::Done),
                    None => Err(AgentError::BadHandle(format!(
                        "no open VFIO device has handle {device}"
                    ))),
                }
            }
            AgentOp::DmabufExport {
                device,
                bar,
                offset,
                length,
                uapi,
            } => self.export(*device, *bar, *offset, *length, *uapi),
            AgentOp::DmabufClose { dmabuf } => {
                // Out of the table first: a close that blocks in the kernel (the last
                // reference releasing the dma-buf) must not hold the table's lock.
                let removed = lock(&self.dmabufs).entries.remove(dmabuf);
                match removed {
                    Some(fd) => {
                        drop(fd);
                        Ok(AgentReply::Done)
                    }
                    None => Err(AgentError::BadHandle(format!(
                        "no open dma-buf has handle {dmabuf}"
                    ))),
                }
            }
            AgentOp::BarRead {
                device,
                bar,
                offset,
                width,
            } => {
                let device = self.device(*device)?;
                let region = Self::bar_region(device.as_ref(), *bar)?;
                check_access(
                    &format!("BAR {bar}"),
                    region.size,
                    *offset,
                    *width,
                    &[1, 2, 4, 8],
                )?;
                Ok(AgentReply::Value {
                    value: device.bar_read(&region, *offset, *width)?,
                })
            }
            AgentOp::BarWrite {
                device,
                bar,
                offset,
                width,
                value,
            } => {
                let device = self.device(*device)?;
                let region = Self::bar_region(device.as_ref(), *bar)?;
                check_access(
                    &format!("BAR {bar}"),
                    region.size,
                    *offset,
                    *width,
                    &[1, 2, 4, 8],
                )?;
                check_value(*width, *value)?;
                device.bar_write(&region, *offset, *width, *value)?;
                Ok(AgentReply::Done)
            }
            AgentOp::ConfigRead {
                device,
                offset,
                width,
            } => {
                let device = self.device(*device)?;
                let region = device.region_info(VFIO_PCI_CONFIG_REGION_INDEX)?;
                check_access("config space", region.size, *offset, *width, &[1, 2, 4])?;
                Ok(AgentReply::Value {
                    value: device.region_read(&region, *offset, *width)?,
                })
            }
            AgentOp::ConfigWrite {
                device,
                offset,
                width,
                value,
            } => {
                let device = self.device(*device)?;
                let region = device.region_info(VFIO_PCI_CONFIG_REGION_INDEX)?;
                check_access("config space", region.size, *offset, *width, &[1, 2, 4])?;
                check_value(*width, *value)?;
                device.region_write(&region, *offset, *width, *value)?;
                Ok(AgentReply::Done)
            }
            AgentOp::VfioReset { device } => {
                self.device(*device)?.reset()?;
                Ok(AgentReply::Done)
            }
            AgentOp::VfioHotReset { device } => Ok(AgentReply::Pci {
                functions: self.device(*device)?.hot_reset()?,
            }),
            AgentOp::VfioRegion { device, index } => {
                let region = self.device(*device)?.region_info(*index)?;
                Ok(AgentReply::Region {
                    index: region.index,
                    flags: region.flags,
                    size: region.size,
                    offset: region.offset,
                })
            }
            AgentOp::Sleep { ms } => {
                if *ms > MAX_SLEEP_MS {
                    return Err(AgentError::Invalid(format!(
                        "{ms} ms is longer than the {MAX_SLEEP_MS} ms limit"
                    )));
                }
                std::thread::sleep(Duration::from_millis(*ms));
                Ok(AgentReply::Done)
            }
            AgentOp::Dmesg => Ok(AgentReply::Text {
                text: self.platform.dmesg()?,
            }),
            AgentOp::OpenFds => {
                let entries = std::fs::read_dir("/proc/self/fd")
                    .map_err(|e| AgentError::os("listing /proc/self/fd".to_string(), e))?;
                Ok(AgentReply::Value {
                    value: entries.count() as u64,
                })
            }
            // The RPC loop powers off after the reply has gone out.
            AgentOp::PowerOff => Ok(AgentReply::Done),
            // iommufd, VFIO cdev, low power and edu: iommufd_ops.
            AgentOp::VfioLowPower { device, enter } => self.vfio_low_power(*device, *enter),
            AgentOp::IommufdOpen => self.iommufd_open(),
            AgentOp::IommufdClose { iommufd } => self.iommufd_close(*iommufd),
            AgentOp::VfioCdevOpen { bdf, iommufd } => self.vfio_cdev_open(bdf, *iommufd),
            AgentOp::IoasAlloc { iommufd } => self.ioas_alloc(*iommufd),
            AgentOp::IoasAttach { device, ioas } => self.ioas_attach(*device, *ioas),
            AgentOp::IoasMapMemory {
                iommufd,
                ioas,
                iova,
                length,
            } => self.ioas_map_memory(*iommufd, *ioas, *iova, *length),
            AgentOp::IoasMapDmabuf {
                iommufd,
                ioas,
                dmabuf,
                start,
                length,
                iova,
            } => self.ioas_map_dmabuf(*iommufd, *ioas, *dmabuf, *start, *length, *iova),
            AgentOp::IoasUnmap {
                iommufd,
                ioas,
                iova,
                length,
            } => self.ioas_unmap(*iommufd, *ioas, *iova, *length),
            AgentOp::IommufdDestroy { iommufd, object } => self.iommufd_destroy(*iommufd, *object),
            AgentOp::DmaMemoryWrite {
                memory,
                offset,
                data,
            } => self.dma_memory_write(*memory, *offset, data),
            AgentOp::DmaMemoryRead {
                memory,
                offset,
                length,
            } => self.dma_memory_read(*memory, *offset, *length),
            AgentOp::DmaMemoryFree { memory } => self.dma_memory_free(*memory),
            AgentOp::EduDma {
                device,
                direction,
                iova,
                buffer,
                count,
                timeout_ms,
            } => self.edu_dma(*device, *direction, *iova, *buffer, *count, *timeout_ms),
            // Networking and verbs: rdma_ops checks the arguments, then calls the platform.
            AgentOp::NetUp {
                ifname,
                addr,
                prefix,
            } => self.net_up(ifname, addr, *prefix),
            AgentOp::NeighAdd { ifname, ip, mac } => self.neigh_add(ifname, ip, mac),
            AgentOp::RdmaLinkAdd { name, netdev } => self.rdma_link_add(name, netdev),
            AgentOp::RdmaOpen { name } => self.rdma_open(name),
            AgentOp::RdmaClose { context } => self.rdma_close(*context),
            AgentOp::RdmaGid { context } => self.rdma_gid(*context),
            AgentOp::AllocPd { context } => self.alloc_pd(*context),
            AgentOp::DeallocPd { pd } => self.dealloc_pd(*pd),
            AgentOp::CreateCq { context, entries } => self.create_cq(*context, *entries),
            AgentOp::DestroyCq { cq } => self.destroy_cq(*cq),
            AgentOp::CreateQp {
                pd,
                send_cq,
                recv_cq,
                max_send_wr,
                max_recv_wr,
            } => self.create_qp(*pd, *send_cq, *recv_cq, *max_send_wr, *max_recv_wr),
            AgentOp::DestroyQp { qp } => self.destroy_qp(*qp),
            AgentOp::QpInit { qp, access } => self.qp_init(*qp, access),
            AgentOp::QpRtr {
                qp,
                remote_qpn,
                remote_psn,
                remote_gid,
                path_mtu,
                gid_index,
                max_dest_rd_atomic,
                min_rnr_timer,
            } => self.qp_rtr(
                *qp,
                *remote_qpn,
                *remote_psn,
                remote_gid,
                *path_mtu,
                *gid_index,
                *max_dest_rd_atomic,
                *min_rnr_timer,
            ),
            AgentOp::QpRts {
                qp,
                psn,
                timeout,
                retry_cnt,
                rnr_retry,
                max_rd_atomic,
            } => self.qp_rts(*qp, *psn, *timeout, *retry_cnt, *rnr_retry, *max_rd_atomic),
            AgentOp::QpReset { qp } => self.qp_reset(*qp),
            AgentOp::QpError { qp } => self.qp_error(*qp),
            AgentOp::QpQuery { qp } => self.qp_query(*qp),
            AgentOp::RegMr { pd, length, access } => self.reg_mr(*pd, *length, access),
            AgentOp::RegDmabufMr {
                pd,
                dmabuf,
                offset,
                length,
                iova,
                access,
            } => self.reg_dmabuf_mr(*pd, *dmabuf, *offset, *length, *iova, access),
            AgentOp::DeregMr { mr } => self.dereg_mr(*mr),
            AgentOp::MrWrite { mr, offset, data } => self.mr_write(*mr, *offset, data),
            AgentOp::MrRead { mr, offset, length } => self.mr_read(*mr, *offset, *length),
            AgentOp::PostSend {
                qp,
                wr_id,
                opcode,
                mr,
                offset,
                length,
                remote_addr,
                rkey,
                signaled,
            } => self.post_send(
                *qp,
                *wr_id,
                *opcode,
                *mr,
                *offset,
                *length,
                *remote_addr,
                *rkey,
                *signaled,
            ),
            AgentOp::PostRecv {
                qp,
                wr_id,
                mr,
                offset,
                length,
            } => self.post_recv(*qp, *wr_id, *mr, *offset, *length),
            AgentOp::PollCq {
                cq,
                count,
                timeout_ms,
            } => self.poll_cq(*cq, *count, *timeout_ms),
        }
    }

    fn export(
        &self,
        device: u32,
        bar: u32,
        offset: u64,
        length: u64,
        uapi: DmabufUapi,
    ) -> Result<AgentReply> {
        let device = self.device(device)?;
        let request = match uapi {
            DmabufUapi::SeedV1 => DmabufRequest::SeedV1 {
                region_index: bar,
                offset: u32::try_from(offset).map_err(|_| {
                    AgentError::Invalid(format!(
                        "offset {offset:#x} does not fit the seed uAPI's 32-bit offset field; \
                         rejected by the agent, the kernel was not asked"
                    ))
                })?,
                length,
            },
            DmabufUapi::Upstream => DmabufRequest::Upstream {
                region_index: bar,
                offset,
                length,
            },
        };
        let fd = device.export_dmabuf(&request)?;
        // SAFETY: lseek on an fd we own; dma-buf files report their size at SEEK_END.
        let end = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            // Dropping `fd` closes the new dma-buf, so a failed size query leaks nothing.
            return Err(AgentError::last_os(
                "lseek(SEEK_END) on the new dma-buf (closed it again)",
            ));
        }
        let size = u64::try_from(end).unwrap_or_default();
        let handle = lock(&self.dmabufs).insert(fd);
        Ok(AgentReply::Dmabuf {
            dmabuf: handle,
            size,
        })
    }
}

#[cfg(test)]
mod tests;
