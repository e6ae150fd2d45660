//! A JSON-lines RPC client over a unix socket with a timeout on every call, shared by the
//! agent's and the device's control channels.

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};

use p2prig_protocol::wire::{self, ErrorReply, Outcome, Reply, Request};

use crate::rig::process::check_interrupted;

/// CLOCK_MONOTONIC in nanoseconds: the clock nvme-cmb stamps its events with.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Poll period of blocking reads, so Ctrl-C and deadlines are noticed promptly.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct LineClient {
    peer: String,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    partial: Vec<u8>,
    next_id: u64,
    /// Replies that arrived while waiting for another id (concurrent requests).
    stash: std::collections::HashMap<u64, Vec<u8>>,
    transcript: Option<File>,
}

impl LineClient {
    /// Connects to `path`, retrying until `timeout` while the socket does not exist yet.
    pub fn connect(peer: &str, path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    check_interrupted()?;
                    std::thread::sleep(POLL);
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("connecting to {peer} at {}", path.display()))
                }
            }
        };
        Self::from_stream(peer, stream)
    }

    pub fn from_stream(peer: &str, stream: UnixStream) -> Result<Self> {
        stream.set_read_timeout(Some(POLL))?;
        Ok(Self {
            peer: peer.to_string(),
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            partial: Vec::new(),
            next_id: 1,
            stash: std::collections::HashMap::new(),
            transcript: None,
        })
    }

    /// Appends every line sent and received to `path`.
    pub fn record_to(&mut self, path: &Path) -> Result<()> {
        self.transcript = Some(File::create(path)?);
        Ok(())
    }

    /// Reads the next complete line before `deadline`; `on_wait` runs on every poll tick and
    /// may abort the wait (e.g. when QEMU died).
    pub fn read_line(
        &mut self,
        deadline: Instant,
        on_wait: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Vec<u8>> {
        loop {
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => bail!("{} closed the connection", self.peer),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    self.log("recv", &line);
                    return Ok(line);
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e).with_context(|| format!("reading from {}", self.peer)),
            }
            if self.partial.len() > wire::MAX_LINE_BYTES {
                bail!(
                    "{} sent a line longer than {} bytes",
                    self.peer,
                    wire::MAX_LINE_BYTES
                );
            }
            check_interrupted()?;
            on_wait()?;
            if Instant::now() >= deadline {
                bail!("timed out waiting for {}", self.peer);
            }
        }
    }

    /// Sends `op` and waits for the reply with the same id. The outer error is a transport
    /// failure or timeout; the inner one is the peer's error reply (with errno).
    pub fn call<Op: Serialize, T: DeserializeOwned>(
        &mut self,
        op: Op,
        timeout: Duration,
    ) -> Result<std::result::Result<T, ErrorReply>> {
        self.call_while(op, timeout, &mut || Ok(()))
    }

    pub fn call_while<Op: Serialize, T: DeserializeOwned>(
        &mut self,
        op: Op,
        timeout: Duration,
        on_wait: &mut dyn FnMut() -> Result<()>,
    ) -> Result<std::result::Result<T, ErrorReply>> {
        let id = self.start(op)?;
        self.finish(id, timeout, on_wait)
    }

    /// Sends `op` without waiting: the peer may answer requests out of order, so several can
    /// be in flight (e.g. a reset held open while a write is posted). Returns the id.
    pub fn start<Op: Serialize>(&mut self, op: Op) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let line = wire::encode_line(&Request { id, op });
        self.log("send", &line);
        self.writer
            .write_all(&line)
            .with_context(|| format!("sending a request to {}", self.peer))?;
        Ok(id)
    }

    /// Waits for the reply to request `id`, keeping replies to other requests for later.
    pub fn finish<T: DeserializeOwned>(
        &mut self,
        id: u64,
        timeout: Duration,
        on_wait: &mut dyn FnMut() -> Result<()>,
    ) -> Result<std::result::Result<T, ErrorReply>> {
        Ok(self.finish_stamped(id, timeout, on_wait)?.0)
    }

    /// [`LineClient::finish`], with the peer's stamp of when the operation finished (on the
    /// peer's CLOCK_MONOTONIC), if it sent one.
    pub fn finish_stamped<T: DeserializeOwned>(
        &mut self,
        id: u64,
        timeout: Duration,
        on_wait: &mut dyn FnMut() -> Result<()>,
    ) -> Result<(std::result::Result<T, ErrorReply>, Option<u64>)> {
        let deadline = Instant::now() + timeout;
        let line = loop {
            if let Some(line) = self.stash.remove(&id) {
                break line;
            }
            let line = self
                .read_line(deadline, on_wait)
                .with_context(|| format!("waiting {timeout:?} for the reply to request {id}"))?;
            match wire::decode_line::<Reply<serde::de::IgnoredAny>>(&line) {
                Ok(reply) if reply.id == id => break line,
                Ok(reply) if reply.id < self.next_id => {
                    self.stash.insert(reply.id, line);
                }
                _ => bail!(
                    "{} sent a line that is no reply to a pending request: {}",
                    self.peer,
                    String::from_utf8_lossy(&line).trim_end()
                ),
            }
        };
        let reply: Reply<T> = wire::decode_line(&line).map_err(|e| {
            anyhow::anyhow!(
                "{} sent a reply p2prig cannot parse ({e}): {}",
                self.peer,
                String::from_utf8_lossy(&line).trim_end()
            )
        })?;
        let outcome = match reply.outcome {
            Outcome::Ok(value) => Ok(value),
            Outcome::Err(e) => Err(e),
        };
        Ok((outcome, reply.done_ns))
    }

    /// One JSON line per message: `{"mono_ns":..,"dir":"send"|"recv","msg":<the message>}`,
    /// on the same clock as nvme-cmb's events so the report can put both on one timeline.
    fn log(&mut self, dir: &str, line: &[u8]) {
        if let Some(f) = &mut self.transcript {
            let text = String::from_utf8_lossy(line);
            let msg = serde_json::from_str::<serde_json::Value>(text.trim_end())
                .unwrap_or_else(|_| serde_json::Value::String(text.trim_end().to_string()));
            let entry = serde_json::json!({"mono_ns": mono_ns(), "dir": dir, "msg": msg});
            let _ = writeln!(f, "{entry}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    #[test]
    fn out_of_order_replies_reach_their_requests() -> Result<()> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut client = LineClient::from_stream("peer", ours)?;
        let first = client.start(serde_json::json!({"op": "reset"}))?;
        let second = client.start(serde_json::json!({"op": "write"}))?;
        let mut peer_reader = BufReader::new(theirs.try_clone()?);
        let mut line = String::new();
        for _ in 0..2 {
            line.clear();
            peer_reader.read_line(&mut line)?;
        }
        let mut peer = theirs;
        writeln!(peer, "{{\"id\":{second},\"ok\":\"write-done\"}}")?;
        writeln!(
            peer,
            "{{\"id\":{first},\"err\":{{\"errno\":16,\"message\":\"busy\"}}}}"
        )?;
        let timeout = Duration::from_secs(5);
        let reset: std::result::Result<String, ErrorReply> =
            client.finish(first, timeout, &mut || Ok(()))?;
        assert_eq!(reset.err().map(|e| e.errno), Some(16));
        let write: std::result::Result<String, ErrorReply> =
            client.finish(second, timeout, &mut || Ok(()))?;
        assert_eq!(write.ok().as_deref(), Some("write-done"));
        Ok(())
    }

    #[test]
    fn a_reply_to_no_pending_request_is_an_error() -> Result<()> {
        let (ours, mut theirs) = UnixStream::pair()?;
        let mut client = LineClient::from_stream("peer", ours)?;
        let id = client.start(serde_json::json!({"op": "x"}))?;
        writeln!(theirs, "{{\"id\":99,\"ok\":1}}")?;
        let got: Result<std::result::Result<u32, ErrorReply>> =
            client.finish(id, Duration::from_secs(2), &mut || Ok(()));
        assert!(got.is_err());
        Ok(())
    }
}
