//! The OS effects the dispatcher needs, behind two small traits, so the dispatcher and the RPC
//! loop are tested on the host with fakes; [`LinuxPlatform`] is the real thing in the guest.

use std::net::Ipv4Addr;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{AgentError, Result};
use crate::iommufd::{Iommu, Iommufd};
use crate::rdma::Rdma;
use crate::sysfs::SystemPaths;
use crate::verbs::Verbs;
use crate::vfio::{DmabufRequest, RegionInfo, VfioDevice};

/// Machine-wide operations.
pub trait Platform: Send + Sync {
    fn kernel_release(&self) -> Result<String>;
    fn find_pci(&self, class: u32) -> Result<Vec<String>>;
    fn vfio_bind(&self, bdf: &str) -> Result<()>;
    fn pci_attr_read(&self, bdf: &str, attribute: &str) -> Result<String>;
    fn pci_attr_write(&self, bdf: &str, attribute: &str, value: &str) -> Result<()>;
    /// Writes `command` to kmemleak's debugfs file and returns what it then reports.
    fn kmemleak(&self, command: &str) -> Result<String>;
    fn sysrq(&self, key: char) -> Result<()>;
    fn vfio_open(&self, bdf: &str) -> Result<Arc<dyn Device>>;
    /// Opens /dev/iommu.
    fn iommufd_open(&self) -> Result<Arc<dyn Iommu>>;
    /// Opens `bdf` through its VFIO cdev bound to the iommufd `iommufd`; returns the device
    /// and its iommufd device id.
    fn vfio_cdev_open(&self, bdf: &str, iommufd: RawFd) -> Result<(Arc<dyn Device>, u32)>;
    fn dmesg(&self) -> Result<String>;
    /// Syncs and powers off; returns only when that is impossible (then the caller goes on).
    fn power_off(&self);
    /// IPv4 address and prefix on an interface, which is brought up.
    fn net_up(&self, ifname: &str, addr: Ipv4Addr, prefix: u8) -> Result<()>;
    /// A permanent neighbour entry.
    fn neigh_add(&self, ifname: &str, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()>;
    /// A new rxe link on a netdev.
    fn rdma_link_add(&self, name: &str, netdev: &str) -> Result<()>;
    /// The verbs objects.
    fn rdma(&self) -> &dyn Rdma;
}

/// One open VFIO device. Bounds, widths and alignment are checked by the caller against
/// [`Device::region_info`]; implementations only perform the access.
pub trait Device: Send + Sync + std::fmt::Debug {
    fn region_info(&self, index: u32) -> Result<RegionInfo>;
    fn bar_read(&self, region: &RegionInfo, offset: u64, width: u8) -> Result<u64>;
    fn bar_write(&self, region: &RegionInfo, offset: u64, width: u8, value: u64) -> Result<()>;
    /// pread/pwrite on the device fd inside a region (used for config space).
    fn region_read(&self, region: &RegionInfo, offset: u64, width: u8) -> Result<u64>;
    fn region_write(&self, region: &RegionInfo, offset: u64, width: u8, value: u64) -> Result<()>;
    fn reset(&self) -> Result<()>;
    /// Secondary bus reset; returns the functions reset.
    fn hot_reset(&self) -> Result<Vec<String>>;
    /// VFIO_DEVICE_FEATURE GET dma-buf; the returned fd is the dma-buf.
    fn export_dmabuf(&self, request: &DmabufRequest) -> Result<OwnedFd>;
    /// VFIO_DEVICE_FEATURE SET LOW_POWER_ENTRY (`enter`) or LOW_POWER_EXIT.
    fn low_power(&self, enter: bool) -> Result<()>;
    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT (a device opened through its cdev).
    fn attach_ioas(&self, ioas: u32) -> Result<()>;
}

impl Device for VfioDevice {
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        VfioDevice::region_info(self, index)
    }
    fn bar_read(&self, region: &RegionInfo, offset: u64, width: u8) -> Result<u64> {
        VfioDevice::bar_read(self, region, offset, width)
    }
    fn bar_write(&self, region: &RegionInfo, offset: u64, width: u8, value: u64) -> Result<()> {
        VfioDevice::bar_write(self, region, offset, width, value)
    }
    fn region_read(&self, region: &RegionInfo, offset: u64, width: u8) -> Result<u64> {
        VfioDevice::region_read(self, region, offset, width)
    }
    fn region_write(&self, region: &RegionInfo, offset: u64, width: u8, value: u64) -> Result<()> {
        VfioDevice::region_write(self, region, offset, width, value)
    }
    fn reset(&self) -> Result<()> {
        VfioDevice::reset(self)
    }
    fn hot_reset(&self) -> Result<Vec<String>> {
        VfioDevice::hot_reset(self)
    }
    fn export_dmabuf(&self, request: &DmabufRequest) -> Result<OwnedFd> {
        VfioDevice::export_dmabuf(self, request)
    }
    fn low_power(&self, enter: bool) -> Result<()> {
        VfioDevice::low_power(self, enter)
    }
    fn attach_ioas(&self, ioas: u32) -> Result<()> {
        VfioDevice::attach_ioas(self, ioas)
    }
}

/// The guest (or, for debugging, any Linux host).
#[derive(Debug, Clone)]
pub struct LinuxPlatform {
    pub paths: SystemPaths,
    /// PID 1 powers the machine off; any other process just exits.
    pub is_init: bool,
    pub verbs: Arc<Verbs>,
}

impl LinuxPlatform {
    fn kmsg_path(&self) -> PathBuf {
        self.paths.dev.join("kmsg")
    }
}

/// The release field of uname(2), e.g. "6.1.192-p2prig-v1".
pub fn kernel_release() -> Result<String> {
    // SAFETY: utsname is plain bytes; zeroed is a valid initial value that uname overwrites.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into the struct we own.
    if unsafe { libc::uname(&mut name) } != 0 {
        return Err(AgentError::last_os("uname"));
    }
    let bytes: Vec<u8> = name
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

impl Platform for LinuxPlatform {
    fn kernel_release(&self) -> Result<String> {
        kernel_release()
    }

    fn find_pci(&self, class: u32) -> Result<Vec<String>> {
        self.paths.find_pci(class)
    }

    fn vfio_bind(&self, bdf: &str) -> Result<()> {
        self.paths.bind_vfio(bdf)
    }

    fn pci_attr_read(&self, bdf: &str, attribute: &str) -> Result<String> {
        self.paths.read_pci_attribute(bdf, attribute)
    }

    fn pci_attr_write(&self, bdf: &str, attribute: &str, value: &str) -> Result<()> {
        self.paths.write_pci_attribute(bdf, attribute, value)
    }

    fn kmemleak(&self, command: &str) -> Result<String> {
        self.paths.kmemleak(command)
    }

    fn sysrq(&self, key: char) -> Result<()> {
        self.paths.sysrq(key)
    }

    fn vfio_open(&self, bdf: &str) -> Result<Arc<dyn Device>> {
        let group = self.paths.iommu_group(bdf)?;
        let (group_path, noiommu) = self.paths.vfio_group_device(group)?;
        let device = VfioDevice::open(
            bdf,
            group,
            &group_path,
            noiommu,
            &self.paths.dev.join("vfio/vfio"),
        )?;
        Ok(Arc::new(device))
    }

    fn iommufd_open(&self) -> Result<Arc<dyn Iommu>> {
        Ok(Arc::new(Iommufd::open(&self.paths.dev.join("iommu"))?))
    }

    fn vfio_cdev_open(&self, bdf: &str, iommufd: RawFd) -> Result<(Arc<dyn Device>, u32)> {
        let cdev = self.paths.vfio_cdev(bdf)?;
        let (device, dev_id) = VfioDevice::open_cdev(bdf, &cdev, iommufd)?;
        Ok((Arc::new(device), dev_id))
    }

    fn dmesg(&self) -> Result<String> {
        crate::kmsg::read_log(&self.kmsg_path())
    }

    fn power_off(&self) {
        crate::pid1::power_off(self.is_init);
    }

    fn net_up(&self, ifname: &str, addr: Ipv4Addr, prefix: u8) -> Result<()> {
        crate::net::net_up(ifname, addr, prefix)
    }

    fn neigh_add(&self, ifname: &str, ip: Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        crate::net::neigh_add(ifname, ip, mac)
    }

    fn rdma_link_add(&self, name: &str, netdev: &str) -> Result<()> {
        crate::net::rdma_link_add(name, netdev)
    }

    fn rdma(&self) -> &dyn Rdma {
        self.verbs.as_ref()
    }
}
