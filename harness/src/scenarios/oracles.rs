//! The device-side oracle: pure functions over nvme-cmb's event log, unit-tested without a VM.
//! Every scenario that asks "did exactly this write reach the device" asks it here, so smoke's
//! guest store and the RDMA writes of the P2P scenarios are judged by one rule.

use p2prig_protocol::agent::Completion;
use p2prig_protocol::event::{Access, Event, EventKind};
use p2prig_protocol::target::{Completion as TargetCompletion, CompletionStatus};

/// `enum ibv_wc_status` (infiniband/verbs.h): IBV_WC_SUCCESS, IBV_WC_WR_FLUSH_ERR and
/// IBV_WC_REM_ACCESS_ERR.
const IBV_WC_SUCCESS: u32 = 0;
const IBV_WC_WR_FLUSH_ERR: u32 = 5;
const IBV_WC_REM_ACCESS_ERR: u32 = 10;
/// The AETH syndrome of a remote-access-error NAK (IBTA 9.7.5.2: NAK code 2, 0b011_00010).
const NAK_REMOTE_ACCESS: u8 = 0x62;

/// The guest's work request completed successfully.
pub fn wc_succeeded(wc: &Option<Completion>) -> bool {
    matches!(wc, Some(c) if c.status == IBV_WC_SUCCESS)
}

/// The guest's work request was flushed: its QP went to the error state before it completed.
pub fn wc_flushed(wc: &Option<Completion>) -> bool {
    matches!(wc, Some(c) if c.status == IBV_WC_WR_FLUSH_ERR)
}

/// The guest's work request was refused by the responder (a revoked or dead MR).
pub fn wc_remote_access_error(wc: &Option<Completion>) -> bool {
    matches!(wc, Some(c) if c.status == IBV_WC_REM_ACCESS_ERR)
}

/// roce-target's work request was ACKed.
pub fn target_acked(wc: &Option<TargetCompletion>) -> bool {
    matches!(wc, Some(c) if c.status == CompletionStatus::Success)
}

/// roce-target's work request was NAKed with a remote access error, as a revoked MR must be.
pub fn target_nak_remote_access(wc: &Option<TargetCompletion>) -> bool {
    matches!(wc, Some(c) if c.status == CompletionStatus::RemoteAccessError
        && c.nak_code == Some(NAK_REMOTE_ACCESS))
}

/// BAR0's doorbell page (NVMe 1.4 section 3.1: doorbells start at 0x1000 with CAP.DSTRD 0).
pub const DOORBELL_PAGE: std::ops::Range<u64> = 0x1000..0x2000;

/// Events in BAR0's doorbell page: accesses, and violations (accesses refused by a window).
pub fn in_doorbell_page(event: &Event) -> bool {
    matches!(&event.kind,
        EventKind::Bar { bar: 0, offset, .. } | EventKind::Violation { bar: 0, offset, .. }
            if DOORBELL_PAGE.contains(offset))
}

/// What BAR write events put into `[offset, offset + width)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The little-endian value of the range, if every byte of it was written.
    pub value: Option<u64>,
    /// No byte of the range was written twice.
    pub once: bool,
    /// Every event was a write inside the range (nothing stray, no violation).
    pub only_these: bool,
}

impl Written {
    /// Exactly `value` landed, each byte once, and nothing else happened.
    pub fn exactly(self, value: u64) -> bool {
        self.value == Some(value) && self.once && self.only_these
    }
}

/// One write of the whole range, or pieces of it (rxe may split an 8-byte copy into two
/// dwords), judged byte by byte; `width` is at most 8.
pub fn written(events: &[Event], offset: u64, width: u64) -> Written {
    let width = width.min(8);
    let mut bytes = [None::<u8>; 8];
    let mut once = true;
    let mut only_these = true;
    for e in events {
        match &e.kind {
            EventKind::Bar {
                access: Access::Write,
                offset: o,
                size,
                value: Some(v),
                ..
            } if *o >= offset && *o + u64::from(*size) <= offset + width => {
                for i in 0..*size as usize {
                    let slot = &mut bytes[(*o - offset) as usize + i];
                    once &= slot.is_none();
                    *slot = Some((v >> (8 * i)) as u8);
                }
            }
            _ => only_these = false,
        }
    }
    let value = bytes[..width as usize]
        .iter()
        .enumerate()
        .try_fold(0u64, |acc, (i, b)| b.map(|b| acc | u64::from(b) << (8 * i)));
    Written {
        value,
        once,
        only_these,
    }
}

/// The events, for a check's detail.
pub fn describe(events: &[Event]) -> String {
    serde_json::to_string(events).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, access: Access, offset: u64, size: u32, value: u64) -> Event {
        Event {
            seq,
            mono_ns: seq,
            generation: 0,
            kind: EventKind::Bar {
                access,
                bar: 0,
                offset,
                size,
                value: Some(value),
                data: None,
            },
        }
    }

    fn write(seq: u64, offset: u64, size: u32, value: u64) -> Event {
        event(seq, Access::Write, offset, size, value)
    }

    #[test]
    fn one_qword_or_two_dwords_make_the_same_value() {
        assert!(written(&[write(1, 0x1008, 8, 7)], 0x1008, 8).exactly(7));
        assert!(written(&[write(1, 0x1008, 4, 7), write(2, 0x100c, 4, 0)], 0x1008, 8).exactly(7));
        assert!(written(&[write(4, 0x1000, 4, 5)], 0x1000, 4).exactly(5));
    }

    #[test]
    fn missing_partial_duplicate_wrong_or_stray_writes_do_not_count() {
        assert_eq!(written(&[], 0x1000, 4).value, None, "nothing arrived");
        assert!(!written(&[], 0x1000, 4).exactly(0));
        assert_eq!(
            written(&[write(1, 0x1008, 4, 7)], 0x1008, 8).value,
            None,
            "upper half missing"
        );
        let twice = written(&[write(1, 0x1000, 4, 5), write(2, 0x1000, 4, 5)], 0x1000, 4);
        assert_eq!(twice.value, Some(5));
        assert!(!twice.once && !twice.exactly(5), "the same write twice");
        assert!(
            !written(&[write(1, 0x1000, 4, 6)], 0x1000, 4).exactly(5),
            "wrong value"
        );
        assert!(
            !written(&[write(1, 0x1000, 2, 5)], 0x1000, 4).exactly(5),
            "half the width"
        );
        let stray = written(&[write(1, 0x1008, 8, 7), write(2, 0x1000, 4, 1)], 0x1008, 8);
        assert_eq!(stray.value, Some(7));
        assert!(!stray.only_these, "a write to SQ0TDBL is a stray access");
        let read = written(
            &[write(1, 0x1000, 4, 5), event(2, Access::Read, 0x1008, 4, 0)],
            0x1000,
            4,
        );
        assert!(!read.exactly(5), "a stray read in the page");
    }

    #[test]
    fn completions_are_judged_by_status_and_nak_code() {
        let wc = |status| {
            Some(Completion {
                wr_id: 1,
                status,
                status_name: String::new(),
                vendor_err: 0,
                opcode: 1,
                opcode_name: String::new(),
                byte_len: 8,
                qp_num: 17,
            })
        };
        assert!(wc_succeeded(&wc(0)) && !wc_succeeded(&wc(10)) && !wc_succeeded(&None));
        assert!(wc_remote_access_error(&wc(10)));
        assert!(
            !wc_remote_access_error(&wc(12)),
            "retry exceeded is not a refusal"
        );
        assert!(
            !wc_remote_access_error(&None),
            "no completion is not a refusal"
        );
        let target = |status, nak_code| {
            Some(TargetCompletion {
                qpn: 17,
                wr_id: 1,
                opcode: p2prig_protocol::target::CompletionOpcode::Write,
                status,
                nak_code,
                byte_len: 8,
                imm: None,
            })
        };
        assert!(target_acked(&target(CompletionStatus::Success, None)));
        assert!(!target_acked(&None));
        assert!(target_nak_remote_access(&target(
            CompletionStatus::RemoteAccessError,
            Some(0x62)
        )));
        assert!(
            !target_nak_remote_access(&target(CompletionStatus::RemoteAccessError, Some(0x63))),
            "a remote operational error is another NAK"
        );
        assert!(!target_nak_remote_access(&target(
            CompletionStatus::Success,
            None
        )));
    }

    #[test]
    fn only_doorbell_page_events_are_considered() {
        assert!(in_doorbell_page(&write(1, 0x1ffc, 4, 0)));
        assert!(
            !in_doorbell_page(&write(1, 0x14, 4, 0)),
            "CC register is page 0"
        );
        assert!(!in_doorbell_page(&write(1, 0x2000, 4, 0)));
    }
}
