//! Turns one [`AgentOp`] into one outcome: argument checks, handle tables, error sentences.
//!
//! The agent checks only what the kernel cannot see (widths, alignment, bounds of its own
//! mapping, fields the uAPI cannot carry); dma-buf export arguments are otherwise passed through
//! untouched, because whether the kernel rejects them is what the scenarios test.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use p2prig_protocol::agent::{AgentOp, AgentReply, DmabufUapi, KmemleakCommand};
use p2prig_protocol::wire::{ErrorReply, Outcome};
use vfio_bindings::bindings::vfio::{VFIO_PCI_BAR5_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX};

use crate::error::{AgentError, Result};
use crate::platform::{Device, Platform};
use crate::vfio::{DmabufRequest, RegionInfo};

/// Longest Sleep the agent accepts; longer is surely a unit mistake in the caller.
pub const MAX_SLEEP_MS: u64 = 600_000;

/// What the RPC loop must do after sending the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Nothing,
    PowerOff,
}

/// Open objects by handle. Handles start at 1 and are not reused while the agent runs, so a
/// stale handle is EBADF instead of silently naming a newer object.
#[derive(Debug)]
pub(crate) struct HandleTable<T> {
    next: u32,
    pub(crate) entries: BTreeMap<u32, T>,
}

impl<T> HandleTable<T> {
    pub(crate) fn new() -> Self {
        Self {
            next: 1,
            entries: BTreeMap::new(),
        }
    }

    pub(crate) fn insert(&mut self, value: T) -> u32 {
        // After 2^32 allocations wrap around, skipping 0 and handles still open.
        while self.next == 0 || self.entries.contains_key(&self.next) {
            self.next = self.next.wrapping_add(1);
        }
        let handle = self.next;
        self.next = self.next.wrapping_add(1);
        self.entries.insert(handle, value);
        handle
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a table lock (caught by the RPC loop) must not wedge the agent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The agent's state: the platform and the open devices and dma-bufs.
pub struct Agent<P> {
    pub(crate) platform: P,
    devices: Mutex<HandleTable<Arc<dyn Device>>>,
    pub(crate) dmabufs: Mutex<HandleTable<OwnedFd>>,
}

impl<P: std::fmt::Debug> std::fmt::Debug for Agent<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("platform", &self.platform)
            .field("devices", &lock(&self.devices).entries.len())
            .field("dmabufs", &lock(&self.dmabufs).entries.len())
            .finish()
    }
}

/// A sentence naming the operation and its arguments, the prefix of every error message.
pub fn describe(op: &AgentOp) -> String {
    match op {
        AgentOp::Hello => "hello".into(),
        AgentOp::FindPci { class } => format!("find_pci class {class:#08x}"),
        AgentOp::VfioBind { bdf } => format!("vfio_bind {bdf}"),
        AgentOp::VfioOpen { bdf } => format!("vfio_open {bdf}"),
        AgentOp::PciAttrRead { bdf, attribute } => format!("pci_attr_read {bdf} {attribute}"),
        AgentOp::Kmemleak { command } => format!("kmemleak {command:?}"),
        AgentOp::Sysrq { report } => format!("sysrq {report:?}"),
        AgentOp::PciAttrWrite {
            bdf,
            attribute,
            value,
        } => format!("pci_attr_write {bdf} {attribute} {value:?}"),
        AgentOp::VfioClose { device } => format!("vfio_close device {device}"),
        AgentOp::DmabufExport {
            device,
            bar,
            offset,
            length,
            uapi,
        } => format!(
            "dmabuf_export device {device} bar {bar} offset {offset:#x} length {length:#x} uapi {}",
            uapi_name(*uapi)
        ),
        AgentOp::DmabufClose { dmabuf } => format!("dmabuf_close dmabuf {dmabuf}"),
        AgentOp::BarWrite {
            device,
            bar,
            offset,
            width,
            value,
        } => format!(
            "bar_write device {device} bar {bar} offset {offset:#x} width {width} value {value:#x}"
        ),
        AgentOp::BarRead {
            device,
            bar,
            offset,
            width,
        } => format!("bar_read device {device} bar {bar} offset {offset:#x} width {width}"),
        AgentOp::ConfigRead {
            device,
            offset,
            width,
        } => format!("config_read device {device} offset {offset:#x} width {width}"),
        AgentOp::ConfigWrite {
            device,
            offset,
            width,
            value,
        } => format!(
            "config_write device {device} offset {offset:#x} width {width} value {value:#x}"
        ),
        AgentOp::VfioReset { device } => format!("vfio_reset device {device}"),
        AgentOp::VfioHotReset { device } => format!("vfio_hot_reset device {device}"),
        AgentOp::VfioRegion { device, index } => {
            format!("vfio_region device {device} index {index}")
        }
        AgentOp::Sleep { ms } => format!("sleep {ms} ms"),
        AgentOp::Dmesg => "dmesg".into(),
        AgentOp::OpenFds => "open_fds".into(),
        AgentOp::PowerOff => "power_off".into(),
        other => crate::rdma_ops::describe(other),
    }
}

fn uapi_name(uapi: DmabufUapi) -> &'static str {
    match uapi {
        DmabufUapi::SeedV1 => "seed_v1",
        DmabufUapi::Upstream => "upstream",
    }
}

/// Operations frequent enough (tight loops in scenarios) that logging each one to the slow
/// serial console would change the timing being tested; their failures are still logged.
pub fn is_chatty(op: &AgentOp) -> bool {
    matches!(
        op,
        AgentOp::BarRead { .. }
            | AgentOp::BarWrite { .. }
            | AgentOp::ConfigRead { .. }
            | AgentOp::ConfigWrite { .. }
            | AgentOp::Sleep { .. }
            | AgentOp::VfioRegion { .. }
            | AgentOp::Hello
            | AgentOp::Dmesg
            | AgentOp::OpenFds
            | AgentOp::MrRead { .. }
            | AgentOp::MrWrite { .. }
            | AgentOp::PostSend { .. }
            | AgentOp::PostRecv { .. }
            | AgentOp::PollCq { .. }
            | AgentOp::QpQuery { .. }
    )
}

fn value_mask(width: u8) -> u64 {
    match width {
        8 => u64::MAX,
        _ => (1u64 << (8 * u32::from(width))) - 1,
    }
}

/// Checks a `width`-byte access at `offset` of a region of `size` bytes.
fn check_access(what: &str, size: u64, offset: u64, width: u8, widths: &[u8]) -> Result<()> {
    if !widths.contains(&width) {
        return Err(AgentError::Invalid(format!(
            "width {width} is not one of {widths:?}"
        )));
    }
    // Every accepted width is a power of two.
    if offset & (u64::from(width) - 1) != 0 {
        return Err(AgentError::Invalid(format!(
            "offset {offset:#x} is not aligned to the {width}-byte width"
        )));
    }
    match offset.checked_add(u64::from(width)) {
        Some(end) if end <= size => Ok(()),
        _ => Err(AgentError::Invalid(format!(
            "{width} bytes at {offset:#x} run past the end of {what} ({size:#x} bytes)"
        ))),
    }
}

fn check_value(width: u8, value: u64) -> Result<()> {
    if value & !value_mask(width) != 0 {
        return Err(AgentError::Invalid(format!(
            "value {value:#x} does not fit in {width} bytes"
        )));
    }
    Ok(())
}

impl<P: Platform> Agent<P> {
    pub fn new(platform: P) -> Self {
        Self {
            platform,
            devices: Mutex::new(HandleTable::new()),
            dmabufs: Mutex::new(HandleTable::new()),
        }
    }

    pub fn platform(&self) -> &P {
        &self.platform
    }

    /// Runs one operation. Never panics on any input (the RPC loop still catches panics).
    pub fn handle(&self, op: &AgentOp) -> (Outcome<AgentReply>, After) {
        let after = if matches!(op, AgentOp::PowerOff) {
            After::PowerOff
        } else {
            After::Nothing
        };
        match self.run(op) {
            Ok(reply) => (Outcome::Ok(reply), after),
            Err(error) => (
                Outcome::Err(ErrorReply::new(
                    error.errno(),
                    format!("{}: {error}", describe(op)),
                )),
                After::Nothing,
            ),
        }
    }

    fn device(&self, device: u32) -> Result<Arc<dyn Device>> {
        lock(&self.devices)
            .entries
            .get(&device)
            .cloned()
            .ok_or_else(|| {
                AgentError::BadHandle(format!("no open VFIO device has handle {device}"))
            })
    }

    fn bar_region(device: &dyn Device, bar: u32) -> Result<RegionInfo> {
        if bar > VFIO_PCI_BAR5_REGION_INDEX {
            return Err(AgentError::Invalid(format!(
                "{bar} is not a BAR number (0-5)"
            )));
        }
        let region = device.region_info(bar)?;
        if region.size == 0 {
            return Err(AgentError::Invalid(format!(
                "BAR {bar} is not implemented (size 0)"
            )));
        }
        Ok(region)
    }

    fn run(&self, op: &AgentOp) -> Result<AgentReply> {
        match op {
            AgentOp::Hello => Ok(AgentReply::Hello {
                kernel_release: self.platform.kernel_release()?,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            }),
            AgentOp::FindPci { class } => {
                if *class > 0x00ff_ffff {
                    return Err(AgentError::Invalid(format!(
                        "class {class:#x} has more than 24 bits"
                    )));
                }
                Ok(AgentReply::Pci {
                    functions: self.platform.find_pci(*class)?,
                })
            }
            AgentOp::VfioBind { bdf } => {
                self.platform.vfio_bind(bdf)?;
                Ok(AgentReply::Done)
            }
            AgentOp::Sysrq { report } => {
                self.platform.sysrq(report.key())?;
                Ok(AgentReply::Done)
            }
            AgentOp::Kmemleak { command } => Ok(AgentReply::Text {
                text: self.platform.kmemleak(match command {
                    KmemleakCommand::Scan => "scan",
                    KmemleakCommand::Clear => "clear",
                })?,
            }),
            AgentOp::PciAttrRead { bdf, attribute } => Ok(AgentReply::Text {
                text: self.platform.pci_attr_read(bdf, attribute)?,
            }),
            AgentOp::PciAttrWrite {
                bdf,
                attribute,
                value,
            } => {
                self.platform.pci_attr_write(bdf, attribute, value)?;
                Ok(AgentReply::Done)
            }
            AgentOp::VfioOpen { bdf } => {
                let device = self.platform.vfio_open(bdf)?;
                let handle = lock(&self.devices).insert(device);
                Ok(AgentReply::Device { device: handle })
            }
            AgentOp::VfioClose { device } => {
                let removed = lock(&self.devices).entries.remove(device);
                // The device closes when the last in-flight operation on it lets go of it.
                match removed {
                    Some(_) => Ok(AgentReply::Done),
                    None => Err(AgentError::BadHandle(format!(
                        "no open VFIO device has handle {device}"
                    ))),
                }
            }
            AgentOp::DmabufExport {
                device,
                bar,
                offset,
                length,
                uapi,
            } => self.export(*device, *bar, *offset, *length, *uapi),
            AgentOp::DmabufClose { dmabuf } => {
                // Out of the table first: a close that blocks in the kernel (the last
                // reference releasing the dma-buf) must not hold the table's lock.
                let removed = lock(&self.dmabufs).entries.remove(dmabuf);
                match removed {
                    Some(fd) => {
                        drop(fd);
                        Ok(AgentReply::Done)
                    }
                    None => Err(AgentError::BadHandle(format!(
                        "no open dma-buf has handle {dmabuf}"
                    ))),
                }
            }
            AgentOp::BarRead {
                device,
                bar,
                offset,
                width,
            } => {
                let device = self.device(*device)?;
                let region = Self::bar_region(device.as_ref(), *bar)?;
                check_access(
                    &format!("BAR {bar}"),
                    region.size,
                    *offset,
                    *width,
                    &[1, 2, 4, 8],
                )?;
                Ok(AgentReply::Value {
                    value: device.bar_read(&region, *offset, *width)?,
                })
            }
            AgentOp::BarWrite {
                device,
                bar,
                offset,
                width,
                value,
            } => {
                let device = self.device(*device)?;
                let region = Self::bar_region(device.as_ref(), *bar)?;
                check_access(
                    &format!("BAR {bar}"),
                    region.size,
                    *offset,
                    *width,
                    &[1, 2, 4, 8],
                )?;
                check_value(*width, *value)?;
                device.bar_write(&region, *offset, *width, *value)?;
                Ok(AgentReply::Done)
            }
            AgentOp::ConfigRead {
                device,
                offset,
                width,
            } => {
                let device = self.device(*device)?;
                let region = device.region_info(VFIO_PCI_CONFIG_REGION_INDEX)?;
                check_access("config space", region.size, *offset, *width, &[1, 2, 4])?;
                Ok(AgentReply::Value {
                    value: device.region_read(&region, *offset, *width)?,
                })
            }
            AgentOp::ConfigWrite {
                device,
                offset,
                width,
                value,
            } => {
                let device = self.device(*device)?;
                let region = device.region_info(VFIO_PCI_CONFIG_REGION_INDEX)?;
                check_access("config space", region.size, *offset, *width, &[1, 2, 4])?;
                check_value(*width, *value)?;
                device.region_write(&region, *offset, *width, *value)?;
                Ok(AgentReply::Done)
            }
            AgentOp::VfioReset { device } => {
                self.device(*device)?.reset()?;
                Ok(AgentReply::Done)
            }
            AgentOp::VfioHotReset { device } => Ok(AgentReply::Pci {
                functions: self.device(*device)?.hot_reset()?,
            }),
            AgentOp::VfioRegion { device, index } => {
                let region = self.device(*device)?.region_info(*index)?;
                Ok(AgentReply::Region {
                    index: region.index,
                    flags: region.flags,
                    size: region.size,
                    offset: region.offset,
                })
            }
            AgentOp::Sleep { ms } => {
                if *ms > MAX_SLEEP_MS {
                    return Err(AgentError::Invalid(format!(
                        "{ms} ms is longer than the {MAX_SLEEP_MS} ms limit"
                    )));
                }
                std::thread::sleep(Duration::from_millis(*ms));
                Ok(AgentReply::Done)
            }
            AgentOp::Dmesg => Ok(AgentReply::Text {
                text: self.platform.dmesg()?,
            }),
            AgentOp::OpenFds => {
                let entries = std::fs::read_dir("/proc/self/fd")
                    .map_err(|e| AgentError::os("listing /proc/self/fd".to_string(), e))?;
                Ok(AgentReply::Value {
                    value: entries.count() as u64,
                })
            }
            // The RPC loop powers off after the reply has gone out.
            AgentOp::PowerOff => Ok(AgentReply::Done),
            other => self.run_rdma(other),
        }
    }

    fn export(
        &self,
        device: u32,
        bar: u32,
        offset: u64,
        length: u64,
        uapi: DmabufUapi,
    ) -> Result<AgentReply> {
        let device = self.device(device)?;
        let request = match uapi {
            DmabufUapi::SeedV1 => DmabufRequest::SeedV1 {
                region_index: bar,
                offset: u32::try_from(offset).map_err(|_| {
                    AgentError::Invalid(format!(
                        "offset {offset:#x} does not fit the seed uAPI's 32-bit offset field; \
                         rejected by the agent, the kernel was not asked"
                    ))
                })?,
                length,
            },
            DmabufUapi::Upstream => DmabufRequest::Upstream {
                region_index: bar,
                offset,
                length,
            },
        };
        let fd = device.export_dmabuf(&request)?;
        // SAFETY: lseek on an fd we own; dma-buf files report their size at SEEK_END.
        let end = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
        if end < 0 {
            // Dropping `fd` closes the new dma-buf, so a failed size query leaks nothing.
            return Err(AgentError::last_os(
                "lseek(SEEK_END) on the new dma-buf (closed it again)",
            ));
        }
        let size = u64::try_from(end).unwrap_or_default();
        let handle = lock(&self.dmabufs).insert(fd);
        Ok(AgentReply::Dmabuf {
            dmabuf: handle,
            size,
        })
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake platform and device for dispatcher and RPC tests.
    use super::*;
    use std::os::fd::FromRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};

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
            let start =
                usize::try_from(offset).map_err(|_| AgentError::Invalid("offset".into()))?;
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
        fn region_write(
            &self,
            region: &RegionInfo,
            offset: u64,
            width: u8,
            value: u64,
        ) -> Result<()> {
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
                DmabufRequest::SeedV1 { length, .. } | DmabufRequest::Upstream { length, .. } => {
                    length
                }
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
    }

    #[derive(Debug, Default)]
    pub struct FakePlatform {
        pub devices: Mutex<BTreeMap<String, Arc<FakeDevice>>>,
        /// Networking requests that reached the "kernel".
        pub net_calls: Mutex<Vec<String>>,
        pub rdma: crate::rdma::fake::FakeRdma,
        pub powered_off: AtomicBool,
        /// When set, find_pci waits (up to 10 s) until hello has been called: proves that a
        /// slow request does not hold up the next one.
        pub find_pci_waits_for_hello: AtomicBool,
        pub hello_seen: (Mutex<bool>, std::sync::Condvar),
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
}

#[cfg(test)]
mod tests {
    use super::fake::{err, ok, FakeDevice, FakePlatform};
    use super::*;

    const BDF: &str = "0000:02:00.0";

    fn agent() -> (Agent<FakePlatform>, Arc<FakeDevice>) {
        let (platform, device) = FakePlatform::with_nvme(BDF);
        (Agent::new(platform), device)
    }

    fn open(agent: &Agent<FakePlatform>) -> u32 {
        match ok(agent, AgentOp::VfioOpen { bdf: BDF.into() }) {
            AgentReply::Device { device } => device,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn hello_reports_release_and_version() {
        let (agent, _) = agent();
        assert_eq!(
            ok(&agent, AgentOp::Hello),
            AgentReply::Hello {
                kernel_release: "6.1.0-fake".into(),
                agent_version: env!("CARGO_PKG_VERSION").into()
            }
        );
    }

    #[test]
    fn open_fds_counts_what_the_process_holds() {
        let (agent, _) = agent();
        let count = |agent: &Agent<FakePlatform>| match ok(agent, AgentOp::OpenFds) {
            AgentReply::Value { value } => value,
            other => panic!("unexpected {other:?}"),
        };
        let before = count(&agent);
        let file = std::fs::File::open("/proc/self/fd").expect("open");
        // Other test threads open files too: at least one more, never fewer than that.
        assert!(count(&agent) > before, "the extra fd is counted");
        drop(file);
    }

    #[test]
    fn find_pci_rejects_classes_wider_than_24_bits() {
        let (agent, _) = agent();
        assert_eq!(
            ok(&agent, AgentOp::FindPci { class: 0x010802 }),
            AgentReply::Pci {
                functions: vec![BDF.into()]
            }
        );
        assert_eq!(
            err(&agent, AgentOp::FindPci { class: 0x0100_0000 }).errno,
            libc::EINVAL
        );
    }

    #[test]
    fn handles_start_at_one_and_are_not_reused() {
        let (agent, _) = agent();
        let first = open(&agent);
        assert_eq!(first, 1);
        ok(&agent, AgentOp::VfioClose { device: first });
        let second = open(&agent);
        assert_eq!(second, 2);
        let error = err(&agent, AgentOp::VfioClose { device: first });
        assert_eq!(error.errno, libc::EBADF);
        assert!(
            error.message.starts_with("vfio_close device 1: "),
            "{}",
            error.message
        );
    }

    #[test]
    fn seed_export_passes_arguments_through_and_reports_size() {
        let (agent, device) = agent();
        let handle = open(&agent);
        let reply = ok(
            &agent,
            AgentOp::DmabufExport {
                device: handle,
                bar: 2,
                offset: 0x1000,
                length: 0x2000,
                uapi: DmabufUapi::SeedV1,
            },
        );
        assert_eq!(
            reply,
            AgentReply::Dmabuf {
                dmabuf: 1,
                size: 0x2000
            }
        );
        // Invalid arguments are the kernel's to judge: a ROM index goes through as is.
        let _ = agent.handle(&AgentOp::DmabufExport {
            device: handle,
            bar: 6,
            offset: 1,
            length: 0,
            uapi: DmabufUapi::Upstream,
        });
        assert_eq!(
            *lock(&device.exports),
            [
                DmabufRequest::SeedV1 {
                    region_index: 2,
                    offset: 0x1000,
                    length: 0x2000
                },
                DmabufRequest::Upstream {
                    region_index: 6,
                    offset: 1,
                    length: 0
                }
            ]
        );
        ok(&agent, AgentOp::DmabufClose { dmabuf: 1 });
        assert_eq!(
            err(&agent, AgentOp::DmabufClose { dmabuf: 1 }).errno,
            libc::EBADF
        );
    }

    #[test]
    fn seed_export_offset_beyond_32_bits_is_refused_by_the_agent() {
        let (agent, device) = agent();
        let handle = open(&agent);
        let error = err(
            &agent,
            AgentOp::DmabufExport {
                device: handle,
                bar: 2,
                offset: 1 << 32,
                length: 0x1000,
                uapi: DmabufUapi::SeedV1,
            },
        );
        assert_eq!(error.errno, libc::EINVAL);
        assert!(error.message.contains("32-bit offset"), "{}", error.message);
        assert!(error.message.contains("agent"), "{}", error.message);
        assert!(lock(&device.exports).is_empty(), "kernel not asked");
    }

    #[test]
    fn kernel_export_errors_carry_the_kernel_errno() {
        let (agent, device) = agent();
        let handle = open(&agent);
        *lock(&device.export_errno) = Some(libc::ENODEV);
        let error = err(
            &agent,
            AgentOp::DmabufExport {
                device: handle,
                bar: 0,
                offset: 0,
                length: 0,
                uapi: DmabufUapi::Upstream,
            },
        );
        assert_eq!(error.errno, libc::ENODEV);
        assert!(
            error
                .message
                .starts_with("dmabuf_export device 1 bar 0 offset 0x0 length 0x0 uapi upstream: "),
            "{}",
            error.message
        );
    }

    #[test]
    fn bar_accesses_round_trip_and_are_checked_first() {
        let (agent, _) = agent();
        let device = open(&agent);
        let write = |bar, offset, width, value| AgentOp::BarWrite {
            device,
            bar,
            offset,
            width,
            value,
        };
        let read = |bar, offset, width| AgentOp::BarRead {
            device,
            bar,
            offset,
            width,
        };
        ok(&agent, write(0, 0x1000, 4, 0x1f));
        assert_eq!(
            ok(&agent, read(0, 0x1000, 4)),
            AgentReply::Value { value: 0x1f }
        );
        ok(&agent, write(2, (1 << 20) - 8, 8, u64::MAX));
        assert_eq!(
            ok(&agent, read(2, (1 << 20) - 2, 2)),
            AgentReply::Value { value: 0xffff }
        );
        for (op, why) in [
            (write(0, 0x1001, 4, 0), "aligned"),
            (write(0, 0x4000, 1, 0), "past the end"),
            (write(0, u64::MAX - 3, 4, 0), "past the end"),
            (write(0, 0, 3, 0), "width"),
            (write(0, 0, 1, 0x100), "does not fit"),
            (read(1, 0, 4), "not implemented"),
            (read(6, 0, 4), "not a BAR"),
            (read(0, 2, 8), "aligned"),
        ] {
            let error = err(&agent, op);
            assert_eq!(error.errno, libc::EINVAL, "{}", error.message);
            assert!(error.message.contains(why), "{} lacks {why}", error.message);
        }
        assert_eq!(
            err(
                &agent,
                AgentOp::BarRead {
                    device: 9,
                    bar: 0,
                    offset: 0,
                    width: 4
                }
            )
            .errno,
            libc::EBADF
        );
    }

    #[test]
    fn config_accesses_and_reset() {
        let (agent, fake) = agent();
        let device = open(&agent);
        ok(
            &agent,
            AgentOp::ConfigWrite {
                device,
                offset: 4,
                width: 2,
                value: 0x0006,
            },
        );
        assert_eq!(
            ok(
                &agent,
                AgentOp::ConfigRead {
                    device,
                    offset: 4,
                    width: 2
                }
            ),
            AgentReply::Value { value: 6 }
        );
        assert_eq!(
            err(
                &agent,
                AgentOp::ConfigRead {
                    device,
                    offset: 0,
                    width: 8
                }
            )
            .errno,
            libc::EINVAL
        );
        assert_eq!(
            err(
                &agent,
                AgentOp::ConfigRead {
                    device,
                    offset: 4096,
                    width: 1
                }
            )
            .errno,
            libc::EINVAL
        );
        ok(&agent, AgentOp::VfioReset { device });
        assert_eq!(*lock(&fake.resets), 1);
        assert_eq!(
            ok(&agent, AgentOp::VfioHotReset { device }),
            AgentReply::Pci {
                functions: vec![BDF.into()]
            }
        );
        assert_eq!(*lock(&fake.resets), 2);
        assert_eq!(
            ok(&agent, AgentOp::VfioRegion { device, index: 2 }),
            AgentReply::Region {
                index: 2,
                flags: 7,
                size: 1 << 20,
                offset: 2 << 40
            }
        );
        assert_eq!(
            err(&agent, AgentOp::VfioRegion { device, index: 9 }).errno,
            libc::EINVAL
        );
    }

    #[test]
    fn closing_the_device_keeps_its_dmabufs_open() {
        let (agent, _) = agent();
        let device = open(&agent);
        let export = AgentOp::DmabufExport {
            device,
            bar: 2,
            offset: 0,
            length: 0x1000,
            uapi: DmabufUapi::SeedV1,
        };
        ok(&agent, export.clone());
        ok(&agent, AgentOp::VfioClose { device });
        assert_eq!(err(&agent, export).errno, libc::EBADF);
        ok(&agent, AgentOp::DmabufClose { dmabuf: 1 });
    }

    #[test]
    fn power_off_answers_done_then_asks_for_power_off() {
        let (agent, _) = agent();
        assert_eq!(
            agent.handle(&AgentOp::PowerOff),
            (Outcome::Ok(AgentReply::Done), After::PowerOff)
        );
        assert_eq!(
            agent.handle(&AgentOp::Sleep { ms: 0 }),
            (Outcome::Ok(AgentReply::Done), After::Nothing)
        );
        assert_eq!(
            err(
                &agent,
                AgentOp::Sleep {
                    ms: MAX_SLEEP_MS + 1
                }
            )
            .errno,
            libc::EINVAL
        );
    }

    #[test]
    fn bind_errors_name_the_function() {
        let (agent, _) = agent();
        ok(&agent, AgentOp::VfioBind { bdf: BDF.into() });
        let error = err(
            &agent,
            AgentOp::VfioBind {
                bdf: "../../x".into(),
            },
        );
        assert_eq!(error.errno, libc::EINVAL);
        assert!(
            error.message.starts_with("vfio_bind ../../x: "),
            "{}",
            error.message
        );
        assert_eq!(
            err(
                &agent,
                AgentOp::VfioOpen {
                    bdf: "0000:09:00.0".into()
                }
            )
            .errno,
            libc::ENOENT
        );
    }
}
