//! The faults of the `vfio_user` crate 0.1.7 (shared/reference/qemu-vfio-user.md) and how
//! the device works around or survives each: at worst the offending connection ends, the
//! process stays up and the next client is served.

mod common;

use std::io::Write;

use common::*;

const VERSION: u16 = 1;
const DMA_UNMAP: u16 = 3;
const GET_REGION_INFO: u16 = 5;
const REGION_WRITE: u16 = 10;
const NO_REPLY: u32 = 1 << 4;

/// The device is still fully usable by a fresh client.
fn next_client_is_served(rig: &Rig) {
    let mut client = rig.decoding_client();
    write32(&mut client, BAR0, 0x1000, 1);
    assert_eq!(read32(&mut client, BAR0, 0x08), 0x0001_0400);
}

fn bad_request_mentions(rig: &Rig, needle: &str) -> bool {
    rig.events().iter().any(|e| {
        matches!(&e.kind, p2prig_protocol::event::EventKind::BadRequest { detail } if detail.contains(needle))
    })
}

#[test]
fn region_info_padded_to_argsz_desynchronises_only_that_connection() {
    let rig = Rig::default();
    let mut raw = RawClient::connect(&rig.socket);
    // vfio_region_info (32 bytes) with argsz promising 64 more bytes of capability room,
    // which a spec-following client sends: the crate reads 32 and parses the rest as headers.
    let mut payload = Vec::new();
    payload.extend_from_slice(&(32u32 + 64).to_le_bytes());
    payload.extend_from_slice(&[0u8; 28]);
    payload.extend_from_slice(&[0u8; 64]);
    raw.send(GET_REGION_INFO, 0, &payload);
    let first = raw.receive();
    assert_eq!(first.flags & FLAG_ERROR, 0);
    let stray = raw.receive();
    assert_ne!(stray.flags & FLAG_ERROR, 0, "padding parsed as a header");
    assert_eq!(stray.id, 0);
    drop(raw);
    next_client_is_served(&rig);
}

#[test]
fn unknown_command_gets_an_error_without_errno_and_the_next_client_is_served() {
    let rig = Rig::default();
    let mut raw = RawClient::connect(&rig.socket);
    let reply = raw.request(0x99, &[]);
    assert_ne!(reply.flags & FLAG_ERROR, 0);
    assert_eq!(
        reply.error, 0,
        "the crate sends errno 0 where the spec wants one"
    );
    // Without a payload the stream stays in sync.
    let read = raw.region_read(CONFIG, 0, 4);
    assert_eq!(read.flags & FLAG_ERROR, 0);
    drop(raw);
    next_client_is_served(&rig);
}

#[test]
fn version_without_nul_terminator_panics_in_the_crate_and_ends_only_that_connection() {
    let rig = Rig::default();
    let mut raw = RawClient::bare(&rig.socket);
    let mut payload = vec![0u8, 0, 0, 0];
    payload.extend_from_slice(b"{}");
    raw.send(VERSION, 0, &payload);
    assert!(raw.closed_by_server());
    assert!(eventually(|| bad_request_mentions(&rig, "panic")));
    next_client_is_served(&rig);
}

#[test]
fn version_with_message_size_below_its_struct_ends_only_that_connection() {
    let rig = Rig::default();
    let mut raw = RawClient::bare(&rig.socket);
    raw.send_sized(VERSION, 0, HEADER_SIZE as u32, &[0, 0, 0, 0]);
    assert!(raw.closed_by_server());
    next_client_is_served(&rig);
}

#[test]
fn dma_unmap_all_with_spec_flag_bits_is_accepted() {
    let rig = Rig::default();
    let mut raw = RawClient::connect(&rig.socket);
    // VFIO_DMA_UNMAP_FLAG_ALL is 1 << 1 in the spec and the kernel; the crate hands it to the
    // backend as GET_DIRTY_PAGE_INFO. The device maps nothing, so either meaning succeeds.
    let mut payload = 24u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&(1u32 << 1).to_le_bytes());
    payload.extend_from_slice(&0u64.to_le_bytes());
    payload.extend_from_slice(&0u64.to_le_bytes());
    let reply = raw.request(DMA_UNMAP, &payload);
    assert_eq!(reply.flags & FLAG_ERROR, 0);
}

#[test]
fn refused_posted_write_gets_no_stray_reply() {
    let rig = Rig::default();
    let mut raw = RawClient::connect(&rig.socket);
    // A posted (NO_REPLY) write the device refuses: were it an error, the crate would answer
    // it and the client would take that answer for the reply to its next request.
    let mut payload = 0x4000u64.to_le_bytes().to_vec();
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend_from_slice(&4u32.to_le_bytes());
    payload.extend_from_slice(&1u32.to_le_bytes());
    raw.send(REGION_WRITE, NO_REPLY, &payload);
    raw.stream.flush().expect("flush");
    let read_id = raw.send(9, 0, &{
        let mut p = 0u64.to_le_bytes().to_vec();
        p.extend_from_slice(&CONFIG.to_le_bytes());
        p.extend_from_slice(&4u32.to_le_bytes());
        p
    });
    let reply = raw.receive();
    assert_eq!(reply.id, read_id, "first reply answers the read");
    assert_eq!(reply.flags & FLAG_ERROR, 0);
    assert!(bad_request_mentions(&rig, "outside region 0"));
}

#[test]
fn oversized_read_is_refused_and_the_connection_stays_usable() {
    let rig = Rig::default();
    let mut raw = RawClient::connect(&rig.socket);
    let reply = raw.region_read(CMB, 0, 16 << 20);
    assert_ne!(reply.flags & FLAG_ERROR, 0);
    let reply = raw.region_read(CONFIG, 0, 4);
    assert_eq!(reply.flags & FLAG_ERROR, 0);
}

#[test]
fn garbage_bytes_end_the_connection_without_hurting_the_device() {
    let rig = Rig::default();
    let mut raw = RawClient::bare(&rig.socket);
    raw.stream.write_all(&[0xa5; 333]).expect("garbage written");
    raw.stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    assert!(raw.closed_by_server());
    next_client_is_served(&rig);
}
