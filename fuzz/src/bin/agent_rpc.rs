//! AFL++ entry point of the `agent_rpc` target; the properties are in `p2prig_fuzz::agent_rpc`.

fn main() {
    afl::fuzz!(|data: &[u8]| p2prig_fuzz::agent_rpc::check(data));
}
