//! SIGTERM and SIGINT taken synchronously: blocked in every thread, awaited by one.
//!
//! The rig stops a device with SIGTERM and expects its sockets gone afterwards. A handler could
//! only set a flag; blocking the signals before any thread starts and `sigwait`ing on them in the
//! main thread runs the clean-up as ordinary code instead.

use thiserror::Error;

/// A failed signal-mask call, with the errno it returned.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignalError {
    #[error("blocking SIGTERM/SIGINT failed (errno {0}); the process would die without cleaning up its sockets")]
    Block(libc::c_int),
    #[error("waiting for SIGTERM/SIGINT failed (errno {0})")]
    Wait(libc::c_int),
}

/// SIGTERM and SIGINT, blocked in the calling thread and in every thread it starts afterwards.
pub struct ExitSignals {
    set: libc::sigset_t,
}

impl std::fmt::Debug for ExitSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExitSignals(SIGTERM, SIGINT)")
    }
}

impl ExitSignals {
    /// Blocks the exit signals. Call it first in `main`, before any thread is spawned, so that no
    /// thread can receive them asynchronously.
    pub fn block() -> Result<Self, SignalError> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame; the calls only write to it and
        // to this thread's signal mask.
        let rc = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(SignalError::Block(rc));
        }
        Ok(Self { set })
    }

    /// Waits until SIGTERM or SIGINT arrives and returns which.
    pub fn wait(&self) -> Result<libc::c_int, SignalError> {
        let mut signal: libc::c_int = 0;
        // SAFETY: `self.set` is an initialised set and `signal` a valid out pointer.
        let rc = unsafe { libc::sigwait(&self.set, &mut signal) };
        if rc != 0 {
            return Err(SignalError::Wait(rc));
        }
        Ok(signal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raises `signal` at the calling thread only (the test harness's other threads stay as
    /// they are).
    fn raise_here(signal: libc::c_int) {
        // SAFETY: pthread_self is always valid for the calling thread.
        let rc = unsafe { libc::pthread_kill(libc::pthread_self(), signal) };
        assert_eq!(rc, 0);
    }

    #[test]
    fn a_blocked_signal_is_returned_by_wait_instead_of_killing_the_process() {
        let signals = ExitSignals::block().expect("block");
        raise_here(libc::SIGTERM);
        assert_eq!(signals.wait(), Ok(libc::SIGTERM));
        raise_here(libc::SIGINT);
        assert_eq!(signals.wait(), Ok(libc::SIGINT));
    }

    #[test]
    fn a_thread_started_after_block_inherits_the_mask() {
        let _signals = ExitSignals::block().expect("block");
        let inherited = std::thread::spawn(|| {
            // SAFETY: sigset_t is plain data, filled in by pthread_sigmask below.
            let mut current: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: a null new set only reads this thread's mask into `current`.
            let rc =
                unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut current) };
            assert_eq!(rc, 0);
            // SAFETY: `current` was initialised by pthread_sigmask.
            unsafe {
                libc::sigismember(&current, libc::SIGTERM) == 1
                    && libc::sigismember(&current, libc::SIGINT) == 1
            }
        })
        .join()
        .expect("thread");
        assert!(inherited);
    }
}
