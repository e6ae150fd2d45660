//! Every reset path, the reset window and violations, over a real vfio-user socket.

mod common;

use std::time::Duration;

use common::*;
use nvme_cmb::DeviceSettings;
use p2prig_protocol::device::EventFilter;
use p2prig_protocol::event::{Access, EventKind};

const DEVCTL: u64 = 0x58;
const PMCSR: u64 = 0x44;

fn rig_with_reset_ms(reset_ms: u64) -> Rig {
    Rig::start(DeviceSettings {
        cmb_size: 64 << 10,
        reset_ms,
        ..Default::default()
    })
}

/// Programs registers, a doorbell and the CMB so a reset has something to clear.
fn dirty(client: &mut vfio_user::Client) {
    write32(client, BAR0, 0x24, 0x001f_001f);
    write32(client, BAR0, 0x14, 1);
    write32(client, BAR0, 0x1000 + 8, 5);
    client.region_write(CMB, 0x100, &[0xab; 32]).expect("cmb");
}

fn cmb_is_zero(rig: &Rig) -> bool {
    let mut buf = [0xffu8; 32];
    rig.device.cmb().read(0x100, &mut buf).expect("cmb");
    buf == [0; 32]
}

fn wait_reset_end(rig: &Rig) -> u64 {
    let filter = EventFilter {
        kind: Some("reset_end".into()),
        ..Default::default()
    };
    let (event, _) = rig
        .device
        .log()
        .wait_for(&filter, 0, Duration::from_secs(10));
    event.expect("reset_end").generation
}

fn resets(rig: &Rig) -> Vec<(&'static str, String)> {
    rig.events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::ResetStart { cause } => Some(("start", cause)),
            EventKind::ResetEnd { cause } => Some(("end", cause)),
            _ => None,
        })
        .collect()
}

#[test]
fn flr_through_device_control_resets_everything_and_bumps_generation() {
    let rig = rig_with_reset_ms(0);
    let mut client = rig.decoding_client();
    dirty(&mut client);
    config_write16(&mut client, DEVCTL, 0x8000 | 0x2810);
    assert_eq!(
        resets(&rig),
        [("start", "flr".into()), ("end", "flr".into())]
    );
    assert_eq!(rig.device.log().generation(), 1);
    assert_eq!(
        config_read16(&mut client, 0x04) & 0x2,
        0,
        "decode off after FLR"
    );
    assert_eq!(
        config_read16(&mut client, DEVCTL),
        0x2810,
        "FLR bit reads 0"
    );
    config_write16(&mut client, 0x04, 0x0006);
    assert_eq!(read32(&mut client, BAR0, 0x24), 0, "AQA cleared by FLR");
    assert_eq!(read32(&mut client, BAR0, 0x14), 0, "CC cleared");
    assert!(rig.device.registers().doorbells.is_empty());
    assert!(cmb_is_zero(&rig));
}

#[test]
fn vfio_user_device_reset_resets_and_bumps_generation() {
    let rig = rig_with_reset_ms(0);
    let mut client = rig.decoding_client();
    dirty(&mut client);
    client.reset().expect("reset");
    assert_eq!(
        resets(&rig),
        [("start", "vfio_user".into()), ("end", "vfio_user".into())]
    );
    assert_eq!(rig.device.log().generation(), 1);
    assert!(cmb_is_zero(&rig));
    assert!(rig.device.registers().doorbells.is_empty());
}

#[test]
fn clearing_cc_enable_is_a_controller_reset_that_keeps_admin_queues_and_config() {
    let rig = rig_with_reset_ms(0);
    let mut client = rig.decoding_client();
    dirty(&mut client);
    write32(&mut client, BAR0, 0x14, 0);
    assert_eq!(
        resets(&rig),
        [("start", "controller".into()), ("end", "controller".into())]
    );
    assert_eq!(read32(&mut client, BAR0, 0x24), 0x001f_001f, "AQA kept");
    assert_eq!(
        config_read16(&mut client, 0x04) & 0x2,
        0x2,
        "decode stays on"
    );
    assert!(rig.device.registers().doorbells.is_empty());
    assert!(cmb_is_zero(&rig));
}

#[test]
fn d3hot_to_d0_without_no_soft_reset_resets_the_function() {
    let rig = rig_with_reset_ms(0);
    let mut client = rig.decoding_client();
    dirty(&mut client);
    config_write16(&mut client, PMCSR, 3);
    assert_eq!(config_read16(&mut client, PMCSR) & 3, 3);
    config_write16(&mut client, PMCSR, 0);
    assert_eq!(
        resets(&rig),
        [("start", "d3hot".into()), ("end", "d3hot".into())]
    );
    let states: Vec<u8> = rig
        .events()
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::PowerState { state } => Some(state),
            _ => None,
        })
        .collect();
    assert_eq!(states, [3, 0]);
    assert!(cmb_is_zero(&rig));
}

#[test]
fn bar_access_in_d3hot_is_a_violation() {
    let rig = rig_with_reset_ms(0);
    let mut client = rig.decoding_client();
    config_write16(&mut client, PMCSR, 3);
    write32(&mut client, BAR0, 0x1000, 1);
    let events = rig.events();
    assert!(matches!(
        last_of(&events, "violation"),
        Some(EventKind::Violation { reason, access: Access::Write, offset: 0x1000, value: Some(1), .. })
            if reason == "d3hot"
    ));
}

#[test]
fn timed_flr_reads_config_as_all_ones_and_records_accesses_as_violations() {
    let rig = rig_with_reset_ms(150);
    let mut client = rig.decoding_client();
    config_write16(&mut client, DEVCTL, 0x8000);
    assert_eq!(read32(&mut client, CONFIG, 0x00), 0xffff_ffff);
    write32(&mut client, BAR0, 0x1000 + 16, 9);
    let mut buf = [0u8; 8];
    client.region_read(CMB, 0, &mut buf).expect("read");
    assert_eq!(buf, [0xff; 8], "refused read returns all-ones");
    config_write16(&mut client, 0x04, 0x0006);
    let violations: Vec<(String, u8, u64)> = rig
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Violation {
                reason,
                bar,
                offset,
                ..
            } => Some((reason, bar, offset)),
            _ => None,
        })
        .collect();
    assert_eq!(
        violations,
        [
            ("in_reset:flr".to_string(), 0, 0x1010),
            ("in_reset:flr".to_string(), 2, 0),
            ("in_reset:flr".to_string(), 7, 0x04),
        ]
    );
    assert_eq!(wait_reset_end(&rig), 1);
    assert_eq!(read32(&mut client, CONFIG, 0x00), 0xc0b2_1b36);
    // Violations inside the window carry the old generation.
    assert!(rig
        .events()
        .iter()
        .filter(|e| e.kind.name() == "violation")
        .all(|e| e.generation == 0));
}

#[test]
fn timed_vfio_user_reset_is_over_when_the_client_gets_the_reply() {
    let rig = rig_with_reset_ms(100);
    let mut client = rig.decoding_client();
    let control = rig.control.clone();
    // While the reply is pending the control socket sees the reset in progress.
    let watcher = std::thread::spawn(move || {
        let mut control = ControlClient::connect(&control);
        eventually(|| {
            matches!(
                control.ok(p2prig_protocol::device::DeviceOp::Registers),
                p2prig_protocol::device::DeviceReply::Registers(ref dump) if dump.in_reset.as_deref() == Some("vfio_user")
            )
        })
    });
    client.reset().expect("reset");
    assert_eq!(
        resets(&rig),
        [("start", "vfio_user".into()), ("end", "vfio_user".into())],
        "reset_end recorded before the reply"
    );
    assert!(rig.device.registers().in_reset.is_none());
    // QEMU reads config space right after the reply (vfio_pci_post_reset).
    assert_eq!(
        read32(&mut client, CONFIG, 0x3c) >> 8 & 0xff,
        0,
        "interrupt pin"
    );
    assert_eq!(read32(&mut client, CONFIG, 0x00), 0xc0b2_1b36);
    assert!(
        watcher.join().expect("watcher"),
        "in_reset seen during the reset"
    );
}

#[test]
fn timed_controller_reset_keeps_rdy_until_done_and_flags_doorbells() {
    let rig = rig_with_reset_ms(150);
    let mut client = rig.decoding_client();
    write32(&mut client, BAR0, 0x14, 1);
    write32(&mut client, BAR0, 0x14, 0);
    assert_eq!(
        read32(&mut client, BAR0, 0x1c) & 1,
        1,
        "RDY still 1 while resetting"
    );
    assert_eq!(
        read32(&mut client, CONFIG, 0x00),
        0xc0b2_1b36,
        "function stays up"
    );
    write32(&mut client, BAR0, 0x1000, 3);
    assert_eq!(rig.device.log().stats().violations, 1);
    wait_reset_end(&rig);
    assert_eq!(read32(&mut client, BAR0, 0x1c) & 1, 0, "RDY 0 once reset");
}

#[test]
fn reset_duration_set_over_the_control_socket_applies_to_later_resets() {
    let rig = rig_with_reset_ms(0);
    let mut control = rig.control_client();
    control.ok(p2prig_protocol::device::DeviceOp::SetResetDuration { ms: 100 });
    let mut client = rig.decoding_client();
    config_write16(&mut client, DEVCTL, 0x8000);
    assert_eq!(read32(&mut client, CONFIG, 0x00), 0xffff_ffff);
    wait_reset_end(&rig);
}

#[test]
fn bar_access_with_memory_decode_off_is_a_violation_and_does_not_land() {
    let rig = rig_with_reset_ms(0);
    let mut client = rig.decoding_client();
    config_write16(&mut client, 0x04, 0x0004); // bus master only: decode off
    write32(&mut client, BAR0, 0x1000, 7);
    assert_eq!(read32(&mut client, BAR0, 0x00), 0xffff_ffff);
    assert!(rig.device.registers().doorbells.is_empty());
    let events = rig.events();
    let decodes: Vec<bool> = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Decode { enabled } => Some(enabled),
            _ => None,
        })
        .collect();
    assert_eq!(decodes, [true, false]);
    let reasons: Vec<String> = events
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Violation { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons, ["decode_off", "decode_off"]);
}

#[test]
fn command_write_that_keeps_decode_on_records_no_decode_change() {
    let rig = rig_with_reset_ms(0);
    let mut client = rig.decoding_client();
    config_write16(&mut client, 0x04, 0x0002);
    config_write16(&mut client, 0x04, 0x0006);
    let decodes = rig.kinds().iter().filter(|k| **k == "decode").count();
    assert_eq!(decodes, 1);
}
