//! The reference model: the documented revoke semantics of a vfio-pci dma-buf and its rxe
//! importer, small enough to read in one sitting. It says which operations are meaningful in
//! a state (the generator only emits those) and predicts each one's result; the executor's
//! observation is judged against the prediction, and a difference is a finding.
//!
//! What it encodes (vfio_pci_dmabuf.c, upstream and the seed as fixed, and rxe's importer in
//! kernel-patches/rxe-dmabuf-*):
//! - a dma-buf is revoked while its device is in reset, has memory decode off, is in D3hot or
//!   in VFIO low power, and for good once its device fd is closed;
//! - an MR over a revoked dma-buf refuses every access (the loopback write completes with a
//!   remote access error, roce-target's write is NAKed 0x62) and none reaches the device;
//!   once the window closes the same MR works again (rxe maps again from a work item, which
//!   the executor gives [`RESTORE_SETTLE_MS`]);
//! - registering an MR over a revoked dma-buf fails with ENODEV (the exporter's map refuses);
//! - a dma-buf's fd may close while an MR holds the buffer: the MR keeps working;
//! - deregistration always succeeds, before or after a revoke or close;
//! - exports of a valid slice succeed (revoked from birth when decode is off), others EINVAL.
//!
//! Scope: at most one window at a time (resets with decode off or D3 nested inside restore
//! config state in ways the documentation leaves open), no device operation inside a held
//! reset or in low power (they wait for the reset, or resume the function), and no close of
//! the device during a held reset.

use serde::Serialize;

use p2prig_protocol::agent::DmabufUapi;

use super::program::{Op, ResetKind, Slice, SLOTS};

/// How long the executor waits after a window closes before the next operation: rxe maps a
/// dma-buf MR again from a work item (at once, then after 10 and 100 ms).
pub const RESTORE_SETTLE_MS: u64 = 250;

/// An open revoke window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Window {
    Reset(ResetKind),
    DecodeOff,
    D3,
    LowPower,
}

impl Window {
    pub fn name(self) -> String {
        match self {
            Window::Reset(kind) => format!("reset-{}", kind.name()),
            Window::DecodeOff => "decode-off".into(),
            Window::D3 => "d3".into(),
            Window::LowPower => "low-power".into(),
        }
    }
}

/// What the model predicts an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Predicted {
    /// It succeeds.
    Ok,
    /// It fails with this errno.
    Errno(i32),
    /// A write: completes and lands exactly once, where it was aimed.
    Lands,
    /// A write: refused (remote access error, NAK 0x62), reaching nothing.
    Refused,
    /// A write the model cannot call: inside a held reset, judged once the window's end is
    /// known ([`RefusedIfInside`]), refused if it provably ran inside.
    RefusedIfInside,
    /// A registration inside a held reset: ENODEV if it provably ran inside, else ENODEV or
    /// a working MR (the executor undoes one, as the model keeps none).
    EnodevIfInside,
}

/// A dma-buf object (not its slot: a slot is reused after its fd closes).
#[derive(Debug, Clone, Copy)]
struct Buf {
    slice: Slice,
    /// The device generation it was exported from.
    generation: u32,
}

#[derive(Debug, Clone, Copy)]
struct Mr {
    buf: usize,
}

/// The model's state: the device, the open window and the program's objects.
#[derive(Debug, Clone)]
pub struct Model {
    /// Whose export errnos to predict (which operations are allowed does not depend on it).
    uapi: DmabufUapi,
    open: bool,
    /// Bumped at every close: a dma-buf of an older generation is revoked for good.
    generation: u32,
    window: Option<Window>,
    bufs: Vec<Buf>,
    /// Slot -> dma-buf whose fd is open in it.
    buf_slots: [Option<usize>; SLOTS as usize],
    mr_slots: [Option<Mr>; SLOTS as usize],
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

impl Model {
    /// The state every program starts in: the device open, nothing exported.
    pub fn new() -> Model {
        Model::with_uapi(DmabufUapi::Upstream)
    }

    /// [`Model::new`] predicting the errnos of `uapi`'s exporter.
    pub fn with_uapi(uapi: DmabufUapi) -> Model {
        Model {
            uapi,
            open: true,
            generation: 0,
            window: None,
            bufs: Vec::new(),
            buf_slots: [None; SLOTS as usize],
            mr_slots: [None; SLOTS as usize],
        }
    }

    pub fn window(&self) -> Option<Window> {
        self.window
    }

    /// Revoked by a held reset alone, which ends by itself: whether an operation ran inside
    /// it is known only from the device's log afterwards.
    fn only_held_reset(&self, buf: usize) -> bool {
        matches!(self.window, Some(Window::Reset(_)))
            && self.open
            && self.bufs[buf].generation == self.generation
    }

    fn revoked(&self, buf: usize) -> bool {
        let b = self.bufs[buf];
        !self.open || b.generation != self.generation || self.window.is_some()
    }

    /// The slice behind an MR slot, when it holds one.
    pub fn mr_slice(&self, mr: u8) -> Option<Slice> {
        self.mr_slots[usize::from(mr)].map(|m| self.bufs[m.buf].slice)
    }

    /// The MR slot's dma-buf is revoked.
    pub fn mr_revoked(&self, mr: u8) -> Option<bool> {
        self.mr_slots[usize::from(mr)].map(|m| self.revoked(m.buf))
    }

    /// The operation means something here (the generator emits only such operations, and a
    /// mutated program drops the others).
    pub fn allows(&self, op: &Op) -> bool {
        let free_window = self.window.is_none();
        let device_ops =
            self.open && !matches!(self.window, Some(Window::Reset(_) | Window::LowPower));
        match *op {
            Op::Export { buf, .. } => {
                device_ops
                    && self.buf_slots[usize::from(buf)].is_none()
                    && matches!(self.window, None | Some(Window::DecodeOff))
            }
            Op::CloseBuf { buf } => self.buf_slots[usize::from(buf)].is_some(),
            Op::Reg { mr, buf } => {
                self.mr_slots[usize::from(mr)].is_none()
                    && self.buf_slots[usize::from(buf)].is_some()
            }
            Op::Dereg { mr } | Op::Write { mr, .. } | Op::TargetWrite { mr, .. } => {
                self.mr_slots[usize::from(mr)].is_some()
            }
            Op::Reset { .. } | Op::DecodeOff | Op::D3 | Op::LowPowerEnter => {
                self.open && free_window
            }
            Op::ResetEnd => matches!(self.window, Some(Window::Reset(_))),
            Op::DecodeOn => self.window == Some(Window::DecodeOff),
            Op::D0 => self.window == Some(Window::D3),
            Op::LowPowerExit => self.window == Some(Window::LowPower),
            Op::CloseDevice => self.open && !matches!(self.window, Some(Window::Reset(_))),
            Op::OpenDevice => !self.open,
            Op::Sleep { .. } => true,
        }
    }

    /// Predicts `op`'s result and moves to the state after it. Call only when [`Model::allows`].
    pub fn step(&mut self, op: &Op) -> Predicted {
        match *op {
            Op::Export { buf, slice } => {
                if !slice.valid() {
                    let not_a_bar = slice == Slice::AbsentBar;
                    return Predicted::Errno(crate::scenarios::export_args::wanted_errno(
                        self.uapi, not_a_bar,
                    ));
                }
                self.bufs.push(Buf {
                    slice,
                    generation: self.generation,
                });
                self.buf_slots[usize::from(buf)] = Some(self.bufs.len() - 1);
                Predicted::Ok
            }
            Op::CloseBuf { buf } => {
                self.buf_slots[usize::from(buf)] = None;
                Predicted::Ok
            }
            Op::Reg { mr, buf } => {
                let Some(b) = self.buf_slots[usize::from(buf)] else {
                    return Predicted::Errno(libc::EBADF);
                };
                if self.only_held_reset(b) {
                    Predicted::EnodevIfInside
                } else if self.revoked(b) {
                    Predicted::Errno(libc::ENODEV)
                } else {
                    self.mr_slots[usize::from(mr)] = Some(Mr { buf: b });
                    Predicted::Ok
                }
            }
            Op::Dereg { mr } => {
                self.mr_slots[usize::from(mr)] = None;
                Predicted::Ok
            }
            Op::Write { mr, .. } | Op::TargetWrite { mr, .. } => {
                match self.mr_revoked(mr) {
                    None => Predicted::Errno(libc::EINVAL),
                    Some(false) => Predicted::Lands,
                    // Decode off, D3, low power and close are synchronous: the write ran
                    // inside them. A held reset ends by itself: see RefusedIfInside.
                    Some(true) => match self.mr_slots[usize::from(mr)] {
                        Some(m) if self.only_held_reset(m.buf) => Predicted::RefusedIfInside,
                        _ => Predicted::Refused,
                    },
                }
            }
            Op::Reset { kind, .. } => {
                self.window = Some(Window::Reset(kind));
                Predicted::Ok
            }
            Op::DecodeOff => {
                self.window = Some(Window::DecodeOff);
                Predicted::Ok
            }
            Op::D3 => {
                self.window = Some(Window::D3);
                Predicted::Ok
            }
            Op::LowPowerEnter => {
                self.window = Some(Window::LowPower);
                Predicted::Ok
            }
            Op::ResetEnd | Op::DecodeOn | Op::D0 | Op::LowPowerExit => {
                self.window = None;
                Predicted::Ok
            }
            Op::CloseDevice => {
                self.open = false;
                self.window = None;
                self.generation += 1;
                Predicted::Ok
            }
            Op::OpenDevice => {
                self.open = true;
                Predicted::Ok
            }
            Op::Sleep { .. } => Predicted::Ok,
        }
    }

    /// The kernel refused an export the model expected to work: the slot stays empty, so
    /// model and rig go on in step (the refusal itself is the finding).
    pub fn forget_buf(&mut self, buf: u8) {
        self.buf_slots[usize::from(buf)] = None;
    }

    /// The same for a registration.
    pub fn forget_mr(&mut self, mr: u8) {
        self.mr_slots[usize::from(mr)] = None;
    }
}

/// Drops the operations the model does not allow where they stand (after a mutation), and
/// closes a window left open at the end so that every program ends restored.
pub fn repair(ops: &[Op]) -> Vec<Op> {
    let mut model = Model::new();
    let mut kept = Vec::with_capacity(ops.len() + 1);
    for op in ops {
        if model.allows(op) {
            model.step(op);
            kept.push(*op);
        }
    }
    if let Some(window) = model.window() {
        kept.push(closer(window));
    }
    kept
}

/// The operation that ends `window`.
pub fn closer(window: Window) -> Op {
    match window {
        Window::Reset(_) => Op::ResetEnd,
        Window::DecodeOff => Op::DecodeOn,
        Window::D3 => Op::D0,
        Window::LowPower => Op::LowPowerExit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ops: &[Op]) -> Vec<Predicted> {
        let mut model = Model::new();
        ops.iter()
            .map(|op| {
                assert!(model.allows(op), "{op} not allowed");
                model.step(op)
            })
            .collect()
    }

    const EXPORT: Op = Op::Export {
        buf: 0,
        slice: Slice::Doorbell,
    };
    const REG: Op = Op::Reg { mr: 0, buf: 0 };
    const WRITE: Op = Op::Write { mr: 0, word: 1 };

    #[test]
    fn a_window_refuses_writes_and_its_end_restores_them() {
        use Predicted::*;
        assert_eq!(
            run(&[
                EXPORT,
                REG,
                WRITE,
                Op::DecodeOff,
                WRITE,
                Op::DecodeOn,
                WRITE
            ]),
            [Ok, Ok, Lands, Ok, Refused, Ok, Lands]
        );
        let reset = Op::Reset {
            kind: ResetKind::Flr,
            hold_ms: 500,
        };
        assert_eq!(
            run(&[EXPORT, REG, reset, WRITE, Op::ResetEnd, WRITE]),
            [Ok, Ok, Ok, RefusedIfInside, Ok, Lands]
        );
    }

    #[test]
    fn registering_over_a_revoked_buffer_is_enodev_and_a_closed_fd_keeps_the_mr() {
        use Predicted::*;
        assert_eq!(
            run(&[
                EXPORT,
                Op::D3,
                REG,
                Op::D0,
                REG,
                Op::CloseBuf { buf: 0 },
                WRITE
            ]),
            [Ok, Ok, Errno(libc::ENODEV), Ok, Ok, Ok, Lands]
        );
    }

    #[test]
    fn closing_the_device_revokes_for_good_even_after_reopening() {
        use Predicted::*;
        let target = Op::TargetWrite { mr: 0, word: 0 };
        assert_eq!(
            run(&[
                EXPORT,
                REG,
                Op::CloseDevice,
                WRITE,
                Op::OpenDevice,
                target,
                Op::Dereg { mr: 0 }
            ]),
            [Ok, Ok, Ok, Refused, Ok, Refused, Ok]
        );
    }

    #[test]
    fn invalid_slices_are_einval_and_leave_the_slot_free() {
        let bad = Op::Export {
            buf: 0,
            slice: Slice::Unaligned,
        };
        assert_eq!(
            run(&[bad, EXPORT]),
            [Predicted::Errno(libc::EINVAL), Predicted::Ok]
        );
    }

    #[test]
    fn an_absent_bar_is_enodev_upstream_and_einval_in_the_seed() {
        let absent = Op::Export {
            buf: 0,
            slice: Slice::AbsentBar,
        };
        assert_eq!(
            Model::with_uapi(DmabufUapi::Upstream).step(&absent),
            Predicted::Errno(libc::ENODEV)
        );
        assert_eq!(
            Model::with_uapi(DmabufUapi::SeedV1).step(&absent),
            Predicted::Errno(libc::EINVAL)
        );
    }

    #[test]
    fn the_scope_rules_keep_windows_apart_and_the_device_alone_in_a_reset() {
        let mut model = Model::new();
        model.step(&Op::Reset {
            kind: ResetKind::Vfio,
            hold_ms: 100,
        });
        for op in [Op::DecodeOff, Op::D3, EXPORT, Op::CloseDevice, Op::DecodeOn] {
            assert!(!model.allows(&op), "{op} inside a held reset");
        }
        assert!(model.allows(&Op::ResetEnd));
        assert!(model.allows(&Op::Sleep { ms: 5 }));
    }

    #[test]
    fn repair_drops_what_the_state_does_not_allow() {
        let ops = [
            Op::DecodeOn,
            EXPORT,
            EXPORT,
            REG,
            Op::Dereg { mr: 1 },
            WRITE,
            Op::D3,
        ];
        assert_eq!(repair(&ops), [EXPORT, REG, WRITE, Op::D3, Op::D0]);
    }
}
