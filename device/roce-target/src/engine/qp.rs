//! Queue pairs and what hangs off them: work requests, completion queues, retry budgets, and
//! the transitions that complete, flush or fail them (IBTA 9.7, 10.3).

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2prig_protocol::target::{
    Completion, CompletionOpcode, CompletionStatus, QpSettings, QpStateName, QpStatus, Sge,
};

use crate::headers::{psn_add, psn_within, NAK_INVALID_REQUEST, NAK_REMOTE_ACCESS, PSN_MASK};

use super::*;

/// A retry counter: `take` spends one retry and says whether there was one to spend; a limit
/// of [`INFINITE_RETRIES`] never runs out. Progress (an ACK) refills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RetryBudget {
    limit: u8,
    left: u8,
}

impl RetryBudget {
    pub(super) fn new(limit: u8) -> Self {
        let limit = limit.min(INFINITE_RETRIES);
        Self { limit, left: limit }
    }

    pub(super) fn take(&mut self) -> bool {
        if self.limit == INFINITE_RETRIES {
            return true;
        }
        match self.left.checked_sub(1) {
            Some(left) => {
                self.left = left;
                true
            }
            None => false,
        }
    }

    pub(super) fn refill(&mut self) {
        self.left = self.limit;
    }

    pub(super) fn limit(self) -> u8 {
        self.limit
    }
}

/// A posted send-queue work request and the PSNs it took.
#[derive(Debug, Clone)]
pub(super) struct SendWqe {
    pub(super) wr_id: u64,
    pub(super) op: WqeOp,
    pub(super) length: u32,
    pub(super) first_psn: u32,
    pub(super) packets: u32,
    /// READ: response packets received in order so far.
    pub(super) read_done: u32,
}

/// The bytes of a posted WRITE or SEND, copied at post time and counted in the engine's
/// queued bytes (see [`MAX_QUEUED_BYTES`]) for as long as they exist: whichever way the WQE
/// goes (acknowledged, failed, flushed, its QP reset or destroyed), dropping it gives the
/// room back.
#[derive(Debug)]
pub(super) struct Snapshot {
    bytes: Vec<u8>,
    queued: Arc<AtomicU64>,
}

impl Snapshot {
    pub(super) fn new(bytes: Vec<u8>, queued: &Arc<AtomicU64>) -> Self {
        queued.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Self {
            bytes,
            queued: Arc::clone(queued),
        }
    }
}

/// A snapshot counted by a counter of its own (for tests that build WQEs by hand).
#[cfg(test)]
impl From<Vec<u8>> for Snapshot {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes, &Arc::default())
    }
}

impl Deref for Snapshot {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Clone for Snapshot {
    fn clone(&self) -> Self {
        Self::new(self.bytes.clone(), &self.queued)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.queued
            .fetch_sub(self.bytes.len() as u64, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone)]
pub(super) enum WqeOp {
    /// A SEND, or a WRITE when `write` names where. The data is copied at post time (a
    /// snapshot, so a later MR change or deregistration cannot make a retransmission differ
    /// from the first try).
    Message {
        write: Option<RemoteBuffer>,
        imm: Option<u32>,
        data: Snapshot,
    },
    Read {
        remote: RemoteBuffer,
        local: Sge,
    },
}

impl SendWqe {
    pub(super) fn last_psn(&self) -> u32 {
        psn_add(self.first_psn, self.packets - 1)
    }

    pub(super) fn end_psn(&self) -> u32 {
        psn_add(self.first_psn, self.packets)
    }

    pub(super) fn contains(&self, psn: u32) -> bool {
        psn_within(psn, self.first_psn, self.packets)
    }

    pub(super) fn is_read(&self) -> bool {
        matches!(self.op, WqeOp::Read { .. })
    }

    pub(super) fn opcode(&self) -> CompletionOpcode {
        match self.op {
            WqeOp::Message { write: Some(_), .. } => CompletionOpcode::Write,
            WqeOp::Message { write: None, .. } => CompletionOpcode::Send,
            WqeOp::Read { .. } => CompletionOpcode::Read,
        }
    }

    /// Its completion; only a successful one reports the length.
    pub(super) fn completion(
        &self,
        qpn: u32,
        status: CompletionStatus,
        nak_code: Option<u8>,
    ) -> Completion {
        Completion {
            qpn,
            wr_id: self.wr_id,
            opcode: self.opcode(),
            status,
            nak_code,
            byte_len: if status == CompletionStatus::Success {
                self.length
            } else {
                0
            },
            imm: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct RecvWqe {
    pub(super) wr_id: u64,
    pub(super) local: Sge,
}

impl RecvWqe {
    /// A plain receive's completion with nothing received; a responder that did receive
    /// fills in the length, the immediate and the opcode.
    pub(super) fn completion(&self, qpn: u32, status: CompletionStatus) -> Completion {
        Completion {
            qpn,
            wr_id: self.wr_id,
            opcode: CompletionOpcode::Recv,
            status,
            nak_code: None,
            byte_len: 0,
            imm: None,
        }
    }
}

/// A multi-packet message the responder is in the middle of (IBTA 9.7.5.1.1 opcode
/// sequence checks).
#[derive(Debug, Clone, Copy)]
pub(super) enum InProgress {
    Send {
        received: u32,
    },
    Write {
        key: u32,
        offset: u64,
        total: u32,
        received: u32,
    },
}

/// An executed READ request, kept to replay on a duplicate (IBTA 9.7.5.1.6).
#[derive(Debug, Clone, Copy)]
pub(super) struct ReadRecord {
    pub(super) first_psn: u32,
    pub(super) packets: u32,
    pub(super) va: u64,
    pub(super) rkey: u32,
    pub(super) length: u32,
}

impl ReadRecord {
    pub(super) fn contains(&self, psn: u32) -> bool {
        psn_within(psn, self.first_psn, self.packets)
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Remote {
    pub(super) qpn: u32,
    pub(super) ip: Ipv4Addr,
}

const RETRY_RANGE: &str = "a retry count is 3 bits, 0 to 7 (7 = retry for ever)";
/// Largest RNR timer code (5 bits of the AETH syndrome, IBTA 9.7.5.2.8).
const MAX_RNR_TIMER: u8 = 0x1F;

/// `value` if it is at most `max`, else the error naming the field and its range.
fn in_range(
    field: &'static str,
    value: Option<u8>,
    max: u8,
    range: &'static str,
) -> Result<Option<u8>, EngineError> {
    match value {
        Some(value) if value > max => Err(EngineError::OutOfRange {
            field,
            value: u32::from(value),
            range,
        }),
        _ => Ok(value),
    }
}

#[derive(Debug)]
pub(super) struct Qp {
    pub(super) qpn: u32,
    pub(super) state: QpStateName,
    pub(super) pmtu: u32,
    pub(super) ack_timeout: Duration,
    /// Transport retries (retry_cnt: ACK timeouts and PSN-sequence NAKs).
    pub(super) retries: RetryBudget,
    /// RNR NAK retries (rnr_retry).
    pub(super) rnr_retries: RetryBudget,
    pub(super) min_rnr_timer: u8,
    pub(super) max_rd_atomic: u8,
    pub(super) initial_psn: u32,
    pub(super) udp_sport: u16,
    pub(super) remote: Option<Remote>,
    // Requester (IBTA 9.7.4, 9.7.5.2).
    pub(super) next_psn: u32,
    pub(super) send_psn: u32,
    /// One past the highest PSN ever sent; anything sent below it is a retransmission.
    pub(super) sent_high: u32,
    pub(super) una: u32,
    pub(super) wqes: VecDeque<SendWqe>,
    pub(super) timer_start: Option<Instant>,
    pub(super) rnr_until: Option<Instant>,
    // Responder (IBTA 9.7.5.1).
    pub(super) epsn: u32,
    pub(super) msn: u32,
    pub(super) seq_nak_sent: bool,
    pub(super) in_progress: Option<InProgress>,
    pub(super) recvs: VecDeque<RecvWqe>,
    pub(super) reads: VecDeque<ReadRecord>,
}

impl Qp {
    pub(super) fn new(qpn: u32, settings: &QpSettings, psn: u32) -> Result<Self, EngineError> {
        let pmtu = settings.path_mtu.unwrap_or(1024);
        if crate::headers::mtu_enum(pmtu).is_none() {
            return Err(EngineError::BadPathMtu(pmtu));
        }
        let psn = psn & PSN_MASK;
        // Refused rather than clamped: retry_cnt 8 clamped to 7 would mean "for ever".
        let retry_cnt = in_range(
            "retry_cnt",
            settings.retry_cnt,
            INFINITE_RETRIES,
            RETRY_RANGE,
        )?;
        let rnr_retry = in_range(
            "rnr_retry",
            settings.rnr_retry,
            INFINITE_RETRIES,
            RETRY_RANGE,
        )?;
        let min_rnr_timer = in_range(
            "min_rnr_timer",
            settings.min_rnr_timer,
            MAX_RNR_TIMER,
            "the RNR timer is a 5-bit code, 0 to 31 (IBTA table 45)",
        )?;
        Ok(Self {
            qpn,
            state: QpStateName::Init,
            pmtu,
            ack_timeout: Duration::from_millis(settings.ack_timeout_ms.unwrap_or(100).max(1)),
            retries: RetryBudget::new(retry_cnt.unwrap_or(INFINITE_RETRIES)),
            rnr_retries: RetryBudget::new(rnr_retry.unwrap_or(INFINITE_RETRIES)),
            min_rnr_timer: min_rnr_timer.unwrap_or(1),
            max_rd_atomic: settings.max_rd_atomic.unwrap_or(1).max(1),
            initial_psn: psn,
            // rdma_get_udp_sport-like: 0xC000 plus a per-QP hash (Annex A17.2.3).
            udp_sport: 0xC000 | ((qpn.wrapping_mul(0x9E37) >> 2) as u16 & 0x3FFF),
            remote: None,
            next_psn: psn,
            send_psn: psn,
            sent_high: psn,
            una: psn,
            wqes: VecDeque::new(),
            timer_start: None,
            rnr_until: None,
            epsn: 0,
            msn: 0,
            seq_nak_sent: false,
            in_progress: None,
            recvs: VecDeque::new(),
            reads: VecDeque::new(),
        })
    }

    pub(super) fn wqe_index(&self, psn: u32) -> Option<usize> {
        self.wqes.iter().position(|w| w.contains(psn))
    }

    /// The error for an operation the QP's state does not allow.
    pub(super) fn bad_state(&self, needed: &'static str) -> EngineError {
        EngineError::BadState {
            qpn: self.qpn,
            state: self.state,
            needed,
        }
    }

    /// Pops the oldest WQE, if there is one, and completes it with `status`.
    pub(super) fn complete_head(
        &mut self,
        shared: &mut Shared,
        status: CompletionStatus,
        nak_code: Option<u8>,
    ) {
        if let Some(wqe) = self.wqes.pop_front() {
            shared.complete(wqe.completion(self.qpn, status, nak_code));
        }
    }

    /// Fails the oldest WQE with `status` and moves the QP to ERROR.
    pub(super) fn fail_head(
        &mut self,
        shared: &mut Shared,
        status: CompletionStatus,
        nak_code: Option<u8>,
    ) {
        self.complete_head(shared, status, nak_code);
        self.enter_error(shared);
    }

    pub(super) fn enter_error(&mut self, shared: &mut Shared) {
        self.state = QpStateName::Error;
        self.flush(shared);
    }

    /// Every outstanding WQE and receive completes as flushed (IBTA 10.3.1.5: ERROR state).
    pub(super) fn flush(&mut self, shared: &mut Shared) {
        while let Some(wqe) = self.wqes.pop_front() {
            shared.complete(wqe.completion(self.qpn, CompletionStatus::Flushed, None));
        }
        while let Some(recv) = self.recvs.pop_front() {
            shared.complete(recv.completion(self.qpn, CompletionStatus::Flushed));
        }
        self.timer_start = None;
        self.rnr_until = None;
        self.in_progress = None;
    }

    pub(super) fn status(&self) -> QpStatus {
        QpStatus {
            qpn: self.qpn,
            state: self.state,
            remote_qpn: self.remote.map(|r| r.qpn),
            sq_psn: self.next_psn,
            unacked_psn: self.una,
            expected_psn: self.epsn,
            msn: self.msn,
            pending_wqes: self.wqes.len() as u32,
            posted_recvs: self.recvs.len() as u32,
        }
    }
}

/// Completions waiting to be polled, bounded.
#[derive(Debug, Default)]
pub(super) struct CompletionQueue {
    pub(super) entries: VecDeque<Completion>,
}

impl Shared {
    /// Queues a completion, dropping the oldest (and counting it) when the queue is full.
    pub(super) fn complete(&mut self, completion: Completion) {
        let stats = &mut self.wire.stats;
        if self.cq.entries.len() >= MAX_COMPLETIONS {
            self.cq.entries.pop_front();
            stats.completions_dropped += 1;
        }
        stats.completions += 1;
        self.cq.entries.push_back(completion);
    }
}

pub(super) fn nak_status(code: u8) -> CompletionStatus {
    match code {
        NAK_INVALID_REQUEST => CompletionStatus::RemoteInvalidRequest,
        NAK_REMOTE_ACCESS => CompletionStatus::RemoteAccessError,
        _ => CompletionStatus::RemoteOperationError,
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{connected_qp, queue_send, shared};
    use super::*;

    #[test]
    fn a_retry_budget_spends_its_limit_then_refuses_until_refilled() {
        let mut budget = RetryBudget::new(2);
        assert!(budget.take() && budget.take());
        assert!(!budget.take(), "a third retry of two");
        assert!(!budget.take());
        budget.refill();
        assert!(budget.take());
        assert_eq!(budget.limit(), 2);
        let mut none = RetryBudget::new(0);
        assert!(!none.take(), "retry_cnt 0: the first timeout fails the WQE");
    }

    #[test]
    fn seven_retries_mean_forever_and_larger_limits_are_clamped() {
        let mut forever = RetryBudget::new(INFINITE_RETRIES);
        assert!((0..1000).all(|_| forever.take()));
        assert_eq!(RetryBudget::new(200).limit(), INFINITE_RETRIES);
    }

    #[test]
    fn out_of_range_retry_counts_and_rnr_timers_are_refused_not_clamped() {
        for settings in [
            QpSettings {
                retry_cnt: Some(8),
                ..Default::default()
            },
            QpSettings {
                rnr_retry: Some(8),
                ..Default::default()
            },
            QpSettings {
                min_rnr_timer: Some(32),
                ..Default::default()
            },
        ] {
            let error = Qp::new(0x11, &settings, 0).expect_err("refused");
            assert!(
                matches!(error, EngineError::OutOfRange { .. }),
                "{settings:?}: {error}"
            );
        }
        let edge = QpSettings {
            retry_cnt: Some(7),
            rnr_retry: Some(0),
            min_rnr_timer: Some(31),
            ..Default::default()
        };
        let qp = Qp::new(0x11, &edge, 0).expect("in range");
        assert_eq!((qp.retries.limit(), qp.rnr_retries.limit()), (7, 0));
        assert_eq!(qp.min_rnr_timer, 31);
    }

    #[test]
    fn a_snapshot_counts_its_bytes_until_it_and_its_clones_are_dropped() {
        let queued = Arc::new(AtomicU64::new(0));
        let snapshot = Snapshot::new(vec![1; 100], &queued);
        let copy = snapshot.clone();
        assert_eq!(queued.load(Ordering::Relaxed), 200);
        drop(snapshot);
        assert_eq!(&copy[..3], &[1, 1, 1]);
        drop(copy);
        assert_eq!(queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_request_owns_its_psns_across_the_wrap() {
        let mut qp = connected_qp(&QpSettings::default(), 0xFFFFFF);
        queue_send(&mut qp, 1, 3000);
        let wqe = &qp.wqes[0];
        assert_eq!((wqe.packets, wqe.last_psn(), wqe.end_psn()), (3, 1, 2));
        assert!(wqe.contains(0xFFFFFF) && wqe.contains(1) && !wqe.contains(2));
        assert_eq!(qp.wqe_index(0), Some(0));
        assert_eq!(qp.next_psn, 2);
    }

    #[test]
    fn failing_the_head_flushes_the_rest_and_the_receives() {
        let (mut shared, _link) = shared();
        let mut qp = connected_qp(&QpSettings::default(), 0);
        queue_send(&mut qp, 1, 8);
        queue_send(&mut qp, 2, 8);
        qp.recvs.push_back(RecvWqe {
            wr_id: 3,
            local: Sge::default(),
        });
        qp.timer_start = Some(Instant::now());
        qp.fail_head(&mut shared, CompletionStatus::RemoteAccessError, Some(0x62));
        let done: Vec<_> = shared
            .cq
            .entries
            .iter()
            .map(|c| (c.wr_id, c.opcode, c.status, c.nak_code))
            .collect();
        assert_eq!(
            done,
            [
                (
                    1,
                    CompletionOpcode::Send,
                    CompletionStatus::RemoteAccessError,
                    Some(0x62)
                ),
                (2, CompletionOpcode::Send, CompletionStatus::Flushed, None),
                (3, CompletionOpcode::Recv, CompletionStatus::Flushed, None),
            ]
        );
        assert_eq!(qp.state, QpStateName::Error);
        assert!(qp.wqes.is_empty() && qp.recvs.is_empty() && qp.timer_start.is_none());
    }

    #[test]
    fn a_full_completion_queue_drops_its_oldest_and_counts_it() {
        let (mut shared, _link) = shared();
        let recv = RecvWqe {
            wr_id: 0,
            local: Sge::default(),
        };
        for wr_id in 0..=MAX_COMPLETIONS as u64 {
            shared.complete(Completion {
                wr_id,
                ..recv.completion(1, CompletionStatus::Success)
            });
        }
        assert_eq!(shared.cq.entries.len(), MAX_COMPLETIONS);
        assert_eq!(shared.cq.entries.front().map(|c| c.wr_id), Some(1));
        assert_eq!(shared.wire.stats.completions_dropped, 1);
        assert_eq!(shared.wire.stats.completions, MAX_COMPLETIONS as u64 + 1);
    }

    #[test]
    fn nak_codes_map_to_completion_statuses() {
        assert_eq!(
            nak_status(NAK_INVALID_REQUEST),
            CompletionStatus::RemoteInvalidRequest
        );
        assert_eq!(
            nak_status(NAK_REMOTE_ACCESS),
            CompletionStatus::RemoteAccessError
        );
        assert_eq!(nak_status(0x63), CompletionStatus::RemoteOperationError);
    }
}
