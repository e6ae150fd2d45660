//! A device served on real unix sockets in a temporary directory, and clients for it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
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

mod spec_client;
// Not every test crate uses the spec client.
#[allow(unused_imports)]
pub use spec_client::*;

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
        let endpoint = Endpoint::bind(&socket).expect("endpoint");
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

/// The device is still fully usable by a fresh client (the crate's).
pub fn next_client_is_served(rig: &Rig) {
    let mut client = rig.decoding_client();
    write32(&mut client, BAR0, 0x1000, 1);
    assert_eq!(read32(&mut client, BAR0, 0x08), 0x0001_0400);
}

/// Some `bad_request` event's detail contains `needle`.
pub fn bad_request_mentions(rig: &Rig, needle: &str) -> bool {
    rig.events()
        .iter()
        .any(|e| matches!(&e.kind, EventKind::BadRequest { detail } if detail.contains(needle)))
}
