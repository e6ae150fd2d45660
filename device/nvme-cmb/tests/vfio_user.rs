//! The device driven over a real vfio-user socket by the `vfio_user` crate's client.

mod common;

use common::*;
use nvme_cmb::DeviceSettings;
use p2prig_protocol::event::{Access, EventKind};

#[test]
fn client_sees_a_pci_device_with_nine_regions_and_the_bar_sizes() {
    let rig = Rig::default();
    let client = rig.client();
    let sizes: Vec<u64> = (0..9)
        .map(|i| client.region(i).map_or(u64::MAX, |r| r.size))
        .collect();
    assert_eq!(sizes, [16 << 10, 0, 64 << 10, 0, 0, 0, 0, 4096, 0]);
    assert!(
        client.region(2).is_some_and(|r| r.file_offset.is_none()),
        "trap mode: no fd"
    );
}

#[test]
fn config_space_reports_nvme_class_and_capabilities() {
    let rig = Rig::default();
    let mut client = rig.client();
    assert_eq!(read32(&mut client, CONFIG, 0x00), 0xc0b2_1b36);
    assert_eq!(read32(&mut client, CONFIG, 0x08) >> 8, 0x010802);
    assert_eq!(
        config_read16(&mut client, 0x06) & 0x10,
        0x10,
        "capability list"
    );
    assert_eq!(read32(&mut client, CONFIG, 0x34) & 0xff, 0x40);
    assert_eq!(config_read16(&mut client, 0x40), 0x5001, "PM, next PCIe");
    assert_eq!(config_read16(&mut client, 0x50), 0x0010, "PCIe, last");
    assert_ne!(
        read32(&mut client, CONFIG, 0x54) & (1 << 28),
        0,
        "FLR capable"
    );
}

#[test]
fn bar_sizing_through_config_writes_reads_back_the_masks() {
    let rig = Rig::default();
    let mut client = rig.client();
    for bar in 0..6u64 {
        write32(&mut client, CONFIG, 0x10 + 4 * bar, 0xffff_ffff);
    }
    let bars: Vec<u32> = (0..6u64)
        .map(|bar| read32(&mut client, CONFIG, 0x10 + 4 * bar))
        .collect();
    assert_eq!(
        bars,
        [0xffff_c004, 0xffff_ffff, 0xffff_000c, 0xffff_ffff, 0, 0]
    );
    write32(&mut client, CONFIG, 0x10, 0xfebf_0000);
    assert_eq!(read32(&mut client, CONFIG, 0x10), 0xfebf_0004);
}

#[test]
fn controller_registers_read_cap_vs_cmbloc_cmbsz() {
    let rig = Rig::default();
    let mut client = rig.decoding_client();
    let cap = read64(&mut client, BAR0, 0x00);
    assert_eq!(cap & 0xffff, 1023, "MQES");
    assert_eq!((cap >> 32) & 0xf, 0, "DSTRD 0");
    assert_ne!(cap & (1 << 57), 0, "CMBS");
    assert_eq!(read32(&mut client, BAR0, 0x08), 0x0001_0400, "VS 1.4");
    assert_eq!(read32(&mut client, BAR0, 0x38), 2, "CMBLOC BIR 2 offset 0");
    // 64 KiB: SZU 1 (64 KiB), SZ 1, SQS|CQS|RDS|WDS.
    assert_eq!(read32(&mut client, BAR0, 0x3c), 1 << 12 | 1 << 8 | 0x1b);
}

#[test]
fn csts_ready_follows_cc_enable() {
    let rig = Rig::start(DeviceSettings {
        cmb_size: 64 << 10,
        ready_delay_ms: 30,
        ..Default::default()
    });
    let mut client = rig.decoding_client();
    write32(&mut client, BAR0, 0x14, 1);
    assert_eq!(
        read32(&mut client, BAR0, 0x1c) & 1,
        0,
        "not ready before the delay"
    );
    assert!(eventually(|| read32(&mut client, BAR0, 0x1c) & 1 == 1));
    write32(&mut client, BAR0, 0x14, 0);
    assert_eq!(
        read32(&mut client, BAR0, 0x1c) & 1,
        0,
        "disable resets at once"
    );
}

#[test]
fn doorbell_writes_are_recorded_with_offset_size_and_value() {
    let rig = Rig::default();
    let mut client = rig.decoding_client();
    write32(&mut client, BAR0, 0x1000 + 8 * 5, 17);
    write32(&mut client, BAR0, 0x1000 + 8 * 5 + 4, 3);
    let events = rig.events();
    let doorbells: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Bar {
                access: Access::Write,
                bar: 0,
                offset,
                size,
                value,
                ..
            } => Some((*offset, *size, *value)),
            _ => None,
        })
        .collect();
    assert_eq!(doorbells, [(0x1028, 4, Some(17)), (0x102c, 4, Some(3))]);
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let dump = rig.device.registers();
    assert_eq!(dump.doorbells.len(), 1);
    assert_eq!(
        (dump.doorbells[0].sq_tail, dump.doorbells[0].cq_head),
        (17, 3)
    );
}

#[test]
fn reads_of_doorbells_and_reserved_registers_return_zero_and_are_recorded() {
    let rig = Rig::default();
    let mut client = rig.decoding_client();
    write32(&mut client, BAR0, 0x1000, 9);
    assert_eq!(read32(&mut client, BAR0, 0x1000), 0);
    write32(&mut client, BAR0, 0x0f00, 0xdead);
    assert_eq!(read32(&mut client, BAR0, 0x0f00), 0);
    assert_eq!(read32(&mut client, BAR0, 0x3ffc), 0);
    let bar_events = rig.kinds().iter().filter(|k| **k == "bar").count();
    assert_eq!(bar_events, 5);
}

#[test]
fn trace_file_has_one_json_line_per_event() {
    let rig = Rig::default();
    let mut client = rig.decoding_client();
    write32(&mut client, BAR0, 0x1000, 1);
    let text = std::fs::read_to_string(&rig.trace).expect("trace");
    let events: Vec<p2prig_protocol::event::Event> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("event line"))
        .collect();
    assert_eq!(events, rig.events());
}

#[test]
fn a_new_client_is_served_after_the_previous_one_disconnects() {
    let rig = Rig::default();
    {
        let mut first = rig.decoding_client();
        write32(&mut first, BAR0, 0x1000, 1);
        first.shutdown().expect("shutdown");
    }
    let mut second = rig.decoding_client();
    write32(&mut second, BAR0, 0x1000, 2);
    assert!(eventually(|| rig.device.log().stats().connections == 2));
    let clients: Vec<bool> = rig
        .events()
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Client { connected } => Some(connected),
            _ => None,
        })
        .collect();
    assert_eq!(clients, [true, false, true]);
}

#[test]
fn out_of_range_and_misaligned_reads_get_error_replies_and_events() {
    let rig = Rig::default();
    let mut raw = SpecClient::connect(&rig.socket);
    for (region, offset, count) in [
        (0, 0x4000, 4),
        (0, 2, 4),
        (0, 0, 3),
        (5, 0, 4),
        (7, 4095, 4),
    ] {
        let reply = raw.region_read(region, offset, count);
        assert_ne!(
            reply.flags & FLAG_ERROR,
            0,
            "region {region} offset {offset}"
        );
    }
    // The connection still works after the errors.
    let reply = raw.region_read(7, 0, 4);
    assert_eq!(reply.flags & FLAG_ERROR, 0);
    assert_eq!(&reply.payload[16..20], &0xc0b2_1b36u32.to_le_bytes());
    // Region 5 exists in the table (size 0), so the device refuses it too.
    assert_eq!(rig.device.log().stats().bad_requests, 5);
    // Region 9 is past the table: the crate refuses it without asking the device.
    let reply = raw.region_read(9, 0, 4);
    assert_ne!(reply.flags & FLAG_ERROR, 0);
    assert_eq!(reply.error, libc::EINVAL as u32);
}

#[test]
fn refused_writes_are_dropped_and_recorded_but_acknowledged() {
    let rig = Rig::default();
    let mut client = rig.decoding_client();
    client
        .region_write(BAR0, 0x3ffe, &[1, 2, 3, 4])
        .expect("acknowledged");
    client
        .region_write(CMB, 64 << 10, &[1])
        .expect("acknowledged");
    let stats = rig.device.log().stats();
    assert_eq!(stats.bad_requests, 2);
    assert_eq!(stats.bar_writes, 0);
    // Still in sync: a read after the refused writes returns the right value.
    assert_eq!(read32(&mut client, BAR0, 0x08), 0x0001_0400);
}
