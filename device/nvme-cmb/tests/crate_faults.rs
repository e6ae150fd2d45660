//! The faults of the `vfio_user` crate 0.1.7's server, found by a spec-following client
//! (shared/reference/qemu-vfio-user.md, issue 13), one test each, driven by this repository's
//! own spec client (`common::SpecClient`). nvme-cmb no longer runs the crate's server: it owns
//! its framing (src/framing, src/transport, src/session), so each test here proves the spec
//! behaviour that replaced the fault. Every refusal must also be a `bad_request` event, and
//! after every probe the device must serve a fresh client.
//!
//! | crate fault | nvme-cmb now | test |
//! |---|---|---|
//! | fixed-size reads ignore msg_size (REGION_INFO padded to argsz) | msg_size governs | `region_info_padded_to_argsz_is_answered_and_the_stream_stays_in_step` |
//! | a header in two reads is misread | read whole | `header_split_over_two_writes_is_read_whole` |
//! | REGION_WRITE count over the bytes sent swallows the next message | EINVAL, in step | `region_write_count_over_its_payload_is_einval_and_the_stream_stays_in_step` |
//! | unknown command: errno 0, payload unread | ENOSYS, payload consumed | `unknown_command_gets_enosys_and_its_payload_is_consumed` |
//! | refused reads: errno 0 | the device's errno | `refused_read_gets_einval` |
//! | error reply to a NO_REPLY message with a bad region | no reply | `posted_write_to_a_missing_region_gets_no_reply` |
//! | error replies to NO_REPLY in general | no reply; refused writes acknowledged by design | `refused_posted_write_gets_no_stray_reply` |
//! | overlapping DMA_MAP accepted | EEXIST | `overlapping_dma_map_gets_eexist` |
//! | DMA_UNMAP of a range never mapped accepted | ENOENT | `dma_unmap_of_a_range_never_mapped_gets_enoent` |
//! | DMA_UNMAP flag bits off by one | spec bits | `dma_unmap_all_with_spec_flag_bits_unmaps_everything` |
//! | commands served before VERSION | EINVAL | `commands_before_version_are_refused` |
//! | VERSION without NUL: unwrap panic | EINVAL | `version_without_nul_terminator_is_einval_without_a_panic` |
//! | VERSION below its struct: overflow panic | EINVAL, or closed if below the header | `version_shorter_than_its_struct_is_einval_without_a_panic`, `version_claiming_8_bytes_is_refused_and_the_connection_closed` |
//! | a 4 GiB REGION_WRITE is buffered whole | EMSGSIZE after the header, closed | `message_claiming_4_gib_is_refused_after_its_header_without_buffering` |
//! | refusals inside the crate record no event | each is a `bad_request` | every test; `refusals_are_bad_request_events_on_the_control_socket` |
//!
//! The crate's client (used by the other tests) has faults of its own that these tests avoid:
//! `resettable()` is inverted and region_write ignores error replies.

mod common;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nvme_cmb::{CmbMode, DeviceSettings};
use p2prig_protocol::device::{DeviceOp, DeviceReply};
use p2prig_protocol::event::EventKind;

fn assert_errno(reply: &RawReply, errno: i32) {
    assert!(reply.is_error(), "expected an error reply: {reply:?}");
    assert_eq!(reply.error, errno as u32, "errno");
    assert!(
        reply.payload.is_empty(),
        "an error reply is the header only"
    );
}

/// A descriptor to pass as DMA memory.
fn some_fd() -> OwnedFd {
    std::fs::File::open("/dev/null").expect("fd").into()
}

// Each probe drives one connection and checks what the client sees; it runs against the
// in-process rig (below, one test each) and against the binary (the last test).

fn probe_padded_region_info(socket: &Path) {
    let mut c = SpecClient::connect(socket);
    // vfio_region_info (32 bytes) for region 2, argsz promising 64 bytes more of room, and
    // the message carrying that room, as the spec lets a client do.
    let mut payload = words(&[32 + 64, 0, 2, 0, 0, 0, 0, 0]);
    payload.extend_from_slice(&[0u8; 64]);
    let reply = c.request(GET_REGION_INFO, &payload);
    assert!(!reply.is_error(), "errno {}", reply.error);
    assert_eq!(&reply.payload[8..12], &2u32.to_ne_bytes(), "index");
    assert_eq!(&reply.payload[16..24], &(64u64 << 10).to_ne_bytes(), "size");
    c.assert_in_step();
}

fn probe_split_header(socket: &Path) {
    let mut c = SpecClient::connect(socket);
    let bytes = message(77, GET_INFO, 0, 32, &words(&[16, 0, 0, 0]));
    c.stream.write_all(&bytes[..7]).expect("first part");
    std::thread::sleep(Duration::from_millis(200));
    c.stream.write_all(&bytes[7..]).expect("rest");
    let reply = c.receive();
    assert_eq!((reply.id, reply.command), (77, GET_INFO));
    assert!(!reply.is_error());
    c.assert_in_step();
}

fn probe_region_write_count_over_payload(socket: &Path) {
    let mut c = SpecClient::connect(socket);
    // count 100, 4 data bytes: the header's size says where the message ends.
    let reply = c.request(
        REGION_WRITE,
        &region_access(0x40, CONFIG, 100, &[1, 2, 3, 4]),
    );
    assert_errno(&reply, libc::EINVAL);
    c.assert_in_step();
    // The same posted: refused without a reply.
    c.send(
        REGION_WRITE,
        FLAG_NO_REPLY,
        &region_access(0x40, CONFIG, 100, &[1, 2, 3, 4]),
    );
    c.assert_in_step();
}

fn probe_unknown_command(socket: &Path) {
    let mut c = SpecClient::connect(socket);
    // With a payload, which must be consumed, not parsed as the next header.
    let reply = c.request(0x99, &[0xa5; 8]);
    assert_errno(&reply, libc::ENOSYS);
    c.assert_in_step();
}

fn probe_refused_read(socket: &Path) {
    let mut c = SpecClient::connect(socket);
    assert_errno(&c.region_read(BAR0, 0x4000, 4), libc::EINVAL);
    assert_errno(&c.region_read(9, 0, 4), libc::EINVAL);
    c.assert_in_step();
}

fn probe_posted_write_to_missing_region(socket: &Path) {
    let mut c = SpecClient::connect(socket);
    c.send(
        REGION_WRITE,
        FLAG_NO_REPLY,
        &region_access(0, 42, 4, &[1; 4]),
    );
    // A posted read is refused too: its reply is its only effect.
    c.send(
        REGION_READ,
        FLAG_NO_REPLY,
        &region_access(0, CONFIG, 4, &[]),
    );
    assert!(c.silent_for(300), "no reply to NO_REPLY messages");
    c.assert_in_step();
}

fn probe_overlapping_dma_map(socket: &Path) {
    let mut c = SpecClient::connect(socket);
    let fd = some_fd();
    assert!(!c.dma_map(0x10_0000, 0x10_0000, Some(&fd)).is_error());
    assert_errno(&c.dma_map(0x18_0000, 0x1000, Some(&fd)), libc::EEXIST);
    assert_errno(&c.dma_map(0x10_0000, 0x10_0000, None), libc::EEXIST);
    assert_errno(&c.dma_map(0x0f_f000, 0x2000, None), libc::EEXIST);
    assert!(!c.dma_map(0x20_0000, 0x1000, None).is_error(), "adjacent");
    c.assert_in_step();
}

fn probe_dma_unmap_never_mapped(socket: &Path) {
    let mut c = SpecClient::connect(socket);
    assert_errno(&c.dma_unmap(0, 0x10_0000, 0x1000), libc::ENOENT);
    assert!(!c.dma_map(0x10_0000, 0x2000, None).is_error());
    assert_errno(&c.dma_unmap(0, 0x10_0000, 0x1000), libc::ENOENT);
    let reply = c.dma_unmap(0, 0x10_0000, 0x2000);
    assert!(!reply.is_error(), "exact unmap");
    assert_eq!(reply.payload.len(), 24, "the request's entry echoed");
    c.assert_in_step();
}

fn probe_before_version(socket: &Path) {
    let mut c = SpecClient::bare(socket);
    assert_errno(&c.request(GET_INFO, &words(&[16, 0, 0, 0])), libc::EINVAL);
    assert_errno(&c.region_read(CONFIG, 0, 4), libc::EINVAL);
    assert!(!c.version().is_error(), "VERSION still accepted");
    c.assert_in_step();
}

fn probe_version_without_nul(socket: &Path) {
    let mut c = SpecClient::bare(socket);
    assert_errno(&c.request(VERSION, b"\0\0\0\0{}"), libc::EINVAL);
    assert!(!c.version().is_error());
    c.assert_in_step();
}

fn probe_short_version(socket: &Path) {
    let mut c = SpecClient::bare(socket);
    // The header counts no payload: major and minor are missing.
    assert_errno(&c.request(VERSION, &[]), libc::EINVAL);
    assert_errno(&c.request(VERSION, &[0, 0]), libc::EINVAL);
    assert!(!c.version().is_error());
    c.assert_in_step();
}

fn probe_version_claiming_8_bytes(socket: &Path) {
    let mut c = SpecClient::bare(socket);
    // A size below the header's own: where the next message starts is unknowable.
    c.send_sized(VERSION, 0, 8, &[]);
    assert_errno(&c.receive(), libc::EINVAL);
    assert!(c.closed_by_server());
}

fn probe_4_gib_message(socket: &Path) {
    let mut c = SpecClient::connect(socket);
    let start = Instant::now();
    c.send_sized(
        REGION_WRITE,
        0,
        u32::MAX,
        &region_access(0, CMB, u32::MAX - 32, &[]),
    );
    assert_errno(&c.receive(), libc::EMSGSIZE);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "refused from the header"
    );
    // Stream 64 MiB of the claimed data anyway: nothing may buffer it.
    let chunk = vec![0x5a; 1 << 20];
    for _ in 0..64 {
        if c.stream.write_all(&chunk).is_err() {
            break;
        }
    }
    assert!(c.closed_by_server());
}

/// Runs `probe` on a fresh in-process device, then checks the refusal's event (none when
/// `event` is empty: nothing was refused) and that the next client is served.
fn check(probe: Probe, event: &str) {
    let rig = Rig::default();
    probe(&rig.socket);
    if event.is_empty() {
        assert_eq!(
            rig.device.log().stats().bad_requests,
            0,
            "{:?}",
            rig.events()
        );
    } else {
        assert!(
            eventually(|| bad_request_mentions(&rig, event)),
            "no bad_request mentioning {event:?}: {:?}",
            rig.events()
        );
    }
    next_client_is_served(&rig);
}

/// A probe of one connection.
type Probe = fn(&Path);

/// Each probe and the text its `bad_request` event must contain.
const PROBES: &[(Probe, &str)] = &[
    (probe_padded_region_info, ""),
    (probe_split_header, ""),
    (probe_region_write_count_over_payload, "count 100"),
    (probe_unknown_command, "unknown command 153"),
    (probe_refused_read, "no region 9"),
    (probe_posted_write_to_missing_region, "no region 42"),
    (probe_overlapping_dma_map, "overlaps"),
    (probe_dma_unmap_never_mapped, "matches no mapping"),
    (probe_before_version, "before VERSION"),
    (probe_version_without_nul, "not NUL-terminated"),
    (probe_short_version, "shorter than its 4-byte struct"),
    (
        probe_version_claiming_8_bytes,
        "less than the 16-byte header",
    ),
    (probe_4_gib_message, "over the 1048608-byte maximum"),
];

#[test]
fn region_info_padded_to_argsz_is_answered_and_the_stream_stays_in_step() {
    check(probe_padded_region_info, "");
}

#[test]
fn padded_region_info_of_the_mmapped_cmb_carries_its_capability_and_fd() {
    let rig = Rig::start(DeviceSettings {
        cmb_size: 64 << 10,
        cmb_mode: CmbMode::Mmap,
        ..Default::default()
    });
    let mut c = SpecClient::connect(&rig.socket);
    // Too small for the capability: argsz says how much is needed, no fd.
    let short = c.request(GET_REGION_INFO, &words(&[32, 0, 2, 0, 0, 0, 0, 0]));
    assert_eq!(&short.payload[0..4], &(32u32 + 32).to_ne_bytes());
    assert!(short.fd.is_none() && short.payload.len() == 32);
    let mut padded = words(&[64, 0, 2, 0, 0, 0, 0, 0]);
    padded.extend_from_slice(&[0u8; 32]);
    let full = c.request(GET_REGION_INFO, &padded);
    assert_eq!(
        full.payload.len(),
        64,
        "region info + sparse-mmap capability"
    );
    let memfd = full.fd.expect("the CMB memfd");
    assert_eq!(memfd.metadata().expect("stat").len(), 64 << 10);
    c.assert_in_step();
}

#[test]
fn header_split_over_two_writes_is_read_whole() {
    check(probe_split_header, "");
}

#[test]
fn region_write_count_over_its_payload_is_einval_and_the_stream_stays_in_step() {
    check(probe_region_write_count_over_payload, "count 100");
}

#[test]
fn unknown_command_gets_enosys_and_its_payload_is_consumed() {
    check(probe_unknown_command, "unknown command 153");
}

#[test]
fn refusals_are_bad_request_events_on_the_control_socket() {
    let rig = Rig::default();
    probe_unknown_command(&rig.socket);
    let DeviceReply::Events { events, .. } = rig.control_client().ok(DeviceOp::EventsSince {
        since: 0,
        limit: None,
    }) else {
        panic!("not events");
    };
    let details: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::BadRequest { detail } => Some(detail.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(details, ["command 153 id 1: unknown command 153"]);
}

#[test]
fn refused_read_gets_einval() {
    check(probe_refused_read, "no region 9");
}

#[test]
fn posted_write_to_a_missing_region_gets_no_reply() {
    check(probe_posted_write_to_missing_region, "no region 42");
}

#[test]
fn refused_posted_write_gets_no_stray_reply() {
    let rig = Rig::default();
    let mut c = SpecClient::connect(&rig.socket);
    // A posted write the device refuses (past BAR0's end): dropped, never answered.
    c.send(
        REGION_WRITE,
        FLAG_NO_REPLY,
        &region_access(0x4000, BAR0, 4, &[1; 4]),
    );
    let reply = c.region_read(CONFIG, 0, 4);
    assert!(!reply.is_error());
    assert!(bad_request_mentions(&rig, "outside region 0"));
    // The same write with a reply is acknowledged, as PCI drops a write nobody claims.
    let reply = c.request(REGION_WRITE, &region_access(0x4000, BAR0, 4, &[1; 4]));
    assert!(!reply.is_error());
}

#[test]
fn overlapping_dma_map_gets_eexist() {
    check(probe_overlapping_dma_map, "overlaps");
}

#[test]
fn dma_unmap_of_a_range_never_mapped_gets_enoent() {
    check(probe_dma_unmap_never_mapped, "matches no mapping");
}

#[test]
fn dma_unmap_all_with_spec_flag_bits_unmaps_everything() {
    let rig = Rig::default();
    let mut c = SpecClient::connect(&rig.socket);
    assert!(!c.dma_map(0, 0x1000, None).is_error());
    assert!(!c.dma_map(0x10_0000, 0x1000, Some(&some_fd())).is_error());
    // VFIO_DMA_UNMAP_FLAG_ALL is 1 << 1 in the spec and the kernel (the crate had 1 << 2).
    assert!(!c.dma_unmap(1 << 1, 0, 0).is_error());
    assert!(
        !c.dma_map(0, 0x1000, None).is_error(),
        "the table was emptied"
    );
    // The dirty-page bitmap (1 << 0) is not supported.
    assert_errno(&c.dma_unmap(1 << 0, 0, 0x1000), libc::ENOTSUP);
}

#[test]
fn commands_before_version_are_refused() {
    check(probe_before_version, "before VERSION");
}

#[test]
fn version_without_nul_terminator_is_einval_without_a_panic() {
    check(probe_version_without_nul, "not NUL-terminated");
}

#[test]
fn version_shorter_than_its_struct_is_einval_without_a_panic() {
    check(probe_short_version, "shorter than its 4-byte struct");
}

#[test]
fn version_claiming_8_bytes_is_refused_and_the_connection_closed() {
    check(
        probe_version_claiming_8_bytes,
        "connection closed: VERSION id 0",
    );
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib << 10
}

#[test]
fn message_claiming_4_gib_is_refused_after_its_header_without_buffering() {
    let before = rss();
    check(probe_4_gib_message, "over the 1048608-byte maximum");
    let grown = rss().saturating_sub(before);
    assert!(grown < 32 << 20, "RSS grew by {grown} bytes");
}

#[test]
fn oversized_read_is_refused_and_the_connection_stays_usable() {
    let rig = Rig::default();
    let mut c = SpecClient::connect(&rig.socket);
    assert_errno(&c.region_read(CMB, 0, 16 << 20), libc::EINVAL);
    c.assert_in_step();
}

#[test]
fn garbage_bytes_end_the_connection_without_hurting_the_device() {
    let rig = Rig::default();
    let mut c = SpecClient::bare(&rig.socket);
    c.stream.write_all(&[0xa5; 333]).expect("garbage written");
    assert_errno(&c.receive(), libc::EMSGSIZE);
    assert!(c.closed_by_server());
    next_client_is_served(&rig);
}

/// Kills and reaps the child on every path.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_binary_survives_every_probe_and_serves_the_next_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (socket, control, trace) = (
        dir.path().join("vfu.sock"),
        dir.path().join("control.sock"),
        dir.path().join("trace.jsonl"),
    );
    let mut device = Reaped(
        Command::new(env!("CARGO_BIN_EXE_nvme-cmb"))
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .arg("--trace")
            .arg(&trace)
            .args(["--cmb-size", "64K"])
            .stderr(Stdio::null())
            .spawn()
            .expect("nvme-cmb"),
    );
    assert!(eventually(|| socket.exists() && control.exists()));
    for (probe, _) in PROBES {
        probe(&socket);
        assert!(
            device.0.try_wait().expect("wait").is_none(),
            "nvme-cmb died"
        );
    }
    let mut client = vfio_user::Client::new(&socket).expect("a fresh client is served");
    let mut id = [0u8; 4];
    client.region_read(CONFIG, 0, &mut id).expect("read");
    assert_eq!(u32::from_le_bytes(id), 0xc0b2_1b36);
    let text = std::fs::read_to_string(&trace).expect("trace");
    for (_, event) in PROBES.iter().filter(|(_, e)| !e.is_empty()) {
        assert!(
            text.lines()
                .any(|l| l.contains("\"bad_request\"") && l.contains(event)),
            "no bad_request mentioning {event:?} in the trace"
        );
    }
}
