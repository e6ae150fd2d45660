//! Target `control_lines`: one line on a device's control socket, as nvme-cmb and roce-target
//! decode a request (`DeviceOp`, `TargetOp`) and as the harness decodes their replies
//! (`DeviceReply`, `TargetReply`). The line is cut at [`lines::MAX_INPUT`] bytes; see
//! [`crate::lines`] for the properties.

use p2prig_protocol::device::{DeviceOp, DeviceReply};
use p2prig_protocol::target::{TargetOp, TargetReply};

use crate::lines;

pub fn check(data: &[u8]) {
    let data = lines::cut(data);
    lines::request::<DeviceOp>(data);
    lines::request::<TargetOp>(data);
    lines::reply::<DeviceReply>(data);
    lines::reply::<TargetReply>(data);
}
