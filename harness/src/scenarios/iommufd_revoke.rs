//! iommufd-revoke-on-*: every revoke path through iommufd's importer. The doorbell page is
//! mapped at an IOVA and edu's write there lands; then, with the window held open, edu's next
//! write reaches nothing and the vIOMMU faults it; after the restore the old mapping stays
//! dead, because iommufd's revoke is permanent: iopt_revoke_notify() (drivers/iommu/iommufd/
//! pages.c) unmaps the area from every domain and sets `pages->dmabuf.phys.len = 0`, and it
//! returns early for pages already revoked, so the exporter's un-revoke maps nothing back.
//! Userspace must unmap and map anew, which works again (for close: the dma-buf stays revoked
//! for good and a new map is refused).
//!
//! Hot reset differs in what "in the window" can mean: QEMU does not run the guest while its
//! vfio-user device is in a bus reset (see revoke.rs), so edu cannot DMA during it; the
//! revoke it leaves behind is what the after-restore write checks.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::iommufd::{describe_faults, doorbell_mapping, ring_through_edu};
use crate::scenarios::oracles;
use crate::scenarios::steps::*;
use crate::scenarios::windows::{
    close_window, open_window, window_end_ns, window_scenarios, Window,
};
use crate::scenarios::ScenarioEnv;

window_scenarios! {
    revoke_window:
    run_on_vfio_reset => Window::VfioReset,
    run_on_flr => Window::ConfigFlr,
    run_on_hot_reset => Window::HotReset,
    run_on_mem_disable => Window::MemoryDecodeOff,
    run_on_d3 => Window::D3Hot,
    run_on_low_power => Window::LowPower,
    run_on_close => Window::DeviceClose,
}

fn revoke_window(
    rig: &mut Rig,
    _env: &ScenarioEnv,
    suite: &mut Suite,
    held: &mut Held,
    window: Window,
) -> Result<()> {
    let io = iommufd_rig(rig, held)?;
    let dmabuf = doorbell_mapping(rig, &io, held)?;
    let t = Instant::now();
    let (events, faults) = ring_through_edu(rig, &io, 1)?;
    suite.record(
        checks::DMA_LANDS_BEFORE_THE_WINDOW,
        oracles::written(&events, SQ1TDBL, 8).exactly(1) && faults.is_empty(),
        format!(
            "device: {}; {}",
            oracles::describe(&events),
            describe_faults(&faults)
        ),
        t.elapsed(),
    );

    let t = Instant::now();
    let window_seq = last_seq(rig)?;
    let request = open_window(rig, io.nvme, window, window_seq)?;
    if window != Window::HotReset {
        let (events, faults) = ring_through_edu(rig, &io, 2)?;
        // An upper bound: edu had finished when the agent's reply arrived.
        let dma_done_ns = crate::rig::client::mono_ns();
        // QEMU itself forwards nothing to a function in reset, decode-off or D3hot, so the
        // device log alone cannot tell a revoked mapping from a live one; the vIOMMU's fault
        // can: only a mapping iommufd removed faults.
        suite.record(
            checks::DMA_IN_WINDOW_FAULTS_AND_REACHES_NOTHING,
            events.is_empty() && !faults.is_empty(),
            format!(
                "device: {}; {}",
                oracles::describe(&events),
                describe_faults(&faults)
            ),
            t.elapsed(),
        );
        if request.is_some() {
            // A held reset: it must not have ended before edu was done. (Decode off, D3 and
            // low power end only in close_window, below.)
            let window_end = window_end_ns(&events_since(rig, window_seq)?, window);
            suite.record(
                checks::WINDOW_WAS_OPEN_WHEN_THE_DMA_RAN,
                window_end.is_none_or(|end| end > dma_done_ns),
                format!(
                    "edu done by {dma_done_ns} ns, the device's reset ended at {window_end:?} ns"
                ),
                Duration::ZERO,
            );
        }
    }
    let t = Instant::now();
    close_window(rig, io.nvme, window, request)?;
    if window == Window::DeviceClose {
        // The dma-buf outlives its device, revoked for good: a fresh map must be refused and
        // the dead area must still unmap.
        let unmapped = unmap(rig, &io, DMABUF_IOVA, PAGE)?;
        suite.record(
            checks::UNMAP_AFTER_CLOSE_IS_SAFE,
            matches!(unmapped, Ok(PAGE)),
            format!("IOMMU_IOAS_UNMAP of the dead area: {unmapped:?}"),
            t.elapsed(),
        );
        let mapped = map_dmabuf(rig, &io, dmabuf, PAGE, DMABUF_IOVA)?;
        suite.record(
            checks::MAP_AFTER_CLOSE_IS_REFUSED,
            matches!(&mapped, Err(e) if e.errno == libc::ENODEV),
            format!("IOMMU_IOAS_MAP_FILE of the closed device's dma-buf: {mapped:?}"),
            Duration::ZERO,
        );
        return Ok(());
    }
    let (events, faults) = ring_through_edu(rig, &io, 3)?;
    suite.record(
        checks::OLD_MAPPING_STAYS_DEAD_AFTER_RESTORE,
        events.is_empty() && !faults.is_empty(),
        format!(
            "edu's write through the mapping made before the window: device: {}; {}",
            oracles::describe(&events),
            describe_faults(&faults)
        ),
        t.elapsed(),
    );
    let t = Instant::now();
    let unmapped = unmap(rig, &io, DMABUF_IOVA, PAGE)?;
    let mapped = map_dmabuf(rig, &io, dmabuf, PAGE, DMABUF_IOVA)?;
    let (events, faults) = match (&unmapped, &mapped) {
        (Ok(_), Ok(())) => ring_through_edu(rig, &io, 4)?,
        _ => (Vec::new(), Vec::new()),
    };
    suite.record(
        checks::A_FRESH_MAP_WORKS_AFTER_RESTORE,
        unmapped.is_ok()
            && mapped.is_ok()
            && oracles::written(&events, SQ1TDBL, 8).exactly(4)
            && faults.is_empty(),
        format!(
            "unmap {unmapped:?}, map {mapped:?}; device: {}; {}",
            oracles::describe(&events),
            describe_faults(&faults)
        ),
        t.elapsed(),
    );
    Ok(())
}
