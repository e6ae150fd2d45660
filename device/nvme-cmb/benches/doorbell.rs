//! Cost of one trapped BAR access through nvme-cmb's vfio-user server (driven by the
//! `vfio_user` crate's Client over a unix socket): the host-side part of a guest doorbell
//! write (QEMU adds its own wake-ups on top), against the floor under it, a raw unix-socket
//! request/response ping-pong with the doorbell write's message sizes, served by a blocking
//! thread that reads exactly the request and writes the reply.
//!
//! Criterion measures `trapped/csts_read`, `trapped/doorbell_write` and the ping-pong on their
//! own, for absolute figures. The ratio (the device README's promise: <= 1.2) is measured
//! apart, because on a shared 2-core machine two figures taken seconds apart see different
//! schedulers (the raw floor alone swung from 7 to 108 us): one loop alternates a batch of
//! trapped writes with a batch of raw round trips, each pair timed back to back (in ABBA
//! order, so neither side always goes first), and the summary gives the median of the
//! per-pair ratios with its spread.
//!
//! Message sizes, from the vfio-user wire format:
//! - header: message id u16, command u16, message size u32, flags u32, error u32 = 16 bytes;
//! - region access: header + offset u64 + region u32 + count u32 = 32 bytes;
//! - REGION_WRITE request of 4 bytes = 32 + 4 data = 36 bytes (one `writev` from the client);
//! - REGION_WRITE reply = the region access struct without data = 32 bytes.

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

/// Short criterion runs: the machine has 2 cores shared with builds and VMs.
const SAMPLES: usize = 40;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASUREMENT: Duration = Duration::from_secs(3);

/// The interleaved ratio: operations per side of a pair (a batch amortises the clock reads
/// and one stray wake-up), warm-up and measurement time.
const BATCH: u32 = 8;
const PAIRS_WARM_UP: Duration = Duration::from_secs(1);
const PAIRS_MEASUREMENT: Duration = Duration::from_secs(6);

/// The device README's promise for the doorbell write against the raw ping-pong.
const PROMISED_RATIO: f64 = 1.2;

fn configure(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(SAMPLES)
        .warm_up_time(WARM_UP)
        .measurement_time(MEASUREMENT);
}

/// A vfio-user region access message (header + offset + region + count), host byte order.
fn region_access(
    message_size: usize,
    flags: u32,
    offset: u64,
    region: u32,
    count: u32,
) -> [u8; REGION_ACCESS_SIZE] {
    let mut m = [0u8; REGION_ACCESS_SIZE];
    // 0..2: message id 0
    m[2..4].copy_from_slice(&CMD_REGION_WRITE.to_ne_bytes());
    m[4..8].copy_from_slice(&(message_size as u32).to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    // 12..16: error 0
    m[16..24].copy_from_slice(&offset.to_ne_bytes());
    m[24..28].copy_from_slice(&region.to_ne_bytes());
    m[28..32].copy_from_slice(&count.to_ne_bytes());
    m
}

/// Serves one raw client: reads exactly one request, writes one reply, until EOF. Blocking,
/// like the device's server.
fn raw_ping_pong_server(listener: UnixListener) {
    let Ok((mut stream, _)) = listener.accept() else {
        return;
    };
    let reply = region_access(
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

/// Both sides of the comparison, connected.
struct Sides {
    client: vfio_user::Client,
    raw: UnixStream,
    tail: u32,
    request: [u8; WRITE_REQUEST_SIZE],
}

impl Sides {
    fn doorbell(&mut self) {
        self.tail = (self.tail + 1) & 0x3ff;
        self.client
            .region_write(0, SQ0_TAIL_DOORBELL, &self.tail.to_le_bytes())
            .expect("doorbell write");
    }

    fn raw_round_trip(&mut self) {
        let mut reply = [0u8; WRITE_REPLY_SIZE];
        self.raw.write_all(&self.request).expect("raw request");
        self.raw.read_exact(&mut reply).expect("raw reply");
    }

    fn time(&mut self, trapped: bool) -> f64 {
        let start = Instant::now();
        for _ in 0..BATCH {
            if trapped {
                self.doorbell();
            } else {
                self.raw_round_trip();
            }
        }
        start.elapsed().as_nanos() as f64 / f64::from(BATCH)
    }

    /// One pair, in the order `trapped_first` says: (trapped ns, raw ns) per operation.
    fn pair(&mut self, trapped_first: bool) -> (f64, f64) {
        let first = self.time(trapped_first);
        let second = self.time(!trapped_first);
        if trapped_first {
            (first, second)
        } else {
            (second, first)
        }
    }
}

/// The `q` quantile (0..=1) of sorted `values`, interpolated.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let at = q * (sorted.len() - 1) as f64;
    let (low, high) = (at.floor() as usize, at.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (at - low as f64)
}

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

/// Alternating pairs for `measure` after `warm_up`; prints the summary line.
fn interleaved(sides: &mut Sides, warm_up: Duration, measure: Duration) {
    let until = Instant::now() + warm_up;
    let mut order = 0u32;
    while Instant::now() < until {
        sides.pair(order.is_multiple_of(2));
        order += 1;
    }
    let (mut trapped, mut raw, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let until = Instant::now() + measure;
    while Instant::now() < until || ratios.len() < 2 {
        // ABBA: trapped first, raw first, raw first, trapped first, ...
        let (t, r) = sides.pair(matches!(order % 4, 0 | 3));
        order += 1;
        trapped.push(t);
        raw.push(r);
        ratios.push(t / r);
    }
    let (trapped, raw, ratios) = (sorted(trapped), sorted(raw), sorted(ratios));
    let median = quantile(&ratios, 0.5);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "summary: {} interleaved pairs of {BATCH} ops: trapped/doorbell_write median {:.0} ns, \
         raw ping-pong ({WRITE_REQUEST_SIZE} B / {WRITE_REPLY_SIZE} B) median {:.0} ns; \
         per-pair ratio median {median:.2}, IQR {:.2}-{:.2}, p10-p90 {:.2}-{:.2} \
         (promise <= {PROMISED_RATIO}: {}); load average {}",
        ratios.len(),
        quantile(&trapped, 0.5),
        quantile(&raw, 0.5),
        quantile(&ratios, 0.25),
        quantile(&ratios, 0.75),
        quantile(&ratios, 0.1),
        quantile(&ratios, 0.9),
        if median <= PROMISED_RATIO {
            "kept"
        } else {
            "NOT kept"
        },
        load.join(" "),
    );
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
    let endpoint = Endpoint::bind(&socket).expect("endpoint");
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
    let mut request = [0u8; WRITE_REQUEST_SIZE];
    request[..REGION_ACCESS_SIZE].copy_from_slice(&region_access(
        WRITE_REQUEST_SIZE,
        0,
        SQ0_TAIL_DOORBELL,
        0,
        DOORBELL_DATA_SIZE as u32,
    ));
    let mut sides = Sides {
        client,
        raw: UnixStream::connect(&raw_socket).expect("raw client"),
        tail: 0,
        request,
    };

    let mut group = c.benchmark_group("trapped");
    configure(&mut group);
    group.bench_function("csts_read", |b| {
        let mut buf = [0u8; 4];
        b.iter(|| sides.client.region_read(0, 0x1c, &mut buf).expect("csts"))
    });
    group.bench_function("doorbell_write", |b| b.iter(|| sides.doorbell()));
    group.finish();

    let mut group = c.benchmark_group("unix_socket");
    configure(&mut group);
    let id = format!("ping_pong_{WRITE_REQUEST_SIZE}b_{WRITE_REPLY_SIZE}b");
    group.bench_function(id, |b| b.iter(|| sides.raw_round_trip()));
    group.finish();

    // `cargo bench` passes --bench; `cargo test --benches` does not and gets a short smoke run.
    if std::env::args().any(|a| a == "--bench") {
        interleaved(&mut sides, PAIRS_WARM_UP, PAIRS_MEASUREMENT);
    } else {
        interleaved(&mut sides, Duration::ZERO, Duration::from_millis(10));
    }

    let Sides { client, raw, .. } = sides;
    drop(raw);
    let _ = raw_server.join();
    let _ = client.shutdown();
    drop(client);
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
}

criterion_group!(benches, trapped_access);
criterion_main!(benches);
