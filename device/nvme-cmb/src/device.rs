//! The NVMe-CMB function: config space, BAR0 controller registers and doorbells, BAR2 CMB,
//! resets and their timing, and the event of every access. Transport-free: the vfio-user
//! backend and the tests call the same entry points.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use p2prig_protocol::device::{DoorbellValue, NamedRegister, RegisterDump};
use p2prig_protocol::event::{Access, EventKind};

use crate::cmb::{Cmb, CmbError};
use crate::config_space::{ConfigSpace, CONFIG_SIZE};
use crate::event_log::{monotonic_ns, EventLog};
use crate::nvme_regs::{Controller, ControllerParams, BAR0_SIZE, DOORBELL_BASE};

/// vfio-user region indexes (VFIO PCI layout: BARs 0-5, ROM 6, config 7, VGA 8).
pub const REGION_BAR0: u32 = 0;
pub const REGION_CMB: u32 = 2;
pub const REGION_CONFIG: u32 = 7;
pub const NUM_REGIONS: u32 = 9;
/// Largest single access the device serves; the vfio_user crate advertises the same
/// `max_data_xfer_size`.
pub const MAX_TRANSFER: usize = 1 << 20;
/// Longest `data` (in bytes) a BAR event carries for an access wider than 8 bytes.
pub const MAX_EVENT_DATA: usize = 4096;

/// How QEMU reaches the CMB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmbMode {
    /// Every access is a vfio-user message and an event.
    Trap,
    /// QEMU maps the memfd through a sparse mmap area; accesses are invisible to the device.
    Mmap,
}

/// Static configuration of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSettings {
    pub queue_pairs: u32,
    pub cmb_size: u64,
    pub cmb_mode: CmbMode,
    pub reset_ms: u64,
    pub ready_delay_ms: u64,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        Self {
            queue_pairs: 64,
            cmb_size: 1 << 20,
            cmb_mode: CmbMode::Trap,
            reset_ms: 0,
            ready_delay_ms: 0,
        }
    }
}

/// What started a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetCause {
    /// PCIe Device Control "Initiate Function Level Reset" (PCIe 4.0 6.6.2).
    Flr,
    /// VFIO_USER_DEVICE_RESET from the client (QEMU: system or bus reset).
    VfioUser,
    /// CC.EN 1 -> 0 (NVMe 1.4 7.3.2).
    Controller,
    /// D3hot -> D0 with NoSoftReset clear (PCI PM 1.2 5.4.1).
    D3hot,
}

impl ResetCause {
    pub fn name(self) -> &'static str {
        match self {
            ResetCause::Flr => "flr",
            ResetCause::VfioUser => "vfio_user",
            ResetCause::Controller => "controller",
            ResetCause::D3hot => "d3hot",
        }
    }

    /// A function-level reset takes the whole PCI function away (config reads all-ones);
    /// a controller reset leaves the PCI function and its register page working.
    fn is_function_level(self) -> bool {
        self != ResetCause::Controller
    }
}

/// Why an access was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("region {0} does not exist or is empty")]
    NoRegion(u32),
    #[error("{size}-byte access at {offset:#x} is outside region {region} ({region_size} bytes)")]
    OutOfRange {
        region: u32,
        offset: u64,
        size: usize,
        region_size: u64,
    },
    #[error("{size}-byte access at BAR0 {offset:#x} is not a naturally aligned 1, 2, 4 or 8-byte access")]
    BadWidth { offset: u64, size: usize },
    #[error("{0}-byte access is empty or over the {MAX_TRANSFER}-byte transfer limit")]
    BadLength(usize),
    #[error(transparent)]
    Cmb(#[from] CmbError),
}

impl AccessError {
    /// The errno a client should see.
    pub fn errno(&self) -> i32 {
        match self {
            AccessError::Cmb(CmbError::Io(_)) => libc::EIO,
            _ => libc::EINVAL,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct ResetWindow {
    cause: ResetCause,
    until_ns: u64,
    token: u64,
}

#[derive(Debug)]
struct State {
    config: ConfigSpace,
    controller: Controller,
    reset: Option<ResetWindow>,
    reset_ns: u64,
    next_token: u64,
}

/// A reset that must end later, on a timer.
#[derive(Debug, Clone, Copy)]
#[must_use]
struct PendingEnd {
    token: u64,
    after: Duration,
}

/// The device. Shared (in an `Arc`) by the vfio-user server thread, reset timers and the
/// control socket threads.
#[derive(Debug)]
pub struct Device {
    state: Mutex<State>,
    log: Arc<EventLog>,
    cmb: Cmb,
    settings: DeviceSettings,
}

fn value_of(data: &[u8]) -> Option<u64> {
    (data.len() <= 8).then(|| {
        data.iter()
            .enumerate()
            .fold(0u64, |v, (i, &b)| v | (b as u64) << (8 * i))
    })
}

fn bar_event(access: Access, bar: u8, offset: u64, data: &[u8]) -> EventKind {
    let value = value_of(data);
    EventKind::Bar {
        access,
        bar,
        offset,
        size: data.len() as u32,
        value,
        data: value
            .is_none()
            .then(|| p2prig_protocol::hex::encode(&data[..data.len().min(MAX_EVENT_DATA)])),
    }
}

impl Device {
    pub fn new(settings: DeviceSettings, log: Arc<EventLog>) -> Result<Arc<Self>, CmbError> {
        let cmb = Cmb::new(settings.cmb_size)?;
        // CAP.TO (500 ms units) must cover the slowest CSTS.RDY transition the device can be
        // told to make at start; at least 30 s so later control-socket changes fit too.
        let slowest_ms = settings.ready_delay_ms.saturating_add(settings.reset_ms);
        let timeout_units = (slowest_ms / 500 + 1).clamp(60, 255) as u8;
        let params = ControllerParams {
            queue_pairs: settings.queue_pairs,
            cmb_size: settings.cmb_size,
            timeout_units,
        };
        Ok(Arc::new(Self {
            state: Mutex::new(State {
                config: ConfigSpace::new(settings.cmb_size),
                controller: Controller::new(&params, settings.ready_delay_ms * 1_000_000),
                reset: None,
                reset_ns: settings.reset_ms.saturating_mul(1_000_000),
                next_token: 1,
            }),
            log,
            cmb,
            settings,
        }))
    }

    pub fn settings(&self) -> &DeviceSettings {
        &self.settings
    }

    pub fn log(&self) -> &Arc<EventLog> {
        &self.log
    }

    pub fn cmb(&self) -> &Cmb {
        &self.cmb
    }

    /// Size of region `index` as the client sees it (0 = absent).
    pub fn region_size(&self, index: u32) -> u64 {
        match index {
            REGION_BAR0 => BAR0_SIZE,
            REGION_CMB => self.settings.cmb_size,
            REGION_CONFIG => CONFIG_SIZE as u64,
            _ => 0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every state update completes before any call that could panic, so the state
        // behind a poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a request from the vfio-user client that the device refused.
    pub fn bad_request(&self, detail: String) {
        self.log.record(EventKind::BadRequest { detail });
    }

    fn check(&self, region: u32, offset: u64, size: usize) -> Result<(), AccessError> {
        let region_size = self.region_size(region);
        if region_size == 0 {
            return Err(AccessError::NoRegion(region));
        }
        if size == 0 || size > MAX_TRANSFER {
            return Err(AccessError::BadLength(size));
        }
        if offset
            .checked_add(size as u64)
            .is_none_or(|end| end > region_size)
        {
            return Err(AccessError::OutOfRange {
                region,
                offset,
                size,
                region_size,
            });
        }
        // NVMe 1.4 3.1: registers are accessed in naturally aligned 32/64-bit units; 1- and
        // 2-byte accesses are accepted too (QEMU splits nothing smaller than the guest did).
        if region == REGION_BAR0
            && (!matches!(size, 1 | 2 | 4 | 8) || !offset.is_multiple_of(size as u64))
        {
            return Err(AccessError::BadWidth { offset, size });
        }
        Ok(())
    }

    /// Ends a reset whose time has passed (the timer may be late or unable to run).
    fn expire(&self, state: &mut State, now_ns: u64) {
        if state.reset.is_some_and(|w| now_ns >= w.until_ns) {
            self.finish_reset(state);
        }
    }

    fn finish_reset(&self, state: &mut State) {
        if let Some(window) = state.reset.take() {
            state.controller.set_ready_held(false);
            self.log.bump_generation();
            self.log.record(EventKind::ResetEnd {
                cause: window.cause.name().into(),
            });
        }
    }

    /// Starts a reset; returns the timer to arm when it lasts.
    fn begin_reset(&self, state: &mut State, cause: ResetCause) -> Option<PendingEnd> {
        // A reset arriving during another one ends the first at once (its state is reset
        // again anyway) so every reset_start has its reset_end.
        self.finish_reset(state);
        self.log.record(EventKind::ResetStart {
            cause: cause.name().into(),
        });
        let decode_before = state.config.memory_decode();
        if cause.is_function_level() {
            state.config.reset();
            state.controller.reset(false);
        } else {
            state.controller.reset(true);
        }
        if decode_before && !state.config.memory_decode() {
            self.log.record(EventKind::Decode { enabled: false });
        }
        if let Err(e) = self.cmb.zero() {
            self.bad_request(format!("zeroing the CMB during reset failed: {e}"));
        }
        if state.reset_ns == 0 {
            self.log.bump_generation();
            self.log.record(EventKind::ResetEnd {
                cause: cause.name().into(),
            });
            return None;
        }
        let token = state.next_token;
        state.next_token += 1;
        // NVMe 1.4 7.3.2: the host polls CSTS.RDY for 0 to see a controller reset complete.
        state
            .controller
            .set_ready_held(cause == ResetCause::Controller);
        state.reset = Some(ResetWindow {
            cause,
            until_ns: monotonic_ns().saturating_add(state.reset_ns),
            token,
        });
        Some(PendingEnd {
            token,
            after: Duration::from_nanos(state.reset_ns),
        })
    }

    fn arm(self: &Arc<Self>, pending: Option<PendingEnd>) {
        let Some(pending) = pending else { return };
        let device = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("reset-timer".into())
            .spawn(move || {
                std::thread::sleep(pending.after);
                let mut state = device.lock();
                if state.reset.is_some_and(|w| w.token == pending.token) {
                    device.finish_reset(&mut state);
                }
            });
        // Without a timer thread the reset still ends at the next access (see `expire`).
        drop(spawned);
    }

    /// Starts a reset from outside an access; a timer ends it.
    pub fn reset(self: &Arc<Self>, cause: ResetCause) {
        let pending = self.start_reset(cause);
        self.arm(pending);
    }

    /// Resets and returns only when the reset is over, as the VFIO_DEVICE_RESET ioctl does
    /// (vfio_user: the reply to VFIO_USER_DEVICE_RESET). QEMU reads config space right after
    /// the reply (vfio_pci_post_reset) and must see a live function: an all-ones interrupt
    /// pin there makes QEMU 10.2 enable INTx without its timer and crash at the next reset.
    pub fn reset_and_wait(self: &Arc<Self>, cause: ResetCause) {
        let Some(pending) = self.start_reset(cause) else {
            return;
        };
        std::thread::sleep(pending.after);
        let mut state = self.lock();
        if state.reset.is_some_and(|w| w.token == pending.token) {
            self.finish_reset(&mut state);
        }
    }

    fn start_reset(&self, cause: ResetCause) -> Option<PendingEnd> {
        let mut state = self.lock();
        self.expire(&mut state, monotonic_ns());
        self.begin_reset(&mut state, cause)
    }

    /// Whether the access may reach the device; records a violation when not.
    fn admit(&self, state: &State, region: u32, offset: u64, access: Access, data: &[u8]) -> bool {
        let reason = if let Some(window) = state.reset {
            // During a controller reset the register page keeps answering reads so the host
            // can poll CSTS.RDY; everything else arriving in the window is a violation.
            let register_read =
                region == REGION_BAR0 && offset < DOORBELL_BASE && access == Access::Read;
            (window.cause.is_function_level() || !register_read)
                .then(|| format!("in_reset:{}", window.cause.name()))
        } else if state.config.power_state() == 3 {
            // PCI PM 1.2 5.3.2: in D3hot a function answers config requests only.
            Some("d3hot".to_string())
        } else if !state.config.memory_decode() {
            Some("decode_off".to_string())
        } else {
            None
        };
        match reason {
            Some(reason) => {
                self.log.record(EventKind::Violation {
                    reason,
                    access,
                    bar: region as u8,
                    offset,
                    size: data.len() as u32,
                    value: if access == Access::Write {
                        value_of(data)
                    } else {
                        None
                    },
                });
                false
            }
            None => true,
        }
    }

    /// A read from the client. On error `data` holds all-ones (what a PCI read that nobody
    /// completes returns) and a bad_request event is recorded.
    pub fn region_read(
        self: &Arc<Self>,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), AccessError> {
        if let Err(e) = self.check(region, offset, data.len()) {
            if data.len() <= MAX_TRANSFER {
                data.fill(0xff);
            }
            self.bad_request(format!("read: {e}"));
            return Err(e);
        }
        let now = monotonic_ns();
        let mut state = self.lock();
        self.expire(&mut state, now);
        if region == REGION_CONFIG {
            if state.reset.is_some_and(|w| w.cause.is_function_level()) {
                // A function in reset answers config reads with all-ones (PCIe 4.0 2.3.1:
                // unsuccessful completion), which is what pci_dev_wait() polls for.
                data.fill(0xff);
            } else {
                state.config.read(offset, data);
            }
            return Ok(());
        }
        if !self.admit(&state, region, offset, Access::Read, data) {
            data.fill(0xff);
            return Ok(());
        }
        if region == REGION_BAR0 {
            let value = state.controller.read(offset, data.len() as u32, now);
            data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
        } else if let Err(e) = self.cmb.read(offset, data) {
            data.fill(0xff);
            drop(state);
            self.bad_request(format!("read: {e}"));
            return Err(e.into());
        }
        self.log
            .record(bar_event(Access::Read, region as u8, offset, data));
        Ok(())
    }

    /// A write from the client. Refused writes are dropped (a bad_request event says why);
    /// the caller must not turn the error into a reply to a posted write.
    pub fn region_write(
        self: &Arc<Self>,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), AccessError> {
        if let Err(e) = self.check(region, offset, data.len()) {
            self.bad_request(format!("write: {e}"));
            return Err(e);
        }
        let now = monotonic_ns();
        let pending = {
            let mut state = self.lock();
            self.expire(&mut state, now);
            if region == REGION_CONFIG {
                self.config_write(&mut state, offset, data)
            } else if !self.admit(&state, region, offset, Access::Write, data) {
                None
            } else if region == REGION_BAR0 {
                let value = value_of(data).unwrap_or(0);
                let change = state
                    .controller
                    .write(offset, data.len() as u32, value, now);
                self.log
                    .record(bar_event(Access::Write, region as u8, offset, data));
                (change.enable == Some(false))
                    .then(|| self.begin_reset(&mut state, ResetCause::Controller))
                    .flatten()
            } else {
                if let Err(e) = self.cmb.write(offset, data) {
                    drop(state);
                    self.bad_request(format!("write: {e}"));
                    return Err(e.into());
                }
                self.log
                    .record(bar_event(Access::Write, region as u8, offset, data));
                None
            }
        };
        self.arm(pending);
        Ok(())
    }

    fn config_write(&self, state: &mut State, offset: u64, data: &[u8]) -> Option<PendingEnd> {
        self.log.record(EventKind::ConfigWrite {
            offset,
            size: data.len() as u32,
            value: value_of(&data[..data.len().min(8)]).unwrap_or(0),
        });
        if let Some(window) = state.reset.filter(|w| w.cause.is_function_level()) {
            self.log.record(EventKind::Violation {
                reason: format!("in_reset:{}", window.cause.name()),
                access: Access::Write,
                bar: REGION_CONFIG as u8,
                offset,
                size: data.len() as u32,
                value: value_of(data),
            });
            return None;
        }
        let change = state.config.write(offset, data)?;
        if let Some(enabled) = change.memory_decode {
            self.log.record(EventKind::Decode { enabled });
        }
        let mut pending = None;
        if let Some((old, new)) = change.power_state {
            self.log.record(EventKind::PowerState { state: new });
            if old == 3 && new == 0 && !state.config.no_soft_reset() {
                pending = self.begin_reset(state, ResetCause::D3hot);
            }
        }
        if change.initiate_flr {
            pending = self.begin_reset(state, ResetCause::Flr);
        }
        pending
    }

    /// Sets the duration of later resets.
    pub fn set_reset_duration(&self, ms: u64) {
        self.lock().reset_ns = ms.saturating_mul(1_000_000);
    }

    /// Sets the CC.EN 0 -> 1 to CSTS.RDY delay of later enables.
    pub fn set_ready_delay(&self, ms: u64) {
        self.lock()
            .controller
            .set_ready_delay_ns(ms.saturating_mul(1_000_000));
    }

    /// A snapshot of every register.
    pub fn registers(&self) -> RegisterDump {
        let now = monotonic_ns();
        let mut state = self.lock();
        self.expire(&mut state, now);
        let controller = state
            .controller
            .map()
            .iter()
            .map(|r| NamedRegister {
                name: r.name.into(),
                offset: r.offset,
                value: state.controller.register(r.offset, now).unwrap_or(0),
            })
            .collect();
        RegisterDump {
            generation: self.log.generation(),
            in_reset: state.reset.map(|w| w.cause.name().to_string()),
            memory_decode: state.config.memory_decode(),
            power_state: state.config.power_state(),
            config_hex: p2prig_protocol::hex::encode(state.config.header()),
            controller,
            doorbells: state
                .controller
                .doorbells()
                .into_iter()
                .map(|(queue, sq_tail, cq_head)| DoorbellValue {
                    queue,
                    sq_tail,
                    cq_head,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_space::{COMMAND, PCIE_DEVCTL, PMCSR};
    use crate::nvme_regs::{CC, CSTS};

    fn device(reset_ms: u64) -> Arc<Device> {
        let log = Arc::new(EventLog::new(1024, None));
        Device::new(
            DeviceSettings {
                reset_ms,
                cmb_size: 64 << 10,
                ..Default::default()
            },
            log,
        )
        .expect("device")
    }

    fn kinds(device: &Device) -> Vec<&'static str> {
        device
            .log()
            .since(0, 10_000)
            .events
            .iter()
            .map(|e| e.kind.name())
            .collect()
    }

    fn enable_decode(device: &Arc<Device>) {
        device
            .region_write(REGION_CONFIG, COMMAND as u64, &0x6u16.to_le_bytes())
            .expect("command");
    }

    #[test]
    fn bar_access_with_decode_off_is_a_violation_and_reads_all_ones() {
        let d = device(0);
        let mut buf = [0u8; 4];
        d.region_read(REGION_BAR0, 0, &mut buf).expect("read");
        assert_eq!(buf, [0xff; 4]);
        d.region_write(REGION_BAR0, 0x1000, &1u32.to_le_bytes())
            .expect("write");
        assert_eq!(kinds(&d), ["violation", "violation"]);
    }

    #[test]
    fn flr_resets_config_and_controller_and_bumps_generation() {
        let d = device(0);
        enable_decode(&d);
        d.region_write(REGION_BAR0, CC, &1u32.to_le_bytes())
            .expect("cc");
        d.region_write(REGION_CMB, 0, &[0xaa; 16]).expect("cmb");
        d.region_write(REGION_CONFIG, PCIE_DEVCTL as u64, &0x8000u16.to_le_bytes())
            .expect("flr");
        let dump = d.registers();
        assert_eq!(dump.generation, 1);
        assert!(!dump.memory_decode);
        let mut cmb = [0u8; 16];
        d.cmb().read(0, &mut cmb).expect("cmb");
        assert_eq!(cmb, [0; 16]);
        let k = kinds(&d);
        assert!(
            k.ends_with(&["config_write", "reset_start", "decode", "reset_end"]),
            "{k:?}"
        );
    }

    #[test]
    fn timed_reset_ends_by_itself_and_reads_config_as_all_ones_meanwhile() {
        let d = device(50);
        d.reset(ResetCause::Flr);
        let mut buf = [0u8; 4];
        d.region_read(REGION_CONFIG, 0, &mut buf).expect("read");
        assert_eq!(buf, [0xff; 4]);
        let filter = p2prig_protocol::device::EventFilter {
            kind: Some("reset_end".into()),
            ..Default::default()
        };
        let (event, _) = d.log().wait_for(&filter, 0, Duration::from_secs(10));
        assert_eq!(event.map(|e| e.generation), Some(1));
        d.region_read(REGION_CONFIG, 0, &mut buf).expect("read");
        assert_ne!(buf, [0xff; 4]);
    }

    #[test]
    fn controller_reset_keeps_csts_readable_and_rdy_held_until_it_ends() {
        let d = device(10_000);
        enable_decode(&d);
        d.region_write(REGION_BAR0, CC, &1u32.to_le_bytes())
            .expect("enable");
        d.region_write(REGION_BAR0, CC, &0u32.to_le_bytes())
            .expect("disable");
        let mut csts = [0u8; 4];
        d.region_read(REGION_BAR0, CSTS, &mut csts).expect("csts");
        assert_eq!(csts[0] & 1, 1, "RDY held during the reset");
        d.region_write(REGION_BAR0, 0x1000, &1u32.to_le_bytes())
            .expect("doorbell");
        assert_eq!(d.log().stats().violations, 1);
    }

    #[test]
    fn d3hot_blocks_bar_access_and_d0_resets() {
        let d = device(0);
        enable_decode(&d);
        d.region_write(REGION_CONFIG, PMCSR as u64, &3u16.to_le_bytes())
            .expect("d3");
        let mut buf = [0u8; 4];
        d.region_read(REGION_BAR0, 0, &mut buf).expect("read");
        d.region_write(REGION_CONFIG, PMCSR as u64, &0u16.to_le_bytes())
            .expect("d0");
        let stats = d.log().stats();
        assert_eq!(stats.violations, 1);
        assert_eq!(stats.resets, 1);
        assert_eq!(d.registers().power_state, 0);
    }

    #[test]
    fn bad_accesses_are_errors_and_events() {
        let d = device(0);
        let mut buf = [0u8; 3];
        assert!(d.region_read(REGION_BAR0, 0, &mut buf).is_err());
        assert!(d.region_read(5, 0, &mut [0u8; 4]).is_err());
        assert!(d.region_write(REGION_CMB, 64 << 10, &[1]).is_err());
        assert!(d.region_write(REGION_CONFIG, u64::MAX, &[1]).is_err());
        assert_eq!(d.log().stats().bad_requests, 4);
    }
}
