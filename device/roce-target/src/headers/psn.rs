//! The 24-bit PSN space (IBTA 9.7.1, 9.7.2) and how many PSNs a message takes.

/// PSNs are 24 bits (IBTA 9.7.1).
pub const PSN_MASK: u32 = 0x00FF_FFFF;

/// `a + n` modulo 2^24.
pub fn psn_add(a: u32, n: u32) -> u32 {
    a.wrapping_add(n) & PSN_MASK
}

/// Signed distance `a - b` in the 24-bit PSN space, in -2^23..2^23: rxe's
/// `(s32)((a - b) << 8) >> 8` (IBTA 9.7.2: half the space is "ahead", half "behind").
pub fn psn_diff(a: u32, b: u32) -> i32 {
    ((a.wrapping_sub(b) << 8) as i32) >> 8
}

/// Whether `psn` is one of the `count` PSNs from `first` on (a request's or a READ's range).
pub fn psn_within(psn: u32, first: u32, count: u32) -> bool {
    let d = psn_diff(psn, first);
    d >= 0 && (d as u32) < count
}

/// Packets a message of `len` bytes takes at a path MTU of `pmtu` bytes: a 0-byte message
/// still takes one (IBTA 9.7.2, 9.7.4.1.1 for READ: max(1, ceil(len/pmtu)) PSNs).
pub fn packet_count(len: u64, pmtu: u32) -> u32 {
    let pmtu = u64::from(pmtu.max(1));
    len.div_ceil(pmtu).clamp(1, u64::from(PSN_MASK)) as u32
}

/// Path MTU enum of IBTA 7.7.4 (1 = 256 ... 5 = 4096) from bytes.
pub fn mtu_enum(bytes: u32) -> Option<u8> {
    match bytes {
        256 => Some(1),
        512 => Some(2),
        1024 => Some(3),
        2048 => Some(4),
        4096 => Some(5),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psn_arithmetic_wraps_at_24_bits() {
        assert_eq!(psn_add(0xFFFFFE, 4), 0x2);
        assert_eq!(psn_diff(0x2, 0xFFFFFE), 4);
        assert_eq!(psn_diff(0xFFFFFE, 0x2), -4);
        assert_eq!(psn_diff(5, 5), 0);
        assert_eq!(psn_diff(0x7FFFFF, 0), 0x7FFFFF);
        assert_eq!(psn_diff(0x800000, 0), -0x800000);
    }

    #[test]
    fn a_range_of_psns_holds_its_first_not_its_end_and_wraps() {
        assert!(psn_within(0xFFFFFE, 0xFFFFFE, 3));
        assert!(psn_within(0x000000, 0xFFFFFE, 3), "across the wrap");
        assert!(!psn_within(0x000001, 0xFFFFFE, 3), "one past the end");
        assert!(!psn_within(0xFFFFFD, 0xFFFFFE, 3), "one before the start");
        assert!(!psn_within(5, 5, 0));
    }

    #[test]
    fn a_message_takes_one_psn_per_mtu_and_at_least_one() {
        assert_eq!(packet_count(0, 1024), 1);
        assert_eq!(packet_count(1, 1024), 1);
        assert_eq!(packet_count(1024, 1024), 1);
        assert_eq!(packet_count(1025, 1024), 2);
        assert_eq!(packet_count(1 << 20, 1024), 1024);
        assert_eq!(mtu_enum(1024), Some(3));
        assert_eq!(mtu_enum(1000), None);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn psn_add_then_diff_is_identity(a in 0u32..=PSN_MASK, n in 0u32..0x7F_FFFF) {
                let b = psn_add(a, n);
                prop_assert!(b <= PSN_MASK);
                prop_assert_eq!(psn_diff(b, a), n as i32);
                prop_assert_eq!(psn_diff(a, b), -(n as i32));
            }

            #[test]
            fn segments_cover_the_message(len in 0u64..200_000, mtu_shift in 0u32..5) {
                let pmtu = 256u32 << mtu_shift;
                let n = packet_count(len, pmtu);
                let full = u64::from(n - 1) * u64::from(pmtu);
                // Every packet but the last is exactly one MTU, the last 1..=pmtu (0 only
                // for an empty message).
                prop_assert!(len >= full);
                let last = len - full;
                prop_assert!(last <= u64::from(pmtu));
                prop_assert!(last >= 1 || len == 0);
            }
        }
    }
}
