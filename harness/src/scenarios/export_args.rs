//! export-args: the export ioctl's argument checking. Valid slices (whole BAR, page-aligned
//! slices of the registers and of the CMB) give dma-bufs of the requested size; every invalid
//! argument gives EINVAL, except that upstream (7.x) answers ENODEV for a region that is not
//! a claimed BAR (ROM, config, the upper half of a 64-bit BAR, an absent BAR).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply};

use crate::rig::Rig;
use crate::run::checks::{self, CheckId};
use crate::run::report::Suite;
use crate::scenarios::steps::{open_nvme, PAGE, RPC};
use crate::scenarios::ScenarioEnv;
use p2prig_protocol::agent::DmabufUapi;

const EINVAL: i32 = libc::EINVAL;
const ENODEV: i32 = libc::ENODEV;
/// VFIO_PCI_ROM_REGION_INDEX and VFIO_PCI_CONFIG_REGION_INDEX.
const ROM_INDEX: u32 = 6;
const CONFIG_INDEX: u32 = 7;

/// One export attempt and what it must give.
struct Case {
    name: CheckId,
    bar: u32,
    offset: u64,
    length: u64,
    /// Some(size) for a valid slice, None when an error is required.
    want_size: Option<u64>,
    /// The region is no exportable BAR at all (rather than a bad range of one).
    not_a_bar: bool,
}

/// The errno an invalid export must give. Upstream checks the region before the ranges: a
/// region index past the BARs, or a BAR vfio-pci did not claim, is -ENODEV
/// (vfio_pci_core_feature_dma_buf); the seed says EINVAL to everything.
pub(crate) fn wanted_errno(uapi: DmabufUapi, not_a_bar: bool) -> i32 {
    match (uapi, not_a_bar) {
        (DmabufUapi::Upstream, true) => ENODEV,
        _ => EINVAL,
    }
}

pub fn run(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    let device = open_nvme(rig)?;
    let result = check_cases(rig, env, suite, device);
    // Closed whatever happened, so the next scenario on this boot can open it.
    let closed = rig.agent_call(AgentOp::VfioClose { device }, RPC)?;
    result?;
    closed.map_err(|e| anyhow::anyhow!("closing the VFIO device: {e}"))?;
    Ok(())
}

fn check_cases(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite, device: u32) -> Result<()> {
    let bar0 = region_size(rig, device, 0)?;
    let cmb = region_size(rig, device, 2)?;
    if bar0 < 4 * PAGE || cmb < 4 * PAGE {
        bail!("nvme-cmb's BARs are smaller than expected: BAR0 {bar0:#x}, BAR2 {cmb:#x}");
    }
    let cases = [
        Case {
            name: checks::WHOLE_BAR0,
            bar: 0,
            offset: 0,
            length: bar0,
            not_a_bar: false,
            want_size: Some(bar0),
        },
        Case {
            name: checks::DOORBELL_PAGE,
            bar: 0,
            offset: PAGE,
            length: PAGE,
            not_a_bar: false,
            want_size: Some(PAGE),
        },
        Case {
            name: checks::CMB_SLICE,
            bar: 2,
            offset: PAGE,
            length: 2 * PAGE,
            not_a_bar: false,
            want_size: Some(2 * PAGE),
        },
        Case {
            name: checks::WHOLE_CMB,
            bar: 2,
            offset: 0,
            length: cmb,
            not_a_bar: false,
            want_size: Some(cmb),
        },
        Case {
            name: checks::UNALIGNED_OFFSET,
            bar: 0,
            offset: PAGE + 4,
            length: PAGE,
            not_a_bar: false,
            want_size: None,
        },
        Case {
            name: checks::UNALIGNED_LENGTH,
            bar: 0,
            offset: PAGE,
            length: PAGE / 2,
            not_a_bar: false,
            want_size: None,
        },
        Case {
            name: checks::OFFSET_PAST_END,
            bar: 0,
            offset: bar0,
            length: PAGE,
            not_a_bar: false,
            want_size: None,
        },
        Case {
            name: checks::LENGTH_OVERFLOW,
            bar: 0,
            offset: PAGE,
            length: bar0,
            not_a_bar: false,
            want_size: None,
        },
        Case {
            name: checks::LENGTH_WRAPS,
            bar: 0,
            offset: PAGE,
            length: u64::MAX - PAGE + 1,
            not_a_bar: false,
            want_size: None,
        },
        Case {
            name: checks::ROM_INDEX,
            bar: ROM_INDEX,
            offset: 0,
            length: PAGE,
            not_a_bar: true,
            want_size: None,
        },
        Case {
            name: checks::CONFIG_INDEX,
            bar: CONFIG_INDEX,
            offset: 0,
            length: PAGE,
            not_a_bar: true,
            want_size: None,
        },
        // BAR1 is the upper half of 64-bit BAR0 and BAR4 is not implemented: no resource.
        Case {
            name: checks::BAR1_UPPER_HALF,
            bar: 1,
            offset: 0,
            length: PAGE,
            not_a_bar: true,
            want_size: None,
        },
        Case {
            name: checks::ABSENT_BAR4,
            bar: 4,
            offset: 0,
            length: PAGE,
            not_a_bar: true,
            want_size: None,
        },
        Case {
            name: checks::ZERO_LENGTH_AT_OFFSET,
            bar: 0,
            offset: PAGE,
            length: 0,
            not_a_bar: false,
            want_size: None,
        },
    ];
    let fds_before = open_fds(rig)?;
    for case in cases {
        let started = Instant::now();
        let op = AgentOp::DmabufExport {
            device,
            bar: case.bar,
            offset: case.offset,
            length: case.length,
            uapi: env.uapi,
        };
        let args = format!(
            "bar {} offset {:#x} length {:#x}",
            case.bar, case.offset, case.length
        );
        let reply = rig.agent_call(op, RPC)?;
        let (passed, detail) = match (&reply, case.want_size) {
            (Ok(AgentReply::Dmabuf { size, .. }), Some(want)) => (
                *size == want,
                format!("{args}: dma-buf of {size} bytes, want {want}"),
            ),
            (Err(e), Some(want)) => (
                false,
                format!("{args}: want a {want}-byte dma-buf, got {e}"),
            ),
            (Err(e), None) => (
                e.errno == wanted_errno(env.uapi, case.not_a_bar),
                format!(
                    "{args}: errno {} ({}), want {}",
                    e.errno,
                    e.message,
                    wanted_errno(env.uapi, case.not_a_bar)
                ),
            ),
            (Ok(AgentReply::Dmabuf { size, .. }), None) => (
                false,
                format!(
                    "{args}: want errno {}, got a dma-buf of {size} bytes",
                    wanted_errno(env.uapi, case.not_a_bar)
                ),
            ),
            (Ok(other), _) => (false, format!("{args}: unexpected reply {other:?}")),
        };
        if let Ok(AgentReply::Dmabuf { dmabuf, .. }) = reply {
            if let Err(e) = rig.agent_call(AgentOp::DmabufClose { dmabuf }, RPC)? {
                bail!("closing the dma-buf of {args}: {e}");
            }
        }
        suite.record(case.name, passed, detail, started.elapsed());
    }
    let fds_after = open_fds(rig)?;
    suite.record(
        checks::NO_FD_LEAKED,
        fds_after == fds_before,
        format!("the agent held {fds_before} fds before the exports and {fds_after} after"),
        Duration::ZERO,
    );
    Ok(())
}

/// How many fds the guest agent holds: every export above was closed or refused, so the
/// count must come back to where it was.
fn open_fds(rig: &mut Rig) -> Result<u64> {
    match rig.agent_call(AgentOp::OpenFds, RPC)? {
        Ok(AgentReply::Value { value }) => Ok(value),
        other => bail!("open_fds: {other:?}"),
    }
}

fn region_size(rig: &mut Rig, device: u32, index: u32) -> Result<u64> {
    match rig.agent_call(AgentOp::VfioRegion { device, index }, RPC)? {
        Ok(AgentReply::Region { size, .. }) => Ok(size),
        other => bail!("VFIO region {index} info: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_says_enodev_for_a_region_that_is_no_claimed_bar() {
        assert_eq!(wanted_errno(DmabufUapi::Upstream, true), ENODEV);
        assert_eq!(wanted_errno(DmabufUapi::Upstream, false), EINVAL);
        assert_eq!(wanted_errno(DmabufUapi::SeedV1, true), EINVAL);
    }
}
