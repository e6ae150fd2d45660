//! BAR2, the controller memory buffer, in trap and mmap modes.

mod common;

use common::*;
use nvme_cmb::{CmbMode, DeviceSettings};
use p2prig_protocol::device::{DeviceOp, DeviceReply};
use p2prig_protocol::event::{Access, EventKind};

#[test]
fn trapped_cmb_writes_and_reads_are_events_and_land_in_the_memfd() {
    let rig = Rig::default();
    let mut client = rig.decoding_client();
    client
        .region_write(CMB, 0x40, &0x1122_3344_5566_7788u64.to_le_bytes())
        .expect("write");
    let mut wide = [0u8; 16];
    client.region_read(CMB, 0x40, &mut wide).expect("read");
    assert_eq!(&wide[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
    let bars: Vec<EventKind> = rig
        .events()
        .into_iter()
        .map(|e| e.kind)
        .filter(|k| k.name() == "bar")
        .collect();
    assert_eq!(
        bars,
        [
            EventKind::Bar {
                access: Access::Write,
                bar: 2,
                offset: 0x40,
                size: 8,
                value: Some(0x1122_3344_5566_7788),
                data: None
            },
            EventKind::Bar {
                access: Access::Read,
                bar: 2,
                offset: 0x40,
                size: 16,
                value: None,
                data: Some("88776655443322110000000000000000".into())
            },
        ]
    );
    let mut control = rig.control_client();
    assert_eq!(
        control.ok(DeviceOp::CmbRead {
            offset: 0x40,
            length: 2
        }),
        DeviceReply::CmbData {
            offset: 0x40,
            data_hex: "8877".into()
        }
    );
}

#[test]
fn cmb_fill_over_the_control_socket_is_what_the_client_reads() {
    let rig = Rig::default();
    let mut control = rig.control_client();
    control.ok(DeviceOp::CmbFill {
        offset: 0,
        length: None,
        pattern_hex: "deadbeef".into(),
    });
    let mut client = rig.decoding_client();
    assert_eq!(read32(&mut client, CMB, (64 << 10) - 4), 0xefbe_adde);
}

#[test]
fn mmap_mode_hands_the_client_the_memfd_and_the_device_sees_its_writes() {
    let rig = Rig::start(DeviceSettings {
        cmb_size: 64 << 10,
        cmb_mode: CmbMode::Mmap,
        ..Default::default()
    });
    let client = rig.client();
    let region = client.region(CMB).expect("cmb region");
    assert_ne!(region.flags & 4, 0, "FLAG_MMAP");
    assert_eq!(region.sparse_areas.len(), 1);
    assert_eq!(region.sparse_areas[0].size, 64 << 10);
    let file_offset = region.file_offset.as_ref().expect("memfd sent");
    // Writing through the received fd is what QEMU's mapping does: no message, no event.
    use std::os::unix::fs::FileExt;
    file_offset
        .file()
        .write_all_at(b"p2p", 0x10)
        .expect("write through fd");
    let mut control = rig.control_client();
    assert_eq!(
        control.ok(DeviceOp::CmbRead {
            offset: 0x10,
            length: 3
        }),
        DeviceReply::CmbData {
            offset: 0x10,
            data_hex: "703270".into()
        }
    );
    assert_eq!(rig.device.log().stats().bar_writes, 0);
}

#[test]
fn cmb_zeroed_by_reset_is_seen_through_the_mapping() {
    let rig = Rig::start(DeviceSettings {
        cmb_size: 64 << 10,
        cmb_mode: CmbMode::Mmap,
        ..Default::default()
    });
    let mut client = rig.client();
    use std::os::unix::fs::FileExt;
    let file = client
        .region(CMB)
        .and_then(|r| r.file_offset.as_ref())
        .map(|f| f.file().try_clone().expect("dup"))
        .expect("memfd");
    file.write_all_at(&[7; 64], 0).expect("write");
    client.reset().expect("reset");
    let mut back = [1u8; 64];
    file.read_exact_at(&mut back, 0).expect("read");
    assert_eq!(back, [0; 64]);
}
