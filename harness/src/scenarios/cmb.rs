//! slice-routing and cmb-roundtrip: an MR over a CMB slice (BAR2) reaches BAR2 at the right
//! offset, byte-exact, for writes and reads.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply, SendOpcode};
use p2prig_protocol::device::{DeviceOp, DeviceReply};
use p2prig_protocol::event::{Access as BarAccess, Event, EventKind};

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::ScenarioEnv;

use crate::scenarios::oracles;
use crate::scenarios::steps::*;

const CMB_SLICE_OFFSET: u64 = 0x1000;
const CMB_SLICE_LENGTH: u64 = 0x2000;

/// slice-routing: a write at MR offset k of a CMB slice lands at (BAR2, slice offset + k).
pub fn run_slice_routing(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| {
        let (lb, rkey) = cmb_slice_mr(rig, env, held)?;
        let k = 0x10;
        let since = last_seq(rig)?;
        let t = Instant::now();
        let wc = post(
            rig,
            &lb,
            SendOpcode::RdmaWrite,
            &0x5a5a_0000_1234_5678u64.to_le_bytes(),
            k,
            rkey,
            1,
        )?;
        suite.record(
            checks::WRITE_COMPLETES,
            oracles::wc_succeeded(&wc),
            status_text(&wc),
            t.elapsed(),
        );
        std::thread::sleep(Duration::from_millis(500));
        let events: Vec<Event> = events_since(rig, since)?
            .into_iter()
            .filter(|e| {
                matches!(
                    &e.kind,
                    EventKind::Bar {
                        access: BarAccess::Write,
                        ..
                    }
                )
            })
            .collect();
        let want = CMB_SLICE_OFFSET + k;
        let routed = events.iter().any(|e| {
            matches!(&e.kind, EventKind::Bar { bar: 2, offset, .. } if (want..want + 8).contains(offset))
        });
        let strays: Vec<&Event> = events
            .iter()
            .filter(|e| !matches!(&e.kind, EventKind::Bar { bar: 2, .. }))
            .collect();
        suite.record(
            checks::WRITE_LANDS_AT_BAR2_SLICE_OFFSET,
            routed && strays.is_empty(),
            format!(
                "want BAR2+{want:#x}; device writes: {}",
                oracles::describe(&events)
            ),
            Duration::ZERO,
        );
        Ok(())
    })
}

/// cmb-roundtrip: the device fills the CMB with a pattern; an RDMA READ of the CMB slice MR
/// returns it byte-exact; an RDMA WRITE into it shows up in the device's CMB.
pub fn run_cmb_roundtrip(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| {
        let (lb, rkey) = cmb_slice_mr(rig, env, held)?;
        let t = Instant::now();
        let pattern = "c0ffee0123456789";
        match rig.device_call(DeviceOp::CmbFill {
            offset: 0,
            length: None,
            pattern_hex: pattern.into(),
        })? {
            DeviceReply::Done => {}
            other => bail!("nvme-cmb cmb_fill: unexpected {other:?}"),
        }
        let length = 256usize;
        let wc = post(
            rig,
            &lb,
            SendOpcode::RdmaRead,
            &vec![0u8; length],
            0,
            rkey,
            1,
        )?;
        let read = match ok(
            rig.agent_call(
                AgentOp::MrRead {
                    mr: lb.src_mr,
                    offset: 0,
                    length: length as u64,
                },
                RPC,
            )?,
            "read the local buffer",
        )? {
            AgentReply::Bytes { data } => data,
            other => bail!("mr_read: unexpected {other:?}"),
        };
        let want = pattern.repeat(length / (pattern.len() / 2));
        suite.record(
            checks::RDMA_READ_RETURNS_THE_CMB_PATTERN,
            oracles::wc_succeeded(&wc) && read == want,
            format!(
                "{}; read {}...",
                status_text(&wc),
                &read[..read.len().min(48)]
            ),
            t.elapsed(),
        );
        let t = Instant::now();
        let data: Vec<u8> = (0..64u8).collect();
        let wc = post(rig, &lb, SendOpcode::RdmaWrite, &data, 0x100, rkey, 2)?;
        std::thread::sleep(Duration::from_millis(500));
        let cmb = match rig.device_call(DeviceOp::CmbRead {
            offset: CMB_SLICE_OFFSET + 0x100,
            length: 64,
        })? {
            DeviceReply::CmbData { data_hex, .. } => data_hex,
            other => bail!("nvme-cmb cmb_read: unexpected {other:?}"),
        };
        let want: String = data.iter().map(|b| format!("{b:02x}")).collect();
        suite.record(
            checks::RDMA_WRITE_SHOWS_IN_THE_CMB,
            oracles::wc_succeeded(&wc) && cmb == want,
            format!(
                "{}; CMB+{:#x}: {cmb}",
                status_text(&wc),
                CMB_SLICE_OFFSET + 0x100
            ),
            t.elapsed(),
        );
        Ok(())
    })
}

/// A loopback pair and an MR over the CMB slice (BAR2 0x1000, 0x2000 bytes); returns the
/// pair and the MR's rkey.
fn cmb_slice_mr(rig: &mut Rig, env: &ScenarioEnv, held: &mut Held) -> Result<(Loopback, u32)> {
    let device = open_device(rig, held)?;
    let dmabuf = export(
        rig,
        held,
        device,
        2,
        CMB_SLICE_OFFSET,
        CMB_SLICE_LENGTH,
        env,
    )?;
    let context = rdma_up(rig, held)?;
    let lb = connect_pair(rig, context, held)?;
    let (_mr, rkey) = reg_dmabuf(rig, held, lb.pd, dmabuf, 0, CMB_SLICE_LENGTH)?
        .map_err(|e| anyhow!("reg_dmabuf_mr over the CMB slice: {e}"))?;
    Ok((lb, rkey))
}
