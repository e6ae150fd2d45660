//! Cost of one trapped BAR access through the vfio_user crate's Client -> Server over a unix
//! socket: the host-side part of a guest doorbell write (QEMU adds its own wake-ups on top).
//!
//! The same run also measures the floor under it: a raw unix-socket request/response
//! ping-pong with the doorbell write's message sizes, served by a blocking thread that reads
//! exactly the request and writes the reply. At the end it prints one summary line with both
//! medians and their ratio (the project's promise: ratio <= 1.5).
//!
//! Message sizes, from the vfio-user wire format (the crate's `Header` and `RegionAccess`):
//! - header: message id u16, command u16, message size u32, flags u32, error u32 = 16 bytes;
//! - region access: header + offset u64 + region u32 + count u32 = 32 bytes;
//! - REGION_WRITE request of 4 bytes = 32 + 4 data = 36 bytes (one `writev` from the client);
//! - REGION_WRITE reply = the region access struct without data = 32 bytes.
//!
//! The medians in the summary are computed from the very samples criterion analyses (each
//! sample's time divided by its iteration count, recorded through `iter_custom`), so they are
//! criterion's median point estimates of this run.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use nvme_cmb::server::Endpoint;
use nvme_cmb::{Device, DeviceSettings, EventLog};

/// vfio-user message header (16 bytes).
const HEADER_SIZE: usize = 2 + 2 + 4 + 4 + 4;
/// Header + offset u64 + region u32 + count u32 (32 bytes).
const REGION_ACCESS_SIZE: usize = HEADER_SIZE + 8 + 4 + 4;
/// Bytes written by a doorbell write (one 32-bit SQ tail doorbell).
const DOORBELL_DATA_SIZE: usize = 4;
/// What the client sends for a 4-byte REGION_WRITE: 36 bytes.
const WRITE_REQUEST_SIZE: usize = REGION_ACCESS_SIZE + DOORBELL_DATA_SIZE;
/// What the server answers to it: 32 bytes.
const WRITE_REPLY_SIZE: usize = REGION_ACCESS_SIZE;

/// vfio-user command number of REGION_WRITE and the reply flag.
const CMD_REGION_WRITE: u16 = 10;
const FLAG_REPLY: u32 = 1;

/// BAR0 offset of SQ0TDBL.
const SQ0_TAIL_DOORBELL: u64 = 0x1000 + 8;

/// Short runs: the machine has 2 cores shared with builds and VMs. Set on every group, which
/// takes precedence over criterion's command line, so `SAMPLES` is the number of measured
/// samples of each benchmark (the summary relies on that).
const SAMPLES: usize = 40;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASUREMENT: Duration = Duration::from_secs(3);

/// The promise for the doorbell write against the raw ping-pong.
const PROMISED_RATIO: f64 = 1.5;

fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(SAMPLES)
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT);
}

/// A vfio-user region access message (header + offset + region + count), little-endian.
fn region_access(
    message_id: u16,
    message_size: usize,
    flags: u32,
    offset: u64,
    region: u32,
    count: u32,
) -> [u8; REGION_ACCESS_SIZE] {
    let mut m = [0u8; REGION_ACCESS_SIZE];
    m[0..2].copy_from_slice(&message_id.to_le_bytes());
    m[2..4].copy_from_slice(&CMD_REGION_WRITE.to_le_bytes());
    m[4..8].copy_from_slice(&(message_size as u32).to_le_bytes());
    m[8..12].copy_from_slice(&flags.to_le_bytes());
    // 12..16: error 0
    m[16..24].copy_from_slice(&offset.to_le_bytes());
    m[24..28].copy_from_slice(&region.to_le_bytes());
    m[28..32].copy_from_slice(&count.to_le_bytes());
    m
}

/// Records each criterion sample as time per iteration (ns), in call order. The last
/// `SAMPLES` calls of a benchmark are its measurement (the earlier ones are warm-up).
#[derive(Debug, Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn record(&mut self, elapsed: Duration, iters: u64) -> Duration {
        self.0.push(elapsed.as_nanos() as f64 / iters.max(1) as f64);
        elapsed
    }

    /// Median of the measured samples (interpolated like criterion's), or None when this run
    /// did not measure (`--test`, a filter that skipped the benchmark, `--list`).
    fn median(&self) -> Option<f64> {
        if self.0.len() <= SAMPLES {
            return None;
        }
        let mut s = self.0[self.0.len() - SAMPLES..].to_vec();
        s.sort_by(f64::total_cmp);
        // Odd count: both indexes are the middle one; even: the two middle ones.
        Some((s[(s.len() - 1) / 2] + s[s.len() / 2]) / 2.0)
    }
}

/// Serves one raw client: reads exactly one request, writes one reply, until EOF. Blocking,
/// like the crate's server.
fn raw_ping_pong_server(listener: UnixListener) {
    let Ok((mut stream, _)) = listener.accept() else {
        return;
    };
    let reply = region_access(
        0,
        WRITE_REPLY_SIZE,
        FLAG_REPLY,
        SQ0_TAIL_DOORBELL,
        0,
        DOORBELL_DATA_SIZE as u32,
    );
    let mut request = [0u8; WRITE_REQUEST_SIZE];
    while stream.read_exact(&mut request).is_ok() {
        if stream.write_all(&reply).is_err() {
            break;
        }
    }
}

fn trapped_access(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vfu.sock");
    // No trace file: the figure is the transport and the device model, not disk writes.
    let log = Arc::new(EventLog::new(1 << 16, None));
    let device = Device::new(
        DeviceSettings {
            cmb_size: 64 << 10,
            ..Default::default()
        },
        log,
    )
    .expect("device");
    let endpoint = Endpoint::bind(&socket, &device).expect("endpoint");
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let device = device.clone();
        let stop = stop.clone();
        std::thread::spawn(move || endpoint.serve(&device, &stop))
    };
    let mut client = vfio_user::Client::new(&socket).expect("client");
    client
        .region_write(7, 0x04, &0x0006u16.to_le_bytes())
        .expect("decode on");

    let raw_socket = dir.path().join("raw.sock");
    let raw_server = {
        let listener = UnixListener::bind(&raw_socket).expect("raw listener");
        std::thread::spawn(move || raw_ping_pong_server(listener))
    };
    let mut raw = UnixStream::connect(&raw_socket).expect("raw client");

    let mut doorbell = Samples::default();
    let mut ping_pong = Samples::default();

    // The CSTS read first, so that the two figures compared in the summary are measured
    // back to back.
    let mut group = c.benchmark_group("trapped");
    configure(&mut group);
    group.bench_function("csts_read", |b| {
        let mut buf = [0u8; 4];
        b.iter(|| client.region_read(0, 0x1c, &mut buf).expect("csts read"))
    });
    let mut tail = 0u32;
    group.bench_function("doorbell_write", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                tail = (tail + 1) & 0x3ff;
                client
                    .region_write(0, SQ0_TAIL_DOORBELL, &tail.to_le_bytes())
                    .expect("doorbell write");
            }
            doorbell.record(start.elapsed(), iters)
        })
    });
    group.finish();

    let mut group = c.benchmark_group("unix_socket");
    configure(&mut group);
    let id = format!("ping_pong_{WRITE_REQUEST_SIZE}b_{WRITE_REPLY_SIZE}b");
    group.bench_function(id, |b| {
        let mut request = [0u8; WRITE_REQUEST_SIZE];
        request[..REGION_ACCESS_SIZE].copy_from_slice(&region_access(
            0,
            WRITE_REQUEST_SIZE,
            0,
            SQ0_TAIL_DOORBELL,
            0,
            DOORBELL_DATA_SIZE as u32,
        ));
        let mut reply = [0u8; WRITE_REPLY_SIZE];
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                raw.write_all(&request).expect("raw request");
                raw.read_exact(&mut reply).expect("raw reply");
            }
            ping_pong.record(start.elapsed(), iters)
        })
    });
    group.finish();

    match (doorbell.median(), ping_pong.median()) {
        (Some(d), Some(p)) => {
            let ratio = d / p;
            println!(
                "summary: trapped/doorbell_write median {d:.0} ns, raw unix-socket ping-pong \
                 ({WRITE_REQUEST_SIZE} B request, {WRITE_REPLY_SIZE} B reply) median {p:.0} ns, \
                 ratio {ratio:.2} (promise <= {PROMISED_RATIO}: {})",
                if ratio <= PROMISED_RATIO {
                    "kept"
                } else {
                    "NOT kept"
                }
            );
        }
        _ => println!(
            "summary: skipped (doorbell_write and the raw ping-pong were not both measured)"
        ),
    }

    drop(raw);
    let _ = raw_server.join();
    let _ = client.shutdown();
    drop(client);
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
}

criterion_group!(benches, trapped_access);
criterion_main!(benches);
