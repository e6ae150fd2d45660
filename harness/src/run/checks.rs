//! The names of every check a scenario records: one set, so an expected failure in a flavor
//! file can only name a check that exists, and renaming a check here renames it everywhere.
//! Flavor files and kernel-patches/defects.toml are validated against [`ALL`] when loaded.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A check's name. Only the constants below make one: a scenario cannot record a name that
/// expectations could not refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckId(&'static str);

impl CheckId {
    pub fn as_str(self) -> &'static str {
        self.0
    }

    /// The check called `name`, if there is one.
    pub fn named(name: &str) -> Option<CheckId> {
        ALL.iter().copied().find(|c| c.0 == name)
    }
}

impl std::fmt::Display for CheckId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl Serialize for CheckId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

/// Read back from a results.json: only a name this p2prig knows.
impl<'de> Deserialize<'de> for CheckId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        CheckId::named(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown check `{name}`: read these results with the p2prig version that wrote them"
            ))
        })
    }
}

macro_rules! checks {
    ($($id:ident = $name:literal,)*) => {
        $(pub const $id: CheckId = CheckId($name);)*
        /// Every check, in name order.
        pub const ALL: &[CheckId] = &[$($id),*];
    };
}

checks! {
    A_FRESH_MAP_WORKS_AFTER_RESTORE = "a-fresh-map-works-after-restore",
    A_FRESH_MAPPING_WORKS_AFTER_THE_RACES = "a-fresh-mapping-works-after-the-races",
    A_NEW_MR_WORKS_AFTER_THE_RACES = "a-new-mr-works-after-the-races",
    ABSENT_BAR4 = "absent-bar4",
    AGENT_HELLO = "agent-hello",
    BAR_SIZES_AND_TYPES = "bar-sizes-and-types",
    BAR1_UPPER_HALF = "bar1-upper-half",
    BIND_VFIO_PCI = "bind-vfio-pci",
    BOOT = "boot",
    CLASS_CODE = "class-code",
    CMB_REGISTERS_DESCRIBE_BAR2 = "cmb-registers-describe-bar2",
    CMB_SLICE = "cmb-slice",
    CONFIG_INDEX = "config-index",
    DEBUG_CHECKERS_MATCH_VARIANT = "debug-checkers-match-variant",
    DECODE_STAYS_ON = "decode-stays-on",
    DEREG_AFTER_CLOSE_IS_SAFE = "dereg-after-close-is-safe",
    DEVICE_SEES_ONE_DOORBELL_WRITE = "device-sees-one-doorbell-write",
    DMA_IN_WINDOW_FAULTS_AND_REACHES_NOTHING = "dma-in-window-faults-and-reaches-nothing",
    DMA_LANDS_BEFORE_THE_WINDOW = "dma-lands-before-the-window",
    DOORBELL_PAGE = "doorbell-page",
    DOORBELL_WRITE_LANDS = "doorbell-write-lands",
    EDU_READ_RETURNS_THE_CMB = "edu-read-returns-the-cmb",
    EDU_WRITE_LANDS_IN_THE_DOORBELL = "edu-write-lands-in-the-doorbell",
    EDU_WRITE_SHOWS_IN_THE_CMB = "edu-write-shows-in-the-cmb",
    EVERY_RACING_CALL_SUCCEEDED = "every-racing-call-succeeded",
    EXPORT_CMB_SLICE = "export-cmb-slice",
    EXPORT_DOORBELL_PAGE = "export-doorbell-page",
    EXPORT_UNALIGNED_IS_EINVAL = "export-unaligned-is-einval",
    GUEST_CONSOLE_CLEAN = "guest-console-clean",
    GUEST_QP_IN_ERROR_FLUSHES_ITS_WRITES = "guest-qp-in-error-flushes-its-writes",
    IMPORTER_MAPS_AGAIN_AFTER_RESTORE = "importer-maps-again-after-restore",
    IMPORTER_UNDISTURBED = "importer-undisturbed",
    KERNEL_RELEASE = "kernel-release",
    KMEMLEAK_FINDS_NOTHING = "kmemleak-finds-nothing",
    LATE_RESPONSES_REACH_THE_GUEST = "late-responses-reach-the-guest",
    LENGTH_OVERFLOW = "length-overflow",
    LENGTH_WRAPS = "length-wraps",
    MAP_AFTER_CLOSE_IS_REFUSED = "map-after-close-is-refused",
    MAP_AFTER_RESTORE_LANDS = "map-after-restore-lands",
    MAP_IN_DECODE_OFF_FAILS_WITH_ENODEV = "map-in-decode-off-fails-with-enodev",
    MAP_IN_RESET_FAILS_WITH_ENODEV = "map-in-reset-fails-with-enodev",
    MAP_UNMAP_CYCLES = "map-unmap-cycles",
    NO_BAR_ACCESS_DURING_THE_RACES = "no-bar-access-during-the-races",
    NO_DMAR_FAULT = "no-dmar-fault",
    NO_FD_LEAKED = "no-fd-leaked",
    NO_IMPORTER_ACCESS_REACHES_THE_DEVICE = "no-importer-access-reaches-the-device",
    NO_KERNEL_REPORT_SINCE_BOOT = "no-kernel-report-since-boot",
    NO_P2P_PATH_IS_REFUSED_AS_UNSUPPORTED = "no-p2p-path-is-refused-as-unsupported",
    NVME_FUNCTION_VISIBLE = "nvme-function-visible",
    OFFSET_PAST_END = "offset-past-end",
    OLD_MAPPING_STAYS_DEAD_AFTER_RESTORE = "old-mapping-stays-dead-after-restore",
    OPEN_VFIO_DEVICE = "open-vfio-device",
    PCAP_DECODES_CLEANLY = "pcap-decodes-cleanly",
    RDMA_LINK_ADD_RXE0 = "rdma-link-add-rxe0",
    RDMA_READ_RETURNS_THE_CMB_PATTERN = "rdma-read-returns-the-cmb-pattern",
    RDMA_WRITE_COMPLETES = "rdma-write-completes",
    RDMA_WRITE_SHOWS_IN_THE_CMB = "rdma-write-shows-in-the-cmb",
    REG_DMABUF_MR_OVER_THE_DOORBELL_PAGE = "reg-dmabuf-mr-over-the-doorbell-page",
    REG_DMABUF_MR_WITHOUT_A_P2P_PATH_FAILS = "reg-dmabuf-mr-without-a-p2p-path-fails",
    RESET_METHOD_LISTS_FLR = "reset-method-lists-flr",
    REVOKE_CYCLES_END_WITH_A_WORKING_MAPPING = "revoke-cycles-end-with-a-working-mapping",
    REVOKE_REMAP_CYCLES_END_WITH_A_WORKING_MR = "revoke-remap-cycles-end-with-a-working-mr",
    ROM_INDEX = "rom-index",
    RXE_WITHOUT_A_PCI_FUNCTION_REFUSES_WITH_EOPNOTSUPP = "rxe-without-a-pci-function-refuses-with-eopnotsupp",
    SCENARIO_COMPLETED = "scenario-completed",
    SYSFS_RESET_IS_AN_FLR = "sysfs-reset-is-an-flr",
    TARGET_EXECUTED_THE_HELD_WRITES = "target-executed-the-held-writes",
    TARGET_READS_IT_BACK = "target-reads-it-back",
    TARGET_SEND_INTO_POSTED_RECEIVE = "target-send-into-posted-receive",
    TARGET_WRITE_IN_WINDOW_IS_NAK_0X62 = "target-write-in-window-is-nak-0x62",
    TARGET_WRITE_INTO_GUEST_MR = "target-write-into-guest-mr",
    TARGET_WRITE_IS_ACKED = "target-write-is-acked",
    TARGET_WRITE_LANDS_AFTER_RESTORE = "target-write-lands-after-restore",
    UNALIGNED_LENGTH = "unaligned-length",
    UNALIGNED_OFFSET = "unaligned-offset",
    UNMAP_AFTER_CLOSE_IS_SAFE = "unmap-after-close-is-safe",
    VFIO_PCI_BINDS = "vfio-pci-binds",
    WHOLE_BAR0 = "whole-bar0",
    WHOLE_CMB = "whole-cmb",
    WINDOW_WAS_OPEN_WHEN_THE_DMA_RAN = "window-was-open-when-the-dma-ran",
    WINDOW_WAS_OPEN_WHEN_THE_WRITES_WERE_POSTED = "window-was-open-when-the-writes-were-posted",
    WRITE_COMPLETES = "write-completes",
    WRITE_IN_WINDOW_GETS_REMOTE_ACCESS_ERROR = "write-in-window-gets-remote-access-error",
    WRITE_LANDS_AT_BAR2_SLICE_OFFSET = "write-lands-at-bar2-slice-offset",
    WRITE_LANDS_BEFORE = "write-lands-before",
    WRITE_LANDS_BEFORE_THE_WINDOW = "write-lands-before-the-window",
    WRITE_REFUSED_BEFORE_THE_HOT_RESET_RETURNED = "write-refused-before-the-hot-reset-returned",
    WRITE_TO_DEREGISTERED_RKEY_IS_NAK_0X62 = "write-to-deregistered-rkey-is-nak-0x62",
    ZERO_LENGTH_AT_OFFSET = "zero-length-at-offset",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_kebab_case_and_found_by_name() {
        let mut names: Vec<&str> = ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "two checks share a name");
        for c in ALL {
            assert!(
                c.0.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{c}"
            );
            assert_eq!(CheckId::named(c.0), Some(*c));
        }
        assert_eq!(CheckId::named("no-such-check"), None);
    }
}
