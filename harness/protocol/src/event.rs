//! Events recorded by nvme-cmb: the device-side oracle of every scenario.

use serde::{Deserialize, Serialize};

/// One thing that happened to the device, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Strictly increasing from 1 for the life of the device process.
    pub seq: u64,
    /// CLOCK_MONOTONIC in nanoseconds (comparable with the harness's clock on the same host).
    pub mono_ns: u64,
    /// Reset generation at the time of the event (bumped by every reset).
    pub generation: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Direction of a region access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    Read,
    Write,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// A trapped BAR access. `value` is little-endian bytes as an integer for sizes up to
    /// 8; larger accesses carry `data` (hex) instead.
    Bar {
        access: Access,
        bar: u8,
        offset: u64,
        size: u32,
        value: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
    },
    /// A config-space write (reads are not recorded: the guest polls config space).
    ConfigWrite { offset: u64, size: u32, value: u64 },
    /// Memory decode (PCI_COMMAND bit 1) changed.
    Decode { enabled: bool },
    /// A reset began (`cause`: flr, vfio_user, controller, d3hot).
    ResetStart { cause: String },
    /// A reset finished; `generation` of this event is the new one.
    ResetEnd { cause: String },
    /// An access that a correct importer must never make: during reset, or with decode off.
    Violation {
        reason: String,
        access: Access,
        bar: u8,
        offset: u64,
        size: u32,
        value: Option<u64>,
    },
    /// A client connected to or left the vfio-user socket.
    Client { connected: bool },
    /// A request from the client the device refused (out of range, wrong size, ...).
    BadRequest { detail: String },
    /// PMCSR PowerState changed (0 = D0, 3 = D3hot).
    PowerState { state: u8 },
}

impl EventKind {
    /// The serialised `kind` tag of this event (bar, config_write, ...).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Bar { .. } => "bar",
            EventKind::ConfigWrite { .. } => "config_write",
            EventKind::Decode { .. } => "decode",
            EventKind::ResetStart { .. } => "reset_start",
            EventKind::ResetEnd { .. } => "reset_end",
            EventKind::Violation { .. } => "violation",
            EventKind::Client { .. } => "client",
            EventKind::BadRequest { .. } => "bad_request",
            EventKind::PowerState { .. } => "power_state",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_is_the_serialised_kind_tag() {
        let kinds = [
            EventKind::Bar {
                access: Access::Write,
                bar: 0,
                offset: 0x1000,
                size: 4,
                value: Some(1),
                data: None,
            },
            EventKind::ConfigWrite {
                offset: 4,
                size: 2,
                value: 6,
            },
            EventKind::Decode { enabled: true },
            EventKind::ResetStart {
                cause: "flr".into(),
            },
            EventKind::ResetEnd {
                cause: "flr".into(),
            },
            EventKind::Violation {
                reason: "decode_off".into(),
                access: Access::Read,
                bar: 2,
                offset: 0,
                size: 8,
                value: None,
            },
            EventKind::Client { connected: true },
            EventKind::BadRequest { detail: "x".into() },
            EventKind::PowerState { state: 3 },
        ];
        for kind in kinds {
            let event = Event {
                seq: 1,
                mono_ns: 2,
                generation: 0,
                kind,
            };
            let json = serde_json::to_value(&event).expect("serialises");
            assert_eq!(json["kind"], event.kind.name());
            let back: Event = serde_json::from_value(json).expect("parses back");
            assert_eq!(back, event);
        }
    }
}
