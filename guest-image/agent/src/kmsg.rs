//! The kernel log through /dev/kmsg, formatted like dmesg: "[seconds.micros] message".

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{AgentError, Result};

/// The reply must fit one RPC line (4 MiB); keep the newest part of a larger log.
pub const MAX_TEXT_BYTES: usize = 3 << 20;

/// Formats one /dev/kmsg record ("prio,seq,usec,flags;text\n KEY=value\n...") as a dmesg line.
/// Dictionary continuation lines (starting with a space) are dropped.
pub fn format_record(record: &str) -> Option<String> {
    let (header, rest) = record.split_once(';')?;
    let message = rest.lines().next().unwrap_or("");
    let micros: u64 = header.split(',').nth(2)?.parse().ok()?;
    Some(format!(
        "[{:5}.{:06}] {message}",
        micros / 1_000_000,
        micros % 1_000_000
    ))
}

/// Reads every record currently in the kernel's buffer: each open of /dev/kmsg starts at the
/// oldest record, and O_NONBLOCK makes the end of the buffer an EAGAIN instead of a wait.
pub fn read_log(path: &Path) -> Result<String> {
    let mut kmsg = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| AgentError::os(format!("opening {}", path.display()), e))?;
    let mut text = String::new();
    // A record is at most about 8 KiB (PRINTK_MESSAGE_MAX plus the dictionary).
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match kmsg.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => {
                let record = String::from_utf8_lossy(&buffer[..count]);
                if let Some(line) = format_record(&record) {
                    text.push_str(&line);
                    text.push('\n');
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            // EPIPE: the record we were about to read was overwritten; the next read goes on
            // with the oldest one still there.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(AgentError::os(format!("reading {}", path.display()), e)),
        }
    }
    Ok(keep_tail(text, MAX_TEXT_BYTES))
}

/// Cuts `text` to its last `limit` bytes at a line boundary, saying so on the first line.
pub fn keep_tail(text: String, limit: usize) -> String {
    if text.len() <= limit {
        return text;
    }
    let mut start = text.len() - limit;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let start = text[start..]
        .find('\n')
        .map_or(text.len(), |newline| start + newline + 1);
    format!(
        "[guest-agent: {start} earlier bytes of the log left out]\n{}",
        &text[start..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_dmesg_lines_without_dictionary() {
        assert_eq!(
            format_record("6,339,5140900,-;NET: Registered PF_INET6\n SUBSYSTEM=net\n").as_deref(),
            Some("[    5.140900] NET: Registered PF_INET6")
        );
        assert_eq!(
            format_record("4,1,12,c;x").as_deref(),
            Some("[    0.000012] x")
        );
        assert_eq!(format_record("garbage"), None);
        assert_eq!(format_record("6,1,notanumber,-;x"), None);
    }

    #[test]
    fn long_logs_keep_their_tail_at_a_line_boundary() {
        let text = "line one\nline two\nline three\n".to_owned();
        assert_eq!(keep_tail(text.clone(), 100), text);
        let cut = keep_tail(text, 12);
        assert!(cut.ends_with("\nline three\n"), "{cut}");
        assert!(cut.starts_with("[guest-agent: 18 earlier bytes"), "{cut}");
    }

    #[test]
    fn reading_a_regular_file_reads_records_once() {
        // A regular file returns everything in one read; good enough to exercise the loop.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kmsg");
        std::fs::write(&path, "6,1,1000000,-;hello\n").expect("write");
        assert_eq!(read_log(&path).expect("read"), "[    1.000000] hello\n");
        assert_eq!(
            read_log(&dir.path().join("absent"))
                .expect_err("absent")
                .errno(),
            libc::ENOENT
        );
    }
}
