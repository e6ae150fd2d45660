//! How an op is named: the sentence that prefixes its errors and log lines, and which ops are
//! too frequent to log.

use p2prig_protocol::agent::{AgentOp, DmabufUapi};

/// A sentence naming the operation and its arguments, the prefix of every error message.
pub fn describe(op: &AgentOp) -> String {
    // Every op by name, no wildcard: a new op without a sentence is a compile error.
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
        AgentOp::VfioLowPower { device, enter } => format!(
            "vfio_low_power device {device} {}",
            if *enter { "entry" } else { "exit" }
        ),
        // iommufd and edu.
        AgentOp::IommufdOpen => "iommufd_open".into(),
        AgentOp::IommufdClose { iommufd } => format!("iommufd_close iommufd {iommufd}"),
        AgentOp::VfioCdevOpen { bdf, iommufd } => {
            format!("vfio_cdev_open {bdf} iommufd {iommufd}")
        }
        AgentOp::IoasAlloc { iommufd } => format!("ioas_alloc iommufd {iommufd}"),
        AgentOp::IoasAttach { device, ioas } => format!("ioas_attach device {device} ioas {ioas}"),
        AgentOp::IoasMapMemory {
            iommufd,
            ioas,
            iova,
            length,
        } => format!("ioas_map_memory iommufd {iommufd} ioas {ioas} iova {iova:#x} length {length:#x}"),
        AgentOp::IoasMapDmabuf {
            iommufd,
            ioas,
            dmabuf,
            start,
            length,
            iova,
        } => format!(
            "ioas_map_dmabuf iommufd {iommufd} ioas {ioas} dmabuf {dmabuf} start {start:#x} length {length:#x} iova {iova:#x}"
        ),
        AgentOp::IoasUnmap {
            iommufd,
            ioas,
            iova,
            length,
        } => format!("ioas_unmap iommufd {iommufd} ioas {ioas} iova {iova:#x} length {length:#x}"),
        AgentOp::IommufdDestroy { iommufd, object } => {
            format!("iommufd_destroy iommufd {iommufd} object {object}")
        }
        AgentOp::DmaMemoryWrite {
            memory,
            offset,
            data,
        } => format!(
            "dma_memory_write memory {memory} offset {offset:#x} ({} hex digits)",
            data.len()
        ),
        AgentOp::DmaMemoryRead {
            memory,
            offset,
            length,
        } => format!("dma_memory_read memory {memory} offset {offset:#x} length {length}"),
        AgentOp::DmaMemoryFree { memory } => format!("dma_memory_free memory {memory}"),
        AgentOp::EduDma {
            device,
            direction,
            iova,
            buffer,
            count,
            timeout_ms,
        } => format!(
            "edu_dma device {device} {direction:?} iova {iova:#x} buffer {buffer:#x} count {count} timeout {timeout_ms} ms"
        ),
        // Networking and verbs.
        AgentOp::NetUp {
            ifname,
            addr,
            prefix,
        } => format!("net_up {ifname} {addr}/{prefix}"),
        AgentOp::NeighAdd { ifname, ip, mac } => format!("neigh_add {ip} lladdr {mac} dev {ifname}"),
        AgentOp::RdmaLinkAdd { name, netdev } => {
            format!("rdma_link_add {name} type rxe netdev {netdev}")
        }
        AgentOp::RdmaOpen { name } => format!("rdma_open {name}"),
        AgentOp::RdmaClose { context } => format!("rdma_close context {context}"),
        AgentOp::RdmaGid { context } => format!("rdma_gid context {context}"),
        AgentOp::AllocPd { context } => format!("alloc_pd context {context}"),
        AgentOp::DeallocPd { pd } => format!("dealloc_pd pd {pd}"),
        AgentOp::CreateCq { context, entries } => {
            format!("create_cq context {context} entries {entries}")
        }
        AgentOp::DestroyCq { cq } => format!("destroy_cq cq {cq}"),
        AgentOp::CreateQp {
            pd,
            send_cq,
            recv_cq,
            max_send_wr,
            max_recv_wr,
        } => format!(
            "create_qp pd {pd} send_cq {send_cq} recv_cq {recv_cq} max_send_wr {max_send_wr} max_recv_wr {max_recv_wr}"
        ),
        AgentOp::DestroyQp { qp } => format!("destroy_qp qp {qp}"),
        AgentOp::QpInit { qp, access } => format!("qp_init qp {qp} access {access:?}"),
        AgentOp::QpRtr {
            qp,
            remote_qpn,
            remote_psn,
            remote_gid,
            path_mtu,
            gid_index,
            ..
        } => format!(
            "qp_rtr qp {qp} remote_qpn {remote_qpn:#x} remote_psn {remote_psn:#x} remote_gid {remote_gid} path_mtu {path_mtu} gid_index {gid_index:?}"
        ),
        AgentOp::QpRts { qp, psn, .. } => format!("qp_rts qp {qp} psn {psn:#x}"),
        AgentOp::QpReset { qp } => format!("qp_reset qp {qp}"),
        AgentOp::QpError { qp } => format!("qp_error qp {qp}"),
        AgentOp::QpQuery { qp } => format!("qp_query qp {qp}"),
        AgentOp::RegMr { pd, length, access } => {
            format!("reg_mr pd {pd} length {length:#x} access {access:?}")
        }
        AgentOp::RegDmabufMr {
            pd,
            dmabuf,
            offset,
            length,
            iova,
            access,
        } => format!(
            "reg_dmabuf_mr pd {pd} dmabuf {dmabuf} offset {offset:#x} length {length:#x} iova {iova:#x} access {access:?}"
        ),
        AgentOp::DeregMr { mr } => format!("dereg_mr mr {mr}"),
        AgentOp::MrWrite { mr, offset, data } => {
            format!("mr_write mr {mr} offset {offset:#x} ({} hex digits)", data.len())
        }
        AgentOp::MrRead { mr, offset, length } => {
            format!("mr_read mr {mr} offset {offset:#x} length {length}")
        }
        AgentOp::PostSend {
            qp,
            wr_id,
            opcode,
            mr,
            offset,
            length,
            remote_addr,
            rkey,
            signaled,
        } => format!(
            "post_send qp {qp} wr_id {wr_id} {opcode:?} mr {mr:?} offset {offset:#x} length {length} remote_addr {remote_addr:#x} rkey {rkey:#x} signaled {signaled}"
        ),
        AgentOp::PostRecv {
            qp,
            wr_id,
            mr,
            offset,
            length,
        } => format!("post_recv qp {qp} wr_id {wr_id} mr {mr} offset {offset:#x} length {length}"),
        AgentOp::PollCq {
            cq,
            count,
            timeout_ms,
        } => format!("poll_cq cq {cq} count {count} timeout {timeout_ms} ms"),
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
            | AgentOp::DmaMemoryRead { .. }
            | AgentOp::DmaMemoryWrite { .. }
            | AgentOp::PostSend { .. }
            | AgentOp::PostRecv { .. }
            | AgentOp::PollCq { .. }
            | AgentOp::QpQuery { .. }
    )
}
