//! iommufd (/dev/iommu): IO address spaces, user memory and dma-bufs mapped into them.
//!
//! The uAPI is declared here from Linux 7.3's include/uapi/linux/iommufd.h (vfio-bindings has
//! the VFIO side only). Every iommufd ioctl is _IO(';', 0x80 + n) and carries its argument size
//! in the struct's first u32, like VFIO's argsz.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use crate::error::{AgentError, Result};

const IOMMUFD_TYPE: u32 = b';' as u32;

// enum in iommufd.h: IOMMUFD_CMD_BASE = 0x80, then one number per command in order.
ioctl_io_nr!(IOMMU_DESTROY, IOMMUFD_TYPE, 0x80);
ioctl_io_nr!(IOMMU_IOAS_ALLOC, IOMMUFD_TYPE, 0x81);
ioctl_io_nr!(IOMMU_IOAS_MAP, IOMMUFD_TYPE, 0x85);
ioctl_io_nr!(IOMMU_IOAS_UNMAP, IOMMUFD_TYPE, 0x86);
ioctl_io_nr!(IOMMU_IOAS_MAP_FILE, IOMMUFD_TYPE, 0x8f);

/// enum iommufd_ioas_map_flags.
pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;
const MAP_FLAGS: u32 =
    IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IommuDestroy {
    pub size: u32,
    pub id: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IommuIoasAlloc {
    pub size: u32,
    pub flags: u32,
    pub out_ioas_id: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IommuIoasMap {
    pub size: u32,
    pub flags: u32,
    pub ioas_id: u32,
    pub reserved: u32,
    pub user_va: u64,
    pub length: u64,
    pub iova: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IommuIoasMapFile {
    pub size: u32,
    pub flags: u32,
    pub ioas_id: u32,
    pub fd: i32,
    pub start: u64,
    pub length: u64,
    pub iova: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IommuIoasUnmap {
    pub size: u32,
    pub ioas_id: u32,
    pub iova: u64,
    pub length: u64,
}

fn size_of<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

/// The operations on one open iommufd; a trait so the dispatcher is tested with a fake.
pub trait Iommu: Send + Sync + std::fmt::Debug {
    /// The fd VFIO_DEVICE_BIND_IOMMUFD takes.
    fn raw_fd(&self) -> RawFd;
    fn ioas_alloc(&self) -> Result<u32>;
    /// Maps `length` bytes of this process at `user_va` to `iova`, read-write.
    fn map_user(&self, ioas: u32, user_va: u64, length: u64, iova: u64) -> Result<()>;
    /// Maps [`start`, `start + length`) of the file `fd` (a dma-buf) to `iova`, read-write.
    fn map_file(&self, ioas: u32, fd: RawFd, start: u64, length: u64, iova: u64) -> Result<()>;
    /// Unmaps [`iova`, `iova + length`); returns the bytes unmapped.
    fn unmap(&self, ioas: u32, iova: u64, length: u64) -> Result<u64>;
    fn destroy(&self, id: u32) -> Result<()>;
}

/// /dev/iommu, open.
#[derive(Debug)]
pub struct Iommufd {
    file: File,
}

impl Iommufd {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| {
                AgentError::os(
                    format!(
                        "opening {} (a kernel without CONFIG_IOMMUFD has none)",
                        path.display()
                    ),
                    e,
                )
            })?;
        Ok(Self { file })
    }
}

impl Iommu for Iommufd {
    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn ioas_alloc(&self) -> Result<u32> {
        let mut arg = IommuIoasAlloc {
            size: size_of::<IommuIoasAlloc>(),
            ..Default::default()
        };
        // SAFETY: IOMMU_IOAS_ALLOC reads and writes `size` bytes of `arg`, which is that large.
        if unsafe { ioctl_with_mut_ref(&self.file, IOMMU_IOAS_ALLOC(), &mut arg) } < 0 {
            return Err(AgentError::last_os("IOMMU_IOAS_ALLOC"));
        }
        Ok(arg.out_ioas_id)
    }

    fn map_user(&self, ioas: u32, user_va: u64, length: u64, iova: u64) -> Result<()> {
        let mut arg = IommuIoasMap {
            size: size_of::<IommuIoasMap>(),
            flags: MAP_FLAGS,
            ioas_id: ioas,
            reserved: 0,
            user_va,
            length,
            iova,
        };
        // SAFETY: IOMMU_IOAS_MAP reads `size` bytes of `arg`; the kernel pins the user range
        // itself and fails on an invalid one.
        if unsafe { ioctl_with_mut_ref(&self.file, IOMMU_IOAS_MAP(), &mut arg) } < 0 {
            return Err(AgentError::last_os(format!(
                "IOMMU_IOAS_MAP ioas {ioas} {length:#x} bytes at iova {iova:#x}"
            )));
        }
        Ok(())
    }

    fn map_file(&self, ioas: u32, fd: RawFd, start: u64, length: u64, iova: u64) -> Result<()> {
        let mut arg = IommuIoasMapFile {
            size: size_of::<IommuIoasMapFile>(),
            flags: MAP_FLAGS,
            ioas_id: ioas,
            fd,
            start,
            length,
            iova,
        };
        // SAFETY: IOMMU_IOAS_MAP_FILE reads `size` bytes of `arg`; `fd` is checked by the kernel.
        if unsafe { ioctl_with_mut_ref(&self.file, IOMMU_IOAS_MAP_FILE(), &mut arg) } < 0 {
            return Err(AgentError::last_os(format!(
                "IOMMU_IOAS_MAP_FILE ioas {ioas} {length:#x} bytes at {start:#x} of fd {fd} to iova {iova:#x}"
            )));
        }
        Ok(())
    }

    fn unmap(&self, ioas: u32, iova: u64, length: u64) -> Result<u64> {
        let mut arg = IommuIoasUnmap {
            size: size_of::<IommuIoasUnmap>(),
            ioas_id: ioas,
            iova,
            length,
        };
        // SAFETY: IOMMU_IOAS_UNMAP reads and writes `size` bytes of `arg`.
        if unsafe { ioctl_with_mut_ref(&self.file, IOMMU_IOAS_UNMAP(), &mut arg) } < 0 {
            return Err(AgentError::last_os(format!(
                "IOMMU_IOAS_UNMAP ioas {ioas} {length:#x} bytes at iova {iova:#x}"
            )));
        }
        // The kernel writes back how much it unmapped.
        Ok(arg.length)
    }

    fn destroy(&self, id: u32) -> Result<()> {
        let mut arg = IommuDestroy {
            size: size_of::<IommuDestroy>(),
            id,
        };
        // SAFETY: IOMMU_DESTROY reads `size` bytes of `arg`.
        if unsafe { ioctl_with_mut_ref(&self.file, IOMMU_DESTROY(), &mut arg) } < 0 {
            return Err(AgentError::last_os(format!("IOMMU_DESTROY object {id}")));
        }
        Ok(())
    }
}

/// Page-aligned zeroed memory of this process that an IOAS maps for a device's DMA.
#[derive(Debug)]
pub struct DmaMemory {
    base: *mut u8,
    length: usize,
}

// SAFETY: the mapping is owned by this struct and only read or written through `read`/`write`
// under the dispatcher's table lock or by the device (DMA), which the kernel arbitrates.
unsafe impl Send for DmaMemory {}
// SAFETY: as above: `&self` methods only copy bytes in or out.
unsafe impl Sync for DmaMemory {}

impl DmaMemory {
    pub fn new(length: usize) -> Result<Self> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(AgentError::last_os(format!(
                "mmap of {length:#x} bytes of DMA memory"
            )));
        }
        Ok(Self {
            base: base.cast(),
            length,
        })
    }

    pub fn address(&self) -> u64 {
        self.base as u64
    }

    pub fn len(&self) -> usize {
        self.length
    }

    /// Copies `data` in at `offset`; the caller checked the bounds.
    pub fn write(&self, offset: usize, data: &[u8]) {
        debug_assert!(offset + data.len() <= self.length);
        // SAFETY: [offset, offset + len) lies inside the live mapping (checked by the caller);
        // a device may DMA into the same bytes, which is the race the rig is about and harmless
        // to this process (plain bytes).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(offset), data.len()) }
    }

    /// Copies `length` bytes out at `offset`; the caller checked the bounds.
    pub fn read(&self, offset: usize, length: usize) -> Vec<u8> {
        debug_assert!(offset + length <= self.length);
        let mut out = vec![0u8; length];
        // SAFETY: as in `write`.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(offset), out.as_mut_ptr(), length) }
        out
    }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        // SAFETY: base/length come from a successful mmap that nothing else unmaps.
        unsafe {
            libc::munmap(self.base.cast(), self.length);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn argument_layouts_match_the_uapi_header() {
        assert_eq!(size_of::<IommuDestroy>(), 8);
        assert_eq!(size_of::<IommuIoasAlloc>(), 12);
        assert_eq!(size_of::<IommuIoasMap>(), 40);
        assert_eq!(offset_of!(IommuIoasMap, user_va), 16);
        assert_eq!(offset_of!(IommuIoasMap, iova), 32);
        assert_eq!(size_of::<IommuIoasMapFile>(), 40);
        assert_eq!(offset_of!(IommuIoasMapFile, fd), 12);
        assert_eq!(offset_of!(IommuIoasMapFile, start), 16);
        assert_eq!(size_of::<IommuIoasUnmap>(), 24);
        assert_eq!(offset_of!(IommuIoasUnmap, iova), 8);
    }

    #[test]
    fn ioctl_numbers_match_the_uapi_header() {
        // _IO(';', 0x80 + n) = (0x3b << 8) | (0x80 + n)
        assert_eq!(IOMMU_DESTROY(), 0x3b80);
        assert_eq!(IOMMU_IOAS_ALLOC(), 0x3b81);
        assert_eq!(IOMMU_IOAS_MAP(), 0x3b85);
        assert_eq!(IOMMU_IOAS_UNMAP(), 0x3b86);
        assert_eq!(IOMMU_IOAS_MAP_FILE(), 0x3b8f);
    }

    #[test]
    fn dma_memory_is_zeroed_and_round_trips() {
        let memory = DmaMemory::new(4096).expect("mmap");
        assert_eq!(memory.address() % 4096, 0);
        assert_eq!(memory.read(0, 16), vec![0; 16]);
        memory.write(8, &[1, 2, 3]);
        assert_eq!(memory.read(7, 5), vec![0, 1, 2, 3, 0]);
    }
}
