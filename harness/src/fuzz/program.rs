//! A fuzz program: a short list of operations over the rig, and its text form, one operation a
//! line (`export 0 doorbell`, `reset flr 800`), which is what a finding is saved and replayed as.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Buffer and MR slots a program names its dma-bufs and MRs by: small, so that operations
/// meet the same objects often.
pub const SLOTS: u8 = 2;

/// What an `export` asks for: the two slices the device has something behind, and two the
/// exporter must refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Slice {
    /// BAR0's doorbell page (0x1000, 4 KiB).
    Doorbell,
    /// 8 KiB of the CMB in BAR2 at 0x1000.
    Cmb,
    /// BAR0 at 0x1004: not page aligned.
    Unaligned,
    /// BAR1: the upper half of 64-bit BAR0, no BAR of its own.
    AbsentBar,
}

impl Slice {
    pub const ALL: [Slice; 4] = [
        Slice::Doorbell,
        Slice::Cmb,
        Slice::Unaligned,
        Slice::AbsentBar,
    ];

    /// (bar, offset, length) of the export request.
    pub fn request(self) -> (u32, u64, u64) {
        match self {
            Slice::Doorbell => (0, 0x1000, 0x1000),
            Slice::Cmb => (2, 0x1000, 0x2000),
            Slice::Unaligned => (0, 0x1004, 0x1000),
            Slice::AbsentBar => (1, 0, 0x1000),
        }
    }

    /// The exporter must accept it.
    pub fn valid(self) -> bool {
        matches!(self, Slice::Doorbell | Slice::Cmb)
    }

    fn name(self) -> &'static str {
        match self {
            Slice::Doorbell => "doorbell",
            Slice::Cmb => "cmb",
            Slice::Unaligned => "unaligned",
            Slice::AbsentBar => "absent-bar",
        }
    }
}

/// The resets a program can hold open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResetKind {
    /// VFIO_DEVICE_RESET.
    Vfio,
    /// Initiate FLR in the PCIe Device Control register.
    Flr,
    /// VFIO_DEVICE_PCI_HOT_RESET (secondary bus reset).
    Hot,
}

impl ResetKind {
    pub const ALL: [ResetKind; 3] = [ResetKind::Vfio, ResetKind::Flr, ResetKind::Hot];

    pub fn name(self) -> &'static str {
        match self {
            ResetKind::Vfio => "vfio",
            ResetKind::Flr => "flr",
            ResetKind::Hot => "hot",
        }
    }
}

/// One operation. Slots name the program's dma-bufs (`buf`) and MRs (`mr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Export a slice of the open device as a dma-buf into slot `buf`.
    Export {
        buf: u8,
        slice: Slice,
    },
    /// Close the dma-buf's fd (an MR over it keeps the buffer).
    CloseBuf {
        buf: u8,
    },
    /// rxe: ibv_reg_dmabuf_mr over the whole dma-buf in slot `buf`.
    Reg {
        mr: u8,
        buf: u8,
    },
    Dereg {
        mr: u8,
    },
    /// An 8-byte RDMA WRITE through the MR from the guest's loopback QP, at 8-byte word
    /// `word` of the slice (the doorbell page always takes SQ1TDBL).
    Write {
        mr: u8,
        word: u16,
    },
    /// The same from roce-target, over RoCEv2.
    TargetWrite {
        mr: u8,
        word: u16,
    },
    /// Start a reset the device holds for `hold_ms`; the next operations run inside it.
    Reset {
        kind: ResetKind,
        hold_ms: u32,
    },
    /// Wait for the held reset's ioctl (or config write) to return.
    ResetEnd,
    DecodeOff,
    DecodeOn,
    /// PMCSR D3hot, and back.
    D3,
    D0,
    /// VFIO's LOW_POWER_ENTRY and LOW_POWER_EXIT.
    LowPowerEnter,
    LowPowerExit,
    /// Close the VFIO device fd, every dma-buf and MR kept.
    CloseDevice,
    OpenDevice,
    Sleep {
        ms: u32,
    },
}

impl Op {
    /// The operation's name, as its line starts.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Export { .. } => "export",
            Op::CloseBuf { .. } => "close-buf",
            Op::Reg { .. } => "reg",
            Op::Dereg { .. } => "dereg",
            Op::Write { .. } => "write",
            Op::TargetWrite { .. } => "target-write",
            Op::Reset { .. } => "reset",
            Op::ResetEnd => "reset-end",
            Op::DecodeOff => "decode-off",
            Op::DecodeOn => "decode-on",
            Op::D3 => "d3",
            Op::D0 => "d0",
            Op::LowPowerEnter => "low-power-enter",
            Op::LowPowerExit => "low-power-exit",
            Op::CloseDevice => "close-device",
            Op::OpenDevice => "open-device",
            Op::Sleep { .. } => "sleep",
        }
    }

    /// The time the operation waits by itself, which minimisation tries to shorten.
    pub fn hold_ms(&self) -> Option<u32> {
        match self {
            Op::Reset { hold_ms, .. } => Some(*hold_ms),
            Op::Sleep { ms } => Some(*ms),
            _ => None,
        }
    }

    pub fn with_hold_ms(self, ms: u32) -> Op {
        match self {
            Op::Reset { kind, .. } => Op::Reset { kind, hold_ms: ms },
            Op::Sleep { .. } => Op::Sleep { ms },
            other => other,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind();
        match self {
            Op::Export { buf, slice } => write!(f, "{kind} {buf} {}", slice.name()),
            Op::CloseBuf { buf } => write!(f, "{kind} {buf}"),
            Op::Reg { mr, buf } => write!(f, "{kind} {mr} {buf}"),
            Op::Dereg { mr } => write!(f, "{kind} {mr}"),
            Op::Write { mr, word } | Op::TargetWrite { mr, word } => {
                write!(f, "{kind} {mr} {word}")
            }
            Op::Reset {
                kind: reset,
                hold_ms,
            } => write!(f, "{kind} {} {hold_ms}", reset.name()),
            Op::Sleep { ms } => write!(f, "{kind} {ms}"),
            _ => f.write_str(kind),
        }
    }
}

/// Longest hold or sleep a program line may ask for.
pub const MAX_HOLD_MS: u32 = 10_000;
/// Words in the largest valid slice (the CMB's 8 KiB).
pub const MAX_WORD: u16 = 0x2000 / 8;
/// Operations a program file may hold.
pub const MAX_OPS: usize = 256;

impl FromStr for Op {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&kind, args)) = words.split_first() else {
            return Err("an empty operation".into());
        };
        let want = |n: usize, usage: &str| {
            if args.len() == n {
                Ok(())
            } else {
                Err(format!("`{line}`: expected `{usage}`"))
            }
        };
        let slot = |text: &str| -> Result<u8, String> {
            match text.parse::<u8>() {
                Ok(n) if n < SLOTS => Ok(n),
                _ => Err(format!(
                    "`{line}`: slot `{text}` is not 0..{}",
                    SLOTS.saturating_sub(1)
                )),
            }
        };
        let number = |text: &str, max: u32| -> Result<u32, String> {
            match text.parse::<u32>() {
                Ok(n) if n <= max => Ok(n),
                _ => Err(format!("`{line}`: `{text}` is not a number 0..={max}")),
            }
        };
        let word = |text: &str| -> Result<u16, String> {
            Ok(number(text, u32::from(MAX_WORD) - 1)? as u16)
        };
        let op = match kind {
            "export" => {
                want(2, "export BUF doorbell|cmb|unaligned|absent-bar")?;
                let slice = Slice::ALL
                    .into_iter()
                    .find(|s| s.name() == args[1])
                    .ok_or_else(|| format!("`{line}`: no slice `{}`", args[1]))?;
                Op::Export {
                    buf: slot(args[0])?,
                    slice,
                }
            }
            "close-buf" => {
                want(1, "close-buf BUF")?;
                Op::CloseBuf {
                    buf: slot(args[0])?,
                }
            }
            "reg" => {
                want(2, "reg MR BUF")?;
                Op::Reg {
                    mr: slot(args[0])?,
                    buf: slot(args[1])?,
                }
            }
            "dereg" => {
                want(1, "dereg MR")?;
                Op::Dereg { mr: slot(args[0])? }
            }
            "write" | "target-write" => {
                want(2, &format!("{kind} MR WORD"))?;
                let (mr, word) = (slot(args[0])?, word(args[1])?);
                if kind == "write" {
                    Op::Write { mr, word }
                } else {
                    Op::TargetWrite { mr, word }
                }
            }
            "reset" => {
                want(2, "reset vfio|flr|hot HOLD_MS")?;
                let reset = ResetKind::ALL
                    .into_iter()
                    .find(|k| k.name() == args[0])
                    .ok_or_else(|| format!("`{line}`: no reset `{}`", args[0]))?;
                Op::Reset {
                    kind: reset,
                    hold_ms: number(args[1], MAX_HOLD_MS)?,
                }
            }
            "sleep" => {
                want(1, "sleep MS")?;
                Op::Sleep {
                    ms: number(args[0], MAX_HOLD_MS)?,
                }
            }
            bare => {
                want(0, bare)?;
                match bare {
                    "reset-end" => Op::ResetEnd,
                    "decode-off" => Op::DecodeOff,
                    "decode-on" => Op::DecodeOn,
                    "d3" => Op::D3,
                    "d0" => Op::D0,
                    "low-power-enter" => Op::LowPowerEnter,
                    "low-power-exit" => Op::LowPowerExit,
                    "close-device" => Op::CloseDevice,
                    "open-device" => Op::OpenDevice,
                    _ => return Err(format!("`{line}`: no operation `{bare}`")),
                }
            }
        };
        Ok(op)
    }
}

/// A program: its operations in order. Every program starts on a freshly opened device with
/// no dma-buf and no MR, and its leftovers are released after its last operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Program {
    pub ops: Vec<Op>,
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for op in &self.ops {
            writeln!(f, "{op}")?;
        }
        Ok(())
    }
}

impl Program {
    /// Reads a program file: one operation a line; `#` starts a comment.
    pub fn parse(text: &str) -> Result<Program, String> {
        let mut ops = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if ops.len() == MAX_OPS {
                return Err(format!("more than {MAX_OPS} operations"));
            }
            ops.push(
                line.parse()
                    .map_err(|e: String| format!("line {}: {e}", number + 1))?,
            );
        }
        Ok(Program { ops })
    }

    /// The program as a file: a header saying what it is, then its operations.
    pub fn to_file(&self, header: &str) -> String {
        let mut text = String::new();
        for line in header.lines() {
            text.push_str("# ");
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(&self.to_string());
        text
    }

    /// The step list a finding prints: numbered operations.
    pub fn steps(&self) -> String {
        self.ops
            .iter()
            .enumerate()
            .map(|(i, op)| format!("  {:>2}. {op}\n", i + 1))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_round_trips_through_its_line() {
        let ops = [
            Op::Export {
                buf: 1,
                slice: Slice::AbsentBar,
            },
            Op::CloseBuf { buf: 0 },
            Op::Reg { mr: 1, buf: 0 },
            Op::Dereg { mr: 1 },
            Op::Write { mr: 0, word: 7 },
            Op::TargetWrite { mr: 1, word: 1023 },
            Op::Reset {
                kind: ResetKind::Hot,
                hold_ms: 800,
            },
            Op::ResetEnd,
            Op::DecodeOff,
            Op::DecodeOn,
            Op::D3,
            Op::D0,
            Op::LowPowerEnter,
            Op::LowPowerExit,
            Op::CloseDevice,
            Op::OpenDevice,
            Op::Sleep { ms: 0 },
        ];
        let program = Program { ops: ops.to_vec() };
        let text = program.to_file("a header\nof two lines");
        assert!(text.starts_with("# a header\n# of two lines\nexport 1 absent-bar\n"));
        assert_eq!(Program::parse(&text), Ok(program));
    }

    #[test]
    fn bad_lines_say_which_line_and_what_is_wrong() {
        let cases = [
            ("export 0 rom", "line 1: `export 0 rom`: no slice `rom`"),
            ("\n\nreg 0", "line 3: `reg 0`: expected `reg MR BUF`"),
            ("dereg 2", "slot `2` is not 0..1"),
            ("write 0 1024", "`1024` is not a number 0..=1023"),
            ("sleep 10001", "is not a number 0..=10000"),
            ("reset warm 5", "no reset `warm`"),
            ("d3 now", "expected `d3`"),
            ("reboot", "no operation `reboot`"),
        ];
        for (text, error) in cases {
            let got = Program::parse(text).expect_err(text);
            assert!(got.contains(error), "{text}: {got}");
        }
        let long = "sleep 1\n".repeat(MAX_OPS + 1);
        assert!(Program::parse(&long).is_err_and(|e| e.contains("more than 256")));
    }

    #[test]
    fn comments_and_blank_lines_are_not_operations() {
        let program = Program::parse("# found by p2prig fuzz\n\nd3   # into D3hot\n  d0\n");
        assert_eq!(
            program,
            Ok(Program {
                ops: vec![Op::D3, Op::D0]
            })
        );
    }
}
