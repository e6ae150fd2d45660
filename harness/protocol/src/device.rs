//! nvme-cmb's control socket.
//!
//! One request per line, one reply per request (see [`crate::wire`]). Examples:
//! `{"id":1,"op":"events_since","since":0,"limit":100}`,
//! `{"id":2,"op":"wait_for","filter":{"kind":"reset_end"},"timeout_ms":2000}`,
//! `{"id":3,"op":"cmb_fill","offset":0,"length":4096,"pattern_hex":"a5"}`.

use serde::{Deserialize, Serialize};

use crate::event::{Access, Event};

/// A request on nvme-cmb's control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DeviceOp {
    /// Events with `seq > since`, oldest first, at most `limit`.
    EventsSince { since: u64, limit: Option<u32> },
    /// Counters.
    Stats,
    /// Current config space and controller registers.
    Registers,
    /// `length` bytes of the CMB from `offset` (at most 1 MiB per request).
    CmbRead { offset: u64, length: u32 },
    /// Fill `length` bytes of the CMB from `offset` with `pattern_hex` repeated (whole CMB
    /// when `length` is absent).
    CmbFill {
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        length: Option<u64>,
        pattern_hex: String,
    },
    /// How long every later reset lasts (accesses inside the window are violations).
    SetResetDuration { ms: u64 },
    /// How long after CC.EN 0 -> 1 CSTS.RDY becomes 1.
    SetReadyDelay { ms: u64 },
    /// Block until an event with `seq > since` (default: the newest event at the time of the
    /// request) matches `filter`, or `timeout_ms` passes (capped at 10 minutes).
    WaitFor {
        #[serde(default)]
        filter: EventFilter,
        #[serde(default)]
        since: Option<u64>,
        timeout_ms: u64,
    },
}

/// Which events a `wait_for` accepts; every field that is present must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventFilter {
    /// The event's `kind` tag: bar, config_write, decode, reset_start, reset_end, violation,
    /// client, bad_request, power_state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// BAR (or region) index of a bar or violation event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bar: Option<u8>,
    /// Offset of a bar, violation or config_write event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Direction of a bar or violation event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
    /// Value of a bar, violation or config_write event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<u64>,
}

/// Replies, one variant per [`DeviceOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceReply {
    Events {
        events: Vec<Event>,
        /// Sequence number of the newest event recorded so far.
        last_seq: u64,
        /// True when events after `since` were dropped from the bounded ring.
        truncated: bool,
    },
    Stats(DeviceStats),
    Registers(RegisterDump),
    /// CMB contents as lowercase hex.
    CmbData {
        offset: u64,
        data_hex: String,
    },
    /// The request was carried out.
    Done,
    /// Answer to `wait_for`: the first matching event, or `None` when the timeout passed.
    WaitResult {
        event: Option<Event>,
        last_seq: u64,
    },
}

/// Device counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    pub events: u64,
    pub bar_reads: u64,
    pub bar_writes: u64,
    pub config_writes: u64,
    pub resets: u64,
    pub violations: u64,
    pub connections: u64,
    pub generation: u64,
    /// Requests from the vfio-user client the device refused.
    #[serde(default)]
    pub bad_requests: u64,
    /// Events that fell out of the in-memory ring (still in the trace file).
    #[serde(default)]
    pub dropped_events: u64,
    /// Trace-file writes that failed (the events stay in the ring).
    #[serde(default)]
    pub trace_errors: u64,
}

/// A snapshot of the device's registers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterDump {
    /// Reset generation.
    pub generation: u64,
    /// Cause of a reset still in progress.
    pub in_reset: Option<String>,
    /// PCI_COMMAND memory space enable.
    pub memory_decode: bool,
    /// PMCSR power state (0 = D0, 3 = D3hot).
    pub power_state: u8,
    /// Config space (first 256 bytes) as lowercase hex.
    pub config_hex: String,
    /// BAR0 controller registers by name (CAP, VS, CC, CSTS, ...), as read by the host now.
    pub controller: Vec<NamedRegister>,
    /// Doorbells that are not zero.
    pub doorbells: Vec<DoorbellValue>,
}

/// One controller register.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedRegister {
    pub name: String,
    pub offset: u64,
    pub value: u64,
}

/// The last values written to a queue pair's doorbells.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoorbellValue {
    pub queue: u32,
    pub sq_tail: u32,
    pub cq_head: u32,
}
