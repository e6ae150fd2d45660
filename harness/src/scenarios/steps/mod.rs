//! Steps the scenarios share, each a few agent, device or target RPCs: the held-resource
//! list that undoes them, RDMA verbs on rxe, the device's event log, VFIO config and export,
//! and the remote peer (roce-target). Scenarios import them all from here.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply};
use p2prig_protocol::device::DeviceReply;

use crate::rig::Rig;

pub(crate) mod device;
pub(crate) mod iommufd;
pub(crate) mod target;
pub(crate) mod verbs;
pub(crate) mod vfio;

pub(crate) use device::*;
pub(crate) use iommufd::*;
pub(crate) use target::*;
pub(crate) use verbs::*;
pub(crate) use vfio::*;

pub(crate) const RPC: Duration = Duration::from_secs(30);
pub(crate) const PAGE: u64 = 0x1000;
/// SQ1's tail doorbell: BAR0 + 0x1000 + 8 * 1 (NVMe 1.4 3.1.24, DSTRD 0).
pub(crate) const SQ1TDBL: u64 = 0x1008;
pub(crate) const GUEST_IP: &str = "10.0.2.15";
/// enum ibv_wc_status
/// How long a reset is held open so a write can be posted inside it.
pub(crate) const RESET_WINDOW_MS: u64 = 1500;

pub(crate) fn ok(
    reply: std::result::Result<AgentReply, p2prig_protocol::wire::ErrorReply>,
    what: &str,
) -> Result<AgentReply> {
    reply.map_err(|e| anyhow!("{what}: {e}"))
}

/// Agent resources a scenario created, released in reverse order when it ends whatever
/// happened, so the next scenario on the same boot starts clean.
#[derive(Debug, Default)]
pub(crate) struct Held(Vec<AgentOp>);

impl Held {
    pub(crate) fn push(&mut self, release: AgentOp) {
        self.0.push(release);
    }

    /// Releases in reverse order. A resource may already be gone (a QP replaced after a
    /// revoke, an MR a race deregistered): the agent's errno is ignored. A release that does
    /// not return at all is a finding and ends the release with an error naming it.
    pub(crate) fn release(mut self, rig: &mut Rig) -> Result<()> {
        while let Some(op) = self.0.pop() {
            let desc = format!("{op:?}");
            // Ok(Err(errno)): already gone, which is fine here.
            let _gone_is_fine = rig
                .agent_call(op, RPC)
                .map_err(|e| anyhow!("releasing {desc} did not complete: {e:#}"))?;
        }
        Ok(())
    }
}

/// Runs a scenario body and releases what it held, even when it failed.
pub(crate) fn with_held(
    rig: &mut Rig,
    body: impl FnOnce(&mut Rig, &mut Held) -> Result<()>,
) -> Result<()> {
    with_held_value(rig, body)
}

/// [`with_held`] for a body that returns a value.
pub(crate) fn with_held_value<T>(
    rig: &mut Rig,
    body: impl FnOnce(&mut Rig, &mut Held) -> Result<T>,
) -> Result<T> {
    let mut held = Held::default();
    let result = body(rig, &mut held);
    let released = held.release(rig);
    let value = result?;
    released?;
    Ok(value)
}

pub(crate) fn expect_done(reply: DeviceReply) -> Result<()> {
    match reply {
        DeviceReply::Done => Ok(()),
        other => bail!("nvme-cmb: unexpected {other:?}"),
    }
}
