//! What the binary-level tests share: waiting for a socket, and raw vhost-user messages.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Waits up to 10 s for `path` to exist.
pub fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A vhost-user message: request, flags (version 1), payload size, payload.
pub fn message(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    for word in [request, 1, payload.len() as u32] {
        m.extend_from_slice(&word.to_le_bytes());
    }
    m.extend_from_slice(payload);
    m
}

/// VHOST_USER_GET_FEATURES on a new connection: the backend answers, so it is alive.
pub fn get_features(socket: &Path) -> u64 {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(&message(1, &[])).expect("write");
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).expect("reply");
    assert_eq!(&reply[..4], &1u32.to_le_bytes());
    u64::from_le_bytes(reply[12..20].try_into().expect("8 bytes"))
}
