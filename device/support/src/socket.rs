//! Listening Unix sockets that belong to one running device process.
//!
//! A device's socket path is its identity: the rig (and a user) find a device by it. So a path
//! someone is serving is never taken over (a second instance started on the same paths
//! refuses to start instead of making the first unreachable), a stale socket left by a killed
//! process is replaced, and anything that is not a socket is left alone. The socket ends up
//! mode 0600 whatever the umask: only the user running the rig may connect.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The mode of every socket [`bind_private_socket`] creates.
pub const SOCKET_MODE: u32 = 0o600;
/// Connections the kernel queues before the device accepts them.
const BACKLOG: libc::c_int = 128;

/// Why a socket could not be bound.
#[derive(Debug, Error)]
pub enum SocketError {
    #[error(
        "{}: another instance is running and serving this socket (a connection to it was \
         accepted); stop that instance or pick another path",
        path.display()
    )]
    InUse { path: PathBuf },
    #[error(
        "{} exists and is not a socket; refusing to replace it (remove it or pick another path)",
        path.display()
    )]
    NotASocket { path: PathBuf },
    #[error(
        "{}: cannot tell whether the socket there is stale (connecting failed: {source}); \
         refusing to replace it",
        path.display()
    )]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}: {} bytes is longer than a Unix socket path may be (at most {max})",
        path.display(),
        path.as_os_str().len()
    )]
    PathTooLong { path: PathBuf, max: usize },
    #[error("{} {}: {source}", step, path.display())]
    Io {
        /// What was being done: "removing the stale socket", "binding", ...
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<SocketError> for io::Error {
    fn from(error: SocketError) -> Self {
        let kind = match &error {
            SocketError::InUse { .. } => io::ErrorKind::AddrInUse,
            SocketError::NotASocket { .. } => io::ErrorKind::AlreadyExists,
            SocketError::PathTooLong { .. } => io::ErrorKind::InvalidInput,
            SocketError::Probe { source, .. } | SocketError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, error)
    }
}

fn io_error<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SocketError + 'a {
    move |source| SocketError::Io {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// Listens on a new socket at `path`, mode 0600.
///
/// An existing socket nobody accepts on (connecting is refused: its process died) is removed
/// first. A socket that accepts a connection belongs to a running instance and is refused
/// with [`SocketError::InUse`]; any other kind of file is refused with
/// [`SocketError::NotASocket`] and never deleted.
pub fn bind_private_socket(path: &Path) -> Result<UnixListener, SocketError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(io_error("looking at", path)(source)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_probe) => {
                return Err(SocketError::InUse {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .or_else(|e| match e.kind() {
                        io::ErrorKind::NotFound => Ok(()),
                        _ => Err(e),
                    })
                    .map_err(io_error("removing the stale socket", path))?;
            }
            // Gone between the look and the probe: the path is free.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SocketError::Probe {
                    path: path.to_path_buf(),
                    source,
                })
            }
        },
    }
    bind_listen_0600(path)
}

/// socket(2), bind(2), chmod(2), listen(2).
///
/// The mode is set on the path between bind and listen: until listen(2) every connect(2) is
/// refused, so no client can connect while the socket still has the umask's mode. (fchmod on
/// the socket descriptor would not do: the mode that counts is that of the inode bind
/// created; setting the umask would change it for every thread of the process.)
fn bind_listen_0600(path: &Path) -> Result<UnixListener, SocketError> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // One byte stays zero: the terminating NUL.
    let max = address.sun_path.len() - 1;
    if bytes.len() > max || bytes.is_empty() || bytes.contains(&0) {
        return Err(SocketError::PathTooLong {
            path: path.to_path_buf(),
            max,
        });
    }
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io_error("creating a socket for", path)(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: socket(2) just returned this descriptor; nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let length = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `address` is an initialised sockaddr_un and `length` does not exceed its size.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::addr_of!(address).cast(),
            length as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io_error("binding", path)(io::Error::last_os_error()));
    }
    let listen = || -> io::Result<()> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))?;
        // SAFETY: listen(2) on a bound socket this function owns.
        if unsafe { libc::listen(socket.as_raw_fd(), BACKLOG) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    if let Err(source) = listen() {
        let _ = std::fs::remove_file(path);
        return Err(io_error("making mode 0600 and listening on", path)(source));
    }
    Ok(UnixListener::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
    }

    #[test]
    fn a_new_socket_is_mode_0600_and_accepts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.sock");
        let listener = bind_private_socket(&path).expect("bind");
        assert_eq!(mode(&path), 0o600);
        let _client = UnixStream::connect(&path).expect("connect");
        listener.accept().expect("accept");
    }

    #[test]
    fn a_live_socket_is_refused_and_keeps_serving() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("live.sock");
        let first = bind_private_socket(&path).expect("first");
        let error = bind_private_socket(&path).expect_err("second must be refused");
        assert!(matches!(error, SocketError::InUse { .. }), "{error}");
        let text = error.to_string();
        assert!(
            text.contains(&*path.to_string_lossy()) && text.contains("another instance"),
            "{text}"
        );
        // The probe's connection is queued on the first listener; then a real client.
        first.accept().expect("probe");
        let _client = UnixStream::connect(&path).expect("still reachable");
        first.accept().expect("accept");
        assert_eq!(io::Error::from(error).kind(), io::ErrorKind::AddrInUse);
    }

    #[test]
    fn a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stale.sock");
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists(), "dropping a listener leaves its file");
        let listener = bind_private_socket(&path).expect("rebind");
        let _client = UnixStream::connect(&path).expect("connect");
        listener.accept().expect("accept");
    }

    #[test]
    fn a_regular_file_a_directory_and_a_symlink_are_never_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("precious");
        std::fs::write(&file, b"keep").expect("write");
        let subdir = dir.path().join("subdir");
        std::fs::create_dir(&subdir).expect("mkdir");
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        for path in [&file, &subdir, &link] {
            let error = bind_private_socket(path).expect_err("refused");
            assert!(matches!(error, SocketError::NotASocket { .. }), "{error}");
            assert!(
                std::fs::symlink_metadata(path).is_ok(),
                "{}",
                path.display()
            );
        }
        assert_eq!(std::fs::read(&file).expect("read"), b"keep");
    }

    #[test]
    fn a_path_too_long_for_sun_path_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x".repeat(120));
        let error = bind_private_socket(&path).expect_err("too long");
        assert!(matches!(error, SocketError::PathTooLong { .. }), "{error}");
    }
}
