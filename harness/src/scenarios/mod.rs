//! The scenario registry: what each scenario checks, which kernels it is expected to fail on
//! and why, and how an outcome is judged against that expectation.

pub mod boot_check;
pub mod cmb;
pub mod device_identity;
pub mod doorbell;
pub mod export_args;
pub mod iommufd;
pub mod iommufd_revoke;
pub mod late_responses;
pub mod map_leak;
pub mod oracles;
pub mod p2p_path;
pub mod races;
pub mod remote;
pub mod revoke;
pub mod smoke;
pub mod steps;
pub mod stray_command;
pub mod windows;

use anyhow::{bail, Result};
use serde::Serialize;

use p2prig_protocol::agent::DmabufUapi;

use crate::rig::{Rig, RigShape};
use crate::run::checks::CheckId;
use crate::run::report::Suite;

pub use crate::run::expectations::{Expect, Target};

/// Everything a scenario knows about the kernel it runs on.
#[derive(Debug, Clone)]
pub struct ScenarioEnv {
    pub uapi: DmabufUapi,
    /// The kernel is a debug build (KASAN, kmemleak, lockdep): the debug variant of a flavor
    /// or of a user's tree, or a user's image with KASAN and kmemleak in its config.
    pub debug: bool,
    /// Seeds the scenarios with random timing (release-races).
    pub seed: u64,
    /// Kernel reports the user declared noise (`--allow-splat`).
    pub allowed_splats: crate::rig::console::AllowedSplats,
    /// How the guest runs: under KVM it has the host's CPU (`-cpu host`), which decides
    /// whether the kernel lets P2P DMA cross the host bridge (p2p-path).
    pub accel: crate::rig::Accel,
}

pub type RunFn = fn(&mut Rig, &ScenarioEnv, &mut Suite) -> Result<()>;

#[derive(Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub summary: &'static str,
    /// Runs only on debug kernels (KASAN, kmemleak, lockdep); skipped elsewhere.
    pub needs_debug: bool,
    /// Whose dma-buf import the scenario exercises; it decides the machine it boots.
    pub importer: Importer,
    pub run: RunFn,
}

/// The dma-buf importer a scenario drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Importer {
    /// None: the exporter alone, the device or plain verbs.
    None,
    /// p2prig's rxe importer (ibv_reg_dmabuf_mr), in kernel-patches/rxe-dmabuf-*.
    Rxe,
    /// Linux 7.x's iommufd (IOMMU_IOAS_MAP_FILE), reached through the vIOMMU by edu's DMA.
    Iommufd,
}

impl Importer {
    pub fn name(self) -> &'static str {
        match self {
            Importer::None => "-",
            Importer::Rxe => "rxe",
            Importer::Iommufd => "iommufd",
        }
    }

    /// The machine the importer needs (rig/shape.rs says why one boot cannot host both).
    pub fn shape(self) -> RigShape {
        match self {
            Importer::Iommufd => RigShape::Viommu,
            Importer::None | Importer::Rxe => RigShape::Switch,
        }
    }
}

/// Every scenario, in the order a run executes them.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "boot-check",
        summary: "the kernel answers, vfio-pci binds nvme-cmb, rxe0 comes up on eth0, a CMB slice \
                  (BAR2 0x1000, 8 KiB) exports as an 8192-byte dma-buf; debug builds start KASAN \
                  and kmemleak; no kernel report since boot",
        needs_debug: false,
        importer: Importer::None,
        run: crate::scenarios::boot_check::run,
    },
    Scenario {
        name: "smoke",
        summary: "BAR0's doorbell page exports as a 4096-byte dma-buf, an unaligned slice is \
                  EINVAL, a guest write of 5 to SQ0TDBL lands exactly once in nvme-cmb",
        needs_debug: false,
        importer: Importer::None,
        run: crate::scenarios::smoke::run,
    },
    Scenario {
        name: "device-identity",
        summary: "the guest sees nvme-cmb's class code, 64-bit BARs, CMB registers naming BAR2 \
                  and FLR among its reset methods; a sysfs reset reaches the device as an FLR",
        needs_debug: false,
        importer: Importer::None,
        run: crate::scenarios::device_identity::run,
    },
    Scenario {
        name: "export-args",
        summary: "whole BARs and page-aligned slices export with the requested size; unaligned, \
                  out-of-range, overflowing, ROM/config/absent-BAR and zero-length arguments give EINVAL",
        needs_debug: false,
        importer: Importer::None,
        run: crate::scenarios::export_args::run,
    },
    Scenario {
        name: "p2p-doorbell",
        summary: "rxe imports BAR0's doorbell page as a dma-buf MR; an 8-byte RDMA WRITE of 7 at \
                  SQ1TDBL from a loopback QP lands as exactly that write in nvme-cmb",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::doorbell::run_doorbell,
    },
    Scenario {
        name: "p2p-path",
        summary: "a dma-buf MR of the doorbell page through rxe1 on eth1, a NIC under a root \
                  port of its own (no P2P path to nvme-cmb: only q35's host bridge, not on \
                  pci_p2pdma's whitelist, joins them) is refused as unsupported (EOPNOTSUPP at \
                  attach, or EINVAL from 7.3's map), without a BAR access",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::p2p_path::run,
    },
    Scenario {
        name: "slice-routing",
        summary: "a write at offset k of a CMB-slice MR (BAR2 0x1000, 8 KiB) lands at BAR2 \
                  0x1000 + k in nvme-cmb, and nowhere else",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::cmb::run_slice_routing,
    },
    Scenario {
        name: "cmb-roundtrip",
        summary: "RDMA READ of a CMB-slice MR returns the pattern nvme-cmb filled; an RDMA WRITE \
                  into it shows up in the device's CMB, byte-exact",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::cmb::run_cmb_roundtrip,
    },
    Scenario {
        name: "stray-command-write",
        summary: "setting bus-master in PCI_COMMAND (decode stays on) does not disturb a live \
                  importer: its next write lands",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::stray_command::run_stray_command_write,
    },
    Scenario {
        name: "remote-doorbell",
        summary: "roce-target, the remote RDMA peer, writes 7 (8 bytes) over RoCEv2 into the \
                  guest's dma-buf MR at SQ1TDBL; nvme-cmb logs exactly that doorbell write",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::remote::run_remote_doorbell,
    },
    Scenario {
        name: "remote-verbs",
        summary: "roce-target WRITEs into and READs back an ordinary guest MR, SENDs into a posted \
                  receive; a WRITE with a deregistered rkey is NAKed 0x62 and errors its QP; the \
                  capture decodes with tshark",
        needs_debug: false,
        importer: Importer::None,
        run: crate::scenarios::remote::run_remote_verbs,
    },
    Scenario {
        name: "revoke-on-vfio-reset",
        summary: "a write posted into the MR while VFIO_DEVICE_RESET is held open gets a remote \
                  access error and never reaches the device; after the reset a new QP's write lands",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::revoke::run_revoke_on_vfio_reset,
    },
    Scenario {
        name: "revoke-on-flr",
        summary: "the same with an FLR initiated through the PCIe Device Control register",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::revoke::run_revoke_on_flr,
    },
    Scenario {
        name: "revoke-on-hot-reset",
        summary: "the same with VFIO_DEVICE_PCI_HOT_RESET (secondary bus reset at the switch's \
                  downstream port)",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::revoke::run_revoke_on_hot_reset,
    },
    Scenario {
        name: "revoke-on-mem-disable",
        summary: "the same with PCI_COMMAND memory decode cleared, then set again",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::revoke::run_revoke_on_mem_disable,
    },
    Scenario {
        name: "revoke-on-d3",
        summary: "the same with PMCSR D3hot, then D0",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::revoke::run_revoke_on_d3,
    },
    Scenario {
        name: "revoke-on-low-power",
        summary: "the same with VFIO's LOW_POWER_ENTRY (runtime PM takes the function to D3hot), \
                  then LOW_POWER_EXIT",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::revoke::run_revoke_on_low_power,
    },
    Scenario {
        name: "revoke-on-close",
        summary: "closing the VFIO device fd with the dma-buf and its MR kept: the next write \
                  gets a remote access error, nothing reaches the device, the MR deregisters \
                  cleanly and the console stays free of oopses",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::revoke::run_revoke_on_close,
    },
    Scenario {
        name: "late-responses",
        summary: "roce-target holds the ACKs of 8 RDMA WRITEs it executed while the guest moves \
                  its requester QP to the error state (every WRITE flushed); released, the ACKs \
                  reach the QP in error, which stays there and completes nothing more; the \
                  console stays clean (rxe's completer drops them)",
        needs_debug: false,
        importer: Importer::None,
        run: crate::scenarios::late_responses::run,
    },
    Scenario {
        name: "release-races",
        summary: "an MR's deregistration (the importer's detach, and with the dma-buf fd closed \
                  first its release) raced against the device fd closing, a VFIO_DEVICE_RESET \
                  and decode coming back on (re-map), 40 iterations at seeded points of each \
                  operation's measured duration: every call succeeds, no BAR access, no kernel \
                  report, and a new MR works afterwards",
        needs_debug: false,
        importer: Importer::Rxe,
        run: crate::scenarios::races::run,
    },
    Scenario {
        name: "map-leak",
        summary: "32 dma-buf MR registrations (map) and deregistrations (unmap) of the doorbell \
                  page and 16 revoke/re-map cycles (decode off/on) of a registered one, which \
                  then still works; a kmemleak scan finds nothing (debug variant only)",
        needs_debug: true,
        importer: Importer::Rxe,
        run: crate::scenarios::map_leak::run_map_leak,
    },
    Scenario {
        name: "iommufd-doorbell",
        summary: "iommufd maps BAR0's doorbell page (IOMMU_IOAS_MAP_FILE of the dma-buf) into an IOAS edu is attached to; edu's 8-byte DMA of 7 to its IOVA + 8 is exactly that write at SQ1TDBL in nvme-cmb, and no DMAR fault",
        needs_debug: false,
        importer: Importer::Iommufd,
        run: crate::scenarios::iommufd::run_doorbell,
    },
    Scenario {
        name: "iommufd-cmb",
        summary: "4 KiB through edu into a CMB-slice mapping (BAR2 0x1000) shows up in the device's CMB byte-exact; edu's read of the slice returns the device's pattern into agent memory",
        needs_debug: false,
        importer: Importer::Iommufd,
        run: crate::scenarios::iommufd::run_cmb,
    },
    Scenario {
        name: "iommufd-revoke-on-vfio-reset",
        summary: "VFIO_DEVICE_RESET held open: while the window is held open, edu's DMA to the doorbell page's IOVA reaches nothing and the vIOMMU faults it; after the restore the old mapping stays dead, and unmap plus a fresh IOMMU_IOAS_MAP_FILE lands again",
        needs_debug: false,
        importer: Importer::Iommufd,
        run: crate::scenarios::iommufd_revoke::run_on_vfio_reset,
    },
    Scenario {
        name: "iommufd-revoke-on-flr",
        summary: "an FLR through Device Control, held open: while the window is held open, edu's DMA to the doorbell page's IOVA reaches nothing and the vIOMMU faults it; after the restore the old mapping stays dead, and unmap plus a fresh IOMMU_IOAS_MAP_FILE lands again",
        needs_debug: false,
        importer: Importer::Iommufd,
        run: crate::scenarios::iommufd_revoke::run_on_flr,
    },
    Scenario {
        name: "iommufd-revoke-on-hot-reset",
        summary: "VFIO_DEVICE_PCI_HOT_RESET (QEMU stops the guest during the bus reset, so only the after-restore checks apply): while the window is held open, edu's DMA to the doorbell page's IOVA reaches nothing and the vIOMMU faults it; after the restore the old mapping stays dead, and unmap plus a fresh IOMMU_IOAS_MAP_FILE lands again",
        needs_debug: false,
        importer: Importer::Iommufd,
        run: crate::scenarios::iommufd_revoke::run_on_hot_reset,
    },
    Scenario {
        name: "iommufd-revoke-on-mem-disable",
        summary: "PCI_COMMAND memory decode off, then on: while the window is held open, edu's DMA to the doorbell page's IOVA reaches nothing and the vIOMMU faults it; after the restore the old mapping stays dead, and unmap plus a fresh IOMMU_IOAS_MAP_FILE lands again",
        needs_debug: false,
        importer: Importer::Iommufd,
        run: crate::scenarios::iommufd_revoke::run_on_mem_disable,
    },
    Scenario {
        name: "iommufd-revoke-on-d3",
        summary: "PMCSR D3hot, then D0: while the window is held open, edu's DMA to the doorbell page's IOVA reaches nothing and the vIOMMU faults it; after the restore the old mapping stays dead, and unmap plus a fresh IOMMU_IOAS_MAP_FILE lands again",
        needs_debug: false,
        importer: Importer::Iommufd,
        run: crate::scenarios::iommufd_revoke::run_on_d3,
    },
    Scenario {
        name: "iommufd-revoke-on-low-power",
        summary: "VFIO LOW_POWER_ENTRY, then EXIT: while the window is held open, edu's DMA to the doorbell page's IOVA reaches nothing and the vIOMMU faults it; after the restore the old mapping stays dead, and unmap plus a fresh IOMMU_IOAS_MAP_FILE lands again",
        needs_debug: false,
        importer: Importer::Iommufd,
        run: crate::scenarios::iommufd_revoke::run_on_low_power,
    },
    Scenario {
        name: "iommufd-revoke-on-close",
        summary: "closing nvme-cmb's VFIO cdev with the dma-buf mapped: edu's next DMA reaches nothing and faults; the dead area unmaps, and a new IOMMU_IOAS_MAP_FILE of the dma-buf is refused with ENODEV",
        needs_debug: false,
        importer: Importer::Iommufd,
        run: crate::scenarios::iommufd_revoke::run_on_close,
    },
    Scenario {
        name: "iommufd-map-while-revoked",
        summary: "IOMMU_IOAS_MAP_FILE of a dma-buf whose function has memory decode off, or is held in a VFIO reset, fails with ENODEV; after the restore it maps and edu's write lands",
        needs_debug: false,
        importer: Importer::Iommufd,
        run: crate::scenarios::iommufd::run_map_while_revoked,
    },
    Scenario {
        name: "iommufd-races",
        summary: "iommufd's releases (IOAS unmap, IOAS destroy, the dma-buf fd's close) raced \
                  against the device fd closing, a VFIO_DEVICE_RESET, decode coming back on and \
                  each other, 70 iterations at seeded points of each operation's measured \
                  duration: every call succeeds, no BAR access, no kernel report, and a fresh \
                  mapping works afterwards",
        needs_debug: false,
        importer: Importer::Iommufd,
        run: crate::scenarios::races::iommufd::run,
    },
    Scenario {
        name: "iommufd-map-leak",
        summary: "32 IOMMU_IOAS_MAP_FILE/UNMAP pairs of the doorbell page's dma-buf and 16 map, \
                  revoke (decode off/on), unmap cycles, after which a fresh mapping still works; a \
                  kmemleak scan finds nothing (debug variant only)",
        needs_debug: true,
        importer: Importer::Iommufd,
        run: crate::scenarios::iommufd::run_map_leak,
    },
];

/// Scenarios whose name matches `pattern` (`*` matches any run of characters; a comma
/// separates alternatives).
pub fn select(pattern: &str) -> Result<Vec<&'static Scenario>> {
    let chosen: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| pattern.split(',').any(|p| glob_match(p.trim(), s.name)))
        .collect();
    if chosen.is_empty() {
        let known: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        bail!(
            "no scenario matches `{pattern}`; known: {} (`p2prig list` describes them)",
            known.join(", ")
        );
    }
    Ok(chosen)
}

pub fn glob_match(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && glob_match(rest, &tail[i..]))
        }
    }
}

/// How one scenario ran on one kernel, judged against its expectation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Expected to pass and passed.
    Pass,
    /// Expected to fail and failed: the known defect was reproduced.
    ExpectedFail,
    /// The outcome differs from the expectation (in either direction).
    Mismatch,
    /// Not run: the rig could not provide what it needs.
    Skipped,
}

impl Verdict {
    /// `failed` names the checks that failed (none: the scenario passed).
    pub fn judge(expect: Expect, failed: &[CheckId], strict: bool) -> Self {
        match (expect, failed.is_empty()) {
            (Expect::Pass, true) => Verdict::Pass,
            (Expect::Fail(defect), false)
                if !strict && failed.iter().any(|c| defect.shows_as.contains(c)) =>
            {
                Verdict::ExpectedFail
            }
            _ => Verdict::Mismatch,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::ExpectedFail => "expected-fail",
            Verdict::Mismatch => "MISMATCH",
            Verdict::Skipped => "skipped",
        }
    }

    pub fn is_ok(self) -> bool {
        matches!(
            self,
            Verdict::Pass | Verdict::ExpectedFail | Verdict::Skipped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match("revoke-*", "revoke-on-flr"));
        assert!(glob_match("*", "smoke"));
        assert!(glob_match("*-on-*", "revoke-on-d3"));
        assert!(!glob_match("revoke-*", "smoke"));
        assert!(!glob_match("smok", "smoke"));
        assert!(glob_match("smoke", "smoke"));
    }

    #[test]
    fn selecting_nothing_is_an_error_naming_the_known_scenarios() {
        let err = select("nope-*")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("smoke"), "{err}");
        assert!(select("smoke,nope").is_ok());
    }

    #[test]
    fn verdicts_follow_expectations_in_both_directions() {
        use crate::run::checks::{
            IMPORTER_MAPS_AGAIN_AFTER_RESTORE, SCENARIO_COMPLETED,
            WRITE_IN_WINDOW_GETS_REMOTE_ACCESS_ERROR,
        };
        let defect = Expect::Fail(crate::run::expectations::test_failure(
            "B1",
            &[WRITE_IN_WINDOW_GETS_REMOTE_ACCESS_ERROR],
        ));
        let shown = [
            WRITE_IN_WINDOW_GETS_REMOTE_ACCESS_ERROR,
            IMPORTER_MAPS_AGAIN_AFTER_RESTORE,
        ];
        assert_eq!(Verdict::judge(Expect::Pass, &[], false), Verdict::Pass);
        assert_eq!(
            Verdict::judge(Expect::Pass, &shown, false),
            Verdict::Mismatch
        );
        assert_eq!(Verdict::judge(defect, &shown, false), Verdict::ExpectedFail);
        assert_eq!(
            Verdict::judge(defect, &[], false),
            Verdict::Mismatch,
            "an unexpected pass is a mismatch"
        );
        assert_eq!(
            Verdict::judge(defect, &[SCENARIO_COMPLETED], false),
            Verdict::Mismatch,
            "failing elsewhere (a harness error) is not the defect"
        );
        assert_eq!(
            Verdict::judge(defect, &shown, true),
            Verdict::Mismatch,
            "--strict counts every failure"
        );
    }

    #[test]
    fn scenarios_of_one_shape_run_together_so_a_kernel_boots_each_shape_once() {
        let shapes: Vec<RigShape> = SCENARIOS.iter().map(|s| s.importer.shape()).collect();
        let changes = shapes.windows(2).filter(|w| w[0] != w[1]).count();
        assert_eq!(changes, 1, "{shapes:?}");
        assert!(SCENARIOS
            .iter()
            .filter(|s| s.name.starts_with("iommufd-"))
            .all(|s| s.importer == Importer::Iommufd));
    }

    #[test]
    fn scenario_names_are_unique() {
        let mut names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SCENARIOS.len());
    }
}
