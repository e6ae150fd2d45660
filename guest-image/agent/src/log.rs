//! Log lines for the harness: every line starts with "guest-agent:" so console.log can be grepped.
//!
//! The sink is /dev/console once devtmpfs is mounted (the serial console the harness records),
//! stderr before that and when the agent runs outside a guest. /dev/kmsg is not used: it
//! rate-limits user space to a burst of 10 lines, which would drop lines during bring-up.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

static SINK: Mutex<Option<File>> = Mutex::new(None);

/// Sends later log lines to `path` (a console device); stays on stderr if it cannot be opened.
pub fn use_console(path: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NOCTTY: the console must not become init's controlling terminal.
    let console = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)?;
    let mut sink = SINK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    *sink = Some(console);
    Ok(())
}

/// Writes one prefixed line; logging never fails the caller.
pub fn line(message: std::fmt::Arguments<'_>) {
    // One write per line so lines from several threads do not interleave mid-line.
    let text = format!("guest-agent: {message}\n");
    let mut sink = SINK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let written = match sink.as_mut() {
        Some(console) => console.write_all(text.as_bytes()).is_ok(),
        None => false,
    };
    if !written {
        write_stderr(&text);
    }
}

/// `agent_log!("format", args...)`: one line on the console with the agent's prefix.
#[macro_export]
macro_rules! agent_log {
    ($($arg:tt)*) => {
        $crate::log::line(format_args!($($arg)*))
    };
}

#[cfg(not(test))]
fn write_stderr(text: &str) {
    // Not eprint!: it panics when stderr is closed, which it may be for init.
    let _ = std::io::stderr().write_all(text.as_bytes());
}

#[cfg(test)]
fn write_stderr(text: &str) {
    // eprint! is captured by the test harness, so passing tests stay quiet.
    eprint!("{text}");
}
