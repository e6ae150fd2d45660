//! The two machines a boot can build. Both have the PCIe switch with nvme-cmb and the rxe
//! NIC, the NIC outside it and the agent's port; they differ in the IOMMU:
//!
//! - [`RigShape::Switch`]: no IOMMU. vfio-pci runs nvme-cmb in no-IOMMU mode, and rxe's
//!   importer works on physical addresses, which needs its NIC outside any translating
//!   domain. Every rxe scenario boots this.
//! - [`RigShape::Viommu`]: QEMU's intel-iommu in front of every function (`intel_iommu=on`;
//!   base.config leaves VT-d off by default so the same kernel boots both shapes) and QEMU's
//!   edu device on a third downstream port of the switch as the DMA initiator, whose
//!   transfers go through the vIOMMU. iommufd's importer maps nvme-cmb's dma-buf into an
//!   IOAS that edu is attached to. One boot cannot serve both importers: with VT-d on, every
//!   function (the rxe NIC too) sits in a translating domain and vfio-pci has no no-IOMMU
//!   groups, so each scenario names its importer and the runner boots the shape it needs.
//!
//! QEMU facts measured for the vIOMMU (../../../ARCHITECTURE.md, "The vIOMMU shape"):
//! intel-iommu must come before the PCI devices; without `caching-mode=on` QEMU aborts when
//! the vfio-user device is set up ("requires caching mode"); `intremap=on` under KVM needs
//! `kernel-irqchip=split`.

use serde::{Deserialize, Serialize};

use crate::rig::Accel;

/// QEMU's trace event for a DMA remapping fault (hw/i386/trace-events): written as
/// `vtd_dmar_fault sid 0x400 fault 5 addr 0x200008 write 1` by the log backend.
pub const VTD_FAULT_TRACE_EVENT: &str = "vtd_dmar_fault";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RigShape {
    #[default]
    Switch,
    Viommu,
}

impl RigShape {
    pub fn name(self) -> &'static str {
        match self {
            RigShape::Switch => "switch",
            RigShape::Viommu => "viommu",
        }
    }

    /// What `-machine` adds after the accelerator.
    pub fn machine_options(self, accel: Accel) -> &'static str {
        match (self, accel) {
            (RigShape::Viommu, Accel::Kvm) => ",kernel-irqchip=split",
            _ => "",
        }
    }

    /// vCPUs. The vIOMMU shape under TCG runs one: with two, QEMU 10.2.2 aborts in
    /// iotlb_to_section() ("section_index < d->map.sections_nb") when the guest closes the
    /// vfio-user device's cdev (docs/findings/Q1.md); KVM does not use that path.
    pub fn cpus(self, accel: Accel) -> u32 {
        match (self, accel) {
            (RigShape::Viommu, Accel::Tcg) => 1,
            _ => 2,
        }
    }

    /// The kernel command line's IOMMU part.
    pub fn cmdline(self) -> &'static str {
        match self {
            RigShape::Switch => "vfio.enable_unsafe_noiommu_mode=1",
            RigShape::Viommu => "intel_iommu=on",
        }
    }

    /// Arguments before every PCI device: the IOMMU, and QEMU's trace of every DMA remapping
    /// fault it reports (qemu.stderr.log), the iommufd scenarios' fault oracle. The guest's
    /// own log is not one: dmar_fault() (drivers/iommu/intel/dmar.c) prints under a
    /// ratelimit of 10 lines per 5 s, two lines per fault, and drops the rest silently.
    pub fn leading_args(self) -> Vec<String> {
        match self {
            RigShape::Switch => Vec::new(),
            RigShape::Viommu => vec![
                "-device".into(),
                "intel-iommu,intremap=on,caching-mode=on".into(),
                "-trace".into(),
                VTD_FAULT_TRACE_EVENT.into(),
            ],
        }
    }

    /// Devices added behind the switch.
    pub fn switch_devices(self) -> Vec<String> {
        match self {
            RigShape::Switch => Vec::new(),
            RigShape::Viommu => vec![
                "-device".into(),
                "xio3130-downstream,id=dp2,bus=sw0,chassis=5,slot=0".into(),
                "-device".into(),
                "edu,bus=dp2,addr=0".into(),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_viommu_shape_turns_the_iommu_on_and_adds_edu() {
        assert!(RigShape::Switch.leading_args().is_empty());
        assert!(RigShape::Switch.switch_devices().is_empty());
        assert!(RigShape::Switch.cmdline().contains("noiommu"));
        assert_eq!(RigShape::Switch.machine_options(Accel::Kvm), "");
        assert_eq!(RigShape::Viommu.cmdline(), "intel_iommu=on");
        assert!(RigShape::Viommu.leading_args()[1].contains("caching-mode=on"));
        assert!(RigShape::Viommu.switch_devices()[3].starts_with("edu,"));
        assert_eq!(
            RigShape::Viommu.machine_options(Accel::Kvm),
            ",kernel-irqchip=split"
        );
        assert_eq!(RigShape::Viommu.machine_options(Accel::Tcg), "");
    }
}
