//! VFIO devices, opened through the legacy container/group uAPI (noiommu mode by default) or
//! through their cdev bound to an iommufd (the vIOMMU rig), and the two dma-buf export
//! payloads (the seed series' and upstream's).
//!
//! ioctl numbers follow include/uapi/linux/vfio.h: every VFIO ioctl is _IO(VFIO_TYPE,
//! VFIO_BASE + n); the argument size is carried in the structs' argsz, not in the number.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vfio_bindings::bindings::vfio::{
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_device_feature,
    vfio_group_status, vfio_region_info, VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION,
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY,
    VFIO_DEVICE_FEATURE_LOW_POWER_EXIT, VFIO_DEVICE_FEATURE_SET, VFIO_GROUP_FLAGS_CONTAINER_SET,
    VFIO_GROUP_FLAGS_VIABLE, VFIO_NOIOMMU_IOMMU, VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_MMAP,
};
use vmm_sys_util::ioctl::{
    ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val,
};
use vmm_sys_util::ioctl_io_nr;

use crate::error::{AgentError, Result};
use crate::mmio;

const VFIO_TYPE: u32 = vfio_bindings::bindings::vfio::VFIO_TYPE as u32;
const VFIO_BASE: u32 = vfio_bindings::bindings::vfio::VFIO_BASE;

ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO_TYPE, VFIO_BASE);
ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE, VFIO_BASE + 2);
ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO_TYPE, VFIO_BASE + 3);
ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE, VFIO_BASE + 4);
ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE, VFIO_BASE + 6);
ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE, VFIO_BASE + 8);
ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE, VFIO_BASE + 11);
ioctl_io_nr!(
    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
    VFIO_TYPE,
    VFIO_BASE + 12
);
ioctl_io_nr!(VFIO_DEVICE_PCI_HOT_RESET, VFIO_TYPE, VFIO_BASE + 13);
ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE, VFIO_BASE + 17);
ioctl_io_nr!(VFIO_DEVICE_BIND_IOMMUFD, VFIO_TYPE, VFIO_BASE + 18);
ioctl_io_nr!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_TYPE, VFIO_BASE + 19);

/// The seed series' feature number in our 6.1 port (the posting's 3 collides with 6.1's
/// LOW_POWER_ENTRY, and 6.1 uses 0..8).
pub const FEATURE_DMA_BUF_SEED_V1: u32 = 9;
/// Upstream's VFIO_DEVICE_FEATURE_DMA_BUF (7.x).
pub const FEATURE_DMA_BUF_UPSTREAM: u32 =
    vfio_bindings::bindings::vfio::VFIO_DEVICE_FEATURE_DMA_BUF;

/// The seed's `struct vfio_device_feature_dma_buf` (patch 4/4). Its 32-bit offset and the
/// 4-byte hole before `length` are part of what the rig tests (B4), so they are kept as is.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SeedDmaBuf {
    pub region_index: u32,
    pub open_flags: u32,
    pub offset: u32,
    pub length: u64,
}

/// Upstream's `struct vfio_device_feature_dma_buf` header; `nr_ranges` ranges follow it.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UpstreamDmaBuf {
    pub region_index: u32,
    pub open_flags: u32,
    pub flags: u32,
    pub nr_ranges: u32,
}

/// Upstream's `struct vfio_region_dma_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DmaRange {
    pub offset: u64,
    pub length: u64,
}

/// VFIO_DEVICE_FEATURE's argument for the seed: the generic header, then the payload.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SeedFeature {
    pub argsz: u32,
    pub flags: u32,
    pub payload: SeedDmaBuf,
}

/// VFIO_DEVICE_FEATURE's argument for upstream with exactly one range.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UpstreamFeature {
    pub argsz: u32,
    pub flags: u32,
    pub payload: UpstreamDmaBuf,
    pub range: DmaRange,
}

/// What a dma-buf export asks the kernel for, in the uAPI chosen by the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmabufRequest {
    SeedV1 {
        region_index: u32,
        offset: u32,
        length: u64,
    },
    Upstream {
        region_index: u32,
        offset: u64,
        length: u64,
    },
}

/// open(2) flags of the dma-buf file: read-write, and not inherited by anything spawned later.
pub const DMABUF_OPEN_FLAGS: u32 = (libc::O_RDWR | libc::O_CLOEXEC) as u32;

impl SeedFeature {
    pub fn new(region_index: u32, offset: u32, length: u64) -> Self {
        Self {
            argsz: std::mem::size_of::<Self>() as u32,
            flags: VFIO_DEVICE_FEATURE_GET | FEATURE_DMA_BUF_SEED_V1,
            payload: SeedDmaBuf {
                region_index,
                open_flags: DMABUF_OPEN_FLAGS,
                offset,
                length,
            },
        }
    }
}

impl UpstreamFeature {
    pub fn new(region_index: u32, offset: u64, length: u64) -> Self {
        Self {
            argsz: std::mem::size_of::<Self>() as u32,
            flags: VFIO_DEVICE_FEATURE_GET | FEATURE_DMA_BUF_UPSTREAM,
            payload: UpstreamDmaBuf {
                region_index,
                open_flags: DMABUF_OPEN_FLAGS,
                flags: 0,
                nr_ranges: 1,
            },
            range: DmaRange { offset, length },
        }
    }
}

/// The PCI address in the second word of a `struct vfio_pci_dependent_device`
/// ({u16 segment; u8 bus; u8 devfn} read as one little-endian u32).
pub fn dependent_bdf(location: u32) -> String {
    let segment = location & 0xffff;
    let bus = (location >> 16) & 0xff;
    let devfn = location >> 24;
    format!("{segment:04x}:{bus:02x}:{:02x}.{}", devfn >> 3, devfn & 7)
}

/// What VFIO_DEVICE_GET_REGION_INFO says about a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    pub index: u32,
    pub flags: u32,
    pub size: u64,
    /// Offset of the region in the device fd (for pread/pwrite and mmap).
    pub offset: u64,
}

impl RegionInfo {
    pub fn mappable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_MMAP != 0
    }
}

/// A BAR mapped through the device fd; unmapped on drop. While it exists the device file
/// stays referenced by the mapping, so it is dropped before the device is closed.
#[derive(Debug)]
struct BarMapping {
    base: *mut u8,
    size: usize,
}

// SAFETY: the mapping is plain shared memory (MMIO) owned by this struct; accesses go through
// volatile reads/writes that any thread may issue, and the kernel serialises nothing for us
// beyond what the device itself does, which is what the rig wants to exercise.
unsafe impl Send for BarMapping {}
// SAFETY: as above; no interior state besides the pointer, which is never changed.
unsafe impl Sync for BarMapping {}

impl Drop for BarMapping {
    fn drop(&mut self) {
        // SAFETY: base/size come from a successful mmap and nothing else unmaps them.
        unsafe {
            libc::munmap(self.base.cast(), self.size);
        }
    }
}

/// How a device fd was obtained, which decides how a hot reset proves ownership.
#[derive(Debug)]
enum Opened {
    /// Through its group (and the container the group was set into).
    Group {
        group: File,
        group_id: u32,
        _container: Option<File>,
    },
    /// Through its cdev, bound to an iommufd: a hot reset passes no group fds and the kernel
    /// checks that every affected device is bound to the same iommufd.
    Cdev,
}

/// An open VFIO device with what keeps it open.
#[derive(Debug)]
pub struct VfioDevice {
    bdf: String,
    // Field order is drop order: mappings first (they reference the device file), then the
    // device, then its group and container, the reverse of opening.
    mappings: Mutex<Vec<Option<Arc<BarMapping>>>>,
    device: File,
    opened: Opened,
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| AgentError::os(format!("opening {}", path.display()), e))
}

impl VfioDevice {
    /// Opens `bdf` through its group node: set the container and IOMMU type if the group has
    /// none yet, then get the device fd.
    pub fn open(
        bdf: &str,
        group_id: u32,
        group_path: &Path,
        noiommu: bool,
        container_path: &Path,
    ) -> Result<Self> {
        let group = open_rw(group_path)?;
        let mut status = vfio_group_status {
            argsz: std::mem::size_of::<vfio_group_status>() as u32,
            flags: 0,
        };
        // SAFETY: VFIO_GROUP_GET_STATUS writes a vfio_group_status no larger than argsz.
        let ret = unsafe { ioctl_with_mut_ref(&group, VFIO_GROUP_GET_STATUS(), &mut status) };
        if ret < 0 {
            return Err(AgentError::last_os(format!(
                "VFIO_GROUP_GET_STATUS on {}",
                group_path.display()
            )));
        }
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(AgentError::State {
                errno: libc::EPERM,
                message: format!(
                    "group {} is not viable (a function in it is bound to another driver)",
                    group_path.display()
                ),
            });
        }
        let container = if status.flags & VFIO_GROUP_FLAGS_CONTAINER_SET == 0 {
            let container = open_rw(container_path)?;
            // SAFETY: VFIO_GET_API_VERSION takes no argument.
            let version = unsafe { ioctl(&container, VFIO_GET_API_VERSION()) };
            if version != VFIO_API_VERSION as i32 {
                return Err(AgentError::State {
                    errno: libc::EPROTO,
                    message: format!(
                        "{} speaks VFIO API {version}, expected {VFIO_API_VERSION}",
                        container_path.display()
                    ),
                });
            }
            let container_fd: libc::c_int = container.as_raw_fd();
            // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int (the container fd).
            let ret = unsafe { ioctl_with_ref(&group, VFIO_GROUP_SET_CONTAINER(), &container_fd) };
            if ret < 0 {
                return Err(AgentError::last_os(format!(
                    "VFIO_GROUP_SET_CONTAINER {} -> {}",
                    group_path.display(),
                    container_path.display()
                )));
            }
            let iommu_type = if noiommu {
                VFIO_NOIOMMU_IOMMU
            } else {
                VFIO_TYPE1v2_IOMMU
            };
            // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
            let ret = unsafe {
                ioctl_with_val(
                    &container,
                    VFIO_SET_IOMMU(),
                    libc::c_ulong::from(iommu_type),
                )
            };
            if ret < 0 {
                return Err(AgentError::last_os(format!(
                    "VFIO_SET_IOMMU type {iommu_type} on {}",
                    container_path.display()
                )));
            }
            Some(container)
        } else {
            None
        };
        let name = CString::new(bdf)
            .map_err(|_| AgentError::Invalid(format!("{bdf:?} contains a NUL byte")))?;
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated string that outlives the call.
        let fd = unsafe { ioctl_with_ptr(&group, VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) };
        if fd < 0 {
            return Err(AgentError::last_os(format!(
                "VFIO_GROUP_GET_DEVICE_FD {bdf} on {}",
                group_path.display()
            )));
        }
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let device = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Self {
            bdf: bdf.to_owned(),
            mappings: Mutex::new(vec![None; VFIO_PCI_NUM_REGIONS as usize]),
            device,
            opened: Opened::Group {
                group,
                group_id,
                _container: container,
            },
        })
    }

    /// Opens `bdf` through its cdev and binds it to `iommufd`; returns the device and the
    /// iommufd device id (VFIO_DEVICE_BIND_IOMMUFD's out_devid).
    pub fn open_cdev(bdf: &str, cdev: &Path, iommufd: RawFd) -> Result<(Self, u32)> {
        let device = open_rw(cdev)?;
        let mut bind = vfio_device_bind_iommufd {
            argsz: std::mem::size_of::<vfio_device_bind_iommufd>() as u32,
            iommufd,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_BIND_IOMMUFD reads argsz bytes of `bind` and writes out_devid.
        let ret = unsafe { ioctl_with_mut_ref(&device, VFIO_DEVICE_BIND_IOMMUFD(), &mut bind) };
        if ret < 0 {
            return Err(AgentError::last_os(format!(
                "VFIO_DEVICE_BIND_IOMMUFD {bdf} ({}) to iommufd fd {iommufd}",
                cdev.display()
            )));
        }
        Ok((
            Self {
                bdf: bdf.to_owned(),
                mappings: Mutex::new(vec![None; VFIO_PCI_NUM_REGIONS as usize]),
                device,
                opened: Opened::Cdev,
            },
            bind.out_devid,
        ))
    }

    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT: the device's DMA goes through IOAS (or HWPT) `pt_id`.
    pub fn attach_ioas(&self, pt_id: u32) -> Result<()> {
        let mut attach = vfio_device_attach_iommufd_pt {
            argsz: std::mem::size_of::<vfio_device_attach_iommufd_pt>() as u32,
            pt_id,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_ATTACH_IOMMUFD_PT reads argsz bytes of `attach` and writes pt_id.
        let ret = unsafe {
            ioctl_with_mut_ref(&self.device, VFIO_DEVICE_ATTACH_IOMMUFD_PT(), &mut attach)
        };
        if ret < 0 {
            return Err(AgentError::last_os(format!(
                "VFIO_DEVICE_ATTACH_IOMMUFD_PT {} to object {pt_id}",
                self.bdf
            )));
        }
        Ok(())
    }

    /// VFIO_DEVICE_FEATURE SET LOW_POWER_ENTRY or LOW_POWER_EXIT (no payload).
    pub fn low_power(&self, enter: bool) -> Result<()> {
        let feature = if enter {
            VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY
        } else {
            VFIO_DEVICE_FEATURE_LOW_POWER_EXIT
        };
        let mut argument = vfio_device_feature {
            argsz: std::mem::size_of::<vfio_device_feature>() as u32,
            flags: VFIO_DEVICE_FEATURE_SET | feature,
            ..Default::default()
        };
        // SAFETY: the kernel reads argsz (8) bytes of `argument`, the header alone.
        let ret = unsafe { ioctl_with_mut_ref(&self.device, VFIO_DEVICE_FEATURE(), &mut argument) };
        if ret < 0 {
            return Err(AgentError::last_os(format!(
                "VFIO_DEVICE_FEATURE SET LOW_POWER_{} on {}",
                if enter { "ENTRY" } else { "EXIT" },
                self.bdf
            )));
        }
        Ok(())
    }

    pub fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let mut info = vfio_region_info {
            argsz: std::mem::size_of::<vfio_region_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: VFIO_DEVICE_GET_REGION_INFO writes at most argsz bytes into `info`.
        let ret =
            unsafe { ioctl_with_mut_ref(&self.device, VFIO_DEVICE_GET_REGION_INFO(), &mut info) };
        if ret < 0 {
            return Err(AgentError::last_os(format!(
                "VFIO_DEVICE_GET_REGION_INFO {} region {index}",
                self.bdf
            )));
        }
        Ok(RegionInfo {
            index,
            flags: info.flags,
            size: info.size,
            offset: info.offset,
        })
    }

    /// The mapping of `region`, created on first use.
    fn mapping(&self, region: &RegionInfo) -> Result<Arc<BarMapping>> {
        let mut mappings = self
            .mappings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let slot = mappings.get_mut(region.index as usize).ok_or_else(|| {
            AgentError::Invalid(format!("region {} has no mapping slot", region.index))
        })?;
        if let Some(mapping) = slot {
            return Ok(Arc::clone(mapping));
        }
        let size = usize::try_from(region.size).map_err(|_| {
            AgentError::Invalid(format!("region size {:#x} too large", region.size))
        })?;
        let offset = libc::off_t::try_from(region.offset).map_err(|_| {
            AgentError::Invalid(format!("region offset {:#x} too large", region.offset))
        })?;
        // SAFETY: a fresh shared mapping of the device fd at the region's offset; the kernel
        // checks the range, and the result is only used through `BarMapping`.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.device.as_raw_fd(),
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(AgentError::last_os(format!(
                "mmap of {} region {} ({:#x} bytes)",
                self.bdf, region.index, region.size
            )));
        }
        let mapping = Arc::new(BarMapping {
            base: base.cast(),
            size,
        });
        *slot = Some(Arc::clone(&mapping));
        Ok(mapping)
    }

    /// Reads `width` bytes at `offset` of a BAR through its mapping, or through the device fd
    /// when vfio-pci does not allow the BAR to be mapped. The caller checked bounds/alignment.
    pub fn bar_read(&self, region: &RegionInfo, offset: u64, width: u8) -> Result<u64> {
        if !region.mappable() {
            return self.region_read(region, offset, width);
        }
        let mapping = self.mapping(region)?;
        let at = usize::try_from(offset)
            .ok()
            .filter(|&at| {
                at.checked_add(usize::from(width))
                    .is_some_and(|end| end <= mapping.size)
            })
            .ok_or_else(|| {
                AgentError::Invalid(format!("offset {offset:#x} outside the mapping"))
            })?;
        // SAFETY: `at + width` lies inside the live mapping (checked above) and is aligned to
        // `width` (checked by the dispatcher); a fault (revoked BAR) is turned into an error.
        unsafe { mmio::read(mapping.base.add(at), width) }.map_err(|e| AgentError::State {
            errno: e.errno(),
            message: format!("{width}-byte read at {offset:#x} of the mapping: {e}"),
        })
    }

    /// Writes like [`Self::bar_read`] reads.
    pub fn bar_write(&self, region: &RegionInfo, offset: u64, width: u8, value: u64) -> Result<()> {
        if !region.mappable() {
            return self.region_write(region, offset, width, value);
        }
        let mapping = self.mapping(region)?;
        let at = usize::try_from(offset)
            .ok()
            .filter(|&at| {
                at.checked_add(usize::from(width))
                    .is_some_and(|end| end <= mapping.size)
            })
            .ok_or_else(|| {
                AgentError::Invalid(format!("offset {offset:#x} outside the mapping"))
            })?;
        // SAFETY: as in bar_read.
        unsafe { mmio::write(mapping.base.add(at), width, value) }.map_err(|e| AgentError::State {
            errno: e.errno(),
            message: format!("{width}-byte write at {offset:#x} of the mapping: {e}"),
        })
    }

    /// pread of exactly `width` bytes at `offset` of a region; vfio-pci turns an aligned access
    /// of 1, 2 or 4 bytes into one access of that size.
    pub fn region_read(&self, region: &RegionInfo, offset: u64, width: u8) -> Result<u64> {
        let mut bytes = [0u8; 8];
        let buf = &mut bytes[..usize::from(width)];
        let at = region.offset + offset;
        let count = self.device.read_at(buf, at).map_err(|e| {
            AgentError::os(
                format!("pread {width} bytes at {at:#x} of the device fd"),
                e,
            )
        })?;
        if count != usize::from(width) {
            return Err(AgentError::State {
                errno: libc::EIO,
                message: format!("pread returned {count} of {width} bytes"),
            });
        }
        Ok(u64::from_le_bytes(bytes))
    }

    pub fn region_write(
        &self,
        region: &RegionInfo,
        offset: u64,
        width: u8,
        value: u64,
    ) -> Result<()> {
        let bytes = value.to_le_bytes();
        let at = region.offset + offset;
        let count = self
            .device
            .write_at(&bytes[..usize::from(width)], at)
            .map_err(|e| {
                AgentError::os(
                    format!("pwrite {width} bytes at {at:#x} of the device fd"),
                    e,
                )
            })?;
        if count != usize::from(width) {
            return Err(AgentError::State {
                errno: libc::EIO,
                message: format!("pwrite wrote {count} of {width} bytes"),
            });
        }
        Ok(())
    }

    pub fn reset(&self) -> Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        let ret = unsafe { ioctl(&self.device, VFIO_DEVICE_RESET()) };
        if ret < 0 {
            return Err(AgentError::last_os(format!(
                "VFIO_DEVICE_RESET {}",
                self.bdf
            )));
        }
        Ok(())
    }

    /// The functions a hot reset of this device would reset, from
    /// VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: (group id, "ssss:bb:dd.f").
    pub fn hot_reset_dependents(&self) -> Result<Vec<(u32, String)>> {
        // struct vfio_pci_hot_reset_info {u32 argsz, flags, count; struct
        // vfio_pci_dependent_device {u32 group_id; u16 segment; u8 bus, devfn;} devices[];}
        // as u32 words: the header, then two words per device.
        let mut count = 0usize;
        loop {
            let mut words = vec![0u32; 3 + 2 * count];
            words[0] = (words.len() * 4) as u32;
            // SAFETY: the kernel writes at most argsz bytes, the size of `words`.
            let ret = unsafe {
                ioctl_with_mut_ptr(
                    &self.device,
                    VFIO_DEVICE_GET_PCI_HOT_RESET_INFO(),
                    words.as_mut_ptr(),
                )
            };
            let needed = words[2] as usize;
            if ret < 0 {
                let error = std::io::Error::last_os_error();
                // ENOSPC: too small, `count` now says how many devices there are.
                if error.raw_os_error() == Some(libc::ENOSPC) && needed > count {
                    count = needed;
                    continue;
                }
                return Err(AgentError::os(
                    format!("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO {}", self.bdf),
                    error,
                ));
            }
            return Ok(words[3..3 + 2 * needed.min(count)]
                .chunks_exact(2)
                .map(|device| (device[0], dependent_bdf(device[1])))
                .collect());
        }
    }

    /// VFIO_DEVICE_PCI_HOT_RESET with this device's group, the only one the agent can prove
    /// ownership of, or for a cdev device with no group (ownership through its iommufd);
    /// returns the functions reset. The kernel refuses (EINVAL) if the reset would reach
    /// devices not owned, and the error lists them.
    pub fn hot_reset(&self) -> Result<Vec<String>> {
        let dependents = self.hot_reset_dependents()?;
        // struct vfio_pci_hot_reset {u32 argsz, flags, count; s32 group_fds[];}
        let (words, owner): ([u32; 4], String) = match &self.opened {
            Opened::Group {
                group, group_id, ..
            } => (
                [16, 0, 1, group.as_raw_fd() as u32],
                format!("group {group_id} only"),
            ),
            Opened::Cdev => ([12, 0, 0, 0], "its iommufd".into()),
        };
        // SAFETY: the kernel reads argsz (16 or 12) bytes of `words`.
        let ret =
            unsafe { ioctl_with_ptr(&self.device, VFIO_DEVICE_PCI_HOT_RESET(), words.as_ptr()) };
        if ret < 0 {
            let listed: Vec<String> = dependents
                .iter()
                .map(|(group, bdf)| format!("{bdf} (group {group})"))
                .collect();
            return Err(AgentError::last_os(format!(
                "VFIO_DEVICE_PCI_HOT_RESET {} with {owner}; the reset covers {}",
                self.bdf,
                listed.join(", ")
            )));
        }
        Ok(dependents.into_iter().map(|(_, bdf)| bdf).collect())
    }

    /// VFIO_DEVICE_FEATURE GET of a dma-buf; the kernel returns the new dma-buf fd.
    pub fn export_dmabuf(&self, request: &DmabufRequest) -> Result<OwnedFd> {
        let fd = match *request {
            DmabufRequest::SeedV1 {
                region_index,
                offset,
                length,
            } => {
                let mut argument = SeedFeature::new(region_index, offset, length);
                // SAFETY: the kernel reads argsz bytes of `argument`, which is that large.
                unsafe { ioctl_with_mut_ref(&self.device, VFIO_DEVICE_FEATURE(), &mut argument) }
            }
            DmabufRequest::Upstream {
                region_index,
                offset,
                length,
            } => {
                let mut argument = UpstreamFeature::new(region_index, offset, length);
                // SAFETY: as above, for the upstream argument with its one range.
                unsafe { ioctl_with_mut_ref(&self.device, VFIO_DEVICE_FEATURE(), &mut argument) }
            }
        };
        if fd < 0 {
            return Err(AgentError::last_os(format!(
                "VFIO_DEVICE_FEATURE GET dma-buf on {}",
                self.bdf
            )));
        }
        // SAFETY: on success the ioctl returns a new fd that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Keeps the header type of vfio-bindings in view: our combined structs start with it.
const _: () = assert!(std::mem::size_of::<vfio_device_feature>() == 8);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn seed_payload_has_the_hole_before_length() {
        assert_eq!(size_of::<SeedDmaBuf>(), 24);
        assert_eq!(offset_of!(SeedDmaBuf, region_index), 0);
        assert_eq!(offset_of!(SeedDmaBuf, open_flags), 4);
        assert_eq!(offset_of!(SeedDmaBuf, offset), 8);
        assert_eq!(offset_of!(SeedDmaBuf, length), 16);
        assert_eq!(size_of::<SeedFeature>(), 32);
        assert_eq!(offset_of!(SeedFeature, payload), 8);
    }

    #[test]
    fn upstream_payload_is_16_bytes_plus_16_per_range() {
        assert_eq!(size_of::<UpstreamDmaBuf>(), 16);
        assert_eq!(size_of::<DmaRange>(), 16);
        assert_eq!(
            size_of::<UpstreamDmaBuf>(),
            size_of::<vfio_bindings::bindings::vfio::vfio_device_feature_dma_buf>()
        );
        assert_eq!(offset_of!(UpstreamFeature, payload), 8);
        assert_eq!(offset_of!(UpstreamFeature, range), 24);
        assert_eq!(size_of::<UpstreamFeature>(), 40);
    }

    #[test]
    fn feature_arguments_carry_get_flag_feature_and_argsz() {
        let seed = SeedFeature::new(2, 0x1000, 0x2000);
        assert_eq!(seed.argsz, 32);
        assert_eq!(seed.flags, 0x10000 | 9);
        assert_eq!(seed.payload.open_flags, 0o2 | 0o2000000);
        let upstream = UpstreamFeature::new(2, 0x1000, 0x2000);
        assert_eq!(upstream.argsz, 40);
        assert_eq!(upstream.flags, 0x10000 | 11);
        assert_eq!(upstream.payload.nr_ranges, 1);
        assert_eq!(upstream.payload.flags, 0);
        assert_eq!(upstream.range.offset, 0x1000);
    }

    #[test]
    fn dependent_device_locations_read_as_pci_addresses() {
        // segment 0, bus 2, device 0 function 1 (devfn 0x01)
        assert_eq!(dependent_bdf(0x0102_0000), "0000:02:00.1");
        // segment 0x10, bus 0xff, device 0x1f function 7 (devfn 0xff)
        assert_eq!(dependent_bdf(0xffff_0010), "0010:ff:1f.7");
    }

    #[test]
    fn ioctl_numbers_match_the_uapi_header() {
        // _IO(';', 100 + n) = (0x3b << 8) | (100 + n)
        assert_eq!(VFIO_GET_API_VERSION(), 0x3b64);
        assert_eq!(VFIO_SET_IOMMU(), 0x3b66);
        assert_eq!(VFIO_GROUP_GET_STATUS(), 0x3b67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER(), 0x3b68);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD(), 0x3b6a);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO(), 0x3b6c);
        assert_eq!(VFIO_DEVICE_RESET(), 0x3b6f);
        assert_eq!(VFIO_DEVICE_GET_PCI_HOT_RESET_INFO(), 0x3b70);
        assert_eq!(VFIO_DEVICE_PCI_HOT_RESET(), 0x3b71);
        assert_eq!(VFIO_DEVICE_FEATURE(), 0x3b75);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD(), 0x3b76);
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT(), 0x3b77);
    }
}
