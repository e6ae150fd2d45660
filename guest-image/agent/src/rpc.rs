//! The JSON-lines RPC loop over any byte stream: one reply line per request line, same id.
//!
//! Requests run concurrently, each on its own thread, so a scenario can race operations (a
//! dma-buf close against a device close) and a slow or stuck operation does not block Dmesg.
//! A client that needs an order waits for a reply before sending the next request.

use std::io::{ErrorKind, Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;
use std::time::Duration;

use p2prig_protocol::agent::{AgentOp, AgentReply};
use p2prig_protocol::wire::{
    decode_request, encode_line, salvage_id, ErrorReply, Outcome, Reply, Request, MAX_LINE_BYTES,
};

use crate::agent_log;
use crate::describe::{describe, is_chatty};
use crate::dispatch::{After, Agent};
use crate::platform::Platform;

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Read returned 0: the peer closed (or, on a virtio port, the host is not connected).
    Eof,
    /// Read failed with something other than EINTR/EAGAIN.
    ReadError(std::io::Error),
}

/// CLOCK_MONOTONIC now, in ns: stamped on every reply so the harness can order operations
/// that ran in the guest (a completion against the end of a reset ioctl).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Pause after EAGAIN on a non-blocking stream before reading again.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

fn error_reply(id: u64, errno: i32, message: String) -> Reply<AgentReply> {
    Reply::new(id, Outcome::Err(ErrorReply::new(errno, message)))
}

/// Answers one complete line (without its newline). Returns the reply and what to do after.
pub fn answer_line<P: Platform>(agent: &Agent<P>, line: &[u8]) -> (Reply<AgentReply>, After) {
    let request: Request<AgentOp> = match decode_request(line) {
        Ok(request) => request,
        Err(error) => {
            let id = salvage_id(line);
            agent_log!("malformed request (id {id}): {error}");
            return (
                error_reply(id, libc::EINVAL, format!("malformed request: {error}")),
                After::Nothing,
            );
        }
    };
    let id = request.id;
    let op = request.op;
    let result = catch_unwind(AssertUnwindSafe(|| agent.handle(&op)));
    let (outcome, after) = match result {
        Ok(answer) => answer,
        Err(_) => {
            // A bug of the agent, not of the request; the panic hook has logged it.
            agent_log!("request {id} ({}) panicked", describe(&op));
            (
                Outcome::Err(ErrorReply::new(
                    libc::EIO,
                    format!(
                        "{}: internal error in the agent (panic); see the console",
                        describe(&op)
                    ),
                )),
                After::Nothing,
            )
        }
    };
    match &outcome {
        Outcome::Err(error) => agent_log!("request {id} failed: {error}"),
        Outcome::Ok(_) if !is_chatty(&op) => agent_log!("request {id} done: {}", describe(&op)),
        Outcome::Ok(_) => {}
    }
    let reply = Reply {
        id,
        done_ns: Some(monotonic_ns()),
        outcome,
    };
    (reply, after)
}

fn send<W: Write>(writer: &Mutex<W>, reply: &Reply<AgentReply>) {
    let line = encode_line(reply);
    let mut writer = writer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // One write_all per line, under the lock, so concurrent replies never interleave.
    let result = writer.write_all(&line).and_then(|()| writer.flush());
    if let Err(error) = result {
        agent_log!("could not send the reply to request {}: {error}", reply.id);
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE_BYTES`], without trusting the peer.
#[derive(Debug, Default)]
struct LineSplitter {
    pending: Vec<u8>,
    /// Inside an over-long line: drop bytes until its newline.
    discarding: bool,
}

/// One item out of the splitter.
#[derive(Debug, PartialEq, Eq)]
enum Item {
    Line(Vec<u8>),
    TooLong,
}

impl LineSplitter {
    fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Item>) {
        while let Some(newline) = bytes.iter().position(|&b| b == b'\n') {
            let (head, rest) = bytes.split_at(newline);
            if self.discarding {
                self.discarding = false;
            } else if self.pending.len() + head.len() > MAX_LINE_BYTES {
                out.push(Item::TooLong);
            } else {
                self.pending.extend_from_slice(head);
                out.push(Item::Line(std::mem::take(&mut self.pending)));
            }
            self.pending.clear();
            bytes = &rest[1..];
        }
        if self.discarding {
            return;
        }
        if self.pending.len() + bytes.len() > MAX_LINE_BYTES {
            self.pending.clear();
            self.discarding = true;
            out.push(Item::TooLong);
        } else {
            self.pending.extend_from_slice(bytes);
        }
    }
}

/// Serves requests from `reader`, replying on `writer`, until EOF or a read error. Waits for
/// requests still running before returning, so their replies belong to this session.
pub fn serve<P, R, W>(agent: &Agent<P>, mut reader: R, writer: W) -> SessionEnd
where
    P: Platform,
    R: Read,
    W: Write + Send,
{
    let writer = Mutex::new(writer);
    let mut splitter = LineSplitter::default();
    let mut buffer = vec![0u8; 64 * 1024];
    std::thread::scope(|scope| loop {
        let count = match reader.read(&mut buffer) {
            Ok(0) => return SessionEnd::Eof,
            Ok(count) => count,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(RETRY_PAUSE);
                continue;
            }
            Err(e) => return SessionEnd::ReadError(e),
        };
        let mut items = Vec::new();
        splitter.push(&buffer[..count], &mut items);
        for item in items {
            let line = match item {
                Item::Line(line) => line,
                Item::TooLong => {
                    send(
                        &writer,
                        &error_reply(
                            0,
                            libc::EINVAL,
                            format!("malformed request: line longer than {MAX_LINE_BYTES} bytes"),
                        ),
                    );
                    continue;
                }
            };
            // Blank lines are not requests; skipping them lets a human poke the port.
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let shared_writer = &writer;
            let work = move || {
                let (reply, after) = answer_line(agent, &line);
                send(shared_writer, &reply);
                if after == After::PowerOff {
                    agent.platform().power_off();
                }
            };
            let spawned = std::thread::Builder::new()
                .name("agent-request".into())
                .spawn_scoped(scope, work);
            if let Err(error) = spawned {
                // Out of threads: a reply is still owed; nothing to run it on but this one.
                agent_log!("cannot start a request thread ({error}); refusing the request");
                let id = 0;
                send(
                    &writer,
                    &error_reply(
                        id,
                        error.raw_os_error().unwrap_or(libc::EAGAIN),
                        format!("agent cannot start a thread for the request: {error}"),
                    ),
                );
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakePlatform;
    use p2prig_protocol::agent::READY_BANNER;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    /// An agent serving one end of a socketpair on a thread; the test talks on the other end.
    struct Session {
        client: UnixStream,
        replies: BufReader<UnixStream>,
        server: Option<std::thread::JoinHandle<SessionEnd>>,
    }

    impl Session {
        fn start(platform: FakePlatform) -> (Self, Arc<Agent<FakePlatform>>) {
            let agent = Arc::new(Agent::new(platform));
            let (client, server_end) = UnixStream::pair().expect("socketpair");
            client
                .set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let server_agent = Arc::clone(&agent);
            let server = std::thread::spawn(move || {
                let reader = server_end.try_clone().expect("clone");
                serve(&server_agent, reader, server_end)
            });
            let replies = BufReader::new(client.try_clone().expect("clone"));
            (
                Self {
                    client,
                    replies,
                    server: Some(server),
                },
                agent,
            )
        }

        fn send_raw(&mut self, bytes: &[u8]) {
            self.client.write_all(bytes).expect("send");
        }

        fn reply(&mut self) -> Reply<AgentReply> {
            let mut line = String::new();
            self.replies.read_line(&mut line).expect("reply line");
            p2prig_protocol::wire::decode_line(line.as_bytes())
                .unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
        }

        fn call(&mut self, id: u64, op: AgentOp) -> Reply<AgentReply> {
            self.send_raw(&encode_line(&Request { id, op }));
            self.reply()
        }

        fn finish(mut self) -> SessionEnd {
            self.client
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
            self.server
                .take()
                .expect("server")
                .join()
                .expect("server thread")
        }
    }

    fn errno_of(reply: &Reply<AgentReply>) -> i32 {
        match &reply.outcome {
            Outcome::Err(error) => error.errno,
            Outcome::Ok(ok) => panic!("expected an error, got {ok:?}"),
        }
    }

    #[test]
    fn replies_carry_the_request_id() {
        let (mut session, _) = Session::start(FakePlatform::with_nvme("0000:02:00.0").0);
        let reply = session.call(41, AgentOp::Hello);
        assert_eq!(reply.id, 41);
        assert!(matches!(
            reply.outcome,
            Outcome::Ok(AgentReply::Hello { .. })
        ));
        let reply = session.call(42, AgentOp::FindPci { class: 0x010802 });
        assert_eq!(reply.id, 42);
        assert_eq!(
            reply.outcome,
            Outcome::Ok(AgentReply::Pci {
                functions: vec!["0000:02:00.0".into()]
            })
        );
        assert!(
            reply.done_ns.is_some_and(|ns| ns > 0),
            "the agent stamps when the operation finished"
        );
        assert!(matches!(session.finish(), SessionEnd::Eof));
    }

    #[test]
    fn malformed_lines_get_einval_with_salvaged_ids() {
        let (mut session, _) = Session::start(FakePlatform::default());
        session.send_raw(b"this is not json\n");
        let reply = session.reply();
        assert_eq!((reply.id, errno_of(&reply)), (0, libc::EINVAL));
        session.send_raw(b"{\"id\":7,\"op\":\"no_such_op\"}\n");
        let reply = session.reply();
        assert_eq!((reply.id, errno_of(&reply)), (7, libc::EINVAL));
        // Missing fields and wrong types: id salvaged as well.
        session.send_raw(b"{\"id\":8,\"op\":\"bar_read\",\"device\":1}\n");
        let reply = session.reply();
        assert_eq!((reply.id, errno_of(&reply)), (8, libc::EINVAL));
        session.send_raw(b"{\"id\":9,\"op\":\"find_pci\",\"class\":\"x\"}\r\n");
        let reply = session.reply();
        assert_eq!((reply.id, errno_of(&reply)), (9, libc::EINVAL));
        session.send_raw(b"\xff\xfe\n\n   \n");
        let reply = session.reply();
        assert_eq!((reply.id, errno_of(&reply)), (0, libc::EINVAL));
        // The agent is still alive and serving.
        assert_eq!(session.call(10, AgentOp::Hello).id, 10);
        assert!(matches!(session.finish(), SessionEnd::Eof));
    }

    #[test]
    fn a_request_split_across_reads_is_one_request() {
        let (mut session, _) = Session::start(FakePlatform::default());
        session.send_raw(b"{\"id\":3,");
        std::thread::sleep(Duration::from_millis(10));
        session.send_raw(b"\"op\":\"hello\"}\n{\"id\":4,\"op\":\"hello\"}\n");
        let mut ids = [session.reply().id, session.reply().id];
        ids.sort_unstable();
        assert_eq!(ids, [3, 4]);
        session.finish();
    }

    #[test]
    fn operation_errors_carry_errno_and_name_the_operation() {
        let (mut session, _) = Session::start(FakePlatform::with_nvme("0000:02:00.0").0);
        let reply = session.call(5, AgentOp::VfioClose { device: 77 });
        assert_eq!(reply.id, 5);
        match reply.outcome {
            Outcome::Err(error) => {
                assert_eq!(error.errno, libc::EBADF);
                assert!(
                    error.message.contains("vfio_close device 77"),
                    "{}",
                    error.message
                );
            }
            Outcome::Ok(ok) => panic!("unexpected {ok:?}"),
        }
        session.finish();
    }

    #[test]
    fn a_slow_request_does_not_block_the_next_one() {
        let platform = FakePlatform::default();
        platform
            .find_pci_waits_for_hello
            .store(true, Ordering::SeqCst);
        let (mut session, _) = Session::start(platform);
        // find_pci only returns once hello has run: served one at a time this would fail.
        session.send_raw(&encode_line(&Request {
            id: 1,
            op: AgentOp::FindPci { class: 1 },
        }));
        session.send_raw(&encode_line(&Request {
            id: 2,
            op: AgentOp::Hello,
        }));
        // Served one at a time, find_pci would give up waiting for hello (ETIMEDOUT). Served
        // concurrently both succeed; which reply is written first is a race between the two
        // threads once hello has run, so the order is not part of the promise.
        let mut replies = [session.reply(), session.reply()];
        replies.sort_by_key(|reply| reply.id);
        let [find_pci, hello] = replies;
        assert_eq!((find_pci.id, hello.id), (1, 2));
        assert!(
            matches!(find_pci.outcome, Outcome::Ok(AgentReply::Pci { .. })),
            "find_pci waited for hello in vain: {find_pci:?}"
        );
        assert!(matches!(
            hello.outcome,
            Outcome::Ok(AgentReply::Hello { .. })
        ));
        session.finish();
    }

    #[test]
    fn power_off_replies_before_powering_off() {
        let (mut session, agent) = Session::start(FakePlatform::default());
        let reply = session.call(6, AgentOp::PowerOff);
        assert_eq!(reply.outcome, Outcome::Ok(AgentReply::Done));
        session.finish();
        assert!(agent.platform().powered_off.load(Ordering::SeqCst));
    }

    #[test]
    fn full_vfio_flow_over_the_wire() {
        let (mut session, _) = Session::start(FakePlatform::with_nvme("0000:02:00.0").0);
        assert_eq!(
            session
                .call(
                    1,
                    AgentOp::VfioBind {
                        bdf: "0000:02:00.0".into()
                    }
                )
                .outcome,
            Outcome::Ok(AgentReply::Done)
        );
        assert_eq!(
            session
                .call(
                    2,
                    AgentOp::VfioOpen {
                        bdf: "0000:02:00.0".into()
                    }
                )
                .outcome,
            Outcome::Ok(AgentReply::Device { device: 1 })
        );
        assert_eq!(
            session
                .call(
                    3,
                    AgentOp::DmabufExport {
                        device: 1,
                        bar: 2,
                        offset: 0,
                        length: 0x10000,
                        uapi: p2prig_protocol::agent::DmabufUapi::Upstream
                    }
                )
                .outcome,
            Outcome::Ok(AgentReply::Dmabuf {
                dmabuf: 1,
                size: 0x10000
            })
        );
        session.call(
            4,
            AgentOp::BarWrite {
                device: 1,
                bar: 0,
                offset: 0x1000,
                width: 4,
                value: 3,
            },
        );
        assert_eq!(
            session
                .call(
                    5,
                    AgentOp::BarRead {
                        device: 1,
                        bar: 0,
                        offset: 0x1000,
                        width: 4
                    }
                )
                .outcome,
            Outcome::Ok(AgentReply::Value { value: 3 })
        );
        assert_eq!(
            session.call(6, AgentOp::DmabufClose { dmabuf: 1 }).outcome,
            Outcome::Ok(AgentReply::Done)
        );
        assert_eq!(
            session.call(7, AgentOp::VfioClose { device: 1 }).outcome,
            Outcome::Ok(AgentReply::Done)
        );
        let text = session.call(8, AgentOp::Dmesg);
        assert!(matches!(text.outcome, Outcome::Ok(AgentReply::Text { .. })));
        session.finish();
    }

    #[test]
    fn splitter_bounds_lines() {
        let mut splitter = LineSplitter::default();
        let mut out = Vec::new();
        splitter.push(b"a\nbc", &mut out);
        splitter.push(b"d\n", &mut out);
        assert_eq!(
            out,
            [Item::Line(b"a".to_vec()), Item::Line(b"bcd".to_vec())]
        );
        out.clear();
        let long = vec![b'x'; MAX_LINE_BYTES + 1];
        splitter.push(&long, &mut out);
        splitter.push(b"still the long line\nnext\n", &mut out);
        assert_eq!(out, [Item::TooLong, Item::Line(b"next".to_vec())]);
        // The banner has no newline of its own in the constant.
        assert!(!READY_BANNER.contains('\n'));
    }
}
