//! stray-command-write: a PCI_COMMAND write that leaves decode on must not disturb a live
//! importer.

use std::time::Instant;

use anyhow::Result;

use p2prig_protocol::agent::AgentOp;

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::ScenarioEnv;

use crate::scenarios::steps::*;

/// Setting bus-master in PCI_COMMAND (memory decode stays on) must not disturb a live
/// importer: a write after it lands like the one before it.
pub fn run_stray_command_write(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| stray_command_write(rig, env, suite, held))
}

fn stray_command_write(
    rig: &mut Rig,
    env: &ScenarioEnv,
    suite: &mut Suite,
    held: &mut Held,
) -> Result<()> {
    let t = Instant::now();
    let DoorbellMr {
        device, lb, rkey, ..
    } = doorbell_mr(rig, env, held)?;
    let before = ring(rig, &lb, rkey, 3, 1)?;
    suite.record(
        checks::WRITE_LANDS_BEFORE,
        before.landed(),
        before.detail(),
        t.elapsed(),
    );
    let t = Instant::now();
    let command = config_read(rig, device, 4, 2)?;
    // PCI_COMMAND_MASTER (bit 2); memory decode (bit 1) stays as it is (on).
    ok(
        rig.agent_call(
            AgentOp::ConfigWrite {
                device,
                offset: 4,
                width: 2,
                value: command | 0x4,
            },
            RPC,
        )?,
        "set PCI_COMMAND bus master",
    )?;
    let after = config_read(rig, device, 4, 2)?;
    suite.record(
        checks::DECODE_STAYS_ON,
        after & 0x2 != 0,
        format!("PCI_COMMAND {command:#06x} -> {after:#06x}"),
        t.elapsed(),
    );
    let t = Instant::now();
    let after = ring(rig, &lb, rkey, 4, 2)?;
    suite.record(
        checks::IMPORTER_UNDISTURBED,
        after.landed(),
        after.detail(),
        t.elapsed(),
    );
    Ok(())
}
