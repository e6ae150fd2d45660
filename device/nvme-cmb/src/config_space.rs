//! PCI configuration space of the NVMe function, as a declarative register map.
//!
//! Layout (PCI Local Bus 3.0 6.1, PCI PM 1.2 3.2, PCIe Base 4.0 7.5.3):
//! - 0x00 header type 0 with class code 0x010802 (NVMe I/O controller), 64-bit memory
//!   BAR0 (controller registers) and BAR2 (the CMB, prefetchable);
//! - 0x40 PCI power-management capability (D0/D3hot; NoSoftReset clear, so D3hot -> D0
//!   resets the function);
//! - 0x50 PCI Express capability v2, endpoint, Device Capabilities with FLR;
//! - 0x100 no extended capabilities.

/// Vendor ID reported by the function: 0x1b36 is the ID QEMU's own emulated devices use
/// (Red Hat), which no physical NVMe drive carries.
pub const VENDOR_ID: u16 = 0x1b36;
/// Device ID: chosen outside the range QEMU assigns to its devices (0x0001..0x0100), so a
/// guest driver never mistakes the function for QEMU's nvme device (0x0010).
pub const DEVICE_ID: u16 = 0xc0b2;
/// Class code: mass storage (01), non-volatile memory (08), NVMe I/O controller (02).
pub const CLASS_CODE: u32 = 0x01_08_02;
/// Size of the config region: PCIe extended config space.
pub const CONFIG_SIZE: usize = 4096;

/// PCI_COMMAND and its bits (PCI 3.0 6.2.2).
pub const COMMAND: u16 = 0x04;
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// First BAR register.
pub const BAR0: u16 = 0x10;
/// PM capability and PMCSR (PCI PM 1.2 3.2.4).
pub const PM_CAP: u16 = 0x40;
pub const PMCSR: u16 = PM_CAP + 4;
pub const PMCSR_POWER_STATE: u16 = 0b11;
pub const PMCSR_NO_SOFT_RESET: u16 = 1 << 3;
/// PCIe capability and Device Control (PCIe 4.0 7.5.3.4).
pub const PCIE_CAP: u16 = 0x50;
pub const PCIE_DEVCAP: u16 = PCIE_CAP + 4;
pub const PCIE_DEVCTL: u16 = PCIE_CAP + 8;
pub const DEVCAP_FLR: u32 = 1 << 28;
pub const DEVCTL_INITIATE_FLR: u16 = 1 << 15;

/// What a write to a register sets in motion besides storing the writable bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigEffect {
    None,
    /// Memory decode may change.
    Command,
    /// Power state may change (D3hot -> D0 resets unless NoSoftReset).
    PowerControl,
    /// Initiate Function Level Reset is write-only: it starts an FLR and reads as zero.
    DeviceControl,
}

/// One config-space register: the contract of the function in one line.
#[derive(Debug, Clone, Copy)]
pub struct ConfigRegister {
    pub name: &'static str,
    pub offset: u16,
    /// Width in bytes: 1, 2 or 4.
    pub width: u8,
    pub reset: u32,
    /// Bits a write can change; the rest are read-only.
    pub writable: u32,
    pub effect: ConfigEffect,
}

const fn reg(
    name: &'static str,
    offset: u16,
    width: u8,
    reset: u32,
    writable: u32,
) -> ConfigRegister {
    ConfigRegister {
        name,
        offset,
        width,
        reset,
        writable,
        effect: ConfigEffect::None,
    }
}

const fn with_effect(mut r: ConfigRegister, effect: ConfigEffect) -> ConfigRegister {
    r.effect = effect;
    r
}

/// BAR low dword: memory, 64-bit (type 10b), optionally prefetchable (PCI 3.0 6.2.5.1).
const BAR_MEM64: u32 = 0b100;
const BAR_PREFETCH: u32 = 1 << 3;

/// The register map for a CMB of `cmb_size` bytes (a power of two, at least 4 KiB).
pub fn register_map(cmb_size: u64) -> Vec<ConfigRegister> {
    let bar0_size: u64 = crate::nvme_regs::BAR0_SIZE;
    // Sizing (PCI 3.0 6.2.5.1): the address bits below the size read as zero after an
    // all-ones write; the low 4 bits are the read-only type flags. Both BARs are 64-bit, so
    // the mask spans the low and high dwords.
    let mask = |size: u64| !(size.max(16) - 1);
    let bar0_mask = mask(bar0_size);
    let bar2_mask = mask(cmb_size);
    vec![
        reg("vendor_id", 0x00, 2, VENDOR_ID as u32, 0),
        reg("device_id", 0x02, 2, DEVICE_ID as u32, 0),
        // Bits: memory space (1), bus master (2), parity error response (6), SERR# (8),
        // INTx disable (10). I/O space stays 0: the function has no I/O BAR.
        with_effect(reg("command", COMMAND, 2, 0, 0x0546), ConfigEffect::Command),
        // Capabilities list (bit 4); the error bits are never set, so read-only zero.
        reg("status", 0x06, 2, 1 << 4, 0),
        reg("revision_class", 0x08, 4, CLASS_CODE << 8, 0),
        reg("cache_line_size", 0x0c, 1, 0, 0xff),
        reg("latency_timer", 0x0d, 1, 0, 0),
        reg("header_type", 0x0e, 1, 0, 0),
        reg("bist", 0x0f, 1, 0, 0),
        reg("bar0", BAR0, 4, BAR_MEM64, bar0_mask as u32 & !0xf),
        reg("bar1", BAR0 + 4, 4, 0, (bar0_mask >> 32) as u32),
        reg(
            "bar2",
            BAR0 + 8,
            4,
            BAR_MEM64 | BAR_PREFETCH,
            bar2_mask as u32 & !0xf,
        ),
        reg("bar3", BAR0 + 12, 4, 0, (bar2_mask >> 32) as u32),
        reg("bar4", BAR0 + 16, 4, 0, 0),
        reg("bar5", BAR0 + 20, 4, 0, 0),
        reg("cardbus_cis", 0x28, 4, 0, 0),
        reg("subsystem_vendor_id", 0x2c, 2, VENDOR_ID as u32, 0),
        reg("subsystem_id", 0x2e, 2, DEVICE_ID as u32, 0),
        // No expansion ROM: the register is hardwired to zero, so sizing reads 0 (absent).
        reg("expansion_rom", 0x30, 4, 0, 0),
        reg("capabilities_pointer", 0x34, 1, PM_CAP as u32, 0),
        reg("interrupt_line", 0x3c, 1, 0, 0xff),
        // No INTx: the device raises no interrupts.
        reg("interrupt_pin", 0x3d, 1, 0, 0),
        reg("min_gnt", 0x3e, 1, 0, 0),
        reg("max_lat", 0x3f, 1, 0, 0),
        // PCI PM 1.2 3.2: ID 01h, next PCIe; PMC version 3 (011b), no D1/D2, no PME.
        reg("pm_cap_header", PM_CAP, 2, (PCIE_CAP as u32) << 8 | 0x01, 0),
        reg("pmc", PM_CAP + 2, 2, 0x0003, 0),
        // PowerState (1:0) writable; NoSoftReset (3) clear: D3hot -> D0 is a soft reset.
        with_effect(
            reg("pmcsr", PMCSR, 2, 0, PMCSR_POWER_STATE as u32),
            ConfigEffect::PowerControl,
        ),
        reg("pmcsr_bse_data", PM_CAP + 6, 2, 0, 0),
        // PCIe 4.0 7.5.3.1/2: ID 10h, last capability; version 2, device/port type 0
        // (PCI Express Endpoint).
        reg("pcie_cap_header", PCIE_CAP, 2, 0x10, 0),
        reg("pcie_capabilities", PCIE_CAP + 2, 2, 0x0002, 0),
        // 7.5.3.3: max payload 128 B, role-based error reporting (15), FLR capable (28).
        reg(
            "device_capabilities",
            PCIE_DEVCAP,
            4,
            DEVCAP_FLR | 1 << 15,
            0,
        ),
        // 7.5.3.4: error reporting enables (3:0), relaxed ordering (4), max payload (7:5),
        // extended tag (8), phantom functions (9), aux power (10), no snoop (11), max read
        // request (14:12) are RW; default relaxed ordering + no snoop + 512 B read request.
        // Bit 15 (Initiate FLR) is write-only and reads 0.
        with_effect(
            reg("device_control", PCIE_DEVCTL, 2, 0x2810, 0x7fff),
            ConfigEffect::DeviceControl,
        ),
        reg("device_status", PCIE_CAP + 0x0a, 2, 0, 0),
        // 7.5.3.6: 2.5 GT/s, x1.
        reg("link_capabilities", PCIE_CAP + 0x0c, 4, 0x0000_0011, 0),
        // ASPM control (1:0), common clock (6), extended synch (7).
        reg("link_control", PCIE_CAP + 0x10, 2, 0, 0x00c3),
        reg("link_status", PCIE_CAP + 0x12, 2, 0x0011, 0),
        reg("device_capabilities2", PCIE_CAP + 0x24, 4, 0, 0),
        reg("device_control2", PCIE_CAP + 0x28, 2, 0, 0),
        // Supported link speeds vector: 2.5 GT/s.
        reg("link_capabilities2", PCIE_CAP + 0x2c, 4, 1 << 1, 0),
        // Target link speed 2.5 GT/s (3:0).
        reg("link_control2", PCIE_CAP + 0x30, 2, 0x0001, 0x000f),
        reg("link_status2", PCIE_CAP + 0x32, 2, 0, 0),
    ]
}

/// What a config write changed, for the device to act on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigChange {
    /// New memory-decode state, when it changed.
    pub memory_decode: Option<bool>,
    /// (old, new) PMCSR power state, when it changed.
    pub power_state: Option<(u8, u8)>,
    /// A 1 was written to Initiate Function Level Reset.
    pub initiate_flr: bool,
}

/// Config-space contents plus the map that governs them.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    map: Vec<ConfigRegister>,
    bytes: Vec<u8>,
    /// Writable mask per byte, derived from the map.
    writable: Vec<u8>,
    /// Index into `map` of the register covering each byte of the standard header and
    /// capabilities (first 256 bytes).
    owner: Vec<Option<u16>>,
}

impl ConfigSpace {
    pub fn new(cmb_size: u64) -> Self {
        let map = register_map(cmb_size);
        let mut space = Self {
            bytes: vec![0; CONFIG_SIZE],
            writable: vec![0; CONFIG_SIZE],
            owner: vec![None; CONFIG_SIZE],
            map,
        };
        for (index, r) in space.map.iter().enumerate() {
            for i in 0..r.width as usize {
                let at = r.offset as usize + i;
                space.writable[at] = (r.writable >> (8 * i)) as u8;
                space.owner[at] = Some(index as u16);
            }
        }
        space.reset();
        space
    }

    /// Every register back to its reset value (FLR, D3hot -> D0 soft reset): the function's
    /// config space has no sticky bits.
    pub fn reset(&mut self) {
        self.bytes.iter_mut().for_each(|b| *b = 0);
        for r in &self.map {
            for i in 0..r.width as usize {
                self.bytes[r.offset as usize + i] = (r.reset >> (8 * i)) as u8;
            }
        }
    }

    /// The register map.
    pub fn map(&self) -> &[ConfigRegister] {
        &self.map
    }

    /// Reads `data.len()` bytes at `offset`; false (and nothing read) if out of range.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        match range(offset, data.len()) {
            Some(r) => {
                data.copy_from_slice(&self.bytes[r]);
                true
            }
            None => false,
        }
    }

    /// A little-endian 16-bit register value.
    pub fn read_u16(&self, offset: u16) -> u16 {
        let at = offset as usize;
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    /// A little-endian 32-bit register value.
    pub fn read_u32(&self, offset: u16) -> u32 {
        let at = offset as usize;
        u32::from_le_bytes([
            self.bytes[at],
            self.bytes[at + 1],
            self.bytes[at + 2],
            self.bytes[at + 3],
        ])
    }

    /// Whether memory space decode is on (PCI_COMMAND bit 1).
    pub fn memory_decode(&self) -> bool {
        self.read_u16(COMMAND) & COMMAND_MEMORY != 0
    }

    /// PMCSR PowerState (0 = D0, 3 = D3hot).
    pub fn power_state(&self) -> u8 {
        (self.read_u16(PMCSR) & PMCSR_POWER_STATE) as u8
    }

    /// Whether NoSoftReset is set (D3hot -> D0 keeps state).
    pub fn no_soft_reset(&self) -> bool {
        self.read_u16(PMCSR) & PMCSR_NO_SOFT_RESET != 0
    }

    /// Writes `data` at `offset` through the writable masks; `None` if out of range.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<ConfigChange> {
        let range = range(offset, data.len())?;
        let decode_before = self.memory_decode();
        let power_before = self.power_state();
        let mut change = ConfigChange::default();
        for (i, &value) in data.iter().enumerate() {
            let at = range.start + i;
            let owner = self.owner[at].map(|index| self.map[index as usize]);
            if let Some(r) = owner {
                if r.effect == ConfigEffect::DeviceControl
                    && at == r.offset as usize + 1
                    && value & (DEVICE_CONTROL_FLR_BYTE) != 0
                {
                    change.initiate_flr = true;
                }
                if r.effect == ConfigEffect::PowerControl && at == r.offset as usize {
                    // PCI PM 1.2 3.2.4: a write of an unsupported state (D1, D2) completes
                    // normally but leaves the state unchanged.
                    let state = value & PMCSR_POWER_STATE as u8;
                    if state == 1 || state == 2 {
                        continue;
                    }
                }
            }
            let mask = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (value & mask);
        }
        let decode_after = self.memory_decode();
        if decode_after != decode_before {
            change.memory_decode = Some(decode_after);
        }
        let power_after = self.power_state();
        if power_after != power_before {
            change.power_state = Some((power_before, power_after));
        }
        Some(change)
    }

    /// The first 256 bytes.
    pub fn header(&self) -> &[u8] {
        &self.bytes[..256]
    }
}

/// Initiate FLR is bit 15 of Device Control: bit 7 of its high byte.
const DEVICE_CONTROL_FLR_BYTE: u8 = (DEVCTL_INITIATE_FLR >> 8) as u8;

fn range(offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len)?;
    (end <= CONFIG_SIZE).then_some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(space: &ConfigSpace, offset: u16) -> u32 {
        space.read_u32(offset)
    }

    fn write32(space: &mut ConfigSpace, offset: u16, value: u32) -> ConfigChange {
        space
            .write(offset as u64, &value.to_le_bytes())
            .expect("in range")
    }

    #[test]
    fn identity_and_class_code_are_nvme() {
        let space = ConfigSpace::new(1 << 20);
        assert_eq!(
            read32(&space, 0),
            (DEVICE_ID as u32) << 16 | VENDOR_ID as u32
        );
        assert_eq!(read32(&space, 0x08) >> 8, 0x010802);
        assert_eq!(space.read_u16(0x06) & (1 << 4), 1 << 4);
    }

    #[test]
    fn registers_do_not_overlap_and_fit() {
        let map = register_map(1 << 20);
        let mut seen = [false; 256];
        for r in &map {
            assert!(matches!(r.width, 1 | 2 | 4), "{}", r.name);
            assert_eq!(r.offset % r.width as u16, 0, "{} misaligned", r.name);
            for i in 0..r.width as usize {
                let at = r.offset as usize + i;
                assert!(!seen[at], "{} overlaps", r.name);
                seen[at] = true;
            }
        }
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        for cmb in [64u64 << 10, 1 << 20, 256 << 20] {
            let mut space = ConfigSpace::new(cmb);
            for bar in 0..6u16 {
                write32(&mut space, BAR0 + 4 * bar, 0xffff_ffff);
            }
            assert_eq!(read32(&space, BAR0), 0xffff_c004, "bar0 16 KiB, 64-bit");
            assert_eq!(read32(&space, BAR0 + 4), 0xffff_ffff);
            let low = read32(&space, BAR0 + 8);
            assert_eq!(low & 0xf, 0xc, "bar2 64-bit prefetchable");
            let mask = (read32(&space, BAR0 + 12) as u64) << 32 | (low & !0xf) as u64;
            assert_eq!((!mask).wrapping_add(1), cmb, "bar2 size");
            for bar in 4..6u16 {
                assert_eq!(read32(&space, BAR0 + 4 * bar), 0);
            }
        }
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let mut space = ConfigSpace::new(1 << 20);
        let before = space.header().to_vec();
        write32(&mut space, 0x00, 0);
        write32(&mut space, 0x08, 0);
        write32(&mut space, PCIE_DEVCAP, 0);
        write32(&mut space, 0x30, 0xffff_ffff);
        write32(&mut space, 0xf0, 0xffff_ffff);
        assert_eq!(space.header(), &before[..]);
    }

    #[test]
    fn capability_list_walks_pm_then_pcie() {
        let space = ConfigSpace::new(1 << 20);
        let mut at = space.header()[0x34] as usize;
        let mut ids = vec![];
        while at != 0 {
            ids.push(space.header()[at]);
            at = space.header()[at + 1] as usize;
        }
        assert_eq!(ids, [0x01, 0x10]);
        assert_eq!(space.read_u16(PCIE_CAP + 2) & 0xf0, 0, "endpoint");
        assert_ne!(read32(&space, PCIE_DEVCAP) & DEVCAP_FLR, 0);
    }

    #[test]
    fn memory_decode_change_is_reported_once() {
        let mut space = ConfigSpace::new(1 << 20);
        let change = space.write(COMMAND as u64, &0x0006u16.to_le_bytes());
        assert_eq!(change.and_then(|c| c.memory_decode), Some(true));
        let change = space.write(COMMAND as u64, &0x0002u16.to_le_bytes());
        assert_eq!(change.and_then(|c| c.memory_decode), None);
        assert!(space.memory_decode());
    }

    #[test]
    fn initiate_flr_is_reported_and_reads_zero() {
        let mut space = ConfigSpace::new(1 << 20);
        let change = space.write(PCIE_DEVCTL as u64, &0xa810u16.to_le_bytes());
        assert!(change.is_some_and(|c| c.initiate_flr));
        assert_eq!(space.read_u16(PCIE_DEVCTL), 0x2810);
    }

    #[test]
    fn power_state_d1_and_d2_writes_are_ignored() {
        let mut space = ConfigSpace::new(1 << 20);
        let change = space.write(PMCSR as u64, &1u16.to_le_bytes());
        assert_eq!(change.and_then(|c| c.power_state), None);
        let change = space.write(PMCSR as u64, &3u16.to_le_bytes());
        assert_eq!(change.and_then(|c| c.power_state), Some((0, 3)));
        assert_eq!(space.power_state(), 3);
    }

    #[test]
    fn out_of_range_access_is_refused() {
        let mut space = ConfigSpace::new(1 << 20);
        let mut buf = [0u8; 4];
        assert!(!space.read(4094, &mut buf));
        assert!(space.write(u64::MAX, &buf).is_none());
    }

    #[test]
    fn reset_restores_defaults() {
        let mut space = ConfigSpace::new(1 << 20);
        write32(&mut space, BAR0, 0xfebf_0000);
        space.write(COMMAND as u64, &0x0006u16.to_le_bytes());
        space.reset();
        assert_eq!(read32(&space, BAR0), 0x4);
        assert!(!space.memory_decode());
    }
}
