//! The checks behind p2prig's fuzz targets, one module per target, each with a
//! `check(data: &[u8])` that panics when a property of the parser under test does not hold.
//! `src/bin/<target>.rs` hands AFL++'s inputs to it; see `fuzz/README.md` for the targets,
//! how to run them and how to reproduce a crash.
//!
//! The checks live in this library, not in the binaries, so one property is written once
//! and the same code runs under `cargo afl fuzz` and when a saved input is replayed.

pub mod agent_rpc;
pub mod control_lines;
pub mod lines;
pub mod roce_frame;
pub mod target_control;
pub mod vfio_user;
pub mod vhost_user;
