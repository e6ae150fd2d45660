//! release-races: a dma-buf MR's deregistration (detach and the last dma-buf reference) racing
//! the exporter's revoke paths: the VFIO device fd closing, a VFIO_DEVICE_RESET, and memory
//! decode coming back on (which makes the importer map again). Each iteration starts the two
//! operations a seeded random delay apart (`schedule`); the seed is printed and `--seed`
//! replays the same schedule. iommufd-races (`iommufd`) does the same for iommufd's importer.

pub mod iommufd;
pub(crate) mod schedule;

use std::fmt;
use std::time::{Duration, Instant};

use schedule::{
    race_pair, run_calibrated, schedule, timed, Outcome, RaceKind, Step, SLOTS_PER_PAIR,
};

use anyhow::{anyhow, Result};

use p2prig_protocol::agent::AgentOp;
use p2prig_protocol::device::DeviceOp;
use p2prig_protocol::event::EventKind;

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::steps::{
    alloc_pd, decode_on_op, doorbell_mr, events_since, expect_done, export, last_seq, open_device,
    rdma_up, reg_dmabuf, ring, with_held, with_held_value, Held, PAGE, RPC,
};
use crate::scenarios::ScenarioEnv;

/// Iterations per run: every race, either side first, every slot.
pub const ITERATIONS: u32 = (RACES.len() * 2 * SLOTS_PER_PAIR) as u32;
/// nvme-cmb holds each reset open this long.
const RESET_HOLD_MS: u64 = 20;

/// What the MR's deregistration races against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Race {
    /// The VFIO device fd closes (vfio-pci revokes and cleans its dma-bufs up).
    DeviceClose,
    /// The same, with the dma-buf's fd closed before: the MR holds the last reference, so the
    /// deregistration releases the dma-buf while vfio-pci cleans it up (the seed's
    /// dma_buf_try_get() question).
    LastReference,
    /// VFIO_DEVICE_RESET (revoke, reset, restore).
    Reset,
    /// PCI_COMMAND memory decode set again after being cleared (restore: the importer maps
    /// again from its own context).
    Remap,
}

const RACES: [Race; 4] = [
    Race::DeviceClose,
    Race::LastReference,
    Race::Reset,
    Race::Remap,
];

impl RaceKind for Race {
    fn sides(self) -> (&'static str, &'static str) {
        (
            "dereg",
            match self {
                Race::DeviceClose => "device-close",
                Race::LastReference => "device-close (fd closed, the MR holds the last reference)",
                Race::Reset => "vfio-reset",
                Race::Remap => "decode-on",
            },
        )
    }
}

/// How long each operation takes on this guest, measured without a race, so the schedule's
/// fractions mean the same under TCG and KVM.
#[derive(Debug, Clone, Copy)]
struct Calibration {
    dereg: Duration,
    close: Duration,
    reset: Duration,
    remap: Duration,
}

impl Calibration {
    fn of_first(&self, step: &Step<Race>) -> Duration {
        if step.importer_first {
            return self.dereg;
        }
        match step.race {
            Race::DeviceClose | Race::LastReference => self.close,
            Race::Reset => self.reset,
            Race::Remap => self.remap,
        }
    }
}

impl fmt::Display for Calibration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dereg {:.1} ms, device close {:.1} ms, reset {:.1} ms, decode on {:.1} ms",
            self.dereg.as_secs_f64() * 1e3,
            self.close.as_secs_f64() * 1e3,
            self.reset.as_secs_f64() * 1e3,
            self.remap.as_secs_f64() * 1e3
        )
    }
}

pub fn run(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| races(rig, env, suite, held))
}

fn races(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite, held: &mut Held) -> Result<()> {
    let steps = schedule(env.seed, &RACES);
    let context = rdma_up(rig, held)?;
    let pd = alloc_pd(rig, context, held)?;
    let since = last_seq(rig)?;
    expect_done(rig.device_call(DeviceOp::SetResetDuration { ms: RESET_HOLD_MS })?)?;
    let result = run_calibrated(
        rig,
        env.seed,
        &steps,
        |rig| calibrate(rig, env, pd),
        |rig, step, calibration| race_once(rig, env, pd, step, calibration),
    );
    expect_done(rig.device_call(DeviceOp::SetResetDuration { ms: 0 })?)?;
    let (calibration, failures, took) = result?;
    suite.record(
        checks::EVERY_RACING_CALL_SUCCEEDED,
        failures.is_empty(),
        format!(
            "seed {:#x} (--seed replays it), {ITERATIONS} iterations timed against {calibration}; {}",
            env.seed,
            if failures.is_empty() {
                "every deregistration and every revoke returned success".to_string()
            } else {
                failures.join("; ")
            }
        ),
        took,
    );

    // Nothing in this scenario writes or reads the BARs: any access is the importer's.
    let touched: Vec<String> = events_since(rig, since)?
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Bar { .. } | EventKind::Violation { .. }))
        .map(|e| serde_json::to_string(e).unwrap_or_default())
        .collect();
    suite.record(
        checks::NO_BAR_ACCESS_DURING_THE_RACES,
        touched.is_empty(),
        if touched.is_empty() {
            "none".to_string()
        } else {
            touched.join("\n")
        },
        Duration::ZERO,
    );

    let t = Instant::now();
    let d = doorbell_mr(rig, env, held)?;
    let after = ring(rig, &d.lb, d.rkey, 13, 1)?;
    suite.record(
        checks::A_NEW_MR_WORKS_AFTER_THE_RACES,
        after.landed(),
        after.detail(),
        t.elapsed(),
    );
    Ok(())
}

/// An exported doorbell page with an MR over it, on a freshly opened device.
struct Import {
    device: u32,
    dmabuf: u32,
    mr: u32,
}

fn import(rig: &mut Rig, env: &ScenarioEnv, pd: u32, held: &mut Held) -> Result<Import> {
    let device = open_device(rig, held)?;
    let dmabuf = export(rig, held, device, 0, PAGE, PAGE, env)?;
    let (mr, _rkey) = reg_dmabuf(rig, held, pd, dmabuf, 0, PAGE)?
        .map_err(|e| anyhow!("reg_dmabuf_mr over the doorbell page: {e}"))?;
    Ok(Import { device, dmabuf, mr })
}

/// Each operation alone, the revokes without an importer (on v1 a close with one attached
/// oopses, which is the race's business, not the calibration's).
fn calibrate(rig: &mut Rig, env: &ScenarioEnv, pd: u32) -> Result<Calibration> {
    with_held_value(rig, |rig, held| {
        let Import { device, mr, .. } = import(rig, env, pd, held)?;
        let dereg = timed(rig, AgentOp::DeregMr { mr })?;
        // The dma-buf stays exported, as in the races.
        let reset = timed(rig, AgentOp::VfioReset { device })?;
        let decode_on = decode_on_op(rig, device)?;
        let remap = timed(rig, decode_on)?;
        let close = timed(rig, AgentOp::VfioClose { device })?;
        Ok(Calibration {
            dereg,
            close,
            reset,
            remap,
        })
    })
}

fn race_once(
    rig: &mut Rig,
    env: &ScenarioEnv,
    pd: u32,
    step: &Step<Race>,
    calibration: &Calibration,
) -> Result<Outcome> {
    with_held_value(rig, |rig, held| {
        let Import { device, dmabuf, mr } = import(rig, env, pd, held)?;
        let revoke = match step.race {
            Race::DeviceClose => AgentOp::VfioClose { device },
            Race::LastReference => {
                rig.agent_call(AgentOp::DmabufClose { dmabuf }, RPC)?
                    .map_err(|e| anyhow!("closing the dma-buf fd before the race: {e}"))?;
                AgentOp::VfioClose { device }
            }
            Race::Reset => AgentOp::VfioReset { device },
            Race::Remap => decode_on_op(rig, device)?,
        };
        race_pair(
            rig,
            step,
            calibration.of_first(step),
            AgentOp::DeregMr { mr },
            revoke,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_race_of_release_races_has_its_slots() {
        assert_eq!(schedule(7, &RACES).len(), ITERATIONS as usize);
        assert_eq!(ITERATIONS, 40);
    }
}
