//! The timing both race scenarios share: a seeded schedule of (race, side first, start) steps
//! and the two racing requests sent that far apart. The host only controls when each request
//! leaves; the interleaving inside the guest still varies from run to run, which is why every
//! race runs in several slots.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result};

use p2prig_protocol::agent::AgentOp;
use p2prig_protocol::wire::ErrorReply;

use crate::rig::Rig;
use crate::scenarios::steps::RPC;

/// How the second operation's start is placed relative to the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// At `permille`/1000 of the first operation's calibrated duration after it was sent.
    During { permille: u64 },
    /// `ms` after the first operation returned: the boundary where no overlap is left.
    After { ms: u64 },
}

/// The slots every (race, side) pair gets: four quarters of the first operation's duration,
/// a random point in each, and one start after it returned.
pub(crate) const SLOTS_PER_PAIR: usize = 5;

/// A race between an importer-side and an exporter-side operation.
pub(crate) trait RaceKind: Copy + fmt::Debug + PartialEq {
    /// The importer's side ("dereg", "unmap") and the exporter's ("vfio-reset", ...).
    fn sides(self) -> (&'static str, &'static str);
}

/// One iteration of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Step<R> {
    pub(crate) race: R,
    /// The importer's side is sent first; otherwise the exporter's is.
    pub(crate) importer_first: bool,
    pub(crate) start: Start,
}

impl<R: RaceKind> fmt::Display for Step<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (importer, exporter) = self.race.sides();
        let (first, second) = if self.importer_first {
            (importer, exporter)
        } else {
            (exporter, importer)
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
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in 0..n for small n.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every race, with either side first, in every slot; the seed picks the point inside each
/// slot and the order of the iterations.
pub(crate) fn schedule<R: RaceKind>(seed: u64, races: &[R]) -> Vec<Step<R>> {
    let mut rng = SplitMix64(seed);
    let mut steps = Vec::with_capacity(races.len() * 2 * SLOTS_PER_PAIR);
    for &race in races {
        for importer_first in [true, false] {
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
                    importer_first,
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

/// Calibrates (`calibrate`, each operation alone), prints the schedule, then runs every step
/// through `once` with the calibration; returns it, the calls that failed and how long the
/// races took.
pub(crate) fn run_calibrated<R: RaceKind, C: fmt::Display>(
    rig: &mut Rig,
    seed: u64,
    steps: &[Step<R>],
    calibrate: impl FnOnce(&mut Rig) -> Result<C>,
    mut once: impl FnMut(&mut Rig, &Step<R>, &C) -> Result<Outcome>,
) -> Result<(C, Vec<String>, Duration)> {
    let calibration = calibrate(rig).context("timing each operation alone")?;
    println!(
        "    seed {seed:#x}: {} iterations timed against {calibration}",
        steps.len()
    );
    let t = std::time::Instant::now();
    let failures = run_steps(rig, steps, |rig, step| once(rig, step, &calibration))?;
    Ok((calibration, failures, t.elapsed()))
}

/// Runs every step through `once`; returns the calls that failed, one sentence each. An error
/// of `once` itself (not a racing call's) ends the schedule, naming the iteration.
fn run_steps<R: RaceKind>(
    rig: &mut Rig,
    steps: &[Step<R>],
    mut once: impl FnMut(&mut Rig, &Step<R>) -> Result<Outcome>,
) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let outcome = once(rig, step).map_err(|e| e.context(format!("iteration {i} ({step})")))?;
        let (importer, exporter) = step.race.sides();
        for (what, result) in [(importer, &outcome.importer), (exporter, &outcome.exporter)] {
            if let Err(e) = result {
                failures.push(format!("iteration {i} ({step}): {what}: {e}"));
            }
        }
    }
    Ok(failures)
}

/// Runs `op` alone and returns how long it took: the calibration of a race's schedule.
pub(crate) fn timed(rig: &mut Rig, op: AgentOp) -> Result<Duration> {
    let desc = format!("{op:?}");
    let t = std::time::Instant::now();
    rig.agent_call(op, RPC)?
        .map_err(|e| anyhow::anyhow!("{desc}: {e}"))?;
    Ok(t.elapsed())
}

/// What the two racing calls returned, by side.
pub(crate) struct Outcome {
    pub(crate) importer: std::result::Result<(), ErrorReply>,
    pub(crate) exporter: std::result::Result<(), ErrorReply>,
}

/// Sends `importer` and `exporter` as `step` says, `first_takes` being the calibrated duration
/// of whichever goes first, and collects both replies.
pub(crate) fn race_pair<R: RaceKind>(
    rig: &mut Rig,
    step: &Step<R>,
    first_takes: Duration,
    importer: AgentOp,
    exporter: AgentOp,
) -> Result<Outcome> {
    let (first, second) = if step.importer_first {
        (importer, exporter)
    } else {
        (exporter, importer)
    };
    let (first, second) = match step.start {
        Start::During { permille } => {
            let first = rig.agent_start(first)?;
            std::thread::sleep(first_takes * permille as u32 / 1000);
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
    let (first, second) = (first.map(drop), second.map(drop));
    Ok(if step.importer_first {
        Outcome {
            importer: first,
            exporter: second,
        }
    } else {
        Outcome {
            importer: second,
            exporter: first,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Toy {
        A,
        B,
    }

    impl RaceKind for Toy {
        fn sides(self) -> (&'static str, &'static str) {
            match self {
                Toy::A => ("dereg", "device-close"),
                Toy::B => ("unmap", "decode-on"),
            }
        }
    }

    #[test]
    fn a_seed_replays_the_same_schedule() {
        assert_eq!(
            schedule(42, &[Toy::A, Toy::B]),
            schedule(42, &[Toy::A, Toy::B])
        );
        assert_ne!(
            schedule(42, &[Toy::A, Toy::B]),
            schedule(43, &[Toy::A, Toy::B])
        );
    }

    #[test]
    fn every_race_runs_with_either_side_first_in_every_slot() {
        let races = [Toy::A, Toy::B];
        let steps = schedule(7, &races);
        assert_eq!(steps.len(), races.len() * 2 * SLOTS_PER_PAIR);
        for race in races {
            for importer_first in [true, false] {
                let mut quarters = [0; 4];
                let mut after = 0;
                for s in steps
                    .iter()
                    .filter(|s| s.race == race && s.importer_first == importer_first)
                {
                    match s.start {
                        Start::During { permille } => quarters[(permille / 250) as usize] += 1,
                        Start::After { ms } => {
                            assert!(ms < 10);
                            after += 1
                        }
                    }
                }
                assert_eq!((quarters, after), ([1; 4], 1), "{race:?} {importer_first}");
            }
        }
    }

    #[test]
    fn the_seed_shuffles_the_order() {
        let races = |seed| {
            schedule(seed, &[Toy::A, Toy::B])
                .iter()
                .map(|s| s.race)
                .collect::<Vec<_>>()
        };
        assert_ne!(races(1), races(2));
    }

    #[test]
    fn steps_say_who_goes_first_and_when() {
        let step = Step {
            race: Toy::A,
            importer_first: false,
            start: Start::During { permille: 625 },
        };
        assert_eq!(step.to_string(), "dereg sent at 62.5% of device-close");
        let step = Step {
            race: Toy::B,
            importer_first: true,
            start: Start::After { ms: 3 },
        };
        assert_eq!(step.to_string(), "decode-on sent 3 ms after unmap returned");
    }

    #[test]
    fn splitmix64_matches_its_reference_output() {
        // First outputs for seed 0 of the reference implementation (Vigna, splitmix64.c).
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next(), 0x6e78_9e6a_a1b9_65f4);
    }
}
