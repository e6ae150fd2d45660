//! Message types of every p2prig control channel, defined once and shared by the
//! harness, the guest agent and the device processes.
//!
//! Every channel is JSON lines: one request object per line, one reply line per request,
//! matched by `id`. Parsing an untrusted line never panics; see [`decode_line`].

pub mod agent;
pub mod device;
pub mod event;
pub mod hex;
pub mod target;
pub mod wire;

pub use wire::{decode_line, encode_line, Reply, Request, WireError};
