//! Cost of one trapped BAR access through the vfio_user crate's Client -> Server over a unix
//! socket: the host-side part of a guest doorbell write (QEMU adds its own wake-ups on top).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use nvme_cmb::server::Endpoint;
use nvme_cmb::{Device, DeviceSettings, EventLog};

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

    let mut group = c.benchmark_group("trapped");
    let mut tail = 0u32;
    group.bench_function("doorbell_write", |b| {
        b.iter(|| {
            tail = (tail + 1) & 0x3ff;
            client
                .region_write(0, 0x1000 + 8, &tail.to_le_bytes())
                .expect("doorbell write");
        })
    });
    group.bench_function("csts_read", |b| {
        let mut buf = [0u8; 4];
        b.iter(|| client.region_read(0, 0x1c, &mut buf).expect("csts read"))
    });
    group.finish();

    let _ = client.shutdown();
    drop(client);
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
}

criterion_group!(benches, trapped_access);
criterion_main!(benches);
