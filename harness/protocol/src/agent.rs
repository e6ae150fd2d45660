//! The guest agent's RPC on the virtio-serial port.

use serde::{Deserialize, Serialize};

/// Which dma-buf export uAPI the guest kernel speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DmabufUapi {
    /// The seed series ported to 6.1: VFIO_DEVICE_FEATURE 9, struct {region_index,
    /// open_flags, offset (u32), length (u64)}.
    SeedV1,
    /// Upstream (7.x): VFIO_DEVICE_FEATURE_DMA_BUF 11 with ranges.
    Upstream,
}

/// A request to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AgentOp {
    /// Who are you: kernel release, agent version.
    Hello,
    /// Find PCI functions with this class code (24 bits, e.g. 0x010802).
    FindPci { class: u32 },
    /// Bind a function (e.g. "0000:02:00.0") to vfio-pci through driver_override.
    VfioBind { bdf: String },
    /// Open the function's VFIO group (noiommu) and device; returns a handle.
    VfioOpen { bdf: String },
    /// Close a VFIO device handle.
    VfioClose { device: u32 },
    /// Export (bar, offset, length) of an open device as a dma-buf; returns a handle.
    DmabufExport {
        device: u32,
        bar: u32,
        offset: u64,
        length: u64,
        uapi: DmabufUapi,
    },
    /// Close a dma-buf handle.
    DmabufClose { dmabuf: u32 },
    /// Write `value` of `width` bytes (1, 2, 4, 8) at `offset` of a BAR through the VFIO mmap.
    BarWrite {
        device: u32,
        bar: u32,
        offset: u64,
        width: u8,
        value: u64,
    },
    /// Read `width` bytes at `offset` of a BAR through the VFIO mmap.
    BarRead {
        device: u32,
        bar: u32,
        offset: u64,
        width: u8,
    },
    /// Read `width` bytes (1, 2, 4) at `offset` of the function's config space through the
    /// VFIO config region (vfio-pci's virtualised view, as the kernel's own writes see it).
    ConfigRead { device: u32, offset: u64, width: u8 },
    /// Write `value` of `width` bytes (1, 2, 4) at `offset` of config space through VFIO, e.g.
    /// PCI_COMMAND (0x04) to toggle memory decode, or the PCIe Device Control register for FLR.
    ConfigWrite {
        device: u32,
        offset: u64,
        width: u8,
        value: u64,
    },
    /// VFIO_DEVICE_RESET on an open device (FLR or whatever reset vfio-pci picks).
    VfioReset { device: u32 },
    /// VFIO_DEVICE_PCI_HOT_RESET (secondary bus reset) of an open device, passing the group of
    /// that device; answers `pci` with the functions the kernel said the reset affects.
    VfioHotReset { device: u32 },
    /// VFIO_DEVICE_GET_REGION_INFO of region `index` (0-5 BARs, 6 ROM, 7 config); answers
    /// `region`. Lets a scenario size its arguments from what the kernel sees.
    VfioRegion { device: u32, index: u32 },
    /// Sleep on the agent side, then answer `done`; lets tests hold a request in flight.
    Sleep { ms: u64 },
    /// The kernel log since boot.
    Dmesg,
    /// Flush and power the guest off. The agent answers `done` before powering off.
    PowerOff,
}

/// Replies to [`AgentOp`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentReply {
    Hello {
        kernel_release: String,
        agent_version: String,
    },
    Pci {
        functions: Vec<String>,
    },
    Done,
    Device {
        device: u32,
    },
    Dmabuf {
        dmabuf: u32,
        /// Size of the dma-buf as the kernel reports it (lseek SEEK_END on the fd).
        size: u64,
    },
    Value {
        value: u64,
    },
    Text {
        text: String,
    },
    /// A VFIO region: VFIO_REGION_INFO_FLAG_* bits (1 read, 2 write, 4 mmap, 8 caps), its size
    /// and its offset in the device fd.
    Region {
        index: u32,
        flags: u32,
        size: u64,
        offset: u64,
    },
}

/// The line the agent writes on the port once it is ready to serve requests.
pub const READY_BANNER: &str = "p2prig-agent ready";
