//! A device served on real unix sockets in a temporary directory, and clients for it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use nvme_cmb::control::ControlSocket;
use nvme_cmb::server::Endpoint;
use nvme_cmb::{Device, DeviceSettings, EventLog};
use p2prig_protocol::device::{DeviceOp, DeviceReply};
use p2prig_protocol::event::{Event, EventKind};
use p2prig_protocol::wire::{decode_line, encode_line, Outcome, Reply, Request};
use vfio_user::Client;

pub const BAR0: u32 = 0;
pub const CMB: u32 = 2;
pub const CONFIG: u32 = 7;

/// One device with its vfio-user and control sockets, stopped on drop.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub device: Arc<Device>,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub trace: PathBuf,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Rig {
    pub fn start(settings: DeviceSettings) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("vfu.sock");
        let control = dir.path().join("control.sock");
        let trace = dir.path().join("trace.jsonl");
        let file = std::fs::File::create(&trace).expect("trace");
        let log = Arc::new(EventLog::new(100_000, Some(file)));
        let device = Device::new(settings, log).expect("device");
        let endpoint = Endpoint::bind(&socket, &device).expect("endpoint");
        let control_socket = ControlSocket::bind(&control).expect("control");
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let device = device.clone();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || endpoint.serve(&device, &stop)));
        }
        {
            let device = device.clone();
            let stop = stop.clone();
            // The control thread blocks in accept; it is left to end with the test process.
            std::thread::spawn(move || nvme_cmb::control::serve(&control_socket, &device, &stop));
        }
        Rig {
            dir,
            device,
            socket,
            control,
            trace,
            stop,
            threads,
        }
    }

    pub fn default() -> Rig {
        Rig::start(DeviceSettings {
            cmb_size: 64 << 10,
            ..Default::default()
        })
    }

    pub fn client(&self) -> Client {
        Client::new(&self.socket).expect("vfio-user client connects")
    }

    /// A client with memory decode enabled.
    pub fn decoding_client(&self) -> Client {
        let mut client = self.client();
        config_write16(&mut client, 0x04, 0x0006);
        client
    }

    pub fn events(&self) -> Vec<Event> {
        self.device.log().since(0, 1_000_000).events
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        self.events().iter().map(|e| e.kind.name()).collect()
    }

    pub fn control_client(&self) -> ControlClient {
        ControlClient::connect(&self.control)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

pub fn read32(client: &mut Client, region: u32, offset: u64) -> u32 {
    let mut buf = [0u8; 4];
    client.region_read(region, offset, &mut buf).expect("read");
    u32::from_le_bytes(buf)
}

pub fn read64(client: &mut Client, region: u32, offset: u64) -> u64 {
    let mut buf = [0u8; 8];
    client.region_read(region, offset, &mut buf).expect("read");
    u64::from_le_bytes(buf)
}

pub fn write32(client: &mut Client, region: u32, offset: u64, value: u32) {
    client
        .region_write(region, offset, &value.to_le_bytes())
        .expect("write");
}

pub fn config_write16(client: &mut Client, offset: u64, value: u16) {
    client
        .region_write(CONFIG, offset, &value.to_le_bytes())
        .expect("config write");
}

pub fn config_read16(client: &mut Client, offset: u64) -> u16 {
    let mut buf = [0u8; 2];
    client.region_read(CONFIG, offset, &mut buf).expect("read");
    u16::from_le_bytes(buf)
}

/// Polls `cond` for up to 10 s.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The last event of `kind`.
pub fn last_of<'a>(events: &'a [Event], kind: &str) -> Option<&'a EventKind> {
    events
        .iter()
        .rev()
        .map(|e| &e.kind)
        .find(|k| k.name() == kind)
}

/// A JSON-lines client of the control socket.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl ControlClient {
    pub fn connect(path: &std::path::Path) -> ControlClient {
        let writer = UnixStream::connect(path).expect("control connects");
        writer
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let reader = BufReader::new(writer.try_clone().expect("clone"));
        ControlClient {
            reader,
            writer,
            next_id: 1,
        }
    }

    pub fn writer_mut(&mut self) -> &mut UnixStream {
        &mut self.writer
    }

    pub fn send_raw(&mut self, line: &[u8]) -> Reply<DeviceReply> {
        self.writer.write_all(line).expect("send");
        let mut reply = Vec::new();
        self.reader.read_until(b'\n', &mut reply).expect("reply");
        decode_line(&reply).expect("reply parses")
    }

    pub fn call(&mut self, op: DeviceOp) -> Outcome<DeviceReply> {
        let id = self.next_id;
        self.next_id += 1;
        let reply = self.send_raw(&encode_line(&Request { id, op }));
        assert_eq!(reply.id, id);
        reply.outcome
    }

    pub fn ok(&mut self, op: DeviceOp) -> DeviceReply {
        match self.call(op) {
            Outcome::Ok(reply) => reply,
            Outcome::Err(e) => panic!("control error: {e}"),
        }
    }
}

/// A minimal hand-written vfio-user client, for messages the crate's client cannot send
/// (bad sizes, unknown commands) and for checking error replies.
pub struct RawClient {
    pub stream: UnixStream,
    next_id: u16,
}

pub const HEADER_SIZE: usize = 16;
pub const FLAG_ERROR: u32 = 1 << 5;

pub struct RawReply {
    pub id: u16,
    pub command: u16,
    pub flags: u32,
    pub error: u32,
    pub payload: Vec<u8>,
}

impl RawClient {
    /// Connects without negotiating anything.
    pub fn bare(path: &std::path::Path) -> RawClient {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        RawClient { stream, next_id: 0 }
    }

    /// Connects and negotiates the version.
    pub fn connect(path: &std::path::Path) -> RawClient {
        let mut client = RawClient::bare(path);
        let mut payload = vec![0u8, 0, 0, 0]; // major 0, minor 0
        payload.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":1}}\0");
        let reply = client.request(1, &payload);
        assert_eq!(reply.flags & FLAG_ERROR, 0, "version accepted");
        client
    }

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
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut message = Vec::with_capacity(size as usize);
        message.extend_from_slice(&id.to_le_bytes());
        message.extend_from_slice(&command.to_le_bytes());
        message.extend_from_slice(&size.to_le_bytes());
        message.extend_from_slice(&flags.to_le_bytes());
        message.extend_from_slice(&0u32.to_le_bytes());
        message.extend_from_slice(payload);
        self.stream.write_all(&message).expect("send");
        id
    }

    /// True when the server closed the connection (EOF within the read timeout).
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

    pub fn receive(&mut self) -> RawReply {
        let mut header = [0u8; HEADER_SIZE];
        self.stream.read_exact(&mut header).expect("reply header");
        let size = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let mut payload = vec![0u8; size.saturating_sub(HEADER_SIZE)];
        self.stream.read_exact(&mut payload).expect("reply payload");
        RawReply {
            id: u16::from_le_bytes([header[0], header[1]]),
            command: u16::from_le_bytes([header[2], header[3]]),
            flags: u32::from_le_bytes([header[8], header[9], header[10], header[11]]),
            error: u32::from_le_bytes([header[12], header[13], header[14], header[15]]),
            payload,
        }
    }

    pub fn request(&mut self, command: u16, payload: &[u8]) -> RawReply {
        self.send(command, 0, payload);
        self.receive()
    }

    /// REGION_READ (9): offset u64, region u32, count u32.
    pub fn region_read(&mut self, region: u32, offset: u64, count: u32) -> RawReply {
        let mut payload = offset.to_le_bytes().to_vec();
        payload.extend_from_slice(&region.to_le_bytes());
        payload.extend_from_slice(&count.to_le_bytes());
        self.request(9, &payload)
    }
}
