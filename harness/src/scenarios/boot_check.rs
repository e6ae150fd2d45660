//! boot-check: the minimum every flavor and variant must do before any other scenario means
//! anything. The kernel answers with its release, vfio-pci takes nvme-cmb, soft-RoCE comes up
//! on eth0, a CMB slice exports as a dma-buf of the requested size through the flavor's uAPI,
//! a debug build has started KASAN and kmemleak, and the kernel log holds no report.

use std::time::Instant;

use anyhow::{bail, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply};

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::steps::{NVME_CLASS, RPC};
use crate::scenarios::ScenarioEnv;

/// The guest's address on the rig's RDMA network (the same as the P2P scenarios use).
const GUEST_IP: &str = "10.0.2.15";
/// The CMB slice: BAR2 (NVMe 1.4 3.1.11 CMBLOC.BIR), one page in, two pages long.
const CMB_BAR: u32 = 2;
const SLICE_OFFSET: u64 = 0x1000;
const SLICE_LENGTH: u64 = 0x2000;
/// What mm/kasan and mm/kmemleak print once they are running (6.1 and 7.x alike).
const KASAN_BANNER: &str = "KernelAddressSanitizer initialized";
const KMEMLEAK_BANNER: &str = "Kernel memory leak detector initialized";

pub fn run(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    let t = Instant::now();
    let release = match rig.agent_call(AgentOp::Hello, RPC)? {
        Ok(AgentReply::Hello { kernel_release, .. }) => kernel_release,
        other => bail!("hello: {other:?}"),
    };
    suite.record(
        checks::KERNEL_RELEASE,
        !release.trim().is_empty(),
        format!("guest kernel {release}"),
        t.elapsed(),
    );

    let t = Instant::now();
    let bdf = match rig.agent_call(AgentOp::FindPci { class: NVME_CLASS }, RPC)? {
        Ok(AgentReply::Pci { functions }) if functions.len() == 1 => functions[0].clone(),
        other => bail!("expected exactly one NVMe function in the guest: {other:?}"),
    };
    let bind = rig.agent_call(AgentOp::VfioBind { bdf: bdf.clone() }, RPC)?;
    let device = match &bind {
        Ok(_) => match rig.agent_call(AgentOp::VfioOpen { bdf: bdf.clone() }, RPC)? {
            Ok(AgentReply::Device { device }) => Ok(device),
            other => Err(format!("VFIO open: {other:?}")),
        },
        Err(e) => Err(format!("bind: {e}")),
    };
    suite.record(
        checks::VFIO_PCI_BINDS,
        device.is_ok(),
        match &device {
            Ok(_) => format!("{bdf} bound to vfio-pci and opened"),
            Err(why) => format!("{bdf}: {why}"),
        },
        t.elapsed(),
    );

    let t = Instant::now();
    let link = rxe_up(rig)?;
    suite.record(
        checks::RDMA_LINK_ADD_RXE0,
        link.is_ok(),
        link.err().unwrap_or_else(|| "rxe0 on eth0".into()),
        t.elapsed(),
    );

    if let Ok(device) = device {
        let t = Instant::now();
        let export = AgentOp::DmabufExport {
            device,
            bar: CMB_BAR,
            offset: SLICE_OFFSET,
            length: SLICE_LENGTH,
            uapi: env.uapi,
        };
        let (ok, detail) = match rig.agent_call(export, RPC)? {
            Ok(AgentReply::Dmabuf { dmabuf, size }) => {
                let _ = rig.agent_call(AgentOp::DmabufClose { dmabuf }, RPC)?;
                (
                    size == SLICE_LENGTH,
                    format!("dma-buf of {size} bytes, expected {SLICE_LENGTH}"),
                )
            }
            Ok(other) => (false, format!("unexpected reply {other:?}")),
            Err(e) => (false, format!("errno {} ({})", e.errno, e.message)),
        };
        suite.record(
            checks::EXPORT_CMB_SLICE,
            ok,
            format!(
                "BAR{CMB_BAR} {SLICE_OFFSET:#x}+{SLICE_LENGTH:#x} through the {:?} uAPI: {detail}",
                env.uapi
            ),
            t.elapsed(),
        );
        let _ = rig.agent_call(AgentOp::VfioClose { device }, RPC)?;
    }

    let t = Instant::now();
    let dmesg = match rig.agent_call(AgentOp::Dmesg, RPC)? {
        Ok(AgentReply::Text { text }) => text,
        other => bail!("dmesg: {other:?}"),
    };
    let (ok, detail) = judge_checkers(&Checkers::found_in(&dmesg), env.debug);
    suite.record(
        checks::DEBUG_CHECKERS_MATCH_VARIANT,
        ok,
        detail,
        t.elapsed(),
    );
    let found = crate::rig::console::reports(&dmesg, &env.allowed_splats);
    suite.record(
        checks::NO_KERNEL_REPORT_SINCE_BOOT,
        found.first.is_none(),
        found
            .first
            .clone()
            .unwrap_or_else(|| found.allowed_detail()),
        t.elapsed(),
    );
    Ok(())
}

/// eth0 up with the guest's address, then `rdma link add rxe0 type rxe netdev eth0`; a link
/// that exists already (an earlier scenario of this boot) counts.
fn rxe_up(rig: &mut Rig) -> Result<std::result::Result<(), String>> {
    let up = AgentOp::NetUp {
        ifname: "eth0".into(),
        addr: GUEST_IP.into(),
        prefix: 24,
    };
    if let Err(e) = rig.agent_call(up, RPC)? {
        return Ok(Err(format!("eth0 up: {e}")));
    }
    let add = AgentOp::RdmaLinkAdd {
        name: "rxe0".into(),
        netdev: "eth0".into(),
    };
    Ok(match rig.agent_call(add, RPC)? {
        Ok(_) => Ok(()),
        Err(e) if e.errno == libc::EEXIST => Ok(()),
        Err(e) => Err(format!("rdma link add rxe0 type rxe netdev eth0: {e}")),
    })
}

/// Which of the debug variant's checkers announced themselves in the kernel log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Checkers {
    kasan: bool,
    kmemleak: bool,
}

impl Checkers {
    fn found_in(log: &str) -> Self {
        Self {
            kasan: log.contains(KASAN_BANNER),
            kmemleak: log.contains(KMEMLEAK_BANNER),
        }
    }
}

/// A debug build must run both checkers; a tiny one neither (tiny.config keeps them out, so
/// its timings stay comparable).
fn judge_checkers(found: &Checkers, debug: bool) -> (bool, String) {
    let state = |on: bool| if on { "initialized" } else { "absent" };
    let detail = format!(
        "{} build: KASAN {}, kmemleak {}",
        if debug { "debug" } else { "tiny" },
        state(found.kasan),
        state(found.kmemleak)
    );
    let ok = if debug {
        found.kasan && found.kmemleak
    } else {
        !found.kasan && !found.kmemleak
    };
    (ok, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBUG_LOG: &str = "[    0.000000] Linux version 7.3.4\n\
        [    0.912345] KernelAddressSanitizer initialized (generic)\n\
        [    3.100000] kmemleak: Kernel memory leak detector initialized (mem pool available: 15791)\n";

    #[test]
    fn debug_build_needs_both_checkers() {
        let found = Checkers::found_in(DEBUG_LOG);
        assert_eq!(
            found,
            Checkers {
                kasan: true,
                kmemleak: true
            }
        );
        assert!(judge_checkers(&found, true).0);
        let kasan_only = Checkers {
            kasan: true,
            kmemleak: false,
        };
        let (ok, detail) = judge_checkers(&kasan_only, true);
        assert!(!ok);
        assert!(detail.contains("kmemleak absent"), "{detail}");
    }

    #[test]
    fn tiny_build_must_not_carry_checkers() {
        let plain = Checkers::found_in("[    0.0] Linux version 6.1.192\n");
        assert!(judge_checkers(&plain, false).0);
        assert!(!judge_checkers(&plain, true).0);
        assert!(!judge_checkers(&Checkers::found_in(DEBUG_LOG), false).0);
    }
}
