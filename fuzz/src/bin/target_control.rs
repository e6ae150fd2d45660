//! AFL++ entry point of the `target_control` target; the properties are in `p2prig_fuzz::target_control`.

fn main() {
    afl::fuzz!(|data: &[u8]| p2prig_fuzz::target_control::check(data));
}
