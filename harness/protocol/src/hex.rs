//! Hex text of byte data, as the control channels carry it (`data_hex`, `pattern_hex`).

use std::fmt::Write as _;

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// The bytes of an even-length run of hex digits (either case); None for anything else.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    // from_str_radix alone would take a sign ("+1").
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        assert_eq!(decode("00aBff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(decode("abc"), None);
        assert_eq!(decode("zz"), None);
        assert_eq!(decode("é1"), None);
        assert_eq!(decode("+1"), None);
        assert_eq!(encode(&[1, 0xfe]), "01fe");
        assert_eq!(encode(&[0x01, 0x23, 0xab, 0xcd]), "0123abcd");
    }
}
