//! The verbs operations the dispatcher needs, behind a trait so that argument checks and
//! handle bookkeeping are tested on the host; [`crate::verbs::Verbs`] is the real thing.
//!
//! Arguments reach an implementation already checked and converted to verbs' own numbers
//! (IBV_ACCESS_* bits, enum ibv_mtu); what the kernel or libibverbs then answers is passed
//! back with its errno.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use p2prig_protocol::agent::{Access, Completion, SendOpcode};

use crate::error::{AgentError, Result};

/// IBV_ACCESS_* bits (include/infiniband/verbs.h, enum ibv_access_flags).
pub mod access_bits {
    pub const LOCAL_WRITE: u32 = 1;
    pub const REMOTE_WRITE: u32 = 2;
    pub const REMOTE_READ: u32 = 4;
    pub const REMOTE_ATOMIC: u32 = 8;
}

/// The IBV_ACCESS_* mask of a list of access rights.
pub fn access_mask(access: &[Access]) -> u32 {
    access.iter().fold(0, |mask, right| {
        mask | match right {
            Access::LocalWrite => access_bits::LOCAL_WRITE,
            Access::RemoteWrite => access_bits::REMOTE_WRITE,
            Access::RemoteRead => access_bits::REMOTE_READ,
            Access::RemoteAtomic => access_bits::REMOTE_ATOMIC,
        }
    })
}

/// enum ibv_mtu of a path MTU in bytes: IBV_MTU_256 = 1 ... IBV_MTU_4096 = 5 (IBTA 9.x).
pub fn mtu_enum(bytes: u32) -> Result<u32> {
    match bytes {
        256 => Ok(1),
        512 => Ok(2),
        1024 => Ok(3),
        2048 => Ok(4),
        4096 => Ok(5),
        _ => Err(AgentError::Invalid(format!(
            "path_mtu {bytes} is not one of 256, 512, 1024, 2048, 4096"
        ))),
    }
}

/// A GID from its IPv6 notation, or from an IPv4 address as RoCE v2 maps it (::ffff:a.b.c.d).
pub fn parse_gid(text: &str) -> Result<[u8; 16]> {
    if let Ok(v4) = text.parse::<Ipv4Addr>() {
        return Ok(v4.to_ipv6_mapped().octets());
    }
    text.parse::<Ipv6Addr>().map(|v6| v6.octets()).map_err(|_| {
        AgentError::Invalid(format!(
            "gid {text:?} is neither an IPv6 nor an IPv4 address"
        ))
    })
}

/// The IPv6 notation of a GID ("::ffff:10.0.2.15" for an IPv4-mapped one).
pub fn format_gid(gid: &[u8; 16]) -> String {
    let v6 = Ipv6Addr::from(*gid);
    match v6.to_ipv4_mapped() {
        Some(v4) => format!("::ffff:{v4}"),
        None => v6.to_string(),
    }
}

/// Bytes of a hex string (even length, upper or lower case).
pub fn from_hex(text: &str) -> Result<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return Err(AgentError::Invalid(format!(
            "hex data has an odd number of digits ({})",
            text.len()
        )));
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            // from_str_radix alone would take a sign ("+1").
            std::str::from_utf8(pair)
                .ok()
                .filter(|digits| digits.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|digits| u8::from_str_radix(digits, 16).ok())
                .ok_or_else(|| AgentError::Invalid(format!("{pair:?} is not a hex byte")))
        })
        .collect()
}

/// What a registered MR is, as the dispatcher needs it for checks and replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MrInfo {
    pub lkey: u32,
    pub rkey: u32,
    pub addr: u64,
    pub length: u64,
    /// Agent memory that mr_read/mr_write may touch (false for a dma-buf MR).
    pub cpu_accessible: bool,
}

/// INIT -> RTR parameters, already converted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtrParams {
    pub remote_qpn: u32,
    pub remote_psn: u32,
    pub remote_gid: [u8; 16],
    /// enum ibv_mtu.
    pub path_mtu: u32,
    pub gid_index: u32,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
}

/// RTR -> RTS parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtsParams {
    pub psn: u32,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub max_rd_atomic: u8,
}

/// A QP state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Init { access: u32 },
    Rtr(RtrParams),
    Rts(RtsParams),
    Reset,
    Error,
}

/// What ibv_query_qp says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QpState {
    pub qpn: u32,
    pub state: String,
    pub sq_psn: u32,
    pub rq_psn: u32,
    pub dest_qpn: u32,
}

/// One local scatter/gather element, resolved against its MR by the implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sge {
    pub mr: u32,
    pub offset: u64,
    pub length: u32,
}

/// A send work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendRequest {
    pub wr_id: u64,
    pub opcode: SendOpcode,
    pub sge: Option<Sge>,
    pub remote_addr: u64,
    pub rkey: u32,
    pub signaled: bool,
}

/// Verbs objects by handle. Implementations own the objects and their handle tables, refuse
/// (EBUSY) to destroy an object that others still use, and answer EBADF for unknown handles.
pub trait Rdma: Send + Sync {
    fn open(&self, name: &str) -> Result<u32>;
    fn close(&self, context: u32) -> Result<()>;
    /// The RoCE v2 IPv4-mapped GID of port 1: (gid, index).
    fn roce_v2_ipv4_gid(&self, context: u32) -> Result<([u8; 16], u32)>;
    fn alloc_pd(&self, context: u32) -> Result<u32>;
    fn dealloc_pd(&self, pd: u32) -> Result<()>;
    fn create_cq(&self, context: u32, entries: u32) -> Result<u32>;
    fn destroy_cq(&self, cq: u32) -> Result<()>;
    /// Returns (handle, qp number).
    fn create_qp(
        &self,
        pd: u32,
        send_cq: u32,
        recv_cq: u32,
        max_send_wr: u32,
        max_recv_wr: u32,
    ) -> Result<(u32, u32)>;
    fn destroy_qp(&self, qp: u32) -> Result<()>;
    /// The context a QP belongs to (to find the default GID index for RTR).
    fn qp_context(&self, qp: u32) -> Result<u32>;
    fn modify_qp(&self, qp: u32, transition: Transition) -> Result<()>;
    fn query_qp(&self, qp: u32) -> Result<QpState>;
    fn reg_mr(&self, pd: u32, length: u64, access: u32) -> Result<u32>;
    fn reg_dmabuf_mr(
        &self,
        pd: u32,
        fd: RawFd,
        offset: u64,
        length: u64,
        iova: u64,
        access: u32,
    ) -> Result<u32>;
    fn dereg_mr(&self, mr: u32) -> Result<()>;
    fn mr_info(&self, mr: u32) -> Result<MrInfo>;
    /// Bounds are checked by the caller against [`Rdma::mr_info`].
    fn mr_write(&self, mr: u32, offset: u64, data: &[u8]) -> Result<()>;
    fn mr_read(&self, mr: u32, offset: u64, length: u64) -> Result<Vec<u8>>;
    fn post_send(&self, qp: u32, request: &SendRequest) -> Result<()>;
    fn post_recv(&self, qp: u32, wr_id: u64, sge: &Sge) -> Result<()>;
    /// Polls until `count` completions or `timeout` passed.
    fn poll_cq(&self, cq: u32, count: u32, timeout: std::time::Duration)
        -> Result<Vec<Completion>>;
}

/// Checks that `length` bytes at `offset` lie inside an MR of `size` bytes.
pub fn check_range(what: &str, size: u64, offset: u64, length: u64) -> Result<()> {
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(AgentError::Invalid(format!(
            "{length} bytes at {offset:#x} run past the end of {what} ({size:#x} bytes)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_parse_from_ipv4_and_ipv6_and_print_back() -> Result<()> {
        let gid = parse_gid("10.0.2.2")?;
        assert_eq!(&gid[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&gid[12..], &[10, 0, 2, 2]);
        assert_eq!(format_gid(&gid), "::ffff:10.0.2.2");
        assert_eq!(parse_gid("::ffff:10.0.2.2")?, gid);
        let link_local = parse_gid("fe80::5054:ff:fe12:3456")?;
        assert_eq!(format_gid(&link_local), "fe80::5054:ff:fe12:3456");
        for bad in ["", "10.0.2", "::gg", "10.0.2.2/24"] {
            assert_eq!(
                parse_gid(bad).map_err(|e| e.errno()),
                Err(libc::EINVAL),
                "{bad}"
            );
        }
        Ok(())
    }

    #[test]
    fn mtu_and_access_follow_verbs_numbering() {
        assert_eq!(mtu_enum(256).ok(), Some(1));
        assert_eq!(mtu_enum(1024).ok(), Some(3));
        assert_eq!(mtu_enum(4096).ok(), Some(5));
        assert!(mtu_enum(1500).is_err());
        assert!(mtu_enum(0).is_err());
        assert_eq!(
            access_mask(&[Access::LocalWrite, Access::RemoteRead]),
            access_bits::LOCAL_WRITE | access_bits::REMOTE_READ
        );
        assert_eq!(access_mask(&[]), 0);
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() -> Result<()> {
        assert_eq!(from_hex("0123abCD")?, [0x01, 0x23, 0xab, 0xcd]);
        assert_eq!(
            p2prig_protocol::hex::encode(&[0x01, 0x23, 0xab, 0xcd]),
            "0123abcd"
        );
        assert!(from_hex("abc").is_err());
        assert!(from_hex("zz").is_err());
        assert!(from_hex("+1").is_err());
        assert_eq!(from_hex("")?, Vec::<u8>::new());
        Ok(())
    }

    #[test]
    fn ranges_are_checked_without_overflow() {
        assert!(check_range("MR 1", 8, 0, 8).is_ok());
        assert!(check_range("MR 1", 8, 8, 0).is_ok());
        assert!(check_range("MR 1", 8, 1, 8).is_err());
        assert!(check_range("MR 1", 8, u64::MAX, 2).is_err());
    }
}
