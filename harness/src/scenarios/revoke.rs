//! The revoke windows (VFIO reset, FLR, hot reset, decode off, D3hot, low power, close)
//! through rxe's importer: a write posted
//! into the MR while the window is held open, by a loopback QP and by roce-target, must be
//! refused and reach nothing; after the window the same MR works again.

use std::time::{Duration, Instant};

use anyhow::Result;

use p2prig_protocol::agent::{AgentOp, SendOpcode};
use p2prig_protocol::event::{Access as BarAccess, Event, EventKind};
use p2prig_protocol::target::TargetOp;

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::ScenarioEnv;

use crate::scenarios::oracles;
use crate::scenarios::steps::*;
use crate::scenarios::windows::{
    close_window, open_window, window_end_ns, window_scenarios, Window,
};

window_scenarios! {
    revoke_window:
    run_revoke_on_vfio_reset => Window::VfioReset,
    run_revoke_on_flr => Window::ConfigFlr,
    run_revoke_on_hot_reset => Window::HotReset,
    run_revoke_on_mem_disable => Window::MemoryDecodeOff,
    run_revoke_on_d3 => Window::D3Hot,
    run_revoke_on_low_power => Window::LowPower,
    run_revoke_on_close => Window::DeviceClose,
}

fn revoke_window(
    rig: &mut Rig,
    env: &ScenarioEnv,
    suite: &mut Suite,
    held: &mut Held,
    window: Window,
) -> Result<()> {
    let t = Instant::now();
    let DoorbellMr {
        device,
        context,
        lb,
        mr,
        rkey,
    } = doorbell_mr(rig, env, held)?;
    let before = ring(rig, &lb, rkey, 1, 1)?;
    suite.record(
        checks::WRITE_LANDS_BEFORE_THE_WINDOW,
        before.landed(),
        before.detail(),
        t.elapsed(),
    );
    // The remote RDMA peer, on the same PD as the MR: the NIC side of the P2P path.
    let (_, _, target_qpn) = connect_to_target(rig, context, lb.pd(), held)?;

    let t = Instant::now();
    let window_seq = last_seq(rig)?;
    let request = open_window(rig, device, window, window_seq)?;
    // Both writes go out at once, the remote one first: it does not wait for the agent.
    let target_posted = target_post_write(
        rig,
        target_qpn,
        &10u64.to_le_bytes(),
        SQ1TDBL - PAGE,
        rkey,
        2,
    )?;
    let target_posted_ns = target_posted.posted_ns;
    let id = post_start(
        rig,
        &lb,
        SendOpcode::RdmaWrite,
        &9u64.to_le_bytes(),
        SQ1TDBL - PAGE,
        rkey,
        2,
    )?;
    ok(rig.agent_finish(id, RPC)?, "post_send")?;
    // An upper bound: ibv_post_send had returned when its reply arrived.
    let posted_ns = crate::rig::client::mono_ns();
    let (wc, refused_guest_ns) = poll_one_stamped(rig, lb.cq_a, 5000)?;
    suite.record(
        checks::WRITE_IN_WINDOW_GETS_REMOTE_ACCESS_ERROR,
        oracles::wc_remote_access_error(&wc),
        status_text(&wc),
        t.elapsed(),
    );
    let target_wc = target_complete(rig, target_posted)?;
    suite.record(
        checks::TARGET_WRITE_IN_WINDOW_IS_NAK_0X62,
        oracles::target_nak_remote_access(&target_wc),
        format!("{target_wc:?}"),
        t.elapsed(),
    );
    let _ = target_call(rig, TargetOp::DestroyQp { qpn: target_qpn });

    let t = Instant::now();
    let returned_guest_ns = close_window(rig, device, window, request)?;
    let in_window: Vec<Event> = doorbell_events(rig, window_seq)?;
    if window == Window::HotReset {
        // QEMU does not run the guest while its vfio-user device is in a bus reset (measured:
        // even an agent request that touches no device waits for the reset's end), so no
        // access can overlap the device's reset; what is held open is the revoke, which lasts
        // until the ioctl returns, after vfio-pci restored the function. Both stamps are the
        // guest's clock.
        suite.record(
            checks::WRITE_REFUSED_BEFORE_THE_HOT_RESET_RETURNED,
            matches!((refused_guest_ns, returned_guest_ns), (Some(r), Some(e)) if r < e),
            format!(
                "loopback completion polled at {refused_guest_ns:?} ns, hot reset ioctl \
                 returned at {returned_guest_ns:?} ns (guest clock)"
            ),
            t.elapsed(),
        );
    } else if window != Window::DeviceClose {
        let window_end = window_end_ns(&events_since(rig, window_seq)?, window);
        suite.record(
            checks::WINDOW_WAS_OPEN_WHEN_THE_WRITES_WERE_POSTED,
            window_end.is_some_and(|end| end > posted_ns.max(target_posted_ns)),
            format!(
                "loopback write posted by {posted_ns} ns, target write by {target_posted_ns} ns, \
                 device window closed at {window_end:?} ns"
            ),
            t.elapsed(),
        );
    }
    let reached: Vec<&Event> = in_window
        .iter()
        .filter(|e| {
            matches!(
                &e.kind,
                EventKind::Bar {
                    access: BarAccess::Write,
                    ..
                } | EventKind::Violation { .. }
            )
        })
        .collect();
    suite.record(
        checks::NO_IMPORTER_ACCESS_REACHES_THE_DEVICE,
        reached.is_empty(),
        if reached.is_empty() {
            "none".into()
        } else {
            serde_json::to_string(&reached).unwrap_or_default()
        },
        Duration::ZERO,
    );

    let t = Instant::now();
    if window == Window::DeviceClose {
        // Nothing comes back after close; what must hold is that the MR can still go.
        let dereg = rig.agent_call(AgentOp::DeregMr { mr }, RPC)?;
        suite.record(
            checks::DEREG_AFTER_CLOSE_IS_SAFE,
            dereg.is_ok(),
            format!("{dereg:?}"),
            t.elapsed(),
        );
        return Ok(());
    }
    // After the window: fresh QPs (the old ones are in error), the same MR.
    let lb = reconnect(rig, context, &lb, held)?;
    let after = ring(rig, &lb, rkey, 11, 3)?;
    suite.record(
        checks::IMPORTER_MAPS_AGAIN_AFTER_RESTORE,
        after.landed(),
        after.detail(),
        t.elapsed(),
    );
    let t = Instant::now();
    let (_, _, target_qpn) = connect_to_target(rig, context, lb.pd(), held)?;
    let (target_wc, events) = target_ring(rig, target_qpn, rkey, 12, 4)?;
    suite.record(
        checks::TARGET_WRITE_LANDS_AFTER_RESTORE,
        oracles::target_acked(&target_wc) && oracles::written(&events, SQ1TDBL, 8).exactly(12),
        format!(
            "{target_wc:?}; device at BAR0+{SQ1TDBL:#x}: {}",
            oracles::describe(&events)
        ),
        t.elapsed(),
    );
    let _ = target_call(rig, TargetOp::DestroyQp { qpn: target_qpn });
    Ok(())
}
