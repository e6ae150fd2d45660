//! A device's control socket: bound with [`bind_private_socket`]'s policy, each connection
//! served on a thread of its own, the path removed when the socket is dropped.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::socket::{bind_private_socket, SocketError};

/// The listening control socket.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    pub fn bind(path: &Path) -> Result<Self, SocketError> {
        Ok(Self {
            listener: bind_private_socket(path)?,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections until `stop` is set (checked at each connection), each handed to
    /// `connection` on its own thread.
    pub fn serve<F>(&self, stop: &AtomicBool, connection: F)
    where
        F: Fn(UnixStream) + Clone + Send + 'static,
    {
        for stream in self.listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(stream) = stream else { continue };
            let connection = connection.clone();
            // Out of threads: the connection is dropped and the client may retry.
            let _ = std::thread::Builder::new()
                .name("control".into())
                .spawn(move || connection(stream));
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;

    #[test]
    fn each_connection_is_served_and_drop_removes_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        let socket = ControlSocket::bind(&path).expect("bind");
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                socket.serve(&stop, |mut stream: UnixStream| {
                    let _ = stream.write_all(b"hi\n");
                });
                drop(socket);
            })
        };
        for _ in 0..2 {
            let mut reply = String::new();
            UnixStream::connect(&path)
                .expect("connect")
                .read_to_string(&mut reply)
                .expect("read");
            assert_eq!(reply, "hi\n");
        }
        stop.store(true, Ordering::Relaxed);
        // One more connection wakes the accept loop, which then sees `stop`.
        let _ = UnixStream::connect(&path);
        server.join().expect("server thread");
        assert!(!path.exists(), "the socket file outlived its ControlSocket");
    }
}
