//! The JSON-lines envelope shared by every control channel.

use std::io::{BufRead, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Longest line any side accepts; a longer one is a protocol error, not an allocation.
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// A request: an operation of the channel's type `Op`, tagged with a caller-chosen id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request<Op> {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

/// A reply to the request with the same `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply<T> {
    pub id: u64,
    /// CLOCK_MONOTONIC of the answering side when the operation had finished, where that
    /// clock means something to the caller (the guest agent's: it orders a guest operation
    /// against another, e.g. a completion against the end of a reset ioctl).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_ns: Option<u64>,
    #[serde(flatten)]
    pub outcome: Outcome<T>,
}

impl<T> Reply<T> {
    pub fn new(id: u64, outcome: Outcome<T>) -> Self {
        Self {
            id,
            done_ns: None,
            outcome,
        }
    }
}

/// Success with a value, or an error with the errno that caused it (0 when none applies).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome<T> {
    Ok(T),
    Err(ErrorReply),
}

/// The error half of a reply: an errno (Linux numbering, 0 if not an OS error) and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub errno: i32,
    pub message: String,
}

impl ErrorReply {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Self {
            errno,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.errno != 0 {
            write!(f, "{} (errno {})", self.message, self.errno)
        } else {
            f.write_str(&self.message)
        }
    }
}

/// Why a line could not be turned into a message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("line of {0} bytes exceeds the {MAX_LINE_BYTES}-byte limit")]
    TooLong(usize),
    #[error("line is not valid UTF-8")]
    NotUtf8,
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("`op` must be an operation's name (a string), not {0}")]
    OpNotAName(String),
}

/// Parses one line (with or without its trailing newline) into `T`.
pub fn decode_line<T: DeserializeOwned>(line: &[u8]) -> Result<T, WireError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(WireError::TooLong(line.len()));
    }
    let text = std::str::from_utf8(line).map_err(|_| WireError::NotUtf8)?;
    Ok(serde_json::from_str(text.trim_end_matches(['\n', '\r']))?)
}

/// Parses one request line. The operation must be named: serde would also take a number as a
/// variant's index (`{"id":3,"op":4}` running the fifth operation), which no client means.
pub fn decode_request<Op: DeserializeOwned>(line: &[u8]) -> Result<Request<Op>, WireError> {
    let value: serde_json::Value = decode_line(line)?;
    match value.get("op") {
        Some(serde_json::Value::String(_)) | None => Ok(serde_json::from_value(value)?),
        Some(other) => Err(WireError::OpNotAName(other.to_string())),
    }
}

/// Serialises `value` as one line, newline included.
pub fn encode_line<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own plain data types cannot fail (no maps with non-string keys,
    // no custom Serialize impls that error).
    let mut line = serde_json::to_vec(value)
        .unwrap_or_else(|e| format!("{{\"encode_error\":\"{e}\"}}").into_bytes());
    line.push(b'\n');
    line
}

/// Reads the `id` of a request line that failed to parse as a whole, so the error reply
/// can still be matched by the caller.
pub fn salvage_id(line: &[u8]) -> u64 {
    #[derive(Deserialize)]
    struct IdOnly {
        id: u64,
    }
    decode_line::<IdOnly>(line).map(|m| m.id).unwrap_or(0)
}

/// The reply to one request line: `handle` answers a request that parses, a line that does
/// not gets `bad_request`'s error under the id salvaged from it.
pub fn answer_line<Op: DeserializeOwned, T>(
    line: &[u8],
    handle: impl FnOnce(Op) -> Result<T, ErrorReply>,
    bad_request: impl FnOnce(String) -> ErrorReply,
) -> Reply<T> {
    match decode_request::<Op>(line) {
        Ok(request) => Reply::new(
            request.id,
            match handle(request.op) {
                Ok(reply) => Outcome::Ok(reply),
                Err(e) => Outcome::Err(e),
            },
        ),
        Err(e) => Reply::new(
            salvage_id(line),
            Outcome::Err(bad_request(format!("bad request: {e}"))),
        ),
    }
}

/// [`serve_lines`] on a Unix stream connection (a device's control socket): until the peer
/// closes it.
pub fn serve_unix_stream<T: Serialize>(
    stream: std::os::unix::net::UnixStream,
    too_long: impl Fn() -> ErrorReply,
    answer: impl FnMut(&[u8]) -> Reply<T>,
) {
    let Ok(writer) = stream.try_clone() else {
        return;
    };
    serve_lines(std::io::BufReader::new(stream), writer, too_long, answer);
}

/// Serves one JSON-lines connection until the peer closes it or a read or write fails: every
/// non-blank line goes to `answer` and its reply is written back; an overlong line is
/// skipped and answered with `too_long` (id 0), so the next line still parses.
pub fn serve_lines<T: Serialize>(
    mut reader: impl BufRead,
    mut writer: impl Write,
    too_long: impl Fn() -> ErrorReply,
    mut answer: impl FnMut(&[u8]) -> Reply<T>,
) {
    let limit = MAX_LINE_BYTES as u64 + 1;
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.by_ref().take(limit).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = if line.len() > MAX_LINE_BYTES {
            let mut rest = Vec::new();
            loop {
                rest.clear();
                match reader.by_ref().take(limit).read_until(b'\n', &mut rest) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if rest.ends_with(b"\n") => break,
                    Ok(_) => {}
                }
            }
            Reply::new(0, Outcome::Err(too_long()))
        } else if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        } else {
            answer(&line)
        };
        if writer.write_all(&encode_line(&reply)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_lines_answers_each_line_and_survives_an_overlong_one() {
        let mut input = b"{\"id\":1}\n\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 10));
        input.extend(b"\n{\"id\":2}\n");
        let mut output = Vec::new();
        serve_lines(
            &input[..],
            &mut output,
            || ErrorReply::new(7, "too long"),
            |line| Reply::new(salvage_id(line), Outcome::Ok(line.len() as u64)),
        );
        let replies: Vec<Reply<u64>> = output
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| decode_line(l).expect("a reply"))
            .collect();
        assert_eq!(
            replies,
            [
                Reply::new(1, Outcome::Ok(9)),
                Reply::new(0, Outcome::Err(ErrorReply::new(7, "too long"))),
                Reply::new(2, Outcome::Ok(9)),
            ]
        );
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case")]
    enum Op {
        Ping,
        Add { a: u32, b: u32 },
    }

    #[test]
    fn an_operation_is_named_never_numbered() {
        // serde alone takes 1 as the index of `add`.
        let by_index: Result<Request<Op>, _> =
            serde_json::from_str(r#"{"id":3,"op":1,"a":1,"b":2}"#);
        assert!(
            by_index.is_ok(),
            "serde's own behaviour, which decode_request refuses"
        );
        let err = decode_request::<Op>(br#"{"id":3,"op":1,"a":1,"b":2}"#).expect_err("a number");
        assert_eq!(
            err.to_string(),
            "`op` must be an operation's name (a string), not 1"
        );
        assert!(decode_request::<Op>(br#"{"id":3,"op":"add","a":1,"b":2}"#).is_ok());
        let reply = answer_line(
            br#"{"id":9,"op":0}"#,
            |_: Op| Ok(()),
            |m| ErrorReply::new(22, m),
        );
        assert_eq!(reply.id, 9);
        assert!(
            matches!(reply.outcome, Outcome::Err(ref e) if e.message.contains("must be an operation's name"))
        );
    }

    #[test]
    fn request_round_trips_with_flattened_op() {
        let req = Request {
            id: 7,
            op: Op::Add { a: 1, b: 2 },
        };
        let line = encode_line(&req);
        assert_eq!(line, b"{\"id\":7,\"op\":\"add\",\"a\":1,\"b\":2}\n");
        let back: Request<Op> = decode_line(&line).expect("decodes");
        assert_eq!(back, req);
    }

    #[test]
    fn error_reply_carries_errno() {
        let reply: Reply<u32> = Reply::new(3, Outcome::Err(ErrorReply::new(22, "bad")));
        let line = encode_line(&reply);
        let back: Reply<u32> = decode_line(&line).expect("decodes");
        assert_eq!(back, reply);
    }

    #[test]
    fn malformed_lines_are_errors_not_panics() {
        for bad in [
            &b"{"[..],
            b"\xff\xfe",
            b"{\"id\":1,\"op\":\"nope\"}",
            b"",
            b"[]",
        ] {
            assert!(decode_line::<Request<Op>>(bad).is_err(), "{bad:?}");
        }
        assert_eq!(salvage_id(b"{\"id\":9,\"op\":\"nope\"}"), 9);
        assert_eq!(salvage_id(b"garbage"), 0);
    }

    #[test]
    fn overlong_line_is_rejected_before_parsing() {
        let line = vec![b' '; MAX_LINE_BYTES + 1];
        assert!(matches!(
            decode_line::<Op>(&line),
            Err(WireError::TooLong(_))
        ));
    }
}
