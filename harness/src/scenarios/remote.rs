//! remote-doorbell and remote-verbs: roce-target, the remote RoCEv2 peer, writes a doorbell
//! through the guest's dma-buf MR and exercises WRITE/READ/SEND/NAK against rxe.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use p2prig_protocol::agent::{AgentOp, AgentReply};
use p2prig_protocol::target::{Sge, TargetOp, TargetReply};

use crate::rig::Rig;
use crate::run::checks;
use crate::run::report::Suite;
use crate::scenarios::ScenarioEnv;

use crate::scenarios::oracles;
use crate::scenarios::steps::*;

/// roce-target (the RDMA NIC's peer) writes 7 into the guest's dma-buf MR over BAR0's
/// doorbell page at SQ1TDBL: rxe, the importer, must turn it into exactly that doorbell write.
pub fn run_remote_doorbell(rig: &mut Rig, env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| remote_doorbell(rig, env, suite, held))
}

fn remote_doorbell(
    rig: &mut Rig,
    env: &ScenarioEnv,
    suite: &mut Suite,
    held: &mut Held,
) -> Result<()> {
    let t = Instant::now();
    let device = open_device(rig, held)?;
    let dmabuf = export(rig, held, device, 0, PAGE, PAGE, env)?;
    let context = rdma_up(rig, held)?;
    let pd = alloc_pd(rig, context, held)?;
    let (_, _, target_qpn) = connect_to_target(rig, context, pd, held)?;
    let (_mr, rkey) =
        reg_dmabuf(rig, held, pd, dmabuf, 0, PAGE)?.map_err(|e| anyhow!("reg_dmabuf_mr: {e}"))?;
    let (completion, events) = target_ring(rig, target_qpn, rkey, 7, 1)?;
    let acked = oracles::target_acked(&completion);
    suite.record(
        checks::TARGET_WRITE_IS_ACKED,
        acked,
        format!("{completion:?} (target qpn {target_qpn})"),
        t.elapsed(),
    );
    suite.record(
        checks::DEVICE_SEES_ONE_DOORBELL_WRITE,
        oracles::written(&events, SQ1TDBL, 8).exactly(7),
        format!("at BAR0+{SQ1TDBL:#x}: {}", oracles::describe(&events)),
        Duration::ZERO,
    );
    let _ = target_call(rig, TargetOp::DestroyQp { qpn: target_qpn });
    Ok(())
}

/// roce-target against the guest's rxe on an ordinary MR: WRITE, READ back, SEND into a
/// posted receive, then a WRITE with the rkey of a deregistered MR, which must be NAKed with
/// remote access error (0x62) and put the target's QP in error. The frames of the scenario are
/// captured and must decode with tshark with no malformed packet.
pub fn run_remote_verbs(rig: &mut Rig, _env: &ScenarioEnv, suite: &mut Suite) -> Result<()> {
    with_held(rig, |rig, held| remote_verbs(rig, suite, held))
}

fn guest_bytes(rig: &mut Rig, mr: u32, offset: u64, length: u64) -> Result<String> {
    match ok(
        rig.agent_call(AgentOp::MrRead { mr, offset, length }, RPC)?,
        "read the guest MR",
    )? {
        AgentReply::Bytes { data } => Ok(data),
        other => bail!("mr_read: unexpected {other:?}"),
    }
}

fn remote_verbs(rig: &mut Rig, suite: &mut Suite, held: &mut Held) -> Result<()> {
    let pcap = match target_call(
        rig,
        TargetOp::PcapStart {
            name: Some("remote-verbs.pcap".into()),
        },
    )? {
        TargetReply::Pcap { path, .. } => path,
        other => bail!("roce-target pcap_start: unexpected {other:?}"),
    };
    let context = rdma_up(rig, held)?;
    let pd = alloc_pd(rig, context, held)?;
    let (qp, cq, target_qpn) = connect_to_target(rig, context, pd, held)?;
    let AgentMr { mr, addr, rkey } = reg_mr(rig, held, pd, 4096)?;
    let pattern = "00112233445566778899aabbccddeeff";
    let local = target_mr(rig, 4096)?;
    target_call(
        rig,
        TargetOp::MrWrite {
            key: local,
            offset: 0,
            data_hex: pattern.into(),
            length: None,
        },
    )?;

    let t = Instant::now();
    let sge = |offset, length| Sge {
        key: local,
        offset,
        length,
    };
    target_call(
        rig,
        TargetOp::PostWrite {
            qpn: target_qpn,
            wr_id: 1,
            local: sge(0, 16),
            remote_va: addr,
            remote_rkey: rkey,
            imm: None,
        },
    )?;
    let wc = target_poll(rig, target_qpn)?;
    let landed = guest_bytes(rig, mr, 0, 16)?;
    suite.record(
        checks::TARGET_WRITE_INTO_GUEST_MR,
        oracles::target_acked(&wc) && landed == pattern,
        format!("{wc:?}; guest MR: {landed}"),
        t.elapsed(),
    );

    let t = Instant::now();
    target_call(
        rig,
        TargetOp::PostRead {
            qpn: target_qpn,
            wr_id: 2,
            local: sge(1024, 16),
            remote_va: addr,
            remote_rkey: rkey,
        },
    )?;
    let wc = target_poll(rig, target_qpn)?;
    let read = match target_call(
        rig,
        TargetOp::MrRead {
            key: local,
            offset: 1024,
            length: 16,
        },
    )? {
        TargetReply::MrData { data_hex, .. } => data_hex,
        other => bail!("roce-target mr_read: unexpected {other:?}"),
    };
    suite.record(
        checks::TARGET_READS_IT_BACK,
        oracles::target_acked(&wc) && read == pattern,
        format!("{wc:?}; read {read}"),
        t.elapsed(),
    );

    let t = Instant::now();
    ok(
        rig.agent_call(
            AgentOp::PostRecv {
                qp,
                wr_id: 7,
                mr,
                offset: 256,
                length: 64,
            },
            RPC,
        )?,
        "post_recv",
    )?;
    target_call(
        rig,
        TargetOp::PostSend {
            qpn: target_qpn,
            wr_id: 3,
            local: sge(0, 16),
            imm: None,
        },
    )?;
    let sent = target_poll(rig, target_qpn)?;
    let received = poll_one(rig, cq, 5000)?;
    let data = guest_bytes(rig, mr, 256, 16)?;
    suite.record(
        checks::TARGET_SEND_INTO_POSTED_RECEIVE,
        oracles::target_acked(&sent)
            && oracles::wc_succeeded(&received)
            && matches!(&received, Some(c) if c.byte_len == 16 && c.wr_id == 7)
            && data == pattern,
        format!(
            "target {sent:?}; guest {}; data {data}",
            status_text(&received)
        ),
        t.elapsed(),
    );

    let t = Instant::now();
    ok(rig.agent_call(AgentOp::DeregMr { mr }, RPC)?, "dereg_mr")?;
    target_call(
        rig,
        TargetOp::PostWrite {
            qpn: target_qpn,
            wr_id: 4,
            local: sge(0, 16),
            remote_va: addr,
            remote_rkey: rkey,
            imm: None,
        },
    )?;
    let wc = target_poll(rig, target_qpn)?;
    let state = match target_call(rig, TargetOp::QueryQp { qpn: target_qpn })? {
        TargetReply::QpState(status) => format!("{:?}", status.state),
        other => bail!("roce-target query_qp: unexpected {other:?}"),
    };
    suite.record(
        checks::WRITE_TO_DEREGISTERED_RKEY_IS_NAK_0X62,
        oracles::target_nak_remote_access(&wc) && state.eq_ignore_ascii_case("error"),
        format!("{wc:?}; target QP {state}"),
        t.elapsed(),
    );
    let _ = target_call(rig, TargetOp::DestroyQp { qpn: target_qpn });
    let _ = target_call(rig, TargetOp::DeregisterMr { key: local });

    let t = Instant::now();
    let frames = match target_call(rig, TargetOp::PcapStop)? {
        TargetReply::Pcap { frames, .. } => frames,
        other => bail!("roce-target pcap_stop: unexpected {other:?}"),
    };
    let (decoded, detail) = tshark_check(Path::new(&pcap));
    suite.record(
        checks::PCAP_DECODES_CLEANLY,
        frames > 0 && decoded,
        format!("{frames} frames in {pcap}: {detail}"),
        t.elapsed(),
    );
    Ok(())
}

/// Decodes a capture with tshark: RoCEv2 frames (InfiniBand over UDP 4791) must be there and
/// no frame may be malformed. The guest's own IPv6 housekeeping (ND, MLD) is captured too;
/// the target drops it, and it only has to decode.
fn tshark_check(pcap: &Path) -> (bool, String) {
    let output = std::process::Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args([
            "-T",
            "fields",
            "-e",
            "frame.protocols",
            "-e",
            "_ws.malformed",
            "-e",
            "_ws.expert.message",
        ])
        .output();
    let output = match output {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return (
                false,
                format!(
                    "tshark failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            )
        }
        Err(e) => {
            return (
                false,
                format!("running tshark (install it with `make deps`): {e}"),
            )
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let roce = lines.iter().filter(|l| l.contains("infiniband")).count();
    let malformed: Vec<&&str> = lines
        .iter()
        .filter(|l| l.contains("malformed") || l.contains("Malformed"))
        .collect();
    // Decoded is what matters; the protocols expected are RoCEv2, ARP and the guest's IPv6
    // housekeeping (ND, MLD), which may or may not fall into the capture.
    let unknown: Vec<&&str> = lines
        .iter()
        .filter(|l| !["infiniband", "arp", "ipv6"].iter().any(|p| l.contains(p)))
        .collect();
    (
        roce > 0 && malformed.is_empty() && unknown.is_empty(),
        format!(
            "{} frames decoded, {roce} RoCEv2, malformed {malformed:?}, other {unknown:?}",
            lines.len()
        ),
    )
}
