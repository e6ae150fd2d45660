//! The control socket over a real unix socket.

mod common;

use std::io::Write;

use common::*;
use p2prig_protocol::device::{DeviceOp, DeviceReply, EventFilter};
use p2prig_protocol::wire::Outcome;

#[test]
fn events_since_pages_through_recorded_events() {
    let rig = Rig::default();
    let mut client = rig.decoding_client();
    for v in 0..5 {
        write32(&mut client, BAR0, 0x1000, v);
    }
    let mut control = rig.control_client();
    let DeviceReply::Events {
        events,
        last_seq,
        truncated,
    } = control.ok(DeviceOp::EventsSince {
        since: 2,
        limit: Some(3),
    })
    else {
        panic!("not events");
    };
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
    assert!(last_seq >= 8);
    assert!(!truncated);
}

#[test]
fn stats_count_accesses_and_connections() {
    let rig = Rig::default();
    let mut client = rig.decoding_client();
    write32(&mut client, BAR0, 0x1000, 1);
    read32(&mut client, BAR0, 0x1c);
    let mut control = rig.control_client();
    let DeviceReply::Stats(stats) = control.ok(DeviceOp::Stats) else {
        panic!("not stats");
    };
    assert_eq!((stats.bar_writes, stats.bar_reads), (1, 1));
    assert_eq!(stats.config_writes, 1);
    assert_eq!(stats.connections, 1);
}

#[test]
fn malformed_control_lines_get_error_replies_and_the_connection_survives() {
    let rig = Rig::default();
    let mut control = rig.control_client();
    for line in [
        &b"{\"id\":4,\"op\":\"self_destruct\"}\n"[..],
        b"{{{{\n",
        b"\xff\xfe\n",
        b"{\"id\":5,\"op\":\"events_since\",\"since\":-1}\n",
        b"{\"id\":6,\"op\":\"cmb_read\",\"offset\":0,\"length\":4294967295}\n",
    ] {
        let reply = control.send_raw(line);
        assert!(matches!(reply.outcome, Outcome::Err(_)), "{line:?}");
    }
    assert!(matches!(control.call(DeviceOp::Stats), Outcome::Ok(_)));
}

#[test]
fn blank_lines_are_skipped_and_ids_echoed() {
    let rig = Rig::default();
    let mut control = rig.control_client();
    control.writer_mut().write_all(b"\n\n").expect("blank");
    let reply = control.send_raw(b"{\"id\":77,\"op\":\"stats\"}\n");
    assert_eq!(reply.id, 77);
}

#[test]
fn wait_for_blocks_until_a_matching_event_arrives() {
    let rig = Rig::default();
    let mut control = rig.control_client();
    let socket = rig.socket.clone();
    let writer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut client = vfio_user::Client::new(&socket).expect("client");
        config_write16(&mut client, 0x04, 0x0006);
        write32(&mut client, BAR0, 0x1000 + 8, 42);
    });
    let reply = control.ok(DeviceOp::WaitFor {
        filter: EventFilter {
            kind: Some("bar".into()),
            offset: Some(0x1008),
            ..Default::default()
        },
        since: Some(0),
        timeout_ms: 10_000,
    });
    writer.join().expect("writer");
    let DeviceReply::WaitResult {
        event: Some(event), ..
    } = reply
    else {
        panic!("no event: {reply:?}");
    };
    assert!(matches!(
        event.kind,
        p2prig_protocol::event::EventKind::Bar {
            value: Some(42),
            ..
        }
    ));
}

#[test]
fn wait_for_times_out_with_no_event() {
    let rig = Rig::default();
    let mut control = rig.control_client();
    let reply = control.ok(DeviceOp::WaitFor {
        filter: EventFilter {
            kind: Some("violation".into()),
            ..Default::default()
        },
        since: None,
        timeout_ms: 20,
    });
    assert!(matches!(reply, DeviceReply::WaitResult { event: None, .. }));
}
