//! A small vfio-user client written from the spec (docs/interop/vfio-user.rst), independent of
//! the `vfio_user` crate and of the server's own framing code: it builds messages byte by
//! byte, can send them whole, split or malformed, with SCM_RIGHTS descriptors, and reads
//! replies by the size their header gives.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const HEADER_SIZE: usize = 16;
pub const FLAG_REPLY: u32 = 1;
pub const FLAG_NO_REPLY: u32 = 1 << 4;
pub const FLAG_ERROR: u32 = 1 << 5;

pub const VERSION: u16 = 1;
pub const DMA_MAP: u16 = 2;
pub const DMA_UNMAP: u16 = 3;
pub const GET_INFO: u16 = 4;
pub const GET_REGION_INFO: u16 = 5;
pub const REGION_READ: u16 = 9;
pub const REGION_WRITE: u16 = 10;

/// QEMU 10.2's proposal, verbatim.
pub const QEMU_CAPABILITIES: &[u8] =
    b"{\"capabilities\": {\"pgsizes\": 4096, \"max_msg_fds\": 16, \
    \"max_dma_maps\": 65535, \"max_data_xfer_size\": 1048576, \"migration\": \
    {\"max_bitmap_size\": 268435456, \"pgsize\": 4096}, \"write_multiple\": true}}\0";

/// One reply as read from the socket.
#[derive(Debug)]
pub struct RawReply {
    pub id: u16,
    pub command: u16,
    pub flags: u32,
    pub error: u32,
    pub payload: Vec<u8>,
    pub fd: Option<std::fs::File>,
}

impl RawReply {
    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }
}

pub struct SpecClient {
    pub stream: UnixStream,
    next_id: u16,
}

/// The bytes of one message: header (host byte order) and payload; `size` is what the
/// header claims, whatever the payload's length.
pub fn message(id: u16, command: u16, flags: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_SIZE + payload.len());
    m.extend_from_slice(&id.to_ne_bytes());
    m.extend_from_slice(&command.to_ne_bytes());
    m.extend_from_slice(&size.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(payload);
    m
}

/// Payload built from u32 words.
pub fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

/// REGION_READ/REGION_WRITE payload: offset u64, region u32, count u32, then data.
pub fn region_access(offset: u64, region: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_ne_bytes().to_vec();
    p.extend_from_slice(&region.to_ne_bytes());
    p.extend_from_slice(&count.to_ne_bytes());
    p.extend_from_slice(data);
    p
}

impl SpecClient {
    /// Connects without negotiating anything.
    pub fn bare(path: &Path) -> SpecClient {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        SpecClient { stream, next_id: 0 }
    }

    /// Connects and negotiates version 0.0 with QEMU's capabilities.
    pub fn connect(path: &Path) -> SpecClient {
        let mut client = SpecClient::bare(path);
        let reply = client.version();
        assert!(!reply.is_error(), "version refused: errno {}", reply.error);
        client
    }

    pub fn version(&mut self) -> RawReply {
        let mut payload = vec![0u8, 0, 0, 0];
        payload.extend_from_slice(QEMU_CAPABILITIES);
        self.request(VERSION, &payload)
    }

    fn take_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Sends a message whose header counts exactly its payload; returns its id.
    pub fn send(&mut self, command: u16, flags: u32, payload: &[u8]) -> u16 {
        self.send_sized(
            command,
            flags,
            (HEADER_SIZE + payload.len()) as u32,
            payload,
        )
    }

    /// Sends a message whose header claims `size` bytes, whatever the payload is.
    pub fn send_sized(&mut self, command: u16, flags: u32, size: u32, payload: &[u8]) -> u16 {
        let id = self.take_id();
        self.stream
            .write_all(&message(id, command, flags, size, payload))
            .expect("send");
        id
    }

    /// Sends a message with `fds` as SCM_RIGHTS on its bytes (one sendmsg, as QEMU does).
    pub fn send_with_fds(&mut self, command: u16, payload: &[u8], fds: &[RawFd]) -> u16 {
        let id = self.take_id();
        let bytes = message(
            id,
            command,
            0,
            (HEADER_SIZE + payload.len()) as u32,
            payload,
        );
        let sent = self
            .stream
            .send_with_fds(&[&bytes[..]], fds)
            .expect("sendmsg");
        self.stream.write_all(&bytes[sent..]).expect("rest");
        id
    }

    /// Reads one reply: the header (with any descriptor), then the size it gives.
    pub fn receive(&mut self) -> RawReply {
        let mut header = [0u8; HEADER_SIZE];
        let (got, fd) = self.stream.recv_with_fd(&mut header).expect("reply header");
        assert!(got > 0, "server closed the connection instead of replying");
        self.stream
            .read_exact(&mut header[got..])
            .expect("reply header");
        let size = u32::from_ne_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let mut payload = vec![0u8; size.saturating_sub(HEADER_SIZE)];
        self.stream.read_exact(&mut payload).expect("reply payload");
        let reply = RawReply {
            id: u16::from_ne_bytes([header[0], header[1]]),
            command: u16::from_ne_bytes([header[2], header[3]]),
            flags: u32::from_ne_bytes([header[8], header[9], header[10], header[11]]),
            error: u32::from_ne_bytes([header[12], header[13], header[14], header[15]]),
            payload,
            fd,
        };
        assert_ne!(reply.flags & FLAG_REPLY, 0, "not a reply: {reply:?}");
        reply
    }

    /// Sends a request and reads its reply, which must carry the request's id.
    pub fn request(&mut self, command: u16, payload: &[u8]) -> RawReply {
        let id = self.send(command, 0, payload);
        let reply = self.receive();
        assert_eq!(
            (reply.id, reply.command),
            (id, command),
            "reply out of step"
        );
        reply
    }

    pub fn region_read(&mut self, region: u32, offset: u64, count: u32) -> RawReply {
        self.request(REGION_READ, &region_access(offset, region, count, &[]))
    }

    /// DMA_MAP read/write of `size` bytes at `address`, with `fd` if given.
    pub fn dma_map(&mut self, address: u64, size: u64, fd: Option<&OwnedFd>) -> RawReply {
        let mut payload = words(&[32, 3]);
        payload.extend_from_slice(&0u64.to_ne_bytes());
        payload.extend_from_slice(&address.to_ne_bytes());
        payload.extend_from_slice(&size.to_ne_bytes());
        let fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
        let id = self.send_with_fds(DMA_MAP, &payload, &fds);
        let reply = self.receive();
        assert_eq!(reply.id, id, "reply out of step");
        reply
    }

    pub fn dma_unmap(&mut self, flags: u32, address: u64, size: u64) -> RawReply {
        let mut payload = words(&[24, flags]);
        payload.extend_from_slice(&address.to_ne_bytes());
        payload.extend_from_slice(&size.to_ne_bytes());
        self.request(DMA_UNMAP, &payload)
    }

    /// The stream is in step: a GET_INFO with a fresh id is answered first, correctly.
    pub fn assert_in_step(&mut self) {
        let reply = self.request(GET_INFO, &words(&[16, 0, 0, 0]));
        assert!(!reply.is_error(), "GET_INFO refused: errno {}", reply.error);
        assert_eq!(reply.payload.len(), 16);
        assert_eq!(&reply.payload[8..12], &9u32.to_ne_bytes(), "9 regions");
    }

    /// True if nothing arrives within `ms` (a byte that does arrive is consumed: the caller
    /// fails then anyway).
    pub fn silent_for(&mut self, ms: u64) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        let silent = matches!(
            self.stream.read(&mut byte),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        );
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        silent
    }

    /// True when the server closed the connection (EOF within the read timeout), after
    /// whatever it sent first.
    pub fn closed_by_server(&mut self) -> bool {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}
