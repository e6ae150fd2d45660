//! Target `target_control`: a session on roce-target's control socket, run through its own
//! handler (`control::handle_line` and `control::handle`) against a fresh engine: what
//! the handler does with the numbers, keys, addresses, MACs and hex strings of requests that
//! decode, and with lines that do not. The input is the session's lines (at most 64, in at
//! most 64 KiB).
//!
//! One execution must stay short (well under 100 ms with every line the slowest it can be),
//! so a decoded request is bounded before it runs: `poll_cq` waits 0 ms, MRs and fills are
//! at most 64 KiB, an `mr_read` at most 4 KiB (its hex goes through encode and decode; the
//! limits themselves are unit-tested in roce-target). `pcap_start` is refused (no capture directory), as it is without
//! `--pcap-dir`. Properties:
//! - every line gets a reply under its request's id (the salvaged one for a line that does
//!   not decode, with EINVAL);
//! - an error reply names its cause (a non-empty message, a non-zero errno), and a reply
//!   round-trips through `encode_line` as the harness decodes it;
//! - every frame the engine sends meanwhile is well formed
//!   ([`crate::roce_frame::check_outgoing`]).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use p2prig_protocol::target::{TargetOp, TargetReply};
use p2prig_protocol::wire::{decode_line, decode_request, encode_line, salvage_id, Outcome, Reply};
use roce_target::control::{handle, handle_line, ControlContext};
use roce_target::{Engine, EngineConfig};

use crate::roce_frame::{check_outgoing, Sink};

/// Lines after these are ignored: a session this long reaches every state, and longer
/// inputs only cost time per execution.
const MAX_LINES: usize = 64;
/// Inputs are cut at this many bytes: decoding is linear in a line's length (a megabyte of
/// JSON on one line takes a sixth of a second instrumented), and a session's requests are
/// short (the longest, an `mr_write`, carries its data as hex).
const MAX_INPUT: usize = 64 << 10;
/// Largest MR or fill a fuzzed request may ask for.
const MAX_BYTES: u64 = 64 << 10;
/// Largest `mr_read`: 64 reads of 64 KiB, as hex through `encode_line` and back, took half a
/// second.
const MAX_READ: u32 = 4 << 10;

/// The request, bounded so that it runs in microseconds.
fn bounded(op: TargetOp) -> TargetOp {
    match op {
        TargetOp::PollCq { qpn, max, .. } => TargetOp::PollCq {
            qpn,
            max,
            wait_ms: 0,
        },
        TargetOp::RegisterMr { length, access } => TargetOp::RegisterMr {
            length: length.min(MAX_BYTES),
            access,
        },
        TargetOp::MrRead {
            key,
            offset,
            length,
        } => TargetOp::MrRead {
            key,
            offset,
            length: length.min(MAX_READ),
        },
        TargetOp::MrWrite {
            key,
            offset,
            data_hex,
            length,
        } => TargetOp::MrWrite {
            key,
            offset,
            data_hex,
            length: length.map(|l| l.min(MAX_BYTES)),
        },
        op => op,
    }
}

pub fn check(data: &[u8]) {
    let sink = Sink::default();
    let context = ControlContext {
        engine: Arc::new(Mutex::new(Engine::new(
            EngineConfig::default(),
            Box::new(sink.clone()),
        ))),
        pcap_dir: None,
        connections: Arc::new(AtomicU64::new(0)),
    };
    let data = &data[..data.len().min(MAX_INPUT)];
    for line in data.split(|b| *b == b'\n').take(MAX_LINES) {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = match decode_request::<TargetOp>(line) {
            Ok(request) => Reply::new(
                request.id,
                match handle(bounded(request.op), &context) {
                    Ok(reply) => Outcome::Ok(reply),
                    Err(error) => Outcome::Err(error),
                },
            ),
            Err(_) => {
                let reply = handle_line(line, &context);
                assert_eq!(reply.id, salvage_id(line), "a refused line's id");
                match &reply.outcome {
                    Outcome::Err(error) => {
                        assert_eq!(error.errno, libc::EINVAL, "{error}");
                        assert!(error.message.starts_with("bad request: "), "{error}");
                    }
                    Outcome::Ok(ok) => panic!("a line that does not decode was run: {ok:?}"),
                }
                reply
            }
        };
        if let Outcome::Err(error) = &reply.outcome {
            assert!(
                error.errno != 0 && !error.message.is_empty(),
                "an error without a cause: {error:?}"
            );
        }
        let encoded = encode_line(&reply);
        let back: Reply<TargetReply> = decode_line(&encoded).unwrap_or_else(|e| {
            panic!(
                "the harness cannot read the reply ({e}): {}",
                String::from_utf8_lossy(&encoded)
            )
        });
        assert_eq!(back, reply, "reply changed through encode_line");
        for frame in sink.take() {
            check_outgoing(&frame);
        }
    }
}
