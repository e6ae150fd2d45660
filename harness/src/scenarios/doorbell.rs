//! p2p-doorbell: rxe imports BAR0's doorbell page as a dma-buf MR and a loopback QP writes a
//! doorbell through it; rxe over `lo` (no PCI function) refuses the import.

use std::time::Instant;

use anyhow::Result;

use p2prig_protocol::agent::AgentReply;
use p2prig_protocol::wire::ErrorReply;

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::ScenarioEnv;

use crate::scenarios::steps::*;

/// QP A writes 7 (8 bytes) into QP B's dma-buf MR over BAR0's doorbell page at SQ1TDBL: the
/// device must log exactly that write.
pub fn run_doorbell(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| doorbell(rig, env, suite, held))
}

fn doorbell(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite, held: &mut Held) -> Result<()> {
    let t = Instant::now();
    // First, while nothing else holds the device open (the group is exclusive).
    let refused = import_without_pci_function(rig, env)?;
    suite.record(
        checks::RXE_WITHOUT_A_PCI_FUNCTION_REFUSES_WITH_EOPNOTSUPP,
        matches!(&refused, Err(e) if e.errno == libc::EOPNOTSUPP),
        format!("reg_dmabuf_mr on rxe over lo: {refused:?}"),
        t.elapsed(),
    );
    let t = Instant::now();
    let setup = doorbell_mr(rig, env, held);
    suite.record(
        checks::REG_DMABUF_MR_OVER_THE_DOORBELL_PAGE,
        setup.is_ok(),
        match &setup {
            Ok(d) => format!("rkey {:#x} over BAR0 {PAGE:#x}+{PAGE:#x}", d.rkey),
            Err(e) => format!("{e:#}"),
        },
        t.elapsed(),
    );
    let Ok(d) = setup else { return Ok(()) };
    let t = Instant::now();
    let r = ring(rig, &d.lb, d.rkey, 7, 1)?;
    suite.record(
        checks::RDMA_WRITE_COMPLETES,
        r.succeeded(),
        status_text(&r.completion),
        t.elapsed(),
    );
    suite.record(
        checks::DEVICE_SEES_ONE_DOORBELL_WRITE,
        r.landed(),
        r.detail(),
        t.elapsed(),
    );
    Ok(())
}

/// rxe on `lo`, a netdev with no PCI function under it, asked to import the doorbell page:
/// no exporter could check a peer-to-peer path to it, so registration must fail cleanly.
fn import_without_pci_function(
    rig: &mut Rig,
    env: &ScenarioEnv,
) -> Result<std::result::Result<AgentReply, ErrorReply>> {
    with_held_value(rig, |rig, held| {
        let device = open_device(rig, held)?;
        let dmabuf = export(rig, held, device, 0, PAGE, PAGE, env)?;
        let context = rxe_open(rig, "rxe_lo", "lo", held)?;
        let pd = alloc_pd(rig, context, held)?;
        reg_dmabuf_reply(rig, held, pd, dmabuf, 0, PAGE)
    })
}
