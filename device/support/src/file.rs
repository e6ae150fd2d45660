//! Output files a device writes (nvme-cmb's trace, roce-target's captures): created mode
//! 0600 whatever the umask, never through a symbolic link, and only ever regular files.
//!
//! A trace records every access of the guest and a capture every frame; neither is for other
//! users of the host. A symbolic link at the path would redirect the write (and the
//! truncation) to a file the device never meant to touch, and a FIFO would block open(2)
//! until someone reads it, with SIGTERM blocked, so the device could not even be stopped.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The mode of every file [`create_private_file`] creates or opens.
pub const FILE_MODE: u32 = 0o600;

/// Why an output file could not be opened.
#[derive(Debug, Error)]
pub enum FileError {
    #[error(
        "{} is a symbolic link; refusing to follow it (remove it or pick another path)",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error("{} is a {kind}, not a regular file; refusing to write to it", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{} {}: {source}", step, path.display())]
    Io {
        /// What was being done: "opening", "truncating", ...
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<FileError> for io::Error {
    fn from(error: FileError) -> Self {
        let kind = match &error {
            FileError::Symlink { .. } | FileError::NotRegular { .. } => io::ErrorKind::InvalidInput,
            FileError::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, error)
    }
}

fn kind_of(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_fifo() {
        "FIFO"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else if file_type.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Opens `path` for writing, creating it mode 0600; `truncate` empties it, otherwise every
/// write appends.
///
/// The last component is opened with O_NOFOLLOW (a symbolic link is refused) and O_NONBLOCK
/// (a FIFO cannot block the open); then anything but a regular file is refused, O_NONBLOCK
/// is cleared, the mode is set to 0600 (a file that already existed keeps no wider mode) and
/// only then is the file truncated.
pub fn create_private_file(path: &Path, truncate: bool) -> Result<File, FileError> {
    let io_error = |step: &'static str| {
        move |source: io::Error| FileError::Io {
            step,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut options = OpenOptions::new();
    options
        .create(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
    if truncate {
        options.write(true);
    } else {
        options.append(true);
    }
    let file = match options.open(path) {
        Ok(file) => file,
        Err(e) => {
            // ELOOP: a symlink (O_NOFOLLOW); ENXIO: a FIFO without a reader; EISDIR; and so
            // on: name what is there when it is not a regular file.
            let meta = std::fs::symlink_metadata(path).ok();
            return Err(match meta.map(|m| m.file_type()) {
                Some(t) if t.is_symlink() => FileError::Symlink {
                    path: path.to_path_buf(),
                },
                Some(t) if !t.is_file() => FileError::NotRegular {
                    path: path.to_path_buf(),
                    kind: kind_of(t),
                },
                _ => io_error("opening")(e),
            });
        }
    };
    let meta = file.metadata().map_err(io_error("looking at"))?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor `file` owns; no memory is passed.
    let rc = unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(io_error("clearing O_NONBLOCK on")(
            io::Error::last_os_error(),
        ));
    }
    if meta.mode() & 0o7777 != FILE_MODE {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
            .map_err(io_error("making mode 0600"))?;
    }
    if truncate {
        file.set_len(0).map_err(io_error("truncating"))?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").mode() & 0o7777
    }

    #[test]
    fn a_new_file_is_mode_0600_and_truncate_empties_an_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("trace.jsonl");
        create_private_file(&path, true)
            .expect("create")
            .write_all(b"first\n")
            .expect("write");
        assert_eq!(mode(&path), 0o600);
        create_private_file(&path, false)
            .expect("append")
            .write_all(b"second\n")
            .expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"first\nsecond\n");
        create_private_file(&path, true).expect("truncate");
        assert_eq!(std::fs::read(&path).expect("read"), b"");
    }

    #[test]
    fn an_existing_wider_file_is_narrowed_to_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.pcap");
        std::fs::write(&path, b"x").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        create_private_file(&path, true).expect("open");
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_symlink_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("precious");
        std::fs::write(&target, b"keep").expect("write");
        let link = dir.path().join("trace.jsonl");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let error = create_private_file(&link, true).expect_err("refused");
        assert!(matches!(error, FileError::Symlink { .. }), "{error}");
        assert_eq!(std::fs::read(&target).expect("read"), b"keep");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking_with_or_without_a_reader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("fifo");
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: `name` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let error = create_private_file(&fifo, true).expect_err("no reader");
        assert!(
            matches!(error, FileError::NotRegular { kind: "FIFO", .. }),
            "{error}"
        );
        let _reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("reader");
        let error = create_private_file(&fifo, true).expect_err("with a reader");
        assert!(
            matches!(error, FileError::NotRegular { kind: "FIFO", .. }),
            "{error}"
        );
        assert!(error.to_string().contains("not a regular file"), "{error}");
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let error = create_private_file(dir.path(), true).expect_err("refused");
        assert!(
            matches!(
                error,
                FileError::NotRegular {
                    kind: "directory",
                    ..
                }
            ),
            "{error}"
        );
    }
}
