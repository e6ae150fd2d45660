//! The vfio-user wire format (QEMU docs/interop/vfio-user.rst), owned here because the
//! `vfio_user` crate 0.1.7 reads fixed-size structs instead of the message size the header
//! announces. Pure: bytes in, a [`Message`] or a [`FramingError`] out, no socket, no panic on
//! any input, so it can be unit-tested and fuzzed from a byte slice ([`decode_message`]).
//!
//! The contract (README.md "vfio-user framing"):
//! - the header's message size governs: a payload longer than a command's fixed struct is
//!   accepted and its tail ignored (a REGION_INFO padded to `argsz`, say); a shorter one is
//!   refused;
//! - a message larger than [`MAX_MESSAGE_SIZE`] is refused from its header alone, before
//!   anything is allocated, and so is one whose size is below the header's own;
//! - every refusal maps to a non-zero errno ([`FramingError::errno`]).
//!
//! All integers are in host byte order, as the protocol says.

use std::fmt;

use vfio_bindings::bindings::vfio::{
    vfio_irq_info, vfio_region_info, vfio_region_sparse_mmap_area, VFIO_IRQ_SET_DATA_BOOL,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
};

use crate::device::MAX_TRANSFER;

/// Every message starts with this header: id u16, command u16, size u32, flags u32, error u32.
pub const HEADER_SIZE: usize = 16;
/// REGION_READ/REGION_WRITE payload before the data: offset u64, region u32, count u32.
pub const REGION_ACCESS_SIZE: usize = 16;
/// Largest `count` of a region access; advertised as `max_data_xfer_size` in VERSION.
pub const MAX_DATA_XFER_SIZE: usize = MAX_TRANSFER;
/// Largest message accepted: a REGION_WRITE of `MAX_DATA_XFER_SIZE` bytes (1 MiB + 32), the
/// largest request the protocol lets a client send once the limit is advertised. The same bound
/// as libvfio-user's `SERVER_MAX_MSG_SIZE`.
pub const MAX_MESSAGE_SIZE: usize = HEADER_SIZE + REGION_ACCESS_SIZE + MAX_DATA_XFER_SIZE;
/// File descriptors accepted with one message; advertised as `max_msg_fds` (QEMU's own maximum).
pub const MAX_MSG_FDS: usize = 16;

/// Header flags: the type bits (0 command, 1 reply), NO_REPLY and ERROR.
pub const FLAG_TYPE_MASK: u32 = 0xf;
pub const FLAG_REPLY: u32 = 0x1;
pub const FLAG_NO_REPLY: u32 = 0x10;
pub const FLAG_ERROR: u32 = 0x20;

/// Fixed payload sizes of the requests (the header excluded), from the spec's tables.
const VERSION_SIZE: usize = 4;
const DMA_MAP_SIZE: usize = 32;
const DMA_UNMAP_SIZE: usize = 24;
const DEVICE_INFO_SIZE: usize = 16;
const REGION_INFO_SIZE: usize = std::mem::size_of::<vfio_region_info>();
const IRQ_INFO_SIZE: usize = std::mem::size_of::<vfio_irq_info>();
const IRQ_SET_SIZE: usize = 20;

/// vfio-user command numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    GetInfo = 4,
    GetRegionInfo = 5,
    GetRegionIoFds = 6,
    GetIrqInfo = 7,
    SetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DmaRead = 11,
    DmaWrite = 12,
    DeviceReset = 13,
    DirtyPages = 14,
    RegionWriteMulti = 15,
    DeviceFeature = 16,
    MigDataRead = 17,
    MigDataWrite = 18,
}

impl Command {
    pub fn from_wire(number: u16) -> Option<Command> {
        use Command::*;
        Some(match number {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => GetInfo,
            5 => GetRegionInfo,
            6 => GetRegionIoFds,
            7 => GetIrqInfo,
            8 => SetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            14 => DirtyPages,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }

    /// Commands whose only effect is their reply: a NO_REPLY flag on them is a client error.
    fn needs_reply(self) -> bool {
        use Command::*;
        matches!(
            self,
            Version | GetInfo | GetRegionInfo | GetIrqInfo | RegionRead
        )
    }
}

impl fmt::Display for Command {
    /// The spec's name without its VFIO_USER_ prefix.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Command::*;
        f.write_str(match self {
            Version => "VERSION",
            DmaMap => "DMA_MAP",
            DmaUnmap => "DMA_UNMAP",
            GetInfo => "DEVICE_GET_INFO",
            GetRegionInfo => "DEVICE_GET_REGION_INFO",
            GetRegionIoFds => "DEVICE_GET_REGION_IO_FDS",
            GetIrqInfo => "DEVICE_GET_IRQ_INFO",
            SetIrqs => "DEVICE_SET_IRQS",
            RegionRead => "REGION_READ",
            RegionWrite => "REGION_WRITE",
            DmaRead => "DMA_READ",
            DmaWrite => "DMA_WRITE",
            DeviceReset => "DEVICE_RESET",
            DirtyPages => "DIRTY_PAGES",
            RegionWriteMulti => "REGION_WRITE_MULTI",
            DeviceFeature => "DEVICE_FEATURE",
            MigDataRead => "MIG_DATA_READ",
            MigDataWrite => "MIG_DATA_WRITE",
        })
    }
}

/// Why a message was refused. Each maps to the errno of its error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("{0} bytes are too few for a 16-byte header")]
    Truncated(usize),
    #[error("header claims {0} bytes, less than the 16-byte header itself")]
    SizeBelowHeader(u32),
    #[error("header claims {0} bytes, over the {MAX_MESSAGE_SIZE}-byte maximum")]
    TooLarge(u32),
    #[error("header claims {size} bytes but the message has {len}")]
    LengthMismatch { size: u32, len: usize },
    #[error("flags {0:#x} do not mark a command")]
    NotACommand(u32),
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("{0} is not implemented by this device")]
    Unsupported(Command),
    #[error("{command} with NO_REPLY: its reply is its only effect")]
    ReplyExpected { command: Command },
    #[error("{command} payload of {len} bytes is shorter than its {needed}-byte struct")]
    ShortPayload {
        command: Command,
        len: usize,
        needed: usize,
    },
    #[error("{command} argsz {argsz} is below the {needed} bytes of its reply")]
    ArgszTooSmall {
        command: Command,
        argsz: u32,
        needed: usize,
    },
    #[error("REGION_WRITE count {count} but {data} data bytes in the message")]
    CountMismatch { count: u32, data: usize },
    #[error("REGION_READ count {0} is over max_data_xfer_size {MAX_DATA_XFER_SIZE}")]
    TransferTooLarge(u32),
    #[error("VERSION data: {0}")]
    VersionData(String),
}

impl FramingError {
    /// The errno of the error reply (never 0: QEMU reads 0 as success).
    /// - ENOSYS for a command the device does not implement (unknown, or known and not served),
    ///   so a client can tell "not implemented" from "malformed", which libvfio-user's EINVAL
    ///   conflates; a command number is what a syscall number is to ENOSYS.
    /// - EMSGSIZE for a message over the maximum size.
    /// - EINVAL for everything malformed.
    pub fn errno(&self) -> i32 {
        match self {
            FramingError::UnknownCommand(_) | FramingError::Unsupported(_) => libc::ENOSYS,
            FramingError::TooLarge(_) => libc::EMSGSIZE,
            _ => libc::EINVAL,
        }
    }

    /// True when the stream position is lost (the message's end is unknown or its payload is
    /// not read): the connection must close after the error reply.
    pub fn ends_connection(&self) -> bool {
        matches!(
            self,
            FramingError::Truncated(_)
                | FramingError::SizeBelowHeader(_)
                | FramingError::TooLarge(_)
                | FramingError::LengthMismatch { .. }
        )
    }
}

/// The 16-byte header of every message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub command: u16,
    /// The whole message, header included.
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn parse(bytes: &[u8; HEADER_SIZE]) -> Header {
        let [i0, i1, c0, c1, s0, s1, s2, s3, f0, f1, f2, f3, e0, e1, e2, e3] = *bytes;
        Header {
            id: u16::from_ne_bytes([i0, i1]),
            command: u16::from_ne_bytes([c0, c1]),
            size: u32::from_ne_bytes([s0, s1, s2, s3]),
            flags: u32::from_ne_bytes([f0, f1, f2, f3]),
            error: u32::from_ne_bytes([e0, e1, e2, e3]),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..2].copy_from_slice(&self.id.to_ne_bytes());
        out[2..4].copy_from_slice(&self.command.to_ne_bytes());
        out[4..8].copy_from_slice(&self.size.to_ne_bytes());
        out[8..12].copy_from_slice(&self.flags.to_ne_bytes());
        out[12..16].copy_from_slice(&self.error.to_ne_bytes());
        out
    }

    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }

    /// The payload length this header announces, if it is within bounds: the only check
    /// needed before reading (and allocating for) the payload.
    pub fn payload_len(&self) -> Result<usize, FramingError> {
        let size = self.size as usize;
        if size < HEADER_SIZE {
            Err(FramingError::SizeBelowHeader(self.size))
        } else if size > MAX_MESSAGE_SIZE {
            Err(FramingError::TooLarge(self.size))
        } else {
            Ok(size - HEADER_SIZE)
        }
    }

    /// The header of an error reply to this message.
    pub fn error_reply(&self, errno: i32) -> Header {
        Header {
            id: self.id,
            command: self.command,
            size: HEADER_SIZE as u32,
            flags: FLAG_REPLY | FLAG_ERROR,
            // A zero errno reads as success to QEMU; EIO rather than a lie if one slips in.
            error: u32::try_from(errno)
                .ok()
                .filter(|&e| e != 0)
                .unwrap_or(libc::EIO as u32),
        }
    }
}

/// DMA_MAP: the client's memory at `address` (`size` bytes), `offset` into the fd if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub offset: u64,
    pub address: u64,
    pub size: u64,
}

/// DMA_UNMAP: the mapping at `address`/`size`, or all of them with VFIO_DMA_UNMAP_FLAG_ALL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub address: u64,
    pub size: u64,
}

/// SET_IRQS (`struct vfio_irq_set` without its data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqSet {
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

/// REGION_READ/REGION_WRITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

/// A decoded request. Only the fields the server acts on are kept; every size is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// The version data, if any, was checked to be a NUL-terminated JSON object.
    Version {
        major: u16,
        minor: u16,
    },
    DmaMap(DmaMap),
    DmaUnmap(DmaUnmap),
    GetInfo,
    GetRegionInfo {
        argsz: u32,
        index: u32,
    },
    GetIrqInfo {
        index: u32,
    },
    /// `bools` holds `count` bytes with VFIO_IRQ_SET_DATA_BOOL, else nothing.
    SetIrqs {
        set: IrqSet,
        bools: &'a [u8],
    },
    RegionRead(RegionAccess),
    /// `data.len() == access.count`.
    RegionWrite {
        access: RegionAccess,
        data: &'a [u8],
    },
    DeviceReset,
}

/// A whole message: header and request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub header: Header,
    pub request: Request<'a>,
}

/// The header at the start of `bytes`.
pub fn decode_header(bytes: &[u8]) -> Result<Header, FramingError> {
    bytes
        .get(..HEADER_SIZE)
        .and_then(|b| <&[u8; HEADER_SIZE]>::try_from(b).ok())
        .map(Header::parse)
        .ok_or(FramingError::Truncated(bytes.len()))
}

/// Decodes one whole message, header and payload, whose length must be the header's size.
pub fn decode_message(header_and_payload: &[u8]) -> Result<Message<'_>, FramingError> {
    let header = decode_header(header_and_payload)?;
    let len = header.payload_len()?;
    let payload = header_and_payload
        .get(HEADER_SIZE..)
        .filter(|p| p.len() == len)
        .ok_or(FramingError::LengthMismatch {
            size: header.size,
            len: header_and_payload.len(),
        })?;
    let request = decode_request(&header, payload)?;
    Ok(Message { header, request })
}

/// Reads fields in order from a payload, refusing one too short for its struct.
struct Fields<'a> {
    rest: &'a [u8],
    command: Command,
    len: usize,
    needed: usize,
}

impl<'a> Fields<'a> {
    fn new(command: Command, payload: &'a [u8], needed: usize) -> Result<Self, FramingError> {
        if payload.len() < needed {
            return Err(FramingError::ShortPayload {
                command,
                len: payload.len(),
                needed,
            });
        }
        Ok(Fields {
            rest: payload,
            command,
            len: payload.len(),
            needed,
        })
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], FramingError> {
        let (head, tail) = self.rest.split_first_chunk::<N>().ok_or({
            FramingError::ShortPayload {
                command: self.command,
                len: self.len,
                needed: self.needed,
            }
        })?;
        self.rest = tail;
        Ok(*head)
    }

    fn u16(&mut self) -> Result<u16, FramingError> {
        self.take().map(u16::from_ne_bytes)
    }

    fn u32(&mut self) -> Result<u32, FramingError> {
        self.take().map(u32::from_ne_bytes)
    }

    fn u64(&mut self) -> Result<u64, FramingError> {
        self.take().map(u64::from_ne_bytes)
    }

    /// `argsz` of a request that has a reply: it must have room for the fixed reply.
    fn argsz(&mut self, needed: usize) -> Result<u32, FramingError> {
        let argsz = self.u32()?;
        if (argsz as usize) < needed {
            return Err(FramingError::ArgszTooSmall {
                command: self.command,
                argsz,
                needed,
            });
        }
        Ok(argsz)
    }
}

/// Decodes the payload of a message whose header was already read (and bounded).
pub fn decode_request<'a>(header: &Header, payload: &'a [u8]) -> Result<Request<'a>, FramingError> {
    if header.flags & FLAG_TYPE_MASK != 0 {
        return Err(FramingError::NotACommand(header.flags));
    }
    let command =
        Command::from_wire(header.command).ok_or(FramingError::UnknownCommand(header.command))?;
    if header.no_reply() && command.needs_reply() {
        return Err(FramingError::ReplyExpected { command });
    }
    Ok(match command {
        Command::Version => {
            let mut f = Fields::new(command, payload, VERSION_SIZE)?;
            let (major, minor) = (f.u16()?, f.u16()?);
            if !f.rest.is_empty() {
                check_version_data(f.rest)?;
            }
            Request::Version { major, minor }
        }
        Command::DmaMap => {
            let mut f = Fields::new(command, payload, DMA_MAP_SIZE)?;
            // Here argsz is the request's own size, not room for a reply.
            Request::DmaMap(DmaMap {
                argsz: f.argsz(DMA_MAP_SIZE)?,
                flags: f.u32()?,
                offset: f.u64()?,
                address: f.u64()?,
                size: f.u64()?,
            })
        }
        Command::DmaUnmap => {
            let mut f = Fields::new(command, payload, DMA_UNMAP_SIZE)?;
            // The reply echoes the 24-byte struct.
            Request::DmaUnmap(DmaUnmap {
                argsz: f.argsz(DMA_UNMAP_SIZE)?,
                flags: f.u32()?,
                address: f.u64()?,
                size: f.u64()?,
            })
        }
        Command::GetInfo => {
            let mut f = Fields::new(command, payload, DEVICE_INFO_SIZE)?;
            f.argsz(DEVICE_INFO_SIZE)?;
            Request::GetInfo
        }
        Command::GetRegionInfo => {
            let mut f = Fields::new(command, payload, REGION_INFO_SIZE)?;
            let argsz = f.argsz(REGION_INFO_SIZE)?;
            let _flags = f.u32()?;
            Request::GetRegionInfo {
                argsz,
                index: f.u32()?,
            }
        }
        Command::GetIrqInfo => {
            let mut f = Fields::new(command, payload, IRQ_INFO_SIZE)?;
            f.argsz(IRQ_INFO_SIZE)?;
            let _flags = f.u32()?;
            Request::GetIrqInfo { index: f.u32()? }
        }
        Command::SetIrqs => {
            let mut f = Fields::new(command, payload, IRQ_SET_SIZE)?;
            // argsz counts the request with its data; it has no reply payload.
            f.argsz(IRQ_SET_SIZE)?;
            let set = IrqSet {
                flags: f.u32()?,
                index: f.u32()?,
                start: f.u32()?,
                count: f.u32()?,
            };
            let bools = if set.flags & VFIO_IRQ_SET_DATA_BOOL != 0 {
                f.rest
                    .get(..set.count as usize)
                    .ok_or(FramingError::ShortPayload {
                        command,
                        len: payload.len(),
                        needed: IRQ_SET_SIZE.saturating_add(set.count as usize),
                    })?
            } else {
                &[]
            };
            Request::SetIrqs { set, bools }
        }
        Command::RegionRead => {
            let access = region_access(command, payload)?.0;
            if access.count as usize > MAX_DATA_XFER_SIZE {
                return Err(FramingError::TransferTooLarge(access.count));
            }
            Request::RegionRead(access)
        }
        Command::RegionWrite => {
            // No separate count limit: MAX_MESSAGE_SIZE already bounds the data.
            let (access, data) = region_access(command, payload)?;
            if access.count as usize != data.len() {
                return Err(FramingError::CountMismatch {
                    count: access.count,
                    data: data.len(),
                });
            }
            Request::RegionWrite { access, data }
        }
        Command::DeviceReset => Request::DeviceReset,
        Command::GetRegionIoFds
        | Command::DmaRead
        | Command::DmaWrite
        | Command::DirtyPages
        | Command::RegionWriteMulti
        | Command::DeviceFeature
        | Command::MigDataRead
        | Command::MigDataWrite => return Err(FramingError::Unsupported(command)),
    })
}

fn region_access(command: Command, payload: &[u8]) -> Result<(RegionAccess, &[u8]), FramingError> {
    let mut f = Fields::new(command, payload, REGION_ACCESS_SIZE)?;
    let access = RegionAccess {
        offset: f.u64()?,
        region: f.u32()?,
        count: f.u32()?,
    };
    Ok((access, f.rest))
}

/// Version data: UTF-8 JSON, NUL-terminated, an object whose optional `capabilities` is an
/// object whose numeric capabilities, when present, are unsigned integers.
fn check_version_data(data: &[u8]) -> Result<(), FramingError> {
    let bad = |why: String| FramingError::VersionData(why);
    let Some((&0, json)) = data.split_last() else {
        return Err(bad("not NUL-terminated".into()));
    };
    let text = std::str::from_utf8(json).map_err(|e| bad(format!("not UTF-8: {e}")))?;
    // serde_json caps nesting at 128 levels, so hostile input cannot exhaust the stack.
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let Some(capabilities) = object.get("capabilities") else {
        return Ok(());
    };
    let capabilities = capabilities
        .as_object()
        .ok_or_else(|| bad("capabilities is not an object".into()))?;
    for name in [
        "max_msg_fds",
        "max_data_xfer_size",
        "pgsizes",
        "max_dma_maps",
    ] {
        if capabilities.get(name).is_some_and(|v| v.as_u64().is_none()) {
            return Err(bad(format!("{name} is not an unsigned integer")));
        }
    }
    Ok(())
}

/// Builds a reply in `out`: [`begin_reply`], the payload with the `put_*` helpers, then
/// [`finish_reply`] writes the header with the final size.
pub fn begin_reply(out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[0u8; HEADER_SIZE]);
}

pub fn finish_reply(out: &mut [u8], request: &Header) {
    let header = Header {
        id: request.id,
        command: request.command,
        // Replies are bounded by MAX_MESSAGE_SIZE (reads) or are a few dozen bytes.
        size: u32::try_from(out.len()).unwrap_or(u32::MAX),
        flags: FLAG_REPLY,
        error: 0,
    };
    if let Some(head) = out.first_chunk_mut::<HEADER_SIZE>() {
        *head = header.encode();
    }
}

pub fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_ne_bytes());
}

pub fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_ne_bytes());
}

pub fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_ne_bytes());
}

pub fn put_region_info(out: &mut Vec<u8>, info: &vfio_region_info) {
    put_u32(out, info.argsz);
    put_u32(out, info.flags);
    put_u32(out, info.index);
    put_u32(out, info.cap_offset);
    put_u64(out, info.size);
    put_u64(out, info.offset);
}

/// Size of a sparse-mmap capability with `areas` areas (header 8, nr_areas 4, reserved 4).
pub fn sparse_mmap_cap_size(areas: usize) -> usize {
    16 + areas * std::mem::size_of::<vfio_region_sparse_mmap_area>()
}

/// The sparse-mmap capability, last in its list (`next` 0).
pub fn put_sparse_mmap_cap(out: &mut Vec<u8>, areas: &[vfio_region_sparse_mmap_area]) {
    put_u16(out, VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16);
    put_u16(out, 1);
    put_u32(out, 0);
    put_u32(out, areas.len() as u32);
    put_u32(out, 0);
    for area in areas {
        put_u64(out, area.offset);
        put_u64(out, area.size);
    }
}

pub fn put_irq_info(out: &mut Vec<u8>, info: &vfio_irq_info) {
    put_u32(out, info.argsz);
    put_u32(out, info.flags);
    put_u32(out, info.index);
    put_u32(out, info.count);
}

pub fn put_region_access(out: &mut Vec<u8>, access: &RegionAccess) {
    put_u64(out, access.offset);
    put_u32(out, access.region);
    put_u32(out, access.count);
}

#[cfg(test)]
mod tests;
