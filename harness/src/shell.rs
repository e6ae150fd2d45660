//! `p2prig shell`: the full rig (nvme-cmb, roce-target, QEMU) booted on one kernel, with a
//! prompt that sends the guest agent's operations and the devices' controls by name. The guest
//! has no shell of its own (the agent is PID 1), so this is the guest's shell: every line is one
//! operation, its reply printed as JSON. `exit`, end of input or Ctrl-C tear the rig down the
//! way a run does.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use p2prig_protocol::agent::AgentOp;
use p2prig_protocol::device::DeviceOp;
use p2prig_protocol::target::TargetOp;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::build::cache::Cache;
use crate::rig::{process, Rig, RigConfig, RunDir};

const PROMPT: &str = "p2prig> ";
/// An agent operation gets this long (a reset or a sleep the user typed can take a while).
const AGENT_TIMEOUT: Duration = Duration::from_secs(120);

const HELP: &str = "\
every line is one operation, its arguments a JSON object (omit it when there are none):
  OP [{...}]            a guest agent operation, e.g.  hello
                          find_pci {\"class\": 67586}     vfio_bind {\"bdf\": \"0000:02:00.0\"}
  device OP [{...}]     nvme-cmb's control socket, e.g.  device stats
                          device events_since {\"since\": 0, \"limit\": 5}
  target OP [{...}]     roce-target's control socket, e.g.  target status
  console [N]           the last N (default 20) lines of the guest's serial console
  help                  this text
  exit                  power the guest off and stop every process (also: end of input, Ctrl-C)
a wrong name lists the known ones; the fields of each are in harness/protocol/src/";

/// What one line asks for.
#[derive(Debug, PartialEq)]
pub enum Command {
    Agent(AgentOp),
    Device(DeviceOp),
    Target(TargetOp),
    Console(usize),
    Help,
    Exit,
    Nothing,
}

/// Parses one line; an error says what is wrong with it and what would be right.
pub fn parse(line: &str) -> Result<Command> {
    let line = line.trim();
    let (word, rest) = split_word(line);
    Ok(match word {
        "" => Command::Nothing,
        "help" | "?" => Command::Help,
        "exit" | "quit" => Command::Exit,
        "console" => Command::Console(if rest.is_empty() {
            20
        } else {
            rest.parse()
                .with_context(|| format!("`console {rest}`: give a number of lines"))?
        }),
        "device" => {
            let (op, args) = split_word(rest);
            Command::Device(operation("device", op, args)?)
        }
        "target" => {
            let (op, args) = split_word(rest);
            Command::Target(operation("target", op, args)?)
        }
        op => Command::Agent(operation("agent", op, rest)?),
    })
}

fn split_word(text: &str) -> (&str, &str) {
    match text.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (text, ""),
    }
}

/// `{"op": op, ...args}` read as the channel's request type.
fn operation<T: DeserializeOwned>(channel: &str, op: &str, args: &str) -> Result<T> {
    if op.is_empty() {
        bail!("`{channel}` needs an operation name: `{channel} OP [{{...}}]`");
    }
    let mut object = if args.is_empty() {
        Map::new()
    } else {
        match serde_json::from_str::<Value>(args) {
            Ok(Value::Object(map)) => map,
            Ok(_) => bail!(
                "the arguments of `{op}` must be a JSON object, like {{\"bdf\": \"0000:02:00.0\"}}"
            ),
            Err(e) => bail!(
                "the arguments of `{op}` are not JSON ({e}): give an object like {{\"since\": 0}}"
            ),
        }
    };
    object.insert("op".into(), Value::String(op.into()));
    serde_json::from_value(Value::Object(object))
        .map_err(|e| anyhow::anyhow!("{channel} operation `{op}`: {e}"))
}

/// Where gdb finds the guest kernel's symbols: the work tree's vmlinux, if that tree's last
/// build is the bzImage being booted (flavors of one source share a work tree).
fn vmlinux_for(cache: &Cache, bzimage: &Path) -> Result<PathBuf> {
    let work_trees = cache.root().join("kernel");
    let booted =
        std::fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    for entry in std::fs::read_dir(&work_trees)
        .with_context(|| format!("listing {}", work_trees.display()))?
    {
        let build = entry?.path().join("build");
        let built = build.join("arch/x86/boot/bzImage");
        if std::fs::read(&built).is_ok_and(|bytes| bytes == booted)
            && build.join("vmlinux").is_file()
        {
            return Ok(build.join("vmlinux"));
        }
    }
    bail!(
        "no kernel work tree under {} last built {}: its vmlinux is gone or was rebuilt for \
         another flavor (remove the cached bzImage's directory to rebuild it)",
        work_trees.display(),
        bzimage.display()
    )
}

/// Boots the rig (`cfg`, with the gdbstub when `gdb`), serves the prompt, then tears it down.
pub fn run(cache: &Cache, mut cfg: RigConfig, kernel: &str, gdb: bool) -> Result<()> {
    if gdb {
        // A free port now; QEMU binds it a moment later.
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        cfg.gdb_port = Some(probe.local_addr()?.port());
        cfg.extra_cmdline = "nokaslr".into();
    }
    let top = RunDir::create("shell")?;
    println!(
        "booting {kernel} under {} (run directory {}) ...",
        cfg.accel.name(),
        top.path.display()
    );
    let mut rig = Rig::boot(&cfg, &top)?;
    println!(
        "rig up in {:.1} s: guest console {}; type `help` for the syntax, `exit` to stop",
        rig.boot_time.as_secs_f64(),
        rig.console_path().display()
    );
    if let Some(port) = cfg.gdb_port {
        match vmlinux_for(cache, &cfg.bzimage) {
            Ok(vmlinux) => println!(
                "gdb: gdb {} -ex 'target remote 127.0.0.1:{port}'",
                vmlinux.display()
            ),
            Err(e) => println!(
                "gdb: QEMU's gdbstub listens on 127.0.0.1:{port}, but no matching vmlinux: {e:#}"
            ),
        }
    }
    let served = serve(&mut rig);
    rig.shutdown()?;
    served
}

/// Reads lines on a thread of its own, so the prompt loop can notice Ctrl-C and a dead guest
/// while the user types nothing.
fn stdin_lines() -> mpsc::Receiver<Option<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            if tx.send(line.ok()).is_err() {
                return;
            }
        }
        let _ = tx.send(None);
    });
    rx
}

/// The prompt loop; returns when the user exits, input ends, Ctrl-C comes or the guest dies.
fn serve(rig: &mut Rig) -> Result<()> {
    let lines = stdin_lines();
    print!("{PROMPT}");
    std::io::stdout().flush()?;
    loop {
        let line = match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(line)) => line,
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                println!();
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if process::interrupted() {
                    println!("\ninterrupted: stopping the rig");
                    return Ok(());
                }
                if !rig.healthy() {
                    bail!(
                        "the guest is gone (QEMU exited or the kernel crashed); its console: {}",
                        rig.console_path().display()
                    );
                }
                continue;
            }
        };
        match parse(&line) {
            Ok(Command::Exit) => return Ok(()),
            Ok(command) => {
                if let Err(e) = execute(rig, command) {
                    println!("error: {e:#}");
                }
            }
            Err(e) => println!("error: {e:#}\n(type `help` for the syntax)"),
        }
        print!("{PROMPT}");
        std::io::stdout().flush()?;
    }
}

fn execute(rig: &mut Rig, command: Command) -> Result<()> {
    let reply = match command {
        Command::Agent(op) => match rig.agent_call(op, AGENT_TIMEOUT)? {
            Ok(reply) => serde_json::to_string(&reply)?,
            Err(refused) => format!("refused: {}", serde_json::to_string(&refused)?),
        },
        Command::Device(op) => serde_json::to_string(&rig.device_call(op)?)?,
        Command::Target(op) => match rig.target_call(op)? {
            Ok(reply) => serde_json::to_string(&reply)?,
            Err(refused) => format!("refused: {}", serde_json::to_string(&refused)?),
        },
        Command::Console(n) => {
            let text = std::fs::read_to_string(rig.console_path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Command::Help => HELP.to_string(),
        Command::Exit | Command::Nothing => return Ok(()),
    };
    println!("{reply}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_an_operation_and_give_its_fields_as_json() -> Result<()> {
        assert_eq!(parse("hello")?, Command::Agent(AgentOp::Hello));
        assert_eq!(
            parse(r#"  vfio_bind {"bdf": "0000:02:00.0"} "#)?,
            Command::Agent(AgentOp::VfioBind {
                bdf: "0000:02:00.0".into()
            })
        );
        assert_eq!(parse("device stats")?, Command::Device(DeviceOp::Stats));
        assert_eq!(
            parse(r#"device events_since {"since": 3, "limit": 2}"#)?,
            Command::Device(DeviceOp::EventsSince {
                since: 3,
                limit: Some(2)
            })
        );
        assert_eq!(parse("console 5")?, Command::Console(5));
        assert_eq!(parse("console")?, Command::Console(20));
        assert_eq!(parse("")?, Command::Nothing);
        assert_eq!(parse("exit")?, Command::Exit);
        Ok(())
    }

    #[test]
    fn a_wrong_line_says_what_is_wrong_and_what_would_be_right() {
        let err = |line: &str| format!("{:#}", parse(line).expect_err(line));
        assert!(
            err("no_such_op").contains("unknown variant `no_such_op`, expected one of"),
            "{}",
            err("no_such_op")
        );
        assert!(
            err("vfio_bind").contains("missing field `bdf`"),
            "{}",
            err("vfio_bind")
        );
        assert!(err("vfio_bind [1]").contains("must be a JSON object"));
        assert!(err("vfio_bind {bdf}").contains("are not JSON"));
        assert!(err("device").contains("needs an operation name"));
        assert!(err("console many").contains("give a number of lines"));
    }
}
