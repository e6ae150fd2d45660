//! The vfio-user side: region and IRQ tables for the rust-vmm `vfio_user` crate, the
//! backend that forwards to [`Device`], and a loop that serves one client after another.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use p2prig_protocol::event::EventKind;
use vfio_bindings::bindings::vfio::{
    vfio_region_info, vfio_region_sparse_mmap_area, VFIO_IRQ_INFO_EVENTFD,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{
    DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion, SparseArea,
};

use crate::device::{CmbMode, Device, ResetCause, NUM_REGIONS, REGION_CMB};

/// Why the vfio-user endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A live socket (another instance), a non-socket file, or a failed bind.
    #[error(transparent)]
    Socket(#[from] device_support::SocketError),
    #[error("binding {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Forwards the crate's callbacks to the device.
#[derive(Debug)]
pub struct DeviceBackend {
    device: Arc<Device>,
}

impl DeviceBackend {
    pub fn new(device: Arc<Device>) -> Self {
        Self { device }
    }
}

impl ServerBackend for DeviceBackend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        self.device
            .region_read(region, offset, data)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        // QEMU posts BAR writes (NO_REPLY) and the crate answers an error even to a posted
        // message, which QEMU would read as the reply to some later request. A refused write
        // is therefore dropped, as PCI drops a write nobody claims, and recorded as a
        // bad_request event by the device; the client always sees success.
        let _ = self.device.region_write(region, offset, data);
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        _offset: u64,
        _address: u64,
        _size: u64,
        _fd: Option<File>,
    ) -> io::Result<()> {
        // The device never masters DMA (and the crate cannot send DMA_READ/DMA_WRITE), so a
        // mapping is accepted and its fd closed.
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, _address: u64, _size: u64) -> io::Result<()> {
        // Nothing is mapped, so the crate's misnumbered unmap flags do not matter here.
        Ok(())
    }

    fn reset(&mut self) -> io::Result<()> {
        // The reply goes out when the reset is over. Keep --reset-ms below QEMU's
        // x-msg-timeout (5000 ms by default) or QEMU gives up on the reply.
        self.device.reset_and_wait(ResetCause::VfioUser);
        Ok(())
    }

    fn set_irqs(
        &mut self,
        _index: u32,
        _flags: u32,
        _start: u32,
        _count: u32,
        _fds: Vec<File>,
    ) -> io::Result<()> {
        // The function raises no interrupts; eventfds are accepted and closed.
        Ok(())
    }
}

/// Region table: BAR0, BAR2 (CMB) and config space have a size; BAR1/3 (upper halves of the
/// 64-bit BARs), BAR4/5, ROM and VGA are absent. QEMU wants at least 8 regions.
pub fn regions(device: &Device) -> Vec<ServerRegion> {
    (0..NUM_REGIONS)
        .map(|index| {
            let size = device.region_size(index);
            let mut flags = if size > 0 {
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
            } else {
                0
            };
            let mut sparse_areas = Vec::new();
            let mut mmap_fd = None;
            if index == REGION_CMB && device.settings().cmb_mode == CmbMode::Mmap {
                // The crate sends the fd only with a sparse-mmap capability; one area over the
                // whole BAR maps it all.
                flags |= VFIO_REGION_INFO_FLAG_MMAP;
                sparse_areas.push(SparseArea {
                    area: vfio_region_sparse_mmap_area { offset: 0, size },
                });
                mmap_fd = Some(device.cmb().raw_fd());
            }
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas,
                mmap_fd,
            }
        })
        .collect()
}

/// IRQ indexes of a VFIO PCI device (INTx, MSI, MSI-X, ERR, REQ). None is ever raised;
/// QEMU wants at least three indexes.
pub fn irqs() -> Vec<IrqInfo> {
    [(0, 1), (1, 0), (2, 0), (3, 1), (4, 1)]
        .into_iter()
        .map(|(index, count)| IrqInfo {
            index,
            flags: if count > 0 { VFIO_IRQ_INFO_EVENTFD } else { 0 },
            count,
        })
        .collect()
}

/// The listening vfio-user socket.
#[derive(Debug)]
pub struct Endpoint {
    server: ServerHandle,
    /// A second handle on the listening socket, to see a client arrive before the crate
    /// accepts it.
    watch: OwnedFd,
    path: PathBuf,
}

/// `vfio_user::Server` has no Debug.
struct ServerHandle(Server);

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("vfio_user::Server")
    }
}

/// Binds a unix listener at `path`, mode 0600, replacing a stale socket left by a killed
/// process; a socket another instance serves, or any other file, is refused (see
/// [`device_support::bind_private_socket`]).
pub fn bind_unix(path: &Path) -> Result<UnixListener, ServerError> {
    Ok(device_support::bind_private_socket(path)?)
}

impl Endpoint {
    /// Listens on `path` for the device.
    pub fn bind(path: &Path, device: &Device) -> Result<Self, ServerError> {
        Self::from_listener(bind_unix(path)?, path, device)
    }

    /// Serves the device on `listener`, already bound at `path` (with [`bind_unix`]): a
    /// caller may bind before the device exists, to check the path is free first.
    pub fn from_listener(
        listener: UnixListener,
        path: &Path,
        device: &Device,
    ) -> Result<Self, ServerError> {
        let watch = listener
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| ServerError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        let server = Server::from_owned_fd(OwnedFd::from(listener), true, irqs(), regions(device));
        Ok(Self {
            server: ServerHandle(server),
            watch,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout_ms` for a client to be waiting; true if one is.
    fn client_waiting(&self, timeout_ms: i32) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.watch.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout_ms) };
        rc > 0 && fds[0].revents & libc::POLLIN != 0
    }

    /// Serves one client after another until `stop` is set (checked between clients).
    pub fn serve(&self, device: &Arc<Device>, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            if !self.client_waiting(200) {
                continue;
            }
            self.serve_one(device);
        }
    }

    /// Accepts and serves one client; returns when it leaves or its stream breaks.
    pub fn serve_one(&self, device: &Arc<Device>) {
        let log = device.log();
        log.record(EventKind::Client { connected: true });
        let mut backend = DeviceBackend::new(Arc::clone(device));
        // The crate panics on some malformed messages (e.g. VERSION without a NUL-terminated
        // JSON payload); the panic ends this connection only, and the next client is served.
        let outcome = catch_unwind(AssertUnwindSafe(|| self.server.0.run(&mut backend)));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e @ vfio_user::Error::SocketAccept(_))) => {
                device.bad_request(format!("vfio-user accept failed: {e}"));
                // Out of fds or similar: give the system a moment rather than spin.
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Ok(Err(e)) => device.bad_request(format!("vfio-user connection ended: {e}")),
            Err(_) => device.bad_request(
                "vfio-user connection ended by a panic in the vfio_user crate".to_string(),
            ),
        }
        log.record(EventKind::Client { connected: false });
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
