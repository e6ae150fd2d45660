//! Tests of dispatch against the fake platform (crate::fake).
use super::*;
use crate::fake::{err, ok, FakeDevice, FakePlatform};

const BDF: &str = "0000:02:00.0";

fn agent() -> (Agent<FakePlatform>, Arc<FakeDevice>) {
    let (platform, device) = FakePlatform::with_nvme(BDF);
    (Agent::new(platform), device)
}

fn open(agent: &Agent<FakePlatform>) -> u32 {
    match ok(agent, AgentOp::VfioOpen { bdf: BDF.into() }) {
        AgentReply::Device { device } => device,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn hello_reports_release_and_version() {
    let (agent, _) = agent();
    assert_eq!(
        ok(&agent, AgentOp::Hello),
        AgentReply::Hello {
            kernel_release: "6.1.0-fake".into(),
            agent_version: env!("CARGO_PKG_VERSION").into()
        }
    );
}

#[test]
fn open_fds_counts_what_the_process_holds() {
    let (agent, _) = agent();
    let count = |agent: &Agent<FakePlatform>| match ok(agent, AgentOp::OpenFds) {
        AgentReply::Value { value } => value,
        other => panic!("unexpected {other:?}"),
    };
    let before = count(&agent);
    let file = std::fs::File::open("/proc/self/fd").expect("open");
    // Other test threads open files too: at least one more, never fewer than that.
    assert!(count(&agent) > before, "the extra fd is counted");
    drop(file);
}

#[test]
fn find_pci_rejects_classes_wider_than_24_bits() {
    let (agent, _) = agent();
    assert_eq!(
        ok(&agent, AgentOp::FindPci { class: 0x010802 }),
        AgentReply::Pci {
            functions: vec![BDF.into()]
        }
    );
    assert_eq!(
        err(&agent, AgentOp::FindPci { class: 0x0100_0000 }).errno,
        libc::EINVAL
    );
}

#[test]
fn handles_start_at_one_and_are_not_reused() {
    let (agent, _) = agent();
    let first = open(&agent);
    assert_eq!(first, 1);
    ok(&agent, AgentOp::VfioClose { device: first });
    let second = open(&agent);
    assert_eq!(second, 2);
    let error = err(&agent, AgentOp::VfioClose { device: first });
    assert_eq!(error.errno, libc::EBADF);
    assert!(
        error.message.starts_with("vfio_close device 1: "),
        "{}",
        error.message
    );
}

#[test]
fn seed_export_passes_arguments_through_and_reports_size() {
    let (agent, device) = agent();
    let handle = open(&agent);
    let reply = ok(
        &agent,
        AgentOp::DmabufExport {
            device: handle,
            bar: 2,
            offset: 0x1000,
            length: 0x2000,
            uapi: DmabufUapi::SeedV1,
        },
    );
    assert_eq!(
        reply,
        AgentReply::Dmabuf {
            dmabuf: 1,
            size: 0x2000
        }
    );
    // Invalid arguments are the kernel's to judge: a ROM index goes through as is.
    let _ = agent.handle(&AgentOp::DmabufExport {
        device: handle,
        bar: 6,
        offset: 1,
        length: 0,
        uapi: DmabufUapi::Upstream,
    });
    assert_eq!(
        *lock(&device.exports),
        [
            DmabufRequest::SeedV1 {
                region_index: 2,
                offset: 0x1000,
                length: 0x2000
            },
            DmabufRequest::Upstream {
                region_index: 6,
                offset: 1,
                length: 0
            }
        ]
    );
    ok(&agent, AgentOp::DmabufClose { dmabuf: 1 });
    assert_eq!(
        err(&agent, AgentOp::DmabufClose { dmabuf: 1 }).errno,
        libc::EBADF
    );
}

#[test]
fn seed_export_offset_beyond_32_bits_is_refused_by_the_agent() {
    let (agent, device) = agent();
    let handle = open(&agent);
    let error = err(
        &agent,
        AgentOp::DmabufExport {
            device: handle,
            bar: 2,
            offset: 1 << 32,
            length: 0x1000,
            uapi: DmabufUapi::SeedV1,
        },
    );
    assert_eq!(error.errno, libc::EINVAL);
    assert!(error.message.contains("32-bit offset"), "{}", error.message);
    assert!(error.message.contains("agent"), "{}", error.message);
    assert!(lock(&device.exports).is_empty(), "kernel not asked");
}

#[test]
fn kernel_export_errors_carry_the_kernel_errno() {
    let (agent, device) = agent();
    let handle = open(&agent);
    *lock(&device.export_errno) = Some(libc::ENODEV);
    let error = err(
        &agent,
        AgentOp::DmabufExport {
            device: handle,
            bar: 0,
            offset: 0,
            length: 0,
            uapi: DmabufUapi::Upstream,
        },
    );
    assert_eq!(error.errno, libc::ENODEV);
    assert!(
        error
            .message
            .starts_with("dmabuf_export device 1 bar 0 offset 0x0 length 0x0 uapi upstream: "),
        "{}",
        error.message
    );
}

#[test]
fn bar_accesses_round_trip_and_are_checked_first() {
    let (agent, _) = agent();
    let device = open(&agent);
    let write = |bar, offset, width, value| AgentOp::BarWrite {
        device,
        bar,
        offset,
        width,
        value,
    };
    let read = |bar, offset, width| AgentOp::BarRead {
        device,
        bar,
        offset,
        width,
    };
    ok(&agent, write(0, 0x1000, 4, 0x1f));
    assert_eq!(
        ok(&agent, read(0, 0x1000, 4)),
        AgentReply::Value { value: 0x1f }
    );
    ok(&agent, write(2, (1 << 20) - 8, 8, u64::MAX));
    assert_eq!(
        ok(&agent, read(2, (1 << 20) - 2, 2)),
        AgentReply::Value { value: 0xffff }
    );
    for (op, why) in [
        (write(0, 0x1001, 4, 0), "aligned"),
        (write(0, 0x4000, 1, 0), "past the end"),
        (write(0, u64::MAX - 3, 4, 0), "past the end"),
        (write(0, 0, 3, 0), "width"),
        (write(0, 0, 1, 0x100), "does not fit"),
        (read(1, 0, 4), "not implemented"),
        (read(6, 0, 4), "not a BAR"),
        (read(0, 2, 8), "aligned"),
    ] {
        let error = err(&agent, op);
        assert_eq!(error.errno, libc::EINVAL, "{}", error.message);
        assert!(error.message.contains(why), "{} lacks {why}", error.message);
    }
    assert_eq!(
        err(
            &agent,
            AgentOp::BarRead {
                device: 9,
                bar: 0,
                offset: 0,
                width: 4
            }
        )
        .errno,
        libc::EBADF
    );
}

#[test]
fn config_accesses_and_reset() {
    let (agent, fake) = agent();
    let device = open(&agent);
    ok(
        &agent,
        AgentOp::ConfigWrite {
            device,
            offset: 4,
            width: 2,
            value: 0x0006,
        },
    );
    assert_eq!(
        ok(
            &agent,
            AgentOp::ConfigRead {
                device,
                offset: 4,
                width: 2
            }
        ),
        AgentReply::Value { value: 6 }
    );
    assert_eq!(
        err(
            &agent,
            AgentOp::ConfigRead {
                device,
                offset: 0,
                width: 8
            }
        )
        .errno,
        libc::EINVAL
    );
    assert_eq!(
        err(
            &agent,
            AgentOp::ConfigRead {
                device,
                offset: 4096,
                width: 1
            }
        )
        .errno,
        libc::EINVAL
    );
    ok(&agent, AgentOp::VfioReset { device });
    assert_eq!(*lock(&fake.resets), 1);
    assert_eq!(
        ok(&agent, AgentOp::VfioHotReset { device }),
        AgentReply::Pci {
            functions: vec![BDF.into()]
        }
    );
    assert_eq!(*lock(&fake.resets), 2);
    assert_eq!(
        ok(&agent, AgentOp::VfioRegion { device, index: 2 }),
        AgentReply::Region {
            index: 2,
            flags: 7,
            size: 1 << 20,
            offset: 2 << 40
        }
    );
    assert_eq!(
        err(&agent, AgentOp::VfioRegion { device, index: 9 }).errno,
        libc::EINVAL
    );
}

#[test]
fn closing_the_device_keeps_its_dmabufs_open() {
    let (agent, _) = agent();
    let device = open(&agent);
    let export = AgentOp::DmabufExport {
        device,
        bar: 2,
        offset: 0,
        length: 0x1000,
        uapi: DmabufUapi::SeedV1,
    };
    ok(&agent, export.clone());
    ok(&agent, AgentOp::VfioClose { device });
    assert_eq!(err(&agent, export).errno, libc::EBADF);
    ok(&agent, AgentOp::DmabufClose { dmabuf: 1 });
}

#[test]
fn power_off_answers_done_then_asks_for_power_off() {
    let (agent, _) = agent();
    assert_eq!(
        agent.handle(&AgentOp::PowerOff),
        (Outcome::Ok(AgentReply::Done), After::PowerOff)
    );
    assert_eq!(
        agent.handle(&AgentOp::Sleep { ms: 0 }),
        (Outcome::Ok(AgentReply::Done), After::Nothing)
    );
    assert_eq!(
        err(
            &agent,
            AgentOp::Sleep {
                ms: MAX_SLEEP_MS + 1
            }
        )
        .errno,
        libc::EINVAL
    );
}

#[test]
fn bind_errors_name_the_function() {
    let (agent, _) = agent();
    ok(&agent, AgentOp::VfioBind { bdf: BDF.into() });
    let error = err(
        &agent,
        AgentOp::VfioBind {
            bdf: "../../x".into(),
        },
    );
    assert_eq!(error.errno, libc::EINVAL);
    assert!(
        error.message.starts_with("vfio_bind ../../x: "),
        "{}",
        error.message
    );
    assert_eq!(
        err(
            &agent,
            AgentOp::VfioOpen {
                bdf: "0000:09:00.0".into()
            }
        )
        .errno,
        libc::ENOENT
    );
}
