//! Netlink requests the agent sends: a permanent neighbour (rtnetlink RTM_NEWNEIGH) and a new
//! rxe link (RDMA netlink, RDMA_NLDEV_CMD_NEWLINK). Messages are built as bytes here so that
//! their layout is tested on the host; constants come from libc and from the bindgen'd
//! rdma_netlink.h.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{AgentError, Result};
use crate::verbs::sys;

/// NLMSG_ALIGNTO.
const ALIGN: usize = 4;
const HEADER_LEN: usize = 16;

fn align(len: usize) -> usize {
    (len + ALIGN - 1) & !(ALIGN - 1)
}

/// One netlink message under construction: header, fixed part, attributes.
#[derive(Debug)]
pub struct Message {
    bytes: Vec<u8>,
}

impl Message {
    pub fn new(kind: u16, flags: u16, seq: u32) -> Self {
        let mut bytes = vec![0u8; HEADER_LEN];
        bytes[4..6].copy_from_slice(&kind.to_ne_bytes());
        bytes[6..8].copy_from_slice(&flags.to_ne_bytes());
        bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
        // nlmsg_pid 0: the kernel.
        Self { bytes }
    }

    /// Appends raw bytes (a fixed header such as struct ndmsg), padded to 4.
    pub fn raw(mut self, data: &[u8]) -> Self {
        self.bytes.extend_from_slice(data);
        self.bytes.resize(align(self.bytes.len()), 0);
        self
    }

    /// Appends a struct rtattr / nlattr {u16 len, u16 type} with its payload, padded to 4.
    pub fn attr(mut self, kind: u16, payload: &[u8]) -> Self {
        let len = 4 + payload.len();
        self.bytes.extend_from_slice(&(len as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(payload);
        self.bytes.resize(align(self.bytes.len()), 0);
        self
    }

    /// A NUL-terminated string attribute (NLA_NUL_STRING / NLA_STRING both accept it).
    pub fn attr_str(self, kind: u16, text: &str) -> Self {
        let mut payload = text.as_bytes().to_vec();
        payload.push(0);
        self.attr(kind, &payload)
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&len.to_ne_bytes());
        self.bytes
    }
}

const REQUEST_ACK: u16 = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;

/// RTM_NEWNEIGH for a permanent IPv4 neighbour, replacing an existing entry.
pub fn neigh_message(seq: u32, ifindex: u32, ip: Ipv4Addr, mac: [u8; 6]) -> Vec<u8> {
    // struct ndmsg { u8 family, pad1; u16 pad2; s32 ifindex; u16 state; u8 flags, type; }
    let mut ndmsg = [0u8; 12];
    ndmsg[0] = libc::AF_INET as u8;
    ndmsg[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    ndmsg[8..10].copy_from_slice(&libc::NUD_PERMANENT.to_ne_bytes());
    ndmsg[11] = libc::RTN_UNICAST;
    let flags = REQUEST_ACK | (libc::NLM_F_CREATE | libc::NLM_F_REPLACE) as u16;
    Message::new(libc::RTM_NEWNEIGH, flags, seq)
        .raw(&ndmsg)
        .attr(libc::NDA_DST, &ip.octets())
        .attr(libc::NDA_LLADDR, &mac)
        .finish()
}

/// RDMA_NL_GET_TYPE(RDMA_NL_NLDEV, RDMA_NLDEV_CMD_NEWLINK) with the link's name, type and
/// netdev: what `rdma link add NAME type TYPE netdev NETDEV` sends.
pub fn rdma_newlink_message(seq: u32, name: &str, link_type: &str, netdev: &str) -> Vec<u8> {
    let kind = ((sys::RDMA_NL_NLDEV as u16) << 10) + sys::RDMA_NLDEV_CMD_NEWLINK as u16;
    Message::new(kind, REQUEST_ACK, seq)
        .attr_str(sys::RDMA_NLDEV_ATTR_DEV_NAME as u16, name)
        .attr_str(sys::RDMA_NLDEV_ATTR_LINK_TYPE as u16, link_type)
        .attr_str(sys::RDMA_NLDEV_ATTR_NDEV_NAME as u16, netdev)
        .finish()
}

/// The errno of the NLMSG_ERROR answer to `seq` in `reply` (0 = ACK), if it holds one.
pub fn ack_errno(reply: &[u8], seq: u32) -> Option<i32> {
    let mut rest = reply;
    while rest.len() >= HEADER_LEN {
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().ok()?);
        let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().ok()?);
        if len < HEADER_LEN || len > rest.len() {
            return None;
        }
        if kind == libc::NLMSG_ERROR as u16 && msg_seq == seq && len >= HEADER_LEN + 4 {
            let error = i32::from_ne_bytes(rest[HEADER_LEN..HEADER_LEN + 4].try_into().ok()?);
            return Some(-error);
        }
        rest = &rest[align(len).min(rest.len())..];
    }
    None
}

/// Sends `message` on a fresh netlink socket of `protocol` and waits for its ACK.
pub fn request(protocol: i32, message: &[u8], seq: u32, what: &str) -> Result<()> {
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(AgentError::last_os(format!("{what}: netlink socket")));
    }
    // SAFETY: fd was just returned by socket and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // A reply that never comes (it always should) must not hang the request forever.
    let timeout = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads a timeval we own, of the size given.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    // SAFETY: sockaddr_nl is plain data; zero is a valid value (pid 0 = kernel, no groups).
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: the buffer and the address live across the call with the lengths given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            message.as_ptr().cast(),
            message.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(AgentError::last_os(format!("{what}: netlink send")));
    }
    let mut buffer = vec![0u8; 8192];
    loop {
        // SAFETY: recv writes at most buffer.len() bytes into the buffer we own.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        if received < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(AgentError::os(format!("{what}: netlink receive"), error));
        }
        match ack_errno(&buffer[..received as usize], seq) {
            Some(0) => return Ok(()),
            Some(errno) => {
                return Err(AgentError::os(
                    what.to_owned(),
                    std::io::Error::from_raw_os_error(errno),
                ))
            }
            None => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(bytes: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([bytes[at], bytes[at + 1]])
    }

    #[test]
    fn neigh_message_layout_matches_rtnetlink() {
        let bytes = neigh_message(
            7,
            2,
            Ipv4Addr::new(10, 0, 2, 2),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        );
        // header 16 + ndmsg 12 + NDA_DST 8 + NDA_LLADDR (4 + 6 -> 12)
        assert_eq!(bytes.len(), 48);
        assert_eq!(
            u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            48
        );
        assert_eq!(u16_at(&bytes, 4), libc::RTM_NEWNEIGH);
        assert_eq!(u16_at(&bytes, 6), 0x505, "REQUEST|ACK|REPLACE|CREATE");
        assert_eq!(bytes[16], libc::AF_INET as u8);
        assert_eq!(u16_at(&bytes, 24), 0x80, "NUD_PERMANENT");
        assert_eq!(bytes[27], 1, "RTN_UNICAST");
        assert_eq!(&bytes[28..36], &[8, 0, 1, 0, 10, 0, 2, 2]);
        assert_eq!(
            &bytes[36..46],
            &[10, 0, 2, 0, 0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        assert_eq!(&bytes[46..48], &[0, 0], "padding");
    }

    #[test]
    fn rdma_newlink_message_carries_name_type_and_netdev() {
        let bytes = rdma_newlink_message(3, "rxe0", "rxe", "eth0");
        // RDMA_NL_NLDEV = 5, RDMA_NLDEV_CMD_NEWLINK = 3 (include/uapi/rdma/rdma_netlink.h)
        assert_eq!(u16_at(&bytes, 4), (5 << 10) + 3);
        assert_eq!(u16_at(&bytes, 6), 0x5, "REQUEST|ACK");
        let mut attrs = Vec::new();
        let mut at = HEADER_LEN;
        while at < bytes.len() {
            let len = u16_at(&bytes, at) as usize;
            let kind = u16_at(&bytes, at + 2);
            attrs.push((kind, bytes[at + 4..at + len].to_vec()));
            at += align(len);
        }
        assert_eq!(at, bytes.len());
        assert_eq!(
            attrs,
            [
                (sys::RDMA_NLDEV_ATTR_DEV_NAME as u16, b"rxe0\0".to_vec()),
                (sys::RDMA_NLDEV_ATTR_LINK_TYPE as u16, b"rxe\0".to_vec()),
                (sys::RDMA_NLDEV_ATTR_NDEV_NAME as u16, b"eth0\0".to_vec()),
            ]
        );
        assert_eq!(sys::RDMA_NLDEV_ATTR_DEV_NAME, 2);
    }

    #[test]
    fn acks_and_errors_are_found_by_sequence() {
        let ack = |seq: u32, error: i32| {
            let mut payload = error.to_ne_bytes().to_vec();
            payload.extend_from_slice(&[0u8; 16]);
            Message::new(libc::NLMSG_ERROR as u16, 0, seq)
                .raw(&payload)
                .finish()
        };
        assert_eq!(ack_errno(&ack(4, 0), 4), Some(0));
        assert_eq!(ack_errno(&ack(4, -libc::EEXIST), 4), Some(libc::EEXIST));
        assert_eq!(ack_errno(&ack(3, -1), 4), None, "another request's answer");
        let mut two = ack(3, -1);
        two.extend(ack(4, -libc::EOPNOTSUPP));
        assert_eq!(ack_errno(&two, 4), Some(libc::EOPNOTSUPP));
        assert_eq!(ack_errno(&[0xff; 7], 4), None);
        let mut lying = ack(4, 0);
        lying[0] = 200;
        assert_eq!(ack_errno(&lying, 4), None, "length past the buffer");
    }
}
