//! AFL++ entry point of the `roce_frame` target; the properties are in `p2prig_fuzz::roce_frame`.

fn main() {
    afl::fuzz!(|data: &[u8]| p2prig_fuzz::roce_frame::check(data));
}
