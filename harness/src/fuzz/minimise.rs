//! Minimising a failing program: drop operations (halves, then quarters, down to single
//! operations; each candidate repaired against the model), then shorten its holds and sleeps,
//! keeping a change only when a fresh run shows the same finding again. The runs are the
//! caller's (`reproduces`), so the search is tested here without a rig.

use anyhow::Result;

use super::model::repair;
use super::program::Program;

/// Holds are not shortened below this: a reset must stay open long enough for an operation
/// to run inside it.
const MIN_HOLD_MS: u32 = 100;

/// The smallest program found that still `reproduces`, and how many runs it took. `budget`
/// bounds the runs (each is a program on the rig).
pub fn minimise(
    program: &Program,
    budget: u32,
    mut reproduces: impl FnMut(&Program) -> Result<bool>,
) -> Result<(Program, u32)> {
    let mut best = program.clone();
    let mut runs = 0;
    let mut chunk = best.ops.len().div_ceil(2).max(1);
    loop {
        let mut start = 0;
        while start < best.ops.len() && runs < budget {
            let mut ops = best.ops.clone();
            let end = (start + chunk).min(ops.len());
            ops.drain(start..end);
            let candidate = Program { ops: repair(&ops) };
            if candidate.ops.len() < best.ops.len() {
                runs += 1;
                if reproduces(&candidate)? {
                    best = candidate;
                    continue;
                }
            }
            start += chunk;
        }
        if chunk == 1 || runs >= budget {
            break;
        }
        chunk = chunk.div_ceil(2);
    }
    for i in 0..best.ops.len() {
        while let Some(hold) = best.ops[i].hold_ms() {
            let shorter = if hold > MIN_HOLD_MS * 2 {
                hold / 2
            } else if hold > MIN_HOLD_MS || (hold > 0 && best.ops[i].kind() == "sleep") {
                if best.ops[i].kind() == "sleep" {
                    0
                } else {
                    MIN_HOLD_MS
                }
            } else {
                break;
            };
            if runs >= budget {
                break;
            }
            let mut candidate = best.clone();
            candidate.ops[i] = candidate.ops[i].with_hold_ms(shorter);
            runs += 1;
            if reproduces(&candidate)? {
                best = candidate;
            } else {
                break;
            }
        }
    }
    Ok((best, runs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::program::{Op, ResetKind, Slice};

    fn program(text: &str) -> Program {
        Program::parse(text).expect("a valid program")
    }

    #[test]
    fn drops_what_the_finding_does_not_need_and_shortens_its_holds() -> Result<()> {
        let long = program(
            "export 1 cmb\nexport 0 doorbell\nsleep 50\nreg 1 1\nreg 0 0\nwrite 1 3\n\
             reset flr 1500\nsleep 10\nwrite 0 0\ntarget-write 1 2\nreset-end\ndereg 1\n",
        );
        // The "defect": a write through mr 0 inside an FLR.
        let shows = |p: &Program| {
            let mut in_flr = false;
            p.ops.iter().any(|op| {
                match op {
                    Op::Reset {
                        kind: ResetKind::Flr,
                        ..
                    } => in_flr = true,
                    Op::ResetEnd => in_flr = false,
                    Op::Write { mr: 0, .. } if in_flr => return true,
                    _ => {}
                }
                false
            })
        };
        let (small, runs) = minimise(&long, 100, |p| Ok(shows(p)))?;
        assert_eq!(
            small.ops,
            [
                Op::Export {
                    buf: 0,
                    slice: Slice::Doorbell
                },
                Op::Reg { mr: 0, buf: 0 },
                Op::Reset {
                    kind: ResetKind::Flr,
                    hold_ms: 100
                },
                Op::Write { mr: 0, word: 0 },
                Op::ResetEnd,
            ],
            "{small}"
        );
        assert!(runs <= 30, "{runs} runs");
        Ok(())
    }

    #[test]
    fn stops_at_its_budget_and_keeps_the_original_when_nothing_smaller_shows_it() -> Result<()> {
        let p = program("export 0 doorbell\nreg 0 0\nwrite 0 0\nsleep 200\n");
        let mut calls = 0;
        let (same, runs) = minimise(&p, 3, |_| {
            calls += 1;
            Ok(false)
        })?;
        assert_eq!((same, runs, calls), (p, 3, 3));
        Ok(())
    }
}
