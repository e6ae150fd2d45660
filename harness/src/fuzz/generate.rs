//! Programs from a seed, and mutations of corpus programs. Generation walks the reference
//! model and picks among the operations it allows, weighted towards the states where revoke
//! bugs live: an MR over a live dma-buf, then a window, then accesses inside it.

use crate::scenarios::races::schedule::SplitMix64;

use super::model::{repair, Model};
use super::program::{Op, Program, ResetKind, Slice, MAX_WORD, SLOTS};

/// Operations a generated program has (before repair closes a window left open).
const LENGTHS: std::ops::RangeInclusive<u64> = 4..=14;
const HOLDS_MS: [u32; 4] = [300, 600, 1000, 1500];
const SLEEPS_MS: [u32; 4] = [0, 10, 50, 200];

pub struct Generator {
    rng: SplitMix64,
}

impl Generator {
    pub fn new(seed: u64) -> Generator {
        Generator {
            rng: SplitMix64(seed),
        }
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.below(items.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.below(100) < percent
    }

    /// A fresh program.
    pub fn program(&mut self) -> Program {
        let length = LENGTHS.start() + self.rng.below(LENGTHS.end() - LENGTHS.start() + 1);
        let mut model = Model::new();
        let mut ops = Vec::new();
        for _ in 0..length {
            let op = self.op_for(&model);
            model.step(&op);
            ops.push(op);
        }
        Program { ops: repair(&ops) }
    }

    /// One operation the model allows in its state, weighted by what the state lacks.
    fn op_for(&mut self, model: &Model) -> Op {
        loop {
            let candidates = self.candidates(model);
            let total: u32 = candidates.iter().map(|(w, _)| w).sum();
            let mut at = self.rng.below(u64::from(total)) as u32;
            for (weight, op) in candidates {
                if at < weight {
                    if model.allows(&op) {
                        return op;
                    }
                    break;
                }
                at -= weight;
            }
        }
    }

    fn candidates(&mut self, model: &Model) -> Vec<(u32, Op)> {
        let buf = self.rng.below(u64::from(SLOTS)) as u8;
        let mr = self.rng.below(u64::from(SLOTS)) as u8;
        let slice = if self.chance(90) {
            self.pick(&[Slice::Doorbell, Slice::Doorbell, Slice::Cmb])
        } else {
            self.pick(&[Slice::Unaligned, Slice::AbsentBar])
        };
        let word = self.rng.below(u64::from(MAX_WORD)) as u16;
        let has_mr = (0..SLOTS).any(|m| model.mr_slice(m).is_some());
        let live_mr = (0..SLOTS).any(|m| model.mr_revoked(m) == Some(false));
        let in_window = model.window().is_some();
        let opener = self.window_opener();
        let closer = model.window().map(super::model::closer);
        let mut c = vec![
            (if has_mr { 4 } else { 12 }, Op::Export { buf, slice }),
            (if has_mr { 6 } else { 14 }, Op::Reg { mr, buf }),
            (2, Op::CloseBuf { buf }),
            (2, Op::Dereg { mr }),
            (if in_window { 12 } else { 6 }, Op::Write { mr, word }),
            (if in_window { 8 } else { 3 }, Op::TargetWrite { mr, word }),
            (if live_mr { 10 } else { 3 }, opener),
            (2, Op::CloseDevice),
            (6, Op::OpenDevice),
            (
                1,
                Op::Sleep {
                    ms: self.pick(&SLEEPS_MS),
                },
            ),
        ];
        if let Some(closer) = closer {
            c.push((5, closer));
        }
        c
    }

    fn window_opener(&mut self) -> Op {
        match self.rng.below(6) {
            0..=2 => Op::Reset {
                kind: self.pick(&ResetKind::ALL),
                hold_ms: self.pick(&HOLDS_MS),
            },
            3 => self.pick(&[Op::DecodeOff, Op::D3]),
            4 => Op::LowPowerEnter,
            _ => Op::DecodeOff,
        }
    }

    /// A mutant of `program`, possibly spliced with `other`; repaired against the model.
    pub fn mutate(&mut self, program: &Program, other: Option<&Program>) -> Program {
        let mut ops = program.ops.clone();
        for _ in 0..1 + self.rng.below(3) {
            let at = self.rng.below(ops.len() as u64 + 1) as usize;
            match self.rng.below(6) {
                // Insert an operation that the state at that point allows.
                0 | 1 => {
                    let mut model = Model::new();
                    for op in &ops[..at] {
                        if model.allows(op) {
                            model.step(op);
                        }
                    }
                    let op = self.op_for(&model);
                    ops.insert(at, op);
                }
                2 if !ops.is_empty() => {
                    ops.remove(at.min(ops.len() - 1));
                }
                3 if !ops.is_empty() => {
                    let i = at.min(ops.len() - 1);
                    ops[i] = self.retune(ops[i]);
                }
                4 if ops.len() >= 2 => {
                    let i = at.min(ops.len() - 2);
                    ops.swap(i, i + 1);
                }
                _ => {
                    if let Some(other) = other {
                        let cut = self.rng.below(other.ops.len() as u64 + 1) as usize;
                        ops.truncate(at);
                        ops.extend_from_slice(&other.ops[cut..]);
                    }
                }
            }
        }
        ops.truncate(3 * *LENGTHS.end() as usize);
        Program { ops: repair(&ops) }
    }

    /// The same operation with other parameters.
    fn retune(&mut self, op: Op) -> Op {
        match op {
            Op::Reset { .. } => Op::Reset {
                kind: self.pick(&ResetKind::ALL),
                hold_ms: self.pick(&HOLDS_MS),
            },
            Op::Sleep { .. } => Op::Sleep {
                ms: self.pick(&SLEEPS_MS),
            },
            Op::Write { mr, .. } => Op::Write {
                mr,
                word: self.rng.below(u64::from(MAX_WORD)) as u16,
            },
            Op::TargetWrite { mr, word } => Op::Write { mr, word },
            Op::Export { buf, .. } => Op::Export {
                buf,
                slice: self.pick(&Slice::ALL),
            },
            Op::DecodeOff => Op::D3,
            Op::D3 => Op::LowPowerEnter,
            Op::LowPowerEnter => Op::DecodeOff,
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_and_mutated_programs_are_valid_and_end_restored() {
        let mut generator = Generator::new(0x5eed);
        let mut programs = vec![generator.program()];
        for i in 0..500 {
            let next = if i % 2 == 0 {
                generator.program()
            } else {
                let other = programs[i / 3].clone();
                generator.mutate(&programs[i / 2], Some(&other))
            };
            let mut model = Model::new();
            for op in &next.ops {
                assert!(model.allows(op), "{op} in\n{next}");
                model.step(op);
            }
            assert_eq!(model.window(), None, "ends in a window:\n{next}");
            assert_eq!(repair(&next.ops), next.ops);
            programs.push(next);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_programs() {
        let (mut a, mut b) = (Generator::new(7), Generator::new(7));
        for _ in 0..20 {
            assert_eq!(a.program(), b.program());
        }
    }

    #[test]
    fn generation_reaches_writes_inside_every_window() {
        let mut generator = Generator::new(1);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..400 {
            let program = generator.program();
            let mut model = Model::new();
            for op in &program.ops {
                if let (Op::Write { mr, .. }, Some(w)) = (op, model.window()) {
                    if model.mr_revoked(*mr) == Some(true) {
                        seen.insert(w.name());
                    }
                }
                model.step(op);
            }
        }
        for w in [
            "reset-vfio",
            "reset-flr",
            "reset-hot",
            "decode-off",
            "d3",
            "low-power",
        ] {
            assert!(seen.contains(w), "no write inside {w}: {seen:?}");
        }
    }
}
