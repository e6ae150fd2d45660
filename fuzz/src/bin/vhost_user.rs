//! AFL++ entry point of the `vhost_user` target; the properties are in `p2prig_fuzz::vhost_user`.

fn main() {
    afl::fuzz!(|data: &[u8]| p2prig_fuzz::vhost_user::check(data));
}
