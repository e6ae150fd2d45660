//! AFL++ entry point of the `control_lines` target; the properties are in `p2prig_fuzz::control_lines`.

fn main() {
    afl::fuzz!(|data: &[u8]| p2prig_fuzz::control_lines::check(data));
}
