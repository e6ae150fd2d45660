//! The iommufd, VFIO cdev, low-power and edu requests: argument checks, the iommufd and
//! DMA-memory handle tables, then the platform's [`crate::iommufd::Iommu`] and devices.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use p2prig_protocol::agent::{AgentReply, EduDirection};

use crate::dispatch::{lock, Agent};
use crate::edu;
use crate::error::{AgentError, Result};
use crate::iommufd::{DmaMemory, Iommu};
use crate::platform::Platform;
use crate::rdma::{check_range, from_hex};

/// Largest DMA memory one request maps (the guest has little RAM).
pub const MAX_DMA_MEMORY: u64 = 16 << 20;
/// Largest dma_memory_read/dma_memory_write (its hex must fit a reply line).
pub const MAX_DMA_IO: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn check_pages(what: &str, value: u64) -> Result<()> {
    if !value.is_multiple_of(PAGE) {
        return Err(AgentError::Invalid(format!(
            "{what} {value:#x} is not a multiple of the 4 KiB page"
        )));
    }
    Ok(())
}

impl<P: Platform> Agent<P> {
    fn iommufd(&self, iommufd: u32) -> Result<Arc<dyn Iommu>> {
        lock(&self.iommufds)
            .entries
            .get(&iommufd)
            .cloned()
            .ok_or_else(|| AgentError::BadHandle(format!("no open iommufd has handle {iommufd}")))
    }

    fn dma_memory(&self, memory: u32) -> Result<Arc<DmaMemory>> {
        lock(&self.dma_memory)
            .entries
            .get(&memory)
            .cloned()
            .ok_or_else(|| AgentError::BadHandle(format!("no DMA memory has handle {memory}")))
    }

    pub(crate) fn iommufd_open(&self) -> Result<AgentReply> {
        let iommu = self.platform.iommufd_open()?;
        Ok(AgentReply::Iommufd {
            iommufd: lock(&self.iommufds).insert(iommu),
        })
    }

    pub(crate) fn iommufd_close(&self, iommufd: u32) -> Result<AgentReply> {
        match lock(&self.iommufds).entries.remove(&iommufd) {
            Some(_) => Ok(AgentReply::Done),
            None => Err(AgentError::BadHandle(format!(
                "no open iommufd has handle {iommufd}"
            ))),
        }
    }

    pub(crate) fn vfio_cdev_open(&self, bdf: &str, iommufd: u32) -> Result<AgentReply> {
        let iommu = self.iommufd(iommufd)?;
        let (device, dev_id) = self.platform.vfio_cdev_open(bdf, iommu.raw_fd())?;
        Ok(AgentReply::CdevDevice {
            device: self.insert_device(device),
            dev_id,
        })
    }

    pub(crate) fn ioas_alloc(&self, iommufd: u32) -> Result<AgentReply> {
        Ok(AgentReply::Ioas {
            ioas: self.iommufd(iommufd)?.ioas_alloc()?,
        })
    }

    pub(crate) fn ioas_attach(&self, device: u32, ioas: u32) -> Result<AgentReply> {
        self.device(device)?.attach_ioas(ioas)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn ioas_map_memory(
        &self,
        iommufd: u32,
        ioas: u32,
        iova: u64,
        length: u64,
    ) -> Result<AgentReply> {
        let iommu = self.iommufd(iommufd)?;
        if length == 0 || length > MAX_DMA_MEMORY {
            return Err(AgentError::Invalid(format!(
                "length {length:#x} is not in 1..={MAX_DMA_MEMORY:#x}"
            )));
        }
        check_pages("length", length)?;
        // The IOVA is the kernel's to judge (alignment, reserved ranges, overlap).
        let memory = DmaMemory::new(length as usize)?;
        // On failure `memory` is unmapped again: nothing leaks.
        iommu.map_user(ioas, memory.address(), length, iova)?;
        Ok(AgentReply::DmaMemory {
            memory: lock(&self.dma_memory).insert(Arc::new(memory)),
        })
    }

    pub(crate) fn ioas_map_dmabuf(
        &self,
        iommufd: u32,
        ioas: u32,
        dmabuf: u32,
        start: u64,
        length: u64,
        iova: u64,
    ) -> Result<AgentReply> {
        let iommu = self.iommufd(iommufd)?;
        // The table lock is held across the ioctl so the fd cannot be closed under it; a
        // map is quick (it only attaches and pins the dma-buf).
        let dmabufs = lock(&self.dmabufs);
        let fd = dmabufs
            .entries
            .get(&dmabuf)
            .ok_or_else(|| AgentError::BadHandle(format!("no open dma-buf has handle {dmabuf}")))?;
        iommu.map_file(ioas, fd.as_raw_fd(), start, length, iova)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn ioas_unmap(
        &self,
        iommufd: u32,
        ioas: u32,
        iova: u64,
        length: u64,
    ) -> Result<AgentReply> {
        Ok(AgentReply::Value {
            value: self.iommufd(iommufd)?.unmap(ioas, iova, length)?,
        })
    }

    pub(crate) fn iommufd_destroy(&self, iommufd: u32, id: u32) -> Result<AgentReply> {
        self.iommufd(iommufd)?.destroy(id)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn dma_memory_write(
        &self,
        memory: u32,
        offset: u64,
        data: &str,
    ) -> Result<AgentReply> {
        let bytes = from_hex(data)?;
        let len = bytes.len() as u64;
        if len > MAX_DMA_IO {
            return Err(AgentError::Invalid(format!(
                "{len} bytes is more than {MAX_DMA_IO} per dma_memory_write"
            )));
        }
        let target = self.dma_memory(memory)?;
        check_range("the DMA memory", target.len() as u64, offset, len)?;
        target.write(offset as usize, &bytes);
        Ok(AgentReply::Done)
    }

    pub(crate) fn dma_memory_read(
        &self,
        memory: u32,
        offset: u64,
        length: u64,
    ) -> Result<AgentReply> {
        if length > MAX_DMA_IO {
            return Err(AgentError::Invalid(format!(
                "{length} bytes is more than {MAX_DMA_IO} per dma_memory_read"
            )));
        }
        let source = self.dma_memory(memory)?;
        check_range("the DMA memory", source.len() as u64, offset, length)?;
        Ok(AgentReply::Bytes {
            data: p2prig_protocol::hex::encode(&source.read(offset as usize, length as usize)),
        })
    }

    pub(crate) fn dma_memory_free(&self, memory: u32) -> Result<AgentReply> {
        match lock(&self.dma_memory).entries.remove(&memory) {
            Some(_) => Ok(AgentReply::Done),
            None => Err(AgentError::BadHandle(format!(
                "no DMA memory has handle {memory}"
            ))),
        }
    }

    pub(crate) fn vfio_low_power(&self, device: u32, enter: bool) -> Result<AgentReply> {
        self.device(device)?.low_power(enter)?;
        Ok(AgentReply::Done)
    }

    pub(crate) fn edu_dma(
        &self,
        device: u32,
        direction: EduDirection,
        iova: u64,
        buffer: u64,
        count: u64,
        timeout_ms: u64,
    ) -> Result<AgentReply> {
        if timeout_ms > edu::MAX_TIMEOUT_MS {
            return Err(AgentError::Invalid(format!(
                "{timeout_ms} ms is longer than the {} ms limit",
                edu::MAX_TIMEOUT_MS
            )));
        }
        let transfer = edu::Transfer::new(direction, iova, buffer, count)?;
        let device = self.device(device)?;
        let bar0 = Self::bar_region(device.as_ref(), 0)?;
        if bar0.size <= edu::DMA_COMMAND {
            return Err(AgentError::Invalid(format!(
                "BAR 0 has {:#x} bytes: not edu's register block",
                bar0.size
            )));
        }
        edu::run(
            device.as_ref(),
            &bar0,
            transfer,
            Duration::from_millis(timeout_ms),
        )?;
        Ok(AgentReply::Done)
    }
}

#[cfg(test)]
mod tests {
    use p2prig_protocol::agent::{AgentOp, AgentReply, DmabufUapi, EduDirection};

    use crate::dispatch::{lock, Agent};
    use crate::fake::{err, ok, FakePlatform, Mapped};

    const BDF: &str = "0000:04:00.0";

    fn agent_with_iommufd() -> (Agent<FakePlatform>, u32, u32) {
        let (platform, _device) = FakePlatform::with_nvme(BDF);
        let agent = Agent::new(platform);
        let AgentReply::Iommufd { iommufd } = ok(&agent, AgentOp::IommufdOpen) else {
            panic!("not an iommufd")
        };
        let AgentReply::Ioas { ioas } = ok(&agent, AgentOp::IoasAlloc { iommufd }) else {
            panic!("not an ioas")
        };
        (agent, iommufd, ioas)
    }

    #[test]
    fn memory_maps_at_its_iova_round_trips_and_unmaps() {
        let (agent, iommufd, ioas) = agent_with_iommufd();
        let AgentReply::DmaMemory { memory } = ok(
            &agent,
            AgentOp::IoasMapMemory {
                iommufd,
                ioas,
                iova: 0x10_0000,
                length: 0x2000,
            },
        ) else {
            panic!("not memory")
        };
        ok(
            &agent,
            AgentOp::DmaMemoryWrite {
                memory,
                offset: 0x1ffe,
                data: "abcd".into(),
            },
        );
        assert_eq!(
            ok(
                &agent,
                AgentOp::DmaMemoryRead {
                    memory,
                    offset: 0x1ffc,
                    length: 4
                }
            ),
            AgentReply::Bytes {
                data: "0000abcd".into()
            }
        );
        let past_the_end = err(
            &agent,
            AgentOp::DmaMemoryWrite {
                memory,
                offset: 0x1fff,
                data: "abcd".into(),
            },
        );
        assert_eq!(past_the_end.errno, libc::EINVAL);
        let overlapping = err(
            &agent,
            AgentOp::IoasMapMemory {
                iommufd,
                ioas,
                iova: 0x10_1000,
                length: 0x1000,
            },
        );
        assert_eq!(overlapping.errno, libc::EEXIST);
        assert_eq!(
            ok(
                &agent,
                AgentOp::IoasUnmap {
                    iommufd,
                    ioas,
                    iova: 0x10_0000,
                    length: 0x2000
                }
            ),
            AgentReply::Value { value: 0x2000 }
        );
        ok(&agent, AgentOp::DmaMemoryFree { memory });
        assert_eq!(
            err(&agent, AgentOp::DmaMemoryFree { memory }).errno,
            libc::EBADF
        );
    }

    #[test]
    fn sizes_the_agent_cannot_serve_are_refused_before_the_kernel() {
        let (agent, iommufd, ioas) = agent_with_iommufd();
        for length in [0, 0x1001, (16 << 20) + 0x1000] {
            let refused = err(
                &agent,
                AgentOp::IoasMapMemory {
                    iommufd,
                    ioas,
                    iova: 0,
                    length,
                },
            );
            assert_eq!(refused.errno, libc::EINVAL, "{length:#x}");
        }
        let platform = agent.platform();
        assert!(lock(&lock(&platform.iommus)[0].ioas)[&ioas].is_empty());
        assert_eq!(
            err(&agent, AgentOp::IoasAlloc { iommufd: 99 }).errno,
            libc::EBADF
        );
    }

    #[test]
    fn a_dmabuf_maps_by_its_fd_through_a_cdev_device() {
        let (agent, iommufd, ioas) = agent_with_iommufd();
        let AgentReply::CdevDevice { device, dev_id } = ok(
            &agent,
            AgentOp::VfioCdevOpen {
                bdf: BDF.into(),
                iommufd,
            },
        ) else {
            panic!("not a cdev device")
        };
        assert_eq!(dev_id, 0x10);
        ok(&agent, AgentOp::IoasAttach { device, ioas });
        let AgentReply::Dmabuf { dmabuf, .. } = ok(
            &agent,
            AgentOp::DmabufExport {
                device,
                bar: 0,
                offset: 0x1000,
                length: 0x1000,
                uapi: DmabufUapi::Upstream,
            },
        ) else {
            panic!("not a dma-buf")
        };
        ok(
            &agent,
            AgentOp::IoasMapDmabuf {
                iommufd,
                ioas,
                dmabuf,
                start: 0,
                length: 0x1000,
                iova: 0x20_0000,
            },
        );
        let platform = agent.platform();
        let iommus = lock(&platform.iommus);
        let spaces = lock(&iommus[0].ioas);
        assert!(matches!(
            spaces[&ioas][&0x20_0000],
            (0x1000, Mapped::File { start: 0, .. })
        ));
        drop(spaces);
        drop(iommus);
        ok(&agent, AgentOp::DmabufClose { dmabuf });
        let closed = err(
            &agent,
            AgentOp::IoasMapDmabuf {
                iommufd,
                ioas,
                dmabuf,
                start: 0,
                length: 0x1000,
                iova: 0x30_0000,
            },
        );
        assert_eq!(closed.errno, libc::EBADF);
        ok(&agent, AgentOp::IommufdClose { iommufd });
        assert_eq!(
            err(
                &agent,
                AgentOp::IommufdDestroy {
                    iommufd,
                    object: ioas
                }
            )
            .errno,
            libc::EBADF
        );
    }

    #[test]
    fn low_power_entry_and_exit_reach_the_device() {
        let (platform, device) = FakePlatform::with_nvme(BDF);
        let agent = Agent::new(platform);
        let AgentReply::Device { device: handle } =
            ok(&agent, AgentOp::VfioOpen { bdf: BDF.into() })
        else {
            panic!("not a device")
        };
        ok(
            &agent,
            AgentOp::VfioLowPower {
                device: handle,
                enter: true,
            },
        );
        ok(
            &agent,
            AgentOp::VfioLowPower {
                device: handle,
                enter: false,
            },
        );
        assert_eq!(*lock(&device.low_power), vec![true, false]);
    }

    #[test]
    fn an_edu_transfer_programs_the_engine_and_waits_for_its_start_bit() {
        let (platform, device) = FakePlatform::with_nvme(BDF);
        let agent = Agent::new(platform);
        let AgentReply::Device { device: handle } =
            ok(&agent, AgentOp::VfioOpen { bdf: BDF.into() })
        else {
            panic!("not a device")
        };
        // The fake's BAR0 is plain memory: the start bit stays set, so the wait times out
        // after the registers were written.
        let stuck = err(
            &agent,
            AgentOp::EduDma {
                device: handle,
                direction: EduDirection::EduToIova,
                iova: 0x20_1008,
                buffer: 0,
                count: 8,
                timeout_ms: 20,
            },
        );
        assert_eq!(stuck.errno, libc::ETIMEDOUT, "{stuck}");
        let bar0 = lock(&device.regions)[&0].clone();
        let word = |at: usize| u64::from_le_bytes(bar0[at..at + 8].try_into().expect("8 bytes"));
        assert_eq!(word(0x80), 0x40000);
        assert_eq!(word(0x88), 0x20_1008);
        assert_eq!(word(0x90), 8);
        assert_eq!(word(0x98), 3);
        // A second transfer while the first "runs" is refused without touching the registers.
        let busy = err(
            &agent,
            AgentOp::EduDma {
                device: handle,
                direction: EduDirection::IovaToEdu,
                iova: 0x10_0000,
                buffer: 0,
                count: 8,
                timeout_ms: 20,
            },
        );
        assert_eq!(busy.errno, libc::EBUSY, "{busy}");
        let out_of_buffer = err(
            &agent,
            AgentOp::EduDma {
                device: handle,
                direction: EduDirection::IovaToEdu,
                iova: 0,
                buffer: 0xff8,
                count: 16,
                timeout_ms: 20,
            },
        );
        assert_eq!(out_of_buffer.errno, libc::EINVAL);
    }
}
