//! AFL++ entry point of the `vfio_user` target; the properties are in `p2prig_fuzz::vfio_user`.

fn main() {
    afl::fuzz!(|data: &[u8]| p2prig_fuzz::vfio_user::check(data));
}
