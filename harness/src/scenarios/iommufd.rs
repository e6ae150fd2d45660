//! iommufd-doorbell, iommufd-cmb and iommufd-map-while-revoked: Linux 7.x's own dma-buf
//! importer. iommufd maps nvme-cmb's dma-buf into an IOAS (IOMMU_IOAS_MAP_FILE,
//! iopt_map_dmabuf() in drivers/iommu/iommufd/pages.c, which takes the BAR's physical range
//! from vfio_pci_dma_buf_iommufd_map()); QEMU's edu device, attached to the same IOAS, DMAs to
//! the IOVA, and the vIOMMU turns that into an MMIO write nvme-cmb logs like any other access.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use p2prig_protocol::agent::KmemleakCommand;
use p2prig_protocol::device::{DeviceOp, DeviceReply};
use p2prig_protocol::event::{Event, EventKind};

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::map_leak::{kmemleak, record_kmemleak};
use crate::scenarios::oracles;
use crate::scenarios::steps::*;
use crate::scenarios::windows::{close_window, open_window, Window};
use crate::scenarios::ScenarioEnv;

/// A CMB slice of one edu buffer (BAR2 0x1000, 4 KiB).
const CMB_SLICE_OFFSET: u64 = 0x1000;
const CMB_SLICE_LENGTH: u64 = 0x1000;

/// BAR accesses and violations in `events`: what an importer's DMA can leave in the log.
pub(crate) fn bar_accesses(events: &[Event]) -> Vec<Event> {
    events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Bar { .. } | EventKind::Violation { .. }))
        .cloned()
        .collect()
}

/// The doorbell page exported and mapped at [`DMABUF_IOVA`]; returns the dma-buf.
pub(crate) fn doorbell_mapping(rig: &mut Rig, io: &IommufdRig, held: &mut Held) -> Result<u32> {
    let dmabuf = export_upstream(rig, held, io.nvme, 0, PAGE, PAGE)?;
    if let Err(e) = map_dmabuf(rig, io, dmabuf, PAGE, DMABUF_IOVA)? {
        bail!("IOMMU_IOAS_MAP_FILE of the doorbell page: {e}");
    }
    Ok(dmabuf)
}

/// edu copies `value` (8 bytes) from agent memory to SQ1TDBL through the doorbell mapping;
/// returns the BAR accesses nvme-cmb logged and the DMAR faults the guest logged for it.
pub(crate) fn ring_through_edu(
    rig: &mut Rig,
    io: &IommufdRig,
    value: u64,
) -> Result<(Vec<Event>, Vec<DmarFault>)> {
    memory_write(rig, io, 0, &value.to_le_bytes())?;
    let since = last_seq(rig)?;
    let fault_mark = rig.qemu_stderr_mark();
    edu_copy_to(rig, io, DMABUF_IOVA + (SQ1TDBL - PAGE), 8)?;
    // doorbell_events waits until the page has been quiet; then everything since the mark.
    doorbell_events(rig, since)?;
    let events = bar_accesses(&events_since(rig, since)?);
    let faults = faults_since(rig, fault_mark, &io.edu_bdf, DMABUF_IOVA)?;
    Ok((events, faults))
}

pub(crate) fn describe_faults(faults: &[DmarFault]) -> String {
    match faults {
        [] => "the vIOMMU reported no fault".into(),
        [first, ..] => format!(
            "the vIOMMU reported {} fault(s), first: {}",
            faults.len(),
            first.line
        ),
    }
}

/// iommufd-doorbell: edu's 8-byte DMA to the doorbell page's IOVA + 8 is exactly one write of
/// that value at BAR0 0x1008, nothing else, and no fault.
pub fn run_doorbell(rig: &mut Rig, _env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| {
        let io = iommufd_rig(rig, held)?;
        doorbell_mapping(rig, &io, held)?;
        let t = Instant::now();
        let (events, faults) = ring_through_edu(rig, &io, 7)?;
        suite.record(
            checks::EDU_WRITE_LANDS_IN_THE_DOORBELL,
            oracles::written(&events, SQ1TDBL, 8).exactly(7),
            format!(
                "edu wrote 7 to iova {:#x}; device: {}",
                DMABUF_IOVA + (SQ1TDBL - PAGE),
                oracles::describe(&events)
            ),
            t.elapsed(),
        );
        suite.record(
            checks::NO_DMAR_FAULT,
            faults.is_empty(),
            describe_faults(&faults),
            Duration::ZERO,
        );
        Ok(())
    })
}

/// Waits until nvme-cmb logged `bytes` bytes of writes to `bar` after `since` (at most 10 s);
/// the caller judges what they wrote.
fn wait_for_bar_writes(rig: &mut Rig, since: u64, bar: u8, bytes: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let written: u64 = events_since(rig, since)?
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Bar {
                    bar: b,
                    access: p2prig_protocol::event::Access::Write,
                    size,
                    ..
                } if *b == bar => Some(u64::from(*size)),
                _ => None,
            })
            .sum();
        if written >= bytes || Instant::now() >= deadline {
            return Ok(());
        }
        crate::rig::process::check_interrupted()?;
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where two hex strings of bytes first differ: "byte N: got xx, want yy", or their lengths.
fn first_difference(got: &str, want: &str) -> String {
    if got.len() != want.len() {
        return format!("{} bytes, want {}", got.len() / 2, want.len() / 2);
    }
    match (0..got.len() / 2).find(|i| got.get(2 * i..2 * i + 2) != want.get(2 * i..2 * i + 2)) {
        Some(i) => format!(
            "byte {i:#x}: got {}, want {}",
            got.get(2 * i..2 * i + 2).unwrap_or("?"),
            want.get(2 * i..2 * i + 2).unwrap_or("?")
        ),
        None => "byte-exact".into(),
    }
}

fn pattern(length: usize) -> Vec<u8> {
    (0..length).map(|i| (i * 7 + (i >> 8)) as u8).collect()
}

/// iommufd-cmb: 4 KiB from agent memory through edu into a CMB slice, byte-exact in the
/// device's CMB; then the device's own pattern read back from the CMB by edu into memory.
pub fn run_cmb(rig: &mut Rig, _env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| {
        let io = iommufd_rig(rig, held)?;
        let dmabuf = export_upstream(rig, held, io.nvme, 2, CMB_SLICE_OFFSET, CMB_SLICE_LENGTH)?;
        if let Err(e) = map_dmabuf(rig, &io, dmabuf, CMB_SLICE_LENGTH, DMABUF_IOVA)? {
            bail!("IOMMU_IOAS_MAP_FILE of the CMB slice: {e}");
        }
        let t = Instant::now();
        let data = pattern(CMB_SLICE_LENGTH as usize);
        memory_write(rig, &io, 0, &data)?;
        let since = last_seq(rig)?;
        edu_copy_to(rig, &io, DMABUF_IOVA, CMB_SLICE_LENGTH)?;
        // QEMU posts vfio-user region writes: edu is done before nvme-cmb has served them all.
        wait_for_bar_writes(rig, since, 2, CMB_SLICE_LENGTH)?;
        let cmb = match rig.device_call(DeviceOp::CmbRead {
            offset: CMB_SLICE_OFFSET,
            length: CMB_SLICE_LENGTH as u32,
        })? {
            DeviceReply::CmbData { data_hex, .. } => data_hex,
            other => bail!("nvme-cmb cmb_read: unexpected {other:?}"),
        };
        let want = p2prig_protocol::hex::encode(&data);
        suite.record(
            checks::EDU_WRITE_SHOWS_IN_THE_CMB,
            cmb == want,
            format!(
                "{} bytes through edu; CMB+{CMB_SLICE_OFFSET:#x}: {}",
                data.len(),
                first_difference(&cmb, &want)
            ),
            t.elapsed(),
        );

        let t = Instant::now();
        let fill = "5a0fc3e1d2b49687";
        match rig.device_call(DeviceOp::CmbFill {
            offset: 0,
            length: None,
            pattern_hex: fill.into(),
        })? {
            DeviceReply::Done => {}
            other => bail!("nvme-cmb cmb_fill: unexpected {other:?}"),
        }
        edu_dma(
            rig,
            &io,
            p2prig_protocol::agent::EduDirection::IovaToEdu,
            DMABUF_IOVA,
            CMB_SLICE_LENGTH,
        )?;
        edu_dma(
            rig,
            &io,
            p2prig_protocol::agent::EduDirection::EduToIova,
            MEMORY_IOVA + PAGE,
            CMB_SLICE_LENGTH,
        )?;
        let read = memory_read(rig, &io, PAGE, CMB_SLICE_LENGTH)?;
        let want = fill.repeat((CMB_SLICE_LENGTH as usize) / (fill.len() / 2));
        suite.record(
            checks::EDU_READ_RETURNS_THE_CMB,
            read == want,
            format!(
                "memory page 1 after edu's read of the CMB slice: {}...",
                &read[..read.len().min(48)]
            ),
            t.elapsed(),
        );
        Ok(())
    })
}

/// iommufd-map-while-revoked: IOMMU_IOAS_MAP_FILE of a dma-buf whose function has memory
/// decode off, or is held in a VFIO reset, fails with ENODEV (vfio_pci_dma_buf_iommufd_map()
/// refuses a revoked dma-buf); after the restore the same call succeeds and edu's write lands.
pub fn run_map_while_revoked(rig: &mut Rig, _env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| {
        let io = iommufd_rig(rig, held)?;
        let dmabuf = export_upstream(rig, held, io.nvme, 0, PAGE, PAGE)?;
        for (window, check) in [
            (
                Window::MemoryDecodeOff,
                checks::MAP_IN_DECODE_OFF_FAILS_WITH_ENODEV,
            ),
            (Window::VfioReset, checks::MAP_IN_RESET_FAILS_WITH_ENODEV),
        ] {
            let t = Instant::now();
            let since = last_seq(rig)?;
            let request = open_window(rig, io.nvme, window, since)?;
            let mapped = map_dmabuf(rig, &io, dmabuf, PAGE, DMABUF_IOVA)?;
            close_window(rig, io.nvme, window, request)?;
            if mapped.is_ok() {
                // Leave the IOAS as it was for the next window.
                let _ = unmap(rig, &io, DMABUF_IOVA, PAGE)?;
            }
            suite.record(
                check,
                matches!(&mapped, Err(e) if e.errno == libc::ENODEV),
                format!("IOMMU_IOAS_MAP_FILE during {window:?}: {mapped:?}"),
                t.elapsed(),
            );
        }
        let t = Instant::now();
        let mapped = map_dmabuf(rig, &io, dmabuf, PAGE, DMABUF_IOVA)?;
        let (events, faults) = match &mapped {
            Ok(()) => ring_through_edu(rig, &io, 21)?,
            Err(_) => (Vec::new(), Vec::new()),
        };
        suite.record(
            checks::MAP_AFTER_RESTORE_LANDS,
            mapped.is_ok() && oracles::written(&events, SQ1TDBL, 8).exactly(21),
            format!(
                "map after the restore: {mapped:?}; device: {}; {}",
                oracles::describe(&events),
                describe_faults(&faults)
            ),
            t.elapsed(),
        );
        Ok(())
    })
}

/// IOMMU_IOAS_MAP_FILE/UNMAP cycles: each attaches, pins and maps the dma-buf, then unpins and
/// detaches it.
const MAP_CYCLES: u32 = 32;
/// Decode off and on with the dma-buf mapped, then unmap and map anew: each cycle is a revoke
/// (iopt_revoke_notify()) and a fresh attachment.
const REVOKE_CYCLES: u32 = 16;

/// iommufd-map-leak (debug variants): map/unmap and revoke/unmap/map cycles leave a working
/// mapping, and kmemleak finds nothing.
pub fn run_map_leak(rig: &mut Rig, _env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| {
        let t = Instant::now();
        let io = iommufd_rig(rig, held)?;
        let dmabuf = export_upstream(rig, held, io.nvme, 0, PAGE, PAGE)?;
        // Whatever kmemleak suspected before this scenario is not its finding.
        kmemleak(rig, KmemleakCommand::Scan)?;
        kmemleak(rig, KmemleakCommand::Clear)?;
        let mut cycles = 0;
        for _ in 0..MAP_CYCLES {
            let mapped = map_dmabuf(rig, &io, dmabuf, PAGE, DMABUF_IOVA)?;
            let unmapped = unmap(rig, &io, DMABUF_IOVA, PAGE)?;
            if mapped.is_ok() && unmapped == Ok(PAGE) {
                cycles += 1;
            }
        }
        suite.record(
            checks::MAP_UNMAP_CYCLES,
            cycles == MAP_CYCLES,
            format!("{cycles} of {MAP_CYCLES} IOMMU_IOAS_MAP_FILE/UNMAP pairs succeeded"),
            t.elapsed(),
        );

        let t = Instant::now();
        let mut cycles = 0;
        for _ in 0..REVOKE_CYCLES {
            let mapped = map_dmabuf(rig, &io, dmabuf, PAGE, DMABUF_IOVA)?;
            let command = clear_memory_decode(rig, io.nvme)?;
            config_write(rig, io.nvme, 4, 2, command | 0x2, "set PCI_COMMAND memory")?;
            let unmapped = unmap(rig, &io, DMABUF_IOVA, PAGE)?;
            if mapped.is_ok() && unmapped == Ok(PAGE) {
                cycles += 1;
            }
        }
        doorbell_mapping(rig, &io, held)?;
        let (events, faults) = ring_through_edu(rig, &io, 31)?;
        suite.record(
            checks::REVOKE_CYCLES_END_WITH_A_WORKING_MAPPING,
            cycles == REVOKE_CYCLES && oracles::written(&events, SQ1TDBL, 8).exactly(31),
            format!(
                "{cycles} of {REVOKE_CYCLES} map, decode off/on, unmap cycles; then device: {}; {}",
                oracles::describe(&events),
                describe_faults(&faults)
            ),
            t.elapsed(),
        );
        record_kmemleak(rig, suite)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_difference_is_named_by_byte() {
        assert_eq!(first_difference("00ff10", "00ff10"), "byte-exact");
        assert_eq!(
            first_difference("00ff10", "00fe10"),
            "byte 0x1: got ff, want fe"
        );
        assert_eq!(first_difference("00", "0000"), "1 bytes, want 2");
    }

    #[test]
    fn the_cmb_pattern_is_not_periodic_in_a_page() {
        let data = pattern(CMB_SLICE_LENGTH as usize);
        assert_ne!(data[..256], data[256..512]);
        assert_eq!(&data[..4], &[0, 7, 14, 21]);
    }
}
