//! The device's event log: a bounded in-memory ring for queries and an append-only JSON-lines
//! trace file for the harness to read after the run.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use p2prig_protocol::device::{DeviceStats, EventFilter};
use p2prig_protocol::event::{Event, EventKind};

/// Reads CLOCK_MONOTONIC in nanoseconds, the clock the harness uses on the same host.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    if rc != 0 {
        return 0;
    }
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}

/// Longest time a `wait_for` may block; a longer request is clamped.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

struct LogInner {
    ring: VecDeque<Event>,
    capacity: usize,
    last_seq: u64,
    generation: u64,
    stats: DeviceStats,
    trace: Option<File>,
}

impl LogInner {
    /// Events with `seq > since`, found by index: sequence numbers in the ring are
    /// contiguous, so no scan of older events (the device thread waits on this lock).
    fn after(&self, since: u64) -> impl Iterator<Item = &Event> {
        let first = self.ring.front().map_or(self.last_seq + 1, |e| e.seq);
        let skip = since.saturating_add(1).saturating_sub(first);
        let start = usize::try_from(skip)
            .unwrap_or(usize::MAX)
            .min(self.ring.len());
        self.ring.range(start..)
    }
}

/// Every event the device records goes through here, in order.
#[derive(Debug)]
pub struct EventLog {
    inner: Mutex<LogInner>,
    arrived: Condvar,
}

impl std::fmt::Debug for LogInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogInner")
            .field("events", &self.ring.len())
            .field("last_seq", &self.last_seq)
            .finish_non_exhaustive()
    }
}

/// Keeps the log locked; see [`EventLog::quiesce`].
pub struct Quiesced<'a>(#[allow(dead_code)] MutexGuard<'a, LogInner>);

impl std::fmt::Debug for Quiesced<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Quiesced")
    }
}

/// What [`EventLog::since`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPage {
    pub events: Vec<Event>,
    pub last_seq: u64,
    pub truncated: bool,
}

impl EventLog {
    /// A log keeping at most `capacity` events in memory (at least 1) and appending every
    /// event to `trace` when given.
    pub fn new(capacity: usize, trace: Option<File>) -> Self {
        Self {
            inner: Mutex::new(LogInner {
                ring: VecDeque::with_capacity(capacity.clamp(1, 1 << 16)),
                capacity: capacity.max(1),
                last_seq: 0,
                generation: 0,
                stats: DeviceStats::default(),
                trace,
            }),
            arrived: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        // A panic while holding this lock cannot leave the ring inconsistent (every update is
        // a push plus counter increments), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records one event stamped with the current generation and clock; returns its sequence.
    pub fn record(&self, kind: EventKind) -> u64 {
        let mut inner = self.lock();
        inner.last_seq += 1;
        let event = Event {
            seq: inner.last_seq,
            mono_ns: monotonic_ns(),
            generation: inner.generation,
            kind,
        };
        count(&mut inner.stats, &event.kind);
        inner.stats.events += 1;
        if let Some(trace) = inner.trace.as_mut() {
            let mut line = serde_json::to_vec(&event).unwrap_or_default();
            line.push(b'\n');
            // One write per line on an unbuffered file: the line is in the file as soon as
            // the event exists, so a harness reading the trace after a kill loses nothing.
            if trace.write_all(&line).is_err() {
                inner.stats.trace_errors += 1;
            }
        }
        if inner.ring.len() >= inner.capacity {
            inner.ring.pop_front();
            inner.stats.dropped_events += 1;
        }
        let seq = event.seq;
        inner.ring.push_back(event);
        drop(inner);
        self.arrived.notify_all();
        seq
    }

    /// Starts a new reset generation; later events carry it.
    pub fn bump_generation(&self) -> u64 {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.stats.generation = inner.generation;
        inner.generation
    }

    /// The current reset generation.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Sequence number of the newest event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.lock().last_seq
    }

    /// Events with `seq > since`, oldest first, at most `limit`.
    pub fn since(&self, since: u64, limit: usize) -> EventPage {
        let inner = self.lock();
        let oldest = inner.ring.front().map_or(inner.last_seq + 1, |e| e.seq);
        // Events since+1 .. oldest-1 existed but are gone from the ring.
        let truncated = since.saturating_add(1) < oldest;
        let events = inner.after(since).take(limit).cloned().collect();
        EventPage {
            events,
            last_seq: inner.last_seq,
            truncated,
        }
    }

    /// Holds the log still: no event can be recorded (or half-written to the trace) until
    /// the guard is dropped. Used right before the process exits.
    pub fn quiesce(&self) -> Quiesced<'_> {
        Quiesced(self.lock())
    }

    /// Counters so far.
    pub fn stats(&self) -> DeviceStats {
        self.lock().stats.clone()
    }

    /// Blocks until an event with `seq > since` matches `filter` or `timeout` passes; returns
    /// the event (if any) and the newest sequence number.
    pub fn wait_for(
        &self,
        filter: &EventFilter,
        since: u64,
        timeout: Duration,
    ) -> (Option<Event>, u64) {
        let deadline = Instant::now() + timeout.min(MAX_WAIT);
        let mut inner = self.lock();
        let mut checked = since;
        loop {
            if let Some(found) = inner.after(checked).find(|e| matches(filter, e)) {
                return (Some(found.clone()), inner.last_seq);
            }
            checked = checked.max(inner.last_seq);
            let now = Instant::now();
            if now >= deadline {
                return (None, inner.last_seq);
            }
            inner = match self.arrived.wait_timeout(inner, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

fn count(stats: &mut DeviceStats, kind: &EventKind) {
    use p2prig_protocol::event::Access;
    match kind {
        EventKind::Bar {
            access: Access::Read,
            ..
        } => stats.bar_reads += 1,
        EventKind::Bar {
            access: Access::Write,
            ..
        } => stats.bar_writes += 1,
        EventKind::ConfigWrite { .. } => stats.config_writes += 1,
        EventKind::ResetStart { .. } => stats.resets += 1,
        EventKind::Violation { .. } => stats.violations += 1,
        EventKind::Client { connected: true } => stats.connections += 1,
        EventKind::BadRequest { .. } => stats.bad_requests += 1,
        _ => {}
    }
}

/// Whether `event` passes every condition of `filter`.
pub fn matches(filter: &EventFilter, event: &Event) -> bool {
    if let Some(kind) = &filter.kind {
        if kind != event.kind.name() {
            return false;
        }
    }
    let (bar, offset, access, value) = match &event.kind {
        EventKind::Bar {
            access,
            bar,
            offset,
            value,
            ..
        }
        | EventKind::Violation {
            access,
            bar,
            offset,
            value,
            ..
        } => (Some(*bar), Some(*offset), Some(*access), *value),
        EventKind::ConfigWrite { offset, value, .. } => (None, Some(*offset), None, Some(*value)),
        _ => (None, None, None, None),
    };
    (filter.bar.is_none() || filter.bar == bar)
        && (filter.offset.is_none() || filter.offset == offset)
        && (filter.access.is_none() || filter.access == access)
        && (filter.value.is_none() || filter.value == value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2prig_protocol::event::Access;

    fn bar_write(offset: u64, value: u64) -> EventKind {
        EventKind::Bar {
            access: Access::Write,
            bar: 0,
            offset,
            size: 4,
            value: Some(value),
            data: None,
        }
    }

    #[test]
    fn sequence_numbers_start_at_one_and_increase() {
        let log = EventLog::new(8, None);
        assert_eq!(log.record(bar_write(0x1000, 1)), 1);
        assert_eq!(log.record(bar_write(0x1000, 2)), 2);
        let page = log.since(0, 100);
        assert_eq!(page.events.len(), 2);
        assert!(page.events[0].mono_ns <= page.events[1].mono_ns);
        assert!(!page.truncated);
    }

    #[test]
    fn ring_drops_oldest_and_reports_truncation() {
        let log = EventLog::new(2, None);
        for v in 0..5 {
            log.record(bar_write(0x1000, v));
        }
        let page = log.since(0, 100);
        assert!(page.truncated);
        assert_eq!(
            page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [4, 5]
        );
        assert!(!log.since(3, 100).truncated);
        assert_eq!(log.stats().dropped_events, 3);
    }

    #[test]
    fn limit_bounds_the_page() {
        let log = EventLog::new(16, None);
        for v in 0..5 {
            log.record(bar_write(0x1000, v));
        }
        let page = log.since(1, 2);
        assert_eq!(
            page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [2, 3]
        );
        assert_eq!(page.last_seq, 5);
    }

    #[test]
    fn generation_stamps_later_events() {
        let log = EventLog::new(16, None);
        log.record(bar_write(0, 0));
        log.bump_generation();
        log.record(bar_write(0, 0));
        let page = log.since(0, 10);
        assert_eq!(page.events[0].generation, 0);
        assert_eq!(page.events[1].generation, 1);
    }

    #[test]
    fn filter_matches_kind_offset_and_value() {
        let log = EventLog::new(16, None);
        log.record(bar_write(0x1008, 7));
        let event = &log.since(0, 1).events[0];
        let mut filter = EventFilter {
            kind: Some("bar".into()),
            offset: Some(0x1008),
            value: Some(7),
            ..Default::default()
        };
        assert!(matches(&filter, event));
        filter.value = Some(8);
        assert!(!matches(&filter, event));
        let reset = EventFilter {
            kind: Some("reset_end".into()),
            ..Default::default()
        };
        assert!(!matches(&reset, event));
    }

    #[test]
    fn wait_for_returns_an_event_recorded_later_by_another_thread() {
        let log = std::sync::Arc::new(EventLog::new(16, None));
        let writer = log.clone();
        let handle = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            writer.record(EventKind::ResetEnd {
                cause: "flr".into(),
            });
        });
        let filter = EventFilter {
            kind: Some("reset_end".into()),
            ..Default::default()
        };
        let (event, _) = log.wait_for(&filter, 0, Duration::from_secs(5));
        assert!(handle.join().is_ok());
        assert_eq!(event.map(|e| e.seq), Some(1));
    }

    #[test]
    fn wait_for_times_out_without_a_match() {
        let log = EventLog::new(16, None);
        log.record(bar_write(0, 0));
        let filter = EventFilter {
            kind: Some("violation".into()),
            ..Default::default()
        };
        let (event, last) = log.wait_for(&filter, 0, Duration::from_millis(10));
        assert!(event.is_none());
        assert_eq!(last, 1);
    }

    #[test]
    fn trace_file_gets_one_json_line_per_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("trace.jsonl");
        let file = File::create(&path).expect("create");
        let log = EventLog::new(16, Some(file));
        log.record(bar_write(0x1000, 3));
        log.record(EventKind::Decode { enabled: true });
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let event: Event = serde_json::from_str(lines[0]).expect("json");
        assert_eq!(event.seq, 1);
    }
}
