use super::*;

fn message(command: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        id: 0x1234,
        command,
        size: (HEADER_SIZE + payload.len()) as u32,
        flags,
        error: 0,
    };
    [&header.encode()[..], payload].concat()
}

fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

fn region_access_payload(offset: u64, region: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_ne_bytes().to_vec();
    p.extend_from_slice(&region.to_ne_bytes());
    p.extend_from_slice(&count.to_ne_bytes());
    p.extend_from_slice(data);
    p
}

#[test]
fn header_round_trips() {
    let header = Header {
        id: 0xbeef,
        command: 10,
        size: 36,
        flags: FLAG_NO_REPLY,
        error: 5,
    };
    assert_eq!(Header::parse(&header.encode()), header);
    assert!(header.no_reply());
}

#[test]
fn region_info_padded_to_argsz_decodes_and_ignores_the_padding() {
    let mut payload = words(&[32 + 64, 0, 2, 0, 0, 0, 0, 0]);
    payload.extend_from_slice(&[0xa5; 64]);
    let bytes = message(5, 0, &payload);
    let m = decode_message(&bytes).expect("decodes");
    assert_eq!(
        m.request,
        Request::GetRegionInfo {
            argsz: 96,
            index: 2
        }
    );
}

#[test]
fn short_payloads_and_small_argsz_are_einval() {
    let short = decode_message(&message(5, 0, &words(&[32, 0, 2]))).expect_err("short");
    assert!(matches!(
        short,
        FramingError::ShortPayload { needed: 32, .. }
    ));
    assert_eq!(short.errno(), libc::EINVAL);
    let small = decode_message(&message(4, 0, &words(&[8, 0, 0, 0]))).expect_err("argsz");
    assert!(matches!(
        small,
        FramingError::ArgszTooSmall { argsz: 8, .. }
    ));
    let version = decode_message(&message(1, 0, &[])).expect_err("no major/minor");
    assert_eq!(version.errno(), libc::EINVAL);
    assert!(!version.ends_connection());
}

#[test]
fn region_write_count_must_match_the_data_the_header_counts() {
    let ok = message(
        10,
        FLAG_NO_REPLY,
        &region_access_payload(0x1008, 0, 4, &[1, 2, 3, 4]),
    );
    let m = decode_message(&ok).expect("decodes");
    assert!(matches!(
        m.request,
        Request::RegionWrite {
            data: [1, 2, 3, 4],
            ..
        }
    ));
    let over = message(10, 0, &region_access_payload(0, 0, 100, &[1, 2, 3, 4]));
    assert_eq!(
        decode_message(&over),
        Err(FramingError::CountMismatch {
            count: 100,
            data: 4
        })
    );
    let under = message(10, 0, &region_access_payload(0, 0, 2, &[1, 2, 3, 4]));
    assert!(decode_message(&under).is_err());
}

#[test]
fn sizes_are_bounded_from_the_header_alone() {
    let mut huge = message(10, 0, &[]);
    huge[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    let e = decode_message(&huge).expect_err("too large");
    assert_eq!(e, FramingError::TooLarge(u32::MAX));
    assert_eq!(e.errno(), libc::EMSGSIZE);
    assert!(e.ends_connection());
    let mut tiny = message(1, 0, &[]);
    tiny[4..8].copy_from_slice(&8u32.to_ne_bytes());
    let e = decode_message(&tiny).expect_err("below header");
    assert_eq!(e, FramingError::SizeBelowHeader(8));
    assert!(e.ends_connection());
    let largest = HEADER_SIZE + REGION_ACCESS_SIZE + MAX_DATA_XFER_SIZE;
    assert_eq!(largest, MAX_MESSAGE_SIZE);
    let data = vec![0u8; MAX_DATA_XFER_SIZE];
    let write = message(
        10,
        0,
        &region_access_payload(0, 2, data.len() as u32, &data),
    );
    assert!(decode_message(&write).is_ok());
    let read = message(9, 0, &region_access_payload(0, 2, 1 << 21, &[]));
    assert_eq!(
        decode_message(&read),
        Err(FramingError::TransferTooLarge(1 << 21))
    );
}

#[test]
fn unknown_and_unserved_commands_are_enosys() {
    for command in [0u16, 6, 11, 14, 15, 16, 0x99, u16::MAX] {
        let e = decode_message(&message(command, 0, &[])).expect_err("refused");
        assert_eq!(e.errno(), libc::ENOSYS, "{command}: {e}");
    }
}

#[test]
fn replies_are_not_commands_and_reads_need_a_reply() {
    let reply = decode_message(&message(13, FLAG_REPLY, &[])).expect_err("a reply");
    assert_eq!(reply, FramingError::NotACommand(FLAG_REPLY));
    let posted_read = message(9, FLAG_NO_REPLY, &region_access_payload(0, 7, 4, &[]));
    assert!(matches!(
        decode_message(&posted_read),
        Err(FramingError::ReplyExpected {
            command: Command::RegionRead
        })
    ));
    let reset = message(13, FLAG_NO_REPLY, &[]);
    let posted_reset = decode_message(&reset).expect("posted");
    assert_eq!(posted_reset.request, Request::DeviceReset);
}

#[test]
fn version_data_must_be_a_nul_terminated_json_object() {
    let version = |data: &[u8]| {
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(data);
        decode_message(&message(1, 0, &p))
            .map(|m| m.request == Request::Version { major: 0, minor: 0 })
    };
    assert_eq!(version(b""), Ok(true));
    assert!(version(b"{\"capabilities\":{\"max_msg_fds\":16}}\0").is_ok());
    for bad in [
        &b"{}"[..],
        b"\0",
        b"[1]\0",
        b"{\"capabilities\":7}\0",
        b"{\"capabilities\":{\"max_msg_fds\":-1}}\0",
        b"\xff\xfe\0",
        b"{\"a\":\0}\0",
    ] {
        assert!(
            matches!(version(bad), Err(FramingError::VersionData(_))),
            "{bad:?}"
        );
    }
    let deep = [vec![b'['; 100_000], vec![b']'; 100_000], vec![0]].concat();
    assert!(
        version(&deep).is_err(),
        "deep nesting refused, not a stack overflow"
    );
}

#[test]
fn set_irqs_bool_data_must_be_present() {
    let set = words(&[20, VFIO_IRQ_SET_DATA_BOOL | 0x20, 0, 0, 4]);
    assert!(matches!(
        decode_message(&message(8, 0, &set)),
        Err(FramingError::ShortPayload { needed: 24, .. })
    ));
    let with = [set, vec![1, 0, 1, 1]].concat();
    assert!(matches!(
        decode_message(&message(8, 0, &with)).map(|m| m.request),
        Ok(Request::SetIrqs {
            bools: [1, 0, 1, 1],
            ..
        })
    ));
}

#[test]
fn error_replies_never_carry_errno_zero() {
    let request = Header {
        id: 9,
        command: 3,
        size: 40,
        flags: 0,
        error: 0,
    };
    let reply = request.error_reply(libc::ENOENT);
    assert_eq!(
        (reply.id, reply.flags, reply.error, reply.size),
        (9, FLAG_REPLY | FLAG_ERROR, libc::ENOENT as u32, 16)
    );
    assert_eq!(request.error_reply(0).error, libc::EIO as u32);
}

/// A cheap stand-in for the fuzz target: random bytes and mutated valid messages of every
/// command never panic, and a decoded message always respects its header's size.
#[test]
fn arbitrary_bytes_never_panic() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let seeds: Vec<Vec<u8>> = (0..20u16)
        .map(|command| message(command, 0, &words(&[32, 3, 2, 1, 0, 0, 0, 0, 4, 4])))
        .collect();
    for round in 0..50_000 {
        let mut bytes = if round % 2 == 0 {
            seeds[(next() % seeds.len() as u64) as usize].clone()
        } else {
            (0..next() % 64).map(|_| next() as u8).collect()
        };
        for _ in 0..next() % 4 {
            if !bytes.is_empty() {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
        }
        if round % 3 == 0 && bytes.len() >= HEADER_SIZE {
            // Keep the size consistent so decoding reaches the payload.
            let size = bytes.len() as u32;
            bytes[4..8].copy_from_slice(&size.to_ne_bytes());
        }
        if let Ok(m) = decode_message(&bytes) {
            assert_eq!(m.header.size as usize, bytes.len());
        }
    }
}
