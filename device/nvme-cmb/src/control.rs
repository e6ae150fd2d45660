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
/// Bytes of events one reply may carry: the protocol's line limit, less room for the rest of
/// the reply (id, last_seq, truncated).
const REPLY_BUDGET: usize = MAX_LINE_BYTES - 4096;

/// Drops events from the end of a page until its JSON fits in `budget` bytes, so a reply never
/// exceeds the line limit its client reads with; the client asks again from the last event it
/// got (`last_seq` still says how far the log goes).
fn fit_in_a_line(events: &mut Vec<p2prig_protocol::event::Event>, budget: usize) {
    let mut used = 0;
    let fits = events
        .iter()
        .take_while(|event| {
            // Each event is followed by a comma in the array.
            used += serde_json::to_vec(event).map_or(usize::MAX / 2, |v| v.len()) + 1;
            used <= budget
        })
        .count();
    events.truncate(fits);
}
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
            let mut page = device.log().since(since, limit.min(MAX_EVENTS_PER_PAGE));
            fit_in_a_line(&mut page.events, REPLY_BUDGET);
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
    fn a_page_of_events_always_fits_in_one_line() {
        let log = Arc::new(EventLog::new(200_000, None));
        let d = Device::new(
            DeviceSettings {
                cmb_size: 64 << 10,
                ..Default::default()
            },
            Arc::clone(&log),
        )
        .expect("device");
        // 60,000 events of about 130 bytes: about 8 MB in one page before paging by size.
        for i in 0..60_000 {
            log.record(p2prig_protocol::event::EventKind::Bar {
                access: p2prig_protocol::event::Access::Write,
                bar: 0,
                offset: 0x1000 + (i % 512) * 8,
                size: 8,
                value: Some(u64::MAX - i),
                data: None,
            });
        }
        let mut since = 0;
        let mut seen = 0;
        loop {
            let line = handle_line(
                format!(r#"{{"id":1,"op":"events_since","since":{since},"limit":100000}}"#)
                    .as_bytes(),
                &d,
            );
            let encoded = p2prig_protocol::wire::encode_line(&line);
            assert!(
                encoded.len() <= MAX_LINE_BYTES,
                "a {}-byte reply",
                encoded.len()
            );
            let Outcome::Ok(DeviceReply::Events { events, .. }) = line.outcome else {
                panic!("not events: {:?}", line.outcome);
            };
            let Some(last) = events.last() else { break };
            since = last.seq;
            seen += events.len();
        }
        assert!(seen >= 60_000, "paging lost events: {seen}");
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
