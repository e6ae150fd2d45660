//! The revoke windows both importers are tested through: how each is opened and closed on an
//! open VFIO device (through its group or its cdev alike), and when the device saw it end.

use anyhow::{bail, Result};

use p2prig_protocol::agent::AgentOp;
use p2prig_protocol::device::{DeviceOp, DeviceReply, EventFilter};
use p2prig_protocol::event::{Event, EventKind};

use crate::rig::Rig;
use crate::scenarios::steps::*;

/// One entry point per window for a family's `$body(rig, env, suite, held, window)`: the
/// scenario registry holds plain fn pointers.
macro_rules! window_scenarios {
    ($body:ident: $($name:ident => $window:expr),* $(,)?) => {$(
        pub fn $name(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
            with_held(rig, |rig, held| $body(rig, env, suite, held, $window))
        }
    )*};
}
pub(crate) use window_scenarios;

/// How a revoke window is opened and closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Window {
    /// VFIO_DEVICE_RESET, held open by nvme-cmb's reset duration.
    VfioReset,
    /// Initiate FLR in the PCIe Device Control register, written through VFIO's config region.
    ConfigFlr,
    /// VFIO_DEVICE_PCI_HOT_RESET: a secondary bus reset through the switch's downstream port.
    HotReset,
    /// PCI_COMMAND memory decode cleared, then set again.
    MemoryDecodeOff,
    /// PMCSR PowerState D3hot, then D0.
    D3Hot,
    /// VFIO_DEVICE_FEATURE LOW_POWER_ENTRY (runtime PM puts the function in D3hot), then
    /// LOW_POWER_EXIT: vfio_pci_runtime_pm_entry()'s own revoke call in vfio_pci_core.c.
    LowPower,
    /// The VFIO device fd closed while the dma-buf and its MR stay; no restore.
    DeviceClose,
}

impl Window {
    /// Reset-like windows: the device holds the reset while the request is in flight.
    pub(crate) fn is_reset(self) -> bool {
        matches!(
            self,
            Window::VfioReset | Window::ConfigFlr | Window::HotReset
        )
    }
}

/// Opens the window; returns the id of a request still in flight (a held reset).
pub(crate) fn open_window(
    rig: &mut Rig,
    device: u32,
    window: Window,
    since: u64,
) -> Result<Option<u64>> {
    open_window_held(rig, device, window, since, RESET_WINDOW_MS)
}

/// [`open_window`] with the time nvme-cmb holds a reset (`hold_ms`).
pub(crate) fn open_window_held(
    rig: &mut Rig,
    device: u32,
    window: Window,
    since: u64,
    hold_ms: u64,
) -> Result<Option<u64>> {
    let request = match window {
        Window::VfioReset => Some(AgentOp::VfioReset { device }),
        Window::HotReset => Some(AgentOp::VfioHotReset { device }),
        Window::ConfigFlr => {
            let pcie = find_capability(rig, device, 0x10)?;
            let devctl = config_read(rig, device, pcie + 8, 2)?;
            // PCIe 6.1 7.5.3.4: Device Control bit 15, Initiate Function Level Reset.
            Some(AgentOp::ConfigWrite {
                device,
                offset: pcie + 8,
                width: 2,
                value: devctl | 0x8000,
            })
        }
        Window::MemoryDecodeOff => {
            clear_memory_decode(rig, device)?;
            None
        }
        Window::D3Hot => {
            let pm = find_capability(rig, device, 0x01)?;
            let pmcsr = config_read(rig, device, pm + 4, 2)?;
            config_write(rig, device, pm + 4, 2, (pmcsr & !0x3) | 0x3, "PMCSR D3hot")?;
            None
        }
        Window::LowPower => {
            ok(
                rig.agent_call(
                    AgentOp::VfioLowPower {
                        device,
                        enter: true,
                    },
                    RPC,
                )?,
                "VFIO low-power entry",
            )?;
            // Runtime PM suspends the function after the ioctl returned, from its workqueue.
            wait_for_event(rig, "power_state", since, window)?;
            None
        }
        Window::DeviceClose => {
            ok(
                rig.agent_call(AgentOp::VfioClose { device }, RPC)?,
                "close the VFIO device",
            )?;
            None
        }
    };
    let Some(op) = request else { return Ok(None) };
    expect_done(rig.device_call(DeviceOp::SetResetDuration { ms: hold_ms })?)?;
    let id = rig.agent_start(op)?;
    wait_for_event(rig, "reset_start", since, window)?;
    Ok(Some(id))
}

/// Waits until nvme-cmb logged an event of `kind` after `since`: the window is open.
fn wait_for_event(rig: &mut Rig, kind: &str, since: u64, window: Window) -> Result<()> {
    let filter = EventFilter {
        kind: Some(kind.into()),
        ..EventFilter::default()
    };
    match rig.device_call(DeviceOp::WaitFor {
        filter,
        since: Some(since),
        timeout_ms: 5000,
    })? {
        DeviceReply::WaitResult { event: Some(_), .. } => Ok(()),
        other => bail!("the device logged no {kind} event after {window:?}: {other:?}"),
    }
}

/// Closes the window; returns when (guest CLOCK_MONOTONIC) a held request returned.
pub(crate) fn close_window(
    rig: &mut Rig,
    device: u32,
    window: Window,
    request: Option<u64>,
) -> Result<Option<u64>> {
    let mut returned_ns = None;
    if let Some(id) = request {
        let (reply, done_ns) = rig.agent_finish_stamped(id, RPC)?;
        ok(reply, &format!("{window:?}"))?;
        returned_ns = done_ns;
        expect_done(rig.device_call(DeviceOp::SetResetDuration { ms: 0 })?)?;
    }
    match window {
        Window::MemoryDecodeOff => {
            let command = config_read(rig, device, 4, 2)?;
            config_write(rig, device, 4, 2, command | 0x2, "set PCI_COMMAND memory")?;
        }
        Window::D3Hot => {
            let pm = find_capability(rig, device, 0x01)?;
            let pmcsr = config_read(rig, device, pm + 4, 2)?;
            config_write(rig, device, pm + 4, 2, pmcsr & !0x3, "PMCSR D0")?;
        }
        Window::LowPower => {
            ok(
                rig.agent_call(
                    AgentOp::VfioLowPower {
                        device,
                        enter: false,
                    },
                    RPC,
                )?,
                "VFIO low-power exit",
            )?;
        }
        _ => {}
    }
    Ok(returned_ns)
}

pub(crate) fn window_end_ns(events: &[Event], window: Window) -> Option<u64> {
    events
        .iter()
        .find(|e| match (&e.kind, window) {
            (EventKind::ResetEnd { .. }, w) => w.is_reset(),
            (EventKind::Decode { enabled: true }, w) => w == Window::MemoryDecodeOff,
            (EventKind::PowerState { state: 0 }, w) => {
                matches!(w, Window::D3Hot | Window::LowPower)
            }
            _ => false,
        })
        .map(|e| e.mono_ns)
}
