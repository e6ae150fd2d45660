//! Target-side memory regions: plain byte vectors with a key, a virtual address the guest
//! names them by, and access rights (IBTA 10.6: memory registration, 10.6.3.2: access
//! rights, 10.6.3.3: R_Key checks).

use std::collections::BTreeMap;

use p2prig_protocol::target::{MrAccess, MrInfo};

/// Largest single MR (a test rig needs far less; guards the process from a typo).
pub const MAX_MR_BYTES: u64 = 1 << 30;
/// Largest sum of all MRs.
pub const MAX_TOTAL_MR_BYTES: u64 = 2 << 30;

/// Why a memory access or registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    #[error("no memory region with key {0:#x}")]
    NoSuchKey(u32),
    #[error("{length} bytes at offset {offset} are outside the {size}-byte MR {key:#x}")]
    OutOfRange {
        key: u32,
        offset: u64,
        length: u64,
        size: u64,
    },
    #[error("MR {key:#x} lacks {access:?} access")]
    Access { key: u32, access: MrAccess },
    #[error("an MR of {0} bytes is over the limit (1 GiB each, 2 GiB in all)")]
    TooLarge(u64),
    #[error("no keys left")]
    KeysExhausted,
}

/// One registered region.
#[derive(Debug, Clone)]
pub struct MemoryRegion {
    pub key: u32,
    pub va: u64,
    pub data: Vec<u8>,
    pub local_write: bool,
    pub remote_write: bool,
    pub remote_read: bool,
}

impl MemoryRegion {
    pub fn info(&self) -> MrInfo {
        let mut access = Vec::new();
        if self.local_write {
            access.push(MrAccess::LocalWrite);
        }
        if self.remote_write {
            access.push(MrAccess::RemoteWrite);
        }
        if self.remote_read {
            access.push(MrAccess::RemoteRead);
        }
        MrInfo {
            key: self.key,
            va: self.va,
            length: self.data.len() as u64,
            access,
        }
    }

    fn allows(&self, access: MrAccess) -> bool {
        match access {
            MrAccess::LocalWrite => self.local_write,
            MrAccess::RemoteWrite => self.remote_write,
            MrAccess::RemoteRead => self.remote_read,
        }
    }

    /// Byte range `offset..offset+length` of the MR, checked.
    pub fn range(&self, offset: u64, length: u64) -> Result<std::ops::Range<usize>, MemoryError> {
        let size = self.data.len() as u64;
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(MemoryError::OutOfRange {
                key: self.key,
                offset,
                length,
                size,
            }),
        }
    }
}

/// Every MR of the target.
#[derive(Debug, Default)]
pub struct MemoryRegions {
    regions: BTreeMap<u32, MemoryRegion>,
    next_index: u32,
    total: u64,
}

impl MemoryRegions {
    /// Registers `length` zeroed bytes. Keys are `(index << 8) | tag` like rxe's, and an
    /// index is never reused, so a stale key from a deregistered MR never matches a new one
    /// (IBTA 10.6.3.3 leaves key choice to the implementation).
    pub fn register(
        &mut self,
        length: u64,
        access: &[MrAccess],
    ) -> Result<&MemoryRegion, MemoryError> {
        if length > MAX_MR_BYTES || self.total.saturating_add(length) > MAX_TOTAL_MR_BYTES {
            return Err(MemoryError::TooLarge(length));
        }
        self.next_index += 1;
        if self.next_index >= 1 << 24 {
            return Err(MemoryError::KeysExhausted);
        }
        let index = self.next_index;
        let key = (index << 8) | (index.wrapping_mul(0x9D) & 0xFF);
        let region = MemoryRegion {
            key,
            // Guest-visible address: distinct per MR, far from zero so a 0 VA is an error.
            va: u64::from(index) << 32,
            data: vec![0; length as usize],
            local_write: access.contains(&MrAccess::LocalWrite),
            remote_write: access.contains(&MrAccess::RemoteWrite),
            remote_read: access.contains(&MrAccess::RemoteRead),
        };
        self.total += length;
        Ok(self.regions.entry(key).or_insert(region))
    }

    pub fn deregister(&mut self, key: u32) -> Result<(), MemoryError> {
        let region = self
            .regions
            .remove(&key)
            .ok_or(MemoryError::NoSuchKey(key))?;
        self.total = self.total.saturating_sub(region.data.len() as u64);
        Ok(())
    }

    pub fn get(&self, key: u32) -> Result<&MemoryRegion, MemoryError> {
        self.regions.get(&key).ok_or(MemoryError::NoSuchKey(key))
    }

    pub fn get_mut(&mut self, key: u32) -> Result<&mut MemoryRegion, MemoryError> {
        self.regions
            .get_mut(&key)
            .ok_or(MemoryError::NoSuchKey(key))
    }

    /// Checks an access by R_Key and virtual address (IBTA 9.7.5.1.3 / 10.6.3.3) and returns
    /// the MR key and offset inside it.
    pub fn check_remote(
        &self,
        rkey: u32,
        va: u64,
        length: u64,
        access: MrAccess,
    ) -> Result<(u32, u64), MemoryError> {
        let region = self.get(rkey)?;
        if !region.allows(access) {
            return Err(MemoryError::Access { key: rkey, access });
        }
        let offset = va.checked_sub(region.va).ok_or(MemoryError::OutOfRange {
            key: rkey,
            offset: va,
            length,
            size: region.data.len() as u64,
        })?;
        region.range(offset, length)?;
        Ok((rkey, offset))
    }

    /// Checks a local scatter/gather element and, when `access` is given, the right.
    pub fn check_local(
        &self,
        key: u32,
        offset: u64,
        length: u64,
        access: Option<MrAccess>,
    ) -> Result<(), MemoryError> {
        let region = self.get(key)?;
        if let Some(access) = access {
            if !region.allows(access) {
                return Err(MemoryError::Access { key, access });
            }
        }
        region.range(offset, length).map(|_| ())
    }

    /// Copies `bytes` into MR `key` at `offset`.
    pub fn write(&mut self, key: u32, offset: u64, bytes: &[u8]) -> Result<(), MemoryError> {
        let region = self.get_mut(key)?;
        let range = region.range(offset, bytes.len() as u64)?;
        region.data[range].copy_from_slice(bytes);
        Ok(())
    }

    /// The bytes `offset..offset+length` of MR `key`.
    pub fn slice(&self, key: u32, offset: u64, length: u64) -> Result<&[u8], MemoryError> {
        let region = self.get(key)?;
        let range = region.range(offset, length)?;
        Ok(&region.data[range])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_checks_follow_key_access_and_range() {
        let mut mrs = MemoryRegions::default();
        let (key, va) = {
            let mr = mrs
                .register(4096, &[MrAccess::RemoteWrite])
                .expect("register");
            (mr.key, mr.va)
        };
        assert_eq!(
            mrs.check_remote(key, va + 4000, 96, MrAccess::RemoteWrite),
            Ok((key, 4000))
        );
        assert!(mrs
            .check_remote(key, va + 4000, 97, MrAccess::RemoteWrite)
            .is_err());
        assert!(mrs
            .check_remote(key, va - 1, 1, MrAccess::RemoteWrite)
            .is_err());
        assert!(mrs.check_remote(key, va, 1, MrAccess::RemoteRead).is_err());
        assert!(mrs
            .check_remote(key + 1, va, 1, MrAccess::RemoteWrite)
            .is_err());
        assert!(mrs
            .check_remote(key, u64::MAX, 2, MrAccess::RemoteWrite)
            .is_err());
        mrs.deregister(key).expect("deregister");
        assert!(mrs.check_remote(key, va, 1, MrAccess::RemoteWrite).is_err());
        let again = mrs.register(4096, &[]).expect("register").key;
        assert_ne!(again, key, "keys are never reused");
    }

    #[test]
    fn oversized_registrations_are_refused() {
        let mut mrs = MemoryRegions::default();
        assert!(mrs.register(MAX_MR_BYTES + 1, &[]).is_err());
    }
}
