//! Process plumbing shared by the device processes (nvme-cmb, roce-target): the exit signals
//! that make the rig's SIGTERM (and a user's Ctrl-C) an orderly shutdown, the sockets a
//! device listens on and the files it writes. See README.md for the policy each one carries.

mod control;
mod file;
mod signals;
mod socket;

pub use control::ControlSocket;
pub use file::{create_private_file, FileError, FILE_MODE};
pub use signals::{ExitSignals, SignalError};
pub use socket::{bind_private_socket, SocketError, SOCKET_MODE};
