//! nvme-cmb: a vfio-user server presenting an NVMe-like PCI function with a controller
//! memory buffer, recording every access for p2prig's reset/revoke oracles.
//!
//! - [`device::Device`]: the function (config space, BAR0 registers and doorbells, BAR2 CMB,
//!   resets), transport-free.
//! - [`server`]: the vfio-user endpoint, one client after another; [`transport`] reads whole
//!   messages (with their file descriptors) from a connection, [`framing`] decodes them
//!   (pure: [`framing::decode_message`] takes a byte slice), [`session`] answers them.
//! - [`control`]: the JSON-lines control socket.
//! - [`event_log`]: the bounded event ring and the JSONL trace file.

pub mod cmb;
pub mod config_space;
pub mod control;
pub mod device;
pub mod event_log;
pub mod framing;
pub mod nvme_regs;
pub mod server;
pub mod session;
pub mod transport;

pub use device::{CmbMode, Device, DeviceSettings, ResetCause};
pub use event_log::EventLog;
