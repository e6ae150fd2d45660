//! Target `agent_rpc`: one line on the guest agent's virtio-serial port, as the agent decodes
//! a request (`rpc::answer_line` calls `decode_request::<AgentOp>`) and as the harness decodes
//! the agent's replies (`AgentReply`). The line is cut at [`lines::MAX_INPUT`] bytes; see
//! [`crate::lines`] for the properties.

use p2prig_protocol::agent::{AgentOp, AgentReply};

use crate::lines;

pub fn check(data: &[u8]) {
    let data = lines::cut(data);
    lines::request::<AgentOp>(data);
    lines::reply::<AgentReply>(data);
}
