//! A vhost-user message filter between QEMU and the vhost crate's request handler.
//!
//! QEMU's virtio-net enables its vhost-user peer's rings (VHOST_USER_SET_VRING_ENABLE)
//! while it realizes and resets the device, long before VHOST_USER_SET_FEATURES, which it
//! sends only when the guest driver starts the device. The vhost crate (0.18) refuses
//! SET_VRING_ENABLE until VHOST_USER_F_PROTOCOL_FEATURES has been acked by SET_FEATURES
//! and drops the connection. QEMU in turn refuses to start vhost-user-net without the
//! protocol feature. So the socket QEMU connects to is ours: until the first SET_FEATURES
//! of a connection, SET_VRING_ENABLE is answered here, and the last state asked for each
//! ring is replayed to the crate right after that SET_FEATURES (QEMU 10 does not send it
//! again when the device starts; seen with ROCE_TARGET_TRACE_VHOST=1). Every other
//! message, with its file descriptors, is passed through unchanged, except a memory table
//! (SET_MEM_TABLE, ADD_MEM_REG) with a region reaching past the end of its fd: the crate
//! would map it, and the first access past the end (SET_VRING_ADDR reads the used ring)
//! would kill the process with SIGBUS. Such a table ends the connection instead.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use vhost::vhost_user::message::FrontendReq;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// vhost-user header: request, flags, payload size (all u32 little-endian).
/// A vhost-user message header: request, flags, payload size (u32 each).
pub const HEADER_LEN: usize = 12;
/// More than any message carries (SET_MEM_TABLE: 8 regions).
const MAX_FDS: usize = 32;
/// Largest payload accepted (vhost-user messages are a few hundred bytes at most).
pub const MAX_PAYLOAD: usize = 64 << 10;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One region of SET_MEM_TABLE or ADD_MEM_REG (vhost-user spec, "Memory region
/// description"): guest address, size, front-end address, offset into the fd; u64 each.
const REGION_LEN: usize = 32;

/// Refuses a memory table whose regions do not fit inside their fds: each region maps
/// `memory_size` bytes from `mmap_offset` of its fd, and a shared mapping past the end of
/// the file faults (SIGBUS) on first touch.
fn check_memory_table(request: u32, payload: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let (name, regions) = if request == FrontendReq::SET_MEM_TABLE as u32 {
        // u32 nregions, u32 padding, then the regions.
        let count = payload
            .get(..4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let regions = payload.get(8..).unwrap_or_default();
        (
            "SET_MEM_TABLE",
            regions.chunks_exact(REGION_LEN).take(count),
        )
    } else if request == FrontendReq::ADD_MEM_REG as u32 {
        // u64 padding, then one region.
        let region = payload.get(8..8 + REGION_LEN).unwrap_or_default();
        ("ADD_MEM_REG", region.chunks_exact(REGION_LEN).take(1))
    } else {
        return Ok(());
    };
    let refuse = |message: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user {name}: {message}; refusing it and closing the connection"),
        )
    };
    // Too few fds or a short payload are the crate's to refuse; only what it would map is
    // checked here.
    for (index, (region, fd)) in regions.zip(fds).enumerate() {
        let word = |i: usize| u64::from_le_bytes(region[i..i + 8].try_into().unwrap_or_default());
        let (guest, size, offset) = (word(0), word(8), word(24));
        let meta = File::from(fd.try_clone()?).metadata()?;
        if !meta.file_type().is_file() {
            return Err(refuse(format!(
                "region {index}'s fd is not a regular file or memfd"
            )));
        }
        let fits = size
            .checked_add(offset)
            .is_some_and(|end| end <= meta.len());
        if !fits {
            return Err(refuse(format!(
                "region {index} (guest {guest:#x}, {size} bytes from fd offset {offset}) reaches \
                 past the end of its fd ({} bytes)",
                meta.len()
            )));
        }
    }
    Ok(())
}

/// What a filtered connection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FilterReport {
    pub forwarded: u64,
    /// SET_VRING_ENABLE requests answered before SET_FEATURES.
    pub early_enables: u64,
    /// Ring enable states replayed to the handler after SET_FEATURES.
    pub replayed: u64,
}

/// Receives one message header and the descriptors that came with it.
fn recv_header(
    client: &UnixStream,
    header: &mut [u8; HEADER_LEN],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut raw: [RawFd; MAX_FDS] = [-1; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    }];
    // SAFETY: the iovec points at `header`, which is exclusively borrowed and may take any
    // bytes; `raw` has room for MAX_FDS descriptors.
    let (read, count) = unsafe { client.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fds = raw[..count.min(MAX_FDS)]
        .iter()
        .filter(|fd| **fd >= 0)
        // SAFETY: recvmsg just created these descriptors in this process; nobody else
        // owns them, and wrapping them at once closes them on every path.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect();
    Ok((read, fds))
}

/// Relays one QEMU connection to the handler at `backend_path` until either side closes;
/// rings `>= queues` are never enabled (the crate would end the connection over them).
pub fn filter_connection(
    client: UnixStream,
    backend_path: &Path,
    queues: u32,
) -> io::Result<FilterReport> {
    let backend = UnixStream::connect(backend_path)?;
    let mut replies_in = backend.try_clone()?;
    let mut replies_out = client.try_clone()?;
    let replies = std::thread::Builder::new()
        .name("vhost-user-replies".into())
        .spawn(move || {
            let _ = io::copy(&mut replies_in, &mut replies_out);
            let _ = replies_out.shutdown(Shutdown::Both);
        })?;
    let result = forward_requests(&client, &backend, queues);
    let _ = backend.shutdown(Shutdown::Both);
    let _ = client.shutdown(Shutdown::Both);
    let _ = replies.join();
    result
}

fn forward_requests(
    client: &UnixStream,
    backend: &UnixStream,
    queues: u32,
) -> io::Result<FilterReport> {
    let mut report = FilterReport::default();
    let mut features_set = false;
    // Ring index -> the last early SET_VRING_ENABLE for it, NEED_REPLY cleared.
    let mut early: std::collections::BTreeMap<u32, Vec<u8>> = std::collections::BTreeMap::new();
    let mut reader = client;
    // ROCE_TARGET_TRACE_VHOST=1 logs every request code: the way to see what a new QEMU
    // sends.
    let trace = std::env::var_os("ROCE_TARGET_TRACE_VHOST").is_some();
    loop {
        let mut header = [0u8; HEADER_LEN];
        let (read, fds) = recv_header(client, &mut header)?;
        if read == 0 {
            return Ok(report);
        }
        if read < HEADER_LEN {
            reader.read_exact(&mut header[read..])?;
        }
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("vhost-user request {request} claims a {size}-byte payload"),
            ));
        }
        let mut message = Vec::with_capacity(HEADER_LEN + size);
        message.extend_from_slice(&header);
        message.resize(HEADER_LEN + size, 0);
        reader.read_exact(&mut message[HEADER_LEN..])?;
        if trace {
            eprintln!(
                "vhost-user: request {request} flags {flags:#x} size {size} fds {}",
                fds.len()
            );
        }
        check_memory_table(request, &message[HEADER_LEN..], &fds)?;
        if request == FrontendReq::SET_FEATURES as u32 {
            features_set = true;
        }
        if request == FrontendReq::SET_VRING_ENABLE as u32 && !features_set {
            report.early_enables += 1;
            if flags & FLAG_NEED_REPLY != 0 {
                // REPLY_ACK (vhost-user spec): a u64 status, 0 for success.
                let mut reply = Vec::with_capacity(HEADER_LEN + 8);
                reply.extend_from_slice(&request.to_le_bytes());
                reply.extend_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
                reply.extend_from_slice(&8u32.to_le_bytes());
                reply.extend_from_slice(&0u64.to_le_bytes());
                let mut out = client;
                out.write_all(&reply)?;
            }
            let index = message
                .get(HEADER_LEN..HEADER_LEN + 4)
                .map_or(u32::MAX, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            if index < queues {
                message[4..8].copy_from_slice(&(flags & !FLAG_NEED_REPLY).to_le_bytes());
                early.insert(index, message);
            }
            continue;
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        backend
            .send_with_fds(&[&message[..]], &raw)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        report.forwarded += 1;
        if request == FrontendReq::SET_FEATURES as u32 {
            for (_, enable) in std::mem::take(&mut early) {
                let mut out = backend;
                out.write_all(&enable)?;
                report.replayed += 1;
            }
        }
        // `fds` drops here: the backend has its own duplicates now.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn early_vring_enables_are_answered_later_ones_forwarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("backend.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let (mut qemu, ours) = UnixStream::pair().expect("pair");
        let filter = std::thread::spawn(move || filter_connection(ours, &path, 2));
        let (mut backend, _) = listener.accept().expect("accept");
        let enable = message(18, 0x1 | FLAG_NEED_REPLY, &[0, 0, 0, 0, 1, 0, 0, 0]);
        qemu.write_all(&enable).expect("write");
        let mut reply = [0u8; 20];
        qemu.read_exact(&mut reply).expect("reply");
        assert_eq!(&reply[..4], &18u32.to_le_bytes());
        assert_eq!(&reply[12..], &[0; 8]);
        // An enable for a ring the device does not have is dropped for good.
        let ring_five = message(18, 0x1, &[5, 0, 0, 0, 1, 0, 0, 0]);
        qemu.write_all(&ring_five).expect("write");
        let features = message(2, 0x1, &(1u64 << 30).to_le_bytes());
        qemu.write_all(&features).expect("write");
        qemu.write_all(&enable).expect("write");
        let replayed = message(18, 0x1, &[0, 0, 0, 0, 1, 0, 0, 0]);
        let mut got = vec![0u8; features.len() + replayed.len() + enable.len()];
        backend.read_exact(&mut got).expect("forwarded");
        assert_eq!(&got[..features.len()], &features[..]);
        let rest = &got[features.len()..];
        assert_eq!(
            &rest[..replayed.len()],
            &replayed[..],
            "replayed without NEED_REPLY"
        );
        assert_eq!(&rest[replayed.len()..], &enable[..]);
        // A backend reply travels back untouched.
        backend.write_all(&reply).expect("write");
        let mut back = [0u8; 20];
        qemu.read_exact(&mut back).expect("read");
        assert_eq!(back, reply);
        drop(qemu);
        let report = filter.join().expect("join").expect("filter");
        assert_eq!(
            report,
            FilterReport {
                forwarded: 2,
                early_enables: 2,
                replayed: 1
            }
        );
    }

    fn memfd(size: u64) -> OwnedFd {
        // SAFETY: the name is a NUL-terminated literal; the result is checked.
        let fd = unsafe { libc::memfd_create(c"ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone().expect("dup"))
            .set_len(size)
            .expect("size");
        fd
    }

    fn mem_table(regions: &[(u64, u64)]) -> Vec<u8> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        for (size, offset) in regions {
            for value in [0, *size, 0x7f00_0000_0000, *offset] {
                payload.extend_from_slice(&u64::to_le_bytes(value));
            }
        }
        payload
    }

    #[test]
    fn memory_regions_must_fit_inside_their_fds() {
        let ram = [memfd(1 << 20)];
        let set = FrontendReq::SET_MEM_TABLE as u32;
        let add = FrontendReq::ADD_MEM_REG as u32;
        for fitting in [(1 << 20, 0), (4096, (1 << 20) - 4096)] {
            check_memory_table(set, &mem_table(&[fitting]), &ram).expect("fits");
        }
        for (size, offset) in [(1 << 40, 0), (4096, 1 << 20), (u64::MAX, 4096)] {
            let error = check_memory_table(set, &mem_table(&[(size, offset)]), &ram)
                .expect_err("past the end");
            assert!(error.to_string().contains("past the end"), "{error}");
        }
        let mut single = 0u64.to_le_bytes().to_vec();
        single.extend_from_slice(&mem_table(&[(1 << 40, 0)])[8..]);
        assert!(check_memory_table(add, &single, &ram).is_err());
        // A socket has no size to map.
        let (read_end, _write_end) = UnixStream::pair().expect("pair");
        let error = check_memory_table(set, &mem_table(&[(4096, 0)]), &[read_end.into()])
            .expect_err("not a file");
        assert!(error.to_string().contains("not a regular file"), "{error}");
    }

    #[test]
    fn an_oversized_memory_table_ends_the_connection_before_the_handler_sees_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("backend.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let (qemu, ours) = UnixStream::pair().expect("pair");
        let filter = std::thread::spawn(move || filter_connection(ours, &path, 2));
        let (mut backend, _) = listener.accept().expect("accept");
        let ram = memfd(1 << 20);
        let table = message(5, 1, &mem_table(&[(1 << 40, 0)]));
        qemu.send_with_fds(&[&table[..]], &[ram.as_raw_fd()])
            .expect("send");
        // Closed at once: without the check the table is relayed and the filter ends Ok.
        drop(qemu);
        assert!(filter.join().expect("join").is_err());
        let mut forwarded = Vec::new();
        backend.read_to_end(&mut forwarded).expect("read");
        assert!(forwarded.is_empty(), "nothing reached the handler");
    }

    #[test]
    fn an_absurd_payload_size_ends_the_connection_without_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("backend.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let (mut qemu, ours) = UnixStream::pair().expect("pair");
        let filter = std::thread::spawn(move || filter_connection(ours, &path, 2));
        let mut bad = message(5, 1, &[]);
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        qemu.write_all(&bad).expect("write");
        assert!(filter.join().expect("join").is_err());
    }
}
