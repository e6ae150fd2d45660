//! p2p-path: an importer that has no peer-to-peer path to nvme-cmb. eth1 is a virtio-net
//! function under a root port of its own on pcie.0, while nvme-cmb sits behind the switch
//! under rp0: the two share only q35's host bridge (8086:29c0), which is not on
//! pci_p2pdma's whitelist, so the kernel's distance calculation (pci_p2pdma_distance_many(),
//! whose verbose form logs "do not share an upstream bridge or whitelisted host bridge")
//! finds no path. A dma-buf MR of the doorbell page registered through rxe1 on eth1 must be
//! refused without touching the BAR, and refused as unsupported:
//! - v1-fixed (v1-fixes/0004): attach returns -EOPNOTSUPP, quietly;
//! - Linux 7.3: attach accepts (it checks peer2peer and revocation only); the map refuses in
//!   dma_buf_phys_vec_to_sgt(), whose pci_p2pdma_map_type() answers NOT_SUPPORTED: -EINVAL;
//! - v1 (the seed, B5): attach runs the distance check, clears attachment->peer2peer and
//!   returns 0; the map then fails with -EPERM, a permission error far from its cause.
//!
//! Under KVM on an AMD Zen host the guest has the host's CPU, and pci_p2pdma allows any
//! path through the host bridge of such a CPU (cpu_supports_p2pdma()): there is nothing to
//! refuse, and the scenario is skipped saying so.

use std::time::Instant;

use anyhow::{bail, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply};

use crate::rig::{Accel, Rig};
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::oracles;
use crate::scenarios::steps::*;
use crate::scenarios::ScenarioEnv;

/// eth1's address: a subnet of its own, nobody to talk to.
const OUTSIDE_IP: &str = "10.0.3.15";

pub fn run(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    if let Some(reason) = host_bridge_allows_p2p(env.accel, &host_cpu()) {
        suite.skip(reason);
        return Ok(());
    }
    with_held(rig, |rig, held| p2p_path(rig, env, suite, held))
}

fn p2p_path(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite, held: &mut Held) -> Result<()> {
    let device = open_device(rig, held)?;
    let dmabuf = export(rig, held, device, 0, PAGE, PAGE, env)?;
    ok(
        rig.agent_call(
            AgentOp::NetUp {
                ifname: "eth1".into(),
                addr: OUTSIDE_IP.into(),
                prefix: 24,
            },
            RPC,
        )?,
        "eth1 up",
    )?;
    let context = rxe_open(rig, "rxe1", "eth1", held)?;
    let pd = alloc_pd(rig, context, held)?;

    let t = Instant::now();
    let log_before = dmesg(rig)?.len();
    let since = last_seq(rig)?;
    let registered = reg_dmabuf_reply(rig, held, pd, dmabuf, 0, PAGE)?;
    let events = events_since(rig, since)?;
    let log = dmesg(rig)?;
    let p2p_lines: Vec<&str> = log
        .get(log_before..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("peer-to-peer") || l.contains("p2pdma"))
        .collect();
    let kernel_said = if p2p_lines.is_empty() {
        "the kernel logged nothing about P2P".to_string()
    } else {
        format!("the kernel logged: {}", p2p_lines.join(" | "))
    };
    let refusal = match registered {
        Ok(AgentReply::Mr { .. }) => None,
        Ok(other) => bail!("reg_dmabuf_mr: unexpected {other:?}"),
        Err(e) => Some(e),
    };
    suite.record(
        checks::REG_DMABUF_MR_WITHOUT_A_P2P_PATH_FAILS,
        refusal.is_some() && events.is_empty(),
        format!(
            "through rxe1 on eth1 (root port rp1, outside the switch): {}; {}; device log: {}",
            match &refusal {
                Some(e) => format!("refused, {e}"),
                None => "registered".into(),
            },
            kernel_said,
            oracles::describe(&events)
        ),
        t.elapsed(),
    );
    let errno = refusal.as_ref().map(|e| e.errno);
    suite.record(
        checks::NO_P2P_PATH_IS_REFUSED_AS_UNSUPPORTED,
        matches!(errno, Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)),
        format!(
            "errno {} ({}): EOPNOTSUPP is a refusing attach, EINVAL 7.3's map finding no P2P \
             mapping type, EPERM an attach that accepted what its map then refuses (B5)",
            errno.map_or("none".into(), |e| e.to_string()),
            errno.map_or("registered", errno_name)
        ),
        std::time::Duration::ZERO,
    );
    Ok(())
}

fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EINVAL => "EINVAL",
        libc::EPERM => "EPERM",
        _ => "another errno",
    }
}

fn dmesg(rig: &mut Rig) -> Result<String> {
    match ok(rig.agent_call(AgentOp::Dmesg, RPC)?, "dmesg")? {
        AgentReply::Text { text } => Ok(text),
        other => bail!("dmesg: unexpected {other:?}"),
    }
}

/// The host CPU's vendor and family, from /proc/cpuinfo (empty when unreadable).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HostCpu {
    pub vendor: String,
    pub family: u32,
}

fn host_cpu() -> HostCpu {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|text| parse_cpuinfo(&text))
        .unwrap_or_default()
}

pub fn parse_cpuinfo(text: &str) -> HostCpu {
    let field = |name: &str| {
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    HostCpu {
        vendor: field("vendor_id").unwrap_or_default(),
        family: field("cpu family")
            .and_then(|f| f.parse().ok())
            .unwrap_or(0),
    }
}

/// Why the guest's kernel would allow P2P through the host bridge, if it would:
/// cpu_supports_p2pdma() (drivers/pci/p2pdma.c) says yes for AMD family 0x17 and later,
/// which the guest is under KVM (`-cpu host`). TCG's `-cpu max` is not such a CPU.
pub fn host_bridge_allows_p2p(accel: Accel, cpu: &HostCpu) -> Option<String> {
    (accel == Accel::Kvm && cpu.vendor == "AuthenticAMD" && cpu.family >= 0x17).then(|| {
        format!(
            "the guest runs on this host's CPU under KVM (AMD family {:#x}), for which \
             pci_p2pdma allows P2P through any host bridge (cpu_supports_p2pdma()): there is \
             no missing path to show; run with --accel tcg",
            cpu.family
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_amd_zen_host_under_kvm_bridges_p2p() {
        let zen = parse_cpuinfo("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n");
        assert_eq!(
            zen,
            HostCpu {
                vendor: "AuthenticAMD".into(),
                family: 25
            }
        );
        assert!(host_bridge_allows_p2p(Accel::Kvm, &zen).is_some());
        assert!(
            host_bridge_allows_p2p(Accel::Tcg, &zen).is_none(),
            "TCG: -cpu max"
        );
        let old = parse_cpuinfo("vendor_id : AuthenticAMD\ncpu family : 21\n");
        assert!(host_bridge_allows_p2p(Accel::Kvm, &old).is_none());
        let intel = parse_cpuinfo("vendor_id : GenuineIntel\ncpu family : 6\n");
        assert!(host_bridge_allows_p2p(Accel::Kvm, &intel).is_none());
        assert_eq!(parse_cpuinfo(""), HostCpu::default());
    }
}
