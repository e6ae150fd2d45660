//! What every JSON-lines channel promises about one line, whatever the message types: the
//! properties the control-line and agent-RPC targets assert for their channels' types.

use std::fmt::Debug;

use p2prig_protocol::wire::{
    decode_line, decode_request, encode_line, Reply, Request, WireError, MAX_LINE_BYTES,
};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;

/// Lines are cut at this many bytes before they are decoded: the channels' requests and
/// replies are far shorter, and parsing is linear in the line's length (a megabyte of JSON
/// takes over a second in an instrumented build, several parses a line). A line over
/// [`MAX_LINE_BYTES`] (4 MiB) is out of AFL++'s reach anyway (its inputs stop at 1 MiB).
pub const MAX_INPUT: usize = 16 << 10;

/// The input cut at [`MAX_INPUT`] bytes.
pub fn cut(data: &[u8]) -> &[u8] {
    &data[..data.len().min(MAX_INPUT)]
}

/// Checks `decode_request::<Op>` on `line`, as a device or the agent calls it on a request.
///
/// - A request that decodes re-encodes (`encode_line`) to one line that decodes to the same
///   request: what the harness sends is what the peer understands.
/// - It decodes exactly as serde alone would (`decode_line::<Request<Op>>`) whenever serde
///   alone accepts the line with `op` a name or absent: going through a `Value` to refuse
///   numbered operations changes nothing else.
/// - A refused line gets the error its defect calls for: too long, not UTF-8, `op` not a
///   name (quoting the value), or malformed JSON with serde's reason.
pub fn request<Op>(line: &[u8])
where
    Op: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let decoded = decode_request::<Op>(line);
    match &decoded {
        Ok(request) => {
            let encoded = encode_line(request);
            assert_one_line(&encoded);
            let again = decode_request::<Op>(&encoded).unwrap_or_else(|e| {
                panic!(
                    "re-encoded request does not decode ({e}): {}",
                    String::from_utf8_lossy(&encoded)
                )
            });
            assert_eq!(&again, request, "request changed through encode_line");
        }
        Err(error) => assert_names_the_defect(line, error),
    }
    // serde alone also takes `"op":4` as a variant index, which decode_request refuses by
    // design; only a line whose `op` is a name (or absent) must agree.
    if let Ok(direct) = decode_line::<Request<Op>>(line) {
        if op_is_a_name_or_absent(line) {
            match &decoded {
                Ok(request) => assert_eq!(request, &direct, "decode_request differs from serde"),
                Err(error) => panic!("serde accepts the line, decode_request refuses it: {error}"),
            }
        }
    }
}

/// Checks a reply line as the harness decodes it (`rig::client`): first as
/// `Reply<IgnoredAny>` to match the id against the pending requests, then as `Reply<T>`.
///
/// - A reply that decodes as `Reply<T>` decodes under the same id as `Reply<IgnoredAny>`,
///   so the harness never stashes or refuses a reply it could read.
/// - It round-trips through `encode_line`.
pub fn reply<T>(line: &[u8])
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let Ok(reply) = decode_line::<Reply<T>>(line) else {
        return;
    };
    match decode_line::<Reply<IgnoredAny>>(line) {
        Ok(any) => assert_eq!(any.id, reply.id, "the id pass and the full parse disagree"),
        Err(error) => panic!("a reply that parses fails the harness's id pass: {error}"),
    }
    let encoded = encode_line(&reply);
    assert_one_line(&encoded);
    let again: Reply<T> = decode_line(&encoded).unwrap_or_else(|e| {
        panic!(
            "re-encoded reply does not decode ({e}): {}",
            String::from_utf8_lossy(&encoded)
        )
    });
    assert_eq!(again, reply, "reply changed through encode_line");
}

/// `encode_line` writes exactly one line: JSON escapes every newline inside strings.
fn assert_one_line(encoded: &[u8]) {
    assert_eq!(
        encoded.iter().position(|b| *b == b'\n'),
        Some(encoded.len() - 1),
        "encode_line did not write exactly one line: {}",
        String::from_utf8_lossy(encoded)
    );
}

fn assert_names_the_defect(line: &[u8], error: &WireError) {
    let text = error.to_string();
    match error {
        WireError::TooLong(len) => {
            assert!(*len > MAX_LINE_BYTES && *len == line.len(), "{text}");
        }
        WireError::NotUtf8 => {
            assert!(
                line.len() <= MAX_LINE_BYTES && std::str::from_utf8(line).is_err(),
                "{text}"
            );
        }
        WireError::OpNotAName(value) => {
            let parsed: serde_json::Value = decode_line(line).expect("the line was JSON");
            let op = parsed.get("op").expect("the line has an op");
            assert!(!op.is_string(), "{text}");
            assert_eq!(value, &op.to_string(), "the error quotes the op");
        }
        // serde's message says what and where ("missing field `id` at line 1 column 9").
        WireError::Malformed(_) => assert!(text.len() > "malformed message: ".len(), "{text}"),
    }
}

/// True when the line is a JSON object whose `op` is a string or missing.
fn op_is_a_name_or_absent(line: &[u8]) -> bool {
    decode_line::<serde_json::Value>(line)
        .is_ok_and(|value| value.get("op").is_none_or(serde_json::Value::is_string))
}
