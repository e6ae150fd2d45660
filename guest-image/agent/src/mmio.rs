//! Single-width volatile accesses to a mapped BAR that survive a fault.
//!
//! vfio-pci zaps BAR mappings when memory decode is turned off or the function is reset, and
//! its fault handler then answers SIGBUS. Scenarios do exactly that and then touch the BAR, so
//! an access must come back as an error (EFAULT), not kill PID 1. On x86_64 the access is one
//! `mov` of the requested width inside a small assembly routine; a SIGBUS/SIGSEGV handler that
//! finds the faulting instruction inside that routine moves the instruction pointer to a
//! landing pad that returns "faulted". Any other fault goes to the previous handler.

#[cfg(target_arch = "x86_64")]
mod guarded {
    use std::sync::OnceLock;

    // p2prig_mmio_read(addr: rdi, width: esi, out: rdx) -> eax (0 ok, 1 faulted)
    // p2prig_mmio_write(addr: rdi, width: esi, value: rdx) -> eax (0 ok, 1 faulted)
    // Leaf routines without a stack frame, so the landing pad can simply `ret`.
    std::arch::global_asm!(
        ".text",
        ".p2align 4",
        ".globl p2prig_mmio_read",
        ".hidden p2prig_mmio_read",
        "p2prig_mmio_read:",
        "    cmp esi, 1",
        "    je .Lp2prig_read1",
        "    cmp esi, 2",
        "    je .Lp2prig_read2",
        "    cmp esi, 4",
        "    je .Lp2prig_read4",
        "    mov rcx, qword ptr [rdi]",
        "    jmp .Lp2prig_read_done",
        ".Lp2prig_read1:",
        "    movzx ecx, byte ptr [rdi]",
        "    jmp .Lp2prig_read_done",
        ".Lp2prig_read2:",
        "    movzx ecx, word ptr [rdi]",
        "    jmp .Lp2prig_read_done",
        ".Lp2prig_read4:",
        "    mov ecx, dword ptr [rdi]",
        ".Lp2prig_read_done:",
        "    mov qword ptr [rdx], rcx",
        "    xor eax, eax",
        "    ret",
        ".globl p2prig_mmio_write",
        ".hidden p2prig_mmio_write",
        "p2prig_mmio_write:",
        "    cmp esi, 1",
        "    je .Lp2prig_write1",
        "    cmp esi, 2",
        "    je .Lp2prig_write2",
        "    cmp esi, 4",
        "    je .Lp2prig_write4",
        "    mov qword ptr [rdi], rdx",
        "    jmp .Lp2prig_write_done",
        ".Lp2prig_write1:",
        "    mov byte ptr [rdi], dl",
        "    jmp .Lp2prig_write_done",
        ".Lp2prig_write2:",
        "    mov word ptr [rdi], dx",
        "    jmp .Lp2prig_write_done",
        ".Lp2prig_write4:",
        "    mov dword ptr [rdi], edx",
        ".Lp2prig_write_done:",
        "    xor eax, eax",
        "    ret",
        ".globl p2prig_mmio_landing",
        ".hidden p2prig_mmio_landing",
        "p2prig_mmio_landing:",
        "    mov eax, 1",
        "    ret",
    );

    extern "C" {
        fn p2prig_mmio_read(addr: *const u8, width: u32, out: *mut u64) -> u32;
        fn p2prig_mmio_write(addr: *mut u8, width: u32, value: u64) -> u32;
        fn p2prig_mmio_landing() -> u32;
    }

    #[derive(Clone, Copy)]
    struct Previous {
        sigbus: libc::sigaction,
        sigsegv: libc::sigaction,
    }

    // The actions in place before ours; the handler hands foreign faults back to them
    // (std's stack-overflow detection, or the default action).
    static PREVIOUS: OnceLock<Previous> = OnceLock::new();

    extern "C" fn on_fault(
        signal: libc::c_int,
        _info: *mut libc::siginfo_t,
        context: *mut libc::c_void,
    ) {
        let begin = p2prig_mmio_read as *const () as usize;
        let landing = p2prig_mmio_landing as *const () as usize;
        // SAFETY: the kernel passes a valid ucontext_t for an SA_SIGINFO handler.
        let context = unsafe { &mut *context.cast::<libc::ucontext_t>() };
        let rip = &mut context.uc_mcontext.gregs[libc::REG_RIP as usize];
        let at = *rip as usize;
        if (begin..landing).contains(&at) {
            *rip = landing as libc::greg_t;
            return;
        }
        // Not ours: restore the previous action and return, so the instruction faults again
        // and is handled as if we had never been installed.
        if let Some(previous) = PREVIOUS.get() {
            let action = if signal == libc::SIGBUS {
                &previous.sigbus
            } else {
                &previous.sigsegv
            };
            // SAFETY: sigaction is async-signal-safe; `action` is a valid saved action.
            unsafe {
                libc::sigaction(signal, action, std::ptr::null_mut());
            }
        }
    }

    fn install() -> &'static Previous {
        PREVIOUS.get_or_init(|| {
            // SAFETY: zeroed sigaction structs are valid "no handler, empty mask" values, and
            // they are filled in by sigaction() before use.
            let mut previous: Previous = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_fault as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            // SAFETY: installing a handler with a valid action; the old actions are saved.
            unsafe {
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(libc::SIGBUS, &action, &mut previous.sigbus);
                libc::sigaction(libc::SIGSEGV, &action, &mut previous.sigsegv);
            }
            previous
        })
    }

    /// # Safety
    /// `addr` must be valid for a `width`-byte access or a mapping whose access may fault.
    pub unsafe fn read(addr: *const u8, width: u8) -> Option<u64> {
        install();
        let mut value = 0u64;
        // SAFETY: the routine touches `width` bytes at addr (caller's contract) and writes
        // `value`; a fault there is caught by on_fault.
        let faulted = unsafe { p2prig_mmio_read(addr, u32::from(width), &mut value) };
        (faulted == 0).then_some(value)
    }

    /// # Safety
    /// As for [`read`].
    pub unsafe fn write(addr: *mut u8, width: u8, value: u64) -> bool {
        install();
        // SAFETY: as in read.
        let faulted = unsafe { p2prig_mmio_write(addr, u32::from(width), value) };
        faulted == 0
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod guarded {
    // Without the assembly routine there is no fault recovery: plain volatile accesses.

    /// # Safety
    /// `addr` must be valid and aligned for a `width`-byte access.
    pub unsafe fn read(addr: *const u8, width: u8) -> Option<u64> {
        // SAFETY: caller's contract.
        unsafe {
            Some(match width {
                1 => u64::from(addr.read_volatile()),
                2 => u64::from(addr.cast::<u16>().read_volatile()),
                4 => u64::from(addr.cast::<u32>().read_volatile()),
                _ => addr.cast::<u64>().read_volatile(),
            })
        }
    }

    /// # Safety
    /// As for [`read`].
    pub unsafe fn write(addr: *mut u8, width: u8, value: u64) -> bool {
        // SAFETY: caller's contract; truncation to the width is intended.
        unsafe {
            match width {
                1 => addr.write_volatile(value as u8),
                2 => addr.cast::<u16>().write_volatile(value as u16),
                4 => addr.cast::<u32>().write_volatile(value as u32),
                _ => addr.cast::<u64>().write_volatile(value),
            }
        }
        true
    }
}

/// Why an access did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MmioError {
    #[error("width {0} is not 1, 2, 4 or 8")]
    Width(u8),
    #[error("the access faulted (SIGBUS/SIGSEGV): the BAR mapping is revoked, e.g. memory decode is off or a reset is in progress")]
    Fault,
}

impl MmioError {
    pub fn errno(&self) -> i32 {
        match self {
            Self::Width(_) => libc::EINVAL,
            Self::Fault => libc::EFAULT,
        }
    }
}

fn check_width(width: u8) -> Result<(), MmioError> {
    if matches!(width, 1 | 2 | 4 | 8) {
        Ok(())
    } else {
        Err(MmioError::Width(width))
    }
}

/// Reads exactly `width` bytes (1, 2, 4, 8) at `addr`; a fault is an error, not a crash.
///
/// # Safety
/// `addr..addr+width` must lie inside a live mapping and be aligned to `width`.
pub unsafe fn read(addr: *const u8, width: u8) -> Result<u64, MmioError> {
    check_width(width)?;
    // SAFETY: caller's contract.
    unsafe { guarded::read(addr, width) }.ok_or(MmioError::Fault)
}

/// Writes the low `width` bytes of `value` at `addr` in one access; a fault is an error.
///
/// # Safety
/// As for [`read`].
pub unsafe fn write(addr: *mut u8, width: u8, value: u64) -> Result<(), MmioError> {
    check_width(width)?;
    // SAFETY: caller's contract.
    if unsafe { guarded::write(addr, width, value) } {
        Ok(())
    } else {
        Err(MmioError::Fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    struct Map {
        base: *mut u8,
        size: usize,
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: unmapping our own mapping.
            unsafe {
                libc::munmap(self.base.cast(), self.size);
            }
        }
    }

    fn map_file(file: &std::fs::File, size: usize, prot: libc::c_int) -> Map {
        // SAFETY: a fresh shared mapping of our own temp file.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        Map {
            base: base.cast(),
            size,
        }
    }

    #[test]
    fn accesses_of_each_width_hit_exactly_their_bytes() {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(4096).expect("size");
        let map = map_file(&file, 4096, libc::PROT_READ | libc::PROT_WRITE);
        for (width, offset, value) in [
            (1u8, 1usize, 0xa5u64),
            (2, 2, 0xbeef),
            (4, 4, 0xdead_beef),
            (8, 8, 0x0123_4567_89ab_cdef),
        ] {
            // SAFETY: inside the 4 KiB mapping and aligned.
            unsafe {
                write(map.base.add(offset), width, value).expect("write");
                assert_eq!(read(map.base.add(offset), width).expect("read"), value);
            }
        }
        // A 1-byte write of a wide value stores only the low byte.
        // SAFETY: inside the mapping.
        unsafe {
            write(map.base.add(16), 1, 0x1ff).expect("write");
            assert_eq!(read(map.base.add(16), 2).expect("read"), 0xff);
        }
        assert_eq!(
            // SAFETY: the width is rejected before any access.
            unsafe { read(map.base, 3) },
            Err(MmioError::Width(3))
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_sigbus_becomes_an_error() {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(4096).expect("size");
        let map = map_file(&file, 4096, libc::PROT_READ | libc::PROT_WRITE);
        // Truncating the file under a shared mapping makes every access SIGBUS, like a zapped
        // VFIO BAR mapping does.
        file.set_len(0).expect("truncate");
        // SAFETY: the mapping is live; the access faults and is recovered.
        unsafe {
            assert_eq!(read(map.base, 4), Err(MmioError::Fault));
            assert_eq!(write(map.base, 8, 1), Err(MmioError::Fault));
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_sigsegv_becomes_an_error() {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(4096).expect("size");
        let map = map_file(&file, 4096, libc::PROT_NONE);
        // SAFETY: the mapping is live but inaccessible; the access faults and is recovered.
        unsafe {
            assert_eq!(read(map.base, 1), Err(MmioError::Fault));
            assert_eq!(write(map.base, 2, 1), Err(MmioError::Fault));
        }
    }
}
