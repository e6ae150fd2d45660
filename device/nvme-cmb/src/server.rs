//! The vfio-user endpoint: a listening socket serving one client after another, each
//! connection read message by message ([`crate::transport`]), decoded
//! ([`crate::framing`]) and answered ([`crate::session`]).
//!
//! Each refusal is a `bad_request` event. A refusal that leaves the stream in step (the whole
//! message was read) gets an error reply, unless the message said NO_REPLY, and the
//! connection goes on; one that does not (a header whose size is below 16 bytes or over the
//! maximum, a client gone mid-message) ends the connection after that reply.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use p2prig_protocol::event::EventKind;

use crate::device::Device;
use crate::framing::{decode_request, Header, FLAG_TYPE_MASK};
use crate::session::{Refusal, Served, Session};
use crate::transport::{ReceiveError, Transport};

/// Why the vfio-user endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A live socket (another instance), a non-socket file, or a failed bind.
    #[error(transparent)]
    Socket(#[from] device_support::SocketError),
}

/// The listening vfio-user socket.
#[derive(Debug)]
pub struct Endpoint {
    listener: UnixListener,
    path: PathBuf,
}

/// Binds a unix listener at `path`, mode 0600, replacing a stale socket left by a killed
/// process; a socket another instance serves, or any other file, is refused (see
/// [`device_support::bind_private_socket`]).
pub fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    Ok(device_support::bind_private_socket(path)?)
}

impl Endpoint {
    /// Listens on `path` for the device.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        Ok(Self::from_listener(bind_unix(path)?, path))
    }

    /// Serves on `listener`, already bound at `path` (with [`bind_unix`]): a caller may bind
    /// before the device exists, to check the path is free first.
    pub fn from_listener(listener: UnixListener, path: &Path) -> Self {
        Self {
            listener,
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout_ms` for a client to be waiting; true if one is.
    fn client_waiting(&self, timeout_ms: i32) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.listener.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout_ms) };
        rc > 0 && fds[0].revents & libc::POLLIN != 0
    }

    /// Serves one client after another until `stop` is set (checked between clients).
    pub fn serve(&self, device: &Arc<Device>, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            if !self.client_waiting(200) {
                continue;
            }
            self.serve_one(device);
        }
    }

    /// Accepts and serves one client; returns when it leaves or its connection is closed.
    pub fn serve_one(&self, device: &Arc<Device>) {
        let stream = match self.listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                device.bad_request(format!("vfio-user accept failed: {e}"));
                // Out of fds or similar: give the system a moment rather than spin.
                std::thread::sleep(std::time::Duration::from_millis(100));
                return;
            }
        };
        let log = device.log();
        log.record(EventKind::Client { connected: true });
        // The framing is written not to panic on any input; should the device model panic
        // anyway, that ends this connection only and the next client is served.
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            serve_connection(Transport::new(stream), device)
        }));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(ended)) => device.bad_request(format!("vfio-user connection closed: {ended}")),
            Err(_) => device.bad_request("vfio-user connection ended by a panic".to_string()),
        }
        log.record(EventKind::Client { connected: false });
    }
}

/// Why a connection was closed by the server or broke.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("{command_id}: {source}")]
    Framing {
        command_id: String,
        #[source]
        source: ReceiveError,
    },
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    #[error("sending a reply: {0}")]
    Send(#[source] io::Error),
}

/// "REGION_WRITE id 3" (or the raw number of an unknown command), for events.
fn describe(header: &Header) -> String {
    match crate::framing::Command::from_wire(header.command) {
        Some(command) => format!("{command} id {}", header.id),
        None => format!("command {} id {}", header.command, header.id),
    }
}

/// Serves one connection until the client leaves (`Ok`) or the connection has to end.
fn serve_connection(mut transport: Transport, device: &Arc<Device>) -> Result<(), Ended> {
    let mut session = Session::new(Arc::clone(device));
    let mut payload = Vec::new();
    let mut out = Vec::new();
    loop {
        let incoming = match transport.receive(&mut payload) {
            Ok(Some(incoming)) => incoming,
            Ok(None) => return Ok(()),
            Err(ReceiveError::Refused { header, error }) => {
                if !header.no_reply() {
                    let reply = header.error_reply(error.errno()).encode();
                    transport.send(&reply, None).map_err(Ended::Send)?;
                }
                return Err(Ended::Framing {
                    command_id: describe(&header),
                    source: ReceiveError::Refused { header, error },
                });
            }
            Err(e) => return Err(e.into()),
        };
        let header = incoming.header;
        let result = if incoming.fds_truncated {
            Err(Refusal::FdsTruncated)
        } else {
            decode_request(&header, &payload)
                .map_err(Refusal::from)
                .and_then(|request| session.handle(&header, request, incoming.fds, &mut out))
        };
        match result {
            Ok(served) if !header.no_reply() => {
                let fd = match served {
                    Served::Reply => None,
                    Served::ReplyWithFd(fd) => Some(fd),
                };
                transport.send(&out, fd).map_err(Ended::Send)?;
            }
            Ok(_) => {}
            Err(refusal) => {
                if !refusal.recorded() {
                    device.bad_request(format!("{}: {refusal}", describe(&header)));
                }
                // A message that is not a command (a reply, say: this server sends no
                // requests) has no reply either.
                if !header.no_reply() && header.flags & FLAG_TYPE_MASK == 0 {
                    let reply = header.error_reply(refusal.errno()).encode();
                    transport.send(&reply, None).map_err(Ended::Send)?;
                }
            }
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
