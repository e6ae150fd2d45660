//! One rig = one VM boot: nvme-cmb, then QEMU with the device behind a PCIe switch and the
//! agent's virtio-serial port, then the agent's ready banner.

pub mod accel;
pub mod client;
pub mod console;
pub mod paths;
pub mod process;
pub mod shape;

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply, SysrqReport, READY_BANNER};
use p2prig_protocol::device::{DeviceOp, DeviceReply};
use p2prig_protocol::target::{TargetOp, TargetReply};
use p2prig_protocol::wire::ErrorReply;

use crate::rig::client::LineClient;
use crate::rig::process::{ChildGuard, Group};
pub use crate::rig::shape::RigShape;

/// How QEMU executes the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Everything a boot needs.
#[derive(Debug, Clone)]
pub struct RigConfig {
    pub qemu: PathBuf,
    pub bzimage: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub nvme_cmb: PathBuf,
    pub roce_target: PathBuf,
    pub accel: Accel,
    pub memory_mib: u32,
    pub boot_timeout: Duration,
    pub extra_cmdline: String,
    /// QEMU's gdbstub on 127.0.0.1:PORT (`p2prig shell --gdb`).
    pub gdb_port: Option<u16>,
    /// Which machine: without an IOMMU (the rxe scenarios) or with the vIOMMU and edu.
    pub shape: RigShape,
    /// vCPUs, when not the shape's choice (`run --cpus`).
    pub cpus: Option<u32>,
}

impl RigConfig {
    /// The rig for `bzimage` with the workspace's device binaries and the usual settings
    /// (1 GiB, 300 s to a ready agent, no extra command line, no gdbstub).
    pub fn new(qemu: PathBuf, bzimage: PathBuf, initramfs: PathBuf, accel: Accel) -> Result<Self> {
        Ok(Self {
            qemu,
            bzimage,
            initramfs: Some(initramfs),
            nvme_cmb: crate::rig::paths::workspace_binary("nvme-cmb")?,
            roce_target: crate::rig::paths::workspace_binary("roce-target")?,
            accel,
            memory_mib: 1024,
            boot_timeout: Duration::from_secs(300),
            extra_cmdline: String::new(),
            gdb_port: None,
            shape: RigShape::Switch,
            cpus: None,
        })
    }
}

/// MAC address of the guest's eth0.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";
/// MAC address of the guest's eth1, the NIC on the root complex outside the switch.
pub const OUTSIDE_NIC_MAC: &str = "52:54:00:12:34:57";

/// Longest socket path we create: sun_path holds 108 bytes including the NUL.
const MAX_SOCKET_PATH: usize = 100;

/// Paths inside a run directory. Sockets live there too, unless the directory's path is too
/// long for a unix socket; then they go to a private (0700) temporary directory that lives as
/// long as this value.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
    sockets: PathBuf,
    _short_socket_dir: Option<std::sync::Arc<tempfile::TempDir>>,
}

impl RunDir {
    /// Creates target/p2prig/runs/<UTC time>-<pid>-<label>/ with mode 0700.
    pub fn create(label: &str) -> Result<Self> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self::at(crate::rig::paths::output_root().join("runs").join(format!(
            "{}-{}-{label}",
            utc_stamp(secs),
            std::process::id()
        )))
    }

    /// A private subdirectory (one per kernel of a run, one per boot).
    pub fn subdir(&self, name: &str) -> Result<Self> {
        Self::at(self.path.join(name))
    }

    fn at(path: PathBuf) -> Result<Self> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating the run directory {}", path.display()))?;
        // roce-target also creates "<socket>.backend".
        let longest = path.join("roce-target.control.sock");
        if longest.as_os_str().len() <= MAX_SOCKET_PATH {
            return Ok(Self {
                sockets: path.clone(),
                path,
                _short_socket_dir: None,
            });
        }
        let short = tempfile::Builder::new()
            .prefix("p2prig-")
            .tempdir()
            .context("creating a short private directory for sockets")?;
        fs::write(
            path.join("sockets-dir"),
            format!("{}\n", short.path().display()),
        )?;
        Ok(Self {
            sockets: short.path().to_path_buf(),
            path,
            _short_socket_dir: Some(std::sync::Arc::new(short)),
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn socket(&self, name: &str) -> PathBuf {
        self.sockets.join(name)
    }
}

/// A booted guest with its device. Dropping it stops QEMU first, then the device.
#[derive(Debug)]
pub struct Rig {
    pub agent: LineClient,
    pub device: LineClient,
    qemu: ChildGuard,
    _roce: ChildGuard,
    _nvme: ChildGuard,
    /// roce-target's control socket: the remote RDMA peer.
    target: LineClient,
    pub boot_time: Duration,
    /// The machine this boot built.
    pub shape: RigShape,
    console: PathBuf,
    qemu_stderr: PathBuf,
}

/// The guest's PCIe topology: root port -> switch upstream -> two downstream ports, so the
/// NVMe function and the NIC share a switch and pci_p2pdma finds a path (q35's host bridge
/// is not on its whitelist); a second NIC under a root port of its own has no such path.
pub fn qemu_args(cfg: &RigConfig, run: &RunDir) -> Vec<String> {
    let mem = cfg.memory_mib;
    let cpu = match cfg.accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    };
    // no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can miss
    // its ticks and panic ("IO-APIC + timer doesn't work!"); the check means nothing in a VM.
    let mut cmdline = format!(
        "console=ttyS0 panic=-1 no_timer_check {} rdinit=/init",
        cfg.shape.cmdline()
    );
    if !cfg.extra_cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&cfg.extra_cmdline);
    }
    let vfio_user = format!(
        r#"{{"driver":"vfio-user-pci","id":"nvme0","bus":"dp0","addr":"0","socket":{{"path":"{}","type":"unix"}}}}"#,
        run.socket("nvme-cmb.sock").display()
    );
    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-nic",
        "none",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "-machine".into(),
        format!(
            "q35,accel={},memory-backend=mem{}",
            cfg.accel.name(),
            cfg.shape.machine_options(cfg.accel)
        ),
        "-cpu".into(),
        cpu.into(),
        "-smp".into(),
        cfg.cpus
            .unwrap_or_else(|| cfg.shape.cpus(cfg.accel))
            .to_string(),
        "-m".into(),
        format!("{mem}M"),
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-bios".into(),
        "/usr/share/qemu/qboot.rom".into(),
        "-L".into(),
        "/usr/share/seabios".into(),
        "-L".into(),
        "/usr/share/qemu".into(),
        "-kernel".into(),
        cfg.bzimage.display().to_string(),
        "-append".into(),
        cmdline,
        "-chardev".into(),
        format!("file,id=console,path={}", run.file("console.log").display()),
        "-serial".into(),
        "chardev:console".into(),
    ]);
    args.extend(cfg.shape.leading_args());
    args.extend([
        "-device".into(),
        "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1".into(),
        "-device".into(),
        "x3130-upstream,id=sw0,bus=rp0".into(),
        "-device".into(),
        "xio3130-downstream,id=dp0,bus=sw0,chassis=2,slot=0".into(),
        "-device".into(),
        "xio3130-downstream,id=dp1,bus=sw0,chassis=3,slot=0".into(),
        "-device".into(),
        vfio_user,
    ]);
    args.extend(cfg.shape.switch_devices());
    args.extend([
        // rxe's netdev, next to the NVMe function behind the switch; its other end is
        // roce-target, the remote RDMA peer (vhost-user, so frames never leave the host).
        "-chardev".into(),
        format!(
            "socket,id=net0,path={}",
            run.socket("roce-target.sock").display()
        ),
        "-netdev".into(),
        "vhost-user,id=n0,chardev=net0".into(),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,bus=dp1,addr=0,romfile=,mac={GUEST_MAC}"),
        // A second NIC (eth1) under a root port of its own, so nothing but the host bridge
        // joins it to nvme-cmb: the importer without a peer-to-peer path (p2p-path). It
        // probes after the switch's NIC (the kernel walks rp0's subtree first), so eth0 stays
        // the NIC above. Its frames go to a restricted user-mode network that lets nothing
        // out (a lone hub port would refuse them: its TX queue stalls and the guest's netdev
        // watchdog warns).
        "-device".into(),
        "pcie-root-port,id=rp1,bus=pcie.0,chassis=4,slot=2".into(),
        "-netdev".into(),
        "user,id=n1,restrict=on,ipv6=off,net=10.0.3.0/24".into(),
        "-device".into(),
        format!("virtio-net-pci,netdev=n1,bus=rp1,addr=0,romfile=,mac={OUTSIDE_NIC_MAC}"),
        "-device".into(),
        "virtio-serial-pci,id=vser0,bus=pcie.0".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            run.socket("agent.sock").display()
        ),
        "-device".into(),
        "virtserialport,bus=vser0.0,chardev=agent,name=p2prig.agent".into(),
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            run.socket("qmp.sock").display()
        ),
    ]);
    if let Some(initrd) = &cfg.initramfs {
        args.extend(["-initrd".into(), initrd.display().to_string()]);
    }
    if let Some(port) = cfg.gdb_port {
        // Loopback only: the stub gives whoever connects the whole guest.
        args.extend(["-gdb".into(), format!("tcp:127.0.0.1:{port}")]);
    }
    args
}

impl Rig {
    pub fn boot(cfg: &RigConfig, run: &RunDir) -> Result<Self> {
        let (nvme, device) = start_device(
            "nvme-cmb",
            &cfg.nvme_cmb,
            &[
                "--trace".into(),
                run.file("nvme-cmb.trace.jsonl").display().to_string(),
            ],
            run,
        )?;
        let (roce, mut target) = start_device(
            "roce-target",
            &cfg.roce_target,
            &["--pcap-dir".into(), run.path.display().to_string()],
            run,
        )?;
        // Stamped like the agent's: the report's timeline draws the target's operations.
        target.record_to(&run.file("roce-target.transcript"))?;

        let args = qemu_args(cfg, run);
        let printable = std::iter::once(cfg.qemu.display().to_string())
            .chain(args.iter().map(|a| shell_quote(a)))
            .collect::<Vec<_>>()
            .join(" \\\n  ");
        fs::write(run.file("qemu.cmdline"), format!("{printable}\n"))?;
        let mut qemu_cmd = Command::new(&cfg.qemu);
        qemu_cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(run.file("qemu.log"))?)
            .stderr(fs::File::create(run.file("qemu.stderr.log"))?);
        let started = Instant::now();
        let mut qemu = ChildGuard::spawn("qemu", qemu_cmd, Group::Harness)?;
        fs::write(
            run.file("pids"),
            format!(
                "nvme-cmb {}\nroce-target {}\nqemu {}\n",
                nvme.pid(),
                roce.pid(),
                qemu.pid()
            ),
        )?;

        let console_path = run.file("console.log");
        let deadline = started + cfg.boot_timeout;
        let watch = |qemu: &mut ChildGuard| -> Result<()> {
            crate::rig::process::check_interrupted()?;
            if let Some(status) = qemu.try_status() {
                bail!(
                    "QEMU exited during boot ({status}); its stderr:\n{}\nconsole tail:\n{}",
                    crate::build::recipe::tail_lines(&run.file("qemu.stderr.log"), 15),
                    crate::build::recipe::tail_lines(&console_path, 20)
                );
            }
            if let Some(excerpt) = console::fatal_excerpt(&console_path) {
                bail!("the guest kernel crashed during boot:\n{excerpt}");
            }
            Ok(())
        };
        let mut agent = loop {
            watch(&mut qemu)?;
            match LineClient::connect(
                "guest agent",
                &run.socket("agent.sock"),
                Duration::from_millis(200),
            ) {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => continue,
                Err(e) => return Err(e.context("QEMU never opened the agent socket")),
            }
        };
        agent.record_to(&run.file("agent.transcript"))?;
        loop {
            let line = agent
                .read_line(deadline, &mut || watch(&mut qemu))
                .map_err(|e| match console::fatal_excerpt(&console_path) {
                    // QEMU exits on a panic (panic=-1, -no-reboot): name the crash, not the
                    // closed socket.
                    Some(excerpt) => anyhow!("the guest kernel crashed during boot:\n{excerpt}"),
                    None => anyhow!(
                        "{e:#}\nthe guest agent did not become ready within {:?}; console tail:\n{}",
                        cfg.boot_timeout,
                        crate::build::recipe::tail_lines(&console_path, 25)
                    ),
                })?;
            if String::from_utf8_lossy(&line).trim() == READY_BANNER {
                break;
            }
        }
        Ok(Self {
            agent,
            device,
            qemu,
            _roce: roce,
            _nvme: nvme,
            target,
            boot_time: started.elapsed(),
            shape: cfg.shape,
            console: console_path,
            qemu_stderr: run.file("qemu.stderr.log"),
        })
    }

    /// An agent RPC with a timeout; QEMU dying or the guest crashing aborts the wait.
    pub fn agent_call(
        &mut self,
        op: AgentOp,
        timeout: Duration,
    ) -> Result<std::result::Result<AgentReply, ErrorReply>> {
        let desc = format!("{op:?}");
        let id = self.agent_start(op)?;
        self.agent_finish(id, timeout).with_context(|| desc)
    }

    /// Sends an agent request without waiting for its reply (the agent serves requests
    /// concurrently); collect the reply with [`Rig::agent_finish`].
    pub fn agent_start(&mut self, op: AgentOp) -> Result<u64> {
        self.agent.start(op)
    }

    pub fn agent_finish(
        &mut self,
        id: u64,
        timeout: Duration,
    ) -> Result<std::result::Result<AgentReply, ErrorReply>> {
        Ok(self.agent_finish_stamped(id, timeout)?.0)
    }

    /// [`Rig::agent_finish`] with the guest's CLOCK_MONOTONIC when the operation finished.
    /// When the reply does not come while the guest still runs, the error carries what the
    /// guest kernel says its blocked tasks are waiting for.
    pub fn agent_finish_stamped(
        &mut self,
        id: u64,
        timeout: Duration,
    ) -> Result<(std::result::Result<AgentReply, ErrorReply>, Option<u64>)> {
        let result = self.agent_wait(id, timeout);
        match result {
            Err(e)
                if !crate::rig::process::interrupted()
                    && self.qemu.try_status().is_none()
                    && console::fatal_excerpt(&self.console).is_none() =>
            {
                match self.blocked_tasks() {
                    Some(dump) => Err(anyhow!(
                        "{e:#}\nthe guest still runs; its blocked tasks (SysRq w, from the console):\n{dump}"
                    )),
                    None => Err(e),
                }
            }
            other => other,
        }
    }

    /// Asks the guest for SysRq w and returns what it printed, if anything came within 3 s.
    fn blocked_tasks(&mut self) -> Option<String> {
        const MARKER: &str = "Show Blocked State";
        let mark = std::fs::metadata(&self.console).map(|m| m.len()).ok()?;
        let id = self
            .agent
            .start(AgentOp::Sysrq {
                report: SysrqReport::BlockedTasks,
            })
            .ok()?;
        let _ = self.agent_wait(id, Duration::from_secs(3));
        // The report is written in one go; give the serial console a moment to drain it.
        std::thread::sleep(Duration::from_millis(500));
        let bytes = std::fs::read(&self.console).ok()?;
        let start = usize::try_from(mark).ok()?.min(bytes.len());
        let text = String::from_utf8_lossy(&bytes[start..]).into_owned();
        let from = text.find(MARKER)?;
        Some(
            text[from..]
                .lines()
                .filter(|l| !l.starts_with("guest-agent:"))
                .take(80)
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }

    fn agent_wait(
        &mut self,
        id: u64,
        timeout: Duration,
    ) -> Result<(std::result::Result<AgentReply, ErrorReply>, Option<u64>)> {
        let console = self.console.clone();
        let qemu = &mut self.qemu;
        self.agent
            .finish_stamped(id, timeout, &mut || {
                if let Some(status) = qemu.try_status() {
                    bail!("QEMU exited ({status})");
                }
                if let Some(excerpt) = console::fatal_excerpt(&console) {
                    bail!("the guest kernel crashed:\n{excerpt}");
                }
                Ok(())
            })
            .with_context(|| format!("agent request {id}"))
    }

    /// A request to roce-target's control socket.
    pub fn target_call(
        &mut self,
        op: TargetOp,
    ) -> Result<std::result::Result<TargetReply, ErrorReply>> {
        self.target.call(op, Duration::from_secs(30))
    }

    pub fn device_call(&mut self, op: DeviceOp) -> Result<DeviceReply> {
        let desc = format!("{op:?}");
        self.device
            .call(op, Duration::from_secs(10))?
            .map_err(|e| anyhow!("nvme-cmb refused {desc}: {e}"))
    }

    /// QEMU still runs and the console shows no crash: the next scenario can use this boot.
    pub fn healthy(&mut self) -> bool {
        self.qemu.try_status().is_none() && console::fatal_excerpt(&self.console).is_none()
    }

    pub fn console_path(&self) -> &Path {
        &self.console
    }

    /// How much the guest has written to its console so far: a mark for
    /// [`Rig::console_since`].
    pub fn console_mark(&self) -> u64 {
        fs::metadata(&self.console).map_or(0, |m| m.len())
    }

    /// The console output written since byte `mark`: kernel reports in it belong to what ran
    /// since.
    pub fn console_since(&self, mark: u64) -> String {
        let bytes = fs::read(&self.console).unwrap_or_default();
        let start = usize::try_from(mark).unwrap_or(usize::MAX).min(bytes.len());
        String::from_utf8_lossy(&bytes[start..]).into_owned()
    }

    /// How much QEMU has written to its stderr so far: a mark for [`Rig::qemu_stderr_since`].
    pub fn qemu_stderr_mark(&self) -> u64 {
        fs::metadata(&self.qemu_stderr).map_or(0, |m| m.len())
    }

    /// What QEMU wrote to stderr after `mark` (its warnings and the trace events the shape
    /// turned on).
    pub fn qemu_stderr_since(&self, mark: u64) -> Result<String> {
        let bytes = fs::read(&self.qemu_stderr)
            .with_context(|| format!("reading {}", self.qemu_stderr.display()))?;
        let start = usize::try_from(mark).unwrap_or(usize::MAX).min(bytes.len());
        Ok(String::from_utf8_lossy(&bytes[start..]).into_owned())
    }

    /// Powers the guest off through the agent, then stops everything.
    pub fn shutdown(mut self) -> Result<()> {
        let _ = self.agent_call(AgentOp::PowerOff, Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.qemu.try_status().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// Starts a device process with its socket and control socket in the run directory, waits
/// for both, and connects to the control socket.
fn start_device(
    name: &str,
    binary: &Path,
    extra_args: &[String],
    run: &RunDir,
) -> Result<(ChildGuard, LineClient)> {
    let socket = run.socket(&format!("{name}.sock"));
    let control = run.socket(&format!("{name}.control.sock"));
    let log_path = run.file(&format!("{name}.log"));
    let log = fs::File::create(&log_path)?;
    let mut cmd = Command::new(binary);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--control")
        .arg(&control)
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut child = ChildGuard::spawn(name, cmd, Group::Harness)?;
    wait_for_paths(
        &mut child,
        &[socket, control.clone()],
        Duration::from_secs(10),
        &log_path,
    )?;
    let client = LineClient::connect(&format!("{name} control"), &control, Duration::from_secs(5))?;
    Ok((child, client))
}

fn wait_for_paths(
    child: &mut ChildGuard,
    paths: &[PathBuf],
    timeout: Duration,
    log: &Path,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !paths.iter().all(|p| p.exists()) {
        crate::rig::process::check_interrupted()?;
        if let Some(status) = child.try_status() {
            bail!(
                "{} exited at start ({status}); its log:\n{}",
                child.name(),
                crate::build::recipe::tail_lines(log, 15)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not create its sockets within {timeout:?}; its log:\n{}",
                child.name(),
                crate::build::recipe::tail_lines(log, 15)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// "20261125-171230" for a Unix time, without a date crate (days-to-civil, proleptic
/// Gregorian calendar).
fn utc_stamp(unix_secs: u64) -> String {
    let days = i64::try_from(unix_secs / 86_400).unwrap_or(0);
    let rem = unix_secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn shell_quote(arg: &str) -> String {
    if arg
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(accel: Accel) -> RigConfig {
        RigConfig {
            qemu: "/q".into(),
            bzimage: "/k/bzImage".into(),
            initramfs: Some("/i/initramfs.cpio.gz".into()),
            nvme_cmb: "/n".into(),
            roce_target: "/t".into(),
            accel,
            memory_mib: 512,
            boot_timeout: Duration::from_secs(1),
            extra_cmdline: String::new(),
            gdb_port: None,
            shape: RigShape::Switch,
            cpus: None,
        }
    }

    #[test]
    fn the_viommu_shape_puts_intel_iommu_before_every_pci_device_and_edu_behind_the_switch() {
        let run = RunDir {
            path: "/r".into(),
            sockets: "/r".into(),
            _short_socket_dir: None,
        };
        let args = qemu_args(
            &RigConfig {
                shape: RigShape::Viommu,
                ..cfg(Accel::Kvm)
            },
            &run,
        );
        let at = |needle: &str| {
            args.iter()
                .position(|a| a.starts_with(needle))
                .unwrap_or_else(|| panic!("no {needle} in {args:?}"))
        };
        assert!(at("intel-iommu,") < at("pcie-root-port,id=rp0"));
        assert!(at("{\"driver\":\"vfio-user-pci\"") < at("edu,bus=dp2"));
        assert!(args.iter().any(|a| a.ends_with("kernel-irqchip=split")));
        let append = &args[at("-append") + 1];
        assert!(
            append.contains("intel_iommu=on") && !append.contains("noiommu"),
            "{append}"
        );
        let plain = qemu_args(&cfg(Accel::Kvm), &run);
        assert!(!plain
            .iter()
            .any(|a| a.contains("intel-iommu") || a.starts_with("edu")));
    }

    #[test]
    fn device_sits_behind_a_switch_downstream_port_with_shared_memfd_ram() {
        let run = RunDir {
            path: "/r".into(),
            sockets: "/r".into(),
            _short_socket_dir: None,
        };
        let args = qemu_args(&cfg(Accel::Tcg), &run);
        let joined = args.join(" ");
        assert!(joined.contains("q35,accel=tcg,memory-backend=mem"));
        assert!(joined.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
        assert!(joined.contains("x3130-upstream,id=sw0,bus=rp0"));
        assert!(joined.contains(r#""bus":"dp0""#));
        assert!(joined.contains("pcie-root-port,id=rp1,bus=pcie.0"));
        assert!(
            joined.contains("netdev=n1,bus=rp1"),
            "the outside NIC is not behind the switch"
        );
        assert!(joined.contains(r#""path":"/r/nvme-cmb.sock""#));
        assert!(joined.contains("-bios /usr/share/qemu/qboot.rom"));
        assert!(joined.contains("name=p2prig.agent"));
        assert!(joined.contains("vfio.enable_unsafe_noiommu_mode=1"));
        assert!(joined.contains("no_timer_check"));
        assert!(joined.contains("-initrd /i/initramfs.cpio.gz"));
    }

    #[test]
    fn kvm_uses_the_host_cpu() {
        let run = RunDir {
            path: "/r".into(),
            sockets: "/r".into(),
            _short_socket_dir: None,
        };
        let args = qemu_args(&cfg(Accel::Kvm), &run);
        let pos = args.iter().position(|a| a == "-cpu").expect("-cpu present");
        assert_eq!(args[pos + 1], "host");
    }

    #[test]
    fn long_run_paths_get_short_private_socket_dirs() -> Result<()> {
        let base = tempfile::tempdir()?;
        let long = base.path().join("x".repeat(120));
        let run = RunDir::at(long)?;
        let sock = run.socket("roce-target.control.sock");
        assert!(sock.as_os_str().len() <= MAX_SOCKET_PATH + 25);
        assert!(run.file("sockets-dir").exists());
        let short = RunDir::at(base.path().join("r"))?;
        assert_eq!(short.socket("a.sock"), short.file("a.sock"));
        Ok(())
    }

    #[test]
    fn run_ids_use_utc_calendar_time() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000");
        assert_eq!(utc_stamp(1_795_626_730), "20261125-171210");
    }

    #[test]
    fn shell_quoting_keeps_json_readable() {
        assert_eq!(shell_quote("-m"), "-m");
        assert_eq!(shell_quote(r#"{"a":"b"}"#), r#"'{"a":"b"}'"#);
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
