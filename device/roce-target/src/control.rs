//! The control socket: JSON lines (see `p2prig_protocol::target`), one thread per
//! connection, one reply line per request line. A bad line gets an error reply; it never
//! ends the connection, let alone the process.

use std::io::{self};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use p2prig_protocol::hex;
use p2prig_protocol::target::{MrAccess, TargetOp, TargetReply};
use p2prig_protocol::wire::{answer_line, serve_unix_stream, ErrorReply, Reply, MAX_LINE_BYTES};

use crate::backend::{lock_engine, SharedEngine};
use crate::engine::{EngineError, RemoteBuffer};
use crate::frame::{ip_of_gid, parse_mac};
use crate::memory::MemoryError;

/// Most bytes one `mr_read` returns.
pub const MAX_MR_READ: u32 = 1 << 20;
/// Longest `poll_cq` wait (10 minutes).
pub const MAX_WAIT_MS: u64 = 600_000;
const DEFAULT_POLL_MAX: u32 = 64;

/// What the control socket acts on.
#[derive(Debug, Clone)]
pub struct ControlContext {
    pub engine: SharedEngine,
    /// Where `pcap_start` writes; `None` refuses captures.
    pub pcap_dir: Option<PathBuf>,
    /// vhost-user connections served so far (kept by the serving loop).
    pub connections: Arc<AtomicU64>,
}

fn invalid(message: impl Into<String>) -> ErrorReply {
    ErrorReply::new(libc::EINVAL, message)
}

fn engine_error(error: EngineError) -> ErrorReply {
    let errno = match &error {
        EngineError::NoSuchQp(_) | EngineError::Memory(MemoryError::NoSuchKey(_)) => libc::ENOENT,
        // ENOMEM as ibv_post_send answers for a full send queue.
        EngineError::Memory(MemoryError::TooLarge(_)) | EngineError::SendQueueFull { .. } => {
            libc::ENOMEM
        }
        EngineError::NoQpNumbers | EngineError::Memory(MemoryError::KeysExhausted) => libc::ENOSPC,
        EngineError::Pcap(_) => libc::EIO,
        _ => libc::EINVAL,
    };
    ErrorReply::new(errno, error.to_string())
}

/// Carries out one operation.
pub fn handle(op: TargetOp, context: &ControlContext) -> Result<TargetReply, ErrorReply> {
    let now = Instant::now();
    match op {
        TargetOp::PollCq { qpn, max, wait_ms } => {
            let max = max.unwrap_or(DEFAULT_POLL_MAX).max(1) as usize;
            let deadline = now + Duration::from_millis(wait_ms.min(MAX_WAIT_MS));
            loop {
                let completions = lock_engine(&context.engine).poll_cq(qpn, max);
                if !completions.is_empty() || Instant::now() >= deadline {
                    return Ok(TargetReply::Completions { completions });
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        TargetOp::PcapStart { name } => {
            let dir = context
                .pcap_dir
                .as_deref()
                .ok_or_else(|| invalid("no --pcap-dir was given on the command line"))?;
            let path = lock_engine(&context.engine)
                .pcap_start(dir, name.as_deref())
                .map_err(engine_error)?;
            Ok(TargetReply::Pcap { path, frames: 0 })
        }
        op => {
            let mut engine = lock_engine(&context.engine);
            match op {
                TargetOp::CreateQp(settings) => engine
                    .create_qp(&settings)
                    .map(TargetReply::Qp)
                    .map_err(engine_error),
                TargetOp::Connect {
                    qpn,
                    remote_qpn,
                    remote_psn,
                    remote_gid,
                    remote_ip,
                    remote_mac,
                } => {
                    let address = remote_gid.or(remote_ip).ok_or_else(|| {
                        invalid("connect needs remote_gid (::ffff:a.b.c.d) or remote_ip")
                    })?;
                    let ip = ip_of_gid(&address).ok_or_else(|| {
                        invalid(format!(
                            "{address} is not an IPv4 address or IPv4-mapped GID"
                        ))
                    })?;
                    let mac = match remote_mac {
                        Some(text) => Some(
                            parse_mac(&text)
                                .ok_or_else(|| invalid(format!("{text} is not a MAC address")))?,
                        ),
                        None => None,
                    };
                    engine
                        .connect(qpn, remote_qpn, remote_psn, ip, mac, now)
                        .map(|()| TargetReply::Done)
                        .map_err(engine_error)
                }
                TargetOp::RegisterMr { length, access } => {
                    let access = access.unwrap_or_else(|| {
                        vec![
                            MrAccess::LocalWrite,
                            MrAccess::RemoteWrite,
                            MrAccess::RemoteRead,
                        ]
                    });
                    engine
                        .register_mr(length, &access)
                        .map(TargetReply::Mr)
                        .map_err(engine_error)
                }
                TargetOp::DeregisterMr { key } => engine
                    .deregister_mr(key)
                    .map(|()| TargetReply::Done)
                    .map_err(engine_error),
                TargetOp::MrRead {
                    key,
                    offset,
                    length,
                } => {
                    if length > MAX_MR_READ {
                        return Err(invalid(format!(
                            "length {length} is over the {MAX_MR_READ}-byte limit of one mr_read"
                        )));
                    }
                    let data = engine
                        .mr_read(key, offset, u64::from(length))
                        .map_err(engine_error)?;
                    Ok(TargetReply::MrData {
                        key,
                        offset,
                        data_hex: hex::encode(&data),
                    })
                }
                TargetOp::MrWrite {
                    key,
                    offset,
                    data_hex,
                    length,
                } => {
                    let data = hex::decode(&data_hex)
                        .filter(|d| d.len() <= MAX_LINE_BYTES)
                        .ok_or_else(|| invalid("data_hex must be hex digits"))?;
                    match length {
                        Some(length) => {
                            if data.is_empty() {
                                return Err(invalid("a fill needs a non-empty data_hex pattern"));
                            }
                            engine.mr_fill(key, offset, length, &data)
                        }
                        None => engine.mr_write(key, offset, &data),
                    }
                    .map(|()| TargetReply::Done)
                    .map_err(engine_error)
                }
                TargetOp::PostRecv { qpn, wr_id, local } => engine
                    .post_recv(qpn, wr_id, local)
                    .map(|()| TargetReply::Done)
                    .map_err(engine_error),
                TargetOp::PostWrite {
                    qpn,
                    wr_id,
                    local,
                    remote_va,
                    remote_rkey,
                    imm,
                } => engine
                    .post_write(
                        qpn,
                        wr_id,
                        local,
                        RemoteBuffer {
                            va: remote_va,
                            rkey: remote_rkey,
                        },
                        imm,
                        now,
                    )
                    .map(|()| TargetReply::Done)
                    .map_err(engine_error),
                TargetOp::PostRead {
                    qpn,
                    wr_id,
                    local,
                    remote_va,
                    remote_rkey,
                } => engine
                    .post_read(
                        qpn,
                        wr_id,
                        local,
                        RemoteBuffer {
                            va: remote_va,
                            rkey: remote_rkey,
                        },
                        now,
                    )
                    .map(|()| TargetReply::Done)
                    .map_err(engine_error),
                TargetOp::PostSend {
                    qpn,
                    wr_id,
                    local,
                    imm,
                } => engine
                    .post_send(qpn, wr_id, local, imm, now)
                    .map(|()| TargetReply::Done)
                    .map_err(engine_error),
                TargetOp::QueryQp { qpn } => engine
                    .query_qp(qpn)
                    .map(TargetReply::QpState)
                    .map_err(engine_error),
                TargetOp::ResetQp { qpn, psn } => engine
                    .reset_qp(qpn, psn)
                    .map(TargetReply::Qp)
                    .map_err(engine_error),
                TargetOp::DestroyQp { qpn } => engine
                    .destroy_qp(qpn)
                    .map(|()| TargetReply::Done)
                    .map_err(engine_error),
                TargetOp::HoldResponses { qpn } => engine
                    .hold_responses(qpn)
                    .map(|()| TargetReply::Done)
                    .map_err(engine_error),
                TargetOp::ReleaseResponses { qpn } => engine
                    .release_responses(qpn)
                    .map(|(frames, dropped)| TargetReply::Released { frames, dropped })
                    .map_err(engine_error),
                TargetOp::Stats => {
                    let mut stats = engine.stats();
                    stats.connections = context.connections.load(Ordering::Relaxed);
                    Ok(TargetReply::Stats(stats))
                }
                TargetOp::PcapStop => {
                    let (path, frames) = engine
                        .pcap_stop()
                        .ok_or_else(|| invalid("no capture is running"))?;
                    Ok(TargetReply::Pcap { path, frames })
                }
                TargetOp::Announce => {
                    engine.announce();
                    Ok(TargetReply::Done)
                }
                TargetOp::PollCq { .. } | TargetOp::PcapStart { .. } => {
                    Err(invalid("internal: handled above"))
                }
            }
        }
    }
}

/// Turns one request line into its reply.
pub fn handle_line(line: &[u8], context: &ControlContext) -> Reply<TargetReply> {
    answer_line(line, |op: TargetOp| handle(op, context), invalid)
}

/// Serves one connection until the peer closes it.
pub fn serve_connection(stream: UnixStream, context: &ControlContext) {
    serve_unix_stream(
        stream,
        || invalid(format!("line longer than {MAX_LINE_BYTES} bytes")),
        |line| handle_line(line, context),
    );
}

/// Binds a Unix socket at `path`, mode 0600: a stale socket is replaced, a live one (another
/// instance serving it) or any other kind of file is refused (see
/// [`device_support::bind_private_socket`]).
pub fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    Ok(device_support::bind_private_socket(path)?)
}

/// The listening control socket (device-support's, shared with the other device).
pub use device_support::ControlSocket;

/// Accepts control connections until `stop` is set, each served on its own thread.
pub fn serve(socket: &ControlSocket, context: &ControlContext, stop: &AtomicBool) {
    let context = context.clone();
    socket.serve(stop, move |stream| serve_connection(stream, &context));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{GuestLink, GuestQueue};
    use crate::{Engine, EngineConfig};
    use p2prig_protocol::wire::Outcome;
    use std::io::{BufRead, BufReader, Write};
    use std::sync::Mutex;

    fn context(pcap_dir: Option<PathBuf>) -> ControlContext {
        let queue = Arc::new(GuestQueue::new().expect("eventfd"));
        ControlContext {
            engine: Arc::new(Mutex::new(Engine::new(
                EngineConfig::default(),
                Box::new(GuestLink(queue)),
            ))),
            pcap_dir,
            connections: Arc::new(AtomicU64::new(0)),
        }
    }

    fn ok(line: &str, context: &ControlContext) -> TargetReply {
        match handle_line(line.as_bytes(), context).outcome {
            Outcome::Ok(reply) => reply,
            Outcome::Err(e) => panic!("{line}: {e}"),
        }
    }

    #[test]
    fn documented_session_works_line_by_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = context(Some(dir.path().to_path_buf()));
        let TargetReply::Mr(mr) = ok(r#"{"id":1,"op":"register_mr","length":65536}"#, &c) else {
            panic!("mr");
        };
        assert_eq!(mr.access.len(), 3);
        let TargetReply::Qp(qp) = ok(
            r#"{"id":2,"op":"create_qp","path_mtu":1024,"psn":4660}"#,
            &c,
        ) else {
            panic!("qp");
        };
        assert_eq!(qp.psn, 4660);
        assert_eq!(qp.gid, "::ffff:10.0.2.2");
        assert_eq!(qp.mac, "52:54:00:00:00:02");
        ok(r#"{"id":0,"op":"create_qp"}"#, &c);
        let TargetReply::Pcap { path, .. } = ok(r#"{"id":3,"op":"pcap_start"}"#, &c) else {
            panic!("pcap");
        };
        let connect = format!(
            r#"{{"id":4,"op":"connect","qpn":{},"remote_qpn":17,"remote_psn":1,"remote_gid":"::ffff:10.0.2.15","remote_mac":"52:54:00:12:34:56"}}"#,
            qp.qpn
        );
        ok(&connect, &c);
        ok(
            &format!(
                r#"{{"id":5,"op":"mr_write","key":{},"offset":0,"data_hex":"a5","length":8}}"#,
                mr.key
            ),
            &c,
        );
        let post = format!(
            r#"{{"id":6,"op":"post_write","qpn":{},"wr_id":1,"local":{{"key":{},"offset":0,"length":8}},"remote_va":4096,"remote_rkey":4660}}"#,
            qp.qpn, mr.key
        );
        ok(&post, &c);
        let TargetReply::MrData { data_hex, .. } = ok(
            &format!(
                r#"{{"id":7,"op":"mr_read","key":{},"offset":0,"length":9}}"#,
                mr.key
            ),
            &c,
        ) else {
            panic!("data");
        };
        assert_eq!(data_hex, "a5a5a5a5a5a5a5a500");
        let TargetReply::QpState(state) = ok(
            &format!(r#"{{"id":8,"op":"query_qp","qpn":{}}}"#, qp.qpn),
            &c,
        ) else {
            panic!("state");
        };
        assert_eq!(state.sq_psn, 4661);
        let TargetReply::Completions { completions } =
            ok(r#"{"id":9,"op":"poll_cq","wait_ms":5}"#, &c)
        else {
            panic!("poll");
        };
        assert!(completions.is_empty());
        let TargetReply::Stats(stats) = ok(r#"{"id":10,"op":"stats"}"#, &c) else {
            panic!("stats");
        };
        assert_eq!(stats.roce_out, 1);
        let TargetReply::Pcap { frames, .. } = ok(r#"{"id":11,"op":"pcap_stop"}"#, &c) else {
            panic!("pcap");
        };
        assert!(frames >= 1);
        assert!(std::fs::metadata(path).expect("pcap file").len() > 24);
        let release = format!(r#"{{"id":14,"op":"release_responses","qpn":{}}}"#, qp.qpn);
        match handle_line(release.as_bytes(), &c).outcome {
            Outcome::Err(e) => assert_eq!(e.errno, libc::EINVAL, "not held: {e}"),
            Outcome::Ok(reply) => panic!("released what was not held: {reply:?}"),
        }
        ok(
            &format!(r#"{{"id":15,"op":"hold_responses","qpn":{}}}"#, qp.qpn),
            &c,
        );
        let TargetReply::Released { frames, dropped } = ok(&release, &c) else {
            panic!("released");
        };
        assert_eq!((frames, dropped), (0, 0), "nothing was answered meanwhile");
        ok(
            &format!(r#"{{"id":12,"op":"destroy_qp","qpn":{}}}"#, qp.qpn),
            &c,
        );
        let TargetReply::Completions { completions } = ok(r#"{"id":13,"op":"poll_cq"}"#, &c) else {
            panic!("poll");
        };
        assert_eq!(completions.len(), 1, "the write was flushed by destroy");
    }

    #[test]
    fn malformed_and_refused_requests_get_error_replies() {
        let c = context(None);
        for (line, id, errno) in [
            (&b"{\"id\":5,\"op\":\"explode\"}"[..], 5, libc::EINVAL),
            (b"not json", 0, libc::EINVAL),
            (b"\xff\xfe", 0, libc::EINVAL),
            (
                b"{\"id\":6,\"op\":\"query_qp\",\"qpn\":99}",
                6,
                libc::ENOENT,
            ),
            (b"{\"id\":7,\"op\":\"pcap_start\"}", 7, libc::EINVAL),
            (
                b"{\"id\":9,\"op\":\"hold_responses\",\"qpn\":99}",
                9,
                libc::ENOENT,
            ),
            (
                b"{\"id\":10,\"op\":\"release_responses\",\"qpn\":99}",
                10,
                libc::ENOENT,
            ),
            (
                b"{\"id\":8,\"op\":\"create_qp\",\"path_mtu\":1000}",
                8,
                libc::EINVAL,
            ),
            (
                b"{\"id\":9,\"op\":\"connect\",\"qpn\":17,\"remote_qpn\":1,\"remote_psn\":0}",
                9,
                libc::EINVAL,
            ),
            (
                b"{\"id\":10,\"op\":\"mr_read\",\"key\":1,\"length\":4294967295}",
                10,
                libc::EINVAL,
            ),
            (
                b"{\"id\":11,\"op\":\"register_mr\",\"length\":18446744073709551615}",
                11,
                libc::ENOMEM,
            ),
            (b"{\"id\":12,\"op\":\"pcap_stop\"}", 12, libc::EINVAL),
        ] {
            let reply = handle_line(line, &c);
            assert_eq!(reply.id, id, "{}", String::from_utf8_lossy(line));
            match reply.outcome {
                Outcome::Err(e) => assert_eq!(e.errno, errno, "{e}"),
                Outcome::Ok(r) => panic!("{r:?}"),
            }
        }
    }

    #[test]
    fn pcap_names_cannot_leave_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = context(Some(dir.path().to_path_buf()));
        for name in ["../x", "/etc/passwd", ".hidden", "a/b", ""] {
            let line = format!(r#"{{"id":1,"op":"pcap_start","name":"{name}"}}"#);
            assert!(matches!(
                handle_line(line.as_bytes(), &c).outcome,
                Outcome::Err(_)
            ));
        }
        ok(r#"{"id":1,"op":"pcap_start","name":"run-1.pcap"}"#, &c);
        assert!(dir.path().join("run-1.pcap").exists());
    }

    #[test]
    fn a_real_socket_serves_lines_and_survives_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        let socket = ControlSocket::bind(&path).expect("bind");
        let c = context(None);
        let stop = Arc::new(AtomicBool::new(false));
        {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || serve(&socket, &c, &stop));
        }
        let mut stream = UnixStream::connect(&path).expect("connect");
        stream
            .write_all(b"garbage\n\n{\"id\":2,\"op\":\"stats\"}\n")
            .expect("write");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut first = String::new();
        reader.read_line(&mut first).expect("read");
        assert!(first.contains("\"err\""), "{first}");
        let mut second = String::new();
        reader.read_line(&mut second).expect("read");
        assert!(
            second.contains("\"id\":2") && second.contains("\"stats\""),
            "{second}"
        );
        stop.store(true, Ordering::Relaxed);
        drop(stream);
        let _ = UnixStream::connect(&path);
    }
}
