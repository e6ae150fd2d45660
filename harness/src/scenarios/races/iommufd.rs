//! iommufd-races: iommufd's release paths raced against the exporter's revoke paths and
//! against each other. An IOAS unmap (which detaches the dma-buf), an IOAS destroy (which
//! unmaps everything in it) and the dma-buf fd closing (the IOAS then holds the last
//! reference) meet the VFIO device fd closing, a VFIO_DEVICE_RESET and memory decode coming
//! back on; timed by the same seeded schedule as release-races.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use p2prig_protocol::agent::AgentOp;
use p2prig_protocol::device::DeviceOp;

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::iommufd::{
    bar_accesses, describe_faults, doorbell_mapping, ring_through_edu,
};
use crate::scenarios::oracles;
use crate::scenarios::steps::*;
use crate::scenarios::ScenarioEnv;

use super::schedule::{race_pair, run_calibrated, schedule, timed, Outcome, RaceKind, Step};

/// nvme-cmb holds each reset open this long.
const RESET_HOLD_MS: u64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Race {
    /// IOMMU_IOAS_UNMAP of the mapping against the device fd closing.
    UnmapVsClose,
    UnmapVsReset,
    /// Against decode coming back on: vfio-pci un-revokes, which iommufd's revoked pages ignore.
    UnmapVsDecodeOn,
    /// IOMMU_DESTROY of an IOAS that holds the mapping (no device attached to it).
    DestroyVsClose,
    DestroyVsReset,
    /// The dma-buf's fd closing while the IOAS maps it, against the device fd closing.
    DmabufCloseVsClose,
    /// The two importer-side releases against each other: unmap and the fd's close.
    UnmapVsDmabufClose,
}

const RACES: [Race; 7] = [
    Race::UnmapVsClose,
    Race::UnmapVsReset,
    Race::UnmapVsDecodeOn,
    Race::DestroyVsClose,
    Race::DestroyVsReset,
    Race::DmabufCloseVsClose,
    Race::UnmapVsDmabufClose,
];

impl RaceKind for Race {
    fn sides(self) -> (&'static str, &'static str) {
        match self {
            Race::UnmapVsClose => ("unmap", "device-close"),
            Race::UnmapVsReset => ("unmap", "vfio-reset"),
            Race::UnmapVsDecodeOn => ("unmap", "decode-on"),
            Race::DestroyVsClose => ("ioas-destroy", "device-close"),
            Race::DestroyVsReset => ("ioas-destroy", "vfio-reset"),
            Race::DmabufCloseVsClose => ("dmabuf-close", "device-close"),
            Race::UnmapVsDmabufClose => ("unmap", "dmabuf-close"),
        }
    }
}

/// Each operation alone, so the schedule's fractions mean the same under TCG and KVM.
#[derive(Debug, Clone, Copy)]
struct Calibration {
    unmap: Duration,
    destroy: Duration,
    dmabuf_close: Duration,
    close: Duration,
    reset: Duration,
    decode_on: Duration,
}

impl Calibration {
    fn of_first(&self, step: &Step<Race>) -> Duration {
        let (importer, exporter) = match step.race {
            Race::UnmapVsClose => (self.unmap, self.close),
            Race::UnmapVsReset => (self.unmap, self.reset),
            Race::UnmapVsDecodeOn => (self.unmap, self.decode_on),
            Race::DestroyVsClose => (self.destroy, self.close),
            Race::DestroyVsReset => (self.destroy, self.reset),
            Race::DmabufCloseVsClose => (self.dmabuf_close, self.close),
            Race::UnmapVsDmabufClose => (self.unmap, self.dmabuf_close),
        };
        if step.importer_first {
            importer
        } else {
            exporter
        }
    }
}

impl fmt::Display for Calibration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "unmap {:.1} ms, IOAS destroy {:.1} ms, dma-buf close {:.1} ms, device close {:.1} ms, \
             reset {:.1} ms, decode on {:.1} ms",
            ms(self.unmap),
            ms(self.destroy),
            ms(self.dmabuf_close),
            ms(self.close),
            ms(self.reset),
            ms(self.decode_on)
        )
    }
}

pub fn run(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| races(rig, env, suite, held))
}

fn races(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite, held: &mut Held) -> Result<()> {
    let steps = schedule(env.seed, &RACES);
    let io = iommufd_rig(rig, held)?;
    // A VFIO cdev opens once at a time: every iteration opens nvme-cmb itself.
    ok(
        rig.agent_call(AgentOp::VfioClose { device: io.nvme }, RPC)?,
        "close nvme-cmb's cdev",
    )?;
    let since = last_seq(rig)?;
    expect_done(rig.device_call(DeviceOp::SetResetDuration { ms: RESET_HOLD_MS })?)?;
    let result = run_calibrated(
        rig,
        env.seed,
        &steps,
        |rig| calibrate(rig, &io),
        |rig, step, calibration| race_once(rig, &io, step, calibration),
    );
    expect_done(rig.device_call(DeviceOp::SetResetDuration { ms: 0 })?)?;
    let (calibration, failures, took) = result?;
    suite.record(
        checks::EVERY_RACING_CALL_SUCCEEDED,
        failures.is_empty(),
        format!(
            "seed {:#x} (--seed replays it), {} iterations timed against {calibration}; {}",
            env.seed,
            steps.len(),
            if failures.is_empty() {
                "every racing call returned success".to_string()
            } else {
                failures.join("; ")
            }
        ),
        took,
    );
    // Nothing in the races runs a DMA or touches a BAR: any access is a stray mapping's.
    let touched = bar_accesses(&events_since(rig, since)?);
    suite.record(
        checks::NO_BAR_ACCESS_DURING_THE_RACES,
        touched.is_empty(),
        oracles::describe(&touched),
        Duration::ZERO,
    );

    let t = Instant::now();
    let fresh = with_held_value(rig, |rig, held| {
        let io = IommufdRig {
            nvme: open_nvme_cdev(rig, held, io.iommufd, io.ioas)?,
            ..io.clone()
        };
        doorbell_mapping(rig, &io, held)?;
        ring_through_edu(rig, &io, 13)
    })?;
    let (events, faults) = fresh;
    suite.record(
        checks::A_FRESH_MAPPING_WORKS_AFTER_THE_RACES,
        oracles::written(&events, SQ1TDBL, 8).exactly(13) && faults.is_empty(),
        format!(
            "device: {}; {}",
            oracles::describe(&events),
            describe_faults(&faults)
        ),
        t.elapsed(),
    );
    Ok(())
}

/// nvme-cmb opened afresh, its doorbell page exported and mapped at [`DMABUF_IOVA`] of
/// `ioas` (the rig's IOAS, or a spare one the race destroys).
struct Mapped {
    device: u32,
    dmabuf: u32,
    ioas: u32,
}

fn mapped(rig: &mut Rig, io: &IommufdRig, held: &mut Held, spare_ioas: bool) -> Result<Mapped> {
    let device = open_nvme_cdev(rig, held, io.iommufd, io.ioas)?;
    let dmabuf = export_upstream(rig, held, device, 0, PAGE, PAGE)?;
    let ioas = if spare_ioas {
        let ioas = alloc_ioas(rig, io.iommufd)?;
        held.push(AgentOp::IommufdDestroy {
            iommufd: io.iommufd,
            object: ioas,
        });
        ioas
    } else {
        io.ioas
    };
    map_dmabuf_in(rig, io, ioas, dmabuf, PAGE, DMABUF_IOVA)?
        .map_err(|e| anyhow!("IOMMU_IOAS_MAP_FILE of the doorbell page: {e}"))?;
    // Whatever the race left mapped goes before the next iteration maps the same IOVA.
    held.push(AgentOp::IoasUnmap {
        iommufd: io.iommufd,
        ioas,
        iova: DMABUF_IOVA,
        length: PAGE,
    });
    Ok(Mapped {
        device,
        dmabuf,
        ioas,
    })
}

fn unmap_op(io: &IommufdRig, ioas: u32) -> AgentOp {
    AgentOp::IoasUnmap {
        iommufd: io.iommufd,
        ioas,
        iova: DMABUF_IOVA,
        length: PAGE,
    }
}

fn calibrate(rig: &mut Rig, io: &IommufdRig) -> Result<Calibration> {
    with_held_value(rig, |rig, held| {
        let m = mapped(rig, io, held, false)?;
        let unmap = timed(rig, unmap_op(io, m.ioas))?;
        let spare = mapped_spare(rig, io, held, m.dmabuf)?;
        let destroy = timed(
            rig,
            AgentOp::IommufdDestroy {
                iommufd: io.iommufd,
                object: spare,
            },
        )?;
        let reset = timed(rig, AgentOp::VfioReset { device: m.device })?;
        let decode_on = decode_on_op(rig, m.device)?;
        let decode_on = timed(rig, decode_on)?;
        let dmabuf_close = timed(rig, AgentOp::DmabufClose { dmabuf: m.dmabuf })?;
        let close = timed(rig, AgentOp::VfioClose { device: m.device })?;
        Ok(Calibration {
            unmap,
            destroy,
            dmabuf_close,
            close,
            reset,
            decode_on,
        })
    })
}

/// A spare IOAS with `dmabuf` mapped in it, for timing its destroy.
fn mapped_spare(rig: &mut Rig, io: &IommufdRig, held: &mut Held, dmabuf: u32) -> Result<u32> {
    let ioas = alloc_ioas(rig, io.iommufd)?;
    held.push(AgentOp::IommufdDestroy {
        iommufd: io.iommufd,
        object: ioas,
    });
    map_dmabuf_in(rig, io, ioas, dmabuf, PAGE, DMABUF_IOVA)?
        .map_err(|e| anyhow!("IOMMU_IOAS_MAP_FILE into a spare IOAS: {e}"))?;
    Ok(ioas)
}

fn race_once(
    rig: &mut Rig,
    io: &IommufdRig,
    step: &Step<Race>,
    calibration: &Calibration,
) -> Result<Outcome> {
    with_held_value(rig, |rig, held| {
        let spare = matches!(step.race, Race::DestroyVsClose | Race::DestroyVsReset);
        let m = mapped(rig, io, held, spare)?;
        let importer = match step.race {
            Race::UnmapVsClose
            | Race::UnmapVsReset
            | Race::UnmapVsDecodeOn
            | Race::UnmapVsDmabufClose => unmap_op(io, m.ioas),
            Race::DestroyVsClose | Race::DestroyVsReset => AgentOp::IommufdDestroy {
                iommufd: io.iommufd,
                object: m.ioas,
            },
            Race::DmabufCloseVsClose => AgentOp::DmabufClose { dmabuf: m.dmabuf },
        };
        let exporter = match step.race {
            Race::UnmapVsClose | Race::DestroyVsClose | Race::DmabufCloseVsClose => {
                AgentOp::VfioClose { device: m.device }
            }
            Race::UnmapVsReset | Race::DestroyVsReset => AgentOp::VfioReset { device: m.device },
            Race::UnmapVsDecodeOn => decode_on_op(rig, m.device)?,
            Race::UnmapVsDmabufClose => AgentOp::DmabufClose { dmabuf: m.dmabuf },
        };
        race_pair(rig, step, calibration.of_first(step), importer, exporter)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_iommufd_race_gets_both_orders_in_every_slot() {
        let steps = schedule(9, &RACES);
        assert_eq!(
            steps.len(),
            RACES.len() * 2 * super::super::schedule::SLOTS_PER_PAIR
        );
        for race in RACES {
            assert_eq!(
                steps.iter().filter(|s| s.race == race).count(),
                10,
                "{race:?}"
            );
        }
        let step = Step {
            race: Race::DestroyVsReset,
            importer_first: true,
            start: super::super::schedule::Start::After { ms: 2 },
        };
        assert_eq!(
            step.to_string(),
            "vfio-reset sent 2 ms after ioas-destroy returned"
        );
    }
}
