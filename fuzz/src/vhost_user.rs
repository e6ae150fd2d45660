//! Target `vhost_user`: the vhost-user byte stream from QEMU through roce-target's message
//! filter (`proxy::filter_connection`), which frames every request itself (header, payload
//! size limit), answers and holds back early SET_VRING_ENABLEs, and checks memory tables
//! (SET_MEM_TABLE, ADD_MEM_REG) against the size of their fds before the vhost crate maps
//! them. The crate's own decoding of the messages it is then handed is the crate's
//! (rust-vmm's, fuzzed upstream) and is not run here.
//!
//! The input is a sequence of chunks, each `[fds] [length: u16 LE] [bytes]`: every chunk is
//! sent with one `sendmsg`, carrying the file descriptors `fds` picks (bits 0-1: how many,
//! then two bits per descriptor: an empty memfd, a 4 KiB one, a 1 MiB one, or a socket), so
//! memory tables come with descriptors to check, as QEMU's do. Properties:
//! - the filter ends, with Ok exactly when the stream was whole messages of acceptable
//!   sizes whose memory tables fit (always Ok without a memory table), and then it
//!   forwarded or answered every message;
//! - what reaches the vhost crate is whole messages only, never a SET_VRING_ENABLE before
//!   the first SET_FEATURES, and the held-back enables (at most one per ring, for rings
//!   below the queue count, NEED_REPLY cleared) right after it;
//! - what QEMU gets back from the filter itself is whole REPLY_ACKs with status 0, at most
//!   one per early enable.

use std::fs::File;
use std::io::Read;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Mutex, OnceLock, PoisonError};

use roce_target::proxy::{filter_connection, FilterReport, HEADER_LEN, MAX_PAYLOAD};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_ENABLE: u32 = 18;
const ADD_MEM_REG: u32 = 37;
const FLAG_NEED_REPLY: u32 = 0x8;
/// Rings the filter is told the device has (roce-target's queue pair).
const QUEUES: u32 = 2;
/// Inputs longer than this are cut: the stream must fit the socket buffers the test's
/// threads drain, and a vhost-user session is far shorter.
const MAX_INPUT: usize = 32 << 10;

/// What lives for the whole fuzzing process (created in it, after AFL's fork server forked
/// it: threads do not survive a fork).
#[derive(Debug)]
struct Fixture {
    backend_path: PathBuf,
    /// Everything the vhost crate's side received, one entry per connection.
    backend_streams: Mutex<Receiver<Vec<u8>>>,
    fds: [OwnedFd; 4],
}

fn memfd(size: u64) -> OwnedFd {
    // SAFETY: the name is a NUL-terminated literal; the result is checked before use.
    let fd = unsafe { libc::memfd_create(c"fuzz-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = File::from(fd);
    file.set_len(size).expect("sizing a memfd");
    file.into()
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // One socket per process in a shared directory; those of processes gone (a fuzzer
        // stopped, a crashed child) are removed, so the directory never grows.
        let dir = std::env::temp_dir().join("p2prig-fuzz-vhost-user");
        std::fs::create_dir_all(&dir).expect("socket directory");
        remove_stale_sockets(&dir);
        let backend_path = dir.join(format!("{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&backend_path);
        let listener = UnixListener::bind(&backend_path).expect("binding the backend socket");
        let (streams, backend_streams) = channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut received = Vec::new();
                if let Ok(mut stream) = stream {
                    let _ = stream.read_to_end(&mut received);
                }
                if streams.send(received).is_err() {
                    return;
                }
            }
        });
        let (socket, _peer) = UnixStream::pair().expect("socketpair");
        Fixture {
            backend_path,
            backend_streams: Mutex::new(backend_streams),
            fds: [memfd(0), memfd(4096), memfd(1 << 20), socket.into()],
        }
    })
}

fn remove_stale_sockets(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let pid = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// The chunks of an input: bytes to send and the descriptors to send with them.
fn chunks(mut data: &[u8]) -> Vec<(&[u8], Vec<usize>)> {
    let mut out = Vec::new();
    while let Some((&fds, rest)) = data.split_first() {
        let len = rest.get(..2).map_or(rest.len(), |b| {
            usize::from(u16::from_le_bytes([b[0], b[1]]))
        });
        let rest = rest.get(2..).unwrap_or_default();
        let (bytes, tail) = rest.split_at(len.min(rest.len()));
        let picks = (0..usize::from(fds & 3))
            .map(|i| usize::from(fds >> (2 + 2 * i)) & 3)
            .collect();
        out.push((bytes, picks));
        data = tail;
    }
    out
}

fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Splits a stream into whole messages; the tail that is not one is returned apart.
fn messages(mut stream: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut out = Vec::new();
    while stream.len() >= HEADER_LEN {
        let size = word(stream, 8) as usize;
        if size > MAX_PAYLOAD || stream.len() < HEADER_LEN + size {
            break;
        }
        let (message, rest) = stream.split_at(HEADER_LEN + size);
        out.push(message);
        stream = rest;
    }
    (out, stream)
}

pub fn check(data: &[u8]) {
    let fixture = fixture();
    let data = &data[..data.len().min(MAX_INPUT)];
    let chunks = chunks(data);
    let (qemu, ours) = UnixStream::pair().expect("socketpair");
    let path = fixture.backend_path.clone();
    let filter = std::thread::spawn(move || filter_connection(ours, &path, QUEUES));
    // QEMU's side: send every chunk, then half-close, from a thread of its own, while this
    // one reads what the filter answers (either side could fill its socket buffer).
    let sender = qemu.try_clone().expect("dup");
    let fds: Vec<RawFd> = fixture.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let sent: Vec<u8> = chunks
        .iter()
        .flat_map(|(bytes, _)| bytes.iter().copied())
        .collect();
    let picks: Vec<(Vec<u8>, Vec<RawFd>)> = chunks
        .iter()
        .map(|(bytes, picks)| (bytes.to_vec(), picks.iter().map(|&i| fds[i]).collect()))
        .collect();
    let writer = std::thread::spawn(move || {
        for (bytes, fds) in &picks {
            // An empty chunk carries no bytes, so no descriptors either.
            if bytes.is_empty() {
                continue;
            }
            // The filter stops reading on an error; the rest is not sent.
            if sender.send_with_fds(&[&bytes[..]], fds).is_err() {
                break;
            }
        }
        let _ = sender.shutdown(Shutdown::Write);
    });
    let mut answers = Vec::new();
    let _ = (&qemu).read_to_end(&mut answers);
    let _ = writer.join();
    let result = filter.join().expect("the filter thread panicked");
    let backend = fixture
        .backend_streams
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .recv()
        .expect("the backend thread ended");
    drop(qemu);
    check_backend_stream(&backend);
    let early = check_answers(&answers);
    let (sent_messages, tail) = messages(&sent);
    let has_table = sent_messages
        .iter()
        .any(|m| matches!(word(m, 0), SET_MEM_TABLE | ADD_MEM_REG));
    match result {
        Ok(FilterReport {
            forwarded,
            early_enables,
            replayed,
        }) => {
            assert!(
                tail.is_empty(),
                "Ok with {} bytes of a partial message",
                tail.len()
            );
            assert_eq!(
                forwarded + early_enables,
                sent_messages.len() as u64,
                "every message is forwarded or answered"
            );
            assert!(early <= early_enables);
            assert_eq!(
                messages(&backend).0.len() as u64,
                forwarded + replayed,
                "the backend got what was forwarded and replayed"
            );
            check_replayed(&backend, replayed);
        }
        Err(error) => {
            let message = error.to_string();
            assert!(!message.is_empty());
            assert!(
                !tail.is_empty() || has_table,
                "a stream of whole messages without memory tables was refused: {message}"
            );
        }
    }
}

/// What the vhost crate received: whole messages, and no SET_VRING_ENABLE before the first
/// SET_FEATURES.
fn check_backend_stream(stream: &[u8]) {
    let (messages, tail) = messages(stream);
    assert!(tail.is_empty(), "the backend got a partial message");
    let before = messages
        .iter()
        .position(|m| word(m, 0) == SET_FEATURES)
        .unwrap_or(messages.len());
    assert!(
        messages[..before]
            .iter()
            .all(|m| word(m, 0) != SET_VRING_ENABLE),
        "SET_VRING_ENABLE reached the backend before SET_FEATURES"
    );
}

/// The `replayed` messages right after the first SET_FEATURES are the held-back enables:
/// SET_VRING_ENABLE without NEED_REPLY, one per ring the device has, in ring order.
fn check_replayed(stream: &[u8], replayed: u64) {
    let (messages, _) = messages(stream);
    let Some(features) = messages.iter().position(|m| word(m, 0) == SET_FEATURES) else {
        assert_eq!(replayed, 0, "enables replayed without SET_FEATURES");
        return;
    };
    let held_back = messages
        .get(features + 1..features + 1 + replayed as usize)
        .expect("the replayed enables reached the backend");
    let mut last_ring = None;
    for enable in held_back {
        assert_eq!(word(enable, 0), SET_VRING_ENABLE, "replayed a non-enable");
        assert_eq!(
            word(enable, 4) & FLAG_NEED_REPLY,
            0,
            "replayed with NEED_REPLY"
        );
        let ring = word(enable, HEADER_LEN);
        assert!(ring < QUEUES, "replayed an enable of ring {ring}");
        assert!(
            last_ring < Some(ring),
            "replayed rings out of order or twice"
        );
        last_ring = Some(ring);
    }
}

/// The filter's own answers to QEMU: whole REPLY_ACKs of SET_VRING_ENABLE with status 0.
/// Returns how many.
fn check_answers(answers: &[u8]) -> u64 {
    assert_eq!(answers.len() % 20, 0, "partial answer: {answers:02x?}");
    for answer in answers.chunks_exact(20) {
        assert_eq!(
            (word(answer, 0), word(answer, 4), word(answer, 8)),
            (SET_VRING_ENABLE, 0x1 | 0x4, 8),
            "answer header"
        );
        assert_eq!(&answer[12..], &[0; 8], "answer status");
    }
    (answers.len() / 20) as u64
}
