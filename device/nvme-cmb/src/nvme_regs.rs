//! BAR0 of the NVMe function: controller registers (NVMe 1.4 3.1) and doorbells, as a
//! declarative register map plus the little state that is not plain storage (CSTS.RDY,
//! the interrupt mask, doorbell values).

/// Size of BAR0: register page, doorbell pages up to 16 KiB (like most NVMe drives).
pub const BAR0_SIZE: u64 = 16 << 10;
/// First doorbell (NVMe 1.4 3.1.24): SQyTDBL at 0x1000 + (2y) * (4 << CAP.DSTRD).
pub const DOORBELL_BASE: u64 = 0x1000;
/// With DSTRD 0 a queue pair's two doorbells take 8 bytes.
pub const DOORBELL_STRIDE: u64 = 8;
/// Most queue pairs whose doorbells fit in BAR0.
pub const MAX_QUEUE_PAIRS: u32 = ((BAR0_SIZE - DOORBELL_BASE) / DOORBELL_STRIDE) as u32;

pub const CAP: u64 = 0x00;
pub const VS: u64 = 0x08;
pub const INTMS: u64 = 0x0c;
pub const INTMC: u64 = 0x10;
pub const CC: u64 = 0x14;
pub const CSTS: u64 = 0x1c;
pub const AQA: u64 = 0x24;
pub const ASQ: u64 = 0x28;
pub const ACQ: u64 = 0x30;
pub const CMBLOC: u64 = 0x38;
pub const CMBSZ: u64 = 0x3c;
pub const CMBMSC: u64 = 0x50;

/// CC.EN (NVMe 1.4 3.1.5).
pub const CC_EN: u64 = 1;
/// CC.SHN, bits 15:14.
const CC_SHN_SHIFT: u32 = 14;
/// CSTS.RDY and CSTS.SHST (bits 3:2; 10b = shutdown processing complete).
pub const CSTS_RDY: u64 = 1;
const CSTS_SHST_COMPLETE: u64 = 0b10 << 2;
const CSTS_SHST_MASK: u64 = 0b11 << 2;

/// How a write to a register acts on its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// Writable bits take the written value.
    Store,
    /// INTMS: ones set bits of the interrupt mask (NVMe 1.4 3.1.3).
    SetMask,
    /// INTMC: ones clear bits of the interrupt mask (NVMe 1.4 3.1.4).
    ClearMask,
}

/// One controller register.
#[derive(Debug, Clone, Copy)]
pub struct ControllerRegister {
    pub name: &'static str,
    pub offset: u64,
    /// Width in bytes: 4 or 8.
    pub width: u8,
    pub reset: u64,
    pub writable: u64,
    pub kind: WriteKind,
    /// Kept across a controller reset (CC.EN 1 -> 0): NVMe 1.4 7.3.2 leaves the admin queue
    /// registers alone so the host need not program them again.
    pub kept_on_controller_reset: bool,
}

/// Parameters that shape the read-only registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerParams {
    pub queue_pairs: u32,
    pub cmb_size: u64,
    /// CAP.TO in 500 ms units.
    pub timeout_units: u8,
}

/// CAP (NVMe 1.4 3.1.1): MQES 1023 (0-based), CQR 1, TO, DSTRD 0, CSS NVM (bit 37),
/// MPSMIN/MPSMAX 4 KiB, CMBS 1 (bit 57).
pub fn cap_value(params: &ControllerParams) -> u64 {
    let mqes: u64 = 1023;
    let cqr: u64 = 1 << 16;
    let timeout = (params.timeout_units as u64) << 24;
    let css_nvm: u64 = 1 << 37;
    let cmbs: u64 = 1 << 57;
    mqes | cqr | timeout | css_nvm | cmbs
}

/// CMBLOC (NVMe 1.4 3.1.12): BIR 2, offset 0.
pub fn cmbloc_value() -> u64 {
    2
}

/// CMBSZ (NVMe 1.4 3.1.13): SQS, CQS, RDS, WDS; SZ in the largest unit (SZU) that divides
/// the size exactly.
pub fn cmbsz_value(cmb_size: u64) -> u64 {
    let support: u64 = 1 | 1 << 1 | 1 << 3 | 1 << 4;
    // SZU n means 4 KiB * 16^n.
    let mut unit_index = 0u64;
    let mut unit = 4096u64;
    while unit_index < 6 && cmb_size.is_multiple_of(unit * 16) && cmb_size / (unit * 16) > 0 {
        unit *= 16;
        unit_index += 1;
    }
    let size_in_units = (cmb_size / unit) & 0xf_ffff;
    support | unit_index << 8 | size_in_units << 12
}

/// The controller register map (offsets below 0x1000; everything else there is reserved).
pub fn register_map(params: &ControllerParams) -> Vec<ControllerRegister> {
    let r = |name, offset, width, reset, writable| ControllerRegister {
        name,
        offset,
        width,
        reset,
        writable,
        kind: WriteKind::Store,
        kept_on_controller_reset: false,
    };
    let mut aqa = r("AQA", AQA, 4, 0, 0x0fff_0fff);
    let mut asq = r("ASQ", ASQ, 8, 0, !0xfff);
    let mut acq = r("ACQ", ACQ, 8, 0, !0xfff);
    for admin in [&mut aqa, &mut asq, &mut acq] {
        admin.kept_on_controller_reset = true;
    }
    vec![
        r("CAP", CAP, 8, cap_value(params), 0),
        // 3.1.2: version 1.4.0.
        r("VS", VS, 4, 0x0001_0400, 0),
        ControllerRegister {
            kind: WriteKind::SetMask,
            ..r("INTMS", INTMS, 4, 0, 0xffff_ffff)
        },
        ControllerRegister {
            kind: WriteKind::ClearMask,
            ..r("INTMC", INTMC, 4, 0, 0xffff_ffff)
        },
        // 3.1.5: EN (0), CSS (6:4), MPS (10:7), AMS (13:11), SHN (15:14), IOSQES (19:16),
        // IOCQES (23:20).
        r("CC", CC, 4, 0, 0x00ff_fff1),
        // 3.1.6: RDY and SHST are computed; NSSRO never set (no NVM subsystem reset).
        r("CSTS", CSTS, 4, 0, 0),
        aqa,
        asq,
        acq,
        r("CMBLOC", CMBLOC, 4, cmbloc_value(), 0),
        r("CMBSZ", CMBSZ, 4, cmbsz_value(params.cmb_size), 0),
        // 3.1.15: CRE (0), CMSE (1), CBA (63:12). CMBLOC/CMBSZ are readable regardless of
        // CRE (what QEMU calls a legacy CMB), so a host that reads them first still works.
        r("CMBMSC", CMBMSC, 8, 0, !0xfff | 0b11),
    ]
}

/// What a BAR0 write did, for the device to act on and record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControllerChange {
    /// CC.EN went 0 -> 1 (`Some(true)`) or 1 -> 0 (`Some(false)`).
    pub enable: Option<bool>,
    /// The write touched doorbells.
    pub doorbell: bool,
    /// The write hit no defined register (reserved: ignored).
    pub reserved: bool,
}

/// BAR0 state.
#[derive(Debug, Clone)]
pub struct Controller {
    map: Vec<ControllerRegister>,
    values: Vec<u64>,
    interrupt_mask: u32,
    sq_tail: Vec<u32>,
    cq_head: Vec<u32>,
    /// CLOCK_MONOTONIC ns at which CSTS.RDY becomes 1 (set when CC.EN goes 1).
    ready_at_ns: Option<u64>,
    /// Keeps CSTS.RDY at 1 while a controller reset is in progress (the host polls for 0).
    ready_held: bool,
    ready_delay_ns: u64,
}

impl Controller {
    pub fn new(params: &ControllerParams, ready_delay_ns: u64) -> Self {
        let queue_pairs = params.queue_pairs.clamp(1, MAX_QUEUE_PAIRS) as usize;
        let map = register_map(params);
        let values = map.iter().map(|r| r.reset).collect();
        Self {
            map,
            values,
            interrupt_mask: 0,
            sq_tail: vec![0; queue_pairs],
            cq_head: vec![0; queue_pairs],
            ready_at_ns: None,
            ready_held: false,
            ready_delay_ns,
        }
    }

    pub fn map(&self) -> &[ControllerRegister] {
        &self.map
    }

    pub fn queue_pairs(&self) -> u32 {
        self.sq_tail.len() as u32
    }

    pub fn set_ready_delay_ns(&mut self, delay: u64) {
        self.ready_delay_ns = delay;
    }

    pub fn set_ready_held(&mut self, held: bool) {
        self.ready_held = held;
    }

    /// Registers and doorbells to reset values. A controller reset keeps AQA/ASQ/ACQ
    /// (NVMe 1.4 7.3.2); a function-level reset clears everything.
    pub fn reset(&mut self, controller_only: bool) {
        for (value, r) in self.values.iter_mut().zip(&self.map) {
            if !(controller_only && r.kept_on_controller_reset) {
                *value = r.reset;
            }
        }
        self.interrupt_mask = 0;
        self.sq_tail.iter_mut().for_each(|v| *v = 0);
        self.cq_head.iter_mut().for_each(|v| *v = 0);
        self.ready_at_ns = None;
    }

    fn register_index(&self, offset: u64) -> Option<usize> {
        self.map
            .iter()
            .position(|r| offset >= r.offset && offset < r.offset + r.width as u64)
    }

    /// The value the host reads from register `index` at time `now_ns`.
    fn current(&self, index: usize, now_ns: u64) -> u64 {
        let r = &self.map[index];
        match r.offset {
            INTMS | INTMC => self.interrupt_mask as u64,
            CSTS => {
                let ready = self.ready_held || self.ready_at_ns.is_some_and(|at| now_ns >= at);
                self.values[index] | if ready { CSTS_RDY } else { 0 }
            }
            _ => self.values[index],
        }
    }

    /// A named register's current value.
    pub fn register(&self, offset: u64, now_ns: u64) -> Option<u64> {
        let index = self.map.iter().position(|r| r.offset == offset)?;
        Some(self.current(index, now_ns))
    }

    /// (queue, SQ tail, CQ head) of every queue pair with a non-zero doorbell.
    pub fn doorbells(&self) -> Vec<(u32, u32, u32)> {
        (0..self.sq_tail.len())
            .filter(|&q| self.sq_tail[q] != 0 || self.cq_head[q] != 0)
            .map(|q| (q as u32, self.sq_tail[q], self.cq_head[q]))
            .collect()
    }

    /// Doorbell `index` (0 = SQ0TDBL, 1 = CQ0HDBL, 2 = SQ1TDBL, ...), if configured.
    fn doorbell_mut(&mut self, index: u64) -> Option<&mut u32> {
        let queue = usize::try_from(index / 2).ok()?;
        if index.is_multiple_of(2) {
            self.sq_tail.get_mut(queue)
        } else {
            self.cq_head.get_mut(queue)
        }
    }

    /// Reads one byte of BAR0 as the host sees it.
    fn byte(&self, offset: u64, now_ns: u64) -> u8 {
        if offset < DOORBELL_BASE {
            self.register_index(offset).map_or(0, |index| {
                let shift = 8 * (offset - self.map[index].offset);
                (self.current(index, now_ns) >> shift) as u8
            })
        } else {
            // Doorbells are write-only (NVMe 1.4 3.1.24/3.1.25); like reserved space they
            // read as zero.
            0
        }
    }

    /// Reads `size` (1..=8) bytes at `offset` as a little-endian value. The caller checks
    /// alignment and range.
    pub fn read(&self, offset: u64, size: u32, now_ns: u64) -> u64 {
        (0..size.min(8) as u64).fold(0, |value, i| {
            value | (self.byte(offset + i, now_ns) as u64) << (8 * i)
        })
    }

    /// Writes `size` (1..=8) bytes of `value` at `offset`. Reserved bytes ignore the write.
    pub fn write(&mut self, offset: u64, size: u32, value: u64, now_ns: u64) -> ControllerChange {
        let mut change = ControllerChange::default();
        let mut touched_defined = false;
        let end = offset + size.min(8) as u64;
        let mut at = offset;
        while at < end {
            if at >= DOORBELL_BASE {
                let index = (at - DOORBELL_BASE) / 4;
                let reg_start = DOORBELL_BASE + index * 4;
                let (mask, bits) = slice(reg_start, 4, offset, end, value);
                if let Some(doorbell) = self.doorbell_mut(index) {
                    // Only bits 15:0 hold the tail/head pointer; 31:16 are reserved.
                    *doorbell = ((*doorbell as u64 & !mask) | (bits & mask)) as u32 & 0xffff;
                    change.doorbell = true;
                    touched_defined = true;
                }
                at = reg_start + 4;
                continue;
            }
            let Some(index) = self.register_index(at) else {
                at += 1;
                continue;
            };
            touched_defined = true;
            let r = self.map[index];
            let (mask, bits) = slice(r.offset, r.width as u64, offset, end, value);
            match r.kind {
                WriteKind::Store => {
                    let writable = mask & r.writable;
                    let old = self.values[index];
                    let new = (old & !writable) | (bits & writable);
                    self.values[index] = new;
                    if r.offset == CC {
                        self.on_cc_write(old, new, now_ns, &mut change);
                    }
                }
                WriteKind::SetMask => self.interrupt_mask |= (bits & mask) as u32,
                WriteKind::ClearMask => self.interrupt_mask &= !(bits & mask) as u32,
            }
            at = r.offset + r.width as u64;
        }
        change.reserved = !touched_defined;
        change
    }

    fn on_cc_write(&mut self, old: u64, new: u64, now_ns: u64, change: &mut ControllerChange) {
        let was_enabled = old & CC_EN != 0;
        let enabled = new & CC_EN != 0;
        if enabled && !was_enabled {
            // 3.1.6: RDY follows EN once the controller is ready to process commands.
            self.ready_at_ns = Some(now_ns.saturating_add(self.ready_delay_ns));
            change.enable = Some(true);
        } else if was_enabled && !enabled {
            change.enable = Some(false);
        }
        let shn_old = (old >> CC_SHN_SHIFT) & 0b11;
        let shn_new = (new >> CC_SHN_SHIFT) & 0b11;
        if let Some(csts) = self.map.iter().position(|r| r.offset == CSTS) {
            if shn_new != 0 && shn_old == 0 {
                // 7.6.2: shutdown processing completes at once (no I/O is ever in flight).
                self.values[csts] = (self.values[csts] & !CSTS_SHST_MASK) | CSTS_SHST_COMPLETE;
            } else if shn_new == 0 && shn_old != 0 {
                self.values[csts] &= !CSTS_SHST_MASK;
            }
        }
    }
}

/// The bytes of an access [`offset`, `end`) that fall in the register at `reg_start` of
/// `width` bytes, as (mask, value) aligned to the register.
fn slice(reg_start: u64, width: u64, offset: u64, end: u64, value: u64) -> (u64, u64) {
    let mut mask = 0u64;
    let mut bits = 0u64;
    for byte in reg_start.max(offset)..(reg_start + width).min(end) {
        let reg_shift = 8 * (byte - reg_start);
        let value_shift = 8 * (byte - offset);
        mask |= 0xff << reg_shift;
        bits |= ((value >> value_shift) & 0xff) << reg_shift;
    }
    (mask, bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> Controller {
        Controller::new(
            &ControllerParams {
                queue_pairs: 64,
                cmb_size: 1 << 20,
                timeout_units: 20,
            },
            0,
        )
    }

    #[test]
    fn cap_advertises_cmb_and_stride_zero() {
        let c = controller();
        let cap = c.read(CAP, 8, 0);
        assert_eq!(cap & 0xffff, 1023, "MQES");
        assert_ne!(cap & 1 << 16, 0, "CQR");
        assert_eq!((cap >> 24) & 0xff, 20, "TO");
        assert_eq!((cap >> 32) & 0xf, 0, "DSTRD");
        assert_ne!(cap & 1 << 37, 0, "CSS NVM");
        assert_ne!(cap & 1 << 57, 0, "CMBS");
        assert_eq!(c.read(CAP + 4, 4, 0), cap >> 32, "upper half alone");
    }

    #[test]
    fn version_is_1_4() {
        assert_eq!(controller().read(VS, 4, 0), 0x0001_0400);
    }

    #[test]
    fn cmbsz_encodes_size_in_largest_unit() {
        // SZU 2 = 1 MiB units, SZ 1.
        assert_eq!(cmbsz_value(1 << 20) >> 8, 2 | 1 << 4);
        // 64 KiB: SZU 1 (64 KiB), SZ 1.
        assert_eq!(cmbsz_value(64 << 10) >> 8, 1 | 1 << 4);
        // 256 MiB: SZU 4 (256 MiB), SZ 1.
        assert_eq!(cmbsz_value(256 << 20) >> 8, 4 | 1 << 4);
        // 2 MiB: SZU 2, SZ 2.
        assert_eq!(cmbsz_value(2 << 20) >> 8, 2 | 2 << 4);
        assert_eq!(cmbsz_value(1 << 20) & 0xff, 0b11011, "SQS CQS RDS WDS");
        assert_eq!(cmbloc_value(), 2, "BIR 2, offset 0");
    }

    #[test]
    fn ready_follows_enable_after_the_delay() {
        let mut c = controller();
        c.set_ready_delay_ns(1000);
        let change = c.write(CC, 4, 1, 5000);
        assert_eq!(change.enable, Some(true));
        assert_eq!(c.read(CSTS, 4, 5999) & CSTS_RDY, 0);
        assert_eq!(c.read(CSTS, 4, 6000) & CSTS_RDY, 1);
        let change = c.write(CC, 4, 0, 7000);
        assert_eq!(change.enable, Some(false));
    }

    #[test]
    fn shutdown_notification_completes_at_once() {
        let mut c = controller();
        c.write(CC, 4, 1 | 1 << 14, 0);
        assert_eq!(c.read(CSTS, 4, 0) & CSTS_SHST_MASK, CSTS_SHST_COMPLETE);
        c.write(CC, 4, 1, 0);
        assert_eq!(c.read(CSTS, 4, 0) & CSTS_SHST_MASK, 0);
    }

    #[test]
    fn interrupt_mask_set_and_clear() {
        let mut c = controller();
        c.write(INTMS, 4, 0b1010, 0);
        assert_eq!(c.read(INTMC, 4, 0), 0b1010);
        c.write(INTMC, 4, 0b0010, 0);
        assert_eq!(c.read(INTMS, 4, 0), 0b1000);
    }

    #[test]
    fn read_only_and_reserved_bits_ignore_writes() {
        let mut c = controller();
        let cap = c.read(CAP, 8, 0);
        c.write(CAP, 8, 0, 0);
        assert_eq!(c.read(CAP, 8, 0), cap);
        c.write(ASQ, 8, u64::MAX, 0);
        assert_eq!(c.read(ASQ, 8, 0), !0xfff);
        assert!(
            c.write(0x20, 4, 1, 0).reserved,
            "NSSR is reserved: CAP.NSSRS 0"
        );
        assert!(c.write(0x800, 4, 1, 0).reserved);
        assert_eq!(c.read(0x800, 4, 0), 0);
    }

    #[test]
    fn doorbells_store_the_pointer_and_read_zero() {
        let mut c = controller();
        assert!(c.write(DOORBELL_BASE + 8 * 3, 4, 0x1234_0007, 0).doorbell);
        c.write(DOORBELL_BASE + 8 * 3 + 4, 4, 5, 0);
        assert_eq!(c.doorbells(), [(3, 7, 5)]);
        assert_eq!(c.read(DOORBELL_BASE + 8 * 3, 4, 0), 0);
        // Past the configured queue pairs: reserved.
        assert!(c.write(DOORBELL_BASE + 8 * 64, 4, 1, 0).reserved);
    }

    #[test]
    fn an_eight_byte_doorbell_write_sets_both_pointers() {
        let mut c = controller();
        c.write(DOORBELL_BASE, 8, 9 << 32 | 4, 0);
        assert_eq!(c.doorbells(), [(0, 4, 9)]);
    }

    #[test]
    fn controller_reset_keeps_admin_queue_registers() {
        let mut c = controller();
        c.write(AQA, 4, 0x001f_001f, 0);
        c.write(ASQ, 8, 0x1000, 0);
        c.write(CC, 4, 1, 0);
        c.write(DOORBELL_BASE, 4, 1, 0);
        c.reset(true);
        assert_eq!(c.read(AQA, 4, 0), 0x001f_001f);
        assert_eq!(c.read(ASQ, 8, 0), 0x1000);
        assert_eq!(c.read(CC, 4, 0), 0);
        assert!(c.doorbells().is_empty());
        c.reset(false);
        assert_eq!(c.read(AQA, 4, 0), 0);
    }

    #[test]
    fn register_map_entries_are_aligned_and_disjoint() {
        let c = controller();
        let mut covered = vec![false; DOORBELL_BASE as usize];
        for r in c.map() {
            assert_eq!(r.offset % r.width as u64, 0, "{}", r.name);
            for b in r.offset..r.offset + r.width as u64 {
                assert!(!covered[b as usize], "{} overlaps", r.name);
                covered[b as usize] = true;
            }
        }
        assert_eq!(MAX_QUEUE_PAIRS, 1536);
    }
}
