//! Target `vfio_user`: the vfio-user byte stream from QEMU through nvme-cmb's own decoder
//! (`framing::decode_message`, `framing::decode_request`), as the server reads it: a 16-byte
//! header, exactly the payload its size announces, the request decoded from that, then the
//! next message (the connection ends where the server would close it).
//!
//! The input is the stream, cut at [`MAX_INPUT`] bytes (at most [`MAX_MESSAGES`] messages
//! are decoded). The whole input is also decoded as one message (`decode_message`), and the
//! first header with the whole rest as its payload (`decode_request`), so payloads of every
//! length reach the command decoders whatever the header's size says. Properties (the
//! module's contract):
//! - no panic on any input, and every refusal has a non-zero errno (EMSGSIZE for a size over
//!   the maximum, ENOSYS for a command not served, EINVAL otherwise), a message, and an
//!   error reply that carries that errno; a refusal ends the connection exactly when the
//!   stream position is lost (short header, size below the header or over the maximum, the
//!   input not the header's size), and `decode_request` never gives such a refusal;
//! - the header's size governs: an input that is not exactly the header's size is refused
//!   as a length mismatch, and the message is decoded from its first `size` bytes exactly
//!   as `decode_request` decodes the header and the payload it announces;
//! - a decoded message has the header of its first 16 bytes (which re-encodes to them), its
//!   size is the input's length, and it is a command (a reply or NO_REPLY refused where the
//!   reply is the only effect) whose request is the one the header's command number names,
//!   with every field the one at its offset in the payload (`argsz` with room for its reply,
//!   a REGION_WRITE's data its `count` bytes, SET_IRQS' bools its `count` bytes when they
//!   are bools, a REGION_READ within `max_data_xfer_size`);
//! - a refusal names its defect: the flags, command, payload length, `argsz` or `count`
//!   it gives are the input's;
//! - a payload longer than its command's fixed struct decodes as the struct alone: for every
//!   command without variable data (all but VERSION and REGION_WRITE), padding the payload
//!   changes nothing, and so does cutting it to the struct.

use nvme_cmb::framing::{
    decode_header, decode_message, decode_request, Command, FramingError, Header, Message, Request,
    FLAG_ERROR, FLAG_NO_REPLY, FLAG_REPLY, FLAG_TYPE_MASK, HEADER_SIZE, MAX_DATA_XFER_SIZE,
    MAX_MESSAGE_SIZE, REGION_ACCESS_SIZE,
};

/// Messages after these are not decoded: a longer stream adds no paths, only time.
pub const MAX_MESSAGES: usize = 64;
/// Inputs are cut at this many bytes. A VERSION's JSON is parsed at every decoding, a
/// megabyte of it in a third of a second instrumented; the size limit (1 MiB + 32) is
/// checked from the header alone, and AFL++'s inputs stop at 1 MiB anyway.
pub const MAX_INPUT: usize = 64 << 10;
/// VFIO_IRQ_SET_DATA_BOOL (linux/vfio.h).
const IRQ_SET_DATA_BOOL: u32 = 1 << 1;

pub fn check(data: &[u8]) {
    let data = &data[..data.len().min(MAX_INPUT)];
    check_whole(data);
    let mut stream = data;
    for _ in 0..MAX_MESSAGES {
        let Ok(header) = decode_header(stream) else {
            return;
        };
        let Ok(len) = header.payload_len() else {
            return;
        };
        let Some(message) = stream.get(..HEADER_SIZE + len) else {
            // The client closed mid-message.
            return;
        };
        stream = &stream[HEADER_SIZE + len..];
        if message.len() == data.len() {
            // The whole input, which check_whole decoded both ways.
            return;
        }
        let decoded = decode_message(message);
        check_decoded(message, &decoded);
        let served = decode_request(&header, &message[HEADER_SIZE..]);
        assert_eq!(
            decoded,
            served.map(|request| Message { header, request }),
            "decode_message differs from decode_request on the payload the header announces"
        );
        if decoded.as_ref().is_err_and(FramingError::ends_connection) {
            panic!("a message of its header's size ended the connection: {decoded:?}");
        }
    }
}

/// The first message as the whole input, and its header over the whole rest.
fn check_whole(data: &[u8]) {
    let decoded = decode_message(data);
    check_decoded(data, &decoded);
    let Ok(header) = decode_header(data) else {
        assert_eq!(decoded, Err(FramingError::Truncated(data.len())));
        return;
    };
    match header.payload_len() {
        Err(error) => assert_eq!(decoded, Err(error), "a header out of bounds"),
        Ok(len) if HEADER_SIZE + len != data.len() => assert_eq!(
            decoded,
            Err(FramingError::LengthMismatch {
                size: header.size,
                len: data.len()
            }),
            "an input that is not the header's size"
        ),
        Ok(_) => {}
    }
    let payload = &data[HEADER_SIZE..];
    let request = decode_request(&header, payload);
    if header.size as usize == data.len() {
        assert_eq!(
            decoded,
            request.clone().map(|request| Message { header, request }),
            "decode_message differs from decode_request on the payload the header announces"
        );
    }
    match &request {
        Ok(request) => {
            check_request(&header, payload, request);
            check_tail_ignored(&header, payload, request);
        }
        Err(error) => {
            check_refusal(&header, Some(payload), error);
            assert!(
                !error.ends_connection(),
                "decode_request lost the stream position: {error}"
            );
        }
    }
}

/// What holds of `decode_message(input)`, whatever the input.
fn check_decoded(input: &[u8], decoded: &Result<Message<'_>, FramingError>) {
    match decoded {
        Ok(message) => {
            let header = decode_header(input).expect("a decoded message has a header");
            assert_eq!(message.header, header, "the message's header");
            assert_eq!(
                header.encode()[..],
                input[..HEADER_SIZE],
                "header re-encoding"
            );
            assert_eq!(header.size as usize, input.len(), "the message's size");
            assert!(input.len() <= MAX_MESSAGE_SIZE);
            check_request(&header, &input[HEADER_SIZE..], &message.request);
        }
        Err(error) => {
            let header = decode_header(input).ok();
            let payload = input.get(HEADER_SIZE..);
            match (error, header) {
                (FramingError::Truncated(len), None) => assert_eq!(*len, input.len()),
                (FramingError::Truncated(_), Some(_)) => panic!("a 16-byte header is truncated"),
                (_, None) => panic!("no header, refused as {error:?}"),
                (_, Some(header)) => check_refusal(&header, payload, error),
            }
        }
    }
}

/// A refusal of a message with this header (and this payload when it was read).
fn check_refusal(header: &Header, payload: Option<&[u8]>, error: &FramingError) {
    let errno = error.errno();
    assert_ne!(errno, 0, "errno 0 reads as success: {error}");
    let expected = match error {
        FramingError::UnknownCommand(_) | FramingError::Unsupported(_) => libc::ENOSYS,
        FramingError::TooLarge(_) => libc::EMSGSIZE,
        _ => libc::EINVAL,
    };
    assert_eq!(errno, expected, "errno of {error:?}");
    assert!(!error.to_string().is_empty());
    let reply = header.error_reply(errno);
    assert_eq!(
        (
            reply.id,
            reply.command,
            reply.size,
            reply.flags,
            reply.error
        ),
        (
            header.id,
            header.command,
            HEADER_SIZE as u32,
            FLAG_REPLY | FLAG_ERROR,
            errno as u32
        ),
        "error reply of {error:?}"
    );
    let command = Command::from_wire(header.command);
    let payload_len = payload.map(<[u8]>::len);
    match *error {
        FramingError::Truncated(_) => panic!("a header was read, yet truncated"),
        FramingError::SizeBelowHeader(size) => {
            assert_eq!(size, header.size);
            assert!((size as usize) < HEADER_SIZE);
        }
        FramingError::TooLarge(size) => {
            assert_eq!(size, header.size);
            assert!(size as usize > MAX_MESSAGE_SIZE);
        }
        FramingError::LengthMismatch { size, len } => {
            assert_eq!(size, header.size);
            assert_ne!(len, size as usize, "{error}");
        }
        FramingError::NotACommand(flags) => {
            assert_eq!(flags, header.flags);
            assert_ne!(flags & FLAG_TYPE_MASK, 0, "{error}");
        }
        FramingError::UnknownCommand(number) => {
            assert_eq!(number, header.command);
            assert_eq!(command, None, "{error}");
        }
        FramingError::Unsupported(refused) => assert_eq!(Some(refused), command),
        FramingError::ReplyExpected { command: refused } => {
            assert_eq!(Some(refused), command);
            assert!(header.no_reply() && needs_reply(refused), "{error}");
        }
        FramingError::ShortPayload {
            command: refused,
            len,
            needed,
        } => {
            assert_eq!(Some(refused), command);
            assert_eq!(Some(len), payload_len, "{error}");
            assert!(len < needed, "{error}");
        }
        FramingError::ArgszTooSmall {
            command: refused,
            argsz,
            needed,
        } => {
            assert_eq!(Some(refused), command);
            let payload = payload.expect("argsz is read from a payload");
            assert_eq!(argsz, word(payload, 0), "{error}");
            assert!(
                (argsz as usize) < needed && needed <= payload.len(),
                "{error}"
            );
        }
        FramingError::CountMismatch { count, data } => {
            assert_eq!(command, Some(Command::RegionWrite));
            let payload = payload.expect("count is read from a payload");
            assert_eq!(count, word(payload, 12), "{error}");
            assert_eq!(Some(data), payload.len().checked_sub(REGION_ACCESS_SIZE));
            assert_ne!(count as usize, data, "{error}");
        }
        FramingError::TransferTooLarge(count) => {
            assert_eq!(command, Some(Command::RegionRead));
            assert_eq!(Some(count), payload.map(|p| word(p, 12)), "{error}");
            assert!(count as usize > MAX_DATA_XFER_SIZE, "{error}");
        }
        FramingError::VersionData(_) => {
            assert_eq!(command, Some(Command::Version));
            assert!(payload_len > Some(4), "{error}");
        }
    }
    if error.ends_connection() {
        assert!(
            matches!(
                error,
                FramingError::SizeBelowHeader(_)
                    | FramingError::TooLarge(_)
                    | FramingError::LengthMismatch { .. }
            ),
            "{error:?} ends the connection"
        );
    }
}

/// Commands whose reply is their only effect (nvme-cmb's `Command::needs_reply`, the spec's).
fn needs_reply(command: Command) -> bool {
    use Command::*;
    matches!(
        command,
        Version | GetInfo | GetRegionInfo | GetIrqInfo | RegionRead
    )
}

/// A decoded request agrees with its header and payload.
fn check_request(header: &Header, payload: &[u8], request: &Request<'_>) {
    assert_eq!(
        header.flags & FLAG_TYPE_MASK,
        0,
        "a reply decoded as a request"
    );
    let command = Command::from_wire(header.command).expect("a known command decoded");
    if header.flags & FLAG_NO_REPLY != 0 {
        assert!(!needs_reply(command), "{command} with NO_REPLY decoded");
    }
    let named = match request {
        Request::Version { major, minor } => {
            assert_eq!((*major, *minor), (half(payload, 0), half(payload, 2)));
            Command::Version
        }
        Request::DmaMap(map) => {
            assert_eq!(
                (map.argsz, map.flags, map.offset, map.address, map.size),
                (
                    word(payload, 0),
                    word(payload, 4),
                    quad(payload, 8),
                    quad(payload, 16),
                    quad(payload, 24)
                )
            );
            assert!(map.argsz >= 32);
            Command::DmaMap
        }
        Request::DmaUnmap(unmap) => {
            assert_eq!(
                (unmap.argsz, unmap.flags, unmap.address, unmap.size),
                (
                    word(payload, 0),
                    word(payload, 4),
                    quad(payload, 8),
                    quad(payload, 16)
                )
            );
            assert!(unmap.argsz >= 24);
            Command::DmaUnmap
        }
        Request::GetInfo => {
            assert!(payload.len() >= 16 && word(payload, 0) >= 16);
            Command::GetInfo
        }
        Request::GetRegionInfo { argsz, index } => {
            assert!(payload.len() >= 32 && *argsz >= 32);
            assert_eq!((*argsz, *index), (word(payload, 0), word(payload, 8)));
            Command::GetRegionInfo
        }
        Request::GetIrqInfo { index } => {
            assert!(payload.len() >= 16 && word(payload, 0) >= 16);
            assert_eq!(*index, word(payload, 8));
            Command::GetIrqInfo
        }
        Request::SetIrqs { set, bools } => {
            assert!(payload.len() >= 20 && word(payload, 0) >= 20);
            assert_eq!(
                (set.flags, set.index, set.start, set.count),
                (
                    word(payload, 4),
                    word(payload, 8),
                    word(payload, 12),
                    word(payload, 16)
                )
            );
            if set.flags & IRQ_SET_DATA_BOOL != 0 {
                assert_eq!(bools.len(), set.count as usize);
                assert_eq!(*bools, &payload[20..20 + bools.len()]);
            } else {
                assert!(bools.is_empty());
            }
            Command::SetIrqs
        }
        Request::RegionRead(access) => {
            assert_eq!(
                (access.offset, access.region, access.count),
                (quad(payload, 0), word(payload, 8), word(payload, 12))
            );
            assert!(access.count as usize <= MAX_DATA_XFER_SIZE);
            Command::RegionRead
        }
        Request::RegionWrite { access, data } => {
            assert_eq!(
                (access.offset, access.region, access.count),
                (quad(payload, 0), word(payload, 8), word(payload, 12))
            );
            assert_eq!(data.len(), access.count as usize);
            assert_eq!(*data, &payload[REGION_ACCESS_SIZE..], "REGION_WRITE data");
            Command::RegionWrite
        }
        Request::DeviceReset => Command::DeviceReset,
    };
    assert_eq!(named, command, "the request is not the header's command");
}

/// The fixed struct of a command whose payload has nothing after it.
fn fixed_struct(request: &Request<'_>) -> Option<usize> {
    Some(match request {
        Request::Version { .. } | Request::RegionWrite { .. } => return None,
        Request::DmaMap(_) => 32,
        Request::DmaUnmap(_) => 24,
        Request::GetInfo | Request::GetIrqInfo { .. } => 16,
        Request::GetRegionInfo { .. } => 32,
        // The bools follow the struct and stay when the rest is cut.
        Request::SetIrqs { bools, .. } => 20 + bools.len(),
        Request::RegionRead(_) => REGION_ACCESS_SIZE,
        Request::DeviceReset => 0,
    })
}

/// A longer payload decodes as the same request, and so does the payload cut to its struct.
fn check_tail_ignored(header: &Header, payload: &[u8], request: &Request<'_>) {
    let Some(fixed) = fixed_struct(request) else {
        return;
    };
    let padded = [payload, &[0xa5; 8]].concat();
    assert_eq!(
        decode_request(header, &padded).as_ref(),
        Ok(request),
        "a padded payload decodes differently"
    );
    let cut = payload
        .get(..fixed)
        .expect("a decoded payload holds its struct");
    assert_eq!(
        decode_request(header, cut).as_ref(),
        Ok(request),
        "the payload cut to its {fixed}-byte struct decodes differently"
    );
}

fn half(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

fn word(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn quad(bytes: &[u8], at: usize) -> u64 {
    let mut value = [0; 8];
    value.copy_from_slice(&bytes[at..at + 8]);
    u64::from_ne_bytes(value)
}
