//! late-responses: the guest's requester QP goes to the error state while roce-target still
//! holds the ACKs of the RDMA WRITEs it executed; released, they reach a QP in error. rxe
//! queues responses for a QP in ERR (rxe_recv.c check_type_state() lets ERR > RTS pass) and
//! its completer drops them; Linux 7.3 does so in rxe_completer() under qp->state_lock with
//! interrupts off, freeing virtio-net page-pool skbs there (U3, the requester-side sibling of
//! U2, shown by the debug variant's lockdep and page_pool checks in guest-console-clean).

use std::time::Instant;

use anyhow::{bail, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply, SendOpcode};
use p2prig_protocol::target::{TargetOp, TargetReply};

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::oracles;
use crate::scenarios::steps::*;
use crate::scenarios::ScenarioEnv;

/// WRITEs posted while the target holds its answers; each ends with AckReq, so each is
/// answered (and every retransmission again).
const WRITES: u64 = 8;
const WRITE_BYTES: u64 = 64;
/// 4.096 us * 2^18, about 1.07 s: the guest's requester does not time out into the error
/// state by itself (retry exceeded) while the scenario waits for the target, under TCG.
const SLOW_ACK_TIMEOUT: u8 = 18;
/// How long the target may take to execute the WRITEs, and the guest to take the released
/// responses in.
const SETTLE_MS: u64 = 5000;

pub fn run(rig: &mut Rig, _env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| late_responses(rig, suite, held))
}

fn late_responses(rig: &mut Rig, suite: &mut Suite, held: &mut Held) -> Result<()> {
    let context = rdma_up(rig, held)?;
    let pd = alloc_pd(rig, context, held)?;
    let (qp, cq, target_qpn) = connect_to_target_timed(rig, context, pd, held, SLOW_ACK_TIMEOUT)?;
    let source = reg_mr(rig, held, pd, WRITES * WRITE_BYTES)?;
    let pattern: String = (0..WRITES * WRITE_BYTES)
        .map(|i| format!("{:02x}", (i * 7 + 3) as u8))
        .collect();
    ok(
        rig.agent_call(
            AgentOp::MrWrite {
                mr: source.mr,
                offset: 0,
                data: pattern.clone(),
            },
            RPC,
        )?,
        "fill the source MR",
    )?;
    let sink = target_mr_info(rig, WRITES * WRITE_BYTES)?;
    target_call(rig, TargetOp::HoldResponses { qpn: target_qpn })?;

    let t = Instant::now();
    for i in 0..WRITES {
        ok(
            rig.agent_call(
                AgentOp::PostSend {
                    qp,
                    wr_id: i + 1,
                    opcode: SendOpcode::RdmaWrite,
                    mr: Some(source.mr),
                    offset: i * WRITE_BYTES,
                    length: WRITE_BYTES as u32,
                    remote_addr: sink.va + i * WRITE_BYTES,
                    rkey: sink.key,
                    signaled: true,
                },
                RPC,
            )?,
            "post an RDMA WRITE to roce-target",
        )?;
    }
    let landed = wait_for_bytes(rig, sink.key, &pattern)?;
    suite.record(
        checks::TARGET_EXECUTED_THE_HELD_WRITES,
        landed,
        format!(
            "{WRITES} WRITEs of {WRITE_BYTES} bytes {} in the target's MR, its ACKs held",
            if landed { "landed" } else { "did not land" }
        ),
        t.elapsed(),
    );

    let t = Instant::now();
    ok(rig.agent_call(AgentOp::QpError { qp }, RPC)?, "qp_error")?;
    let mut flushed = 0;
    let mut seen = Vec::new();
    for _ in 0..WRITES {
        let wc = poll_one(rig, cq, SETTLE_MS)?;
        flushed += u64::from(oracles::wc_flushed(&wc));
        seen.push(status_text(&wc));
        if wc.is_none() {
            break;
        }
    }
    suite.record(
        checks::GUEST_QP_IN_ERROR_FLUSHES_ITS_WRITES,
        flushed == WRITES,
        format!("{flushed} of {WRITES} flushed: {}", seen.join(", ")),
        t.elapsed(),
    );

    let t = Instant::now();
    let (frames, dropped) = match target_call(rig, TargetOp::ReleaseResponses { qpn: target_qpn })?
    {
        TargetReply::Released { frames, dropped } => (frames, dropped),
        other => bail!("roce-target release_responses: unexpected {other:?}"),
    };
    // The guest takes them in (and its completer drops them) while the agent sleeps; its
    // QP stays in error and nothing completes twice.
    ok(rig.agent_call(AgentOp::Sleep { ms: 1000 }, RPC)?, "sleep")?;
    let state = match ok(rig.agent_call(AgentOp::QpQuery { qp }, RPC)?, "qp_query")? {
        AgentReply::QpState { state, .. } => state,
        other => bail!("qp_query: unexpected {other:?}"),
    };
    let extra = poll_one(rig, cq, 0)?;
    suite.record(
        checks::LATE_RESPONSES_REACH_THE_GUEST,
        frames >= WRITES && state == "error" && extra.is_none(),
        format!(
            "{frames} held responses released ({dropped} dropped over the bound); guest QP \
             {state}; afterwards {}",
            status_text(&extra)
        ),
        t.elapsed(),
    );
    let _ = target_call(rig, TargetOp::DestroyQp { qpn: target_qpn });
    let _ = target_call(rig, TargetOp::DeregisterMr { key: sink.key });
    Ok(())
}

/// Polls the target's MR until it holds `pattern` (hex) or [`SETTLE_MS`] pass.
fn wait_for_bytes(rig: &mut Rig, key: u32, pattern: &str) -> Result<bool> {
    let deadline = Instant::now() + std::time::Duration::from_millis(SETTLE_MS);
    loop {
        let data = match target_call(
            rig,
            TargetOp::MrRead {
                key,
                offset: 0,
                length: (pattern.len() / 2) as u32,
            },
        )? {
            TargetReply::MrData { data_hex, .. } => data_hex,
            other => bail!("roce-target mr_read: unexpected {other:?}"),
        };
        if data == pattern {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
