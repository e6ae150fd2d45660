//! One client's vfio-user session: what the device describes (regions, IRQs), the state the
//! protocol keeps per connection (VERSION negotiated, the DMA map table) and the answer to
//! each decoded request. Socket-free: [`Session::handle`] writes the reply into a buffer.

use std::collections::BTreeMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_irq_info, vfio_region_info, vfio_region_sparse_mmap_area, VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE,
    VFIO_DMA_UNMAP_FLAG_ALL, VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, VFIO_IRQ_INFO_EVENTFD,
    VFIO_IRQ_SET_ACTION_TYPE_MASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use crate::device::{AccessError, CmbMode, Device, ResetCause, NUM_REGIONS, REGION_CMB};
use crate::framing::{
    begin_reply, finish_reply, put_irq_info, put_region_access, put_region_info,
    put_sparse_mmap_cap, put_u16, put_u32, put_u64, sparse_mmap_cap_size, Command, DmaMap,
    DmaUnmap, FramingError, Header, IrqSet, Request, HEADER_SIZE, MAX_DATA_XFER_SIZE, MAX_MSG_FDS,
    REGION_ACCESS_SIZE,
};

/// DMA mappings one client may hold at once; advertised as `max_dma_maps` (QEMU's default is
/// 65535, a boot needs about 15). Bounds the table's memory.
pub const MAX_DMA_MAPS: usize = 4096;

/// A region as GET_REGION_INFO describes it.
#[derive(Debug, Clone)]
pub struct Region {
    pub info: vfio_region_info,
    /// Mappable areas (a sparse-mmap capability); non-empty only for a mappable region.
    pub sparse_areas: Vec<vfio_region_sparse_mmap_area>,
}

/// Region table: BAR0, BAR2 (CMB) and config space have a size; BAR1/3 (upper halves of the
/// 64-bit BARs), BAR4/5, ROM and VGA are absent. QEMU wants at least 8 regions.
pub fn regions(device: &Device) -> Vec<Region> {
    (0..NUM_REGIONS)
        .map(|index| {
            let size = device.region_size(index);
            let mut flags = if size > 0 {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            } else {
                0
            };
            let mut sparse_areas = Vec::new();
            if index == REGION_CMB && device.settings().cmb_mode == CmbMode::Mmap {
                // QEMU maps only what a sparse-mmap capability lists (a mappable region
                // without one is trapped whole): one area over the whole BAR maps it all.
                flags |= VFIO_REGION_INFO_FLAG_MMAP;
                sparse_areas.push(vfio_region_sparse_mmap_area { offset: 0, size });
            }
            Region {
                info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas,
            }
        })
        .collect()
}

/// IRQ indexes of a VFIO PCI device (INTx, MSI, MSI-X, ERR, REQ). None is ever raised;
/// QEMU wants at least three indexes.
pub fn irqs() -> Vec<vfio_irq_info> {
    [(0, 1), (1, 0), (2, 0), (3, 1), (4, 1)]
        .into_iter()
        .map(|(index, count)| vfio_irq_info {
            argsz: std::mem::size_of::<vfio_irq_info>() as u32,
            flags: if count > 0 { VFIO_IRQ_INFO_EVENTFD } else { 0 },
            index,
            count,
        })
        .collect()
}

/// Why a well-framed request was refused. Each is a `bad_request` event and, unless the
/// request said NO_REPLY, an error reply with [`Refusal::errno`].
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Framing(#[from] FramingError),
    #[error("{0} before VERSION")]
    NotNegotiated(Command),
    #[error("VERSION after the version was negotiated")]
    AlreadyNegotiated,
    #[error("protocol major version {0} is not supported (only 0)")]
    Major(u16),
    #[error("{command} came with {got} file descriptors; it takes {allowed}")]
    Fds {
        command: Command,
        got: usize,
        allowed: &'static str,
    },
    #[error("more than {MAX_MSG_FDS} file descriptors came with one message")]
    FdsTruncated,
    #[error("no region {0}")]
    NoRegion(u32),
    #[error("no IRQ index {0}")]
    NoIrq(u32),
    #[error("DEVICE_SET_IRQS flags {0:#x}: not one data type and one action")]
    IrqFlags(u32),
    #[error(
        "DEVICE_SET_IRQS start {start} count {count} outside the {available} IRQs of index {index}"
    )]
    IrqRange {
        index: u32,
        start: u32,
        count: u32,
        available: u32,
    },
    #[error("DMA flags {0:#x} not supported")]
    DmaFlags(u32),
    #[error("DMA_UNMAP dirty-page bitmaps are not supported")]
    DirtyBitmap,
    #[error("DMA range {address:#x}+{size:#x} is empty, wraps or is not what the flags ask")]
    DmaRange { address: u64, size: u64 },
    #[error("DMA_MAP {address:#x}+{size:#x} overlaps the mapping {other:#x}+{other_size:#x}")]
    DmaOverlap {
        address: u64,
        size: u64,
        other: u64,
        other_size: u64,
    },
    #[error("DMA_UNMAP {address:#x}+{size:#x} matches no mapping")]
    DmaNotMapped { address: u64, size: u64 },
    #[error("DMA_MAP: already {MAX_DMA_MAPS} mappings")]
    DmaTableFull,
    /// The device refused the read and recorded its own `bad_request`.
    #[error("read: {0}")]
    Access(AccessError),
}

impl Refusal {
    /// Never 0. The spec names EEXIST for an overlapping map; an unmap of a range never mapped
    /// is ENOENT, as libvfio-user answers; unsupported features ENOTSUP; malformed EINVAL.
    pub fn errno(&self) -> i32 {
        match self {
            Refusal::Framing(e) => e.errno(),
            Refusal::DmaOverlap { .. } => libc::EEXIST,
            Refusal::DmaNotMapped { .. } => libc::ENOENT,
            Refusal::DmaTableFull => libc::ENOSPC,
            Refusal::DirtyBitmap => libc::ENOTSUP,
            Refusal::Access(e) => e.errno(),
            _ => libc::EINVAL,
        }
    }

    /// The device already recorded a `bad_request` for it.
    pub fn recorded(&self) -> bool {
        matches!(self, Refusal::Access(_))
    }
}

/// A request that was served; its reply (if the client wants one) is in the buffer.
#[derive(Debug)]
pub enum Served<'d> {
    Reply,
    /// The reply goes with this descriptor (REGION_INFO of the mmapped CMB).
    ReplyWithFd(BorrowedFd<'d>),
}

/// The client's DMA windows: start -> size, never overlapping. The device never masters
/// DMA, so only the ranges are kept; the fds are closed at once (holding up to
/// MAX_DMA_MAPS descriptors would only risk the process's fd limit).
#[derive(Debug, Default)]
struct DmaTable(BTreeMap<u64, u64>);

impl DmaTable {
    fn map(&mut self, map: &DmaMap) -> Result<(), Refusal> {
        let range = Refusal::DmaRange {
            address: map.address,
            size: map.size,
        };
        let end = match map.address.checked_add(map.size) {
            Some(end) if map.size > 0 => end,
            _ => return Err(range),
        };
        // The mapping starting last before `end` is the only one that can overlap.
        if let Some((&other, &other_size)) = self.0.range(..end).next_back() {
            if other + other_size > map.address {
                return Err(Refusal::DmaOverlap {
                    address: map.address,
                    size: map.size,
                    other,
                    other_size,
                });
            }
        }
        if self.0.len() >= MAX_DMA_MAPS {
            return Err(Refusal::DmaTableFull);
        }
        self.0.insert(map.address, map.size);
        Ok(())
    }

    fn unmap(&mut self, unmap: &DmaUnmap) -> Result<(), Refusal> {
        if unmap.flags & VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
            return Err(Refusal::DirtyBitmap);
        }
        if unmap.flags & !VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            return Err(Refusal::DmaFlags(unmap.flags));
        }
        if unmap.flags & VFIO_DMA_UNMAP_FLAG_ALL != 0 {
            // As the kernel's VFIO_IOMMU_UNMAP_DMA: unmap-all names no range.
            if unmap.address != 0 || unmap.size != 0 {
                return Err(Refusal::DmaRange {
                    address: unmap.address,
                    size: unmap.size,
                });
            }
            self.0.clear();
            return Ok(());
        }
        // The spec: "must match exactly a previous mapping".
        match self.0.get(&unmap.address) {
            Some(&size) if size == unmap.size => {
                self.0.remove(&unmap.address);
                Ok(())
            }
            _ => Err(Refusal::DmaNotMapped {
                address: unmap.address,
                size: unmap.size,
            }),
        }
    }
}

/// Per-connection protocol state.
#[derive(Debug)]
pub struct Session {
    device: Arc<Device>,
    regions: Vec<Region>,
    irqs: Vec<vfio_irq_info>,
    negotiated: bool,
    dma: DmaTable,
}

impl Session {
    pub fn new(device: Arc<Device>) -> Self {
        Self {
            regions: regions(&device),
            irqs: irqs(),
            device,
            negotiated: false,
            dma: DmaTable::default(),
        }
    }

    /// Serves one request; on success the reply is in `out` (sent only if the header did not
    /// say NO_REPLY). `fds` came with the message; those not kept are closed on return.
    pub fn handle(
        &mut self,
        header: &Header,
        request: Request<'_>,
        fds: Vec<OwnedFd>,
        out: &mut Vec<u8>,
    ) -> Result<Served<'_>, Refusal> {
        let command = command_of(&request);
        if !self.negotiated && command != Command::Version {
            return Err(Refusal::NotNegotiated(command));
        }
        let allowed = match &request {
            Request::DmaMap(_) => (fds.len() <= 1).then_some(()).ok_or("0 or 1"),
            Request::SetIrqs { set, .. } if set.flags & VFIO_IRQ_SET_DATA_EVENTFD != 0 => {
                // None de-assigns the eventfds; otherwise one per interrupt.
                (fds.is_empty() || fds.len() == set.count as usize)
                    .then_some(())
                    .ok_or("0 or count")
            }
            _ => fds.is_empty().then_some(()).ok_or("none"),
        };
        if let Err(allowed) = allowed {
            return Err(Refusal::Fds {
                command,
                got: fds.len(),
                allowed,
            });
        }
        // The device raises no interrupts and masters no DMA: descriptors are not kept.
        drop(fds);
        begin_reply(out);
        let served = match request {
            Request::Version { major, minor: _ } => {
                if self.negotiated {
                    return Err(Refusal::AlreadyNegotiated);
                }
                if major != 0 {
                    return Err(Refusal::Major(major));
                }
                self.negotiated = true;
                put_version(out);
                Served::Reply
            }
            Request::DmaMap(map) => {
                if map.flags & !(VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE) != 0 {
                    return Err(Refusal::DmaFlags(map.flags));
                }
                self.dma.map(&map)?;
                Served::Reply
            }
            Request::DmaUnmap(unmap) => {
                self.dma.unmap(&unmap)?;
                // "The server responds with the original DMA entry in the request."
                put_u32(out, unmap.argsz);
                put_u32(out, unmap.flags);
                put_u64(out, unmap.address);
                put_u64(out, unmap.size);
                Served::Reply
            }
            Request::GetInfo => {
                put_u32(out, 16);
                put_u32(out, VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET);
                put_u32(out, self.regions.len() as u32);
                put_u32(out, self.irqs.len() as u32);
                Served::Reply
            }
            Request::GetRegionInfo { argsz, index } => self.region_info(argsz, index, out)?,
            Request::GetIrqInfo { index } => {
                let irq = self.irqs.get(index as usize).ok_or(Refusal::NoIrq(index))?;
                put_irq_info(out, irq);
                Served::Reply
            }
            Request::SetIrqs { set, bools: _ } => {
                self.check_irq_set(&set)?;
                Served::Reply
            }
            Request::RegionRead(access) => {
                self.check_region(access.region)?;
                put_region_access(out, &access);
                let start = HEADER_SIZE + REGION_ACCESS_SIZE;
                // count <= MAX_DATA_XFER_SIZE (the decoder refused more), so this is bounded.
                out.resize(start + access.count as usize, 0);
                let data = out.get_mut(start..).unwrap_or_default();
                self.device
                    .region_read(access.region, access.offset, data)
                    .map_err(Refusal::Access)?;
                Served::Reply
            }
            Request::RegionWrite { access, data } => {
                self.check_region(access.region)?;
                // A write the device refuses (no storage there, out of range, wrong width)
                // is dropped, as PCI drops a write nobody claims, and the device records it
                // as a bad_request; the client sees it acknowledged, so QEMU's config and
                // synchronous BAR writes never log errors for what a guest may do.
                let _ = self.device.region_write(access.region, access.offset, data);
                put_region_access(out, &access);
                Served::Reply
            }
            Request::DeviceReset => {
                // The reply goes out when the reset is over. Keep --reset-ms below QEMU's
                // x-msg-timeout (5000 ms by default) or QEMU gives up on the reply.
                self.device.reset_and_wait(ResetCause::VfioUser);
                Served::Reply
            }
        };
        finish_reply(out, header);
        Ok(served)
    }

    fn check_region(&self, region: u32) -> Result<(), Refusal> {
        if (region as usize) < self.regions.len() {
            Ok(())
        } else {
            Err(Refusal::NoRegion(region))
        }
    }

    fn region_info(
        &self,
        argsz: u32,
        index: u32,
        out: &mut Vec<u8>,
    ) -> Result<Served<'_>, Refusal> {
        let region = self
            .regions
            .get(index as usize)
            .ok_or(Refusal::NoRegion(index))?;
        let mut info = region.info;
        if region.sparse_areas.is_empty() {
            put_region_info(out, &info);
            return Ok(Served::Reply);
        }
        // argsz tells the client how much room the whole reply needs; the capability and
        // the fd go only into a reply that has that room (QEMU asks again with it).
        let full = info.argsz as usize + sparse_mmap_cap_size(region.sparse_areas.len());
        info.argsz = full as u32;
        info.flags |= VFIO_REGION_INFO_FLAG_CAPS;
        // QEMU 10.2 rejects CAPS with a cap_offset inside the struct even in a reply too
        // short to carry the capability, so it points past the struct either way.
        info.cap_offset = std::mem::size_of::<vfio_region_info>() as u32;
        put_region_info(out, &info);
        if (argsz as usize) < full {
            return Ok(Served::Reply);
        }
        put_sparse_mmap_cap(out, &region.sparse_areas);
        Ok(Served::ReplyWithFd(self.device.cmb().fd()))
    }

    /// The kernel's checks (vfio_set_irqs_validate_and_prepare), less its one exception:
    /// DATA_NONE with count 0 disables an index whatever its size.
    fn check_irq_set(&self, set: &IrqSet) -> Result<(), Refusal> {
        let irq = self
            .irqs
            .get(set.index as usize)
            .ok_or(Refusal::NoIrq(set.index))?;
        let data = set.flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let action = set.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        let known = VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if !data.is_power_of_two() || !action.is_power_of_two() || set.flags & !known != 0 {
            return Err(Refusal::IrqFlags(set.flags));
        }
        if set.count == 0 && data == VFIO_IRQ_SET_DATA_NONE {
            return Ok(());
        }
        if set
            .start
            .checked_add(set.count)
            .is_none_or(|end| end > irq.count)
            || set.count == 0
        {
            return Err(Refusal::IrqRange {
                index: set.index,
                start: set.start,
                count: set.count,
                available: irq.count,
            });
        }
        Ok(())
    }
}

fn command_of(request: &Request<'_>) -> Command {
    match request {
        Request::Version { .. } => Command::Version,
        Request::DmaMap(_) => Command::DmaMap,
        Request::DmaUnmap(_) => Command::DmaUnmap,
        Request::GetInfo => Command::GetInfo,
        Request::GetRegionInfo { .. } => Command::GetRegionInfo,
        Request::GetIrqInfo { .. } => Command::GetIrqInfo,
        Request::SetIrqs { .. } => Command::SetIrqs,
        Request::RegionRead(_) => Command::RegionRead,
        Request::RegionWrite { .. } => Command::RegionWrite,
        Request::DeviceReset => Command::DeviceReset,
    }
}

/// VERSION reply: major 0, minor 0 (the only version there is) and what this server takes:
/// no write_multiple, no migration, no twin socket. QEMU 10.2 reads the reply into the buffer
/// of its own proposal, so this must stay shorter than that (about 200 bytes).
fn put_version(out: &mut Vec<u8>) {
    put_u16(out, 0);
    put_u16(out, 0);
    let capabilities = format!(
        "{{\"capabilities\":{{\"max_msg_fds\":{MAX_MSG_FDS},\
         \"max_data_xfer_size\":{MAX_DATA_XFER_SIZE},\"max_dma_maps\":{MAX_DMA_MAPS}}}}}"
    );
    out.extend_from_slice(capabilities.as_bytes());
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(address: u64, size: u64) -> DmaMap {
        DmaMap {
            argsz: 32,
            flags: 3,
            offset: 0,
            address,
            size,
        }
    }

    fn unmap(flags: u32, address: u64, size: u64) -> DmaUnmap {
        DmaUnmap {
            argsz: 24,
            flags,
            address,
            size,
        }
    }

    #[test]
    fn dma_table_refuses_overlaps_and_unknown_unmaps() {
        let mut table = DmaTable::default();
        table.map(&map(0x1000, 0x1000)).expect("first");
        table.map(&map(0x3000, 0x1000)).expect("apart");
        table
            .map(&map(0x2000, 0x1000))
            .expect("between, touching both");
        for (a, s) in [(0x1000, 0x1000), (0x1800, 0x10), (0, 0x1001), (0x3fff, 1)] {
            let e = table.map(&map(a, s)).expect_err("overlap");
            assert_eq!(e.errno(), libc::EEXIST, "{a:#x}+{s:#x}: {e}");
        }
        assert_eq!(
            table.map(&map(0, 0)).map_err(|e| e.errno()),
            Err(libc::EINVAL)
        );
        assert_eq!(
            table.map(&map(u64::MAX, 2)).map_err(|e| e.errno()),
            Err(libc::EINVAL)
        );
        let partial = table.unmap(&unmap(0, 0x1000, 0x800)).expect_err("partial");
        assert_eq!(partial.errno(), libc::ENOENT);
        table.unmap(&unmap(0, 0x2000, 0x1000)).expect("exact");
        let again = table.unmap(&unmap(0, 0x2000, 0x1000)).expect_err("gone");
        assert_eq!(again.errno(), libc::ENOENT);
        let dirty = table.unmap(&unmap(1, 0, 0)).expect_err("dirty bitmap");
        assert_eq!(dirty.errno(), libc::ENOTSUP);
        let ranged_all = table
            .unmap(&unmap(2, 0x1000, 0x1000))
            .expect_err("all+range");
        assert_eq!(ranged_all.errno(), libc::EINVAL);
        table.unmap(&unmap(2, 0, 0)).expect("all");
        assert!(table.0.is_empty());
    }

    #[test]
    fn dma_table_is_bounded() {
        let mut table = DmaTable::default();
        for i in 0..MAX_DMA_MAPS as u64 {
            table.map(&map(i * 0x1000, 0x1000)).expect("fits");
        }
        let full = table.map(&map(u64::MAX / 2, 0x1000)).expect_err("full");
        assert_eq!(full.errno(), libc::ENOSPC);
    }

    #[test]
    fn version_reply_fits_inside_qemus_proposal_and_is_nul_terminated() {
        let mut out = Vec::new();
        put_version(&mut out);
        assert!(out.len() < 200, "{}", out.len());
        assert_eq!(out.last(), Some(&0));
        let json = std::str::from_utf8(&out[4..out.len() - 1]).expect("utf-8");
        let value: serde_json::Value = serde_json::from_str(json).expect("json");
        assert_eq!(value["capabilities"]["max_msg_fds"], MAX_MSG_FDS);
    }
}
