//! release-races: a dma-buf MR's deregistration (detach and the last dma-buf reference) racing
//! the exporter's revoke paths: the VFIO device fd closing, a VFIO_DEVICE_RESET, and memory
//! decode coming back on (which makes the importer map again). Each iteration starts the two
//! operations a seeded random delay apart; the seed is printed and `--seed` replays the same
//! schedule. The host only controls when each request leaves; the interleaving inside the
//! guest still varies from run to run, which is why there are many iterations.

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use p2prig_protocol::agent::AgentOp;
use p2prig_protocol::device::DeviceOp;
use p2prig_protocol::event::EventKind;
use p2prig_protocol::wire::ErrorReply;

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::steps::{
    alloc_pd, clear_memory_decode, doorbell_mr, events_since, expect_done, export, last_seq,
    open_device, rdma_up, reg_dmabuf, ring, with_held, with_held_value, Held, PAGE, RPC,
};
use crate::scenarios::ScenarioEnv;

/// How the second operation's start is placed relative to the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// At `permille`/1000 of the first operation's calibrated duration after it was sent.
    During { permille: u64 },
    /// `ms` after the first operation returned: the boundary where no overlap is left.
    After { ms: u64 },
}

/// The slots every (race, side) pair gets: four quarters of the first operation's duration,
/// a random point in each, and one start after it returned.
const SLOTS_PER_PAIR: usize = 5;
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

impl Race {
    fn name(self) -> &'static str {
        match self {
            Race::DeviceClose => "device-close",
            Race::LastReference => "device-close (fd closed, the MR holds the last reference)",
            Race::Reset => "vfio-reset",
            Race::Remap => "decode-on",
        }
    }
}

/// One iteration of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Step {
    race: Race,
    /// The deregistration is sent first; otherwise the revoke is.
    dereg_first: bool,
    start: Start,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (first, second) = if self.dereg_first {
            ("dereg", self.race.name())
        } else {
            (self.race.name(), "dereg")
        };
        match self.start {
            Start::During { permille } => write!(
                f,
                "{second} sent at {}.{}% of {first}",
                permille / 10,
                permille % 10
            ),
            Start::After { ms } => write!(f, "{second} sent {ms} ms after {first} returned"),
        }
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny seedable generator, enough for timing.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in 0..n for small n.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every race, with either side first, in every slot; the seed picks the point inside each
/// slot and the order of the iterations.
fn schedule(seed: u64) -> Vec<Step> {
    let mut rng = SplitMix64(seed);
    let mut steps = Vec::with_capacity(ITERATIONS as usize);
    for race in RACES {
        for dereg_first in [true, false] {
            for slot in 0..SLOTS_PER_PAIR as u64 {
                let start = if slot < 4 {
                    Start::During {
                        permille: slot * 250 + rng.below(250),
                    }
                } else {
                    Start::After { ms: rng.below(10) }
                };
                steps.push(Step {
                    race,
                    dereg_first,
                    start,
                });
            }
        }
    }
    // Fisher-Yates: the device and the importer see the races in a seeded order.
    for i in (1..steps.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        steps.swap(i, j);
    }
    steps
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
    fn of_first(&self, step: &Step) -> Duration {
        if step.dereg_first {
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

/// What the two racing calls returned in one iteration.
struct Outcome {
    dereg: std::result::Result<(), ErrorReply>,
    revoke: std::result::Result<(), ErrorReply>,
}

fn races(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite, held: &mut Held) -> Result<()> {
    let steps = schedule(env.seed);
    let context = rdma_up(rig, held)?;
    let pd = alloc_pd(rig, context, held)?;
    let since = last_seq(rig)?;
    expect_done(rig.device_call(DeviceOp::SetResetDuration { ms: RESET_HOLD_MS })?)?;
    let result = run_schedule(rig, env, pd, &steps);
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

/// Calibrates, then runs every step; returns the calibration, the calls that failed and how
/// long the races took.
fn run_schedule(
    rig: &mut Rig,
    env: &ScenarioEnv,
    pd: u32,
    steps: &[Step],
) -> Result<(Calibration, Vec<String>, Duration)> {
    let calibration = calibrate(rig, env, pd).context("timing each operation alone")?;
    println!(
        "    seed {:#x}: {} iterations timed against {calibration}",
        env.seed,
        steps.len()
    );
    let t = Instant::now();
    let mut failures = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let outcome = race_once(rig, env, pd, step, &calibration)
            .with_context(|| format!("iteration {i} ({step})"))?;
        for (what, result) in [("dereg", &outcome.dereg), ("revoke", &outcome.revoke)] {
            if let Err(e) = result {
                failures.push(format!("iteration {i} ({step}): {what}: {e}"));
            }
        }
    }
    Ok((calibration, failures, t.elapsed()))
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
    let timed = |rig: &mut Rig, op: AgentOp| -> Result<Duration> {
        let desc = format!("{op:?}");
        let t = Instant::now();
        rig.agent_call(op, RPC)?
            .map_err(|e| anyhow!("{desc}: {e}"))?;
        Ok(t.elapsed())
    };
    with_held_value(rig, |rig, held| {
        let Import { device, mr, .. } = import(rig, env, pd, held)?;
        let dereg = timed(rig, AgentOp::DeregMr { mr })?;
        // The dma-buf stays exported, as in the races.
        let reset = timed(rig, AgentOp::VfioReset { device })?;
        let decode_on = decode_op(rig, device)?;
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

/// Clears memory decode and returns the config write that sets it again.
fn decode_op(rig: &mut Rig, device: u32) -> Result<AgentOp> {
    let command = clear_memory_decode(rig, device)?;
    Ok(AgentOp::ConfigWrite {
        device,
        offset: 4,
        width: 2,
        value: command | 0x2,
    })
}

fn race_once(
    rig: &mut Rig,
    env: &ScenarioEnv,
    pd: u32,
    step: &Step,
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
            Race::Remap => decode_op(rig, device)?,
        };
        let dereg = AgentOp::DeregMr { mr };
        let (first, second) = if step.dereg_first {
            (dereg, revoke)
        } else {
            (revoke, dereg)
        };
        let (first, second) = match step.start {
            Start::During { permille } => {
                let first = rig.agent_start(first)?;
                std::thread::sleep(calibration.of_first(step) * permille as u32 / 1000);
                let second = rig.agent_start(second)?;
                (
                    rig.agent_finish(first, RPC)?,
                    rig.agent_finish(second, RPC)?,
                )
            }
            Start::After { ms } => {
                let first = rig.agent_call(first, RPC)?;
                std::thread::sleep(Duration::from_millis(ms));
                (first, rig.agent_call(second, RPC)?)
            }
        };
        let (first, second) = (first.map(|_| ()), second.map(|_| ()));
        Ok(if step.dereg_first {
            Outcome {
                dereg: first,
                revoke: second,
            }
        } else {
            Outcome {
                dereg: second,
                revoke: first,
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_schedule() {
        assert_eq!(schedule(42), schedule(42));
        assert_ne!(schedule(42), schedule(43));
    }

    #[test]
    fn every_race_runs_with_either_side_first_in_every_slot() {
        let steps = schedule(7);
        assert_eq!(steps.len(), ITERATIONS as usize);
        for race in RACES {
            for dereg_first in [true, false] {
                let mut quarters = [0; 4];
                let mut after = 0;
                for s in steps
                    .iter()
                    .filter(|s| s.race == race && s.dereg_first == dereg_first)
                {
                    match s.start {
                        Start::During { permille } => quarters[(permille / 250) as usize] += 1,
                        Start::After { ms } => {
                            assert!(ms < 10);
                            after += 1
                        }
                    }
                }
                assert_eq!((quarters, after), ([1; 4], 1), "{race:?} {dereg_first}");
            }
        }
    }

    #[test]
    fn the_seed_shuffles_the_order() {
        let races = |seed| schedule(seed).iter().map(|s| s.race).collect::<Vec<_>>();
        assert_ne!(races(1), races(2));
    }

    #[test]
    fn steps_say_who_goes_first_and_when() {
        let step = Step {
            race: Race::DeviceClose,
            dereg_first: false,
            start: Start::During { permille: 625 },
        };
        assert_eq!(step.to_string(), "dereg sent at 62.5% of device-close");
        let step = Step {
            race: Race::Remap,
            dereg_first: true,
            start: Start::After { ms: 3 },
        };
        assert_eq!(step.to_string(), "decode-on sent 3 ms after dereg returned");
    }

    #[test]
    fn splitmix64_matches_its_reference_output() {
        // First outputs for seed 0 of the reference implementation (Vigna, splitmix64.c).
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next(), 0x6e78_9e6a_a1b9_65f4);
    }
}
