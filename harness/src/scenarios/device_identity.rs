//! device-identity: what the guest kernel sees of nvme-cmb. The class code, BAR sizes and
//! flags, the CMB registers (NVMe 1.4 3.1.11-12), FLR among the reset methods, and a reset
//! through sysfs arriving at the device as an FLR.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply};
use p2prig_protocol::device::{DeviceOp, DeviceReply};
use p2prig_protocol::event::EventKind;

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::steps::{open_nvme, NVME_CLASS, RPC};
use crate::scenarios::ScenarioEnv;

/// IORESOURCE_MEM | IORESOURCE_MEM_64 in /sys/bus/pci/devices/*/resource flags.
const IORESOURCE_MEM: u64 = 0x200;
const IORESOURCE_MEM_64: u64 = 0x0010_0000;
const CMBLOC: u64 = 0x38;
const CMBSZ: u64 = 0x3c;

pub fn run(rig: &mut Rig, _env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    let t = Instant::now();
    let bdf = match rig.agent_call(AgentOp::FindPci { class: 0x010802 }, RPC)? {
        Ok(AgentReply::Pci { functions }) if functions.len() == 1 => functions[0].clone(),
        other => bail!("expected one NVMe function: {other:?}"),
    };
    let class = attr(rig, &bdf, "class")?;
    suite.record(
        checks::CLASS_CODE,
        class.trim() == format!("{NVME_CLASS:#08x}"),
        format!("{bdf} class {}", class.trim()),
        t.elapsed(),
    );

    let t = Instant::now();
    let resources = parse_resources(&attr(rig, &bdf, "resource")?);
    let bar = |i: usize| resources.get(i).copied().unwrap_or((0, 0));
    let (bar0_size, bar0_flags) = bar(0);
    let (bar2_size, bar2_flags) = bar(2);
    let mem64 = |flags: u64| flags & IORESOURCE_MEM != 0 && flags & IORESOURCE_MEM_64 != 0;
    suite.record(
        checks::BAR_SIZES_AND_TYPES,
        bar0_size == 0x4000 && mem64(bar0_flags) && bar2_size > 0 && mem64(bar2_flags) && bar(1).0 == 0,
        format!("BAR0 {bar0_size:#x} flags {bar0_flags:#x}; BAR2 {bar2_size:#x} flags {bar2_flags:#x}; BAR1 (upper half) {:#x}", bar(1).0),
        t.elapsed(),
    );

    let t = Instant::now();
    let methods = attr(rig, &bdf, "reset_method")?;
    suite.record(
        checks::RESET_METHOD_LISTS_FLR,
        methods.split_whitespace().any(|m| m == "flr"),
        format!("reset_method: {}", methods.trim()),
        t.elapsed(),
    );

    let t = Instant::now();
    let since = match rig.device_call(DeviceOp::EventsSince {
        since: u64::MAX,
        limit: Some(0),
    })? {
        DeviceReply::Events { last_seq, .. } => last_seq,
        other => bail!("nvme-cmb: unexpected {other:?}"),
    };
    let reset = rig.agent_call(
        AgentOp::PciAttrWrite {
            bdf: bdf.clone(),
            attribute: "reset".into(),
            value: "1".into(),
        },
        RPC,
    )?;
    // vfio-pci may have runtime-suspended the idle function to D3hot: the write then wakes it
    // (a D3hot -> D0 reset) before the FLR, so look for the FLR among the resets.
    let causes = reset_causes_after(rig, since, Duration::from_secs(5))?;
    let flr = causes.iter().any(|c| c == "flr");
    suite.record(
        checks::SYSFS_RESET_IS_AN_FLR,
        reset.is_ok() && flr,
        format!("write 1 to reset: {reset:?}; device resets since: {causes:?}"),
        t.elapsed(),
    );

    let t = Instant::now();
    let device = open_nvme(rig)?;
    let result = cmb_registers(rig, device, bar2_size);
    let _ = rig.agent_call(AgentOp::VfioClose { device }, RPC)?;
    let (ok, detail) = result?;
    suite.record(checks::CMB_REGISTERS_DESCRIBE_BAR2, ok, detail, t.elapsed());
    Ok(())
}

/// CMBLOC.BIR must name BAR2 and CMBSZ's size (SZ units of 4 KiB << 4*SZU) must be BAR2's.
fn cmb_registers(rig: &mut Rig, device: u32, bar2_size: u64) -> Result<(bool, String)> {
    let mut read = |offset| -> Result<u64> {
        match rig.agent_call(
            AgentOp::BarRead {
                device,
                bar: 0,
                offset,
                width: 4,
            },
            RPC,
        )? {
            Ok(AgentReply::Value { value }) => Ok(value),
            other => bail!("BAR0 read at {offset:#x}: {other:?}"),
        }
    };
    let cmbloc = read(CMBLOC)?;
    let cmbsz = read(CMBSZ)?;
    let bir = cmbloc & 0x7;
    let szu = (cmbsz >> 8) & 0xf;
    let sz = cmbsz >> 12;
    let size = sz.checked_shl(12 + 4 * szu as u32).unwrap_or(0);
    Ok((
        bir == 2 && size == bar2_size,
        format!("CMBLOC {cmbloc:#x} (BIR {bir}), CMBSZ {cmbsz:#x} (size {size:#x}), BAR2 {bar2_size:#x}"),
    ))
}

/// Causes of the resets nvme-cmb started after `since`, waiting up to `timeout` for an FLR.
fn reset_causes_after(rig: &mut Rig, since: u64, timeout: Duration) -> Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    loop {
        let events = match rig.device_call(DeviceOp::EventsSince { since, limit: None })? {
            DeviceReply::Events { events, .. } => events,
            other => bail!("nvme-cmb: unexpected {other:?}"),
        };
        let causes: Vec<String> = events
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::ResetStart { cause } => Some(cause),
                _ => None,
            })
            .collect();
        if causes.iter().any(|c| c == "flr") || Instant::now() >= deadline {
            return Ok(causes);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn attr(rig: &mut Rig, bdf: &str, attribute: &str) -> Result<String> {
    match rig.agent_call(
        AgentOp::PciAttrRead {
            bdf: bdf.into(),
            attribute: attribute.into(),
        },
        RPC,
    )? {
        Ok(AgentReply::Text { text }) => Ok(text),
        other => bail!("reading {attribute} of {bdf}: {other:?}"),
    }
}

/// Lines of "start end flags" (hex) -> (size, flags) per resource.
fn parse_resources(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .map(|line| {
            let fields: Vec<u64> = line
                .split_whitespace()
                .filter_map(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok())
                .collect();
            match fields.as_slice() {
                [start, end, flags] if end > start => (end - start + 1, *flags),
                [_, _, flags] => (0, *flags),
                _ => (0, 0),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_lines_give_sizes_and_flags() {
        let text = "0x00000000fe000000 0x00000000fe003fff 0x0000000000140204\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x00000000fd000000 0x00000000fd0fffff 0x000000000014220c\n";
        let r = parse_resources(text);
        assert_eq!(r[0], (0x4000, 0x140204));
        assert_eq!(r[1], (0, 0));
        assert_eq!(r[2].0, 0x10_0000);
        assert!(r[0].1 & IORESOURCE_MEM_64 != 0);
    }
}
