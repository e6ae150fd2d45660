//! The fake platform the dispatcher's, the RDMA ops' and the RPC loop's tests run against: a
//! VFIO device, dma-bufs and verbs in memory, with `ok`/`err` helpers that run one op and
//! unwrap its reply.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2prig_protocol::agent::{AgentOp, AgentReply};
use p2prig_protocol::wire::{ErrorReply, Outcome};
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;

use crate::dispatch::{lock, Agent};
use crate::error::{AgentError, Result};
use crate::platform::{Device, Platform};
use crate::vfio::{DmabufRequest, RegionInfo};

mod iommu;
mod rdma;

pub use iommu::{FakeIommu, Mapped};
pub use rdma::FakeRdma;

/// The reply of an operation that must succeed.
pub fn ok(agent: &Agent<FakePlatform>, op: AgentOp) -> AgentReply {
    match agent.handle(&op).0 {
        Outcome::Ok(reply) => reply,
        Outcome::Err(error) => panic!("{op:?} failed: {error}"),
    }
}

/// The error of an operation that must fail.
pub fn err(agent: &Agent<FakePlatform>, op: AgentOp) -> ErrorReply {
    match agent.handle(&op).0 {
        Outcome::Ok(reply) => panic!("{op:?} succeeded: {reply:?}"),
        Outcome::Err(error) => error,
    }
}

#[derive(Debug, Default)]
pub struct FakeDevice {
    /// Bytes of each region by index; a missing index is EINVAL like the kernel's answer.
    pub regions: Mutex<BTreeMap<u32, Vec<u8>>>,
    pub exports: Mutex<Vec<DmabufRequest>>,
    /// errno the next export fails with, if any.
    pub export_errno: Mutex<Option<i32>>,
    pub resets: Mutex<u32>,
    /// Low-power entries (true) and exits (false), in order.
    pub low_power: Mutex<Vec<bool>>,
    /// The IOAS the device was attached to.
    pub attached: Mutex<Option<u32>>,
}

impl FakeDevice {
    /// A function with a 16 KiB BAR0, a 1 MiB BAR2 and 4 KiB of config space.
    pub fn nvme() -> Self {
        let device = Self::default();
        {
            let mut regions = lock(&device.regions);
            regions.insert(0, vec![0; 16 << 10]);
            regions.insert(1, Vec::new());
            regions.insert(2, vec![0; 1 << 20]);
            regions.insert(VFIO_PCI_CONFIG_REGION_INDEX, vec![0; 4096]);
        }
        device
    }

    fn access(&self, index: u32, offset: u64, width: u8, write: Option<u64>) -> Result<u64> {
        let mut regions = lock(&self.regions);
        let bytes = regions
            .get_mut(&index)
            .ok_or_else(|| AgentError::Invalid("no region".into()))?;
        let start = usize::try_from(offset).map_err(|_| AgentError::Invalid("offset".into()))?;
        let span = bytes
            .get_mut(start..start + usize::from(width))
            .ok_or_else(|| AgentError::Invalid("fake access out of range".into()))?;
        if let Some(value) = write {
            span.copy_from_slice(&value.to_le_bytes()[..usize::from(width)]);
        }
        let mut value = [0u8; 8];
        value[..usize::from(width)].copy_from_slice(span);
        Ok(u64::from_le_bytes(value))
    }
}

impl Device for FakeDevice {
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let regions = lock(&self.regions);
        let size = regions.get(&index).map(Vec::len).ok_or_else(|| {
            AgentError::os(
                "VFIO_DEVICE_GET_REGION_INFO",
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )
        })?;
        Ok(RegionInfo {
            index,
            flags: 7,
            size: size as u64,
            offset: u64::from(index) << 40,
        })
    }
    fn bar_read(&self, region: &RegionInfo, offset: u64, width: u8) -> Result<u64> {
        self.access(region.index, offset, width, None)
    }
    fn bar_write(&self, region: &RegionInfo, offset: u64, width: u8, value: u64) -> Result<()> {
        self.access(region.index, offset, width, Some(value))
            .map(drop)
    }
    fn region_read(&self, region: &RegionInfo, offset: u64, width: u8) -> Result<u64> {
        self.access(region.index, offset, width, None)
    }
    fn region_write(&self, region: &RegionInfo, offset: u64, width: u8, value: u64) -> Result<()> {
        self.access(region.index, offset, width, Some(value))
            .map(drop)
    }
    fn reset(&self) -> Result<()> {
        *lock(&self.resets) += 1;
        Ok(())
    }
    fn hot_reset(&self) -> Result<Vec<String>> {
        *lock(&self.resets) += 1;
        Ok(vec!["0000:02:00.0".into()])
    }
    fn export_dmabuf(&self, request: &DmabufRequest) -> Result<OwnedFd> {
        lock(&self.exports).push(*request);
        if let Some(errno) = *lock(&self.export_errno) {
            return Err(AgentError::os(
                "VFIO_DEVICE_FEATURE GET dma-buf",
                std::io::Error::from_raw_os_error(errno),
            ));
        }
        let length = match *request {
            DmabufRequest::SeedV1 { length, .. } | DmabufRequest::Upstream { length, .. } => length,
        };
        // A memfd stands in for the dma-buf: an fd whose SEEK_END is the export's size.
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"fake-dmabuf".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(AgentError::last_os("memfd_create"));
        }
        // SAFETY: fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = std::fs::File::from(fd);
        file.set_len(length)
            .map_err(|e| AgentError::os("set_len", e))?;
        Ok(file.into())
    }
    fn low_power(&self, enter: bool) -> Result<()> {
        lock(&self.low_power).push(enter);
        Ok(())
    }
    fn attach_ioas(&self, ioas: u32) -> Result<()> {
        *lock(&self.attached) = Some(ioas);
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct FakePlatform {
    pub devices: Mutex<BTreeMap<String, Arc<FakeDevice>>>,
    /// Networking requests that reached the "kernel".
    pub net_calls: Mutex<Vec<String>>,
    pub rdma: FakeRdma,
    pub powered_off: AtomicBool,
    /// When set, find_pci waits (up to 10 s) until hello has been called: proves that a
    /// slow request does not hold up the next one.
    pub find_pci_waits_for_hello: AtomicBool,
    pub hello_seen: (Mutex<bool>, std::sync::Condvar),
    /// Every iommufd opened, in order.
    pub iommus: Mutex<Vec<Arc<FakeIommu>>>,
}

impl FakePlatform {
    pub fn with_nvme(bdf: &str) -> (Self, Arc<FakeDevice>) {
        let platform = Self::default();
        let device = Arc::new(FakeDevice::nvme());
        lock(&platform.devices).insert(bdf.to_owned(), Arc::clone(&device));
        (platform, device)
    }
}

impl Platform for FakePlatform {
    fn kernel_release(&self) -> Result<String> {
        let (seen, signal) = &self.hello_seen;
        *lock(seen) = true;
        signal.notify_all();
        Ok("6.1.0-fake".into())
    }
    fn find_pci(&self, class: u32) -> Result<Vec<String>> {
        if self.find_pci_waits_for_hello.load(Ordering::SeqCst) {
            let (seen, signal) = &self.hello_seen;
            let guard = lock(seen);
            let (guard, _) = signal
                .wait_timeout_while(guard, Duration::from_secs(10), |seen| !*seen)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if !*guard {
                return Err(AgentError::State {
                    errno: libc::ETIMEDOUT,
                    message: "hello never arrived while find_pci was in flight".into(),
                });
            }
        }
        Ok(if class == 0x010802 {
            lock(&self.devices).keys().cloned().collect()
        } else {
            Vec::new()
        })
    }
    fn vfio_bind(&self, bdf: &str) -> Result<()> {
        crate::sysfs::validate_bdf(bdf)?;
        if lock(&self.devices).contains_key(bdf) {
            Ok(())
        } else {
            Err(AgentError::NotFound(format!("no PCI function {bdf}")))
        }
    }
    fn pci_attr_read(&self, bdf: &str, attribute: &str) -> Result<String> {
        self.vfio_bind(bdf)?;
        Ok(format!("{attribute} of {bdf}\n"))
    }
    fn pci_attr_write(&self, bdf: &str, _attribute: &str, _value: &str) -> Result<()> {
        self.vfio_bind(bdf)
    }
    fn kmemleak(&self, command: &str) -> Result<String> {
        Ok(format!("after {command}: nothing suspected\n"))
    }
    fn sysrq(&self, _key: char) -> Result<()> {
        Ok(())
    }
    fn vfio_open(&self, bdf: &str) -> Result<Arc<dyn Device>> {
        lock(&self.devices)
            .get(bdf)
            .map(|device| Arc::clone(device) as Arc<dyn Device>)
            .ok_or_else(|| AgentError::NotFound(format!("no PCI function {bdf}")))
    }
    fn iommufd_open(&self) -> Result<Arc<dyn crate::iommufd::Iommu>> {
        let iommu = Arc::new(FakeIommu::default());
        lock(&self.iommus).push(Arc::clone(&iommu));
        Ok(iommu)
    }
    fn vfio_cdev_open(&self, bdf: &str, _iommufd: RawFd) -> Result<(Arc<dyn Device>, u32)> {
        let device = self.vfio_open(bdf)?;
        Ok((device, 0x10))
    }
    fn dmesg(&self) -> Result<String> {
        Ok("[    0.000000] Linux version 6.1.0-fake\n".into())
    }
    fn power_off(&self) {
        self.powered_off.store(true, Ordering::SeqCst);
    }
    fn net_up(&self, ifname: &str, addr: std::net::Ipv4Addr, prefix: u8) -> Result<()> {
        lock(&self.net_calls).push(format!("net_up {ifname} {addr}/{prefix}"));
        Ok(())
    }
    fn neigh_add(&self, ifname: &str, ip: std::net::Ipv4Addr, mac: [u8; 6]) -> Result<()> {
        lock(&self.net_calls).push(format!("neigh_add {ifname} {ip} {mac:02x?}"));
        Ok(())
    }
    fn rdma_link_add(&self, name: &str, netdev: &str) -> Result<()> {
        if name == "rxe0"
            && lock(&self.net_calls)
                .iter()
                .any(|c| c.starts_with("rdma_link_add rxe0"))
        {
            return Err(AgentError::os(
                "RDMA_NLDEV_CMD_NEWLINK",
                std::io::Error::from_raw_os_error(libc::EEXIST),
            ));
        }
        lock(&self.net_calls).push(format!("rdma_link_add {name} {netdev}"));
        Ok(())
    }
    fn rdma(&self) -> &dyn crate::rdma::Rdma {
        &self.rdma
    }
}
