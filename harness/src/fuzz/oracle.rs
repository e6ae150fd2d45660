//! Judges a program's execution: every operation against the model's prediction, the device's
//! log against the writes that were predicted to land, the console for kernel reports, and
//! the executor for operations that did not complete. Pure functions, unit-tested here.

use std::collections::HashMap;

use serde::Serialize;

use p2prig_protocol::event::{Access, Event, EventKind};

use crate::rig::console;

use super::exec::{Execution, Observed, Record, ResetRecord, WriteStatus};
use super::model::Predicted;
use super::program::ResetKind;

/// Our writes carry this in their top 16 bits; a landed word without it is nobody's write.
const VALUE_TAG: u64 = 0xf022;

/// One difference between what the model predicted and what happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Divergence {
    /// The oracle: result, device, console, liveness.
    pub oracle: &'static str,
    /// The operation (program index) it is bound to, if one.
    pub op: Option<usize>,
    /// What tells findings apart: the oracle, the operation's kind and window, and how the
    /// result differed; no values, addresses or times.
    pub signature: String,
    pub detail: String,
}

/// Every divergence of one execution, in program order, console and liveness last.
pub fn judge(execution: &Execution, allowed: &console::AllowedSplats) -> Vec<Divergence> {
    let mut found = Vec::new();
    let (landed, strays) = landed_words(&execution.events);
    for record in &execution.records {
        if let Some(d) = judge_record(record, &landed, &execution.resets) {
            found.push(d);
        }
    }
    let ours: Vec<u64> = execution
        .records
        .iter()
        .filter_map(|r| match &r.observed {
            Observed::Write(w) => Some(w.value),
            _ => None,
        })
        .collect();
    for &(bar, offset, value) in &landed {
        if !ours.contains(&value) {
            found.push(Divergence {
                oracle: "device",
                op: None,
                signature: "device: a word no write carried landed".into(),
                detail: format!("{value:#018x} at BAR{bar}+{offset:#x}"),
            });
        }
    }
    for stray in strays {
        found.push(Divergence {
            oracle: "device",
            op: None,
            signature: "device: a partial or stray access in a watched range".into(),
            detail: stray,
        });
    }
    for e in &execution.events {
        if let EventKind::Violation { reason, .. } = &e.kind {
            found.push(Divergence {
                oracle: "device",
                op: None,
                signature: format!("device: violation ({reason})"),
                detail: serde_json::to_string(e).unwrap_or_default(),
            });
        }
    }
    let reports = console::reports(&execution.console, allowed);
    if let Some(excerpt) = reports.first {
        found.push(console_divergence(&excerpt));
    }
    // A guest that died with a report on its console is that report's finding.
    let reported_crash = !execution.healthy && found.iter().any(|d| d.oracle == "console");
    match (&execution.stopped, execution.healthy) {
        _ if reported_crash => {}
        (Some((op, why)), healthy) => found.push(Divergence {
            oracle: "liveness",
            op: Some(*op),
            signature: if healthy {
                format!("liveness: {} did not complete", op_kind(execution, *op))
            } else {
                "liveness: the guest died".into()
            },
            detail: why.clone(),
        }),
        (None, false) => found.push(Divergence {
            oracle: "liveness",
            op: None,
            signature: "liveness: the guest died".into(),
            detail: "QEMU exited or the guest crashed after the last operation".into(),
        }),
        (None, true) => {}
    }
    found
}

/// A kernel report on the console, its headline the signature.
pub fn console_divergence(excerpt: &str) -> Divergence {
    Divergence {
        oracle: "console",
        op: None,
        signature: format!("console: {}", normalise(console::headline(excerpt))),
        detail: excerpt.to_string(),
    }
}

fn op_kind(execution: &Execution, index: usize) -> String {
    execution
        .records
        .iter()
        .find(|r| r.index == Some(index))
        .and_then(|r| r.op_value)
        .map_or_else(
            || format!("operation {}", index + 1),
            |op| op.kind().to_string(),
        )
}

/// Digits and hex runs out, so that one defect gives one signature.
fn normalise(line: &str) -> String {
    let mut out = String::new();
    let mut in_number = false;
    for c in line.chars() {
        if c.is_ascii_hexdigit() && (in_number || c.is_ascii_digit()) {
            if !in_number {
                out.push('N');
                in_number = true;
            }
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out
}

fn context(record: &Record) -> String {
    match (record.window, record.after) {
        (Some(w), _) => format!(" in {}", w.name()),
        (None, Some(w)) => format!(" after {}", w.name()),
        (None, None) => String::new(),
    }
}

fn judge_record(
    record: &Record,
    landed: &[(u8, u64, u64)],
    resets: &[ResetRecord],
) -> Option<Divergence> {
    let kind = record.op_value.map_or("cleanup", |op| op.kind());
    let diverge = |how: String, detail: String| {
        Some(Divergence {
            oracle: "result",
            op: record.index,
            signature: format!("{kind}{}: {how}", context(record)),
            detail: format!("{}: {detail}", record.op),
        })
    };
    match (&record.predicted, &record.observed) {
        (_, Observed::Skipped(_)) => None,
        (Predicted::Ok, Observed::Ok) => None,
        (Predicted::Errno(want), Observed::Errno { errno, .. }) if want == errno => None,
        (Predicted::EnodevIfInside, observed) => {
            let enodev =
                matches!(observed, Observed::Errno { errno, .. } if *errno == libc::ENODEV);
            let inside = inside_reset(record.completed_ns, record.reset, resets);
            if enodev || (!inside && matches!(observed, Observed::Ok)) {
                return None;
            }
            diverge(
                format!(
                    "predicted errno {}{}, got {}",
                    libc::ENODEV,
                    if inside { "" } else { " or ok" },
                    class(observed)
                ),
                format!("{observed:?}"),
            )
        }
        (Predicted::Ok | Predicted::Errno(_), observed) => diverge(
            format!(
                "predicted {}, got {}",
                describe_prediction(record.predicted),
                class(observed)
            ),
            format!("{observed:?}"),
        ),
        (predicted, Observed::Write(w)) => {
            let count = landed.iter().filter(|(_, _, v)| *v == w.value).count();
            let elsewhere = landed
                .iter()
                .any(|&(bar, offset, v)| v == w.value && (bar, offset) != (w.bar, w.offset));
            let inside = inside_reset(w.completed_ns, w.reset, resets);
            let want_refused = match predicted {
                Predicted::Lands => false,
                Predicted::Refused => true,
                Predicted::RefusedIfInside if inside => true,
                // The window may have closed before the write ran: either outcome, as long as
                // the completion and the device agree.
                _ => w.status != WriteStatus::Success,
            };
            let good = if want_refused {
                w.status == WriteStatus::Refused && count == 0
            } else {
                w.status == WriteStatus::Success && count == 1 && !elsewhere
            };
            if good {
                return None;
            }
            let got = match (&w.status, count, elsewhere) {
                (_, _, true) => "landed elsewhere".to_string(),
                (WriteStatus::Success, 0, _) => "completed, reached nothing".to_string(),
                (WriteStatus::Success, 1, _) => "completed and landed".to_string(),
                (WriteStatus::Refused, 0, _) => "refused".to_string(),
                (WriteStatus::Refused, _, _) => "refused yet landed".to_string(),
                (WriteStatus::Other(_), _, _) => "neither completed nor refused".to_string(),
                (_, n, _) => format!("landed {n} times"),
            };
            let want = match (predicted, inside) {
                (Predicted::RefusedIfInside, false) => "refused or landed",
                _ if want_refused => "refused",
                _ => "lands",
            };
            diverge(
                format!("predicted {want}, {got}"),
                format!(
                    "{:?}; the device saw {:#018x} {count} time(s){}",
                    w.status,
                    w.value,
                    if elsewhere { ", somewhere else" } else { "" }
                ),
            )
        }
        (predicted, observed) => diverge(
            format!(
                "predicted {}, got {}",
                describe_prediction(*predicted),
                class(observed)
            ),
            format!("{observed:?}"),
        ),
    }
}

/// The operation completed before its held reset ended at the device: it ran inside. A hot reset
/// freezes the guest for the device's reset, so nothing runs inside it that the device can
/// date; its writes are judged by the completion and the device agreeing (and by what
/// happens after the reset).
fn inside_reset(completed_ns: u64, reset: Option<usize>, resets: &[ResetRecord]) -> bool {
    let Some(reset) = reset.and_then(|i| resets.get(i)) else {
        return false;
    };
    reset.kind != ResetKind::Hot && reset.device_end_ns.is_some_and(|end| completed_ns < end)
}

fn describe_prediction(p: Predicted) -> String {
    match p {
        Predicted::Ok => "ok".into(),
        Predicted::Errno(e) => format!("errno {e}"),
        Predicted::Lands => "lands".into(),
        Predicted::Refused | Predicted::RefusedIfInside => "refused".into(),
        Predicted::EnodevIfInside => format!("errno {}", libc::ENODEV),
    }
}

fn class(observed: &Observed) -> String {
    match observed {
        Observed::Ok => "ok".into(),
        Observed::Errno { errno, .. } => format!("errno {errno}"),
        Observed::Write(_) => "a write".into(),
        Observed::Skipped(_) => "skipped".into(),
    }
}

/// The watched ranges: BAR0's doorbell page and the CMB slice (BAR2 0x1000, 8 KiB).
fn watched(bar: u8, offset: u64) -> bool {
    match bar {
        0 => (0x1000..0x2000).contains(&offset),
        2 => (0x1000..0x3000).contains(&offset),
        _ => false,
    }
}

/// The whole 8-byte words BAR writes in the watched ranges put together, as (bar, offset,
/// value) in the order they completed (rxe may split a word into two dwords), and the
/// accesses that made no whole word.
pub fn landed_words(events: &[Event]) -> (Vec<(u8, u64, u64)>, Vec<String>) {
    let mut pending: HashMap<(u8, u64), ([u8; 8], u8)> = HashMap::new();
    let mut words = Vec::new();
    let mut strays = Vec::new();
    for e in events {
        let EventKind::Bar {
            access: Access::Write,
            bar,
            offset,
            size,
            value,
            ..
        } = &e.kind
        else {
            continue;
        };
        if !watched(*bar, *offset) {
            continue;
        }
        let base = offset & !7;
        let (Some(value), true) = (value, (offset - base) + u64::from(*size) <= 8) else {
            strays.push(format!("BAR{bar}+{offset:#x} size {size}"));
            continue;
        };
        let (bytes, mask) = pending.entry((*bar, base)).or_insert(([0; 8], 0));
        for i in 0..*size as usize {
            let at = (offset - base) as usize + i;
            if *mask & (1 << at) != 0 {
                strays.push(format!("BAR{bar}+{base:#x}: byte {at} written twice"));
                *mask = 0;
            }
            bytes[at] = (value >> (8 * i)) as u8;
            *mask |= 1 << at;
        }
        if *mask == 0xff {
            words.push((*bar, base, u64::from_le_bytes(*bytes)));
            pending.remove(&(*bar, base));
        }
    }
    for ((bar, base), (_, mask)) in pending {
        strays.push(format!(
            "BAR{bar}+{base:#x}: only bytes {mask:#010b} written"
        ));
    }
    let tagged = |v: u64| v >> 48 == VALUE_TAG;
    for &(bar, offset, v) in &words {
        if !tagged(v) {
            strays.push(format!(
                "BAR{bar}+{offset:#x}: {v:#018x} is no write of ours"
            ));
        }
    }
    words.retain(|&(_, _, v)| tagged(v));
    (words, strays)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::exec::WriteAccess;
    use crate::fuzz::model::Window;
    use crate::fuzz::program::Op;

    fn bar_write(seq: u64, bar: u8, offset: u64, size: u32, value: u64) -> Event {
        Event {
            seq,
            mono_ns: seq,
            generation: 0,
            kind: EventKind::Bar {
                access: Access::Write,
                bar,
                offset,
                size,
                value: Some(value),
                data: None,
            },
        }
    }

    const V: u64 = 0xf022_0000_0001_0003;

    fn write_record(predicted: Predicted, status: WriteStatus, reset: Option<usize>) -> Record {
        Record {
            index: Some(3),
            op: "write 0 0".into(),
            op_value: Some(Op::Write { mr: 0, word: 0 }),
            predicted,
            window: Some(Window::Reset(ResetKind::Vfio)),
            after: None,
            observed: Observed::Write(WriteAccess {
                value: V,
                bar: 0,
                offset: 0x1008,
                status,
                completed_ns: 100,
                reset,
            }),
            took_ms: 1,
            completed_ns: 100,
            reset,
        }
    }

    fn execution(records: Vec<Record>, events: Vec<Event>, end: Option<u64>) -> Execution {
        Execution {
            records,
            resets: vec![ResetRecord {
                kind: ResetKind::Vfio,
                since_seq: 0,
                device_end_ns: end,
            }],
            events,
            console: String::new(),
            stopped: None,
            healthy: true,
            took_ms: 0,
        }
    }

    #[test]
    fn split_dwords_make_one_word_and_strays_are_reported() {
        let events = [
            bar_write(1, 0, 0x1008, 4, V & 0xffff_ffff),
            bar_write(2, 0, 0x100c, 4, V >> 32),
            bar_write(3, 2, 0x1010, 8, 0x1234),
            bar_write(4, 0, 0x1100, 2, 7),
            bar_write(5, 0, 0x14, 4, 1),
        ];
        let (words, strays) = landed_words(&events);
        assert_eq!(words, [(0, 0x1008, V)]);
        assert_eq!(strays.len(), 2, "{strays:?}");
    }

    #[test]
    fn a_write_that_completes_inside_a_reset_is_a_divergence_bound_to_it() {
        let landed = vec![bar_write(1, 0, 0x1008, 8, V)];
        let inside = execution(
            vec![write_record(
                Predicted::RefusedIfInside,
                WriteStatus::Success,
                Some(0),
            )],
            landed.clone(),
            Some(200),
        );
        let found = judge(&inside, &Default::default());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].op, Some(3));
        assert_eq!(
            found[0].signature,
            "write in reset-vfio: predicted refused, completed and landed"
        );
        // The same write after the device's reset ended: the window may have closed.
        let late = execution(
            vec![write_record(
                Predicted::RefusedIfInside,
                WriteStatus::Success,
                Some(0),
            )],
            landed,
            Some(50),
        );
        assert_eq!(judge(&late, &Default::default()), []);
    }

    #[test]
    fn a_refused_write_must_reach_nothing_and_a_landing_one_exactly_once() {
        let refused = execution(
            vec![write_record(Predicted::Refused, WriteStatus::Refused, None)],
            vec![bar_write(1, 0, 0x1008, 8, V)],
            None,
        );
        let found = judge(&refused, &Default::default());
        assert!(found[0]
            .signature
            .ends_with("predicted refused, refused yet landed"));
        let twice = execution(
            vec![write_record(Predicted::Lands, WriteStatus::Success, None)],
            vec![bar_write(1, 0, 0x1008, 8, V), bar_write(2, 0, 0x1008, 8, V)],
            None,
        );
        assert!(judge(&twice, &Default::default())[0]
            .signature
            .ends_with("landed 2 times"));
        let elsewhere = execution(
            vec![write_record(Predicted::Lands, WriteStatus::Success, None)],
            vec![bar_write(1, 2, 0x1008, 8, V)],
            None,
        );
        assert!(judge(&elsewhere, &Default::default())[0]
            .signature
            .ends_with("landed elsewhere"));
    }

    #[test]
    fn the_console_and_a_dead_guest_are_findings_with_stable_signatures() {
        let mut e = execution(Vec::new(), Vec::new(), None);
        e.console =
            "[   12.3] BUG: kernel NULL pointer dereference, address: 0000000000000008\n".into();
        e.healthy = false;
        let found = judge(&e, &Default::default());
        assert_eq!(
            found[0].signature,
            "console: BUG: kernel NULL pointer dereference, address: N"
        );
        // The crash is the report's finding, not a second one.
        assert_eq!(found.len(), 1, "{found:?}");
        e.console.clear();
        assert_eq!(
            judge(&e, &Default::default())[0].signature,
            "liveness: the guest died"
        );
    }

    #[test]
    fn a_registration_in_a_held_reset_must_fail_only_if_it_provably_ran_inside() {
        let reg = |completed_ns, observed| Record {
            index: Some(2),
            op: "reg 0 1".into(),
            op_value: Some(Op::Reg { mr: 0, buf: 1 }),
            predicted: Predicted::EnodevIfInside,
            window: Some(Window::Reset(ResetKind::Flr)),
            after: None,
            observed,
            took_ms: 0,
            completed_ns,
            reset: Some(0),
        };
        let enodev = || Observed::Errno {
            errno: libc::ENODEV,
            message: String::new(),
        };
        let judged = |completed_ns, observed| {
            judge(
                &execution(vec![reg(completed_ns, observed)], Vec::new(), Some(200)),
                &Default::default(),
            )
        };
        assert_eq!(judged(100, enodev()), []);
        assert_eq!(judged(300, enodev()), []);
        assert_eq!(judged(300, Observed::Ok), []);
        let inside = judged(100, Observed::Ok);
        assert_eq!(
            inside[0].signature,
            format!("reg in reset-flr: predicted errno {}, got ok", libc::ENODEV)
        );
    }

    #[test]
    fn a_wrong_errno_names_both() {
        let record = Record {
            index: Some(0),
            op: "reg 0 0".into(),
            op_value: Some(Op::Reg { mr: 0, buf: 0 }),
            predicted: Predicted::Errno(libc::ENODEV),
            window: None,
            after: Some(Window::DecodeOff),
            observed: Observed::Ok,
            took_ms: 0,
            completed_ns: 0,
            reset: None,
        };
        let found = judge(
            &execution(vec![record], Vec::new(), None),
            &Default::default(),
        );
        assert_eq!(
            found[0].signature,
            format!(
                "reg after decode-off: predicted errno {}, got ok",
                libc::ENODEV
            )
        );
    }
}
