//! `p2prig bench`: the rig's performance figures, measured in one boot and printed next to
//! each other. Benchmarks report; they assert nothing (see README "Performance").
//!
//! - boot to agent ready;
//! - roce-target -> guest 8-byte RDMA WRITE latency (p50/p99) into an ordinary guest MR and
//!   into a CMB-slice dma-buf MR (every CMB access trapped to nvme-cmb), measured from the
//!   target's post to its completion (two control-socket round trips included);
//! - large WRITE throughput into both (1 MiB into ordinary memory, 64 KiB into the CMB: at
//!   one vfio-user message per MMIO access, 1 MiB would outlast the requester's ACK timer);
//! - the same 8-byte WRITE by in-guest loopback (QP to QP on rxe0), measured around the agent
//!   RPCs that post and poll it.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use p2prig_protocol::agent::SendOpcode;
use p2prig_protocol::target::{CompletionStatus, Sge, TargetOp};

use crate::rig::Rig;
use crate::scenarios::steps::{self, with_held_value, Held};
use crate::scenarios::ScenarioEnv;

const CMB_SLICE: (u64, u64) = (0x1000, 0x10000);

#[derive(Debug, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: String,
}

/// p50 and p99 of `samples` (sorted in place), in microseconds.
fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples
            .get(i)
            .map(|d| d.as_secs_f64() * 1e6)
            .unwrap_or(f64::NAN)
    };
    (at(0.50), at(0.99))
}

pub fn run(rig: &mut Rig, env: &ScenarioEnv, iterations: u32) -> Result<Vec<Figure>> {
    let mut figures = vec![Figure {
        name: "boot to agent ready".into(),
        value: format!("{:.2} s", rig.boot_time.as_secs_f64()),
    }];
    with_held_value(rig, |rig, held| {
        measure(rig, env, iterations, held, &mut figures)
    })?;
    Ok(figures)
}

fn measure(
    rig: &mut Rig,
    env: &ScenarioEnv,
    iterations: u32,
    held: &mut Held,
    figures: &mut Vec<Figure>,
) -> Result<()> {
    let device = steps::open_device(rig, held)?;
    let dmabuf = steps::export(rig, held, device, 2, CMB_SLICE.0, CMB_SLICE.1, env)?;
    let context = steps::rdma_up(rig, held)?;
    let pd = steps::alloc_pd(rig, context, held)?;
    let (_qp, _cq, target_qpn) = steps::connect_to_target(rig, context, pd, held)?;
    let ordinary = steps::reg_mr(rig, held, pd, 1 << 20)?;
    let (ordinary_addr, ordinary_rkey) = (ordinary.addr, ordinary.rkey);
    let (_cmb_mr, cmb_rkey) = steps::reg_dmabuf(rig, held, pd, dmabuf, 0, CMB_SLICE.1)?
        .map_err(|e| anyhow::anyhow!("reg_dmabuf_mr over the CMB: {e}"))?;
    let local = steps::target_mr(rig, 1 << 20)?;

    for (what, addr, rkey, big) in [
        ("ordinary MR", ordinary_addr, ordinary_rkey, 1u32 << 20),
        ("CMB dma-buf MR", 0, cmb_rkey, 64 << 10),
    ] {
        let mut samples = Vec::new();
        for i in 0..iterations {
            let started = Instant::now();
            target_write(rig, target_qpn, local, 8, addr, rkey, u64::from(i))?;
            samples.push(started.elapsed());
        }
        let (p50, p99) = percentiles(&mut samples);
        figures.push(Figure {
            name: format!("target -> guest 8-byte RDMA WRITE into the {what}"),
            value: format!("p50 {p50:.0} us, p99 {p99:.0} us ({iterations} writes)"),
        });
        let started = Instant::now();
        target_write(rig, target_qpn, local, big, addr, rkey, 1_000_000)?;
        let secs = started.elapsed().as_secs_f64();
        figures.push(Figure {
            name: format!(
                "target -> guest {} KiB RDMA WRITE into the {what}",
                big >> 10
            ),
            value: format!(
                "{:.1} ms, {:.2} MiB/s",
                secs * 1e3,
                f64::from(big) / secs / f64::from(1u32 << 20)
            ),
        });
    }
    let _ = steps::target_call(rig, TargetOp::DestroyQp { qpn: target_qpn });
    let _ = steps::target_call(rig, TargetOp::DeregisterMr { key: local });

    let lb = steps::connect_pair(rig, context, held)?;
    let steps::AgentMr { addr, rkey, .. } = steps::reg_mr(rig, held, lb.pd(), 4096)?;
    let mut samples = Vec::new();
    for i in 0..iterations {
        let started = Instant::now();
        let wc = steps::post(
            rig,
            &lb,
            SendOpcode::RdmaWrite,
            &u64::from(i).to_le_bytes(),
            addr,
            rkey,
            u64::from(i),
        )?;
        if !matches!(&wc, Some(c) if c.status == 0) {
            bail!("in-guest loopback write {i} failed: {wc:?}");
        }
        samples.push(started.elapsed());
    }
    let (p50, p99) = percentiles(&mut samples);
    figures.push(Figure {
        name: "in-guest loopback 8-byte RDMA WRITE (ordinary MR), around 3 agent RPCs".into(),
        value: format!("p50 {p50:.0} us, p99 {p99:.0} us ({iterations} writes)"),
    });
    Ok(())
}

/// One WRITE of `length` bytes from the target MR `local` and its completion.
fn target_write(
    rig: &mut Rig,
    qpn: u32,
    local: u32,
    length: u32,
    remote_va: u64,
    remote_rkey: u32,
    wr_id: u64,
) -> Result<()> {
    let local = Sge {
        key: local,
        offset: 0,
        length,
    };
    steps::target_call(
        rig,
        TargetOp::PostWrite {
            qpn,
            wr_id,
            local,
            remote_va,
            remote_rkey,
            imm: None,
        },
    )?;
    match steps::target_poll_within(rig, qpn, 30_000)? {
        Some(c) if c.status == CompletionStatus::Success => Ok(()),
        other => bail!("target WRITE of {length} bytes: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranked_samples() {
        let mut samples: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let (p50, p99) = percentiles(&mut samples);
        assert_eq!((p50.round(), p99.round()), (51.0, 99.0));
    }
}
