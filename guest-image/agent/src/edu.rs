//! QEMU's edu device as a DMA initiator: one transfer between a bus address (an IOVA the
//! vIOMMU translates) and edu's buffer, programmed through BAR0 of its VFIO device.
//!
//! Register map (QEMU docs/specs/edu.rst, hw/misc/edu.c); edu takes 4- or 8-byte accesses
//! at these offsets:
//!
//! | offset | register | use here |
//! |--------|----------|----------|
//! | 0x80   | DMA source address      | IOVA (to edu) or buffer address (from edu) |
//! | 0x88   | DMA destination address | buffer address (to edu) or IOVA (from edu) |
//! | 0x90   | DMA transfer count      | bytes, at most the buffer's 4 KiB |
//! | 0x98   | DMA command             | bit 0 start (reads 1 while running), bit 1 direction (0 RAM to edu, 1 edu to RAM), bit 2 raise an interrupt |
//!
//! The buffer sits at device address 0x40000. A transfer runs from a timer 100 ms of virtual
//! time after the command; edu's DMA mask is 28 bits (it masks wider addresses). A range
//! outside the buffer is a guest error that QEMU 10.2's edu_check_range() only logs: the
//! transfer then runs anyway, past the end of edu's dma_buf into QEMU's own memory. The agent
//! refuses such a range before programming anything.

use std::time::{Duration, Instant};

use p2prig_protocol::agent::EduDirection;

use crate::error::{AgentError, Result};
use crate::platform::Device;
use crate::vfio::RegionInfo;

pub const DMA_SOURCE: u64 = 0x80;
pub const DMA_DESTINATION: u64 = 0x88;
pub const DMA_COUNT: u64 = 0x90;
pub const DMA_COMMAND: u64 = 0x98;
pub const COMMAND_START: u64 = 1 << 0;
pub const COMMAND_EDU_TO_RAM: u64 = 1 << 1;
/// edu's DMA buffer in its own address space.
pub const BUFFER_ADDRESS: u64 = 0x40000;
pub const BUFFER_SIZE: u64 = 0x1000;
/// edu.c's default dma_mask: 28 bits.
pub const DMA_MASK: u64 = (1 << 28) - 1;
/// Longest wait the agent accepts for one transfer.
pub const MAX_TIMEOUT_MS: u64 = 60_000;
const POLL: Duration = Duration::from_millis(2);

/// One checked transfer: what goes into the four registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub source: u64,
    pub destination: u64,
    pub count: u64,
    pub command: u64,
}

impl Transfer {
    /// Checks the arguments edu would choke on or silently change.
    pub fn new(direction: EduDirection, iova: u64, buffer: u64, count: u64) -> Result<Self> {
        if count == 0 || count > BUFFER_SIZE {
            return Err(AgentError::Invalid(format!(
                "count {count} is not in 1..={BUFFER_SIZE} (edu's buffer)"
            )));
        }
        match buffer.checked_add(count) {
            Some(end) if end <= BUFFER_SIZE => {}
            _ => {
                return Err(AgentError::Invalid(format!(
                "{count} bytes at offset {buffer:#x} run past edu's {BUFFER_SIZE:#x}-byte buffer"
            )))
            }
        }
        match iova.checked_add(count - 1) {
            Some(last) if last <= DMA_MASK => {}
            _ => {
                return Err(AgentError::Invalid(format!(
                    "{count} bytes at iova {iova:#x} do not fit edu's 28-bit DMA mask"
                )))
            }
        }
        let on_edu = BUFFER_ADDRESS + buffer;
        Ok(match direction {
            EduDirection::IovaToEdu => Self {
                source: iova,
                destination: on_edu,
                count,
                command: COMMAND_START,
            },
            EduDirection::EduToIova => Self {
                source: on_edu,
                destination: iova,
                count,
                command: COMMAND_START | COMMAND_EDU_TO_RAM,
            },
        })
    }
}

/// Programs `transfer` on edu's BAR0 and waits until the engine clears its start bit.
pub fn run(
    device: &dyn Device,
    bar0: &RegionInfo,
    transfer: Transfer,
    timeout: Duration,
) -> Result<()> {
    let running = |device: &dyn Device| -> Result<bool> {
        Ok(device.bar_read(bar0, DMA_COMMAND, 8)? & COMMAND_START != 0)
    };
    // edu ignores register writes while a transfer runs.
    if running(device)? {
        return Err(AgentError::State {
            errno: libc::EBUSY,
            message: "edu's DMA engine is still running a transfer".into(),
        });
    }
    device.bar_write(bar0, DMA_SOURCE, 8, transfer.source)?;
    device.bar_write(bar0, DMA_DESTINATION, 8, transfer.destination)?;
    device.bar_write(bar0, DMA_COUNT, 8, transfer.count)?;
    device.bar_write(bar0, DMA_COMMAND, 8, transfer.command)?;
    let deadline = Instant::now() + timeout;
    while running(device)? {
        if Instant::now() >= deadline {
            return Err(AgentError::State {
                errno: libc::ETIMEDOUT,
                message: format!(
                    "edu's DMA engine did not finish within {} ms (is bus mastering on?)",
                    timeout.as_millis()
                ),
            });
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_put_the_iova_on_the_side_the_direction_names() {
        let to_edu = Transfer::new(EduDirection::IovaToEdu, 0x10_0000, 0x10, 8).expect("ok");
        assert_eq!(to_edu.source, 0x10_0000);
        assert_eq!(to_edu.destination, 0x40010);
        assert_eq!(to_edu.command, 1);
        let from_edu = Transfer::new(EduDirection::EduToIova, 0x20_1008, 0, 8).expect("ok");
        assert_eq!(from_edu.source, 0x40000);
        assert_eq!(from_edu.destination, 0x20_1008);
        assert_eq!(from_edu.command, 3);
    }

    #[test]
    fn transfers_edu_would_abort_on_are_refused() {
        for (buffer, count) in [(0, 0), (0, 0x1001), (0xff8, 16), (u64::MAX, 8)] {
            let err =
                Transfer::new(EduDirection::IovaToEdu, 0, buffer, count).expect_err("refused");
            assert_eq!(err.errno(), libc::EINVAL, "{buffer:#x} {count}");
        }
        assert!(Transfer::new(EduDirection::EduToIova, DMA_MASK - 7, 0, 8).is_ok());
        assert!(Transfer::new(EduDirection::EduToIova, DMA_MASK - 6, 0, 8).is_err());
        assert!(Transfer::new(EduDirection::EduToIova, u64::MAX, 0, 8).is_err());
    }
}
