//! What the agent learns from and does through sysfs: PCI functions by class, driver binding,
//! IOMMU groups and the virtio-serial port by name. The roots are parameters so the logic runs
//! against a fake tree in a temporary directory on the host.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{AgentError, Result};

/// The driver the agent binds functions to.
pub const VFIO_PCI_DRIVER: &str = "vfio-pci";

/// Where sysfs and devtmpfs are mounted ("/sys" and "/dev" in the guest).
#[derive(Debug, Clone)]
pub struct SystemPaths {
    pub sys: PathBuf,
    pub dev: PathBuf,
    pub proc: PathBuf,
}

impl Default for SystemPaths {
    fn default() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            proc: PathBuf::from("/proc"),
        }
    }
}

/// Accepts only a PCI address of the form DDDD:BB:DD.F (hex), so a request can never name a
/// path outside /sys/bus/pci/devices.
pub fn validate_bdf(bdf: &str) -> Result<()> {
    let bytes = bdf.as_bytes();
    let hex_at = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|part| part.iter().all(u8::is_ascii_hexdigit))
    };
    let well_formed = bytes.len() == 12
        && hex_at(0..4)
        && bytes[4] == b':'
        && hex_at(5..7)
        && bytes[7] == b':'
        && hex_at(8..10)
        && bytes[10] == b'.'
        && matches!(bytes[11], b'0'..=b'7');
    if well_formed {
        Ok(())
    } else {
        Err(AgentError::Invalid(format!(
            "{bdf:?} is not a PCI address of the form 0000:02:00.0"
        )))
    }
}

/// Writes `value` in one write(2), as sysfs attributes expect.
fn write_attribute(path: &Path, value: &str) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| AgentError::os(format!("opening {} for writing", path.display()), e))?;
    file.write_all(value.as_bytes())
        .map_err(|e| AgentError::os(format!("writing {value:?} to {}", path.display()), e))
}

/// Parses a sysfs hex attribute such as "0x010802".
fn parse_hex(text: &str) -> Option<u32> {
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

impl SystemPaths {
    fn pci_devices(&self) -> PathBuf {
        self.sys.join("bus/pci/devices")
    }

    fn pci_device(&self, bdf: &str) -> Result<PathBuf> {
        validate_bdf(bdf)?;
        let dir = self.pci_devices().join(bdf);
        if dir.exists() {
            Ok(dir)
        } else {
            Err(AgentError::NotFound(format!(
                "no PCI function {bdf} in {}",
                self.pci_devices().display()
            )))
        }
    }

    /// PCI functions whose 24-bit class code (base, sub, prog-if) equals `class`, sorted.
    pub fn find_pci(&self, class: u32) -> Result<Vec<String>> {
        let root = self.pci_devices();
        let entries = fs::read_dir(&root)
            .map_err(|e| AgentError::os(format!("listing {}", root.display()), e))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // A function that vanishes or has an odd class file is skipped, not an error:
            // the scan is a query, and hotplug may race with it.
            let Ok(text) = fs::read_to_string(entry.path().join("class")) else {
                continue;
            };
            if parse_hex(&text).map(|value| value & 0x00ff_ffff) == Some(class & 0x00ff_ffff) {
                found.push(name);
            }
        }
        found.sort();
        Ok(found)
    }

    /// The name of the driver bound to `bdf`, if any.
    pub fn bound_driver(&self, bdf: &str) -> Result<Option<String>> {
        let link = self.pci_device(bdf)?.join("driver");
        match fs::read_link(&link) {
            Ok(target) => Ok(target
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AgentError::os(
                format!("reading link {}", link.display()),
                e,
            )),
        }
    }

    /// Binds `bdf` to vfio-pci: driver_override, unbind from the current driver, drivers_probe,
    /// then checks the driver link. Already bound to vfio-pci is success.
    /// A PCI function's attribute file; the name is one path component of [A-Za-z0-9_].
    fn pci_attribute(&self, bdf: &str, attribute: &str) -> Result<PathBuf> {
        let valid = !attribute.is_empty()
            && attribute
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(AgentError::Invalid(format!(
                "{attribute:?} is not a PCI sysfs attribute name (letters, digits, underscore)"
            )));
        }
        Ok(self.pci_device(bdf)?.join(attribute))
    }

    pub fn read_pci_attribute(&self, bdf: &str, attribute: &str) -> Result<String> {
        let path = self.pci_attribute(bdf, attribute)?;
        fs::read_to_string(&path)
            .map_err(|e| AgentError::os(format!("reading {}", path.display()), e))
    }

    pub fn write_pci_attribute(&self, bdf: &str, attribute: &str, value: &str) -> Result<()> {
        write_attribute(&self.pci_attribute(bdf, attribute)?, value)
    }

    /// kmemleak's control and report file (debugfs, mounted by the agent at boot).
    pub fn kmemleak(&self, command: &str) -> Result<String> {
        let path = self.sys.join("kernel/debug/kmemleak");
        if !path.exists() {
            return Err(AgentError::NotFound(format!(
                "{} does not exist: kmemleak runs only in debug kernels (FLAVOR:debug)",
                path.display()
            )));
        }
        write_attribute(&path, command)?;
        fs::read_to_string(&path)
            .map_err(|e| AgentError::os(format!("reading {}", path.display()), e))
    }

    /// Asks the kernel for a magic SysRq report (it goes to the kernel log).
    pub fn sysrq(&self, key: char) -> Result<()> {
        write_attribute(&self.proc.join("sysrq-trigger"), &key.to_string())
    }

    pub fn bind_vfio(&self, bdf: &str) -> Result<()> {
        let dir = self.pci_device(bdf)?;
        write_attribute(&dir.join("driver_override"), VFIO_PCI_DRIVER)?;
        match self.bound_driver(bdf)?.as_deref() {
            Some(VFIO_PCI_DRIVER) => return Ok(()),
            Some(_) => write_attribute(&dir.join("driver/unbind"), bdf)?,
            None => {}
        }
        write_attribute(&self.sys.join("bus/pci/drivers_probe"), bdf)?;
        match self.bound_driver(bdf)? {
            Some(driver) if driver == VFIO_PCI_DRIVER => Ok(()),
            Some(driver) => Err(AgentError::State {
                errno: libc::EBUSY,
                message: format!("{bdf} is bound to {driver} after drivers_probe, not vfio-pci"),
            }),
            None => Err(AgentError::State {
                errno: libc::ENODEV,
                message: format!(
                    "{bdf} has no driver after drivers_probe (is CONFIG_VFIO_PCI built in?)"
                ),
            }),
        }
    }

    /// The IOMMU group number of `bdf` (the last component of its iommu_group link).
    pub fn iommu_group(&self, bdf: &str) -> Result<u32> {
        let link = self.pci_device(bdf)?.join("iommu_group");
        let target = fs::read_link(&link).map_err(|e| {
            AgentError::os(
                format!(
                    "reading link {} (no IOMMU group: is vfio.enable_unsafe_noiommu_mode=1 set and the function bound to vfio-pci?)",
                    link.display()
                ),
                e,
            )
        })?;
        target
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse().ok())
            .ok_or_else(|| {
                AgentError::Invalid(format!(
                    "{} points to {}, which does not end in a group number",
                    link.display(),
                    target.display()
                ))
            })
    }

    /// The group character device and whether it is a noiommu group (/dev/vfio/noiommu-N)
    /// or an IOMMU-backed one (/dev/vfio/N).
    pub fn vfio_group_device(&self, group: u32) -> Result<(PathBuf, bool)> {
        let noiommu = self.dev.join(format!("vfio/noiommu-{group}"));
        if noiommu.exists() {
            return Ok((noiommu, true));
        }
        let iommu = self.dev.join(format!("vfio/{group}"));
        if iommu.exists() {
            return Ok((iommu, false));
        }
        Err(AgentError::NotFound(format!(
            "neither {} nor {} exists",
            noiommu.display(),
            iommu.display()
        )))
    }

    /// The VFIO cdev of `bdf` (/dev/vfio/devices/vfioN), named by its vfio-dev directory in
    /// sysfs; there only with CONFIG_VFIO_DEVICE_CDEV and the function bound to vfio-pci.
    pub fn vfio_cdev(&self, bdf: &str) -> Result<PathBuf> {
        let dir = self.pci_device(bdf)?.join("vfio-dev");
        let entries = fs::read_dir(&dir).map_err(|e| {
            AgentError::os(
                format!(
                    "listing {} (no VFIO cdev: is the function bound to vfio-pci and the kernel built with CONFIG_VFIO_DEVICE_CDEV?)",
                    dir.display()
                ),
                e,
            )
        })?;
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| {
                name.strip_prefix("vfio")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect();
        names.sort();
        match names.as_slice() {
            [name] => Ok(self.dev.join("vfio/devices").join(name)),
            [] => Err(AgentError::NotFound(format!(
                "{} names no vfioN device",
                dir.display()
            ))),
            more => Err(AgentError::Invalid(format!(
                "{} names several devices: {more:?}",
                dir.display()
            ))),
        }
    }

    /// The /dev node of the virtio-serial port called `name` (e.g. /dev/vport1p1), found by
    /// scanning /sys/class/virtio-ports/*/name since there is no udev to create by-name links.
    pub fn find_virtio_port(&self, name: &str) -> Option<PathBuf> {
        let class = self.sys.join("class/virtio-ports");
        let mut ports: Vec<_> = fs::read_dir(class).ok()?.flatten().collect();
        ports.sort_by_key(|entry| entry.file_name());
        ports.into_iter().find_map(|entry| {
            let port_name = fs::read_to_string(entry.path().join("name")).ok()?;
            (port_name.trim() == name).then(|| self.dev.join(entry.file_name()))
        })
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake sysfs/devtmpfs tree for tests.
    use super::*;
    use std::os::unix::fs::symlink;

    #[derive(Debug)]
    pub struct FakeSystem {
        /// Keeps the tree alive until the test ends.
        _dir: tempfile::TempDir,
        pub paths: SystemPaths,
    }

    impl FakeSystem {
        pub fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let paths = SystemPaths {
                sys: dir.path().join("sys"),
                dev: dir.path().join("dev"),
                proc: dir.path().join("proc"),
            };
            fs::create_dir_all(paths.sys.join("bus/pci/devices")).expect("mkdir");
            fs::create_dir_all(paths.sys.join("bus/pci/drivers")).expect("mkdir");
            fs::create_dir_all(paths.dev.join("vfio")).expect("mkdir");
            fs::write(paths.sys.join("bus/pci/drivers_probe"), "").expect("write");
            Self { _dir: dir, paths }
        }

        /// Adds a function; `driver` creates the drivers/<name> directory and the link.
        pub fn add_function(&self, bdf: &str, class: u32, driver: Option<&str>) -> PathBuf {
            let dir = self.paths.sys.join("bus/pci/devices").join(bdf);
            fs::create_dir_all(&dir).expect("mkdir");
            fs::write(dir.join("class"), format!("0x{class:06x}\n")).expect("write");
            fs::write(dir.join("driver_override"), "(null)\n").expect("write");
            if let Some(driver) = driver {
                self.set_driver(bdf, driver);
            }
            dir
        }

        pub fn set_driver(&self, bdf: &str, driver: &str) {
            let driver_dir = self.paths.sys.join("bus/pci/drivers").join(driver);
            fs::create_dir_all(&driver_dir).expect("mkdir");
            fs::write(driver_dir.join("unbind"), "").expect("write");
            let link = self
                .paths
                .sys
                .join("bus/pci/devices")
                .join(bdf)
                .join("driver");
            let _ = fs::remove_file(&link);
            symlink(&driver_dir, link).expect("symlink");
        }

        pub fn set_iommu_group(&self, bdf: &str, group: u32) {
            let groups = self.paths.sys.join("kernel/iommu_groups");
            fs::create_dir_all(groups.join(group.to_string())).expect("mkdir");
            let link = self
                .paths
                .sys
                .join("bus/pci/devices")
                .join(bdf)
                .join("iommu_group");
            symlink(groups.join(group.to_string()), link).expect("symlink");
        }

        pub fn add_virtio_port(&self, node: &str, name: &str) {
            let dir = self.paths.sys.join("class/virtio-ports").join(node);
            fs::create_dir_all(&dir).expect("mkdir");
            fs::write(dir.join("name"), format!("{name}\n")).expect("write");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeSystem;
    use super::*;

    #[test]
    fn find_pci_matches_the_24_bit_class_and_sorts() {
        let system = FakeSystem::new();
        system.add_function("0000:03:00.0", 0x010802, None);
        system.add_function("0000:02:00.0", 0x010802, Some("nvme"));
        system.add_function("0000:00:01.0", 0x060400, None);
        // A class file with trailing revision-like noise must not match by accident.
        system.add_function("0000:00:02.0", 0x020000, None);
        let found = system.paths.find_pci(0x010802).expect("scan");
        assert_eq!(found, ["0000:02:00.0", "0000:03:00.0"]);
        assert!(system.paths.find_pci(0x0c0330).expect("scan").is_empty());
    }

    #[test]
    fn find_pci_without_a_pci_bus_is_enoent() {
        let system = FakeSystem::new();
        fs::remove_dir_all(system.paths.sys.join("bus/pci/devices")).expect("rm");
        let error = system.paths.find_pci(1).expect_err("no bus");
        assert_eq!(error.errno(), libc::ENOENT);
    }

    #[test]
    fn bdf_validation_rejects_paths_and_odd_shapes() {
        validate_bdf("0000:02:00.0").expect("valid");
        validate_bdf("abcd:ef:1f.7").expect("valid");
        for bad in [
            "",
            "../../etc",
            "0000:02:00.8",
            "0000:02:00.0/",
            "0000-02:00.0",
            "02:00.0",
        ] {
            assert_eq!(
                validate_bdf(bad).expect_err(bad).errno(),
                libc::EINVAL,
                "{bad}"
            );
        }
    }

    #[test]
    fn bind_unbinds_the_current_driver_and_probes() {
        let system = FakeSystem::new();
        let dir = system.add_function("0000:02:00.0", 0x010802, Some("nvme"));
        // The fake kernel does not rebind, so the bind reports the driver still in place.
        let error = system
            .paths
            .bind_vfio("0000:02:00.0")
            .expect_err("still nvme");
        assert_eq!(error.errno(), libc::EBUSY);
        assert!(error.to_string().contains("bound to nvme"), "{error}");
        assert_eq!(
            fs::read_to_string(dir.join("driver_override")).expect("read"),
            "vfio-pci"
        );
        let unbind = system.paths.sys.join("bus/pci/drivers/nvme/unbind");
        assert_eq!(fs::read_to_string(unbind).expect("read"), "0000:02:00.0");
        let probe = system.paths.sys.join("bus/pci/drivers_probe");
        assert_eq!(fs::read_to_string(probe).expect("read"), "0000:02:00.0");
    }

    #[test]
    fn bind_is_idempotent_when_already_vfio_pci() {
        let system = FakeSystem::new();
        system.add_function("0000:02:00.0", 0x010802, Some("vfio-pci"));
        system
            .paths
            .bind_vfio("0000:02:00.0")
            .expect("already bound");
        let probe = system.paths.sys.join("bus/pci/drivers_probe");
        assert_eq!(
            fs::read_to_string(probe).expect("read"),
            "",
            "no probe needed"
        );
    }

    #[test]
    fn pci_attributes_are_read_and_written_by_name_only() {
        let system = FakeSystem::new();
        let dir = system.add_function("0000:02:00.0", 0x010802, None);
        fs::write(dir.join("reset"), "").expect("a reset attribute");
        let text = system
            .paths
            .read_pci_attribute("0000:02:00.0", "class")
            .expect("class readable");
        assert_eq!(text.trim(), "0x010802");
        system
            .paths
            .write_pci_attribute("0000:02:00.0", "reset", "1")
            .expect("reset writable");
        let reset = system.paths.sys.join("bus/pci/devices/0000:02:00.0/reset");
        assert_eq!(fs::read_to_string(reset).expect("read back"), "1");
        for bad in ["../../../etc/passwd", "driver/unbind", "", "a b"] {
            let error = system
                .paths
                .read_pci_attribute("0000:02:00.0", bad)
                .expect_err("refused");
            assert_eq!(error.errno(), libc::EINVAL, "{bad:?}");
        }
    }

    #[test]
    fn sysrq_writes_its_key_to_the_trigger() {
        let system = FakeSystem::new();
        fs::create_dir_all(&system.paths.proc).expect("mkdir");
        fs::write(system.paths.proc.join("sysrq-trigger"), "").expect("create");
        system.paths.sysrq('w').expect("written");
        let written = fs::read_to_string(system.paths.proc.join("sysrq-trigger")).expect("read");
        assert_eq!(written, "w");
    }

    #[test]
    fn kmemleak_is_driven_through_its_debugfs_file() {
        let system = FakeSystem::new();
        let error = system.paths.kmemleak("scan").expect_err("no kmemleak");
        assert_eq!(error.errno(), libc::ENOENT);
        let dir = system.paths.sys.join("kernel/debug");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("kmemleak"), "").expect("create");
        assert_eq!(system.paths.kmemleak("scan").expect("scanned"), "scan");
    }

    #[test]
    fn bind_without_driver_after_probe_is_enodev() {
        let system = FakeSystem::new();
        system.add_function("0000:02:00.0", 0x010802, None);
        let error = system
            .paths
            .bind_vfio("0000:02:00.0")
            .expect_err("no driver");
        assert_eq!(error.errno(), libc::ENODEV);
    }

    #[test]
    fn bind_of_absent_function_is_enoent() {
        let system = FakeSystem::new();
        let error = system.paths.bind_vfio("0000:09:00.0").expect_err("absent");
        assert_eq!(error.errno(), libc::ENOENT);
    }

    #[test]
    fn iommu_group_and_noiommu_device_node() {
        let system = FakeSystem::new();
        system.add_function("0000:02:00.0", 0x010802, Some("vfio-pci"));
        assert_eq!(
            system
                .paths
                .iommu_group("0000:02:00.0")
                .expect_err("none")
                .errno(),
            libc::ENOENT
        );
        system.set_iommu_group("0000:02:00.0", 3);
        assert_eq!(system.paths.iommu_group("0000:02:00.0").expect("group"), 3);
        assert_eq!(
            system
                .paths
                .vfio_group_device(3)
                .expect_err("no node")
                .errno(),
            libc::ENOENT
        );
        fs::write(system.paths.dev.join("vfio/3"), "").expect("node");
        assert_eq!(
            system.paths.vfio_group_device(3).expect("iommu"),
            (system.paths.dev.join("vfio/3"), false)
        );
        fs::write(system.paths.dev.join("vfio/noiommu-3"), "").expect("node");
        assert_eq!(
            system.paths.vfio_group_device(3).expect("noiommu"),
            (system.paths.dev.join("vfio/noiommu-3"), true)
        );
    }

    #[test]
    fn vfio_cdev_is_named_by_the_functions_vfio_dev_directory() {
        let system = FakeSystem::new();
        let dir = system.add_function("0000:03:00.0", 0x00ff00, Some("vfio-pci"));
        assert_eq!(
            system
                .paths
                .vfio_cdev("0000:03:00.0")
                .expect_err("no vfio-dev")
                .errno(),
            libc::ENOENT
        );
        fs::create_dir_all(dir.join("vfio-dev/vfio1")).expect("mkdir");
        fs::create_dir_all(dir.join("vfio-dev/power")).expect("mkdir");
        assert_eq!(
            system.paths.vfio_cdev("0000:03:00.0").expect("cdev"),
            system.paths.dev.join("vfio/devices/vfio1")
        );
        fs::create_dir_all(dir.join("vfio-dev/vfio2")).expect("mkdir");
        assert_eq!(
            system
                .paths
                .vfio_cdev("0000:03:00.0")
                .expect_err("two")
                .errno(),
            libc::EINVAL
        );
        assert!(system.paths.vfio_cdev("../../etc").is_err());
    }

    #[test]
    fn virtio_port_is_found_by_name() {
        let system = FakeSystem::new();
        assert_eq!(system.paths.find_virtio_port("p2prig.agent"), None);
        system.add_virtio_port("vport0p1", "org.qemu.guest_agent.0");
        system.add_virtio_port("vport1p1", "p2prig.agent");
        assert_eq!(
            system.paths.find_virtio_port("p2prig.agent"),
            Some(system.paths.dev.join("vport1p1"))
        );
    }
}
