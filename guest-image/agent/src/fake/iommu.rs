//! A fake iommufd: IOAS ids and the IOVA ranges mapped in each, with the kernel's answers to
//! an overlapping map (EEXIST), an unmap of nothing (ENOENT) and an unknown IOAS (ENOENT).

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::Mutex;

use crate::dispatch::lock;
use crate::error::{AgentError, Result};
use crate::iommufd::Iommu;

/// What a mapping maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapped {
    User { user_va: u64 },
    File { fd: RawFd, start: u64 },
}

/// One IOAS: iova -> (length, what).
pub type Space = BTreeMap<u64, (u64, Mapped)>;

#[derive(Debug, Default)]
pub struct FakeIommu {
    next_id: Mutex<u32>,
    /// IOAS id -> its mappings.
    pub ioas: Mutex<BTreeMap<u32, Space>>,
}

fn errno(what: &str, errno: i32) -> AgentError {
    AgentError::os(what, std::io::Error::from_raw_os_error(errno))
}

impl FakeIommu {
    fn map(&self, ioas: u32, iova: u64, length: u64, what: Mapped) -> Result<()> {
        let mut spaces = lock(&self.ioas);
        let space = spaces
            .get_mut(&ioas)
            .ok_or_else(|| errno("IOMMU_IOAS_MAP", libc::ENOENT))?;
        let end = iova
            .checked_add(length)
            .ok_or_else(|| errno("IOMMU_IOAS_MAP", libc::EOVERFLOW))?;
        if length == 0 || !iova.is_multiple_of(4096) || !length.is_multiple_of(4096) {
            return Err(errno("IOMMU_IOAS_MAP", libc::EINVAL));
        }
        if space
            .iter()
            .any(|(&start, &(len, _))| start < end && iova < start + len)
        {
            return Err(errno("IOMMU_IOAS_MAP", libc::EEXIST));
        }
        space.insert(iova, (length, what));
        Ok(())
    }
}

impl Iommu for FakeIommu {
    fn raw_fd(&self) -> RawFd {
        -1
    }
    fn ioas_alloc(&self) -> Result<u32> {
        let mut next = lock(&self.next_id);
        *next += 1;
        lock(&self.ioas).insert(*next, BTreeMap::new());
        Ok(*next)
    }
    fn map_user(&self, ioas: u32, user_va: u64, length: u64, iova: u64) -> Result<()> {
        self.map(ioas, iova, length, Mapped::User { user_va })
    }
    fn map_file(&self, ioas: u32, fd: RawFd, start: u64, length: u64, iova: u64) -> Result<()> {
        self.map(ioas, iova, length, Mapped::File { fd, start })
    }
    fn unmap(&self, ioas: u32, iova: u64, length: u64) -> Result<u64> {
        let mut spaces = lock(&self.ioas);
        let space = spaces
            .get_mut(&ioas)
            .ok_or_else(|| errno("IOMMU_IOAS_UNMAP", libc::ENOENT))?;
        let end = iova.saturating_add(length);
        let inside: Vec<u64> = space
            .iter()
            .filter(|(&start, &(len, _))| start >= iova && start + len <= end)
            .map(|(&start, _)| start)
            .collect();
        if inside.is_empty() {
            return Err(errno("IOMMU_IOAS_UNMAP", libc::ENOENT));
        }
        Ok(inside
            .into_iter()
            .filter_map(|start| space.remove(&start))
            .map(|(len, _)| len)
            .sum())
    }
    fn destroy(&self, id: u32) -> Result<()> {
        lock(&self.ioas)
            .remove(&id)
            .map(drop)
            .ok_or_else(|| errno("IOMMU_DESTROY", libc::ENOENT))
    }
}
