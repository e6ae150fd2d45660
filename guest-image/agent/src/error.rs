//! The one error type every operation returns; it always knows the errno the reply carries.

use std::io;

/// Why an operation failed. Each variant maps to the errno the harness sees, so a scenario can
/// tell "the kernel said EINVAL" from "the agent refused the arguments" by errno and message.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A system call failed; `what` says which one and on what.
    #[error("{what}: {source}")]
    Os {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The agent itself rejected the arguments before asking the kernel (EINVAL).
    #[error("{0}")]
    Invalid(String),
    /// A device or dma-buf handle that is not (or no longer) open (EBADF).
    #[error("{0}")]
    BadHandle(String),
    /// Something the agent looked for is not there (ENOENT).
    #[error("{0}")]
    NotFound(String),
    /// The system is in a state the operation cannot work with, with the errno to report.
    #[error("{message}")]
    State { errno: i32, message: String },
}

impl AgentError {
    /// Wraps an I/O error with a description of the call that failed.
    pub fn os(what: impl Into<String>, source: io::Error) -> Self {
        Self::Os {
            what: what.into(),
            source,
        }
    }

    /// The last OS error (errno) after a failed libc call.
    pub fn last_os(what: impl Into<String>) -> Self {
        Self::os(what, io::Error::last_os_error())
    }

    /// The Linux errno of this error; EIO for an I/O error without one (should not happen).
    pub fn errno(&self) -> i32 {
        match self {
            Self::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Self::Invalid(_) => libc::EINVAL,
            Self::BadHandle(_) => libc::EBADF,
            Self::NotFound(_) => libc::ENOENT,
            Self::State { errno, .. } => *errno,
        }
    }
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_follows_the_variant_and_the_os_error() {
        let os = AgentError::os("open /x", io::Error::from_raw_os_error(libc::EBUSY));
        assert_eq!(os.errno(), libc::EBUSY);
        assert_eq!(
            os.to_string(),
            format!("open /x: {}", io::Error::from_raw_os_error(libc::EBUSY))
        );
        assert_eq!(AgentError::Invalid("x".into()).errno(), libc::EINVAL);
        assert_eq!(AgentError::BadHandle("x".into()).errno(), libc::EBADF);
        assert_eq!(AgentError::NotFound("x".into()).errno(), libc::ENOENT);
        let state = AgentError::State {
            errno: libc::ENODEV,
            message: "m".into(),
        };
        assert_eq!(state.errno(), libc::ENODEV);
    }
}
