//! map-leak (debug variants): dma-buf MR map/unmap and revoke/re-map cycles, then kmemleak.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply, KmemleakCommand};

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::ScenarioEnv;

use crate::scenarios::steps::*;

/// Registration maps the dma-buf attachment, deregistration unmaps it: each cycle is one
/// map/unmap.
const MAP_CYCLES: u32 = 32;
/// Memory decode off then on with an MR registered: each cycle is a revoke (unmap) and a
/// re-map from the importer's work item.
const REMAP_CYCLES: u32 = 16;
/// Long enough for rxe's re-map work (first attempt at once, retries after 10 and 100 ms).
const REMAP_SETTLE: Duration = Duration::from_millis(250);
/// A kmemleak scan walks all of the guest's memory, under KASAN and TCG: seconds on an idle
/// host, over 30 s (the usual RPC bound) when the host's cores are busy building a kernel.
const KMEMLEAK_RPC: Duration = Duration::from_secs(180);

pub fn run_map_leak(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| map_leak(rig, env, suite, held))
}

pub(crate) fn kmemleak(rig: &mut Rig, command: KmemleakCommand) -> Result<String> {
    match ok(
        rig.agent_call(AgentOp::Kmemleak { command }, KMEMLEAK_RPC)?,
        "kmemleak",
    )? {
        AgentReply::Text { text } => Ok(text),
        other => bail!("kmemleak: unexpected {other:?}"),
    }
}

fn map_leak(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite, held: &mut Held) -> Result<()> {
    let t = Instant::now();
    let device = open_device(rig, held)?;
    let dmabuf = export(rig, held, device, 0, PAGE, PAGE, env)?;
    let context = rdma_up(rig, held)?;
    let pd = alloc_pd(rig, context, held)?;
    // Whatever kmemleak suspected before this scenario is not its finding.
    kmemleak(rig, KmemleakCommand::Scan)?;
    kmemleak(rig, KmemleakCommand::Clear)?;
    let mut cycles = 0;
    for _ in 0..MAP_CYCLES {
        let mut scratch = Held::default();
        let registered = reg_dmabuf(rig, &mut scratch, pd, dmabuf, 0, PAGE)?;
        scratch.release(rig)?;
        if registered.is_ok() {
            cycles += 1;
        }
    }
    suite.record(
        checks::MAP_UNMAP_CYCLES,
        cycles == MAP_CYCLES,
        format!("{cycles} of {MAP_CYCLES} registrations succeeded"),
        t.elapsed(),
    );

    let t = Instant::now();
    let lb = connect_pair_on(rig, context, pd, held)?;
    let (_mr, rkey) =
        reg_dmabuf(rig, held, pd, dmabuf, 0, PAGE)?.map_err(|e| anyhow!("reg_dmabuf_mr: {e}"))?;
    for _ in 0..REMAP_CYCLES {
        let command = clear_memory_decode(rig, device)?;
        config_write(rig, device, 4, 2, command | 0x2, "set PCI_COMMAND memory")?;
        std::thread::sleep(REMAP_SETTLE);
    }
    let after = ring(rig, &lb, rkey, 21, 1)?;
    suite.record(
        checks::REVOKE_REMAP_CYCLES_END_WITH_A_WORKING_MR,
        after.landed(),
        format!(
            "{REMAP_CYCLES} decode off/on cycles; then {}",
            after.detail()
        ),
        t.elapsed(),
    );
    record_kmemleak(rig, suite)?;
    Ok(())
}

/// What kmemleak finds now among objects old enough to be judged: the count of unreferenced
/// objects and the report.
pub(crate) fn kmemleak_report(rig: &mut Rig) -> Result<(usize, String)> {
    std::thread::sleep(Duration::from_secs(6));
    kmemleak(rig, KmemleakCommand::Scan)?;
    let report = kmemleak(rig, KmemleakCommand::Scan)?;
    Ok((report.matches("unreferenced object").count(), report))
}

/// Records kmemleak-finds-nothing: what kmemleak reports for the scenario's work. It reports an
/// object only once it is older than its minimum age (5 s) and was unreferenced in two scans.
pub(crate) fn record_kmemleak(rig: &mut Rig, suite: &mut Suite) -> Result<()> {
    let t = Instant::now();
    let (leaks, report) = kmemleak_report(rig)?;
    suite.record(
        checks::KMEMLEAK_FINDS_NOTHING,
        leaks == 0,
        format!(
            "{leaks} unreferenced objects; {}",
            report.lines().take(24).collect::<Vec<_>>().join("\n")
        ),
        t.elapsed(),
    );
    Ok(())
}
