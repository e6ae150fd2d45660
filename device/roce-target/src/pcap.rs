//! Classic pcap files (the libpcap format Wireshark and tshark open): a 24-byte global
//! header, then a 16-byte record header before every frame. Link type 1 (Ethernet).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const MAGIC_MICROSECONDS: u32 = 0xA1B2_C3D4;
const LINKTYPE_ETHERNET: u32 = 1;
const SNAPLEN: u32 = 65_535;

/// An open capture file.
#[derive(Debug)]
pub struct PcapWriter {
    out: BufWriter<File>,
    path: PathBuf,
    frames: u64,
}

impl PcapWriter {
    /// Creates (truncates) `path`, mode 0600, and writes the global header. A symlink, FIFO
    /// or other non-regular file at `path` is refused (see
    /// [`device_support::create_private_file`]).
    pub fn create(path: &Path) -> io::Result<Self> {
        let mut out = BufWriter::new(device_support::create_private_file(path, true)?);
        let mut header = Vec::with_capacity(24);
        header.extend_from_slice(&MAGIC_MICROSECONDS.to_le_bytes());
        header.extend_from_slice(&2u16.to_le_bytes()); // version 2.4
        header.extend_from_slice(&4u16.to_le_bytes());
        header.extend_from_slice(&0i32.to_le_bytes()); // GMT offset
        header.extend_from_slice(&0u32.to_le_bytes()); // timestamp accuracy
        header.extend_from_slice(&SNAPLEN.to_le_bytes());
        header.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&header)?;
        Ok(Self {
            out,
            path: path.to_path_buf(),
            frames: 0,
        })
    }

    /// Appends one frame stamped with the wall clock.
    pub fn record(&mut self, frame: &[u8]) -> io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.record_at(now.as_secs() as u32, now.subsec_micros(), frame)
    }

    pub fn record_at(&mut self, seconds: u32, micros: u32, frame: &[u8]) -> io::Result<()> {
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let captured = len.min(SNAPLEN);
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&seconds.to_le_bytes());
        header[4..8].copy_from_slice(&micros.to_le_bytes());
        header[8..12].copy_from_slice(&captured.to_le_bytes());
        header[12..16].copy_from_slice(&len.to_le_bytes());
        self.out.write_all(&header)?;
        self.out.write_all(&frame[..captured as usize])?;
        self.frames += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn frames(&self) -> u64 {
        self.frames
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_has_the_libpcap_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.pcap");
        let mut pcap = PcapWriter::create(&path).expect("create");
        pcap.record_at(7, 9, &[1, 2, 3]).expect("record");
        pcap.flush().expect("flush");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes.len(), 24 + 16 + 3);
        assert_eq!(&bytes[0..4], &[0xD4, 0xC3, 0xB2, 0xA1]);
        assert_eq!(&bytes[20..24], &1u32.to_le_bytes());
        assert_eq!(&bytes[24..28], &7u32.to_le_bytes());
        assert_eq!(&bytes[32..36], &3u32.to_le_bytes());
        assert_eq!(&bytes[40..], &[1, 2, 3]);
        assert_eq!(pcap.frames(), 1);
    }
}
