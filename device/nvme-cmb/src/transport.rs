//! One vfio-user connection's socket: whole messages in (header, then exactly the payload the
//! header announces, however many reads that takes, with the SCM_RIGHTS file descriptors that
//! came with them), replies out (with an fd when one goes along).
//!
//! Every read asks for no more than the rest of the current message. Linux returns
//! descriptors with the bytes of the `sendmsg` that carried them, so whatever a read returns
//! came with this message's bytes, never with the next message's (a client attaches a
//! message's descriptors to that message, as QEMU does).

use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::framing::{FramingError, Header, HEADER_SIZE, MAX_MSG_FDS};

/// Why no message could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The header is refused before its payload is read; the stream position is lost, so
    /// the caller answers (unless NO_REPLY) and closes.
    #[error("{error}")]
    Refused { header: Header, error: FramingError },
    #[error("the client closed the connection {got} bytes into a {expected}-byte message")]
    ClosedMidMessage { got: usize, expected: usize },
    #[error("reading from the socket: {0}")]
    Io(#[from] io::Error),
}

/// A message read whole: its header and payload (in the caller's buffer) and descriptors.
#[derive(Debug)]
pub struct Incoming {
    pub header: Header,
    pub fds: Vec<OwnedFd>,
    /// More descriptors arrived than [`MAX_MSG_FDS`]; the kernel or this reader closed the
    /// rest, so the message cannot be served as sent.
    pub fds_truncated: bool,
}

/// Room for `MAX_MSG_FDS` descriptors in one control message: CMSG_SPACE(16 * 4) is 80 on
/// 64-bit Linux; 128 leaves margin for any header layout. Aligned like `cmsghdr`.
#[repr(C, align(8))]
struct ControlBuffer([u8; 128]);

#[derive(Debug)]
pub struct Transport {
    stream: UnixStream,
}

impl Transport {
    pub fn new(stream: UnixStream) -> Self {
        Self { stream }
    }

    /// Reads the next message; its payload goes into `payload` (resized to fit, at most
    /// `MAX_MESSAGE_SIZE - 16` bytes). `Ok(None)`: the client closed between messages.
    pub fn receive(&mut self, payload: &mut Vec<u8>) -> Result<Option<Incoming>, ReceiveError> {
        let mut fds = Vec::new();
        let mut fds_truncated = false;
        let mut raw = [0u8; HEADER_SIZE];
        let got = self.fill(&mut raw, &mut fds, &mut fds_truncated)?;
        if got == 0 {
            return Ok(None);
        }
        if got < HEADER_SIZE {
            return Err(ReceiveError::ClosedMidMessage {
                got,
                expected: HEADER_SIZE,
            });
        }
        let header = Header::parse(&raw);
        // Bounded before the buffer grows: a header claiming 4 GiB allocates nothing.
        let len = header
            .payload_len()
            .map_err(|error| ReceiveError::Refused { header, error })?;
        payload.resize(len, 0);
        let got = self.fill(payload, &mut fds, &mut fds_truncated)?;
        if got < len {
            return Err(ReceiveError::ClosedMidMessage {
                got: HEADER_SIZE + got,
                expected: HEADER_SIZE + len,
            });
        }
        Ok(Some(Incoming {
            header,
            fds,
            fds_truncated,
        }))
    }

    /// Reads until `buf` is full or the peer closes; returns the bytes read.
    fn fill(
        &mut self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        truncated: &mut bool,
    ) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            let Some(rest) = buf.get_mut(got..) else {
                break;
            };
            match recv_with_fds(self.stream.as_raw_fd(), rest, fds, truncated) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// Sends one reply, with `fd` as SCM_RIGHTS on its first bytes when given.
    pub fn send(&mut self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut sent = 0;
        if let Some(fd) = fd {
            sent = self
                .stream
                .send_with_fds(&[bytes], &[fd.as_raw_fd()])
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        }
        self.stream.write_all(bytes.get(sent..).unwrap_or_default())
    }
}

/// One `recvmsg` into `buf`, collecting SCM_RIGHTS descriptors (close-on-exec) into `fds`.
fn recv_with_fds(
    socket: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    truncated: &mut bool,
) -> io::Result<usize> {
    let mut control = ControlBuffer([0; 128]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header that is filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: `msg` points at `iov` (covering `buf`, writable for its length) and `control`
    // (writable for its length), all alive across the call.
    let n = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        *truncated = true;
    }
    // SAFETY: `msg` was filled by recvmsg; its control pointer and length describe
    // `control`, which is still alive.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return null or a header inside `control`.
        let header = unsafe { std::ptr::read_unaligned(cmsg) };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN has no preconditions; it only computes a length.
            let data_offset = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (header.cmsg_len as usize).saturating_sub(data_offset)
                / std::mem::size_of::<RawFd>();
            // SAFETY: `cmsg` is a valid header inside `control`; its data follows it.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            for i in 0..count {
                // SAFETY: the kernel wrote `count` descriptors after the header, all inside
                // `control` (cmsg_len never exceeds msg_controllen).
                let raw: RawFd = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                // SAFETY: the kernel just installed `raw` in this process for us; nothing
                // else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                if fds.len() < MAX_MSG_FDS {
                    fds.push(fd);
                } else {
                    // Dropped (closed) at once: only MAX_MSG_FDS are ever held per message.
                    *truncated = true;
                }
            }
        }
        // SAFETY: `cmsg` is a header inside the buffer `msg` describes.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::FLAG_NO_REPLY;

    fn header(command: u16, size: u32) -> [u8; HEADER_SIZE] {
        Header {
            id: 7,
            command,
            size,
            flags: FLAG_NO_REPLY,
            error: 0,
        }
        .encode()
    }

    #[test]
    fn a_message_split_over_many_writes_is_read_whole_with_its_fd() {
        let (mut client, server) = UnixStream::pair().expect("pair");
        let mut transport = Transport::new(server);
        let memfd = std::fs::File::open("/dev/null").expect("fd");
        let message = [&header(2, 16 + 32)[..], &[0u8; 32]].concat();
        client
            .send_with_fds(&[&message[..3]], &[memfd.as_raw_fd()])
            .expect("first bytes with the fd");
        let writer = std::thread::spawn(move || {
            for chunk in message[3..].chunks(5) {
                std::thread::sleep(std::time::Duration::from_millis(2));
                client.write_all(chunk).expect("write");
            }
            client
        });
        let mut payload = Vec::new();
        let incoming = transport
            .receive(&mut payload)
            .expect("ok")
            .expect("a message");
        assert_eq!(incoming.header.size, 48);
        assert_eq!(payload.len(), 32);
        assert_eq!(incoming.fds.len(), 1);
        assert!(!incoming.fds_truncated);
        drop(writer.join());
    }

    #[test]
    fn a_header_claiming_4_gib_is_refused_before_any_allocation() {
        let (mut client, server) = UnixStream::pair().expect("pair");
        let mut transport = Transport::new(server);
        client.write_all(&header(10, u32::MAX)).expect("write");
        let mut payload = Vec::new();
        let error = transport.receive(&mut payload).expect_err("refused");
        assert!(matches!(
            error,
            ReceiveError::Refused {
                error: FramingError::TooLarge(u32::MAX),
                ..
            }
        ));
        assert_eq!(payload.capacity(), 0);
    }

    #[test]
    fn eof_between_messages_is_a_clean_end_and_inside_one_is_not() {
        let (client, server) = UnixStream::pair().expect("pair");
        let mut transport = Transport::new(server);
        drop(client);
        assert!(transport.receive(&mut Vec::new()).expect("ok").is_none());

        let (mut client, server) = UnixStream::pair().expect("pair");
        let mut transport = Transport::new(server);
        client.write_all(&header(13, 16 + 8)[..]).expect("write");
        client.write_all(&[1, 2, 3]).expect("write");
        drop(client);
        let error = transport.receive(&mut Vec::new()).expect_err("cut");
        assert!(matches!(
            error,
            ReceiveError::ClosedMidMessage {
                got: 19,
                expected: 24
            }
        ));
    }

    #[test]
    fn more_fds_than_the_maximum_are_closed_and_flagged() {
        let (client, server) = UnixStream::pair().expect("pair");
        let mut transport = Transport::new(server);
        let file = std::fs::File::open("/dev/null").expect("fd");
        let raw = vec![file.as_raw_fd(); MAX_MSG_FDS + 4];
        client
            .send_with_fds(&[&header(13, 16)[..]], &raw)
            .expect("send");
        let incoming = transport
            .receive(&mut Vec::new())
            .expect("ok")
            .expect("a message");
        assert!(incoming.fds_truncated);
        assert!(incoming.fds.len() <= MAX_MSG_FDS);
    }
}
