//! The controller memory buffer: BAR2 contents in a memfd, so QEMU can map the same pages
//! (`--cmb-mode mmap`) while the device and its control socket read and fill them.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// Smallest and largest CMB sizes accepted.
pub const MIN_CMB_SIZE: u64 = 64 << 10;
pub const MAX_CMB_SIZE: u64 = 256 << 20;

/// Why the CMB could not be created or accessed.
#[derive(Debug, thiserror::Error)]
pub enum CmbError {
    #[error("CMB size {0} is not a power of two between 64 KiB and 256 MiB")]
    BadSize(u64),
    #[error("creating the CMB memfd: {0}")]
    Create(#[source] std::io::Error),
    #[error("access of {length} bytes at {offset:#x} is outside the {size}-byte CMB")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("CMB I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A CMB of a fixed size, zero-filled at creation.
#[derive(Debug)]
pub struct Cmb {
    file: File,
    size: u64,
}

impl Cmb {
    pub fn new(size: u64) -> Result<Self, CmbError> {
        if !size.is_power_of_two() || !(MIN_CMB_SIZE..=MAX_CMB_SIZE).contains(&size) {
            return Err(CmbError::BadSize(size));
        }
        // SAFETY: the name is a NUL-terminated literal; memfd_create has no other inputs and
        // returns a new fd (or -1) that nothing else owns.
        let fd = unsafe { libc::memfd_create(c"nvme-cmb".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(CmbError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size).map_err(CmbError::Create)?;
        Ok(Self { file, size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd, for QEMU to map (region info with a sparse mmap area).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn check(&self, offset: u64, length: u64) -> Result<(), CmbError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(CmbError::OutOfRange {
                offset,
                length,
                size: self.size,
            }),
        }
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), CmbError> {
        self.check(offset, data.len() as u64)?;
        self.file.read_exact_at(data, offset)?;
        Ok(())
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), CmbError> {
        self.check(offset, data.len() as u64)?;
        self.file.write_all_at(data, offset)?;
        Ok(())
    }

    /// Fills [`offset`, `offset + length`) with `pattern` repeated (zeroes for an empty one).
    pub fn fill(&self, offset: u64, length: u64, pattern: &[u8]) -> Result<(), CmbError> {
        self.check(offset, length)?;
        const CHUNK: usize = 64 << 10;
        let pattern: &[u8] = if pattern.is_empty() { &[0] } else { pattern };
        let mut chunk = Vec::with_capacity(CHUNK + pattern.len());
        while chunk.len() < CHUNK + pattern.len() {
            chunk.extend_from_slice(pattern);
        }
        let mut done = 0u64;
        while done < length {
            // Keep the pattern's phase: each chunk starts where the last one stopped.
            let phase = (done % pattern.len() as u64) as usize;
            let take = ((length - done) as usize).min(CHUNK);
            // `chunk` holds at least CHUNK + pattern.len() bytes, so this range is in bounds.
            let piece = &chunk[phase..phase + take];
            self.file.write_all_at(piece, offset + done)?;
            done += piece.len() as u64;
        }
        Ok(())
    }

    /// Zeroes the whole CMB. Punching a hole keeps the size and frees the pages, and a client
    /// that has the memfd mapped sees zeroes at once (shmem semantics).
    pub fn zero(&self) -> Result<(), CmbError> {
        // SAFETY: plain syscall on an fd we own; offsets are within the file.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                self.size as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        // Fall back to writing zeroes where hole punching is not available.
        self.fill(0, self.size, &[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_outside_the_range_or_not_powers_of_two_are_refused() {
        for bad in [0, 4096, 3 << 20, 512 << 20] {
            assert!(matches!(Cmb::new(bad), Err(CmbError::BadSize(_))), "{bad}");
        }
    }

    #[test]
    fn fill_repeats_the_pattern_and_zero_clears_it() {
        let cmb = Cmb::new(MIN_CMB_SIZE).expect("cmb");
        cmb.fill(1, 200_000.min(MIN_CMB_SIZE - 1), &[1, 2, 3])
            .expect("fill");
        let mut buf = [0u8; 7];
        cmb.read(0, &mut buf).expect("read");
        assert_eq!(buf, [0, 1, 2, 3, 1, 2, 3]);
        let mut tail = [0u8; 3];
        cmb.read(MIN_CMB_SIZE - 3, &mut tail).expect("read");
        // Byte k (k >= 1) holds pattern[(k - 1) % 3].
        let k = MIN_CMB_SIZE - 3;
        assert_eq!(tail[0], [1, 2, 3][((k - 1) % 3) as usize]);
        cmb.zero().expect("zero");
        cmb.read(0, &mut buf).expect("read");
        assert_eq!(buf, [0; 7]);
    }

    #[test]
    fn out_of_range_access_is_an_error() {
        let cmb = Cmb::new(MIN_CMB_SIZE).expect("cmb");
        let mut buf = [0u8; 8];
        assert!(cmb.read(MIN_CMB_SIZE - 4, &mut buf).is_err());
        assert!(cmb.write(u64::MAX, &buf).is_err());
        assert!(cmb.fill(8, u64::MAX, &[1]).is_err());
    }
}
