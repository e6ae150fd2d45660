//! The control socket: JSON lines (see `p2prig_protocol::device`), one thread per
//! connection, one reply line per request line. A bad line gets an error reply; it never
//! ends the connection, let alone the process.

use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use p2prig_protocol::device::{DeviceOp, DeviceReply};
use p2prig_protocol::wire::{answer_line, serve_unix_stream, ErrorReply, Reply, MAX_LINE_BYTES};

use p2prig_protocol::hex;

use crate::device::{Device, MAX_TRANSFER};

/// Most events one `events_since` returns (the default when no limit is given is 1000).
pub const MAX_EVENTS_PER_PAGE: usize = 100_000;
const DEFAULT_EVENTS_PER_PAGE: usize = 1000;
/// Longest pattern a `cmb_fill` accepts.
pub const MAX_PATTERN_BYTES: usize = 4096;
/// Longest reset duration or ready delay the socket accepts (10 minutes).
pub const MAX_DELAY_MS: u64 = 600_000;

fn invalid(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(libc::EINVAL, message)
}

/// Carries out one operation.
pub fn handle(op: DeviceOp, device: &Arc<Device>) -> Result<DeviceReply, ErrorReply> {
    match op {
        DeviceOp::EventsSince { since, limit } => {
            let limit = limit.map_or(DEFAULT_EVENTS_PER_PAGE, |l| l as usize);
            let page = device.log().since(since, limit.min(MAX_EVENTS_PER_PAGE));
            Ok(DeviceReply::Events {
                events: page.events,
                last_seq: page.last_seq,
                truncated: page.truncated,
            })
        }
        DeviceOp::Stats => Ok(DeviceReply::Stats(device.log().stats())),
        DeviceOp::Registers => Ok(DeviceReply::Registers(device.registers())),
        DeviceOp::CmbRead { offset, length } => {
            if length as usize > MAX_TRANSFER {
                return Err(invalid(format!(
                    "length {length} is over the {MAX_TRANSFER}-byte limit of one cmb_read"
                )));
            }
            let mut data = vec![0u8; length as usize];
            device
                .cmb()
                .read(offset, &mut data)
                .map_err(|e| invalid(e.to_string()))?;
            Ok(DeviceReply::CmbData {
                offset,
                data_hex: hex::encode(&data),
            })
        }
        DeviceOp::CmbFill {
            offset,
            length,
            pattern_hex,
        } => {
            let pattern = hex::decode(&pattern_hex)
                .filter(|p| !p.is_empty() && p.len() <= MAX_PATTERN_BYTES)
                .ok_or_else(|| {
                    invalid(format!(
                        "pattern_hex must be 1 to {MAX_PATTERN_BYTES} bytes of hex digits"
                    ))
                })?;
            let size = device.cmb().size();
            let length = length.unwrap_or_else(|| size.saturating_sub(offset));
            device
                .cmb()
                .fill(offset, length, &pattern)
                .map_err(|e| invalid(e.to_string()))?;
            Ok(DeviceReply::Done)
        }
        DeviceOp::SetResetDuration { ms } => {
            if ms > MAX_DELAY_MS {
                return Err(invalid(format!(
                    "{ms} ms is over the {MAX_DELAY_MS} ms limit"
                )));
            }
            device.set_reset_duration(ms);
            Ok(DeviceReply::Done)
        }
        DeviceOp::SetReadyDelay { ms } => {
            if ms > MAX_DELAY_MS {
                return Err(invalid(format!(
                    "{ms} ms is over the {MAX_DELAY_MS} ms limit"
                )));
            }
            device.set_ready_delay(ms);
            Ok(DeviceReply::Done)
        }
        DeviceOp::WaitFor {
            filter,
            since,
            timeout_ms,
        } => {
            let log = device.log();
            let since = since.unwrap_or_else(|| log.last_seq());
            let (event, last_seq) = log.wait_for(&filter, since, Duration::from_millis(timeout_ms));
            Ok(DeviceReply::WaitResult { event, last_seq })
        }
    }
}

/// Turns one request line into its reply.
pub fn handle_line(line: &[u8], device: &Arc<Device>) -> Reply<DeviceReply> {
    answer_line(line, |op: DeviceOp| handle(op, device), invalid)
}

/// Serves one connection until the peer closes it.
pub fn serve_connection(stream: UnixStream, device: &Arc<Device>) {
    serve_unix_stream(
        stream,
        || invalid(format!("line longer than {MAX_LINE_BYTES} bytes")),
        |line| handle_line(line, device),
    );
}

/// The listening control socket (device-support's, shared with the other device).
pub use device_support::ControlSocket;

/// Accepts control connections until `stop` is set, each served on its own thread.
pub fn serve(socket: &ControlSocket, device: &Arc<Device>, stop: &AtomicBool) {
    let device = Arc::clone(device);
    socket.serve(stop, move |stream| serve_connection(stream, &device));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_log::EventLog;
    use crate::DeviceSettings;
    use p2prig_protocol::wire::Outcome;

    fn device() -> Arc<Device> {
        Device::new(
            DeviceSettings {
                cmb_size: 64 << 10,
                ..Default::default()
            },
            Arc::new(EventLog::new(64, None)),
        )
        .expect("device")
    }

    #[test]
    fn malformed_lines_get_error_replies_with_salvaged_ids() {
        let d = device();
        for (line, id) in [
            (&b"{\"id\":5,\"op\":\"explode\"}"[..], 5),
            (b"not json", 0),
            (
                b"{\"id\":6,\"op\":\"cmb_read\",\"offset\":\"x\",\"length\":1}",
                6,
            ),
            (b"\xff\xfe", 0),
        ] {
            let reply = handle_line(line, &d);
            assert_eq!(reply.id, id);
            assert!(matches!(reply.outcome, Outcome::Err(ref e) if e.errno == libc::EINVAL));
        }
    }

    #[test]
    fn cmb_fill_then_read_returns_the_pattern() {
        let d = device();
        let fill = DeviceOp::CmbFill {
            offset: 8,
            length: Some(4),
            pattern_hex: "a5".into(),
        };
        assert_eq!(handle(fill, &d), Ok(DeviceReply::Done));
        let read = DeviceOp::CmbRead {
            offset: 6,
            length: 8,
        };
        assert_eq!(
            handle(read, &d),
            Ok(DeviceReply::CmbData {
                offset: 6,
                data_hex: "0000a5a5a5a50000".into()
            })
        );
    }

    #[test]
    fn out_of_range_cmb_requests_are_errors() {
        let d = device();
        let read = DeviceOp::CmbRead {
            offset: 64 << 10,
            length: 1,
        };
        assert!(handle(read, &d).is_err());
        let fill = DeviceOp::CmbFill {
            offset: 0,
            length: Some(u64::MAX),
            pattern_hex: "00".into(),
        };
        assert!(handle(fill, &d).is_err());
        let empty = DeviceOp::CmbFill {
            offset: 0,
            length: None,
            pattern_hex: String::new(),
        };
        assert!(handle(empty, &d).is_err());
    }
}
