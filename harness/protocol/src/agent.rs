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

/// An access right of a memory region or of a QP's remote side (IBV_ACCESS_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    LocalWrite,
    RemoteWrite,
    RemoteRead,
    RemoteAtomic,
}

/// The work request opcodes the agent posts on a send queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendOpcode {
    RdmaWrite,
    RdmaRead,
    Send,
}

fn default_port_access() -> Vec<Access> {
    vec![
        Access::RemoteWrite,
        Access::RemoteRead,
        Access::RemoteAtomic,
    ]
}
fn default_mr_access() -> Vec<Access> {
    vec![Access::LocalWrite, Access::RemoteWrite, Access::RemoteRead]
}
fn default_queue_depth() -> u32 {
    16
}
fn default_cq_entries() -> u32 {
    64
}
fn default_path_mtu() -> u32 {
    1024
}
fn one() -> u8 {
    1
}
fn default_min_rnr_timer() -> u8 {
    12
}
fn default_timeout() -> u8 {
    14
}
fn seven() -> u8 {
    7
}
fn yes() -> bool {
    true
}
fn one_u32() -> u32 {
    1
}

/// Which way an edu DMA transfer goes (docs/specs/edu.rst, DMA command bit 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EduDirection {
    /// From the bus address into edu's buffer (a DMA read by the device).
    IovaToEdu,
    /// From edu's buffer to the bus address (a DMA write by the device).
    EduToIova,
}

fn default_edu_timeout() -> u64 {
    5000
}

/// The magic SysRq reports the harness may ask for when the guest seems stuck; each goes to
/// the kernel log, so to the serial console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SysrqReport {
    /// `w`: the stacks of tasks in uninterruptible sleep.
    BlockedTasks,
    /// `d`: the locks held (lockdep kernels).
    HeldLocks,
}

impl SysrqReport {
    pub fn key(self) -> char {
        match self {
            SysrqReport::BlockedTasks => 'w',
            SysrqReport::HeldLocks => 'd',
        }
    }
}

/// What to ask kmemleak to do before reading its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KmemleakCommand {
    /// Scan memory now for unreferenced objects.
    Scan,
    /// Forget the objects reported so far (a baseline before the scenario's own work).
    Clear,
}

/// A request to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AgentOp {
    /// Who are you: kernel release, agent version.
    Hello,
    /// Find PCI functions with this class code (24 bits, e.g. 0x010802).
    FindPci {
        class: u32,
    },
    /// Bind a function (e.g. "0000:02:00.0") to vfio-pci through driver_override.
    VfioBind {
        bdf: String,
    },
    /// Open the function's VFIO group (noiommu) and device; returns a handle.
    VfioOpen {
        bdf: String,
    },
    /// Close a VFIO device handle.
    VfioClose {
        device: u32,
    },
    /// Export (bar, offset, length) of an open device as a dma-buf; returns a handle.
    DmabufExport {
        device: u32,
        bar: u32,
        offset: u64,
        length: u64,
        uapi: DmabufUapi,
    },
    /// Close a dma-buf handle.
    DmabufClose {
        dmabuf: u32,
    },
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
    ConfigRead {
        device: u32,
        offset: u64,
        width: u8,
    },
    /// Write `value` of `width` bytes (1, 2, 4) at `offset` of config space through VFIO, e.g.
    /// PCI_COMMAND (0x04) to toggle memory decode, or the PCIe Device Control register for FLR.
    ConfigWrite {
        device: u32,
        offset: u64,
        width: u8,
        value: u64,
    },
    /// VFIO_DEVICE_RESET on an open device (FLR or whatever reset vfio-pci picks).
    VfioReset {
        device: u32,
    },
    /// VFIO_DEVICE_PCI_HOT_RESET (secondary bus reset) of an open device, passing the group of
    /// that device; answers `pci` with the functions the kernel said the reset affects.
    VfioHotReset {
        device: u32,
    },
    /// VFIO_DEVICE_GET_REGION_INFO of region `index` (0-5 BARs, 6 ROM, 7 config); answers
    /// `region`. Lets a scenario size its arguments from what the kernel sees.
    VfioRegion {
        device: u32,
        index: u32,
    },
    /// Read a sysfs attribute of a PCI function (`/sys/bus/pci/devices/<bdf>/<attribute>`,
    /// e.g. "class", "resource", "reset_method"); answers `text`.
    PciAttrRead {
        bdf: String,
        attribute: String,
    },
    /// Write `value` to a PCI function's sysfs attribute (e.g. "1" to "reset").
    PciAttrWrite {
        bdf: String,
        attribute: String,
        value: String,
    },
    /// Write `command` ("scan" or "clear") to /sys/kernel/debug/kmemleak, then answer `text`
    /// with the file's report (empty when kmemleak suspects nothing). Debug kernels only.
    Kmemleak {
        command: KmemleakCommand,
    },
    /// Write the report's key to /proc/sysrq-trigger, then answer `done`.
    Sysrq {
        report: SysrqReport,
    },
    /// Sleep on the agent side, then answer `done`; lets tests hold a request in flight.
    Sleep {
        ms: u64,
    },
    /// The kernel log since boot.
    Dmesg,
    /// How many file descriptors the agent holds (`/proc/self/fd`), answered as `value`: a
    /// scenario compares two counts to show its operations leaked none.
    OpenFds,
    /// Flush and power the guest off. The agent answers `done` before powering off.
    PowerOff,
    /// VFIO_DEVICE_FEATURE SET LOW_POWER_ENTRY (`enter`) or LOW_POWER_EXIT on an open device:
    /// vfio-pci puts the function in D3hot through runtime PM and revokes its dma-bufs.
    VfioLowPower {
        device: u32,
        enter: bool,
    },

    // iommufd (Linux 7.x, the vIOMMU rig): upstream's own dma-buf importer. Handles as for
    // VFIO devices; IOAS ids are the kernel's object ids.
    /// Open /dev/iommu; answers `iommufd`.
    IommufdOpen,
    /// Close an iommufd handle. Devices bound to it keep its context alive until they close.
    IommufdClose {
        iommufd: u32,
    },
    /// Open a function's VFIO cdev (/dev/vfio/devices/vfioN, from sysfs) and bind it to
    /// `iommufd` (VFIO_DEVICE_BIND_IOMMUFD); answers `cdev_device`. The handle serves every
    /// device op (bar_write, reset, dma-buf export, close...).
    VfioCdevOpen {
        bdf: String,
        iommufd: u32,
    },
    /// IOMMU_IOAS_ALLOC; answers `ioas`.
    IoasAlloc {
        iommufd: u32,
    },
    /// VFIO_DEVICE_ATTACH_IOMMUFD_PT of a cdev device to an IOAS.
    IoasAttach {
        device: u32,
        ioas: u32,
    },
    /// `length` bytes of fresh zeroed agent memory mapped read-write at `iova`
    /// (IOMMU_IOAS_MAP, FIXED_IOVA); answers `dma_memory`.
    IoasMapMemory {
        iommufd: u32,
        ioas: u32,
        iova: u64,
        length: u64,
    },
    /// IOMMU_IOAS_MAP_FILE of a dma-buf handle: [`start`, `start + length`) of the dma-buf
    /// mapped read-write at `iova` (FIXED_IOVA).
    IoasMapDmabuf {
        iommufd: u32,
        ioas: u32,
        dmabuf: u32,
        #[serde(default)]
        start: u64,
        length: u64,
        iova: u64,
    },
    /// IOMMU_IOAS_UNMAP of [`iova`, `iova + length`); answers `value` with the bytes the
    /// kernel unmapped.
    IoasUnmap {
        iommufd: u32,
        ioas: u32,
        iova: u64,
        length: u64,
    },
    /// IOMMU_DESTROY of an iommufd object (an IOAS) by its id. (Not `id`: that is the
    /// request's own field, which an op's fields share a JSON object with.)
    IommufdDestroy {
        iommufd: u32,
        object: u32,
    },
    /// Write bytes (hex) into agent DMA memory at `offset`.
    DmaMemoryWrite {
        memory: u32,
        offset: u64,
        data: String,
    },
    /// Read `length` bytes of agent DMA memory at `offset`; answers `bytes` (hex).
    DmaMemoryRead {
        memory: u32,
        offset: u64,
        length: u64,
    },
    /// Release agent DMA memory (iommufd keeps pages it still maps pinned).
    DmaMemoryFree {
        memory: u32,
    },
    /// One transfer of QEMU's edu device (an open VFIO device handle): `count` bytes between
    /// the bus address `iova` and offset `buffer` of edu's 4 KiB buffer, in `direction`;
    /// waits up to `timeout_ms` for the engine to finish (edu runs it 100 ms of virtual time
    /// after the command). Answers `done` with the reply stamped when it finished.
    EduDma {
        device: u32,
        direction: EduDirection,
        iova: u64,
        #[serde(default)]
        buffer: u64,
        count: u64,
        #[serde(default = "default_edu_timeout")]
        timeout_ms: u64,
    },

    // Networking.
    /// Set `addr`/`prefix` (IPv4) on `ifname` and bring it up (SIOCSIFADDR, SIOCSIFNETMASK,
    /// SIOCSIFFLAGS IFF_UP).
    NetUp {
        ifname: String,
        addr: String,
        prefix: u8,
    },
    /// A permanent neighbour entry `ip` -> `mac` ("52:54:00:12:34:56") on `ifname`
    /// (RTM_NEWNEIGH, NUD_PERMANENT, replacing an existing entry), so rxe's RTR needs no ARP.
    NeighAdd {
        ifname: String,
        ip: String,
        mac: String,
    },
    /// `rdma link add NAME type rxe netdev NETDEV` through RDMA netlink (RDMA_NLDEV_CMD_NEWLINK).
    RdmaLinkAdd {
        name: String,
        netdev: String,
    },

    // RDMA verbs (libibverbs with the guest's rxe provider). Handles as for VFIO devices.
    /// Open an RDMA device by name (e.g. "rxe0"); answers `rdma_context`.
    RdmaOpen {
        name: String,
    },
    /// Close a device context; refused (EBUSY) while PDs or CQs of it are open.
    RdmaClose {
        context: u32,
    },
    /// The RoCE v2 GID of port 1 that holds an IPv4 address (::ffff:a.b.c.d) and its index,
    /// found by type and value in the GID table; answers `gid`.
    RdmaGid {
        context: u32,
    },
    AllocPd {
        context: u32,
    },
    /// Refused (EBUSY) while QPs or MRs of the PD are open.
    DeallocPd {
        pd: u32,
    },
    CreateCq {
        context: u32,
        #[serde(default = "default_cq_entries")]
        entries: u32,
    },
    /// Refused (EBUSY) while a QP uses the CQ.
    DestroyCq {
        cq: u32,
    },
    /// An RC QP; answers `qp` with its number.
    CreateQp {
        pd: u32,
        send_cq: u32,
        recv_cq: u32,
        #[serde(default = "default_queue_depth")]
        max_send_wr: u32,
        #[serde(default = "default_queue_depth")]
        max_recv_wr: u32,
    },
    DestroyQp {
        qp: u32,
    },
    /// RESET -> INIT on port 1, P_Key index 0, with these remote access rights.
    QpInit {
        qp: u32,
        #[serde(default = "default_port_access")]
        access: Vec<Access>,
    },
    /// INIT -> RTR towards the remote QP. `remote_gid` is an IPv6 address or an IPv4 one
    /// (taken as ::ffff:a.b.c.d); `path_mtu` in bytes (256..4096); `gid_index` defaults to
    /// the RoCE v2 IPv4 GID that `rdma_gid` finds.
    QpRtr {
        qp: u32,
        remote_qpn: u32,
        remote_psn: u32,
        remote_gid: String,
        #[serde(default = "default_path_mtu")]
        path_mtu: u32,
        #[serde(default)]
        gid_index: Option<u32>,
        #[serde(default = "one")]
        max_dest_rd_atomic: u8,
        #[serde(default = "default_min_rnr_timer")]
        min_rnr_timer: u8,
    },
    /// RTR -> RTS with our send PSN.
    QpRts {
        qp: u32,
        psn: u32,
        #[serde(default = "default_timeout")]
        timeout: u8,
        #[serde(default = "seven")]
        retry_cnt: u8,
        #[serde(default = "seven")]
        rnr_retry: u8,
        #[serde(default = "one")]
        max_rd_atomic: u8,
    },
    /// Any state -> RESET (e.g. to recover a QP in ERROR).
    QpReset {
        qp: u32,
    },
    /// Any state -> ERROR: the provider flushes the QP's outstanding work requests with
    /// IBV_WC_WR_FLUSH_ERR, and responses that still arrive for it meet a QP in error.
    QpError {
        qp: u32,
    },
    /// ibv_query_qp: number, state and PSNs; answers `qp_state`.
    QpQuery {
        qp: u32,
    },
    /// Register `length` bytes of fresh zeroed agent memory; answers `mr`.
    RegMr {
        pd: u32,
        length: u64,
        #[serde(default = "default_mr_access")]
        access: Vec<Access>,
    },
    /// ibv_reg_dmabuf_mr on an exported dma-buf handle; answers `mr` (addr = iova).
    RegDmabufMr {
        pd: u32,
        dmabuf: u32,
        offset: u64,
        length: u64,
        iova: u64,
        #[serde(default = "default_mr_access")]
        access: Vec<Access>,
    },
    DeregMr {
        mr: u32,
    },
    /// Write bytes (hex) into an agent-memory MR at `offset`.
    MrWrite {
        mr: u32,
        offset: u64,
        data: String,
    },
    /// Read `length` bytes of an agent-memory MR at `offset`; answers `bytes` (hex).
    MrRead {
        mr: u32,
        offset: u64,
        length: u64,
    },
    /// Post one work request with one local SGE (`mr`, `offset`, `length`; no SGE when `mr`
    /// is absent, for zero-length operations). RDMA WRITE/READ use `remote_addr` and `rkey`.
    PostSend {
        qp: u32,
        wr_id: u64,
        opcode: SendOpcode,
        #[serde(default)]
        mr: Option<u32>,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        length: u32,
        #[serde(default)]
        remote_addr: u64,
        #[serde(default)]
        rkey: u32,
        #[serde(default = "yes")]
        signaled: bool,
    },
    /// Post one receive into (`mr`, `offset`, `length`).
    PostRecv {
        qp: u32,
        wr_id: u64,
        mr: u32,
        #[serde(default)]
        offset: u64,
        length: u32,
    },
    /// Poll until `count` completions arrived or `timeout_ms` passed (0: poll once); answers
    /// `completions` with what arrived, possibly fewer or none.
    PollCq {
        cq: u32,
        #[serde(default = "one_u32")]
        count: u32,
        #[serde(default)]
        timeout_ms: u64,
    },
}

/// One work completion (struct ibv_wc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub wr_id: u64,
    /// enum ibv_wc_status (0 success, 10 remote access error, 12 retry exceeded, ...).
    pub status: u32,
    /// ibv_wc_status_str() of it.
    pub status_name: String,
    pub vendor_err: u32,
    /// enum ibv_wc_opcode (0 send, 1 rdma write, 2 rdma read, 128 recv, ...).
    pub opcode: u32,
    pub opcode_name: String,
    pub byte_len: u32,
    pub qp_num: u32,
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
    RdmaContext {
        context: u32,
    },
    Gid {
        /// IPv6 notation, e.g. "::ffff:10.0.2.15".
        gid: String,
        index: u32,
    },
    Pd {
        pd: u32,
    },
    Cq {
        cq: u32,
    },
    Qp {
        qp: u32,
        qpn: u32,
    },
    QpState {
        qpn: u32,
        /// "reset", "init", "rtr", "rts", "sqd", "sqe", "error" or "unknown".
        state: String,
        sq_psn: u32,
        rq_psn: u32,
        dest_qpn: u32,
    },
    Mr {
        mr: u32,
        lkey: u32,
        rkey: u32,
        /// The address remote peers use (the buffer's virtual address, or the iova).
        addr: u64,
        length: u64,
    },
    Bytes {
        /// Lower-case hex.
        data: String,
    },
    Completions {
        completions: Vec<Completion>,
    },
    Iommufd {
        iommufd: u32,
    },
    /// A VFIO device opened through its cdev and bound to an iommufd: the device handle and
    /// the iommufd device id the kernel gave it.
    CdevDevice {
        device: u32,
        dev_id: u32,
    },
    Ioas {
        ioas: u32,
    },
    DmaMemory {
        memory: u32,
    },
}

/// The line the agent writes on the port once it is ready to serve requests.
pub const READY_BANNER: &str = "p2prig-agent ready";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_line, encode_line, Request};

    /// An op's fields share one JSON object with the request's `id` and `op`: a field of
    /// either name would be read as the request's own and the request would not decode.
    #[test]
    fn iommufd_and_edu_ops_round_trip_inside_a_request() {
        let ops = [
            AgentOp::VfioLowPower {
                device: 1,
                enter: true,
            },
            AgentOp::IommufdOpen,
            AgentOp::IommufdClose { iommufd: 2 },
            AgentOp::VfioCdevOpen {
                bdf: "0000:04:00.0".into(),
                iommufd: 2,
            },
            AgentOp::IoasAlloc { iommufd: 2 },
            AgentOp::IoasAttach { device: 1, ioas: 3 },
            AgentOp::IoasMapMemory {
                iommufd: 2,
                ioas: 3,
                iova: 0x10_0000,
                length: 0x2000,
            },
            AgentOp::IoasMapDmabuf {
                iommufd: 2,
                ioas: 3,
                dmabuf: 4,
                start: 0,
                length: 0x1000,
                iova: 0x20_0000,
            },
            AgentOp::IoasUnmap {
                iommufd: 2,
                ioas: 3,
                iova: 0x20_0000,
                length: 0x1000,
            },
            AgentOp::IommufdDestroy {
                iommufd: 2,
                object: 5,
            },
            AgentOp::DmaMemoryWrite {
                memory: 1,
                offset: 8,
                data: "07".into(),
            },
            AgentOp::DmaMemoryRead {
                memory: 1,
                offset: 8,
                length: 1,
            },
            AgentOp::DmaMemoryFree { memory: 1 },
            AgentOp::EduDma {
                device: 6,
                direction: EduDirection::EduToIova,
                iova: 0x20_1008,
                buffer: 0,
                count: 8,
                timeout_ms: 5000,
            },
        ];
        for op in ops {
            let request = Request { id: 77, op };
            let line = encode_line(&request);
            let back: Request<AgentOp> = decode_line(&line)
                .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&line)));
            assert_eq!(back, request);
        }
    }
}
